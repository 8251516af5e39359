"""LossBalanceMonitor: each condition fires on a run built to show it, once until it clears, and
a healthy run (the penguins demo) stays silent."""

import math
import re
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader

from lightning_lossagg import LossRecord, NonFiniteLossError, WeightingCallback
from lightning_lossagg.callbacks import LossBalanceError, LossBalanceMonitor, _balance_window
from lightning_lossagg.demos import PenguinsDataModule, PenguinsNet
from tests.callbacks._fits import assert_nested_equal
from tests.callbacks.test_loss_logger import CheckpointAmidAStep
from tests.models import ThreeTaskNet, make_batch
from tests.process_group import run_on_lightning_ranks

NAMES = ("price", "kind", "sold")
PENGUINS = ("species", "sex", "body_mass")


class ScriptedNet(L.LightningModule):
    """Plays back scripted task losses, weights and valid-sample counts as the mixin's loss
    records, one per step."""

    def __init__(self, losses, weights=None, counts=None, stage="train", weighting=None) -> None:
        super().__init__()
        self.stage, self.weighting = stage, weighting
        self.losses = losses
        self.weights = torch.ones_like(losses) if weights is None else weights
        self.counts = torch.ones_like(losses) if counts is None else counts
        self.task_names = NAMES[: losses.shape[1]]
        self.loss_record = None
        self.anchor = nn.Parameter(torch.zeros(()))

    def training_step(self, index, batch_idx):
        self.loss_record = LossRecord(
            self.stage, self.task_names, self.losses[index], self.weights[index], self.counts[index]
        )
        return self.anchor * 0.0

    def train_dataloader(self):
        return torch.utils.data.DataLoader(range(len(self.losses)), batch_size=None)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


