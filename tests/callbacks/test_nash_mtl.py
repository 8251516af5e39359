"""Nash-MTL on real fits: the bargaining weights of the Gramian made by hand, warm-started and
reused between updates, LibMTL's update (weighted heads, clipped shared gradient); state and
argument checks."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_lossagg.callbacks import NashMTL, gradient_weighting
from lightning_lossagg.functional import nash_mtl
from tests.callbacks._gradient_based import (
    METHODS,
    STATIC_WEIGHTS,
    HandStep,
    check_fit_against_hand,
    fit,
    loader,
    reference_weights,
    training_batches,
)
from tests.models import ThreeTaskNet, make_batch, quiet_trainer


@pytest.mark.parametrize("rep_grad", [False, True])
def test_weights_and_update_follow_libmtl_by_hand(rep_grad):
    callback = METHODS["nash_mtl"](rep_grad=rep_grad)
    assert (callback.update_weights_every, callback.max_norm) == (2, 0.5)
    steps = check_fit_against_hand(
        callback,
        reference_weights("nash_mtl", callback),
        heads_weighted=True,
        max_norm=callback.max_norm,
    )
    # Global step 1 reuses what step 0 solved (its batch has no "kind" label); step 2 solves.
    valid = steps[1]["valid"]
    assert torch.equal(steps[1]["weights"][valid], steps[0]["weights"][valid])
    assert not torch.equal(steps[2]["weights"], steps[0]["weights"])
    # The clipping mattered: some unclipped shared update was longer than max_norm.
    norms = []
    for step in steps:
        hand = HandStep(step["before"], step["batch"], rep_grad)
        grads = hand.gradients(step["weights"] / STATIC_WEIGHTS, heads_weighted=True)
        trunk = [grad.flatten() for name, grad in grads.items() if name.startswith("trunk.")]
        norms.append(torch.cat(trunk).norm())
    assert max(norms) > callback.max_norm


def test_between_updates_no_per_task_gradient_is_taken(monkeypatch):
    # Per-task gradients come from task_gradients (a pass per task) or, with a head per task,
    # from the one pass: count both.
    calls = []

    def counting(original):
        def counted(*args, **kwargs):
            calls.append(1)
            return original(*args, **kwargs)

        return counted

    monkeypatch.setattr(
        gradient_weighting, "task_gradients", counting(gradient_weighting.task_gradients)
    )
    weighting = gradient_weighting.GradientWeighting
    one_pass = counting(weighting._gradients_in_one_pass)
    monkeypatch.setattr(weighting, "_gradients_in_one_pass", one_pass)
    recorder, _ = fit(NashMTL(update_weights_every=3), training_batches(), max_epochs=3)
    assert [step["global_step"] for step in recorder.steps] == [0, 1, 2, 3, 4, 5]
    assert len(calls) == 2  # global steps 0 and 3


def test_without_clipping_the_shared_update_has_norm_sqrt_k():
    # LibMTL's scale: ||sum_k alpha_k g_k|| = sqrt(K) on a batch where every task is labelled.
    callback = NashMTL(max_norm=0.0)
    recorder, _ = fit(callback, training_batches(1), max_epochs=1)
    step = recorder.steps[0]
    hand = HandStep(step["before"], step["batch"], rep_grad=False)
    alpha = step["weights"] / STATIC_WEIGHTS
    assert (alpha @ hand.gramian @ alpha).sqrt().item() == pytest.approx(3**0.5, rel=1e-8)


def test_the_previous_solution_is_the_state_and_must_fit_the_model():
    callback = NashMTL()
    assert callback.state_dict() == {"previous": None}
    fit(callback, training_batches(), max_epochs=1)
    state = callback.state_dict()
    assert state["previous"].shape == (3,) and (state["previous"] > 0).all()
    other = NashMTL()
    other.load_state_dict({"previous": torch.ones(4, dtype=torch.float64)})
    trainer = L.Trainer(
        callbacks=[other],
        max_steps=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.raises(ValueError, match="4 previous weights for a model with 3 tasks"):
        trainer.fit(ThreeTaskNet(), loader(training_batches(1)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"update_weights_every": 0}, "`update_weights_every` must be an int >= 1"),
        ({"update_weights_every": 1.5}, "`update_weights_every` must be an int >= 1"),
        ({"update_weights_every": True}, "`update_weights_every` must be an int >= 1"),
        ({"max_norm": -1.0}, "`max_norm` must be a finite number >= 0"),
        ({"max_norm": float("inf")}, "`max_norm` must be a finite number >= 0"),
        ({"sync": "params"}, "'gradients' or 'gramian'"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NashMTL(**kwargs)


@pytest.mark.parametrize("rep_grad", [False, True])
def test_the_method_knows_the_rounding_of_the_gramians_dtype(rep_grad):
    # Whether two gradients are opposite is told to the Gramian's rounding: 1e-7 in float32.
    for precision, dtype in (("32-true", torch.float32), ("64-true", torch.float64)):
        callback = NashMTL(rep_grad=rep_grad)
        trainer = quiet_trainer(1, precision=precision, callbacks=[callback])
        trainer.fit(ThreeTaskNet(), loader([make_batch(6, seed=1, dtype=dtype)]))
        assert callback.gramian_eps == torch.finfo(dtype).eps


def test_a_task_left_out_of_a_solve_keeps_its_previous_value_for_the_reuse():
    # Solves at global steps 0 and 2 (update_weights_every=2), reuses at 1 and 3. "kind" has no
    # valid label at step 2: its entry keeps step 0's solution, which step 3 reuses.
    batches = [make_batch(9, seed=s) for s in range(4)]
    batches[2][1]["kind"][:] = -100
    recorder, _ = fit(NashMTL(update_weights_every=2, max_norm=0.0), batches, max_epochs=1)
    steps = recorder.steps
    assert [s["global_step"] for s in steps] == [0, 1, 2, 3]
    assert bool(steps[3]["valid"][1]) and not bool(steps[2]["valid"][1])
    assert steps[3]["weights"][1] == steps[0]["weights"][1] != 1.0  # kind: Task.weight 1


def test_resuming_between_solves_without_a_saved_solution_solves(tmp_path):
    # A checkpoint whose NashMTL state does not load (another update_weights_every: another
    # state key) resumes at global step 2, between solves of update_weights_every=3: with no
    # previous solution the step solves (it crashed on reusing None).
    batches = [make_batch(9, seed=s) for s in range(2)]
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    fit(
        NashMTL(update_weights_every=1, max_norm=0.0),
        batches,
        1,
        extra_callbacks=(checkpoint,),
        enable_checkpointing=True,
    )
    resumed, _ = fit(
        NashMTL(update_weights_every=3, max_norm=0.0), batches, 2, ckpt_path=tmp_path / "last.ckpt"
    )
    assert [s["global_step"] for s in resumed.steps] == [2, 3]
    weights = resumed.steps[0]["weights"]
    assert torch.isfinite(weights).all() and (weights > 0).all()


# Nash-MTL when the bargaining problem has no solution (a task whose shared gradient is exactly
# zero: no alpha_k (G alpha)_k = 1): the step keeps the previous solution, rescaled so that alpha^T
# G alpha = K (LibMTL keeps ``prvs_alpha`` when its solver fails). The reference is built by hand
# from the Gramian of plain autograd gradients and the functional ``nash_mtl`` for the solvable
# step; nothing is read from the callback's own state.
class _ZeroSoldHeadAfterFirstStep(L.Callback):
    """After global step 0, the "sold" head's weight is set to 0: from then on its task's
    gradient at the representation and at the trunk is exactly zero (its loss still valid)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 0:
            with torch.no_grad():
                pl_module.heads["sold"].weight.zero_()


