"""Under float16 mixed precision the per-task gradients a method takes before the backward are
loss-scaled as the backward's are: a task whose gradients are small (a small loss, a large batch)
keeps them, instead of flushing to zero in float16, and the method sees its figures as in float32.

The real ``GradScaler`` on the CPU (Lightning's ``MixedPrecision("16-mixed", "cpu")`` plugin)."""

import inspect
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader

from lightning_lossagg import MaskedLoss, MultiTaskMixin, Task
from lightning_lossagg.callbacks import DBMTL, MGDA, GradNorm, NashMTL
from lightning_lossagg.callbacks.gradient_weighting import GradientWeighting
from tests.callbacks._fits import trainer
from tests.models import ThreeTaskNet, make_batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = 1e-6  # the price loss's factor: its gradients, ~1e-7 here, are below float16's normals


class SmallPriceNet(ThreeTaskNet):
    def per_sample_losses(self, predictions, targets):
        losses = super().per_sample_losses(predictions, targets)
        price = losses["price"]
        return {**losses, "price": MaskedLoss(price.values * SMALL, price.mask)}


class WholeSmallPriceNet(SmallPriceNet):
    """No forward_shared / forward_heads: the methods take parameter gradients before backward."""

    forward_shared = forward_heads = None

    def forward(self, inputs):
        return ThreeTaskNet.forward_heads(self, ThreeTaskNet.forward_shared(self, inputs))


class SmallPriceHeadNet(ThreeTaskNet):
    """The registry's losses (the per-task gradients of one backward pass through the heads'
    views), the price head's output scaled down: its gradients are as small."""

    def forward_heads(self, shared):
        predictions = super().forward_heads(shared)
        return {**predictions, "price": predictions["price"] * (SMALL / 10)}


class GradNormsAtFirstStep(L.Callback):
    def __init__(self, method: L.Callback) -> None:
        self.method, self.grad_norms = method, None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.grad_norms is None:
            self.grad_norms = self.method.state_to_log()["grad_norm"].double()


# Each takes its per-task gradients before the backward Lightning runs.
METHODS = {
    "MGDA, parameter gradients, whole forward": (MGDA, WholeSmallPriceNet),
    "Nash-MTL updated every 2 steps": (lambda: NashMTL(update_weights_every=2), SmallPriceNet),
    "Nash-MTL every 2 steps, one pass": (
        lambda: NashMTL(update_weights_every=2),
        SmallPriceHeadNet,
    ),
    "Nash-MTL at the representation": (
        lambda: NashMTL(rep_grad=True, update_weights_every=2),
        SmallPriceNet,
    ),
    "DB-MTL": (DBMTL, SmallPriceNet),
    "GradNorm": (lambda: GradNorm(layer="all"), SmallPriceNet),
}


def _fit(
    float16: bool, method: L.Callback, model_class: type, num_batches: int, *callbacks
) -> None:
    """A fit of the seeded model on 64-sample batches, in float32 or float16 mixed precision."""
    torch.manual_seed(0)
    model = model_class()
    batches = [make_batch(64, seed=seed, dtype=torch.float32) for seed in range(num_batches)]
    options = {"precision": "32-true"}
    if float16:
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
        options = {"precision": None, "plugins": [MixedPrecision("16-mixed", "cpu", scaler)]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        trainer([method, *callbacks], max_epochs=1, **options).fit(
            model, DataLoader(batches, batch_size=None)
        )


def _grad_norms(name: str, float16: bool) -> torch.Tensor:
    make_method, model_class = METHODS[name]
    method = make_method()
    recorder = GradNormsAtFirstStep(method)
    _fit(float16, method, model_class, 1, recorder)
    return recorder.grad_norms


@pytest.mark.parametrize("name", list(METHODS))
def test_small_task_gradients_are_seen_in_float16_as_in_float32(name):
    in_float32 = _grad_norms(name, float16=False)
    assert in_float32[0] < 1e-6 < in_float32[1:].min()  # price's gradients are that small
    torch.testing.assert_close(_grad_norms(name, float16=True), in_float32, rtol=2e-2, atol=0)


class GradientsBeforeStep(L.Callback):
    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        named = pl_module.named_parameters()
        self.steps.append({n: p.grad.double().clone() for n, p in named if p.grad is not None})


# The gradients the parameters end up with, unscaled by the GradScaler before the optimizer step,
# where a surrogate hands them over: the heads' from the per-task passes of the whole forward,
# and the trunk's on a Nash-MTL step that reuses its weights (the weighted sum's representation
# gradient). Reference: the same fit in float32.
SURROGATES = {
    "MGDA, whole forward": (MGDA, WholeSmallPriceNet),
    "Nash-MTL at the representation, reusing at step 1": (
        lambda: NashMTL(rep_grad=True, update_weights_every=2, max_norm=0.0),
        SmallPriceNet,
    ),
}


@pytest.mark.parametrize("name", list(SURROGATES))
def test_the_gradients_handed_over_in_float16_are_those_of_float32(name):
    make_method, model_class = SURROGATES[name]
    in_float32, in_float16 = GradientsBeforeStep(), GradientsBeforeStep()
    _fit(False, make_method(), model_class, 2, in_float32)
    _fit(True, make_method(), model_class, 2, in_float16)
    assert len(in_float32.steps) == len(in_float16.steps) == 2
    for step, (expected, actual) in enumerate(zip(in_float32.steps, in_float16.steps, strict=True)):
        assert set(actual) == set(expected)
        for key, reference in expected.items():
            error = (actual[key] - reference).norm()
            assert error <= 0.05 * reference.norm() + 1e-8, f"step {step} {key}: {error}"


class ConflictingTasks(MultiTaskMixin, L.LightningModule):
    """Two tasks whose heads read the trunk with opposite signs, on inputs ~100: each task's
    gradient is far larger than their sum's, so each one alone overflows float16 at a loss
    scale at which the backward of the weighted sum does not."""

    def __init__(self) -> None:
        super().__init__(tasks={"a": Task("mse"), "b": Task("mse")})
        self.trunk = nn.Sequential(nn.Linear(5, 8), nn.Tanh())
        self.heads = nn.ModuleDict({"a": nn.Linear(8, 1), "b": nn.Linear(8, 1)})
        with torch.no_grad():
            self.trunk[0].weight.mul_(0.002)
            self.heads["b"].weight.copy_(-self.heads["a"].weight)

    def forward(self, inputs):
        shared = self.trunk(inputs)
        return {name: head(shared).squeeze(-1) for name, head in self.heads.items()}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-5)