class MemoryLogger(Logger):
    """Keeps what was logged, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, float]] = []

    name, version = "memory", 0

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append({**metrics, "step": step})

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def flags(self, condition: str, names=NAMES) -> dict[str, float]:
        """The latest logged flags of ``condition``."""
        key = f"train/monitor/{condition}/{names[0]}"
        row = [row for row in self.rows if key in row][-1]
        return {name: row[f"train/monitor/{condition}/{name}"] for name in names}


def _fit(
    model, monitor, log_every_n_steps=1, max_epochs=1, callbacks=(), ckpt_path=None, **settings
):
    logger = MemoryLogger()
    trainer = L.Trainer(
        max_epochs=max_epochs,
        log_every_n_steps=log_every_n_steps,
        logger=logger,
        callbacks=[monitor, *callbacks],
        enable_checkpointing=bool(callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        **settings,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, ckpt_path=ckpt_path)
    messages = [str(w.message) for w in caught if str(w.message).startswith("LossBalanceMonitor")]
    return logger, messages


class Ones(WeightingCallback):
    def task_weights(self, pl_module, step):
        return torch.ones_like(step.losses)


@pytest.mark.parametrize(
    ("method", "advice"),
    [(None, "use an adaptive weighting method"), (Ones, "Its weighting method keeps it so")],
    ids=["static", "a method"],
)
def test_a_dominating_task_is_reported_once_until_it_clears(method, advice):
    # 12 steps where "price" is 99% of the objective, 8 balanced steps, 12 dominated again.
    steps = [[99.0, 0.5, 0.5]] * 12 + [[1.0, 1.0, 1.0]] * 8 + [[99.0, 0.5, 0.5]] * 12
    weighting = method() if method else None
    net = ScriptedNet(torch.tensor(steps), weighting=weighting)
    callbacks = [weighting] if weighting else []
    logger, messages = _fit(net, LossBalanceMonitor(window=6), callbacks=callbacks)
    dominance = [m for m in messages if "of the objective at every one" in m]
    assert len(dominance) == 2
    assert all("task 'price' made up more than 90% of the objective" in m for m in dominance)
    assert all(advice in m for m in dominance)
    assert logger.flags("dominance") == {"price": 1.0, "kind": 0.0, "sold": 0.0}


def test_dominance_in_a_real_run_with_a_lopsided_static_weight():
    torch.manual_seed(0)
    logger = MemoryLogger()
    trainer = L.Trainer(
        max_epochs=3,
        log_every_n_steps=2,
        logger=logger,
        callbacks=[LossBalanceMonitor(window=8)],
        limit_val_batches=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(PenguinsNet(weights={"body_mass": 1000.0}), PenguinsDataModule(batch_size=32))
    messages = [str(w.message) for w in caught if str(w.message).startswith("LossBalanceMonitor")]
    assert len(messages) == 1 and "task 'body_mass' made up more than 90%" in messages[0]
    flags = logger.flags("dominance", PENGUINS)
    assert flags == {"species": 0.0, "sex": 0.0, "body_mass": 1.0}


def test_a_rising_loss_behind_a_falling_objective_is_reported():
    steps = torch.arange(40.0)
    rising = 0.1 + 0.01 * steps  # "kind" gets worse ...
    falling = 10.0 * 0.9**steps  # ... while "price" dominates the falling objective
    losses = torch.stack([falling, rising, torch.full_like(steps, 0.5)], 1)
    logger, messages = _fit(ScriptedNet(losses), LossBalanceMonitor(window=20))
    assert messages and all("the loss of task 'kind' rose by" in m for m in messages)
    assert len(messages) == 1
    # The rise reported is the later half's mean over the earlier half's, in the window judged.
    step = int(re.search(r"at step (\d+)", messages[0]).group(1))
    window = rising[step - 20 : step]
    rise = (window[10:].mean() / window[:10].mean()).item() - 1
    assert f"rose by {rise:.1%} over the last 20 steps" in messages[0]
    assert logger.flags("rising_loss") == {"price": 0.0, "kind": 1.0, "sold": 0.0}


def test_noise_is_not_a_rising_loss():
    generator = torch.Generator().manual_seed(0)
    noisy = 1.0 + 0.5 * torch.rand(200, 3, generator=generator)
    _, messages = _fit(ScriptedNet(noisy), LossBalanceMonitor(window=10))
    assert messages == []
    # A clearly falling objective does not make a noisy task's ups and downs a rising loss.
    noisy[:, 0] = 100.0 * 0.98 ** torch.arange(200.0)
    _, messages = _fit(ScriptedNet(noisy), LossBalanceMonitor(window=20))
    assert not [m for m in messages if "rose by" in m]


class DriftingWeights(WeightingCallback):
    """ "price" decays by half and "sold" doubles at every step; "kind" stays at 1."""

    def __init__(self):
        self.step = 0

    def task_weights(self, pl_module, step):
        self.step += 1
        return torch.tensor([0.5**self.step, 1.0, 2.0**self.step], dtype=step.losses.dtype)


def test_collapsing_and_exploding_weights_are_reported():
    batches = [make_batch(8, seed=seed, dtype=torch.float32) for seed in range(30)]
    model = ThreeTaskNet(lr=0.0)
    model.train_dataloader = lambda: torch.utils.data.DataLoader(batches, batch_size=None)
    monitor = LossBalanceMonitor(window=8, dominance_threshold=0.999999)
    logger = MemoryLogger()
    trainer = L.Trainer(
        max_epochs=1,
        log_every_n_steps=4,
        logger=logger,
        callbacks=[monitor, DriftingWeights()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.warns(UserWarning) as caught:
        trainer.fit(model)
    messages = [str(w.message) for w in caught if "LossBalanceMonitor" in str(w.message)]
    assert sum("weight of task 'price' fell to" in m for m in messages) == 1
    assert sum("weight of task 'sold' grew to" in m for m in messages) == 1
    assert not any("'kind'" in m for m in messages)
    assert logger.flags("weight_collapse") == {"price": 1.0, "kind": 0.0, "sold": 0.0}
    assert logger.flags("weight_explosion") == {"price": 0.0, "kind": 0.0, "sold": 1.0}


def test_a_nonfinite_loss_is_reported_and_can_raise():
    losses = torch.ones(10, 3)
    losses[6, 2] = math.inf
    _, messages = _fit(ScriptedNet(losses), LossBalanceMonitor(window=4, check_every_n_steps=3))
    assert len(messages) == 1 and "the loss of task 'sold' was NaN or infinite" in messages[0]
    with pytest.raises(LossBalanceError, match="step 7: the loss of task 'sold' was NaN"):
        _fit(ScriptedNet(losses), LossBalanceMonitor(window=4, raise_on=["nonfinite_loss"]))


@pytest.mark.parametrize("policy", ["skip", "drop_task"])
def test_a_nonfinite_loss_the_mixin_skipped_or_left_out_is_reported(policy):
    # The real mixin: the bad loss never reaches a record (a skipped step has none, a dropped
    # task has no count), yet the monitor must see it.
    batches = [make_batch(6, seed=seed, dtype=torch.float32) for seed in range(6)]
    batches[2][1]["price"][1] = torch.inf
    model = ThreeTaskNet()
    model.nonfinite = policy
    model.train_dataloader = lambda: DataLoader(batches, batch_size=None)
    monitor = LossBalanceMonitor(window=2, check_every_n_steps=1, raise_on=["nonfinite_loss"])
    with pytest.raises(LossBalanceError, match="the loss of task 'price' was NaN or infinite"):
        _fit(model, monitor)


def _rank_fit_until_the_monitor_raises(rank: int) -> tuple[str, int] | None:
    """One rank of a 2-process run: rank 1 alone gets an infinite price label at step 2, which
    the mixin skips (its flags are global); the monitor raises on it."""
    batches = [make_batch(4 + rank, seed=10 * rank + s, dtype=torch.float32) for s in range(6)]
    if rank == 1:
        batches[2][1]["price"][1] = torch.inf
    model = ThreeTaskNet()
    model.nonfinite = "skip"
    monitor = LossBalanceMonitor(window=2, check_every_n_steps=1, raise_on=["nonfinite_loss"])
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=len(batches),
        callbacks=[monitor],
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the mixin's warning of the skipped step
            trainer.fit(model, DataLoader(batches, batch_size=None))
    except LossBalanceError as error:
        return str(error), trainer.global_step
    return None


@pytest.mark.ddp
def test_raise_on_stops_every_rank_together():
    """Ranks other than zero neither warn nor log, but with ``raise_on`` they judge the (global)
    records too and raise with rank zero: alone, rank zero's error would leave rank 1 in the next
    step's all-reduce."""
    ranks = run_on_lightning_ranks(_rank_fit_until_the_monitor_raises)
    assert ranks[0] is not None and ranks[0] == ranks[1]
    message, global_step = ranks[0]
    # The skipped step (batch 2) leaves no record: the check at the next one reports it.
    assert message.startswith("LossBalanceMonitor at step 4: the loss of task 'price' was NaN")
    assert global_step == 4


