"""GradVac through real fits: weights, targets and the model update against the functional layer
applied by hand to plain-torch gradients, a real 2-process run, exact resume, the YAML config,
argument errors."""

import pytest
import torch

from lightning_lossagg.callbacks import GradVac
from lightning_lossagg.callbacks.rlw import step_seed
from lightning_lossagg.functional.gradvac import gradvac
from tests.callbacks._fits import fit_config
from tests.callbacks._stateful_gradient import (
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
from tests.models import make_batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BETA, SEED = 0.5, 7


def _reference(batches: list, rep_grad: bool, beta: float = BETA) -> list[dict]:
    """Per step: w from the functional on the Gramian of plain-torch gradients, with the task
    order drawn from step_seed(SEED, step); the trunk follows sum_k w_k c_k g_k, heads c_k g_k."""
    model = initial_model()
    targets, steps = None, []
    for index, batch in enumerate(batches):
        losses, shared = forward_losses(model, batch)
        trunk = list(model.trunk.parameters())
        at = [shared] if rep_grad else trunk
        jacobian = torch.stack([flat_grad(loss, at) for loss in losses])
        generator = torch.Generator().manual_seed(step_seed(SEED, index))
        weights, targets = gradvac(jacobian @ jacobian.T, targets, beta, generator)
        direction = (weights * STATIC) @ jacobian
        if rep_grad:
            trunk_grad = flat_grad((shared * direction.view_as(shared)).sum(), trunk)
        else:
            trunk_grad = direction
        grads = sgd_step(model, trunk_grad, (STATIC * losses).sum())
        steps.append({"weights": weights * STATIC, "grads": grads, "targets": targets})
    return steps


@pytest.mark.parametrize("rep_grad", [False, True])
def test_weights_targets_and_update_equal_the_functional_by_hand(rep_grad):
    batches = [make_batch(6, seed=1), make_batch(9, seed=2), make_batch(7, seed=3)]
    recorder, _ = fit(GradVac(beta=BETA, seed=SEED, rep_grad=rep_grad), batches)
    expected = _reference(batches, rep_grad)
    assert any(not torch.allclose(step["weights"], STATIC) for step in expected)
    for index, (step, reference) in enumerate(zip(recorder.steps, expected, strict=True)):
        torch.testing.assert_close(step["weights"], reference["weights"], msg=f"step {index}")
        assert_grads_close(step["grads"], reference["grads"], f"step {index}")
        torch.testing.assert_close(step["state"]["targets"], reference["targets"])


def test_the_task_order_depends_on_the_seed():
    batches = [make_batch(6, seed=1), make_batch(9, seed=2), make_batch(7, seed=3)]
    orders = {}
    for seed in range(4):
        recorder, _ = fit(GradVac(beta=BETA, seed=seed), batches)
        orders[seed] = recorder.steps[-1]["state"]["targets"]
    distinct = {tuple(targets.flatten().tolist()) for targets in orders.values()}
    assert len(distinct) > 1


def test_a_task_without_labels_keeps_its_targets():
    batches = [make_batch(6, seed=1), make_batch(9, seed=2)]
    batches[1][1]["sold"][:] = torch.nan
    recorder, _ = fit(GradVac(beta=BETA, seed=SEED), batches)
    before, after = (step["state"]["targets"] for step in recorder.steps)
    assert torch.equal(after[2], before[2]) and torch.equal(after[:, 2], before[:, 2])
    assert not torch.equal(after[:2, :2], before[:2, :2])
    assert recorder.steps[1]["weights"][2] == 0


def test_the_default_rate_is_libmtls():
    assert GradVac().beta == 0.5


def test_beta_one_is_accepted_and_equals_the_functional_by_hand():
    batches = [make_batch(6, seed=1)]
    recorder, _ = fit(GradVac(beta=1.0, seed=SEED), batches)
    expected = _reference(batches, rep_grad=False, beta=1.0)[0]
    torch.testing.assert_close(recorder.steps[0]["state"]["targets"], expected["targets"])
    torch.testing.assert_close(recorder.steps[0]["weights"], expected["weights"])


def test_the_logged_target_of_a_pair_is_the_first_tasks_target_towards_the_second():
    method = GradVac(beta=BETA, seed=SEED)
    fit(method, [make_batch(6, seed=1), make_batch(9, seed=2)])
    targets = method.state_dict()["targets"]
    assert not torch.allclose(targets, targets.T)  # the targets of a pair differ in direction
    torch.testing.assert_close(method.pairwise_state_to_log()["target_cos"], targets)


@pytest.mark.ddp
def test_two_processes_equal_one_process_on_the_concatenated_batches():
    assert_two_ranks_equal_one_process("gradvac")


def test_resuming_from_a_checkpoint_equals_an_uninterrupted_run(tmp_path):
    batches = [make_batch(6, seed=1), make_batch(9, seed=2)]
    _, resumed, _ = assert_resume_equals_uninterrupted(
        lambda: GradVac(beta=BETA, seed=SEED), batches, tmp_path
    )
    assert any(not torch.allclose(step["weights"], STATIC) for step in resumed.steps)


def test_the_penguins_config_runs_through_the_cli(monkeypatch):
    monkeypatch.setattr("sys.argv", ["lossagg"])
    cli = fit_config("gradvac")
    method = cli.model.weighting
    assert isinstance(method, GradVac) and method.beta == 0.5
    targets = method.state_dict()["targets"]
    assert targets is not None and targets.abs().sum() > 0
    # What LossLogger logs as train/target_cos/<a>~<b> (its own tests check the logging).
    target_cos = method.pairwise_state_to_log()["target_cos"]
    assert torch.isfinite(target_cos[torch.triu_indices(3, 3, 1).unbind()]).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"beta": -0.1}, r"`beta` must be in \[0, 1\]"),
        ({"beta": 1.5}, r"`beta` must be in \[0, 1\]"),
        ({"beta": float("inf")}, r"`beta` must be a number in \[0, 1\]"),
        ({"beta": "0.5"}, r"`beta` must be a number in \[0, 1\]"),
        ({"seed": -1}, "`seed` must be an int >= 0"),
        ({"sync": "params"}, "'gradients' or 'gramian'"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GradVac(**kwargs)


def test_targets_of_another_model_are_refused():
    method = GradVac()
    fit(method, [make_batch(4, seed=0)])
    with pytest.raises(ValueError, match="belong to another model"):
        method.load_state_dict({"targets": torch.zeros(2, 2, dtype=torch.float64)})
