from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_lossagg import LOSSES, Task
from lightning_lossagg.aggregation import global_task_losses
from lightning_lossagg.tasks import MaskedLoss, ZeroMaskedLoss


@pytest.mark.parametrize(
    ("name", "reference", "kind"),
    [
        ("mse", F.mse_loss, "float"),
        ("mae", F.l1_loss, "float"),
        ("l1", F.l1_loss, "float"),
        ("huber", F.huber_loss, "float"),
        ("smooth_l1", F.smooth_l1_loss, "float"),
        ("bce", F.binary_cross_entropy, "prob"),
        ("bce_with_logits", F.binary_cross_entropy_with_logits, "prob"),
        ("cross_entropy", F.cross_entropy, "class"),
        ("nll", F.nll_loss, "class"),
    ],
)
def test_every_registry_loss_masks_missing_labels_like_torch(name, reference, kind):
    prediction = torch.randn(10, 4) if kind == "class" else torch.randn(10)
    if name == "bce":
        prediction = prediction.sigmoid()
    if name == "nll":
        prediction = prediction.log_softmax(-1)
    if kind == "class":
        target = torch.randint(0, 4, (10,))
        target[::3] = -100
        valid = target != -100
    else:
        target = torch.rand(10) if kind == "prob" else torch.randn(10)
        target[::3] = torch.nan
        valid = ~torch.isnan(target)
    values, mask = Task(name).per_sample_loss("t", prediction, target)
    assert torch.equal(mask, valid)
    expected = reference(prediction[valid], target[valid])
    torch.testing.assert_close(values[mask].mean(), expected)
    assert set(LOSSES) >= {name}


def test_missing_float_labels_leave_no_nan_in_the_gradient():
    prediction = torch.randn(6, requires_grad=True)
    target = torch.tensor([1.0, torch.nan, 2.0, torch.nan, 0.0, 1.0])
    values, mask = Task("mse").per_sample_loss("price", prediction, target)
    torch.where(mask, values, 0.0).sum().backward()
    assert torch.isfinite(prediction.grad).all()
    assert (prediction.grad[~mask] == 0).all()


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_a_zero_masked_loss_is_exactly_zero_with_no_gradient_at_missing_labels(name):
    """The reducer sums a ZeroMaskedLoss without masking it: every registry loss gives one, and
    must keep its promise."""
    generator = torch.Generator().manual_seed(1)
    is_class = name in ("cross_entropy", "nll")
    leaf = torch.randn((10, 4) if is_class else (10, 3), generator=generator, requires_grad=True)
    prediction = {"nll": leaf.log_softmax(-1), "bce": leaf.sigmoid()}.get(name, leaf)
    if is_class:
        target = torch.randint(0, 4, (10,), generator=generator)
        target[::3] = -7
    else:
        target = torch.rand(10, 3, generator=generator)
        target[::3, 1:] = torch.nan
    task = Task(name, ignore_index=-7) if is_class else Task(name)
    loss = task.per_sample_loss("t", prediction, target)
    assert isinstance(loss, ZeroMaskedLoss)
    missing = ~loss.mask
    assert missing.sum() == (4 if is_class else 8)
    assert torch.equal(loss.values[missing], torch.zeros(int(missing.sum())))
    loss.values.sum().backward()
    assert torch.isfinite(leaf.grad).all()
    assert (leaf.grad[missing] == 0).all()


