"""Every Gramian-based weighting method through real fits: a real 2-process run against one
process, gradient accumulation, exact resume (Nash-MTL's state), the YAML configs through the
real CLI, and the checks every method shares."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_lossagg import functional
from lightning_lossagg.callbacks import IMTLG, MGDA, AlignedMTL, CAGrad, GradVac, NashMTL, UPGrad
from tests.callbacks._fits import fit_config
from tests.callbacks._gradient_based import (
    DDP_METHODS,
    METHODS,
    assert_adaptive,
    assert_weights,
    clip_trunk,
    ddp_batches,
    ddp_fit,
    ddp_rank,
    fit,
    reference_run,
    reference_weights,
    training_batches,
)
from tests.callbacks._stateful_gradient import assert_resume_equals_uninterrupted
from tests.models import IN_FEATURES, ThreeTaskNet, make_batch, one_batch_loader, quiet_trainer
from tests.process_group import run_on_lightning_ranks

PENGUIN_TASKS = ("species", "sex", "body_mass")
NAMES = list(METHODS)


def _assert_nested_close(actual, expected, path: str) -> None:
    if isinstance(expected, dict):
        assert set(actual) == set(expected), path
        for key in expected:
            _assert_nested_close(actual[key], expected[key], f"{path}[{key!r}]")
    elif isinstance(expected, torch.Tensor):
        torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-12, msg=path)
    else:
        assert actual == expected, path


@pytest.mark.ddp
def test_two_processes_equal_one_process_on_the_concatenated_batches():
    # One launch of two processes serves every method with parameter gradients (exact sync) and
    # with representation gradients: a launch costs seconds, a DDP fit inside it a fraction.
    rank0, rank1 = ddp_batches()
    assert len(rank0[0][0]) != len(rank1[0][0])  # uneven batches, each rank its own
    cases = [(name, rep_grad) for rep_grad in (False, True) for name in DDP_METHODS]
    ranks = run_on_lightning_ranks(ddp_rank, cases)
    for case in cases:
        single = ddp_fit(*case)
        on_rank0, on_rank1 = ranks[0][case], ranks[1][case]
        assert torch.equal(on_rank0["weights"], on_rank1["weights"]), case
        # The mixin's all-reduce and the gradients' (or the Gramian's), nothing else; Nash-MTL
        # (update_weights_every=2) reduces no gradient at the steps between its solves.
        solves = [
            step % 2 == 0 if case[0] == "nash_mtl" else True
            for step in range(len(single["weights"]))
        ]
        expected = [["all_reduce"] * (2 if solved else 1) for solved in solves]
        for on_rank in (on_rank0, on_rank1):
            assert on_rank["collectives_per_step"] == expected, case
        assert len({tuple(w.tolist()) for w in single["weights"]}) > 1, case
        torch.testing.assert_close(
            on_rank0["weights"], single["weights"], rtol=1e-8, atol=1e-11, msg=str(case)
        )
        for key, value in single["parameters"].items():
            torch.testing.assert_close(
                on_rank1["parameters"][key], value, rtol=1e-8, atol=1e-11, msg=f"{case} {key}"
            )
        _assert_nested_close(on_rank1["state"], single["state"], str(case))


# MGDA "l2" also with parameter gradients: its weights scale as 1 / |g_k|, which shows the
# micro-batches' loss scaling (1 / 2) left in the Gramian; the other methods' do not.
@pytest.mark.parametrize(
    ("name", "rep_grad"),
    [(name, name in ("mgda", "upgrad", "nash_mtl")) for name in NAMES] + [("mgda", False)],
)
def test_accumulating_two_micro_batches_per_optimizer_step(name, rep_grad):
    callback = METHODS[name](rep_grad=rep_grad)
    recorder, _ = fit(callback, training_batches(4), max_epochs=1, accumulate_grad_batches=2)
    steps = recorder.steps
    assert [step["global_step"] for step in steps] == [0, 0, 1, 1]
    assert_adaptive(steps)
    weights, grads = reference_run(
        steps, rep_grad, reference_weights(name, callback), heads_weighted=name == "nash_mtl"
    )
    assert_weights(steps, weights)
    for first in (0, 2):  # one optimizer step: the mean of its micro-batches' updates
        second = first + 1
        assert torch.equal(
            steps[first]["after"]["trunk.0.weight"], steps[second]["before"]["trunk.0.weight"]
        )
        mean = {k: (grads[first][k] + grads[second][k]) / 2 for k in grads[first]}
        if name == "nash_mtl":
            mean = clip_trunk(mean, callback.max_norm)
        for key, grad in mean.items():
            change = steps[second]["after"][key] - steps[first]["before"][key]
            torch.testing.assert_close(change, -0.1 * grad, rtol=1e-7, atol=1e-10, msg=key)


@pytest.mark.parametrize("rep_grad", [False, True])
def test_resuming_nash_mtl_from_a_checkpoint_equals_an_uninterrupted_run(rep_grad, tmp_path):
    # Solved at global steps 0, 3 and 6: the resumed run reuses the solution of step 3 (the
    # saved state) at steps 4 and 5, and warm-starts step 6 from it.
    def method():
        return NashMTL(update_weights_every=3, max_norm=0.5, rep_grad=rep_grad)

    batches = training_batches()
    full_callback = method()
    full, full_model = fit(full_callback, batches, 4)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    first, _ = fit(method(), batches, 2, extra_callbacks=(checkpoint,), enable_checkpointing=True)
    resumed_callback = method()
    second, resumed_model = fit(resumed_callback, batches, 4, ckpt_path=tmp_path / "last.ckpt")

    assert len(first.steps) == len(second.steps) == 4
    assert [step["global_step"] for step in second.steps] == [4, 5, 6, 7]
    assert_adaptive(second.steps)
    for index, (resumed, uninterrupted) in enumerate(
        zip(first.steps + second.steps, full.steps, strict=True)
    ):
        assert torch.equal(resumed["weights"], uninterrupted["weights"]), f"step {index}"
    assert torch.equal(
        resumed_callback.state_dict()["previous"], full_callback.state_dict()["previous"]
    )
    for key, value in full_model.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[key], value), key

    # The state lives in the callback: the model loads without it, unchanged in shape.
    loaded = ThreeTaskNet.load_from_checkpoint(tmp_path / "last.ckpt")
    assert loaded.state_dict().keys() == ThreeTaskNet().state_dict().keys()


@pytest.mark.parametrize("name", NAMES)
def test_the_penguins_config_runs_through_the_cli(name, monkeypatch):
    monkeypatch.setattr("sys.argv", ["lossagg"])
    cli = fit_config(
        name,
        "--trainer.limit_train_batches=3",  # a few steps prove the setting; a full epoch
        "--trainer.limit_val_batches=1",  # would triple the time
    )
    assert type(cli.model.weighting) is type(METHODS[name]())
    metrics = cli.trainer.callback_metrics
    for task in PENGUIN_TASKS:
        assert torch.isfinite(metrics[f"train_epoch/weight/{task}"]), task
        assert f"val/loss/{task}" in metrics


@pytest.mark.parametrize("name", NAMES)
def test_a_model_without_the_mixin_is_refused(name):
    class Plain(L.LightningModule):
        def training_step(self, batch, batch_idx):
            return None

        def configure_optimizers(self):
            return None

    trainer = L.Trainer(
        callbacks=[METHODS[name]()],
        logger=False,
        max_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.raises(TypeError, match=r"needs a MultiTaskMixin model.*Add MultiTaskMixin to the"):
        trainer.fit(Plain(), train_dataloaders=one_batch_loader(make_batch(2, seed=0)))


@pytest.mark.parametrize("name", NAMES)
def test_the_state_key_and_the_run_config_come_from_the_arguments(name):
    callback = METHODS[name](rep_grad=True, sync="gramian")
    arguments = callback.method_arguments
    assert arguments["rep_grad"] is True and arguments["sync"] == "gramian"
    same = type(callback)(**arguments)
    assert same.state_key == callback.state_key
    assert callback.state_key.startswith(type(callback).__name__)
    assert type(callback)(**{**arguments, "rep_grad": False}).state_key != callback.state_key


class NarrowThreeTaskNet(ThreeTaskNet):
    """A representation of 2 for 3 tasks: on one sample the task Jacobian has rank 2 at most."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = torch.nn.Sequential(torch.nn.Linear(IN_FEATURES, 2), torch.nn.Tanh())
        outputs = {"price": 1, "kind": 3, "sold": 1}
        self.heads = torch.nn.ModuleDict({n: torch.nn.Linear(2, o) for n, o in outputs.items()})