def test_steps_without_labels_are_neither_nonfinite_nor_a_collapse():
    # NaN is how the mixin records a task with no valid sample in the step: its count is 0, and
    # so is its weight (LossRecord.weights). "kind" has labels at every other step only.
    losses = torch.ones(9, 3)
    counts = torch.ones(9, 3)
    losses[1::2, 1], counts[1::2, 1] = torch.nan, 0.0
    logger, messages = _fit(ScriptedNet(losses, counts=counts), LossBalanceMonitor(window=4))
    assert messages == []
    assert logger.flags("nonfinite_loss") == {"price": 0.0, "kind": 0.0, "sold": 0.0}
    assert logger.flags("weight_collapse") == {"price": 0.0, "kind": 0.0, "sold": 0.0}


def test_a_mean_weight_leaves_out_the_steps_without_a_sample():
    # "kind" has a sample at every step of the first window, then at one step in four. Its
    # weight, 1 where it has one, holds: a mean over every step would read 0.25 of it and report
    # a collapse below 0.5.
    losses, counts = torch.ones(12, 3), torch.ones(12, 3)
    for step in range(4, 12):
        if step % 4:
            losses[step, 1], counts[step, 1] = torch.nan, 0.0
    logger, messages = _fit(
        ScriptedNet(losses, counts=counts), LossBalanceMonitor(window=4, collapse_fraction=0.5)
    )
    assert messages == []
    assert logger.flags("weight_collapse") == {"price": 0.0, "kind": 0.0, "sold": 0.0}


