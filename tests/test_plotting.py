"""The trajectory figure: its data and scales, the PNG a fit writes, life without matplotlib."""

import csv
import sys
import warnings
from pathlib import Path

import lightning as L
import matplotlib.image
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_lossagg import plotting
from lightning_lossagg.callbacks import LossLogger
from lightning_lossagg.plotting import trajectory_figure
from tests.models import ThreeTaskNet, make_batch

TASKS = ("price", "kind", "sold")


def _lines(axes) -> dict[str, list[float]]:
    return {line.get_label(): list(line.get_ydata()) for line in axes.get_lines()}


def test_one_line_per_task_with_the_given_values():
    steps = [0, 5, 10]
    losses = torch.tensor([[3.0, 2.0, 1.0], [2.0, 1.5, 0.5], [1.0, 1.0, 0.25]])
    weights = torch.tensor([[1.0, 1.0, 1.0], [1.5, 1.0, 0.5], [2.0, 1.0, 0.25]])
    figure = trajectory_figure(steps, losses, weights, TASKS)
    loss_axes, weight_axes = figure.axes
    for axes, values in ((loss_axes, losses), (weight_axes, weights)):
        lines = _lines(axes)
        assert list(lines) == list(TASKS)
        for index, task in enumerate(TASKS):
            assert lines[task] == values[:, index].tolist()
        assert [list(line.get_xdata()) for line in axes.get_lines()] == [steps] * 3
    assert loss_axes.get_yscale() == "log"
    assert weight_axes.get_yscale() == "linear"


def test_non_positive_losses_get_a_symlog_scale_and_bad_shapes_are_refused():
    losses = torch.tensor([[-1.0], [0.5]])
    figure = trajectory_figure([0, 1], losses, torch.ones(2, 1), ["custom"])
    assert figure.axes[0].get_yscale() == "symlog"
    with pytest.raises(ValueError, match=r"`weights` must have shape \(steps, tasks\) = \(2, 1\)"):
        trajectory_figure([0, 1], losses, torch.ones(3, 1), ["custom"])


def _fit(root: Path, callbacks, **settings) -> L.Trainer:
    """Two epochs of 5 batches, logged every 2 steps unless ``settings`` say otherwise."""
    batches = [make_batch(6, seed=seed, dtype=torch.float32) for seed in range(5)]
    trainer = L.Trainer(
        **{"max_epochs": 2, "log_every_n_steps": 2, **settings},
        logger=CSVLogger(root),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(ThreeTaskNet(), train_dataloaders=torch.utils.data.DataLoader(batches, None))
    return trainer


@pytest.fixture
def figures(monkeypatch) -> list:
    """The figures a fit's LossLogger draws, kept as it draws them."""
    drawn = []

    def keep(*args, **kwargs):
        drawn.append(trajectory_figure(*args, **kwargs))
        return drawn[-1]

    monkeypatch.setattr(plotting, "trajectory_figure", keep)
    return drawn


def test_a_fit_writes_the_png_of_what_it_logged(tmp_path, figures):
    trainer = _fit(tmp_path, [LossLogger()])
    log_dir = Path(trainer.logger.log_dir)
    height, width, _ = matplotlib.image.imread(log_dir / "loss_trajectories.png").shape
    assert (height, width) == (600, 800)

    with open(log_dir / "metrics.csv") as handle:
        logged = [row for row in csv.DictReader(handle) if row["train/loss/price"]]
    (figure,) = figures
    losses, weights = _lines(figure.axes[0]), _lines(figure.axes[1])
    assert list(losses) == list(TASKS) and list(weights) == list(TASKS)
    for task in TASKS:
        # The first step, then every logged step.
        assert losses[task][1:] == pytest.approx([float(r[f"train/loss/{task}"]) for r in logged])
        assert weights[task][1:] == pytest.approx(
            [float(r[f"train/weight/{task}"]) for r in logged]
        )
    steps = list(figure.axes[0].get_lines()[0].get_xdata())
    assert steps == [0] + [int(row["step"]) for row in logged]


def test_without_matplotlib_a_fit_warns_and_finishes(tmp_path, monkeypatch):
    for name in [name for name in sys.modules if name.split(".")[0] == "matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.warns(
        UserWarning, match=r"matplotlib is not installed.*pip install -e \"\.\[plot\]\""
    ):
        trainer = _fit(tmp_path, [LossLogger()])
    assert trainer.state.finished
    assert not (Path(trainer.logger.log_dir) / "loss_trajectories.png").exists()


def test_plot_false_writes_no_png(tmp_path):
    trainer = _fit(tmp_path, [LossLogger(plot=False)])
    assert not (Path(trainer.logger.log_dir) / "loss_trajectories.png").exists()


def test_a_zero_loss_gets_a_symlog_axis_and_the_losses_a_legend(tmp_path):
    ones = torch.ones(2, 2)
    figure = trajectory_figure([0, 1], torch.tensor([[0.0, 1.0], [0.5, 2.0]]), ones, ["a", "b"])
    assert figure.axes[0].get_yscale() == "symlog"  # a log axis would hide the 0
    legend = figure.axes[0].get_legend()
    assert legend is not None and [t.get_text() for t in legend.get_texts()] == ["a", "b"]
    path = plotting.save_figure(figure, tmp_path / "new" / "dir" / "plot.png")
    assert path.is_file()


def test_a_fit_that_logged_one_step_warns_how_to_log_more_and_plots_dots(tmp_path, figures):
    # 3 steps at Lightning's default log_every_n_steps=50: only the first step's point.
    with pytest.warns(UserWarning, match=r"log_every_n_steps=50th of its 3 optimizer steps"):
        _fit(tmp_path, [LossLogger()], max_steps=3, log_every_n_steps=50)
    (figure,) = figures
    assert [len(line.get_xdata()) for line in figure.axes[0].get_lines()] == [1, 1, 1]
    assert {line.get_marker() for axes in figure.axes for line in axes.get_lines()} == {"o"}


def test_a_fit_that_logged_several_steps_does_not_warn_of_its_plot(tmp_path):
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="LossLogger's plot")
        _fit(tmp_path, [LossLogger()])
