"""Every weighting method under bf16 mixed precision and gradient accumulation (issue 6), and
with a task the mixin drops."""

import inspect
import pickle
import warnings

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.tuner import Tuner

from lightning_lossagg import callbacks
from lightning_lossagg.callbacks.gradient_weighting import GradientWeighting
from lightning_lossagg.demos import PenguinsDataModule, PenguinsNet
from tests.callbacks._fits import assert_nested_equal
from tests.models import ThreeTaskNet, make_batch, quiet_trainer

METHODS = {
    "UncertaintyWeighting": lambda: callbacks.UncertaintyWeighting(),
    "DWA": lambda: callbacks.DWA(window_steps=2),
    "LossScaling": lambda: callbacks.LossScaling(),
    "RLW": lambda: callbacks.RLW(),
    "GLS": lambda: callbacks.GLS(),
    "IMTLL": lambda: callbacks.IMTLL(),
    "FAMO": lambda: callbacks.FAMO(),
    "GradNorm": lambda: callbacks.GradNorm(),
    "MGDA": lambda: callbacks.MGDA(),
    "MGDA-rep": lambda: callbacks.MGDA(rep_grad=True),
    "PCGrad": lambda: callbacks.PCGrad(),
    "CAGrad": lambda: callbacks.CAGrad(),
    "IMTLG": lambda: callbacks.IMTLG(),
    "NashMTL": lambda: callbacks.NashMTL(),
    "AlignedMTL": lambda: callbacks.AlignedMTL(),
    "UPGrad": lambda: callbacks.UPGrad(),
    "GradVac": lambda: callbacks.GradVac(),
    "DBMTL": lambda: callbacks.DBMTL(),
}


GRADIENT_METHODS = [name for name, make in METHODS.items() if isinstance(make(), GradientWeighting)]


class WeightsSeen(L.Callback):
    def __init__(self) -> None:
        self.weights: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights.append(pl_module.loss_record.weights.detach().clone())


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_trains_with_bf16_mixed_and_four_accumulated_batches(name):
    seen = WeightsSeen()
    model = PenguinsNet()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = L.Trainer(
        max_steps=2,
        accumulate_grad_batches=4,
        precision="bf16-mixed",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[METHODS[name](), seen],
    )
    trainer.fit(model, PenguinsDataModule(batch_size=16))
    assert trainer.global_step == 2 and len(seen.weights) == 8  # 2 steps x 4 micro-batches
    for weights in seen.weights:
        assert weights.dtype == torch.float32, "weights are computed in float32 under bf16"
        assert torch.isfinite(weights).all() and (weights >= 0).all()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert changed, "the optimizer steps changed no parameter"


class HalfPrecisionStepNet(ThreeTaskNet):
    """Its steps run under float16 autocast, as a user's own mixed precision would, all but its
    forward: the losses and gradients are those of float32, and only the weighting may differ."""

    def training_step(self, batch, batch_idx):
        with torch.autocast("cpu", dtype=torch.float16):
            return super().training_step(batch, batch_idx)

    def forward_shared(self, inputs):
        with torch.autocast("cpu", enabled=False):
            return super().forward_shared(inputs)

    def forward_heads(self, shared):
        with torch.autocast("cpu", enabled=False):
            return super().forward_heads(shared)