def test_the_penguins_demo_is_healthy():
    # The demo's configuration (20 epochs, batch 32, logging and so checking at every step);
    # validation does not matter to the monitor.
    torch.manual_seed(0)
    trainer = L.Trainer(
        max_epochs=20,
        log_every_n_steps=1,
        logger=False,
        callbacks=[LossBalanceMonitor(window=20)],
        limit_val_batches=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(PenguinsNet(), PenguinsDataModule(batch_size=32))
    assert trainer.global_step == 160
    assert [str(w.message) for w in caught if "LossBalanceMonitor" in str(w.message)] == []


def test_conditions_are_evaluated_only_every_check_interval(monkeypatch):
    evaluations = []
    evaluate = _balance_window.LossWindow.evaluate

    def counted(self, thresholds):
        evaluations.append(self.seen)
        return evaluate(self, thresholds)

    monkeypatch.setattr(_balance_window.LossWindow, "evaluate", counted)
    logger, _ = _fit(
        ScriptedNet(torch.ones(20, 3)), LossBalanceMonitor(window=4), log_every_n_steps=5
    )
    assert evaluations == [5, 10, 15, 20]
    # The flags are logged at the trainer's logging interval only, not at every step.
    assert len([row for row in logger.rows if "train/monitor/dominance/price" in row]) == 20 // 5
    # check_every_n_steps, where given, takes precedence over the logging interval.
    evaluations.clear()
    monitor = LossBalanceMonitor(window=4, check_every_n_steps=3)
    _fit(ScriptedNet(torch.ones(20, 3)), monitor, log_every_n_steps=5)
    assert evaluations == list(range(3, 21, 3))


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"dominance_threshold": 1.0}, r"`dominance_threshold` must be a number in \(0.0, 1.0\)"),
        ({"window": 1}, "`window` must be an int >= 2"),
        ({"window": 10.0}, "`window` must be an int >= 2"),
        ({"check_every_n_steps": 0}, "`check_every_n_steps` must be an int >= 1"),
        ({"check_every_n_steps": True}, "`check_every_n_steps` must be an int >= 1"),
        ({"rise_tolerance": -0.1}, r"`rise_tolerance` must be a number in \[0.0, inf\)"),
        ({"collapse_fraction": 0.0}, "`collapse_fraction` must be a number in"),
        ({"explosion_factor": 1.0}, "`explosion_factor` must be a number in"),
        ({"explosion_factor": math.inf}, "`explosion_factor` must be a number in"),
        ({"raise_on": ["collapse"]}, r"unknown condition\(s\) \['collapse'\]; use \["),
        ({"raise_on": "dominance"}, r"must be a list of conditions, e.g. \['dominance'\]"),
    ],
)
def test_bad_arguments_are_refused(arguments, message):
    with pytest.raises(ValueError, match=message):
        LossBalanceMonitor(**arguments)


def test_state_survives_a_checkpoint_and_the_key_names_the_settings():
    steps = [[99.0, 0.5, 0.5]] * 8
    monitor = LossBalanceMonitor(window=4)
    _fit(ScriptedNet(torch.tensor(steps)), monitor)
    state = monitor.state_dict()
    assert state["active"] == [("dominance", "price")]
    torch.testing.assert_close(state["window"]["reference_weights"], torch.ones(3))

    resumed = LossBalanceMonitor(window=4)
    resumed.load_state_dict(state)
    # Still dominated after the resume: already reported, so no second warning.
    _, messages = _fit(ScriptedNet(torch.tensor(steps)), resumed)
    assert messages == []
    assert monitor.state_key == LossBalanceMonitor(window=4).state_key
    # The key of a default monitor is the one checkpoints were written with before
    # check_every_n_steps and raise_on were in it; their state (no window) still loads.
    assert monitor.state_key == (
        "LossBalanceMonitor{'window': 4, 'dominance': 0.9, 'rise_tolerance': 0.1, "
        "'collapse_fraction': 0.01, 'explosion_factor': 100.0}"
    )
    earlier = LossBalanceMonitor(window=4)
    earlier.load_state_dict({"active": state["active"], "reference_weights": torch.ones(3)})
    _, messages = _fit(ScriptedNet(torch.tensor(steps)), earlier)
    assert messages == []  # still the dominance reported before
    for other in (
        LossBalanceMonitor(window=5),
        LossBalanceMonitor(window=4, raise_on=["nonfinite_loss"]),
        LossBalanceMonitor(window=4, check_every_n_steps=2),
    ):
        assert monitor.state_key != other.state_key  # two of them can watch one run


