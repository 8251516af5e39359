"""What ``LossLogger`` adds when a ``WandbLogger`` is among the trainer's loggers.

Every function here runs on rank zero only and is skipped without W&B; ``wandb`` is imported
only once a W&B logger was found, so it is never required.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import WandbLogger

from lightning_lossagg.callbacks._trajectory import SUMMARY_COLUMNS, Trajectory
from lightning_lossagg.weighting import WeightingCallback

STEP_METRIC = "trainer/global_step"  # the x-axis Lightning's WandbLogger logs with every row
PREFIXES = ("train", "train_epoch", "val", "test")
WEIGHTS_CHART, SUMMARY_TABLE, TRAJECTORY_IMAGE = (
    "lossagg/weights",
    "lossagg/task_summary",
    "lossagg/trajectories",
)


def find_wandb_logger(trainer: L.Trainer) -> WandbLogger | None:
    """The first ``WandbLogger`` among ``trainer.loggers``, if any."""
    return next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)


def task_setup(trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
    """The model's tasks (loss, static weight, reduction), rank weighting and weighting method."""
    tasks = getattr(pl_module, "tasks", {})
    # trainer.callbacks: set by Lightning's callback connector.
    methods = [cb for cb in trainer.callbacks if isinstance(cb, WeightingCallback)]  # type: ignore[attr-defined]
    method = methods[0] if methods else None
    setup = {
        "tasks": {
            name: {"loss": task.loss_name, "weight": task.weight, "reduction": task.reduction}
            for name, task in tasks.items()
        },
        "rank_weighting": getattr(pl_module, "rank_weighting", None),
        "weighting": {
            "method": type(method).__name__ if method is not None else None,
            "arguments": method.method_arguments if method is not None else {},
        },
    }
    # Arguments may hold tuples or objects: the config holds their JSON form.
    return json.loads(json.dumps(setup, default=str))


def describe_run(
    logger: WandbLogger, trainer: L.Trainer, pl_module: L.LightningModule, names: tuple[str, ...]
) -> None:
    """Define the summaries of every LossLogger key and put the task setup in the run config."""
    experiment = logger.experiment
    # WandbLogger(prefix=...) logs every key as "<prefix>-<key>": the summaries follow.
    logged_as = f"{logger._prefix}{logger.LOGGER_JOIN_CHAR}" if logger._prefix else ""
    for prefix in PREFIXES:
        summaries = {f"{prefix}/loss": "min", f"{prefix}/static_loss": "min"}
        for name in names:
            summaries[f"{prefix}/loss/{name}"] = "min"
            summaries[f"{prefix}/weighted/{name}"] = "min"
            summaries[f"{prefix}/weight/{name}"] = "last"
            summaries[f"{prefix}/share/{name}"] = "last"
        for key, summary in summaries.items():
            # W&B reads a dot in a defined metric's name as a nested key: a task named with one
            # would lose its summary.
            name = (logged_as + key).replace(".", "\\.")
            experiment.define_metric(name, step_metric=STEP_METRIC, step_sync=True, summary=summary)
    experiment.config.update({"lossagg": task_setup(trainer, pl_module)}, allow_val_change=True)


def log_end_of_fit(
    logger: WandbLogger,
    step: int,
    trajectory: Trajectory,
    names: tuple[str, ...],
    image: Path | None,
) -> None:
    """The weights chart, the per-task summary table and the trajectory plot, in one row."""
    import wandb

    _, weights = trajectory.values()
    per_task = [[_json_number(value) for value in task] for task in weights.T.tolist()]
    extras: dict[str, Any] = {
        WEIGHTS_CHART: wandb.plot.line_series(
            xs=trajectory.steps,
            ys=per_task,
            keys=list(names),
            title="Task weights",
            xname=STEP_METRIC,
        ),
        SUMMARY_TABLE: wandb.Table(
            columns=list(SUMMARY_COLUMNS), data=trajectory.summary_rows(names)
        ),
    }
    if image is not None:
        extras[TRAJECTORY_IMAGE] = wandb.Image(str(image))
    logger.log_metrics(extras, step=step)


def _json_number(value: float) -> float | None:
    return value if math.isfinite(value) else None