@pytest.mark.parametrize("name", ["cross_entropy", "nll"])
@pytest.mark.parametrize("shape", [(6, 3), (2, 3, 2, 2)], ids=["classes", "class-map"])
def test_a_class_ruled_out_with_minus_infinity_is_no_loss_at_a_missing_label(name, shape):
    # Masked logits (a class ruled out with -inf), or the log of a probability of exactly 0,
    # give class 0 an infinite loss: a missing label is finite and has no say, as in torch.
    leaf = torch.randn(shape, generator=torch.Generator().manual_seed(0), requires_grad=True)
    ruled_out = torch.zeros(shape, dtype=torch.bool)
    ruled_out[:, 0] = True
    logits = leaf.masked_fill(ruled_out, -torch.inf)
    prediction = logits.log_softmax(1) if name == "nll" else logits
    target = torch.randint(1, 3, (shape[0], *shape[2:]), generator=torch.Generator())
    target.view(-1)[::3] = -100
    values, mask = Task(name).per_sample_loss("kind", prediction, target)
    reference = {"cross_entropy": F.cross_entropy, "nll": F.nll_loss}[name]
    torch.testing.assert_close(values[mask].mean(), reference(prediction, target))
    assert torch.isfinite(values).all() and (values[~mask] == 0).all()
    values.sum().backward()
    assert torch.isfinite(leaf.grad).all()


def test_a_non_finite_prediction_at_a_missing_class_label_is_a_non_finite_loss():
    # Its gradient would be NaN however it were masked: the nonfinite policy must see it.
    prediction = torch.randn(3, 4)
    prediction[1, 2] = torch.nan
    values, mask = Task("cross_entropy").per_sample_loss(
        "kind", prediction, torch.tensor([1, -100, 2])
    )
    assert mask.tolist() == [True, False, True]
    assert torch.isfinite(values).tolist() == [True, False, True]


def test_uint8_class_maps_with_a_void_label_match_torch():
    # PNG masks: uint8 maps, 255 for the void label.
    logits = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    target = torch.randint(0, 3, (2, 4, 4), generator=torch.Generator()).to(torch.uint8)
    target[:, 0] = 255
    values, mask = Task("cross_entropy", ignore_index=255).per_sample_loss("seg", logits, target)
    expected = F.cross_entropy(logits, target.long(), ignore_index=255)
    torch.testing.assert_close(values[mask].mean(), expected)


def test_bce_runs_outside_autocast_which_refuses_it_on_cuda(monkeypatch):
    # CUDA's autocast refuses F.binary_cross_entropy ("unsafe to autocast"); CPU's allows it.
    # This machine has no GPU: a stand-in for F.binary_cross_entropy refuses it under any
    # autocast as CUDA's does, and the CPU's autocast runs the real step around it.
    real = F.binary_cross_entropy

    def refused_under_autocast(*args, **kwargs):
        if torch.is_autocast_enabled("cpu"):
            raise RuntimeError("binary_cross_entropy and BCELoss are unsafe to autocast")
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "binary_cross_entropy", refused_under_autocast)
    probability = torch.tensor([0.2, 0.9, 0.5]).to(torch.bfloat16)
    target = torch.tensor([0.0, 1.0, torch.nan])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        values, mask = Task("bce").per_sample_loss("sold", probability, target)
    expected = real(probability.float()[:2], target[:2], reduction="none")
    assert values.dtype == torch.float32 and mask.tolist() == [True, True, False]
    torch.testing.assert_close(values[:2], expected)


