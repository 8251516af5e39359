"""Every loss-based weighting method through real fits: the recorded weights against the
functional formulas, a real 2-process run against one process, exact resume, gradient
accumulation, the YAML configs through the real CLI, and the checks every method shares."""

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_lossagg import MaskedLoss, NonFiniteLossError, distributed
from lightning_lossagg.callbacks import (
    DWA,
    FAMO,
    GLS,
    IMTLL,
    LossLogger,
    LossScaling,
    UncertaintyWeighting,
)
from tests.callbacks._fits import (
    ParametersAfterEachStep,
    SignedPriceNet,
    fit_config,
    signed_price_batches,
    trainer,
)
from tests.callbacks._loss_based import (
    DDP_EPOCHS,
    METHODS,
    STATEFUL,
    STATIC_WEIGHTS,
    assert_nested_equal,
    at_step,
    concatenated_ddp_batches,
    ddp_batches,
    ddp_rank,
    expected_record_weights,
    fit_method,
    global_losses,
    training_batches,
)
from tests.models import ThreeTaskNet, make_batch, one_batch_loader
from tests.process_group import run_on_lightning_ranks

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PENGUIN_TASKS = ("species", "sex", "body_mass")
LOGGED_STATE = {
    "uncertainty_weighting": "log_var",
    "loss_scaling": "loss_level",
    "imtl_l": "log_scale",
    "famo": "logit",
}


def _assert_weights_match(steps: list[dict], expected: list[torch.Tensor]) -> None:
    assert len(steps) == len(expected)
    for index, (step, weights) in enumerate(zip(steps, expected, strict=True)):
        torch.testing.assert_close(
            step["weights"], weights, rtol=1e-12, atol=1e-12, msg=f"step {index}"
        )


def _assert_adaptive(steps: list[dict]) -> None:
    """The weights moved away from the static ones: a test of them can fail."""
    static = [torch.where(step["valid"], STATIC_WEIGHTS, 0.0) for step in steps]
    assert any(
        not torch.allclose(step["weights"], weights)
        for step, weights in zip(steps, static, strict=True)
    )


@pytest.mark.parametrize("name", list(METHODS))
def test_weights_equal_the_functional_formula_on_the_recorded_global_losses(name):
    callback, recorder, _ = fit_method(name, training_batches(), max_epochs=4)
    steps = recorder.steps
    assert len(steps) == 8
    assert not all(bool(step["valid"].all()) for step in steps)  # a task without labels, too
    _assert_adaptive(steps)
    _assert_weights_match(steps, expected_record_weights(name, steps, callback))


def test_famos_eps_reaches_its_weights_and_its_logit_update():
    # The reference takes the callback's eps: a callback that dropped it weighed with 1e-8.
    callback = FAMO(lr=0.1, eps=0.5)
    _, recorder, _ = fit_method("famo", training_batches(), max_epochs=2, callback=callback)
    steps = recorder.steps
    _assert_adaptive(steps)
    _assert_weights_match(steps, expected_record_weights("famo", steps, callback))


@pytest.mark.parametrize("name", ["gls", "loss_scaling"])
def test_the_tensor_arithmetic_of_other_devices_equals_the_formula_too(name, monkeypatch):
    # On the CPU these weigh in Python floats: the tensor arithmetic that CUDA and other devices
    # run is run here on CPU tensors, against the same reference.
    monkeypatch.setattr(distributed, "PYTHON_FLOAT_DEVICES", frozenset())
    test_weights_equal_the_functional_formula_on_the_recorded_global_losses(name)


@pytest.mark.parametrize("name", list(METHODS))
def test_accumulating_two_micro_batches_per_optimizer_step(name):
    callback, recorder, _ = fit_method(
        name, training_batches(4), max_epochs=3, accumulate_grad_batches=2
    )
    steps = recorder.steps
    assert [step["optimizer_step"] for step in steps[:4]] == [0, 0, 1, 1]
    _assert_adaptive(steps)
    _assert_weights_match(steps, expected_record_weights(name, steps, callback))


