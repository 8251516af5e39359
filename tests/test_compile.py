"""``torch.compile``: a compiled model trains as the eager one, with static weights and with
weighting methods of both families.

``trainer.fit(torch.compile(model))`` has Lightning compile the module's ``forward`` and its step
methods; the mixin's steps (masking, the exact reduction, the weighting's hooks and host solves)
run eagerly around the compiled ``forward``, so they leave no graph break. Gradient-based methods
call ``forward_shared`` and ``forward_heads`` themselves: with ``rep_grad=True`` the mixin
compiles ``forward_shared`` as ``forward`` is; parameter gradients take one backward per task
through the trunk, which a compiled graph may refuse, so it runs eagerly there unless the model
compiles its trunk's module itself (``self.trunk = torch.compile(self.trunk)``).

Dynamo's tracing and AOTAutograd's compiled forward and backward are real; most graphs run on
the ``aot_eager`` backend instead of inductor, whose C++ code generation takes seconds per graph
on this machine (the graphs, and so the mixin's part, are the same)."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch
import torch._dynamo
from torch._dynamo.backends.registry import lookup_backend
from torch._dynamo.utils import counters
from torch.utils.data import DataLoader

from lightning_lossagg.callbacks import FAMO, MGDA, GradNorm, UncertaintyWeighting, UPGrad
from lightning_lossagg.callbacks.gradient_weighting import retained_grad
from lightning_lossagg.demos import MultiTaskMLP
from lightning_lossagg.demos.penguins import TaskDataset
from lightning_lossagg.demos.synthetic import make_regression_tasks
from tests.callbacks._fits import loader, trainer
from tests.models import ThreeTaskNet, make_batch

METHODS = {
    "static weights": lambda: [],
    "UncertaintyWeighting": lambda: [UncertaintyWeighting()],
    "FAMO": lambda: [FAMO()],
    "MGDA(rep_grad=True)": lambda: [MGDA(rep_grad=True)],
    "MGDA": lambda: [MGDA()],
    "UPGrad": lambda: [UPGrad()],
    "GradNorm": lambda: [GradNorm()],
}


class CapturedGraphs:
    """A ``torch.compile`` backend: keeps each graph Dynamo captured and runs it with
    ``aot_eager`` (AOTAutograd's forward and backward graphs, run by eager kernels)."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []
        self._aot_eager = lookup_backend("aot_eager")

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs.append(graph)
        return self._aot_eager(graph, example_inputs)


def _batches() -> list:
    return [make_batch(12, seed=index, dtype=torch.float32) for index in range(4)]


def _fit(method: str, compile_what: str | None) -> tuple[list[torch.Tensor], CapturedGraphs]:
    torch.manual_seed(0)
    model = ThreeTaskNet()
    backend = CapturedGraphs()
    torch._dynamo.reset()
    counters.clear()
    fitted = model
    if compile_what == "model":
        fitted = torch.compile(model, backend=backend)
    elif compile_what == "trunk":
        model.trunk = torch.compile(model.trunk, backend=backend)  # type: ignore[assignment]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        trainer(METHODS[method](), max_epochs=2, precision="32-true").fit(
            fitted, loader(_batches()), loader(_batches()[:2])
        )
    return [parameter.detach().clone() for parameter in model.parameters()], backend


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("compile_what", ["model", "trunk"])
def test_a_compiled_model_trains_as_the_eager_one(method, compile_what):
    eager, _ = _fit(method, None)
    compiled, backend = _fit(method, compile_what)
    assert backend.graphs, "nothing was compiled"
    # Dynamo's only breaks: it skips the mixin's steps, as they ask.
    breaks = [reason for reason in counters["graph_break"] if not _skips_the_mixins_step(reason)]
    assert not breaks, breaks
    for index, (actual, expected) in enumerate(zip(compiled, eager, strict=True)):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=f"param {index}")


def _skips_the_mixins_step(reason: str) -> bool:
    return "torch.compiler.disable()" in reason and "MultiTaskMixin." in reason


def _inductor_fit(compile_trunk: bool) -> list[torch.Tensor]:
    """GradNorm on the demo MLP, its trunk compiled by inductor or eager."""
    torch.manual_seed(0)
    model = MultiTaskMLP(num_tasks=2)
    torch._dynamo.reset()
    if compile_trunk:
        model.trunk = torch.compile(model.trunk)  # type: ignore[assignment]
    inputs, targets = make_regression_tasks(512, 2)
    batches = DataLoader(TaskDataset(inputs, targets), batch_size=256)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        trainer([GradNorm()], max_epochs=1, precision="32-true").fit(model, batches)
    return [parameter.detach().clone() for parameter in model.parameters()]


def test_a_second_backward_through_a_graph_inductor_compiled_for_one_says_what_to_do(
    monkeypatch,
):
    # Whether inductor's backward donates its buffers depends on its choices (one thread or two,
    # what its cache holds): torch's error is raised here as torch raises it, a stand-in.
    def donated(*args, **kwargs):
        raise RuntimeError(
            "This backward function was compiled with non-empty donated buffers which requires "
            "create_graph=False and retain_graph=False."
        )

    monkeypatch.setattr(torch.autograd, "grad", donated)
    leaf = torch.ones(2, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"Compile the shared trunk's module rather") as error:
        retained_grad(leaf.sum(), [leaf], None)
    assert "donated buffers" in str(error.value.__cause__)
    monkeypatch.undo()
    assert retained_grad(leaf.sum(), [leaf], None)[0].tolist() == [1.0, 1.0]


@pytest.mark.skipif(
    not any(shutil.which(compiler) for compiler in ("g++", "c++", "clang++")),
    reason="inductor compiles C++ on the CPU: this machine has no C++ compiler",
)
def test_gradnorm_trains_with_a_trunk_compiled_by_inductor_as_the_eager_model():
    eager, compiled = _inductor_fit(compile_trunk=False), _inductor_fit(compile_trunk=True)
    for index, (actual, expected) in enumerate(zip(compiled, eager, strict=True)):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=f"param {index}")