def _flags_and_warnings(root, ckpt_path=None):
    """A 2-epoch scripted run of 6 steps an epoch where price dominates, checkpointed at each
    epoch's end (midway through the window's third fill): the flags logged in epoch 1, and
    the warnings there."""
    losses = torch.tensor([[99.0, 0.5, 0.5]] * 6)
    monitor = LossBalanceMonitor(window=4, check_every_n_steps=2)
    checkpoint = ModelCheckpoint(root, every_n_epochs=1, save_top_k=-1)
    logger, messages = _fit(ScriptedNet(losses), monitor, 1, 2, [checkpoint], ckpt_path)
    rows = [row for row in logger.rows if "train/monitor/dominance/price" in row]
    # (A batch's step is the global step after it: epoch 1's are 7 to 12; a logged row's step
    # counts the batches before it: epoch 1's are 6 to 11.)
    flags = [row for row in rows if row["step"] >= 6]
    late = [m for m in messages if int(re.search(r"at step (\d+)", m).group(1)) > 6]
    return flags, late


def test_the_state_is_a_copy_of_the_window():
    monitor = LossBalanceMonitor(window=4)
    _fit(ScriptedNet(torch.tensor([[99.0, 0.5, 0.5]] * 3)), monitor)
    state = monitor.state_dict()
    before = state["window"]["buffer"].clone()
    _fit(ScriptedNet(torch.tensor([[1.0, 2.0, 3.0]] * 3)), monitor)
    assert torch.equal(state["window"]["buffer"], before)


def test_a_resumed_run_flags_and_reports_as_an_uninterrupted_one(tmp_path):
    # The window is in the checkpoint: after a resume the monitor judges the same steps (it
    # judged nothing for a whole window, logging 0 for the dominance it held active).
    flags, messages = _flags_and_warnings(tmp_path / "full")
    resumed_flags, resumed_messages = _flags_and_warnings(
        tmp_path / "resumed", ckpt_path=tmp_path / "full" / "epoch=0-step=6.ckpt"
    )
    assert len(flags) >= 5 and all(row["train/monitor/dominance/price"] for row in flags)
    assert resumed_flags == flags
    assert resumed_messages == messages


class ScriptedByIndex(ScriptedNet):
    """Plays back step ``batch_idx`` whatever the loader yields: a fit resumed amid an epoch
    from a plain loader starts it again, and its batch index goes on."""

    def training_step(self, index, batch_idx):
        return super().training_step(batch_idx, batch_idx)


def test_a_fit_resumed_amid_an_accumulated_step_judges_it_whole(tmp_path):
    # Saved after micro-batch 2, the first of optimizer step 1: the resumed fit's figure of
    # that step must hold micro-batch 2 too, as the uninterrupted fit's does.
    losses = torch.tensor([[1.0, 2.0, 3.0], [2.0, 1.0, 3.0], [5.0, 0.5, 0.5], [0.5, 5.0, 0.5]])
    losses = torch.cat([losses, losses.flip(0)])
    path = tmp_path / "amid.ckpt"
    states = []
    for ckpt_path, callbacks in ((None, [CheckpointAmidAStep(2, path)]), (path, [])):
        monitor = LossBalanceMonitor(window=4)  # the window holds every step
        _fit(
            ScriptedByIndex(losses),
            monitor,
            callbacks=callbacks,
            ckpt_path=ckpt_path,
            accumulate_grad_batches=2,
        )
        states.append(monitor.state_dict())
    uninterrupted, resumed = states
    assert uninterrupted["window"]["seen"] == 4
    assert_nested_equal(resumed, uninterrupted)


def test_a_model_without_the_mixin_is_refused():
    class Plain(L.LightningModule):
        def training_step(self, batch, batch_idx):
            return None

        def configure_optimizers(self):
            return None

    trainer = L.Trainer(callbacks=[LossBalanceMonitor()], logger=False, max_steps=1)
    with pytest.raises(TypeError, match="LossBalanceMonitor needs a MultiTaskMixin model"):
        trainer.fit(Plain(), train_dataloaders=torch.utils.data.DataLoader([0], batch_size=None))


