"""GradNorm through real fits: two updates of w by hand (plain torch autograd on the paper's
loss, torch's Adam), a real 2-process run, exact resume, the YAML config, argument errors."""

import copy
import warnings

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_lossagg.callbacks import GradNorm
from tests.callbacks._fits import assert_nested_equal, fit_config
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

LR = 0.1


def _reference(batches: list, where: str, alpha: float, lr: float = LR) -> list[dict]:
    """The paper by hand: per step the weights used, the model's gradients, the new w."""
    model = initial_model(deep=True)
    weights = torch.ones(3, dtype=torch.float64, requires_grad=True)
    adam = torch.optim.Adam([weights], lr=lr)
    initial_losses, steps = None, []
    for batch in batches:
        losses, shared = forward_losses(model, batch)
        at = {
            "last": list(model.trunk[2].parameters()),  # the last shared layer: Linear(8, 8)
            "all": list(model.trunk.parameters()),
            "representation": [shared],
        }[where]
        norms = torch.stack([flat_grad(loss, at).norm() for loss in losses])
        if initial_losses is None:
            initial_losses = losses.detach()
        ratios = losses.detach() / initial_losses
        inverse_rates = ratios / ratios.mean()
        weighted_norms = weights * norms
        target = (weighted_norms.mean() * inverse_rates**alpha).detach()
        gradnorm_loss = (weighted_norms - target).abs().sum()
        used = weights.detach().clone()
        # The model: sum_k w_k c_k L_k, heads included.
        objective = (used * STATIC * losses).sum()
        trunk_grad = flat_grad(objective, list(model.trunk.parameters()))
        grads = sgd_step(model, trunk_grad, objective)
        adam.zero_grad()
        gradnorm_loss.backward(inputs=[weights])
        adam.step()
        with torch.no_grad():
            positive = weights.clamp(min=0)  # a negative weight would ascend its loss
            weights.copy_(3 * positive / positive.sum())
        steps.append({"weights": used * STATIC, "grads": grads, "new": weights.detach().clone()})
    return steps


# The update follows sign(w_k n_k - target_k) n_k: a strong restoring force makes the signs, and
# so the test, depend on the loss ratios too.
@pytest.mark.parametrize(
    ("where", "alpha"),
    [("last", 1.5), ("all", 1.5), ("representation", 1.5), ("last", 8.0), ("last", 0.0)],
)
def test_two_updates_of_the_weights_equal_the_paper_by_hand(where, alpha):
    batches = [make_batch(6, seed=1), make_batch(9, seed=2), make_batch(7, seed=3)]
    rep_grad = where == "representation"
    layer = "all" if where == "all" else "last"
    method = GradNorm(alpha=alpha, lr=LR, layer=layer, rep_grad=rep_grad)
    recorder, _ = fit(method, batches, deep=True)
    expected = _reference(batches, where, alpha)
    assert not torch.allclose(expected[-1]["new"], torch.ones(3, dtype=torch.float64))
    for index, (step, reference) in enumerate(zip(recorder.steps, expected, strict=True)):
        torch.testing.assert_close(step["weights"], reference["weights"], msg=f"step {index}")
        assert_grads_close(step["grads"], reference["grads"], f"step {index}")
        new_weights = step["state"]["weights"]["values"]
        torch.testing.assert_close(new_weights, reference["new"], msg=f"step {index}")
        assert torch.isclose(new_weights.sum(), torch.tensor(3.0, dtype=torch.float64))


def test_the_last_shared_layer_and_a_named_layer_are_resolved():
    batches = [make_batch(6, seed=1), make_batch(9, seed=2)]
    by_name, _ = fit(GradNorm(lr=LR, layer="trunk.2"), batches, deep=True)
    last, _ = fit(GradNorm(lr=LR, layer="last"), batches, deep=True)
    first, _ = fit(GradNorm(lr=LR, layer="trunk.0"), batches, deep=True)

    # Adam's first step moves by lr * sign: compare after the second, which sees magnitudes.
    def learned(recorder):
        return recorder.steps[-1]["state"]["weights"]["values"]

    assert torch.equal(learned(by_name), learned(last))
    assert not torch.allclose(learned(first), learned(last))


def test_accumulated_micro_batches_share_one_update():
    batches = [make_batch(6, seed=seed) for seed in range(4)]
    recorder, _ = fit(GradNorm(lr=LR), batches, accumulate_grad_batches=2)
    weights = [step["weights"] for step in recorder.steps]
    assert torch.equal(weights[0], weights[1]) and torch.equal(weights[2], weights[3])
    assert not torch.equal(weights[1], weights[2])