@pytest.mark.parametrize("name", list(METHODS))
def test_the_weights_a_method_returns_are_finite_for_a_task_without_a_label(name):
    """Each of these methods declares ``finite_weights``: the mixin leaves a task without a valid
    sample the method's own weight (times a term of exactly 0), which must then be finite."""
    callback = METHODS[name]()
    assert callback.finite_weights
    returned: list[torch.Tensor] = []
    task_weights = callback.task_weights
    callback.task_weights = lambda *args: returned.append(task_weights(*args)) or returned[-1]
    _, recorder, model = fit_method(name, training_batches(), max_epochs=4, callback=callback)
    without_label = [not bool(step["valid"].all()) for step in recorder.steps]
    assert sum(without_label) == 4 and len(returned) == 8
    for weights in returned:
        assert torch.isfinite(weights).all()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.ddp
def test_two_processes_equal_one_process_on_the_concatenated_batches():
    # One launch of two processes serves all seven methods (a launch costs seconds; a fit with
    # Lightning's DDP strategy inside it, a fraction of one).
    rank0, rank1 = ddp_batches()
    assert not torch.equal(rank0[0][0][:4], rank1[0][0][:4])  # each rank has its own data
    names = list(METHODS)
    ranks = run_on_lightning_ranks(ddp_rank, names)
    for name in names:
        callback, recorder, model = fit_method(name, concatenated_ddp_batches(), DDP_EPOCHS)
        single = torch.stack([step["weights"] for step in recorder.steps])
        on_rank0, on_rank1 = ranks[0][name], ranks[1][name]
        assert torch.equal(on_rank0["weights"], on_rank1["weights"]), name
        # The mixin's one all-reduce per step, and no other collective, on both ranks; FAMO's
        # re-evaluation adds one, by design.
        expected = ["all_reduce"] * (2 if name == "famo" else 1)
        for on_rank in (on_rank0, on_rank1):
            assert all(calls == expected for calls in on_rank["collectives_per_step"]), name
        _assert_adaptive(recorder.steps)
        torch.testing.assert_close(on_rank0["weights"], single, rtol=0, atol=1e-12, msg=name)
        for key, value in model.state_dict().items():
            torch.testing.assert_close(on_rank0["parameters"][key], value, rtol=0, atol=1e-12)
        _assert_nested_close(on_rank1["state"], callback.state_dict(), name)


@pytest.mark.ddp
def test_two_processes_accumulating_two_micro_batches_equal_one_process():
    # The learned methods step once per optimizer step from the micro-batches' global losses
    # (FAMO re-evaluates the last one): the same on 2 ranks as on the concatenated batches.
    names = ["uncertainty_weighting", "imtl_l", "famo"]
    ranks = run_on_lightning_ranks(ddp_rank, names, 2)
    for name in names:
        callback, recorder, model = fit_method(
            name, concatenated_ddp_batches(), DDP_EPOCHS, accumulate_grad_batches=2
        )
        single = torch.stack([step["weights"] for step in recorder.steps])
        assert torch.equal(ranks[0][name]["weights"], ranks[1][name]["weights"]), name
        torch.testing.assert_close(ranks[0][name]["weights"], single, rtol=0, atol=1e-12)
        for key, value in model.state_dict().items():
            torch.testing.assert_close(ranks[0][name]["parameters"][key], value, rtol=0, atol=1e-12)
        _assert_nested_close(ranks[1][name]["state"], callback.state_dict(), name)


def _assert_nested_close(actual, expected, path: str) -> None:
    if isinstance(expected, dict):
        for key in expected:
            _assert_nested_close(actual[key], expected[key], f"{path}[{key!r}]")
    elif isinstance(expected, torch.Tensor):
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-12, equal_nan=True, msg=path)
    elif isinstance(expected, list | tuple):
        for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
            _assert_nested_close(a, e, f"{path}[{index}]")
    else:
        assert actual == expected, path


@pytest.mark.parametrize("name", STATEFUL)
def test_resuming_from_a_checkpoint_equals_an_uninterrupted_run(name, tmp_path):
    validation = [make_batch(4, seed=99)]
    full_callback, full, full_model = fit_method(
        name, training_batches(), 4, val_batches=validation
    )
    # Saved at the end of validation, before the epoch-end hooks: the hardest moment for
    # state kept per epoch.
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_on_train_epoch_end=False)
    _, first, _ = fit_method(
        name,
        training_batches(),
        2,
        val_batches=validation,
        extra_callbacks=(checkpoint,),
        enable_checkpointing=True,
    )
    resumed_callback, second, resumed_model = fit_method(
        name, training_batches(), 4, val_batches=validation, ckpt_path=tmp_path / "last.ckpt"
    )

    assert len(first.steps) == len(second.steps) == 4
    _assert_adaptive(second.steps)
    for index, (resumed, uninterrupted) in enumerate(
        zip(first.steps + second.steps, full.steps, strict=True)
    ):
        assert torch.equal(resumed["weights"], uninterrupted["weights"]), f"step {index}"
    assert_nested_equal(resumed_callback.state_dict(), full_callback.state_dict())
    assert_nested_equal(resumed_model.state_dict(), full_model.state_dict())

    # The method's state lives in the callback: the model loads without it, unchanged in shape.
    loaded = ThreeTaskNet.load_from_checkpoint(tmp_path / "last.ckpt")
    assert loaded.state_dict().keys() == ThreeTaskNet().state_dict().keys()


