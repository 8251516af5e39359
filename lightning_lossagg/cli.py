"""The ``lossagg`` command: LightningCLI over any LightningModule and LightningDataModule.

``lossagg fit --config configs/penguins.yaml`` trains the penguins demo; models and data are named
by class path in the config (``subclass_mode``), so a user's own classes work the same way.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.cli import LightningCLI


def build_cli(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Run ``lossagg`` (``fit``/``validate``/``test``/``predict``) with ``args`` or ``sys.argv``."""
    return LightningCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=run,
        # The config goes beside the logger's runs (runs/<name>/config.yaml): the latest run's,
        # so that a second `lossagg fit` or a `lossagg test` with the same config runs too.
        save_config_kwargs={"overwrite": True},
    )


def main() -> None:
    """The ``lossagg`` console script."""
    build_cli()


if __name__ == "__main__":
    main()