def test_an_accumulated_update_follows_the_mean_of_the_micro_batches_gradients():
    # One optimizer step of two micro-batches of different sizes: Adam's first moment after it is
    # (1 - beta1) times the mean of the micro-batches' sign(w n - target) n, at w = 1 and the
    # initial model (it does not move between micro-batches); L(0) from the first micro-batch.
    alpha, batches = 1.5, [make_batch(6, seed=1), make_batch(9, seed=2)]
    recorder, _ = fit(GradNorm(alpha=alpha, lr=LR), batches, deep=True, accumulate_grad_batches=2)
    model = initial_model(deep=True)
    initial, gradients = None, []
    for batch in batches:
        losses, _ = forward_losses(model, batch)
        last_layer = list(model.trunk[2].parameters())
        norms = torch.stack([flat_grad(loss, last_layer).norm() for loss in losses])
        losses = losses.detach()
        initial = losses if initial is None else initial
        ratios = losses / initial
        target = norms.mean() * (ratios / ratios.mean()) ** alpha
        gradients.append(torch.sign(norms - target) * norms)
    first_moment = recorder.steps[-1]["state"]["weights"]["exp_avg"]
    torch.testing.assert_close(first_moment, 0.1 * (gradients[0] + gradients[1]) / 2)


def test_a_first_loss_of_zero_has_no_ratio_and_the_next_loss_is_taken():
    # price's first batch is the initial model's own predictions: L(0) = 0, and L / L(0) is 0/0.
    # It sits out that step (the others' target is their own mean) and takes L(0) at the next.
    batches = [make_batch(6, seed=1), make_batch(9, seed=2), make_batch(7, seed=3)]
    model = initial_model(deep=True)
    with torch.no_grad():
        batches[0][1]["price"] = model(batches[0][0])["price"].clone()
    recorder, _ = fit(GradNorm(lr=LR), batches, deep=True)
    first, second = recorder.steps[0], recorder.steps[1]
    assert first["losses"][0] == 0
    losses, _ = forward_losses(model, batches[0])
    last_layer = list(model.trunk[2].parameters())
    norms = torch.stack([flat_grad(loss, last_layer).norm() for loss in losses[1:]])
    moments = first["state"]["weights"]
    assert moments["steps"][0] == 0 and moments["exp_avg"][0] == 0
    torch.testing.assert_close(
        moments["exp_avg"][1:], 0.1 * torch.sign(norms - norms.mean()) * norms
    )
    initial = second["state"]["initial_losses"]
    assert initial[0] == second["losses"][0] > 0
    assert second["state"]["weights"]["steps"][0] == 1
    for step in recorder.steps:
        assert torch.isfinite(step["state"]["weights"]["values"]).all()


def test_a_task_takes_part_from_its_first_labelled_step_and_only_when_labelled():
    batches = [make_batch(6, seed=1), make_batch(9, seed=2), make_batch(7, seed=3)]
    for index in (0, 2):
        batches[index][1]["sold"][:] = torch.nan
    recorder, _ = fit(GradNorm(lr=LR), batches)
    states = [step["state"] for step in recorder.steps]
    initial = [state["initial_losses"] for state in states]
    moments = [state["weights"] for state in states]
    assert initial[0][2].isnan() and moments[0]["exp_avg"][2] == 0
    assert initial[1][2] == recorder.steps[1]["losses"][2] and moments[1]["exp_avg"][2] != 0
    assert torch.equal(initial[2], initial[1])
    for name in ("exp_avg", "exp_avg_sq", "steps"):
        assert moments[2][name][2] == moments[1][name][2]
        assert (moments[2][name][:2] != moments[1][name][:2]).all()
    assert recorder.steps[2]["weights"][2] == 0


def test_the_target_is_the_mean_over_the_tasks_that_take_part():
    # Step 1 has no "sold" label: the target of the two others is the mean of their two
    # weighted norms (not a third of the sum), with loss ratios relative to their own mean.
    alpha = 1.5
    batches = [make_batch(6, seed=1), make_batch(9, seed=2)]
    batches[1][1]["sold"][:] = torch.nan
    recorder, _ = fit(GradNorm(alpha=alpha, lr=LR), batches, deep=True)
    model = initial_model(deep=True)
    with torch.no_grad():  # the model of step 1: one SGD step along the recorded gradients
        for name, parameter in model.named_parameters():
            parameter -= MODEL_LR * recorder.steps[0]["grads"][name]
    losses, _ = forward_losses(model, batches[1])
    losses = losses[:2]
    norms = torch.stack(
        [flat_grad(loss, list(model.trunk[2].parameters())).norm() for loss in losses]
    )
    weighted_norms = recorder.steps[1]["weights"][:2] / STATIC[:2] * norms
    ratios = losses.detach() / recorder.steps[0]["losses"][:2]
    targets = weighted_norms.mean() * (ratios / ratios.mean()) ** alpha
    gradient = torch.sign(weighted_norms - targets) * norms
    before, after = (step["state"]["weights"]["exp_avg"][:2] for step in recorder.steps)
    torch.testing.assert_close(after, 0.9 * before + 0.1 * gradient)