def test_steps_skipped_before_the_fit_are_not_reported_as_a_new_nonfinite_loss():
    # The model skipped a step before this fit began: only a skip during the fit is news.
    model = ScriptedNet(torch.ones(6, 3))
    model.skipped_steps, model.last_nonfinite_tasks = 1, ("kind",)
    logger, messages = _fit(model, LossBalanceMonitor(window=4, check_every_n_steps=1))
    assert messages == []
    assert logger.flags("nonfinite_loss") == {"price": 0.0, "kind": 0.0, "sold": 0.0}


def test_a_flag_returns_to_zero_once_its_condition_clears():
    steps = [[99.0, 0.5, 0.5]] * 6 + [[1.0, 1.0, 1.0]] * 6
    logger, _ = _fit(ScriptedNet(torch.tensor(steps)), LossBalanceMonitor(window=4))
    key = "train/monitor/dominance/price"
    logged = [row[key] for row in logger.rows if key in row]
    assert 1.0 in logged and logged[-1] == 0.0


def test_the_collapse_message_gives_the_weight_as_a_share_of_its_first_mean():
    weights = torch.ones(8, 3)
    weights[4:, 0] = 0.002
    monitor = LossBalanceMonitor(window=4, check_every_n_steps=8)
    _, messages = _fit(ScriptedNet(torch.ones(8, 3), weights), monitor)
    expected = (weights[4:, 0].mean() / weights[:4, 0].mean()).item()
    assert len(messages) == 1
    assert f"the weight of task 'price' fell to {expected:.2%} of its mean" in messages[0]


def test_under_accumulation_the_window_and_the_flags_count_optimizer_steps():
    # Micro-batches alternate between price dominating and not: no micro-batch window is
    # dominated throughout, but every optimizer step's sample-weighted figures are (share
    # 49.55 / 50.55). Counted per micro-batch, the window of 4 "steps" was 2 optimizer steps
    # long and the flags were logged twice per step.
    micro_batches = torch.tensor([[99.0, 0.5, 0.5], [0.1, 0.5, 0.5]] * 4)
    logger, messages = _fit(
        ScriptedNet(micro_batches), LossBalanceMonitor(window=4), accumulate_grad_batches=2
    )
    assert len(messages) == 1 and "task 'price' made up more than 90%" in messages[0]
    assert "at step 4:" in messages[0]  # after the fourth optimizer step, which fills it
    flag_steps = [row["step"] for row in logger.rows if "train/monitor/dominance/price" in row]
    assert flag_steps == [0, 1, 2, 3]


def test_a_record_of_another_stage_is_not_judged_as_a_training_step():
    # A training_step that made no record of its own leaves validation's latest on the model:
    # it is no training step of the window.
    steps = torch.tensor([[99.0, 0.5, 0.5]] * 8)
    _, messages = _fit(ScriptedNet(steps, stage="val"), LossBalanceMonitor(window=4))
    assert messages == []


THRESHOLDS = _balance_window.Thresholds(
    dominance=0.9, rise_tolerance=0.1, collapse_fraction=0.01, explosion_factor=100.0
)


def _window(size, losses, weights=None):
    losses = torch.tensor(losses, dtype=torch.float64)
    weights = torch.ones_like(losses) if weights is None else torch.tensor(weights).double()
    window = _balance_window.LossWindow(size)
    for row, weight in zip(losses, weights, strict=True):
        window.add(LossRecord("train", ("a", "b"), row, weight, torch.ones_like(row)))
    return window


def test_an_odd_window_compares_its_disjoint_halves():
    # window 5, halves of 2: early mean(1, 2) = 1.5, late mean(4, 5) = 4.5, ratio 3 (the middle
    # step belongs to neither half).
    window = _window(5, [[1.0, 50.0], [2.0, 40.0], [3.0, 30.0], [4.0, 20.0], [5.0, 10.0]])
    _, values = window.evaluate(THRESHOLDS)
    assert values[1][0] == pytest.approx(3.0)


