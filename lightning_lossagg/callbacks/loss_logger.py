"""``LossLogger``: every component of the objective, in every Lightning logger."""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import Tensor
from typing_extensions import override

from lightning_lossagg.callbacks import _wandb_extras
from lightning_lossagg.callbacks._direct_log import logging_step, write_metrics
from lightning_lossagg.callbacks._records import SavedRecord, StepRecords
from lightning_lossagg.callbacks._trajectory import Trajectory
from lightning_lossagg.weighting import LossRecord, check_checkpoint_tasks

PLOT_FILE = "loss_trajectories.png"

STAGES = ("train", "val", "test")

# The per-step figures a task without a valid sample in the step does not log.
_NO_POINT_WITHOUT_A_SAMPLE = ("loss", "weight", "weighted", "share")

# Lightning advises sync_dist=True for every epoch-level figure logged under DDP; this logger's
# are global already (the mixin's all-reduce made them so): the advice is silenced for them alone.
_SYNC_DIST_ADVICE = (
    r"It is recommended to use `self\.log\('(train_epoch|val|test)/"
    r"(loss|static_loss|(loss|weight|weighted|share)/[^']*)', \.\.\., sync_dist=True\)`"
)


class _EpochAccumulator:
    """Device-side sums of one epoch's records, with no host sync until the epoch ends.

    A step only keeps its record's losses and weights (new tensors, computed when the record is
    read) and a copy of its counts; they are summed ``CHUNK`` steps at a time, so that most steps
    cost no arithmetic of their own. Its state (for a checkpoint taken mid-epoch) holds the same
    figures unsummed, so that a resumed epoch sums them exactly as an uninterrupted one.
    """

    CHUNK = 32

    def __init__(self) -> None:
        self._pending: list[tuple[Tensor, Tensor, Tensor]] = []
        # Rows: loss * count, weighted loss * count, weight, count, steps with a valid sample.
        self._sums: Tensor | None = None
        self._restored = False  # restored from a checkpoint: on the host until the next step

    def add(self, record: LossRecord | SavedRecord) -> None:
        if self._restored:
            self._move_to(record.losses.device)
        self._pending.append((record.losses, record.weights, record.counts.clone()))
        if len(self._pending) == self.CHUNK:
            self._reduce()

    def state_dict(self) -> dict[str, Any]:
        """The sums so far and the steps not yet summed, on the host."""
        columns = [torch.stack(column).cpu() for column in zip(*self._pending, strict=True)]
        sums = None if self._sums is None else self._sums.cpu()
        return {"sums": sums, "pending": columns}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> _EpochAccumulator:
        accumulator = cls()
        accumulator._sums = state["sums"]
        accumulator._pending = list(zip(*(c.unbind() for c in state["pending"]), strict=True))
        accumulator._restored = True
        return accumulator

    def _move_to(self, device: torch.device) -> None:
        self._restored = False
        self._pending = [tuple(t.to(device) for t in step) for step in self._pending]  # type: ignore[misc]
        self._sums = None if self._sums is None else self._sums.to(device)

    def _reduce(self) -> None:
        if not self._pending:
            return
        columns = zip(*self._pending, strict=True)
        losses, weights, counts = (torch.stack(column) for column in columns)
        counts = counts.to(losses.dtype)
        # A task without a valid sample has a NaN loss and a zero count: it adds nothing. A NaN
        # loss of valid samples (an evaluation that diverged) makes the epoch's NaN.
        valid = counts > 0
        scaled = torch.where(valid, losses, 0.0) * counts
        # Record weights are 0 where a task had no valid sample: their mean is over the others.
        sums = torch.stack([scaled, scaled * weights, weights, counts, valid.to(counts.dtype)])
        sums = sums.sum(1)
        self._sums = sums if self._sums is None else self._sums + sums
        self._pending = []

    def means(self) -> tuple[list[float], list[float], list[float], list[float]] | None:
        """Sample-weighted epoch means of losses and weighted losses, each task's mean weight
        over the steps in which it had a valid sample (NaN for a task with none), and the number
        of those steps."""
        self._reduce()
        if self._sums is None:
            return None
        loss_sum, weighted_sum, weight_sum, count, valid_steps = self._sums
        safe_count = count.clamp(min=torch.finfo(count.dtype).tiny)
        packed = torch.stack(
            [
                torch.where(count > 0, loss_sum / safe_count, torch.nan),
                weighted_sum / safe_count,
                weight_sum / valid_steps,
                valid_steps,
            ]
        )
        losses, weighted, weights, steps = packed.tolist()  # one host transfer per epoch
        return losses, weighted, weights, steps