@pytest.mark.parametrize("name", list(METHODS))
def test_the_penguins_config_runs_through_the_cli(name, monkeypatch):
    monkeypatch.setattr("sys.argv", ["lossagg"])
    cli = fit_config(name)
    method_type = type(METHODS[name]())
    assert cli.model.weighting is not None and type(cli.model.weighting) is method_type
    assert cli.trainer.global_step > 0
    metrics = cli.trainer.callback_metrics
    for task in PENGUIN_TASKS:
        assert torch.isfinite(metrics[f"train_epoch/weight/{task}"]), task
        assert f"val/loss/{task}" in metrics
    if name in LOGGED_STATE:  # logged per step (see test_the_step_logs_carry_the_method_state)
        assert set(cli.model.weighting.state_to_log()) == {LOGGED_STATE[name]}


@pytest.mark.parametrize("name", list(METHODS))
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
    with pytest.raises(TypeError, match="Add MultiTaskMixin to the model's bases"):
        trainer.fit(Plain(), train_dataloaders=one_batch_loader(make_batch(2, seed=0)))


@pytest.mark.parametrize("name", list(METHODS))
def test_the_state_key_is_built_from_the_arguments(name):
    callback = METHODS[name]()
    same = type(callback)(**callback.method_arguments)
    assert same.state_key == callback.state_key
    assert callback.state_key.startswith(type(callback).__name__)
    assert all(str(value) in callback.state_key for value in callback.method_arguments.values())


def test_the_step_logs_carry_the_method_state(tmp_path):
    # Through LossLogger into a real logger: train/log_var/<task> per step.
    from lightning.pytorch.loggers import CSVLogger

    callback = METHODS["uncertainty_weighting"]()
    model = ThreeTaskNet()
    trainer = L.Trainer(
        max_steps=3,
        log_every_n_steps=1,
        logger=CSVLogger(tmp_path),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback, LossLogger()],
    )
    trainer.fit(model, one_batch_loader(make_batch(6, seed=0, dtype=torch.float32)))
    header = (Path(trainer.logger.log_dir) / "metrics.csv").read_text().splitlines()[0]
    for task in ("price", "kind", "sold"):
        assert f"train/log_var/{task}" in header.split(",")


@pytest.mark.parametrize("home", ["device", "host"])
def test_the_learned_values_follow_torch_adam_per_task(home):
    # UW and IMTL-L (on the host), FAMO and GradNorm (on the device) step one Adam per task, a
    # task left out not stepped.
    from lightning_lossagg.callbacks._task_parameters import HostTaskParameters, TaskParameters

    weight_decay = 0.01 if home == "device" else 0.0  # UW and IMTL-L use no weight decay
    if home == "device":
        parameters = TaskParameters(lr=0.1, weight_decay=weight_decay)
        parameters.set_num_tasks(3, "test")
        parameters.values(torch.zeros(3, dtype=torch.float64))
    else:
        parameters = HostTaskParameters(lr=0.1)
        parameters.set_num_tasks(3, "test")
    scalars = [torch.zeros((), dtype=torch.float64, requires_grad=True) for _ in range(3)]
    optimizers = [torch.optim.Adam([s], lr=0.1, weight_decay=weight_decay) for s in scalars]
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        gradient = torch.randn(3, generator=generator, dtype=torch.float64)
        taking_part = torch.rand(3, generator=generator) < 0.7
        if home == "device":
            parameters.step(gradient, taking_part)
        else:
            parameters.step(gradient.tolist(), taking_part.tolist())
        for task in range(3):
            if taking_part[task]:
                scalars[task].grad = gradient[task].clone()
                optimizers[task].step()
    values = parameters.snapshot()
    torch.testing.assert_close(values, torch.stack([s.detach() for s in scalars]))
    assert len(set(values.tolist())) == 3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_learned_values_are_kept_in_float32_for_half_precision_losses(dtype):
    # FAMO's logits and GradNorm's weights take many Adam steps of lr ~0.025: in bf16 a value
    # near 1 moves in steps of 2^-7, so most updates would round away.
    from lightning_lossagg.callbacks._task_parameters import TaskParameters

    parameters = TaskParameters(lr=1e-3)
    parameters.set_num_tasks(3, "test")
    values = parameters.values(torch.ones(3, dtype=dtype))
    assert values.dtype == torch.float32
    parameters.values(torch.ones(3, dtype=dtype)).fill_(1.0)
    parameters.step(torch.ones(3, dtype=dtype), torch.ones(3, dtype=torch.bool))
    assert (parameters.values(torch.ones(3, dtype=dtype)) < 1.0).all()  # moved by 1e-3


