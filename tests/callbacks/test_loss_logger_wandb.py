"""LossLogger with W&B: one real offline fit (and test) read back from the run file, and the same
fit with CSVLogger, which must get the same scalars and none of the W&B extras."""

import csv
import itertools
import math
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from lightning_lossagg import LossRecord, MultiTaskMixin, Task
from lightning_lossagg.callbacks import LossBalanceMonitor, LossLogger
from lightning_lossagg.callbacks._trajectory import Trajectory
from lightning_lossagg.callbacks._wandb_extras import log_end_of_fit, task_setup
from lightning_lossagg.callbacks.gradient_weighting import GradientWeighting
from lightning_lossagg.demos import PenguinsDataModule, PenguinsNet
from tests.wandb_records import read_offline_run

TASKS = ("species", "sex", "body_mass")
PAIRS = [f"{a}~{b}" for a, b in itertools.combinations(TASKS, 2)]
CONDITIONS = ("dominance", "rising_loss", "weight_collapse", "weight_explosion", "nonfinite_loss")
# Keys W&B or Lightning add to every row, and the W&B-only extras.
BOOKKEEPING = {"_step", "_runtime", "_timestamp", "trainer/global_step", "epoch", "step"}


class InverseGradientNorm(GradientWeighting):
    """w_k = 1 / ||g_k||: a gradient-based method whose weights move every step."""

    def weights_from_gramian(self, gramian):
        return gramian.diagonal().rsqrt()