class LossLogger(L.Callback):
    """Logs each task's global loss, weight, weighted loss and share, and the objective.

    Per training step (at the trainer's ``log_every_n_steps``): ``train/loss/<task>``,
    ``train/weight/<task>``, ``train/weighted/<task>``, ``train/share/<task>`` (the task's share
    of the objective; these four only for the tasks with a valid sample in the step),
    ``train/loss`` (also on the progress bar, at every step), the weighting method's state
    (``train/<state>/<task>``, e.g. ``train/log_var/<task>`` or, for gradient-based methods,
    ``train/grad_norm/<task>``) and its pairwise state (``train/<state>/<task_a>~<task_b>``, e.g.
    ``train/grad_cos/<task_a>~<task_b>``). With gradient accumulation a step is an optimizer step,
    logged with its last micro-batch's figures, as Lightning logs its own step metrics (the epoch
    figures count every micro-batch). Per epoch, as global sample-weighted means: the same
    per-task keys under ``train_epoch/``, ``val/`` and ``test/`` (a task's weight: its mean over
    the steps with a valid sample of it; a NaN loss of valid samples makes the epoch's NaN), and
    ``<stage>/static_loss``, the objective at ``Task.weight`` alone: it does not move with the
    method's weights, so checkpoints and early stopping should monitor ``val/static_loss``.

    At the end of fit, with any logger, a PNG of every task's loss and weight over the logged
    steps (``loss_trajectories.png`` in the logger's run folder; needs matplotlib, the ``plot``
    extra, else a warning). With a ``WandbLogger`` among the loggers it also defines the summaries
    of those keys (min for losses, last for weights and shares, against ``trainer/global_step``),
    puts the task setup and the weighting method in the run config (``lossagg``), and at the end
    of fit logs a chart of the weights (``lossagg/weights``), a table of each task's first, best
    and last loss and final weight (``lossagg/task_summary``) and the PNG
    (``lossagg/trajectories``).

    Every figure is already global (the mixin's one all-reduce per step made it so), so nothing
    here issues a collective, and only rank zero writes. Between logging steps a training step
    only keeps its record's losses and weights for the epoch means, on the device. At a logging
    step the figures reach the host in one transfer and go straight to the loggers (one row per
    logger, as Lightning's LearningRateMonitor does, not through ``LightningModule.log``, whose
    per-key bookkeeping would cost more than the step); ``train/loss`` also goes to the progress
    bar and ``trainer.callback_metrics``. Epoch figures go through ``LightningModule.log``, so
    ``ModelCheckpoint`` and ``EarlyStopping`` can monitor them (``val/static_loss`` for
    example). The values for the end of fit reach the host once per epoch.

    Args:
        prog_bar: show ``train/loss`` and ``val/loss`` on the progress bar (Lightning then reads
            the progress-bar value to the host after every batch; ``False`` avoids that sync).
        plot: write the trajectory PNG at the end of fit.
    """

    def __init__(self, prog_bar: bool = True, plot: bool = True) -> None:
        self.prog_bar = prog_bar
        self.plot = plot
        self._epochs: dict[str, _EpochAccumulator] = {}
        # The records of the optimizer step's micro-batches so far: they join the epoch's
        # figures once the step is taken (a skipped step's leave nothing).
        self._steps = StepRecords()
        self._trajectory: Trajectory | None = None
        self._wandb: WandbLogger | None = None
        self._described_runs: set[str] = set()
        self._train_epoch = 0
        # A checkpoint's training epoch figures, until the fit it resumes starts: (epoch, sums).
        self._restored_epoch: tuple[int, _EpochAccumulator, list[SavedRecord]] | None = None

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not hasattr(pl_module, "loss_record"):
            raise TypeError(
                f"LossLogger needs a MultiTaskMixin model; {type(pl_module).__name__} is not one. "
                "Add MultiTaskMixin to the model's bases."
            )
        warnings.filterwarnings("ignore", _SYNC_DIST_ADVICE, PossibleUserWarning)
        self._wandb = _wandb_extras.find_wandb_logger(trainer) if trainer.is_global_zero else None
        if self._wandb is not None and self._wandb.experiment.id not in self._described_runs:
            names: tuple[str, ...] = pl_module.task_names  # type: ignore[assignment]
            _wandb_extras.describe_run(self._wandb, trainer, pl_module, names)
            self._described_runs.add(self._wandb.experiment.id)

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Only rank zero writes; without a logger there is no run folder to write the plot to.
        wanted = self.plot or self._wandb is not None
        keep = trainer.is_global_zero and bool(trainer.loggers) and wanted
        self._trajectory = Trajectory() if keep else None
        self._steps.pending = []  # an earlier fit may have stopped amid a step

    # --------------------------------------------------------------------- per batch
    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        # Per optimizer step, as Lightning's own step metrics: its last micro-batch's figures.
        # A step skipped for a non-finite loss gives no row, and its finite micro-batches stay
        # out of the epoch's figures, as out of the model and the method's state.
        record, records = self._steps.end_batch(trainer, pl_module)
        if records is None:
            return
        for taken in records:
            if isinstance(taken, SavedRecord) and record is not None:
                taken = taken.to(record.losses.device)
            self._take(taken, "train")
        if record is None:
            return
        should_log = trainer._logger_connector.should_update_logs
        if should_log or (self.prog_bar and trainer.progress_bar_callback is not None):
            # For the progress bar (fresh at every step) and callbacks that monitor it; the
            # loggers get it below.
            pl_module.log(
                "train/loss", record.objective, prog_bar=self.prog_bar, logger=False, batch_size=1
            )
        if should_log and trainer.is_global_zero and trainer.loggers:
            metrics = _step_metrics(record)
            if getattr(pl_module, "nonfinite", "raise") != "raise":
                metrics["train/skipped_steps"] = float(pl_module.skipped_steps)  # type: ignore[arg-type]
            write_metrics(trainer, metrics)
        trajectory = self._trajectory
        if trajectory is not None and (should_log or not trajectory.steps):
            # The first step too, so that the end-of-fit table has the starting loss.
            trajectory.add(logging_step(trainer), record)

    @override
    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        i: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._take(self._steps.fresh.take(pl_module), "val")

    @override
    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        i: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._take(self._steps.fresh.take(pl_module), "test")

    def _take(self, record: LossRecord | SavedRecord | None, stage: str) -> None:
        """Add ``record`` to its stage's epoch figures, if it is one of that stage."""
        if record is None or record.stage != stage:
            return
        accumulator = self._epochs.get(stage)
        if accumulator is None:
            accumulator = self._epochs[stage] = _EpochAccumulator()
        accumulator.add(record)

    # --------------------------------------------------------------------- checkpoint
    @override
    def state_dict(self) -> dict[str, Any]:
        """The training epoch's figures so far, with those of the optimizer step's micro-batches
        (a checkpoint saved amid one): a run resumed from a checkpoint taken mid-epoch (where
        Lightning does not start the epoch again) logs the same epoch figures as an
        uninterrupted one. Evaluation epochs end before any checkpoint is taken."""
        train = self._epochs.get("train")
        if train is None and not self._steps.pending:
            return {}
        return {
            "epoch": self._train_epoch,
            "train_epoch": (train or _EpochAccumulator()).state_dict(),
            "step_records": self._steps.state(),
        }

    @override
    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        check_checkpoint_tasks(self, trainer, pl_module, checkpoint)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "train_epoch" in state_dict:
            accumulator = _EpochAccumulator.from_state(state_dict["train_epoch"])
            step = StepRecords.restored(state_dict.get("step_records", []))
            self._restored_epoch = (state_dict["epoch"], accumulator, step)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        restored, self._restored_epoch = self._restored_epoch, None
        # Resumed at an epoch's last batch, Lightning goes on with the next epoch (without
        # on_train_epoch_start): the restored figures are then another epoch's.
        if restored is not None and restored[0] == trainer.current_epoch:
            self._epochs["train"] = restored[1]
            self._steps.pending = list(restored[2])
        self._train_epoch = trainer.current_epoch

    # --------------------------------------------------------------------- per epoch
    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epochs["train"] = _EpochAccumulator()
        self._train_epoch = trainer.current_epoch

    @override
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epochs["val"] = _EpochAccumulator()

    @override
    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epochs["test"] = _EpochAccumulator()

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log_epoch(pl_module, "train", "train_epoch")
        if self._trajectory is not None:
            self._trajectory.flush()

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._log_epoch(pl_module, "val", "val")

    @override
    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log_epoch(pl_module, "test", "test")

    def _log_epoch(self, pl_module: L.LightningModule, stage: str, prefix: str) -> None:
        accumulator = self._epochs.pop(stage, None)
        means = accumulator.means() if accumulator is not None else None
        if means is None:
            return
        losses, weighted, weights, steps = means
        names: tuple[str, ...] = pl_module.task_names  # type: ignore[assignment]
        objective = sum(weighted)
        # The objective at Task.weight alone: comparable across epochs whatever the method's
        # weights (the figure for checkpoints and early stopping to monitor).
        static = [task.weight for task in pl_module.tasks.values()]  # type: ignore[operator]
        present = zip(static, losses, steps, strict=True)
        static_objective = sum((weight * loss for weight, loss, n in present if n > 0), 0.0)
        metrics = {}
        for name, loss, weight, part, n in zip(
            names, losses, weights, weighted, steps, strict=True
        ):
            if n == 0:  # no valid sample all epoch: no point, as at the step level (a NaN or 0
                continue  # would spoil the loggers' summaries and EarlyStopping's checks)
            metrics[f"{prefix}/loss/{name}"] = loss
            metrics[f"{prefix}/weight/{name}"] = weight
            metrics[f"{prefix}/weighted/{name}"] = part
            metrics[f"{prefix}/share/{name}"] = part / objective if objective else 0.0
        # As host tensors: Lightning keeps a logged tensor where it is, but would copy a float
        # to the model's device, one wait for it per figure.
        # In float64, as they were summed: a float32 copy would round a 64-true run's figures.
        on_host = {key: torch.tensor(value, dtype=torch.float64) for key, value in metrics.items()}
        pl_module.log_dict(on_host, batch_size=1)
        prog_bar = self.prog_bar and stage == "val"
        total, static_total = (
            torch.tensor(value, dtype=torch.float64) for value in (objective, static_objective)
        )
        pl_module.log(f"{prefix}/loss", total, prog_bar=prog_bar, batch_size=1)
        pl_module.log(f"{prefix}/static_loss", static_total, batch_size=1)

    # --------------------------------------------------------------------- end of fit
    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trajectory, self._trajectory = self._trajectory, None
        if trajectory is None:
            return
        trajectory.flush()
        if not trajectory.steps:
            return
        names: tuple[str, ...] = pl_module.task_names  # type: ignore[assignment]
        image = self._write_plot(trainer, trajectory, names) if self.plot else None
        if self._wandb is not None:
            step = logging_step(trainer)
            _wandb_extras.log_end_of_fit(self._wandb, step, trajectory, names, image)

    def _write_plot(
        self, trainer: L.Trainer, trajectory: Trajectory, names: tuple[str, ...]
    ) -> Path | None:
        from lightning_lossagg import plotting

        folder = self._run_folder(trainer)
        if folder is None:
            return None
        if len(trajectory.steps) == 1:
            every = trainer.log_every_n_steps  # type: ignore[attr-defined]  # set by Lightning
            rank_zero_warn(
                f"LossLogger's plot has one point per task, no line: the fit logged every "
                f"log_every_n_steps={every}th of its {trainer.global_step} "
                "optimizer steps. Give Trainer(log_every_n_steps=...) a smaller value to see "
                "the trajectories.",
                category=UserWarning,
            )
        losses, weights = trajectory.values()
        try:
            figure = plotting.trajectory_figure(trajectory.steps, losses, weights, names)
        except ImportError as error:
            rank_zero_warn(str(error), category=UserWarning)
            return None
        return plotting.save_figure(figure, Path(folder) / PLOT_FILE)

    def _run_folder(self, trainer: L.Trainer) -> str | None:
        """The W&B run's files folder, else the first logger's run folder. Not
        ``trainer.log_dir``: it broadcasts, a collective that rank zero must not call alone."""
        if self._wandb is not None:
            return self._wandb.experiment.dir
        logger = trainer.loggers[0]
        return getattr(logger, "log_dir", None) or logger.save_dir