@pytest.mark.parametrize("method", [UncertaintyWeighting, IMTLL])
def test_a_checkpoint_amid_an_accumulation_keeps_the_earlier_micro_batches(method):
    # UW and IMTL-L average each task's losses over the micro-batches of an optimizer step; a
    # checkpoint taken after the first of two must carry it to the resumed run.
    model = ThreeTaskNet()
    micro_batches = [
        global_losses([2.0, 1.0, 0.5], [True, False, True]),
        global_losses([1.0, 3.0, 0.5]),
    ]
    uninterrupted, resumed = method(lr=0.1), method(lr=0.1)
    for callback in (uninterrupted, resumed):
        callback.setup(None, model, "fit")
    for callback in (uninterrupted, resumed):
        callback.task_weights(model, micro_batches[0])
    state = resumed.state_dict()
    resumed = method(lr=0.1)
    resumed.setup(None, model, "fit")
    resumed.load_state_dict(state)
    for callback in (uninterrupted, resumed):
        callback.task_weights(model, micro_batches[1])
        callback.on_before_optimizer_step(None, model, None)
    scales = uninterrupted.state_dict()["scales"]  # after the step (the logs show before it)
    assert_nested_equal(resumed.state_dict()["scales"], scales)
    # The first micro-batch counted: not the scales of the second alone.
    alone = method(lr=0.1)
    alone.setup(None, model, "fit")
    alone.task_weights(model, micro_batches[1])
    alone.on_before_optimizer_step(None, model, None)
    assert not torch.equal(alone.state_dict()["scales"]["values"], scales["values"])


@pytest.mark.parametrize("method", [UncertaintyWeighting, IMTLL], ids=["UW", "IMTLL"])
def test_a_negative_micro_batch_loss_stops_a_learned_scale_under_accumulation(method):
    # The step's sum over its micro-batches may be >= 0 (or another number than any had): each
    # micro-batch's loss is checked, and the one that was < 0 is named.
    batches = signed_price_batches(2, negative_at=0)
    batches[1][1]["price"] = batches[1][1]["price"] * 100  # outweighs the negative one
    negative = batches[0][1]["price"].nanmean().item()  # the first micro-batch's price loss
    assert negative < 0 < negative + batches[1][1]["price"].nanmean().item()
    model = SignedPriceNet().double()
    with pytest.raises(ValueError, match=rf"'price' \({negative:g}\).*step 0"):
        trainer([method()], max_epochs=1, accumulate_grad_batches=2).fit(
            model, torch.utils.data.DataLoader(batches, batch_size=None)
        )


@pytest.mark.parametrize("method", [UncertaintyWeighting, IMTLL], ids=["UW", "IMTLL"])
def test_a_negative_micro_batch_loss_saved_amid_an_accumulation_is_refused_after_resuming(method):
    # The checkpoint keeps the lowest loss of the micro-batches before it, not only their sum.
    micro_batches = [global_losses([-1.0, 1.0, 0.5]), global_losses([3.0, 1.0, 0.5])]
    model = at_step(0)
    saved = method(lr=0.1)
    saved.setup(None, ThreeTaskNet(), "fit")
    saved.task_weights(model, micro_batches[0])
    resumed = method(lr=0.1)
    resumed.setup(None, ThreeTaskNet(), "fit")
    resumed.load_state_dict(saved.state_dict())
    resumed.task_weights(model, micro_batches[1])
    with pytest.raises(ValueError, match=r"'price' \(-1\) was < 0"):
        resumed.on_before_optimizer_step(model.trainer, model, None)


