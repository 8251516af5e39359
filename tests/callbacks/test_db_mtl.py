"""DB-MTL through real fits: the buffer, step counter and the model update against the paper's
update written out with plain torch (log-loss gradients by autograd), a real 2-process run,
exact resume, the YAML config, argument errors."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_lossagg.callbacks import DBMTL
from tests.callbacks._fits import (
    ParametersAfterEachStep,
    SignedPriceNet,
    fit_config,
    signed_price_batches,
    trainer,
)
from tests.callbacks._stateful_gradient import (
    MODEL_LR,
    STATIC,
    assert_grads_close,
    assert_resume_equals_uninterrupted,
    assert_two_ranks_equal_one_process,
    fit,
    flat_grad,
    forward_losses,
    initial_model,
    sgd_step,
)
from tests.models import TwoLayerTrunkNet, make_batch, quiet_trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BETA, SIGMA, EPS = 0.9, 0.5, 1e-8


def _batches() -> list:
    batches = [make_batch(6, seed=1), make_batch(9, seed=2), make_batch(7, seed=3)]
    batches[1][1]["kind"][:] = -100  # no valid "kind" label in the second step
    return batches


def _reference(batches: list) -> list[dict]:
    """Per step t (1-based): b_k <- ĝ_k + beta / t^sigma (b_k - ĝ_k) with ĝ_k the gradient of
    log(L_k + 1e-8) on the trunk, for the tasks with labels; the trunk follows
    sum_k c_k max_j ||b_j|| / ||b_k|| b_k over those tasks; heads c_k ∇log(L_k + 1e-8)."""
    model = initial_model()
    trunk = list(model.trunk.parameters())
    buffer = torch.zeros(3, sum(p.numel() for p in trunk), dtype=torch.float64)
    steps = []
    for t, batch in enumerate(batches, start=1):
        losses, _ = forward_losses(model, batch)
        present = torch.isfinite(losses)
        log_losses = torch.log(torch.where(present, losses, 1.0) + EPS)
        for k in present.nonzero().flatten().tolist():
            log_grad = flat_grad(log_losses[k], trunk)
            buffer[k] = log_grad + BETA / t**SIGMA * (buffer[k] - log_grad)
        norms = buffer.norm(dim=1)
        largest = norms[present].max()
        balance = torch.where(present, largest / norms, 0.0)
        direction = (STATIC * balance) @ buffer
        head_objective = (torch.where(present, STATIC, 0.0) * log_losses).sum()
        grads = sgd_step(model, direction, head_objective)
        weights = torch.where(present, STATIC / (losses.detach() + EPS), 0.0)
        steps.append(
            {
                "weights": weights,
                "grads": grads,
                "buffer": buffer.clone(),
                "step": t,
                "balance": balance,
            }
        )
    return steps


def test_buffer_counter_and_update_equal_the_paper_by_hand():
    batches = _batches()
    recorder, _ = fit(DBMTL(beta=BETA, beta_sigma=SIGMA), batches)
    expected = _reference(batches)
    for index, (step, reference) in enumerate(zip(recorder.steps, expected, strict=True)):
        torch.testing.assert_close(step["weights"], reference["weights"], msg=f"step {index}")
        assert_grads_close(step["grads"], reference["grads"], f"step {index}")
        torch.testing.assert_close(step["state"]["buffer"], reference["buffer"])
        assert step["state"]["step"] == reference["step"]
        torch.testing.assert_close(step["logged"]["buffer_weight"], reference["balance"])


@pytest.mark.ddp
def test_two_processes_equal_one_process_on_the_concatenated_batches():
    assert_two_ranks_equal_one_process("db_mtl")


def test_resuming_from_a_checkpoint_equals_an_uninterrupted_run(tmp_path):
    _, _, method = assert_resume_equals_uninterrupted(
        lambda: DBMTL(beta=BETA, beta_sigma=SIGMA), _batches()[:2], tmp_path
    )
    assert method.state_dict()["step"] == 8


def test_the_penguins_config_runs_through_the_cli(monkeypatch):
    monkeypatch.setattr("sys.argv", ["lossagg"])
    cli = fit_config("db_mtl")
    method = cli.model.weighting
    assert isinstance(method, DBMTL) and method.beta == 0.9
    state = method.state_dict()
    assert state["step"] == cli.trainer.global_step > 0
    shared = sum(p.numel() for p in cli.model.shared_parameters())
    assert state["buffer"].shape == (3, shared)
    # What LossLogger logs as train/buffer_weight/<task> (its own tests check the logging).
    assert torch.isfinite(method.state_to_log()["buffer_weight"]).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"beta": 1.0}, r"`beta` must be in \[0, 1\)"),
        ({"beta": -0.1}, r"`beta` must be in \[0, 1\)"),
        ({"beta": float("nan")}, "`beta` must be finite"),
        ({"beta_sigma": -1.0}, "`beta_sigma` must be >= 0"),
        ({"beta_sigma": "0"}, "`beta_sigma` must be a number"),
        ({"rep_grad": True}, "DBMTL does not support rep_grad=True"),
        ({"sync": "gramian"}, "DBMTL needs sync='gradients'"),
        ({"sync": "params"}, "'gradients' or 'gramian'"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DBMTL(**kwargs)


def test_a_buffer_of_another_model_is_refused():
    method = DBMTL()
    fit(method, [make_batch(4, seed=0)])
    with pytest.raises(ValueError, match="belongs to another model"):
        method.load_state_dict({"buffer": torch.zeros(2, 7, dtype=torch.float64), "step": 1})


def test_a_negative_loss_is_refused_before_the_optimizer_step_and_loses_nothing():
    # Read on the host at the optimizer step (no wait for the device inside the step).
    batches = signed_price_batches(3, negative_at=1)
    torch.manual_seed(0)
    model, after_step, method = SignedPriceNet().double(), ParametersAfterEachStep(), DBMTL()
    with pytest.raises(ValueError, match=r"'price' \(-[0-9.]+\) was < 0 at global step 1"):
        trainer([method, after_step], max_epochs=1).fit(model, DataLoader(batches, None))
    assert len(after_step.parameters) == 1
    for name, value in model.state_dict().items():
        assert torch.equal(value, after_step.parameters[-1][name]), name  # step 1 never applied
    torch.manual_seed(0)
    first_step_only = DBMTL()
    trainer([first_step_only], max_epochs=1).fit(
        SignedPriceNet().double(), DataLoader(batches[:1], None)
    )
    expected = first_step_only.state_dict()
    assert method.state_dict()["step"] == expected["step"] == 1
    torch.testing.assert_close(method.state_dict()["buffer"], expected["buffer"], rtol=0, atol=0)


def test_the_defaults_are_libmtls():
    method = DBMTL()
    assert method.beta == 0.9 and method.beta_sigma == 0.0


def test_a_negative_loss_in_an_accumulation_puts_back_the_state_from_before_its_first_batch():
    # Micro-batches 2 and 3 make global step 1; the loss < 0 of micro-batch 3 is read at that
    # step, and the state goes back to before micro-batch 2: that of the first step alone.
    batches = signed_price_batches(4, negative_at=3)
    torch.manual_seed(0)
    method = DBMTL()
    with pytest.raises(ValueError, match=r"'price' \(-[0-9.]+\) was < 0 at global step 1"):
        trainer([method], max_epochs=1, accumulate_grad_batches=2).fit(
            SignedPriceNet().double(), DataLoader(batches, None)
        )
    torch.manual_seed(0)
    first_step_only = DBMTL()
    trainer([first_step_only], max_epochs=1, accumulate_grad_batches=2).fit(
        SignedPriceNet().double(), DataLoader(batches[:2], None)
    )
    expected = first_step_only.state_dict()
    assert method.state_dict()["step"] == expected["step"] == 2
    torch.testing.assert_close(method.state_dict()["buffer"], expected["buffer"], rtol=0, atol=0)


class UnfreezeTrunkStart(L.Callback):
    """The trunk's first layer is frozen for step 0 and trains from step 1 on."""

    def on_fit_start(self, trainer, pl_module) -> None:
        pl_module.trunk[0].requires_grad_(False)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 1:
            pl_module.trunk[0].requires_grad_(True)