def test_the_defaults_are_the_papers():
    method = GradNorm()
    assert method.alpha == 1.5 and method.layer == "last" and not method.rep_grad


def test_a_weight_pushed_below_zero_is_clipped_before_the_renormalisation():
    # lr=2: Adam's first step moves every w_k by 2 * sign(grad_k), so the tasks above their
    # target drop to -1; clipped at 0, the others share the sum K = 3.
    batches = [make_batch(6, seed=1)]
    recorder, _ = fit(GradNorm(lr=2.0), batches, deep=True)
    expected = _reference(batches, "last", 1.5, lr=2.0)[0]["new"]
    learned = recorder.steps[0]["state"]["weights"]["values"]
    assert learned.min() == 0
    torch.testing.assert_close(learned, expected)


def test_the_pending_gradient_of_an_accumulation_survives_a_state_round_trip():
    # A checkpoint taken between micro-batches must carry the first one's part of the update.
    batches = [make_batch(6, seed=seed) for seed in range(2)]
    recorder, _ = fit(GradNorm(lr=LR), batches, accumulate_grad_batches=2)
    pending = recorder.steps[0]["state"]
    assert pending["gradient_sum"] is not None and pending["gradient_count"] is not None
    restored = GradNorm(lr=LR)
    fit(restored, batches[:1])  # set up for the model, as at a resume
    restored.load_state_dict(copy.deepcopy(pending))
    assert_nested_equal(restored.state_dict(), pending)


class StateAfterEachBatch(L.Callback):
    def __init__(self, method: GradNorm) -> None:
        self.method, self.states = method, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.states.append(copy.deepcopy(self.method.state_dict()))


