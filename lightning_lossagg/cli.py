"""The ``lossagg`` command: LightningCLI over any LightningModule and LightningDataModule.

``lossagg fit --config configs/penguins.yaml`` trains the penguins demo; models and data are named
by class path in the config (``subclass_mode``), so a user's own classes work the same way.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from typing_extensions import override


class SaveFitConfig(SaveConfigCallback):
    """Saves the config of a fit beside the logger's runs (``runs/<name>/config.yaml``), the
    latest fit's; ``validate``, ``test`` and ``predict`` leave it as the fit wrote it."""

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> Any:
        if stage == "fit":
            super().setup(trainer, pl_module, stage)


def build_cli(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Run ``lossagg`` (``fit``/``validate``/``test``/``predict``) with ``args`` or ``sys.argv``."""
    return LightningCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=run,
        save_config_callback=SaveFitConfig,
        # A second `lossagg fit` of the same config replaces the first's.
        save_config_kwargs={"overwrite": True},
    )


def main() -> None:
    """The ``lossagg`` console script."""
    build_cli()


if __name__ == "__main__":
    main()