def test_bce_is_non_finite_where_its_probability_is_and_refuses_one_out_of_range():
    prediction = torch.tensor([0.2, torch.nan, 0.7, torch.inf, torch.nan], requires_grad=True)
    target = torch.tensor([1.0, 0.0, torch.nan, 1.0, torch.nan])
    values, mask = Task("bce").per_sample_loss("sold", prediction, target)
    assert mask.tolist() == [True, True, False, True, False]
    assert torch.isfinite(values).tolist() == [True, False, True, False, False]
    torch.testing.assert_close(values[0], -torch.log(torch.tensor(0.2)))
    assert values[2] == 0
    with pytest.raises(ValueError, match=r"Task 'sold': loss 'bce' failed.*apply a sigmoid"):
        Task("bce").per_sample_loss("sold", torch.tensor([1.5, 0.5]), torch.tensor([1.0, 0.0]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("name", "labels", "outputs"),
    [
        ("mse", [100.3, torch.nan, 70000.0, 0.7], [100.0, 3.0, 65000.0, 0.5]),
        ("huber", [100.3, torch.nan, 70000.0, 0.7], [100.0, 3.0, 65000.0, 0.5]),
        ("bce_with_logits", [0.3001, torch.nan, 1.0, 0.7], [-0.8, 3.0, 2.0, 0.9]),
    ],
)
def test_a_half_precision_prediction_is_compared_with_the_exact_labels(
    name, labels, outputs, dtype
):
    """In float32, as under autocast: the labels are not rounded to the prediction's dtype (a
    label near 100 would move by up to 0.25 in bfloat16, one above 65504 be inf in float16)."""
    target = torch.tensor(labels)
    prediction = torch.tensor(outputs, dtype=dtype, requires_grad=True)
    values, mask = Task(name).per_sample_loss("price", prediction, target)
    assert values.dtype == torch.float32
    expected = LOSSES[name](prediction.detach().float(), target)
    torch.testing.assert_close(values[mask], expected[mask])
    values.sum().backward()
    assert prediction.grad.dtype == dtype and torch.isfinite(prediction.grad).all()


def test_an_ignore_index_the_target_dtype_cannot_hold_marks_no_label_missing():
    """-100 in uint8 would wrap around to 156 and drop every label 156."""

    def per_pixel(logits, target):
        return torch.nn.functional.cross_entropy(logits, target.long(), reduction="none")

    target, logits = torch.tensor([156, 3, 156, 200], dtype=torch.uint8), torch.randn(4, 256)
    assert Task(per_pixel).per_sample_loss("pixels", logits, target).mask.all()
    loss = Task(per_pixel, ignore_index=156).per_sample_loss("pixels", logits, target)
    assert loss.mask.tolist() == [False, True, False, True]


def test_a_zero_masked_loss_with_replaced_values_is_masked_again():
    """An override of task_losses that transforms the values (``+ 1`` here) breaks the promise of
    zeros at missing labels: the result is a plain MaskedLoss, which the reducer masks."""
    target = torch.tensor([1.0, torch.nan, 2.0])
    loss = Task("mse").per_sample_loss("price", torch.zeros(3), target)
    shifted = loss._replace(values=loss.values + 1)
    assert type(shifted) is MaskedLoss and torch.equal(shifted.mask, loss.mask)
    step = global_task_losses({"price": shifted}, {"price": Task("mse")})
    torch.testing.assert_close(step.losses, torch.tensor([(2.0 + 5.0) / 2]))


@pytest.mark.parametrize("name", ["mse", "bce_with_logits", "cross_entropy"])
def test_a_target_on_another_device_than_its_prediction_names_the_task(name):
    # The meta device stands in for a GPU (none here): any two devices fail alike.
    is_class = name == "cross_entropy"
    prediction = torch.empty((4, 3) if is_class else (4,), device="meta", requires_grad=True)
    target = torch.tensor([1, -100, 2, 0]) if is_class else torch.tensor([1.0, torch.nan, 0, 1])
    with pytest.raises(ValueError, match=rf"Task 'price': loss '{name}' failed .* device"):
        Task(name).per_sample_loss("price", prediction, target)


def test_elementwise_targets_count_each_element():
    prediction = torch.randn(3, 2)
    target = torch.tensor([[1.0, torch.nan], [0.0, 1.0], [torch.nan, torch.nan]])
    values, mask = Task("mse").per_sample_loss("xy", prediction, target)
    assert values.shape == (3, 2) and mask.sum() == 3


def test_a_callable_with_one_value_per_float_sample_counts_the_wholly_labelled_ones():
    def mean_abs(prediction, target):
        return (prediction - target).abs().mean(dim=-1)

    task = Task(mean_abs)
    target = torch.tensor([[1.0, 2.0], [torch.nan, torch.nan]])  # a soft label, a missing one
    values, mask = task.per_sample_loss("t", torch.zeros(2, 2), target)
    assert values.shape == (2,) and mask.tolist() == [True, False]
    assert values[0] == 1.5
    partly = torch.tensor([[1.0, 2.0], [torch.nan, 0.0]])
    with pytest.warns(UserWarning, match=r"Task 't'.*some samples have only some elements"):
        Task(mean_abs).per_sample_loss("t", torch.zeros(2, 2), partly)  # a new layout: checked
    assert task.per_sample_loss("t", torch.zeros(2, 2), partly).mask.tolist() == [True, False]


def test_a_callable_with_one_value_per_class_map_sees_ignore_index_and_counts_labelled_maps():
    seen = []

    def per_image_cross_entropy(logits, target):  # handles ignore_index=255 itself
        seen.append(target.clone())
        pixels = F.cross_entropy(logits, target, ignore_index=255, reduction="none").flatten(1)
        return pixels.sum(1) / (target != 255).flatten(1).sum(1).clamp(min=1)

    task = Task(per_image_cross_entropy, ignore_index=255)
    logits = torch.randn(3, 4, 2, 2, requires_grad=True)
    target = torch.randint(0, 4, (3, 2, 2))
    target[0, 0, 0] = 255  # an ignored pixel
    target[2] = 255  # an image without a label: the callable's mean there would be 0/0
    expected = per_image_cross_entropy(logits, target)[:2]
    for _ in range(2):  # the first call of a layout, then a later one
        seen.clear()
        values, mask = task.per_sample_loss("seg", logits, target)
        assert torch.equal(seen[-1][:2], target[:2]) and (seen[-1][2] == 0).all()
        assert mask.tolist() == [True, True, False] and torch.allclose(values[:2], expected)
    assert len(seen) == 1  # called once a step, after the first
    torch.where(mask, values, 0.0).sum().backward()
    assert logits.grad.isfinite().all() and (logits.grad[2] == 0).all()


def test_a_callable_learns_per_layout_how_many_dimensions_it_keeps_not_whether_it_reduces():
    def per_sequence_cross_entropy(logits, target):  # [N, C, T] logits, [N, T] tokens
        tokens = F.cross_entropy(logits, target, ignore_index=-1, reduction="none")
        return tokens.sum(1) / (target != -1).sum(1).clamp(min=1)

    task = Task(per_sequence_cross_entropy, ignore_index=-1)  # -1 pads the sequences
    short = torch.tensor([[2], [1]])  # the first batch has sequences of one token
    task.per_sample_loss("tokens", torch.randn(2, 3, 1), short)
    logits, padded = torch.randn(2, 3, 3), torch.tensor([[2, 1, -1], [1, -1, -1]])
    values, _ = task.per_sample_loss("tokens", logits, padded)
    assert torch.allclose(values, per_sequence_cross_entropy(logits, padded))  # padding left out


def test_an_elementwise_callable_on_classes_gets_a_class_at_a_missing_label():
    def cross_entropy(logits, target):
        return F.cross_entropy(logits, target, reduction="none")  # 255: out of range

    task = Task(cross_entropy, ignore_index=255)
    target = torch.tensor([1, 255, 0])
    values, mask = task.per_sample_loss("kind", torch.randn(3, 4), target)
    assert mask.tolist() == [True, False, True] and values.isfinite().all()


def test_loss_returning_a_scalar_is_refused_with_the_fix():
    task = Task(lambda prediction, target: F.mse_loss(prediction, target))
    with pytest.raises(ValueError, match=r"Task 'price'.*returned a scalar.*one value per sample"):
        task.per_sample_loss("price", torch.randn(4), torch.randn(4))


@pytest.mark.parametrize(
    ("task", "prediction", "target", "error", "message"),
    [
        (Task("cross_entropy"), torch.randn(4, 3), torch.rand(4), TypeError, "integer class"),
        (Task("mse"), torch.randn(4), torch.ones(4, dtype=torch.long), TypeError, "float targets"),
        (Task("mse"), torch.randn(4), torch.randn(5), ValueError, "does not match"),
        (Task("cross_entropy"), torch.randn(4, 3), torch.full((4,), 7), ValueError, "kind"),
    ],
)
def test_targets_of_the_wrong_dtype_or_shape_name_the_task(
    task, prediction, target, error, message
):
    with pytest.raises(error, match=message) as info:
        task.per_sample_loss("kind", prediction, target)
    assert "'kind'" in str(info.value)


@pytest.mark.parametrize(
    ("prediction_shape", "target_shape"),
    [
        ((4,), (4, 1)),
        ((4, 1), (4,)),
        ((4, 2), (4, 2)),
        ((2, 1, 3, 3), (2, 3, 3)),  # a dense regression's channel of 1
        ((2, 3, 3), (2, 1, 3, 3)),
        ((4,), (1, 4)),
        ((4,), (4, 1, 1)),
    ],
)
def test_a_float_target_may_differ_from_its_prediction_by_dimensions_of_one(
    prediction_shape, target_shape
):
    prediction, target = torch.randn(prediction_shape), torch.randn(target_shape)
    values, mask = Task("mse").per_sample_loss("price", prediction, target)
    assert values.shape == prediction.shape and mask.all()
    torch.testing.assert_close(
        values.flatten(), (prediction - target.view_as(prediction)).square().flatten()
    )


@pytest.mark.parametrize(
    ("prediction_shape", "target_shape"),
    [((6,), (3, 2)), ((3, 2), (2, 3)), ((2, 3), (3, 2, 1)), ((2, 1, 3), (3, 2))],
)
def test_a_float_target_of_the_right_size_but_another_shape_is_refused(
    prediction_shape, target_shape
):
    # Reshaping it would pair predictions with other samples' targets (a transposed [T, B]).
    task = Task("mse")
    with pytest.raises(
        ValueError, match=r"Task 'price'.*does not match.*only dimensions of size 1"
    ):
        task.per_sample_loss("price", torch.randn(prediction_shape), torch.randn(target_shape))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loss": "msee"}, "Unknown loss 'msee'"),
        ({"loss": "mse", "weight": -1.0}, "must be >= 0"),
        ({"loss": "mse", "weight": float("nan")}, "finite"),
        ({"loss": "mse", "reduction": "max"}, "'mean' or 'sum'"),
        ({"loss": 3}, "a loss name or a callable"),
        ({"loss": "cross_entropy", "ignore_index": -1.5}, "ignore_index must be an int.*-1.5"),
        ({"loss": "cross_entropy", "ignore_index": True}, "ignore_index must be an int.*True"),
    ],
)
def test_bad_task_arguments_fail_at_construction(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        Task(**kwargs)


@pytest.mark.parametrize(
    "index", [-1, np.int64(-1), torch.tensor(-1)], ids=["int", "numpy", "torch"]
)
def test_an_integer_ignore_index_of_any_kind_is_kept_as_an_int(index):
    task = Task("cross_entropy", ignore_index=index)
    assert task.ignore_index == -1 and type(task.ignore_index) is int
    _, mask = task.per_sample_loss("kind", torch.zeros(2, 3), torch.tensor([0, -1]))
    assert mask.tolist() == [True, False]


def test_a_float_target_of_another_dtype_is_cast_to_the_predictions():
    prediction = torch.randn(5)
    target = torch.randn(5, dtype=torch.float64)
    values, mask = Task("mse").per_sample_loss("price", prediction, target)
    assert values.dtype == prediction.dtype and mask.all()
    torch.testing.assert_close(values, (prediction - target.float()).square())


def test_a_zero_weight_is_allowed():
    assert Task("mse", weight=0.0).weight == 0.0


def test_an_infinite_weight_is_refused():
    with pytest.raises(ValueError, match="finite"):
        Task("mse", weight=float("inf"))


def test_boolean_class_targets_are_refused_with_the_fix():
    task = Task("cross_entropy")
    target = torch.tensor([True, False, True, False])
    with pytest.raises(TypeError, match=r"Task 'kind'.*integer class targets.*\.long\(\)"):
        task.per_sample_loss("kind", torch.randn(4, 2), target)


def test_a_callable_loss_of_another_shape_than_its_target_is_refused():
    def one_value_too_few(prediction, target):
        return (prediction - target).square().flatten()[:-1]

    task = Task(one_value_too_few)
    with pytest.raises(ValueError, match=r"Task 'xy'.*returned values of shape \(5,\)"):
        task.per_sample_loss("xy", torch.randn(2, 3), torch.randn(2, 3))


@pytest.mark.parametrize(
    ("task", "prediction", "target", "message"),
    [
        # 0/255 masks, labels {0, 1, 2}: bce_with_logits would train on, its loss unbounded.
        (Task("bce_with_logits"), torch.randn(4), torch.tensor([0.0, 255, 0, 255]), r"\[0, 1\]"),
        (Task("bce_with_logits"), torch.randn(3), torch.tensor([0.0, 1, 2]), r"/ 255"),
        (Task("cross_entropy"), torch.randn(4, 3), torch.ones(4, dtype=torch.int32), r"\.long\(\)"),
        (Task("cross_entropy"), torch.randn(4, 3), torch.ones(4, 1, dtype=torch.long), "squeeze"),
        (Task("cross_entropy"), torch.randn(4, 3), torch.tensor([0, -1, 2, 1]), "ignore_index=-1"),
        (
            Task("cross_entropy"),
            torch.randn(4, 3),
            torch.eye(3, dtype=torch.long)[[0, 1, 2, 0]],
            "argmax",
        ),
        (Task("cross_entropy"), torch.randn(4), torch.tensor([0, 1, 1, 0]), "bce_with_logits"),
        (Task("cross_entropy"), torch.randn(4, 1), torch.tensor([0, 1, 1, 0]), "bce_with_logits"),
        (Task("nll"), torch.randn(4, 1), torch.zeros(4, 1, dtype=torch.long), "bce_with_logits"),
        (Task("cross_entropy"), torch.randn(2, 1, 3, 3), torch.ones(2, 3, 3).long(), "binary"),
    ],
    ids=[
        "bce-0-255",
        "bce-0-1-2",
        "int32-classes",
        "classes-N-1",
        "missing-as-minus-one",
        "one-hot",
        "one-logit",
        "one-logit-head",
        "one-logit-head-nll-N-1",
        "one-class-map",
    ],
)
def test_common_target_mistakes_name_the_task_and_the_fix(task, prediction, target, message):
    with pytest.raises((ValueError, TypeError), match=message) as info:
        task.per_sample_loss("kind", prediction, target)
    assert "'kind'" in str(info.value)


def test_bce_with_logits_takes_probabilities_and_nan_as_a_missing_label():
    target = torch.tensor([0.0, 0.3, 1.0, torch.nan])
    values, mask = Task("bce_with_logits").per_sample_loss("sold", torch.zeros(4), target)
    assert mask.tolist() == [True, True, True, False] and values[:3].isfinite().all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        # ignore_index marks missing class labels; a float task's are NaN.
        ({"loss": "mse", "ignore_index": -1}, "mark missing labels with NaN"),
        ({"loss": "bce_with_logits", "ignore_index": -1}, "mark missing labels with NaN"),
        # torch's ignore_index in a partial: the library would count those labels as present.
        (
            {"loss": partial(F.cross_entropy, ignore_index=255, reduction="none")},
            r"ignore_index=255.*Task\(.*ignore_index=255\)",
        ),
        (
            {"loss": torch.nn.CrossEntropyLoss(reduction="none", ignore_index=-1)},
            r"ignore_index=-1 as its attribute.*Task\(.*ignore_index=-1\)",
        ),
        (
            {"loss": partial(F.cross_entropy, ignore_index=np.int64(-1), reduction="none")},
            r"ignore_index=-1 in its partial",
        ),
        ({"loss": "mse", "weight": torch.ones(3)}, "class weights.*partial"),
        ({"loss": "mse", "weight": True}, "finite number"),
    ],
    ids=["mse", "bce_with_logits", "partial", "module", "numpy", "class-weights", "bool"],
)
def test_task_arguments_that_would_train_on_something_else_are_refused(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        Task(**kwargs)


def test_a_partial_loss_is_named_by_its_function():
    assert Task(partial(F.l1_loss, reduction="none")).loss_name == "partial(l1_loss)"


def test_torchs_ignore_index_in_a_partial_is_taken_when_the_tasks_is_the_same():
    loss = partial(F.cross_entropy, ignore_index=255, reduction="none")
    assert Task(loss, ignore_index=255).ignore_index == 255
    module = torch.nn.CrossEntropyLoss(reduction="none")  # torch's default, -100, as the Task's
    assert Task(module).ignore_index == -100


@pytest.mark.parametrize("weight", [np.float32(2.0), torch.tensor(2.0), 2])
def test_a_real_weight_of_any_kind_is_kept_as_a_float(weight):
    task = Task("mse", weight=weight)
    assert task.weight == 2.0 and type(task.weight) is float


def test_a_prediction_squeezed_to_a_scalar_is_a_batch_of_one():
    """`.squeeze()` in a forward makes a last batch of one sample 0-d: still one sample."""
    prediction, target = torch.tensor(0.5, requires_grad=True), torch.tensor([2.0])
    values, mask = Task("mse").per_sample_loss("price", prediction, target)
    assert values.tolist() == [2.25] and mask.tolist() == [True]


def test_logits_and_a_class_squeezed_to_one_sample_are_a_batch_of_one():
    logits, target = torch.tensor([0.5, 2.0, -1.0]), torch.tensor(1)
    values, mask = Task("cross_entropy").per_sample_loss("kind", logits, target)
    assert values.shape == mask.shape == (1,) and mask.tolist() == [True]
    torch.testing.assert_close(values[0], F.cross_entropy(logits[None], target[None]))


@pytest.mark.parametrize(
    ("loss", "message"),
    [
        (lambda p, t: (F.mse_loss(p, t, reduction="none"), 0.0), "returned a tuple"),
        (lambda p, t: 1.0, "returned a float"),
    ],
    ids=["tuple", "float"],
)
def test_a_callable_that_returns_no_tensor_names_the_task(loss, message):
    with pytest.raises(TypeError, match=rf"Task 'price'.*{message}.*per-sample losses"):
        Task(loss).per_sample_loss("price", torch.randn(4), torch.randn(4))


def test_a_loss_class_instead_of_an_instance_is_refused_with_the_fix():
    with pytest.raises(TypeError, match=r"an instance.*CrossEntropyLoss\(reduction='none'\)"):
        Task(torch.nn.CrossEntropyLoss)


@pytest.mark.parametrize(
    ("loss", "target", "valid"),
    [
        (
            lambda p, t: (p - t).abs(),
            torch.tensor([0.5, torch.nan, -1.0, torch.nan, 2.0]),
            lambda t: ~t.isnan(),
        ),
        (
            partial(F.cross_entropy, reduction="none"),
            torch.tensor([2, -100, 0, -100, 1]),
            lambda t: t != -100,
        ),
    ],
    ids=["float", "class"],
)
def test_a_callables_values_at_missing_labels_never_reach_the_global_loss(loss, target, valid):
    # A callable sees 0.0 (class 0) at a missing label: its value there is no zero, and only
    # the reducer's masking keeps it out of the loss and its gradient.
    shape = (5,) if target.is_floating_point() else (5, 3)
    prediction = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    prediction.requires_grad_()
    task = Task(loss)
    step = global_task_losses({"t": task.per_sample_loss("t", prediction, target)}, {"t": task})
    keep = valid(target)
    expected = loss(prediction[keep], target[keep]).mean()
    torch.testing.assert_close(step.losses[0], expected.detach())
    (grad,) = torch.autograd.grad(step.local_terms.sum(), prediction)
    (expected_grad,) = torch.autograd.grad(expected, prediction)
    torch.testing.assert_close(grad, expected_grad)
