"""The loss and weight trajectories of a run as a matplotlib figure (the ``plot`` extra).

matplotlib is optional: it is imported when a figure is made, and a missing install raises an
``ImportError`` that names the extra to install. Figures are drawn on the Agg canvas directly,
without pyplot, so nothing touches global state or needs a display.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MISSING_MATPLOTLIB = (
    "matplotlib is not installed, so the loss and weight trajectory plot is skipped. Install the "
    'plot extra (`pip install -e ".[plot]"` in a clone of the project) to get it.'
)


def trajectory_figure(
    steps: Sequence[int], losses: Tensor, weights: Tensor, names: Sequence[str]
) -> Figure:
    """Each task's loss (top, log scale) and weight (bottom) against the training step.

    Args:
        steps: the training step of each row, length ``T``.
        losses: global task losses, ``[T, K]`` (NaN where a task had no valid sample: a gap).
        weights: effective task weights, ``[T, K]``.
        names: the ``K`` task names, used as line labels.

    Returns:
        A figure with two axes, each holding one line per task, labelled by task name.

    Example:
        >>> figure = trajectory_figure([0, 1], torch.ones(2, 1), torch.ones(2, 1), ["price"])
        >>> [line.get_label() for line in figure.axes[0].get_lines()]
        ['price']
    """
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(MISSING_MATPLOTLIB) from error
    num_steps, num_tasks = len(steps), len(names)
    for label, values in (("losses", losses), ("weights", weights)):
        if tuple(values.shape) != (num_steps, num_tasks):
            raise ValueError(
                f"`{label}` must have shape (steps, tasks) = ({num_steps}, {num_tasks}); got "
                f"{tuple(values.shape)}."
            )
    losses, weights = losses.detach().double().cpu(), weights.detach().double().cpu()
    figure = Figure(figsize=(8, 6), layout="constrained")
    FigureCanvasAgg(figure)
    loss_axes, weight_axes = figure.subplots(2, 1, sharex=True)
    marker = "o" if num_steps == 1 else ""  # one step: a dot, where a line would be nothing
    for index, name in enumerate(names):
        loss_axes.plot(steps, losses[:, index].tolist(), label=name, marker=marker)
        weight_axes.plot(steps, weights[:, index].tolist(), label=name, marker=marker)
    finite = losses[torch.isfinite(losses)]
    # A log scale hides non-positive values, which a custom loss may take: symlog keeps them.
    loss_axes.set_yscale("log" if finite.numel() and bool((finite > 0).all()) else "symlog")
    loss_axes.set_ylabel("task loss")
    loss_axes.set_title("Task losses and weights")
    loss_axes.legend(loc="best")
    weight_axes.set_ylabel("task weight")
    weight_axes.set_xlabel("training step")
    return figure


def save_figure(figure: Figure, path: str | Path) -> Path:
    """Write ``figure`` as a PNG to ``path`` (its folder is created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=100)
    return path