def _fit_and_test(logger, root: Path) -> L.Trainer:
    torch.manual_seed(0)
    trainer = L.Trainer(
        max_epochs=2,
        log_every_n_steps=2,
        logger=logger,
        default_root_dir=root,
        callbacks=[LossLogger(), InverseGradientNorm(rep_grad=True), LossBalanceMonitor(window=4)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model, data = PenguinsNet(weights={"body_mass": 2.0}), PenguinsDataModule(batch_size=64)
    trainer.fit(model, data)
    trainer.test(model, data)
    return trainer


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("wandb")
    logger = WandbLogger(save_dir=str(root), project="lossagg-tests", offline=True)
    trainer = _fit_and_test(logger, root)
    logger.experiment.finish()
    return SimpleNamespace(run=read_offline_run(root, wait_for_exit_s=30), trainer=trainer)


@pytest.fixture(scope="module")
def csv_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("csv")
    trainer = _fit_and_test(CSVLogger(root), root)
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    return SimpleNamespace(rows=rows, trainer=trainer)


def _scalar_keys(keys) -> set[str]:
    return {key for key in keys if key not in BOOKKEEPING and not key.startswith("lossagg/")}


def test_every_key_is_in_the_history_for_every_task(wandb_run):
    keys = wandb_run.run.history_keys
    expected = {f"{prefix}/loss" for prefix in ("train", "train_epoch", "val", "test")}
    for task in TASKS:
        for prefix in ("train", "train_epoch", "val", "test"):
            expected |= {
                f"{prefix}/{fig}/{task}" for fig in ("loss", "weight", "weighted", "share")
            }
        expected.add(f"train/grad_norm/{task}")
        expected |= {f"train/monitor/{condition}/{task}" for condition in CONDITIONS}
    expected |= {f"train/grad_cos/{pair}" for pair in PAIRS}
    assert expected <= keys, sorted(expected - keys)


def test_gradient_diagnostics_are_consistent_with_the_weights(wandb_run):
    # The method's weight is static * 1/||g_k||, so the logged norm and weight must agree.
    static = {"species": 1.0, "sex": 1.0, "body_mass": 2.0}
    rows = wandb_run.run.rows_with("train/grad_norm/sex")
    assert len(rows) == wandb_run.trainer.global_step // 2
    for row in rows:
        for task in TASKS:
            norm, weight = row[f"train/grad_norm/{task}"], row[f"train/weight/{task}"]
            assert weight == pytest.approx(static[task] / norm, rel=1e-4)
        for pair in PAIRS:
            assert -1.0 <= row[f"train/grad_cos/{pair}"] <= 1.0


def test_the_run_config_holds_the_task_setup(wandb_run):
    setup = wandb_run.run.config["lossagg"]
    assert setup["tasks"] == {
        "species": {"loss": "cross_entropy", "weight": 1.0, "reduction": "mean"},
        "sex": {"loss": "bce_with_logits", "weight": 1.0, "reduction": "mean"},
        "body_mass": {"loss": "mse", "weight": 2.0, "reduction": "mean"},
    }
    assert setup["rank_weighting"] == "samples"
    assert setup["weighting"] == {
        "method": "InverseGradientNorm",
        "arguments": {"rep_grad": True, "sync": "gradients"},
    }


def test_summaries_are_defined_against_the_trainer_step(wandb_run):
    metrics = wandb_run.run.defined_metrics
    for prefix in ("train", "train_epoch", "val", "test"):
        assert metrics[f"{prefix}/loss"].summary.min
        assert metrics[f"{prefix}/static_loss"].summary.min  # what checkpoints should monitor
        for task in TASKS:
            figures = (("loss", "min"), ("weighted", "min"), ("weight", "last"), ("share", "last"))
            for figure, summary in figures:
                metric = metrics[f"{prefix}/{figure}/{task}"]
                assert getattr(metric.summary, summary), (prefix, figure, task)
                assert metric.step_metric == "trainer/global_step"
            assert not metrics[f"{prefix}/loss/{task}"].summary.last


def test_the_weights_chart_holds_every_logged_weight(wandb_run):
    run = wandb_run.run
    assert "_wandb/visualize/lossagg/weights" in run.config
    table = run.table("lossagg/weights_table")
    lines = {}
    for step, task, weight in table["data"]:
        lines.setdefault(task, {})[step] = weight
    assert set(lines) == set(TASKS)
    logged = run.rows_with("train/weight/sex")
    for task in TASKS:
        for row in logged:
            assert lines[task][row["trainer/global_step"]] == pytest.approx(
                row[f"train/weight/{task}"], rel=1e-5
            )
    # The first step is kept too (log_every_n_steps=2 logs steps 1, 3, ...).
    assert 0 in lines["sex"] and len(lines["sex"]) == len(logged) + 1


def test_the_end_table_has_first_best_last_loss_and_final_weight(wandb_run):
    run = wandb_run.run
    table = run.table("lossagg/task_summary")
    assert table["columns"] == ["task", "first_loss", "best_loss", "last_loss", "final_weight"]
    rows = {row[0]: row[1:] for row in table["data"]}
    assert set(rows) == set(TASKS)
    last_logged = run.rows_with("train/loss/sex")[-1]
    for task in TASKS:
        first, best, last, final_weight = rows[task]
        assert best <= min(first, last)
        assert last == pytest.approx(last_logged[f"train/loss/{task}"], rel=1e-5)
        assert final_weight == pytest.approx(last_logged[f"train/weight/{task}"], rel=1e-5)


def test_the_trajectory_plot_is_in_the_run_folder_and_the_run(wandb_run):
    run = wandb_run.run
    assert (run.files_dir / "loss_trajectories.png").stat().st_size > 0
    image = run.rows_with("lossagg/trajectories/_type")[-1]
    assert image["lossagg/trajectories/_type"] == "image-file"
    assert (run.files_dir / image["lossagg/trajectories/path"]).exists()


def test_csv_gets_the_same_scalars_and_no_extras(wandb_run, csv_run):
    csv_keys = _scalar_keys(csv_run.rows[0])
    assert csv_keys == _scalar_keys(wandb_run.run.history_keys)
    # The PNG is written with any logger; the W&B chart and table are not.
    log_dir = Path(csv_run.trainer.logger.log_dir)
    assert (log_dir / "loss_trajectories.png").exists()
    assert not any("lossagg" in key for key in csv_run.rows[0])


def test_csv_and_wandb_log_the_same_values(wandb_run, csv_run):
    csv_rows = [row for row in csv_run.rows if row["train/loss/sex"]]
    wandb_rows = wandb_run.run.rows_with("train/loss/sex")
    assert [int(row["step"]) for row in csv_rows] == [
        row["trainer/global_step"] for row in wandb_rows
    ]
    for csv_row, wandb_row in zip(csv_rows, wandb_rows, strict=True):
        for task in TASKS:
            key = f"train/loss/{task}"
            assert float(csv_row[key]) == pytest.approx(wandb_row[key], rel=1e-5)


def test_a_nonfinite_weight_is_a_gap_in_the_weights_chart():
    weights = torch.tensor([[1.0, 0.5], [math.nan, 2.0], [math.inf, 3.0]])
    trajectory = Trajectory()
    for step, row in enumerate(weights):
        trajectory.add(step, LossRecord("train", ("a", "b"), torch.ones(2), row, torch.ones(2)))
    trajectory.flush()
    logged = []
    logger = SimpleNamespace(log_metrics=lambda metrics, step: logged.append((metrics, step)))
    log_end_of_fit(logger, 3, trajectory, ("a", "b"), image=None)
    [(metrics, step)] = logged
    rows = metrics["lossagg/weights"].table.data  # (step, task, weight) of a real wandb chart
    charted = [[value for _, key, value in rows if key == task] for task in ("a", "b")]
    expected = [[w if math.isfinite(w) else None for w in task] for task in weights.T.tolist()]
    assert step == 3 and charted == expected


def test_a_task_without_a_valid_sample_is_a_gap_in_the_weights_chart_and_plot():
    """Its record's weight is 0 there (nothing of it in the objective); the per-step keys log no
    point for it, and neither do the chart and the plot: a drop to 0 never happened."""
    trajectory = Trajectory()
    for step, counts in enumerate(([3.0, 2.0], [0.0, 2.0], [3.0, 2.0])):
        weights = torch.tensor([0.0 if counts[0] == 0 else 1.5, 0.5])
        record = LossRecord("train", ("a", "b"), torch.ones(2), weights, torch.tensor(counts))
        trajectory.add(step, record)
    trajectory.flush()
    _, plotted = trajectory.values()
    assert plotted[:, 0].tolist()[::2] == [1.5, 1.5] and math.isnan(plotted[1, 0])
    logged = []
    logger = SimpleNamespace(log_metrics=lambda metrics, step: logged.append(metrics))
    log_end_of_fit(logger, 3, trajectory, ("a", "b"), image=None)
    rows = logged[0]["lossagg/weights"].table.data
    assert [value for _, task, value in rows if task == "a"] == [1.5, None, 1.5]
    assert trajectory.summary_rows(("a", "b"))[0][-1] == 1.5


def test_the_task_setup_holds_each_tasks_loss_weight_and_reduction():
    tasks = {"price": Task("mse", weight=0.5, reduction="sum"), "kind": Task("cross_entropy")}
    model = SimpleNamespace(tasks=tasks, rank_weighting="samples")
    setup = task_setup(SimpleNamespace(callbacks=[]), model)
    assert setup["tasks"] == {
        "price": {"loss": "mse", "weight": 0.5, "reduction": "sum"},
        "kind": {"loss": "cross_entropy", "weight": 1.0, "reduction": "mean"},
    }
    assert setup["weighting"] == {"method": None, "arguments": {}}


class DottedTaskNames(MultiTaskMixin, L.LightningModule):
    """Tasks named with a dot, which W&B reads as a nested key where a metric is defined."""

    def __init__(self) -> None:
        super().__init__(tasks={"sold.flag": Task("mse"), "price": Task("mse")})
        self.layer = torch.nn.Linear(3, 2)

    def forward(self, inputs):
        outputs = self.layer(inputs)
        return {"sold.flag": outputs[:, 0], "price": outputs[:, 1]}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("prefix", ["", "run1"])
def test_a_task_named_with_a_dot_gets_its_summaries_under_the_loggers_prefix(tmp_path, prefix):
    generator = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randn(8, 3, generator=generator),
            {"sold.flag": torch.ones(8), "price": torch.ones(8)},
        )
        for _ in range(4)
    ]
    logger = WandbLogger(
        save_dir=str(tmp_path), project="lossagg-tests", offline=True, prefix=prefix
    )
    trainer = L.Trainer(
        max_epochs=1,
        log_every_n_steps=1,
        logger=logger,
        callbacks=[LossLogger(plot=False)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(DottedTaskNames(), torch.utils.data.DataLoader(batches, batch_size=None))
    logger.experiment.finish()
    run = read_offline_run(tmp_path, wait_for_exit_s=30)
    logged_as = f"{prefix}-" if prefix else ""  # WandbLogger joins its prefix with "-"
    for task in ("sold.flag", "price"):
        key = f"{logged_as}train/loss/{task}"
        losses = [row[key] for row in run.rows_with(key)]
        assert losses and run.summary[key] == {"min": min(losses)}, task
        assert set(run.summary[f"{logged_as}train/weight/{task}"]) == {"last"}, task