def test_a_skipped_optimizer_step_leaves_the_weights_and_their_adam_state_alone():
    # Micro-batch 1 has an infinite loss: the whole first step (micro-batches 0 and 1) is
    # skipped, so w must not take the step that micro-batch 0 had started to accumulate.
    batches = [make_batch(6, seed=seed) for seed in range(4)]
    batches[1][1]["price"][0] = torch.inf
    model, method = initial_model(), GradNorm(lr=LR)
    model.nonfinite = "skip"
    seen = StateAfterEachBatch(method)
    trainer = quiet_trainer(1, steps=2, callbacks=[method, seen], accumulate_grad_batches=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        trainer.fit(model, DataLoader(batches, batch_size=None))
    assert model.skipped_steps == 1 and len(seen.states) == 4
    after_skip = seen.states[1]
    assert after_skip["gradient_sum"] is None
    assert torch.equal(after_skip["weights"]["values"], torch.ones(3, dtype=torch.float64))
    assert (after_skip["weights"]["exp_avg"] == 0).all()
    assert not torch.equal(seen.states[3]["weights"]["values"], after_skip["weights"]["values"])


@pytest.mark.ddp
def test_two_processes_equal_one_process_on_the_concatenated_batches():
    assert_two_ranks_equal_one_process("gradnorm")


def test_resuming_from_a_checkpoint_equals_an_uninterrupted_run(tmp_path):
    batches = [make_batch(6, seed=1), make_batch(9, seed=2)]
    full, _, _ = assert_resume_equals_uninterrupted(lambda: GradNorm(lr=LR), batches, tmp_path)
    assert not torch.allclose(full.steps[-1]["weights"], STATIC)


def test_the_penguins_config_runs_through_the_cli(monkeypatch):
    monkeypatch.setattr("sys.argv", ["lossagg"])
    cli = fit_config("gradnorm")
    method = cli.model.weighting
    assert isinstance(method, GradNorm) and method.alpha == 1.5 and method.layer == "last"
    learned = method.state_dict()["weights"]["values"]
    assert not torch.allclose(learned, torch.ones_like(learned))
    # What LossLogger logs as train/learned_weight/<task> (its own tests check the logging).
    assert torch.isfinite(method.state_to_log()["learned_weight"]).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": -0.5}, "`alpha` must be a finite number >= 0"),
        ({"alpha": float("nan")}, "`alpha` must be a finite number >= 0"),
        ({"alpha": True}, "`alpha` must be a finite number >= 0"),
        ({"lr": 0.0}, "`lr` must be > 0"),
        ({"lr": -1.0}, "`lr` must be > 0"),
        ({"layer": ""}, "`layer` must be 'last'"),
        ({"layer": 3}, "`layer` must be 'last'"),
        ({"sync": "params"}, "'gradients' or 'gramian'"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GradNorm(**kwargs)


@pytest.mark.parametrize("layer", ["decoder", "heads.price"])
def test_a_layer_without_shared_parameters_is_refused_at_setup(layer):
    with pytest.raises(ValueError, match=f"no submodule '{layer}' with shared parameters"):
        fit(GradNorm(layer=layer), [make_batch(4, seed=0)])


def _frozen(model: L.LightningModule, module: str, hook: str, method: GradNorm) -> GradNorm:
    """``method`` after two steps of ``model`` whose ``module`` is frozen at ``hook``."""

    def freeze(trainer, pl_module, *args, **kwargs) -> None:
        pl_module.get_submodule(module).requires_grad_(False)

    freezing = L.Callback()
    setattr(freezing, hook, freeze)
    batches = [make_batch(6, seed=1), make_batch(9, seed=2)]
    trainer = quiet_trainer(1, steps=2, callbacks=[freezing, method])
    trainer.fit(model, DataLoader(batches, batch_size=None))
    return method


@pytest.mark.parametrize("hook", ["setup", "on_fit_start"])  # built frozen; BackboneFinetuning
@pytest.mark.parametrize("layer", ["last", "all", "trunk.2"])
def test_a_frozen_trunk_leaves_nothing_to_measure_and_the_weights_alone(layer, hook):
    model = TwoLayerTrunkNet().double()
    trunk = copy.deepcopy(model.trunk.state_dict())
    method = _frozen(model, "trunk", hook, GradNorm(lr=LR, layer=layer))
    assert model.loss_record.weights.tolist() == [2.0, 1.0, 1.0]  # Task.weight alone
    assert method.state_dict()["weights"]["values"].tolist() == [1.0, 1.0, 1.0]
    assert "grad_norm" not in method.state_to_log()
    assert all(torch.equal(value, trunk[name]) for name, value in model.trunk.state_dict().items())


def test_the_last_shared_layer_is_the_last_that_trains():
    torch.manual_seed(0)
    model = TwoLayerTrunkNet().double()
    named = _frozen(
        copy.deepcopy(model), "trunk.2", "on_fit_start", GradNorm(lr=LR, layer="trunk.0")
    )
    last = _frozen(model, "trunk.2", "on_fit_start", GradNorm(lr=LR, layer="last"))
    assert torch.equal(
        named.state_dict()["weights"]["values"], last.state_dict()["weights"]["values"]
    )


# Under gradient accumulation a task without a label in one micro-batch has its dL_grad/dw
# averaged over the micro-batches it took part in, not diluted by the one it sat out. Reference:
# the paper's gradient by plain autograd, and Adam's first moment after one step, (1 - beta1) g.
def test_an_accumulated_update_averages_a_task_over_the_micro_batches_it_took_part_in():
    alpha, lr = 1.5, 0.1
    batches = [make_batch(6, seed=1), make_batch(9, seed=2)]
    batches[1][1]["kind"][:] = -100  # kind sits out the second micro-batch
    recorder, _ = fit(GradNorm(alpha=alpha, lr=lr), batches, deep=True, accumulate_grad_batches=2)

    model = initial_model(deep=True)  # the model does not move between the micro-batches
    last_layer = list(model.trunk[2].parameters())
    total, count, initial = torch.zeros(3, dtype=torch.float64), torch.zeros(3), None
    for batch in batches:
        losses, _ = forward_losses(model, batch)
        present = ~torch.isnan(losses)  # a mean over no label is NaN
        norms = torch.stack(
            [
                flat_grad(loss, last_layer).norm() if ok else loss.new_zeros(())
                for loss, ok in zip(losses, present, strict=True)
            ]
        )
        losses = losses.detach()
        initial = losses if initial is None else initial
        ratios = (losses / initial)[present]
        target = norms[present].mean() * (ratios / ratios.mean()) ** alpha  # w = 1
        gradient = torch.zeros(3, dtype=torch.float64)
        gradient[present] = torch.sign(norms[present] - target) * norms[present]
        total, count = total + gradient, count + present
    assert count.tolist() == [2, 1, 2]
    first_moment = recorder.steps[-1]["state"]["weights"]["exp_avg"]
    torch.testing.assert_close(first_moment, 0.1 * total / count.double())