@pytest.mark.parametrize(
    "method",
    [lambda: DWA(window_steps=1), LossScaling, GLS, FAMO],
    ids=["DWA", "LS", "GLS", "FAMO"],
)
def test_a_minus_infinite_loss_is_the_mixins_non_finite_error_not_a_bound_error(method):
    # -inf is below every method's bound on the losses; the mixin's error (and advice) is the one.
    batches = signed_price_batches(3, negative_at=5)
    batches[1][1]["price"][:] = -torch.inf
    with pytest.raises(NonFiniteLossError, match=r"task 'price'"):
        trainer([method()], max_epochs=1).fit(
            SignedPriceNet().double(), torch.utils.data.DataLoader(batches, batch_size=None)
        )


@pytest.mark.parametrize("method", [UncertaintyWeighting, IMTLL], ids=["UW", "IMTLL"])
def test_a_negative_loss_stops_a_learned_scale_before_the_optimizer_step(method):
    # L < 0 makes the objective unbounded below in s: s ran away, and the weight with it.
    batches = signed_price_batches(3, negative_at=1)
    parameters = ParametersAfterEachStep()
    model = SignedPriceNet().double()
    with pytest.raises(ValueError, match=r"learns a log-scale .* 'price' \(-[0-9.]+\).*step 1"):
        trainer([method(), parameters], max_epochs=1).fit(
            model, torch.utils.data.DataLoader(batches, batch_size=None)
        )
    assert len(parameters.parameters) == 1  # step 1's update never applied
    assert all(torch.equal(v, parameters.parameters[-1][k]) for k, v in model.state_dict().items())


class PerfectlyFittedSoldNet(ThreeTaskNet):
    """'sold' is fitted perfectly: its per-sample losses are exactly 0."""

    def per_sample_losses(self, predictions, targets):
        losses = dict(super().per_sample_losses(predictions, targets))
        losses["sold"] = MaskedLoss(predictions["sold"] * 0, losses["sold"].mask)
        return losses


@pytest.mark.parametrize(
    ("method", "bound"), [(UncertaintyWeighting, -30.0), (IMTLL, 30.0)], ids=["UW", "IMTLL"]
)
def test_a_loss_that_stays_at_0_drives_its_learned_scale_to_the_bound_not_overflow(method, bound):
    # At L = 0 the gradient in s is constant: an Adam step of about lr each, for ever (e^s
    # overflowed after 710 steps at lr=1, about 71k at the default lr). With lr=10 the bound is
    # met at once and overflow (|s| > 709) would come after 71 steps.
    batches = [make_batch(6, seed=seed) for seed in range(80)]
    callback = method(lr=10.0)
    trainer([callback], max_epochs=1).fit(
        PerfectlyFittedSoldNet().double(), torch.utils.data.DataLoader(batches, batch_size=None)
    )
    scales = callback.state_dict()["scales"]["values"]
    assert scales[2] == bound
    assert scales[:2].min() >= -30 and scales[:2].max() <= 30


@pytest.mark.parametrize("method", [UncertaintyWeighting, IMTLL], ids=["UW", "IMTLL"])
def test_an_instance_that_loads_a_state_weighs_by_the_loaded_values_not_its_own(method):
    # A callback reused for a second fit (e.g. resumed from a checkpoint after the first fit
    # stopped amid a step) has weights of its own s at hand; the loaded s must replace them.
    model = ThreeTaskNet()
    losses = global_losses([2.0, 1.0, 0.5])
    trained = method(lr=0.1)
    trained.setup(None, model, "fit")
    for _ in range(3):
        trained.task_weights(model, losses)
        trained.on_before_optimizer_step(None, model, None)
    state = trained.state_dict()
    reused, fresh = method(lr=0.1), method(lr=0.1)
    for callback in (reused, fresh):
        callback.setup(None, model, "fit")
    initial = reused.task_weights(model, losses)  # the weights of s = 0, computed once per s
    for callback in (reused, fresh):
        callback.load_state_dict(state)
    expected = fresh.task_weights(model, losses)
    assert not torch.equal(expected, initial)  # the loaded s moved
    assert torch.equal(reused.task_weights(model, losses), expected)