@pytest.mark.parametrize("name", sorted(GRADIENT_METHODS))
def test_gradient_methods_weigh_in_float32_under_float16_autocast(name):
    # Large prices: the Gramian's entries pass float16's largest value (65504). Computed in
    # float16 they were infinite, and the step silently fell back to equal weights.
    batches = [make_batch(16, seed=seed, dtype=torch.float32) for seed in range(2)]
    for _, targets in batches:
        targets["price"] *= 1000.0
    fits = {}
    for net in (HalfPrecisionStepNet, ThreeTaskNet):
        torch.manual_seed(0)
        model, seen = net(), WeightsSeen()
        trainer = quiet_trainer(1, steps=2, precision="32-true", callbacks=[METHODS[name](), seen])
        trainer.fit(model, torch.utils.data.DataLoader(batches, batch_size=None))
        fits[net] = torch.stack(seen.weights), [p.detach() for p in model.parameters()]
    (weights, parameters), (expected_weights, expected_parameters) = fits.values()
    assert not torch.allclose(expected_weights[-1], torch.ones(3))
    torch.testing.assert_close(weights, expected_weights)
    torch.testing.assert_close(parameters, expected_parameters)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_trains_on_when_the_mixin_drops_a_non_finite_task(name):
    # nonfinite="drop_task": at step 1 the price loss is infinite; the method weighs the other
    # tasks, gives price 0 there, and nothing non-finite reaches the parameters or its state.
    batches = [make_batch(6, seed=seed, dtype=torch.float32) for seed in range(3)]
    batches[1][1]["price"][0] = torch.inf
    model = ThreeTaskNet()
    model.nonfinite = "drop_task"
    seen = WeightsSeen()
    trainer = quiet_trainer(1, steps=3, precision="32-true", callbacks=[METHODS[name](), seen])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "The step was taken without the task(s)"
        trainer.fit(model, torch.utils.data.DataLoader(batches, batch_size=None))
    assert model.skipped_steps == 1 and len(seen.weights) == 3
    assert seen.weights[1][0] == 0 and seen.weights[1][1:].sum() > 0
    for weights in seen.weights:
        assert torch.isfinite(weights).all() and (weights >= 0).all()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for state in trainer.callbacks[0].state_to_log().values():
        assert torch.isfinite(state).all()


def test_static_weights_sum_in_float32_under_float16_autocast():
    # Without a method the weighted sum 2 * price + kind + sold passes float16's largest value:
    # the objective handed to backward (and shown as the step's loss) must stay float32.
    batch = make_batch(16, seed=0, dtype=torch.float32)
    batch[1]["price"] *= 1000.0
    half_precision = HalfPrecisionStepNet()
    full_precision = ThreeTaskNet()
    full_precision.load_state_dict(half_precision.state_dict())
    objective = half_precision.training_step(batch, 0)
    expected = full_precision.training_step(batch, 0)
    assert expected.isfinite() and expected > torch.finfo(torch.float16).max
    torch.testing.assert_close(objective, expected)