def test_the_buffer_starts_afresh_when_the_trainable_shared_parameters_change():
    batches = [make_batch(7, seed=seed) for seed in range(3)]
    callback = DBMTL()
    trainer = quiet_trainer(1, steps=3, callbacks=[callback, UnfreezeTrunkStart()])
    with pytest.warns(UserWarning, match="from 56 to 92 values; their gradient buffer starts"):
        trainer.fit(TwoLayerTrunkNet().double(), DataLoader(batches, batch_size=None))
    assert callback.state_dict()["buffer"].shape == (3, 92)
    # The step counter (the t of beta / t^sigma) starts afresh too: steps 1 and 2 since then.
    assert callback.state_dict()["step"] == 2


class FreezeTrunkAtSetup(L.Callback):
    """Freezes the trunk at setup, before DBMTL's (as BackboneFinetuning does); with
    ``unfreeze_at_start`` it trains again from the first step on."""

    def __init__(self, unfreeze_at_start: bool = False) -> None:
        self.unfreeze_at_start = unfreeze_at_start

    def setup(self, trainer, pl_module, stage) -> None:
        pl_module.trunk.requires_grad_(False)

    def on_train_start(self, trainer, pl_module) -> None:
        if self.unfreeze_at_start:
            pl_module.trunk.requires_grad_(True)