def test_a_step_without_a_bargaining_solution_keeps_the_previous_one_rescaled():
    batches = [make_batch(9, seed=s) for s in range(2)]
    callback = NashMTL(update_weights_every=1, max_norm=0.0)
    recorder, _ = fit(callback, batches, 1, extra_callbacks=(_ZeroSoldHeadAfterFirstStep(),))
    first, second = recorder.steps
    assert bool(first["valid"].all()) and bool(second["valid"].all())

    hand_first = HandStep(first["before"], first["batch"], rep_grad=False)
    alpha_first = nash_mtl(hand_first.gramian, torch.ones(3, dtype=torch.float64), max_norm=0.0)
    torch.testing.assert_close(first["weights"], alpha_first * STATIC_WEIGHTS)
    # The solve must not have been trivial: a restart from ones would give other weights.
    assert not torch.allclose(alpha_first / alpha_first[0], torch.ones(3, dtype=torch.float64))

    hand_second = HandStep(second["before"], second["batch"], rep_grad=False)
    gramian = hand_second.gramian
    assert gramian[2, 2] == 0 and gramian[0, 0] > 0 and gramian[1, 1] > 0  # no solution
    expected = alpha_first * torch.sqrt(3 / (alpha_first @ gramian @ alpha_first))
    torch.testing.assert_close(second["weights"], expected * STATIC_WEIGHTS, rtol=1e-9, atol=1e-12)