def _fit_after_lr_find(name: str, find: bool, tmp_path) -> tuple[dict, dict]:
    """Two epochs of three batches, after Lightning's learning rate finder (its suggestion not
    applied) or not: the model's parameters and the method's state."""
    torch.manual_seed(0)
    model, method = ThreeTaskNet().double(), METHODS[name]()
    batches = torch.utils.data.DataLoader(
        [make_batch(8, seed=seed) for seed in range(3)], batch_size=None
    )
    trainer = quiet_trainer(1, steps=6, callbacks=[method], default_root_dir=tmp_path)
    if find:  # its steps run without the callbacks' hooks; it restores a checkpoint after
        Tuner(trainer).lr_find(model, train_dataloaders=batches, num_training=4, update_attr=False)
    trainer.fit(model, batches)
    return model.state_dict(), method.state_dict()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_the_learning_rate_finder_leaves_no_trace_in_the_fit_after_it(name, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the finder's own
        parameters, state = _fit_after_lr_find(name, False, tmp_path)
        after_parameters, after_state = _fit_after_lr_find(name, True, tmp_path)
    assert_nested_equal(after_parameters, parameters, "parameters")
    assert_nested_equal(after_state, state, "method state")


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_pickles_as_ddp_spawn_sends_it_to_the_ranks(name):
    """ddp_spawn pickles the trainer, its callbacks included (a local lambda cannot be)."""
    method = METHODS[name]()
    assert type(pickle.loads(pickle.dumps(method))) is type(method)


class RankBatchesNet(ThreeTaskNet):
    """Each rank reads two batches of its own (uneven across the ranks)."""

    def train_dataloader(self):
        rank = self.trainer.global_rank
        batches = [make_batch(4 + rank, seed=10 * rank + step) for step in range(2)]
        return torch.utils.data.DataLoader(batches, batch_size=None)


@pytest.mark.ddp
def test_a_loss_based_method_trains_under_ddp_spawn():
    model = RankBatchesNet()
    quiet_trainer(2, steps=2, callbacks=[callbacks.DWA(window_steps=1)]).fit(model)


@pytest.mark.parametrize(
    ("make", "attribute", "value"),
    [
        (
            lambda: callbacks.LossScaling(decay=np.float32(0.5), warmup_steps=np.int64(3)),
            "decay",
            0.5,
        ),
        (lambda: callbacks.FAMO(weight_decay=np.float64(1e-3), eps=np.float32(0.5)), "eps", 0.5),
        (lambda: callbacks.RLW(seed=np.int64(3)), "seed", 3),
        (lambda: callbacks.DWA(window_steps=np.int64(50)), "window_steps", 50),
        (lambda: callbacks.DBMTL(beta=np.float32(0.5)), "beta", 0.5),
        (lambda: callbacks.CAGrad(c=np.float32(0.5)), "c", 0.5),
        (lambda: callbacks.GradNorm(alpha=np.float32(1.5)), "alpha", 1.5),
        (lambda: callbacks.GradVac(beta=np.float32(0.5)), "beta", 0.5),
        (lambda: callbacks.NashMTL(update_weights_every=np.int64(2)), "update_weights_every", 2),
        (lambda: callbacks.UPGrad(norm_eps=np.float32(0.5)), "norm_eps", 0.5),
        (lambda: callbacks.LossBalanceMonitor(window=np.int64(4)), "window", 4),
    ],
    ids=[
        "LossScaling",
        "FAMO",
        "RLW",
        "DWA",
        "DBMTL",
        "CAGrad",
        "GradNorm",
        "GradVac",
        "NashMTL",
        "UPGrad",
        "LossBalanceMonitor",
    ],
)
def test_numeric_arguments_take_numpy_scalars_as_python_numbers(make, attribute, value):
    """From a NumPy sweep or a config read through NumPy; kept as Python numbers (state keys)."""
    stored = getattr(make(), attribute)
    assert stored == value and type(stored) is type(value)


# The defaults the issues and the papers' reference code set: LibMTL's (its GradNorm lr and
# alpha, Nash-MTL's clipping, GradVac's beta, DB-MTL's betas), torchjd's (UPGrad's reg_eps),
# the issues' (DWA's T = 2, FAMO's lr and weight decay, CAGrad's c, UW's and IMTL-L's Adam),
# and the documented EMA decay of dynamic loss scaling.
DOCUMENTED_DEFAULTS = {
    "UncertaintyWeighting": {"lr": 0.01},
    "DWA": {"temperature": 2.0, "window_steps": None},
    "LossScaling": {"mode": "ema", "decay": 0.9, "warmup_steps": 0},
    "IMTLL": {"lr": 0.01},
    "FAMO": {"lr": 0.025, "weight_decay": 1e-3},
    "GradNorm": {"alpha": 1.5, "lr": 0.025, "layer": "last"},
    "MGDA": {"normalization": "none", "rep_grad": False, "sync": "gradients"},
    "CAGrad": {"c": 0.5, "rescale": 1},
    "NashMTL": {"update_weights_every": 1, "max_norm": 1.0},
    "AlignedMTL": {"scale_mode": "min"},
    "UPGrad": {"reg_eps": 1e-4, "norm_eps": 0.0},
    "GradVac": {"beta": 0.5},
    "DBMTL": {"beta": 0.9, "beta_sigma": 0.0},
}


@pytest.mark.parametrize("name", sorted(DOCUMENTED_DEFAULTS))
def test_defaults_are_the_documented_ones(name):
    arguments = getattr(callbacks, name)().method_arguments
    expected = DOCUMENTED_DEFAULTS[name]
    assert {key: arguments[key] for key in expected} == expected


@pytest.mark.parametrize("name", sorted({type(make()).__name__ for make in METHODS.values()}))
def test_the_run_config_and_state_key_carry_every_argument(name):
    # Two instances that differ in any argument must not share a checkpoint's state.
    method = getattr(callbacks, name)
    parameters = set(inspect.signature(method).parameters)
    assert set(method().method_arguments) == parameters


@pytest.mark.parametrize(
    ("function", "defaults"),
    [
        ("dwa", {"temperature": 2.0}),
        ("cagrad", {"c": 0.5, "rescale": 1}),
        ("nash_mtl", {"max_norm": 1.0}),
        ("upgrad", {"reg_eps": 1e-4, "norm_eps": 0.0}),
        ("gradvac", {"beta": 0.5}),
    ],
)
def test_functional_defaults_are_the_callbacks(function, defaults):
    from lightning_lossagg import functional

    parameters = inspect.signature(getattr(functional, function)).parameters
    assert {name: parameters[name].default for name in defaults} == defaults