def test_a_frozen_trunk_trains_the_heads_on_their_log_losses():
    # Nothing shared trains: no buffer; each head follows c_k grad L_k / (L_k + eps).
    batch = make_batch(7, seed=0)
    model, method = initial_model(), DBMTL()
    reference = initial_model()
    trunk_before = {k: v.clone() for k, v in model.trunk.state_dict().items()}
    quiet_trainer(1, callbacks=[FreezeTrunkAtSetup(), method]).fit(model, DataLoader([batch], None))
    assert method.state_dict() == {"buffer": None, "step": 0, "unchecked": []}
    for name, value in model.trunk.state_dict().items():
        assert torch.equal(value, trunk_before[name]), name
    losses, _ = forward_losses(reference, batch)
    objective = (STATIC * torch.log(losses + EPS)).sum()
    heads = list(reference.heads.parameters())
    grads = torch.autograd.grad(objective, heads)
    expected = [p - MODEL_LR * g for p, g in zip(heads, grads, strict=True)]
    for actual, wanted in zip(model.heads.parameters(), expected, strict=True):
        torch.testing.assert_close(actual, wanted)


def _three_steps_and_a_checkpoint_after_two(batches: list, tmp_path) -> tuple:
    """DBMTL after 3 uninterrupted steps, a checkpoint of a fit of 2, and that fit's DBMTL."""
    uninterrupted = DBMTL()
    quiet_trainer(1, steps=3, callbacks=[uninterrupted]).fit(
        initial_model(), DataLoader(batches, None)
    )
    first, checkpoint = DBMTL(), tmp_path / "two_steps.ckpt"
    trainer = quiet_trainer(1, steps=2, callbacks=[first])
    trainer.fit(initial_model(), DataLoader(batches, None))
    trainer.save_checkpoint(checkpoint)
    return uninterrupted, checkpoint, first


def test_a_checkpoint_resumes_into_a_trunk_frozen_at_setup(tmp_path):
    # BackboneFinetuning freezes the trunk at setup again when a fit resumes after the unfreeze:
    # the buffer (of the trainable trunk) must load, and go on as in an uninterrupted run.
    batches = [make_batch(7, seed=seed) for seed in range(2)]  # the third step is epoch 1's
    uninterrupted, checkpoint, _ = _three_steps_and_a_checkpoint_after_two(batches, tmp_path)
    resumed = DBMTL()
    freeze = FreezeTrunkAtSetup(unfreeze_at_start=True)
    quiet_trainer(1, steps=3, callbacks=[freeze, resumed]).fit(
        initial_model(), DataLoader(batches, None), ckpt_path=checkpoint
    )
    assert resumed.state_dict()["step"] == 3
    torch.testing.assert_close(
        resumed.state_dict()["buffer"], uninterrupted.state_dict()["buffer"], rtol=0, atol=0
    )


class StopBeforeTheStep(L.Callback):
    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        raise RuntimeError("stopped")  # an interrupted step: the method never reads its losses


def test_a_reused_instance_forgets_the_losses_an_interrupted_fit_left_unread():
    method = DBMTL()
    torch.manual_seed(0)
    with pytest.raises(RuntimeError, match="stopped"):
        trainer([StopBeforeTheStep(), method], max_epochs=1).fit(
            SignedPriceNet().double(), DataLoader(signed_price_batches(1, negative_at=0), None)
        )
    # The same instance on good losses: the stopped fit's unread negative loss is not reported.
    torch.manual_seed(0)
    trainer([method], max_epochs=1).fit(
        SignedPriceNet().double(), DataLoader(signed_price_batches(2, negative_at=99), None)
    )
    assert torch.isfinite(method.state_dict()["buffer"]).all()


def test_a_checkpoint_keyed_before_rep_grad_and_sync_were_in_the_state_key_resumes(tmp_path):
    # Checkpoints saved before 96ae666 hold DBMTL's state under its beta and beta_sigma alone.
    batches = [make_batch(7, seed=seed) for seed in range(2)]
    uninterrupted, checkpoint, first = _three_steps_and_a_checkpoint_after_two(batches, tmp_path)
    saved = torch.load(checkpoint, weights_only=False)
    earlier = first._generate_state_key(beta=first.beta, beta_sigma=first.beta_sigma)
    saved["callbacks"][earlier] = saved["callbacks"].pop(first.state_key)
    torch.save(saved, checkpoint)
    resumed = DBMTL()
    quiet_trainer(1, steps=3, callbacks=[resumed]).fit(
        initial_model(), DataLoader(batches, None), ckpt_path=checkpoint
    )
    assert resumed.state_dict()["step"] == 3
    torch.testing.assert_close(
        resumed.state_dict()["buffer"], uninterrupted.state_dict()["buffer"], rtol=0, atol=0
    )