def _step_metrics(record: LossRecord) -> dict[str, float]:
    """The record's figures, moved to the host in ONE transfer: ``<stage>/loss``, per task
    ``<stage>/<figure>/<task>`` and per pair of tasks ``<stage>/<state>/<task_a>~<task_b>``."""
    objective = record.objective
    figures = {"loss": record.losses, "weight": record.weights, "weighted": record.weighted}
    figures["share"] = record.weighted / torch.where(objective != 0, objective, 1.0)
    figures.update(record.method_state)
    names, stage = record.names, record.stage
    keys, parts = [f"{stage}/loss"], [objective.reshape(1)]
    for figure, per_task in figures.items():
        keys += [f"{stage}/{figure}/{name}" for name in names]
        parts.append(per_task.reshape(-1))
    pairs = list(itertools.combinations(range(len(names)), 2))
    for state, matrix in record.pairwise_state.items():
        keys += [f"{stage}/{state}/{names[i]}~{names[j]}" for i, j in pairs]
        parts.append(matrix[[i for i, _ in pairs], [j for _, j in pairs]])
    parts.append(record.counts.reshape(-1))
    dtype = torch.promote_types(record.losses.dtype, torch.float32)
    device = record.losses.device
    values = torch.cat([part.detach().to(device, dtype) for part in parts]).tolist()
    counts = values[-len(names) :]
    metrics = dict(zip(keys, values[: -len(names)], strict=True))
    # A task without a valid sample in the step had no part in it: no point for it (a NaN loss
    # and weights of 0 would spoil the loggers' summaries, W&B's min and last).
    for name, count in zip(names, counts, strict=True):
        if count == 0:
            for figure in _NO_POINT_WITHOUT_A_SAMPLE:
                del metrics[f"{stage}/{figure}/{name}"]
    return metrics