def test_a_rise_is_clear_against_the_halves_sample_standard_errors():
    # "a" rises by 0.35; the halves' standard errors (n - 1 variance) are 0.1 each, so the bar is
    # 3 * sqrt(0.02) = 0.424 > 0.35: not a clear rise (with the population variance, 0.3: a rise).
    window = _window(4, [[1.0, 10.0], [1.2, 10.1], [1.35, 5.0], [1.55, 5.1]])
    flags, values = window.evaluate(THRESHOLDS)
    assert values[1][0] == pytest.approx(1.45 / 1.1)
    assert flags[1][0] is False


def test_a_nan_weight_is_a_weight_explosion():
    weights = [[1.0, 1.0], [1.0, 1.0], [float("nan"), 1.0], [1.0, 1.0]]
    flags, _ = _window(2, [[1.0, 1.0]] * 4, weights).evaluate(THRESHOLDS)
    assert flags[3] == [True, False]


def test_a_nonfinite_loss_is_reported_at_the_next_check_only():
    window = _window(2, [[float("nan"), 1.0], [1.0, 1.0]])
    flags, _ = window.evaluate(THRESHOLDS)
    assert flags[4] == [True, False]
    ones = torch.ones(2, dtype=torch.float64)
    window.add(LossRecord("train", ("a", "b"), ones, ones, ones))
    flags, _ = window.evaluate(THRESHOLDS)
    assert flags[4] == [False, False]


def test_a_skip_marked_before_a_checkpoint_is_reported_after_the_resume():
    window = _window(2, [[1.0, 1.0]])
    window.mark_nonfinite([1])  # a skipped step, not yet evaluated when the checkpoint is made
    restored = _balance_window.LossWindow(2)
    restored.load_state_dict(window.state_dict())
    flags, _ = restored.evaluate(THRESHOLDS)
    assert flags[4] == [False, True]


def test_under_accumulation_a_step_is_the_sample_weighted_mean_of_its_micro_batches():
    # Two micro-batches per optimizer step, with different sample counts, "kind" without a
    # sample in the second: per task the step's loss is the count-weighted mean of the
    # micro-batches', its count their sum, its weight the mean over the micro-batches that had it.
    nan = math.nan
    losses = torch.tensor([[1.0, 2.0, 3.0], [4.0, nan, 6.0]] * 4)
    weights = torch.tensor([[1.0, 2.0, 0.5], [3.0, 7.0, 1.5]] * 4)
    counts = torch.tensor([[1.0, 3.0, 2.0], [3.0, 0.0, 2.0]] * 4)
    monitor = LossBalanceMonitor(window=4)
    _fit(ScriptedNet(losses, weights, counts), monitor, accumulate_grad_batches=2)
    window = monitor.state_dict()["window"]
    assert window["seen"] == 4
    by_hand = torch.tensor(
        [
            [(1 * 1.0 + 3 * 4.0) / 4, 2.0, (2 * 3.0 + 2 * 6.0) / 4],  # losses
            [(1.0 + 3.0) / 2, 2.0, (0.5 + 1.5) / 2],  # weights
            [4.0, 3.0, 4.0],  # counts
        ]
    )
    for step in window["buffer"]:  # [steps, (losses, weights, counts), tasks]
        torch.testing.assert_close(step, by_hand)


def test_a_monitor_reused_after_a_fit_aborted_amid_an_accumulated_step_starts_clean():
    # Micro-batch 0 waits for its optimizer step, micro-batch 1 raises: the waiting record must
    # not join the next fit's first step.
    aborted = [make_batch(6, seed=s, dtype=torch.float32) for s in (1, 2)]
    aborted[1][1]["price"][0] = torch.inf
    monitor = LossBalanceMonitor(window=2)
    settings = dict(
        max_steps=1,
        logger=False,
        callbacks=[monitor],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.raises(NonFiniteLossError):
        L.Trainer(accumulate_grad_batches=2, **settings).fit(
            ThreeTaskNet(), DataLoader(aborted, batch_size=None)
        )
    model = ThreeTaskNet()
    batch = make_batch(6, seed=3, dtype=torch.float32)
    L.Trainer(**settings).fit(model, DataLoader([batch], batch_size=None))
    window = monitor.state_dict()["window"]
    assert window["seen"] == 1
    torch.testing.assert_close(window["buffer"][0, 0], model.loss_record.losses)