@pytest.mark.parametrize(
    ("method", "reference"),
    [
        (MGDA, functional.mgda),
        (IMTLG, functional.imtl_g),
        (AlignedMTL, functional.aligned_mtl),
        (UPGrad, functional.upgrad),
        (CAGrad, functional.cagrad),
    ],
    ids=["mgda", "imtl_g", "aligned_mtl", "upgrad", "cagrad"],
)
def test_a_float32_gramians_rounding_is_told_from_its_rank(method, reference):
    # K = 3 tasks, one sample, a 2-wide representation: the Gramian's third eigenvalue is float32
    # rounding, about 1e-7 of the largest. The functional drops it at the rounding of the
    # Gramian's dtype, as LibMTL does. Cut at float64's instead (the callbacks of IMTL-G and
    # Aligned-MTL did), it was kept: IMTL-G's weights followed the noise (off by ~1), and
    # Aligned-MTL's update shrank to it (1e-4 of LibMTL's).
    class SeesGramians(method):  # type: ignore[misc, valid-type]
        def __init__(self, **kwargs) -> None:
            super().__init__(**kwargs)
            self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

        def weights_from_gramian(self, gramian):
            weights = super().weights_from_gramian(gramian)
            self.seen.append((gramian.clone(), weights.clone()))
            return weights

    batches = [make_batch(1, seed=s, dtype=torch.float32) for s in range(8)]
    for step, (_, targets) in enumerate(batches):
        targets["price"][:] = 0.3 * step - 1.0  # every task labelled
    callback = SeesGramians(rep_grad=True)
    torch.manual_seed(0)
    trainer = quiet_trainer(1, len(batches), "32-true", [callback])
    trainer.fit(NarrowThreeTaskNet(), DataLoader(batches, batch_size=None))
    assert callback.gramian_eps == torch.finfo(torch.float32).eps
    assert len(callback.seen) == len(batches)
    for gramian, weights in callback.seen:
        assert torch.linalg.eigvalsh(gramian)[0].abs() < 1e-5 * gramian.trace()  # rank 2
        expected = reference(gramian.float()).double()
        torch.testing.assert_close(weights, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rep_grad", [True, False], ids=["representation", "parameters"])
@pytest.mark.parametrize("name", [*NAMES, "gradvac"])
def test_resuming_is_bit_exact(name, rep_grad, tmp_path):
    # The linear heads run as one node from a fit's second step on, and a solver may start from
    # the previous step's answer (CAGrad's, UPGrad's supports): the first step of a resumed fit
    # must weigh with the same arithmetic as the uninterrupted run's step there.
    def method():
        if name == "gradvac":
            return GradVac(beta=0.5, seed=7, rep_grad=rep_grad)
        return METHODS[name](rep_grad=rep_grad)

    assert_resume_equals_uninterrupted(method, training_batches(), tmp_path)