class NormsOfStepsTaken(L.Callback):
    def __init__(self, method: L.Callback) -> None:
        self.method, self.norms, self.taken = method, [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.norms.append(self.method.state_to_log()["grad_norm"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.taken.append(pl_module.optimizer_step_taken)


def test_gradnorm_takes_no_step_whose_per_task_gradients_overflowed():
    # GradNorm uses its per-task gradients for their norms only: a step whose norms overflowed
    # (and which the backward alone would not make the scaler skip) is skipped with them, and
    # the scaler lowers its scale, instead of a step taken with tasks left out of w's update.
    method = GradNorm(lr=0.1, layer="all")
    recorder = NormsOfStepsTaken(method)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    targets = {"a": torch.full((6,), 100.0), "b": torch.full((6,), 100.0)}
    batches = [(100 * torch.randn(6, 5, generator=generator), targets) for _ in range(10)]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**6)
    plugin = MixedPrecision("16-mixed", "cpu", scaler)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        trainer([method, recorder], max_epochs=1, precision=None, plugins=[plugin]).fit(
            ConflictingTasks(), DataLoader(batches, batch_size=None)
        )
    steps = zip(recorder.norms, recorder.taken, strict=True)
    taken = [norms for norms, was_taken in steps if was_taken]
    assert taken and len(taken) < len(recorder.norms)
    assert all(bool(norms.isfinite().all()) for norms in taken), taken
    assert not torch.equal(method.state_dict()["weights"]["values"], torch.ones(2))


@pytest.mark.parametrize("rep_grad", [False, True])
def test_the_gradients_after_the_one_pass_in_float16_are_those_of_float32(rep_grad, monkeypatch):
    # The registry's losses and Nash-MTL, which weighs the heads too: ONE pass of the summed
    # terms to per-head leaves before backward, taken times the loss scale in float16; the
    # heads' gradients from it are handed over, the trunk's follow.
    passes = []
    original = GradientWeighting._gradients_in_one_pass

    def counted(self, *args, **kwargs):
        scale = inspect.signature(original).bind(self, *args, **kwargs).arguments["scale"]
        passes.append(scale is not None)  # taken times a loss scale
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GradientWeighting, "_gradients_in_one_pass", counted)

    def method():
        return NashMTL(update_weights_every=2, max_norm=0.0, rep_grad=rep_grad)

    in_float32, in_float16 = GradientsBeforeStep(), GradientsBeforeStep()
    _fit(False, method(), SmallPriceHeadNet, 1, in_float32)
    _fit(True, method(), SmallPriceHeadNet, 1, in_float16)
    assert passes == [False, True]
    # One step: the next reuses weights of ~1 / |g_price| ~ 1e7, whose weighted sum rightly
    # overflows float16 (the scaler skips it).
    (expected,), (actual,) = in_float32.steps, in_float16.steps
    assert set(actual) == set(expected)
    for key, reference in expected.items():
        error = (actual[key] - reference).norm()
        assert error <= 0.05 * reference.norm() + 1e-8, f"{key}: {error}"
