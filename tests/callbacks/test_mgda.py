"""MGDA on real fits: the min-norm weights of the Gramian made by hand, for every normalisation."""

import pytest
import torch

from lightning_lossagg.callbacks import MGDA
from lightning_lossagg.functional import mgda
from tests.callbacks._gradient_based import (
    METHODS,
    STATIC_WEIGHTS,
    HandStep,
    Recorder,
    check_fit_against_hand,
    initial_model_state,
    loader,
    on_valid,
    reference_weights,
    trainer,
    training_batches,
)
from tests.models import ThreeTaskNet


@pytest.mark.parametrize("rep_grad", [False, True])
def test_l2_normalised_weights_and_update_follow_the_gradients_by_hand(rep_grad):
    callback = METHODS["mgda"](rep_grad=rep_grad)
    assert callback.normalization == "l2"
    check_fit_against_hand(callback, reference_weights("mgda", callback))


def _normalised_min_norm(normalizers):
    def weights(hand: HandStep, global_step: int) -> torch.Tensor:
        n = normalizers(hand)
        return on_valid(lambda g, n: mgda(g / torch.outer(n, n)) / n, hand.valid, hand.gramian, n)

    return weights


NORMALIZERS = {
    "none": lambda hand: torch.ones(3, dtype=torch.float64),
    "loss": lambda hand: hand.losses.detach(),
    "loss+": lambda hand: hand.losses.detach() * hand.gramian.diagonal().sqrt(),
}


@pytest.mark.parametrize("normalization", list(NORMALIZERS))
def test_every_normalisation_divides_the_gradients_as_libmtl(normalization):
    callback = MGDA(normalization=normalization)
    steps = check_fit_against_hand(callback, _normalised_min_norm(NORMALIZERS[normalization]))
    if normalization == "none":
        for step in steps:  # on the simplex (times Task.weight)
            assert (step["weights"] / STATIC_WEIGHTS).sum().item() == pytest.approx(1.0)


class DetachedSold(ThreeTaskNet):
    """ "sold" reads a detached representation: its gradient on the shared part is zero."""

    def forward_heads(self, shared):
        predictions = super().forward_heads(shared)
        predictions["sold"] = self.heads["sold"](shared.detach()).squeeze(-1)
        return predictions


def test_a_task_with_a_zero_gradient_is_left_out_of_the_l2_normalised_problem():
    model = DetachedSold().double()
    model.load_state_dict(initial_model_state())
    batch, recorder = training_batches(1)[0], Recorder()
    trainer([MGDA(normalization="l2"), recorder], max_epochs=1).fit(model, loader([batch]))
    step = recorder.steps[0]
    hand = HandStep(step["before"], batch, rep_grad=False)  # ThreeTaskNet: "sold" not detached
    norms = hand.gramian.diagonal()[:2].sqrt()
    expected = mgda(hand.gramian[:2, :2] / torch.outer(norms, norms)) / norms
    assert step["weights"][2] == 0.0  # a zero gradient: weight 0, not NaN
    torch.testing.assert_close(step["weights"][:2], expected * STATIC_WEIGHTS[:2])


class PriceLossMapped(ThreeTaskNet):
    """``price``'s per-sample losses passed through ``transform`` (shifted below 0, zeroed)."""

    def __init__(self, transform) -> None:
        super().__init__()
        self.transform = transform

    def per_sample_losses(self, predictions, targets):
        losses = super().per_sample_losses(predictions, targets)
        values, mask = losses["price"]
        losses["price"] = type(losses["price"])(self.transform(values), mask)
        return losses


@pytest.mark.parametrize("normalization", ["loss", "loss+"])
@pytest.mark.parametrize("loss", [-100.0, -0.25, -1e-6])
def test_a_negative_loss_is_refused_by_the_loss_normalisations(normalization, loss):
    run = trainer([MGDA(normalization=normalization)], max_epochs=1)
    # The price loss is below 0, far or just: the task is named with its loss.
    model = PriceLossMapped(lambda v: v * 0.0 + loss).double()
    with pytest.raises(ValueError, match=r"task\(s\) 'price' \(-[0-9.e-]+\) was negative at"):
        run.fit(model, loader(training_batches(1)))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="'none', 'l2', 'loss' or 'loss\\+'"):
        MGDA(normalization="l1")
    with pytest.raises(ValueError, match="'gradients' or 'gramian'"):
        MGDA(sync="params")


def test_loss_normalisation_leaves_a_zero_loss_out_with_weight_0():
    # Documented: a task whose normaliser is 0 (a zero loss with "loss") is left out of the
    # min-norm problem with weight 0; only a negative loss is refused (a bound of <= 0 survived).
    model = PriceLossMapped(lambda v: v * 0.0).double()  # a loss (and gradient) of exactly 0
    model.load_state_dict(initial_model_state())
    batch, recorder = training_batches(1)[0], Recorder()
    trainer([MGDA(normalization="loss"), recorder], max_epochs=1).fit(model, loader([batch]))
    step = recorder.steps[0]
    assert step["weights"][0] == 0.0
    hand = HandStep(step["before"], batch, rep_grad=False)
    norms = hand.losses.detach()[1:]
    expected = mgda(hand.gramian[1:, 1:] / torch.outer(norms, norms)) / norms
    torch.testing.assert_close(step["weights"][1:], expected * STATIC_WEIGHTS[1:])
