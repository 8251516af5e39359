"""Non-finite task losses under a real 2-rank DDP run: the same decision on every rank.

Rank 1 alone gets an infinite price target at step 1; each policy must act on both ranks together
(a rank that skips alone, or raises alone, hangs the other in the next collective)."""

import multiprocessing
import traceback
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_lossagg import NonFiniteLossError, callbacks, distributed
from lightning_lossagg.mixin import _nonfinite_message
from tests.callbacks._fits import ParametersAfterEachStep
from tests.models import (
    ThreeTaskNet,
    concat_batches,
    make_batch,
    one_batch_loader,
    quiet_trainer,
    reference_task_losses,
)

STEPS, BAD_STEP = 3, 1


def _rank_batches(rank: int) -> list:
    batches = [make_batch(4 + rank, seed=10 * rank + step) for step in range(STEPS)]
    if rank == 1:
        batches[BAD_STEP][1]["price"][0] = torch.inf
    return batches


class PolicyNet(ThreeTaskNet):
    def __init__(self, out_dir: str, nonfinite: str) -> None:
        super().__init__()
        self.nonfinite, self.out_dir = nonfinite, out_dir
        self.history: list = []

    def train_dataloader(self):
        return DataLoader(_rank_batches(self.trainer.global_rank), batch_size=None)

    def on_before_optimizer_step(self, optimizer):
        super().on_before_optimizer_step(optimizer)
        grads = {n: None if p.grad is None else p.grad.clone() for n, p in self.named_parameters()}
        self.history.append(("grads", self.global_step, grads))

    def on_train_batch_end(self, outputs, batch, batch_idx):
        params = {n: p.detach().clone() for n, p in self.named_parameters()}
        self.history.append(("params", batch_idx, params))
        torch.save(
            {"history": self.history, "skipped": self.skipped_steps},
            Path(self.out_dir) / f"rank{self.global_rank}.pt",
        )


def _fit(out_dir: str, nonfinite: str, error_file: str) -> None:
    try:
        model = PolicyNet(out_dir, nonfinite)
        L.Trainer(
            accelerator="cpu",
            devices=2,
            strategy="ddp_spawn",
            max_steps=STEPS,
            precision="64-true",
            use_distributed_sampler=False,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        ).fit(model)
    except Exception:  # the test reads what was raised
        Path(error_file).write_text(traceback.format_exc())


def _fit_with_timeout(tmp_path: Path, nonfinite: str, timeout: float = 120) -> str:
    """Run the DDP fit in a child process; a hang fails the test instead of blocking it."""
    error_file = tmp_path / "error.txt"
    process = multiprocessing.get_context("spawn").Process(
        target=_fit, args=(str(tmp_path), nonfinite, str(error_file))
    )
    process.start()
    process.join(timeout)
    if process.is_alive():
        process.kill()
        pytest.fail(f"nonfinite={nonfinite!r}: the DDP run hung for {timeout} s")
    return error_file.read_text() if error_file.exists() else ""


def _params_after(history: list, batch_idx: int) -> dict:
    return next(p for kind, i, p in history if kind == "params" and i == batch_idx)


@pytest.mark.ddp
def test_raise_stops_both_ranks_with_an_error_naming_task_step_and_rank(tmp_path):
    error = _fit_with_timeout(tmp_path, "raise")
    assert NonFiniteLossError.__name__ in error
    assert f"global step {BAD_STEP}: task 'price' on rank(s) 1" in error


@pytest.mark.ddp
def test_skip_leaves_parameters_unchanged_on_both_ranks_and_training_continues(tmp_path):
    error = _fit_with_timeout(tmp_path, "skip")
    assert not error, error
    for rank in (0, 1):
        saved = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        history = saved["history"]
        assert saved["skipped"] == 1
        before, at_bad = _params_after(history, BAD_STEP - 1), _params_after(history, BAD_STEP)
        after = _params_after(history, BAD_STEP + 1)
        for name in before:
            assert torch.equal(before[name], at_bad[name]), name
        assert any(not torch.equal(at_bad[n], after[n]) for n in at_bad)


@pytest.mark.ddp
def test_drop_task_updates_the_other_tasks_as_if_the_bad_one_was_absent(tmp_path):
    error = _fit_with_timeout(tmp_path, "drop_task")
    assert not error, error
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=False)["history"]
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=False)["history"]
    # Reference: plain torch at the parameters before the bad step, on the concatenated batch,
    # objective kind + sold only (price dropped for this step).
    model = ThreeTaskNet().double()
    model.load_state_dict(_params_after(rank0, BAD_STEP - 1))
    batch = concat_batches(_rank_batches(0)[BAD_STEP], _rank_batches(1)[BAD_STEP])
    losses = reference_task_losses(model, batch)
    (losses["kind"] + losses["sold"]).backward()
    for history in (rank0, rank1):
        grads = next(g for kind, step, g in history if kind == "grads" and step == BAD_STEP)
        for name, parameter in model.named_parameters():
            expected = parameter.grad if parameter.grad is not None else torch.zeros_like(parameter)
            torch.testing.assert_close(grads[name], expected, atol=1e-10, rtol=1e-8, msg=name)


@pytest.mark.parametrize(
    ("sold_loss", "method"),
    [("bce_with_logits", None), ("mse", None), ("bce_with_logits", "mgda")],
    ids=["price-alone", "price-stacked", "terms-apart"],
)
def test_a_nan_prediction_at_a_missing_label_of_a_distance_is_a_nonfinite_loss(sold_loss, method):
    """Masking could hide it from the loss but not from the gradient (0 · NaN is NaN): the step
    reports it, however the tasks' sums are taken, before the optimizer trains on NaN."""

    class NanPriceAtMissingLabel(ThreeTaskNet):
        def forward_heads(self, shared):
            predictions = super().forward_heads(shared)
            price = predictions["price"]  # row 0's price label is missing (make_batch)
            return {**predictions, "price": torch.cat([price[:1] * torch.nan, price[1:]])}

    batch = make_batch(6, seed=3)
    assert torch.isnan(batch[1]["price"][0])
    model = NanPriceAtMissingLabel(sold_loss=sold_loss)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    weighting = [callbacks.MGDA()] if method else None
    with pytest.raises(NonFiniteLossError, match=r"global step 0: task 'price' on rank\(s\) 0"):
        quiet_trainer(1, callbacks=weighting).fit(model, one_batch_loader(batch))
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, before[name]), name


@pytest.mark.parametrize(
    ("task", "sold_loss"),
    [("kind", "bce_with_logits"), ("sold", "bce_with_logits"), ("sold", "bce")],
    ids=["cross_entropy", "bce_with_logits", "bce"],
)
def test_a_nan_prediction_at_a_missing_label_of_any_registry_loss_is_a_nonfinite_loss(
    task, sold_loss
):
    """The class losses and the binary cross-entropies take a placeholder label there and are
    multiplied by the mask, so the NaN stays (cross-entropy's gradient through log_softmax, and
    any masked loss's, would be NaN); bce's NaN probability does not fail PyTorch's range check."""

    class NanAtRowOne(ThreeTaskNet):
        def forward_heads(self, shared):
            predictions = super().forward_heads(shared)
            if sold_loss == "bce":
                predictions["sold"] = predictions["sold"].sigmoid()
            bad = predictions[task]
            return {**predictions, task: torch.cat([bad[:1], bad[1:2] * torch.nan, bad[2:]])}

    inputs, targets = make_batch(6, seed=3)
    targets["sold"][1] = torch.nan  # row 1's kind label is missing too (make_batch)
    model = NanAtRowOne(sold_loss=sold_loss)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(NonFiniteLossError, match=rf"global step 0: task '{task}' on rank\(s\) 0"):
        quiet_trainer(1).fit(model, one_batch_loader((inputs, targets)))
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, before[name]), name


def test_a_run_of_skips_becomes_an_error():
    class AlwaysBad(ThreeTaskNet):
        def task_losses(self, batch):
            losses = super().task_losses(batch)
            losses["kind"] = losses["kind"]._replace(values=losses["kind"].values * torch.nan)
            return losses

    model = AlwaysBad()
    model.nonfinite, model.max_consecutive_skips = "skip", 3
    loader = DataLoader(
        [make_batch(4, seed=s, dtype=torch.float32) for s in range(5)], batch_size=None
    )
    trainer = L.Trainer(
        max_epochs=1, logger=False, enable_progress_bar=False, enable_checkpointing=False
    )
    with pytest.raises(NonFiniteLossError, match=r"3 consecutive steps .* max_consecutive_skips=3"):
        trainer.fit(model, train_dataloaders=loader)
    assert model.skipped_steps == 3


def test_a_fit_that_stopped_amid_a_run_of_skips_leaves_no_step_flag_to_the_next_fit():
    # The second fit's finite first step ends the run: its one non-finite step is skipped, as in
    # a fresh model (the first fit stopped amid a step whose flags were never cleared).
    model = ThreeTaskNet()
    model.nonfinite, model.max_consecutive_skips = "skip", 2
    first = [make_batch(4, seed=s, dtype=torch.float32) for s in range(3)]
    first[1][1]["price"][0] = first[2][1]["price"][0] = torch.inf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(NonFiniteLossError, match="2 consecutive steps"):
            quiet_trainer(1, steps=3, precision="32-true").fit(
                model, DataLoader(first, batch_size=None)
            )
        second = [make_batch(4, seed=s, dtype=torch.float32) for s in range(3, 5)]
        second[1][1]["price"][0] = torch.inf
        quiet_trainer(1, steps=2, precision="32-true").fit(
            model, DataLoader(second, batch_size=None)
        )
    assert model.skipped_steps == 3


def test_skips_apart_do_not_add_up_to_a_run():
    batches = [make_batch(4, seed=s, dtype=torch.float32) for s in range(3)]
    for bad in (0, 2):  # a good step between them
        batches[bad][1]["price"][0] = torch.inf
    model = ThreeTaskNet()
    model.nonfinite, model.max_consecutive_skips = "skip", 2
    trainer = quiet_trainer(1, steps=len(batches), precision="32-true")
    with pytest.warns(UserWarning, match="The step was skipped"):
        trainer.fit(model, DataLoader(batches, batch_size=None))
    assert trainer.global_step == len(batches) and model.skipped_steps == 2


@pytest.mark.parametrize("policy", ["skip", "drop_task"])
def test_skips_are_counted_per_optimizer_step_under_accumulation(policy):
    """Steps of 2 micro-batches, the first of each non-finite: every optimizer step is such a
    step, so the third raises (the second micro-batch's finite loss does not end the run). A
    step whose every micro-batch was non-finite counts once."""
    batches = [make_batch(4, seed=s, dtype=torch.float32) for s in range(12)]
    for bad in range(0, 12, 2):
        batches[bad][1]["price"][0] = torch.inf
    model = ThreeTaskNet()
    model.nonfinite, model.max_consecutive_skips = policy, 3
    trainer = quiet_trainer(1, steps=6, precision="32-true", accumulate_grad_batches=2)
    with warnings.catch_warnings(), pytest.raises(NonFiniteLossError, match="3 consecutive"):
        warnings.simplefilter("ignore")
        trainer.fit(model, DataLoader(batches, batch_size=None))
    assert trainer.global_step == 2 and model.skipped_steps == 3

    batches = [make_batch(4, seed=s, dtype=torch.float32) for s in range(8)]
    for bad in range(4):  # the whole first step
        batches[bad][1]["price"][0] = torch.inf
    model = ThreeTaskNet()
    model.nonfinite, model.max_consecutive_skips = policy, 2
    trainer = quiet_trainer(1, steps=2, precision="32-true", accumulate_grad_batches=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, DataLoader(batches, batch_size=None))
    assert trainer.global_step == 2 and model.skipped_steps == 1


@pytest.mark.parametrize(("micro_batches", "steps_before"), [(2, 1), (3, 1), (4, 8)])
def test_a_skipped_accumulated_step_leaves_the_evaluation_weights_of_the_step_before(
    micro_batches, steps_before
):
    """Its first micro-batches were finite and weighed (RLW draws new weights every step), its
    last was not: validation weighs as after the step before, as if it had never run (with
    three, the weights of the skipped step's first micro-batch are those to forget; with four
    after eight steps, its first micro-batch's weights are the 33rd kept, and the 32 before are
    folded together then)."""

    def evaluation_weights(steps: int) -> Tensor:
        batches = [make_batch(6, seed=s) for s in range((steps_before + 1) * micro_batches)]
        batches[-1][1]["price"][1] = torch.inf  # the skipped step's last micro-batch
        model = ThreeTaskNet().double()
        model.nonfinite = "skip"
        trainer = quiet_trainer(
            1, steps, callbacks=[callbacks.RLW()], accumulate_grad_batches=micro_batches
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(model, DataLoader(batches[: micro_batches * steps], batch_size=None))
        assert model.skipped_steps == (steps > steps_before)
        trainer.validate(model, one_batch_loader(make_batch(5, seed=9)), verbose=False)
        return model.loss_record.weights

    skipped, before = evaluation_weights(steps_before + 1), evaluation_weights(steps_before)
    torch.testing.assert_close(skipped, before, rtol=0, atol=0)


@pytest.mark.parametrize("nonfinite", ["skip", "drop_task"])
def test_the_last_nonfinite_tasks_name_the_bad_step_s_tasks_only(nonfinite):
    # LossBalanceMonitor reports them: the task whose loss was not finite, not every task.
    batches = [make_batch(4, seed=s, dtype=torch.float32) for s in range(2)]
    batches[1][1]["price"][0] = torch.inf
    model = ThreeTaskNet()
    model.nonfinite = nonfinite
    trainer = quiet_trainer(1, steps=2, precision="32-true")
    with pytest.warns(UserWarning, match="'price'"):
        trainer.fit(model, DataLoader(batches, batch_size=None))
    assert model.skipped_steps == 1 and model.last_nonfinite_tasks == ("price",)


class AdamNet(ThreeTaskNet):
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)


@pytest.mark.parametrize(
    ("nonfinite", "bad", "warning"),
    [
        ("skip", "price", "The step was skipped"),
        ("drop_task", "every task", "The batch was left out"),
        ("drop_task", "price, the others without a label", "The batch was left out"),
    ],
)
def test_a_skipped_step_leaves_adams_parameters_alone_and_the_next_step_trains(
    nonfinite, bad, warning
):
    batches = [make_batch(4, seed=s, dtype=torch.float32) for s in range(3)]
    if bad == "every task":  # every task's loss is NaN: drop_task has nothing left to take
        batches[1][0][0] = torch.nan
    else:
        batches[1][1]["price"][0] = torch.inf
    if bad == "price, the others without a label":
        batches[1][1]["kind"][:] = -100
        batches[1][1]["sold"][:] = torch.nan
    model, parameters = AdamNet(), ParametersAfterEachStep()
    model.nonfinite = nonfinite
    trainer = quiet_trainer(1, steps=len(batches), precision="32-true", callbacks=[parameters])
    with pytest.warns(UserWarning, match=warning):
        trainer.fit(model, DataLoader(batches, batch_size=None))
    before, skipped, after = parameters.parameters
    # A zero gradient would still move them: Adam's momentum of step 0.
    assert all(torch.equal(before[name], skipped[name]) for name in before)
    assert all(not torch.equal(skipped[name], after[name]) for name in skipped)


def test_a_skipped_step_moves_none_of_the_optimizers_a_manual_step_calls():
    class TwoOptimizers(ThreeTaskNet):
        automatic_optimization = False

        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            trunk_optimizer, heads_optimizer = self.optimizers()
            trunk_optimizer.zero_grad()
            heads_optimizer.zero_grad()
            self.manual_backward(loss)
            trunk_optimizer.step()
            heads_optimizer.step()

        def configure_optimizers(self):
            return [
                torch.optim.Adam(self.trunk.parameters(), lr=0.01),
                torch.optim.Adam(self.heads.parameters(), lr=0.01),
            ]

    batches = [make_batch(4, seed=s, dtype=torch.float32) for s in range(3)]
    batches[1][1]["price"][0] = torch.inf
    model, parameters = TwoOptimizers(), ParametersAfterEachStep()
    model.nonfinite = "skip"
    steps = 2 * len(batches)  # each optimizer's step counts
    trainer = quiet_trainer(1, steps=steps, precision="32-true", callbacks=[parameters])
    with pytest.warns(UserWarning, match="The step was skipped"):
        trainer.fit(model, DataLoader(batches, batch_size=None))
    before, skipped, after = parameters.parameters
    assert all(torch.equal(before[name], skipped[name]) for name in before)  # heads too
    assert all(not torch.equal(skipped[name], after[name]) for name in skipped)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"nonfinite": "ignore"}, "'raise', 'skip' or 'drop_task'"),
        ({"max_consecutive_skips": 0}, "an int >= 1 or None"),
        ({"max_consecutive_skips": 2.5}, r"an int >= 1 or None \(never raise\), got 2\.5"),
        ({"max_consecutive_skips": True}, r"an int >= 1 or None \(never raise\), got True"),
    ],
)
def test_bad_policy_arguments_are_refused(kwargs, message):
    from lightning_lossagg import MultiTaskMixin

    class Net(MultiTaskMixin, L.LightningModule):
        pass

    with pytest.raises(ValueError, match=message):
        Net(tasks={"a": "mse"}, **kwargs)


@pytest.mark.parametrize(
    ("nonfinite", "logged"),
    [
        ("skip", [0.0, 1.0, 1.0]),  # steps 0, 2 and 3 were logged; step 1 was skipped
        ("drop_task", [0.0, 1.0, 1.0, 1.0]),  # every step; step 1 without its price loss
    ],
)
def test_skipped_steps_are_counted_in_the_logs(tmp_path, nonfinite, logged):
    import csv

    from lightning.pytorch.loggers import CSVLogger

    from lightning_lossagg.callbacks import LossLogger

    batches = [make_batch(4, seed=s, dtype=torch.float32) for s in range(4)]
    batches[1][1]["price"][0] = torch.inf
    model = ThreeTaskNet()
    model.nonfinite = nonfinite
    trainer = L.Trainer(
        max_epochs=1,
        logger=CSVLogger(tmp_path),
        callbacks=[LossLogger(plot=False)],
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_checkpointing=False,
    )
    with pytest.warns(UserWarning, match=f"The step was .*nonfinite='{nonfinite}'"):
        trainer.fit(model, train_dataloaders=DataLoader(batches, batch_size=None))
    with open(f"{trainer.logger.log_dir}/metrics.csv") as handle:
        skipped = [
            float(r["train/skipped_steps"])
            for r in csv.DictReader(handle)
            if r["train/skipped_steps"]
        ]
    assert skipped == logged


@pytest.mark.parametrize("bad", [0, 1], ids=["first micro-batch bad", "second micro-batch bad"])
@pytest.mark.parametrize(
    "method",
    [
        callbacks.UncertaintyWeighting,
        callbacks.IMTLL,
        lambda: callbacks.GradNorm(lr=0.1),
        lambda: callbacks.FAMO(lr=0.5),
    ],
    ids=["UncertaintyWeighting", "IMTLL", "GradNorm", "FAMO"],
)
def test_a_skipped_optimizer_step_moves_neither_the_model_nor_the_methods_learned_state(
    method, bad
):
    # Two micro-batches per optimizer step; one has a non-finite loss: the whole step is skipped,
    # and the method's once-per-step update from the finite one must be left out too.
    def fit(poisoned: bool) -> tuple[bool, dict]:
        batches = [make_batch(6, seed=seed, dtype=torch.float32) for seed in range(2)]
        if poisoned:
            batches[bad][1]["price"][1] = torch.inf
        model = ThreeTaskNet()
        model.nonfinite = "skip"
        before = [p.detach().clone() for p in model.parameters()]
        callback = method()
        trainer = quiet_trainer(1, precision="32-true", callbacks=[callback])
        trainer.accumulate_grad_batches = 2
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "The step was skipped"
            trainer.fit(model, DataLoader(batches, batch_size=None))
        unchanged = all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
        state = callback.state_dict()
        state.pop("initial_losses", None)  # GradNorm's L(0): losses it saw, kept (documented)
        return unchanged, _plain(state)

    unchanged, skipped_state = fit(poisoned=True)
    moved, trained_state = fit(poisoned=False)
    never_stepped = method()
    never_stepped.setup(None, ThreeTaskNet(), "fit")
    assert unchanged and not moved
    initial = never_stepped.state_dict()
    initial.pop("initial_losses", None)
    assert skipped_state == _plain(initial)  # Adam's step counts too
    assert skipped_state != trained_state  # a step that is taken moves the method's state


def _plain(state: object) -> object:
    """A state_dict with tensors as lists, for ==."""
    if isinstance(state, dict):
        return {key: _plain(value) for key, value in state.items()}
    return state.tolist() if isinstance(state, torch.Tensor) else state


def test_the_skip_counts_are_kept_in_the_checkpoint(tmp_path):
    batches = [make_batch(6, seed=seed, dtype=torch.float32) for seed in range(3)]
    batches[2][1]["price"][1] = torch.inf  # the last step: one skip, and in a row
    model = ThreeTaskNet()
    model.nonfinite = "skip"
    trainer = quiet_trainer(1, steps=3, precision="32-true")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "The step was skipped"
        trainer.fit(model, DataLoader(batches, batch_size=None))
    trainer.save_checkpoint(tmp_path / "fit.ckpt")
    restored = ThreeTaskNet.load_from_checkpoint(tmp_path / "fit.ckpt")
    assert model.skipped_steps == restored.skipped_steps == 1
    assert restored._consecutive_skips == model._consecutive_skips == 1


@pytest.mark.parametrize("method", [callbacks.IMTLG, callbacks.AlignedMTL])
def test_a_gradient_method_raises_the_nonfinite_error_before_its_solver_sees_the_gramian(method):
    # An infinite loss gives a non-finite Gramian: the method is not asked for weights (these
    # two decompose the Gramian, which fails on it); the mixin's policy decides the step.
    batch = make_batch(9, seed=5)
    batch[1]["price"][1] = torch.inf  # a labelled sample
    trainer = quiet_trainer(1, callbacks=[method()])
    with pytest.raises(NonFiniteLossError, match="global step 0: task 'price' on rank"):
        trainer.fit(ThreeTaskNet().double(), DataLoader([batch], batch_size=None))


@pytest.mark.parametrize("accumulate", [1, 2])
@pytest.mark.parametrize("sold_loss", ["bce_with_logits", "mse"], ids=["alone", "stacked"])
def test_a_dropped_task_trains_the_others_as_a_batch_without_its_labels(sold_loss, accumulate):
    """One process; with sold_loss="mse" price shares one stacked loss node with sold, whose
    backward would pass 0 · ∞ = NaN to the trunk through price's row."""

    def fit(price_at_bad_step: float) -> ThreeTaskNet:
        batches = [make_batch(6, seed=step) for step in range(2)]
        batches[0][1]["price"][1] = price_at_bad_step
        if price_at_bad_step != torch.inf:  # the reference: no price label in that batch
            batches[0][1]["price"][:] = torch.nan
        torch.manual_seed(0)
        model = ThreeTaskNet(sold_loss=sold_loss).double()
        model.nonfinite = "drop_task"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the dropped step's warning
            trainer = quiet_trainer(1, steps=2 // accumulate, accumulate_grad_batches=accumulate)
            trainer.fit(model, DataLoader(batches, batch_size=None))
        return model

    dropped, reference = fit(torch.inf), fit(torch.nan)
    assert dropped.skipped_steps == 1
    for (name, parameter), expected in zip(
        dropped.named_parameters(), reference.parameters(), strict=True
    ):
        torch.testing.assert_close(parameter, expected, rtol=1e-12, atol=1e-14, msg=name)


@pytest.mark.parametrize("bad", [1, 0], ids=["second micro-batch", "first micro-batch"])
def test_drop_task_leaves_out_a_micro_batch_with_no_task_left_and_takes_the_others(bad):
    # Accumulated over two micro-batches, one with every loss NaN: the step takes the other
    # one's gradient, as when the bad one has no label at all. Coming first, the bad one marks
    # the step to be skipped, and the second, with tasks to train, must take it back.
    fitted = []
    for kind in ("NaN inputs", "no label"):
        batches = [make_batch(4, seed=s, dtype=torch.float32) for s in range(2)]
        if kind == "NaN inputs":
            batches[bad][0][0] = torch.nan
        else:
            batches[bad][1]["price"][:] = torch.nan
            batches[bad][1]["kind"][:] = -100
            batches[bad][1]["sold"][:] = torch.nan
        torch.manual_seed(0)
        model = AdamNet()
        model.nonfinite = "drop_task"
        start = [parameter.detach().clone() for parameter in model.parameters()]
        trainer = quiet_trainer(1, steps=1, precision="32-true", accumulate_grad_batches=2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            trainer.fit(model, DataLoader(batches, batch_size=None))
        assert trainer.global_step == 1 and model.skipped_steps == (kind == "NaN inputs")
        fitted.append([parameter.detach().clone() for parameter in model.parameters()])
        assert all(not torch.equal(a, b) for a, b in zip(fitted[-1], start, strict=True)), kind
    for nan_inputs, no_label in zip(*fitted, strict=True):
        torch.testing.assert_close(nan_inputs, no_label, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("ranks", "named"),
    [
        ([1], "1"),
        ([0, 3, 40], "0, 3, 40"),
        # From rank 41 on the ranks are counted, in the bits above.
        ([41], "1 rank from 41 on"),
        ([1, 41, 60], "1, 2 ranks from 41 on"),
        # Every rank of a 64-GPU job: the named ranks' bits never carry into the count.
        (list(range(64)), ", ".join(str(rank) for rank in range(41)) + ", 23 ranks from 41 on"),
        (
            list(range(41 + 4095)),
            ", ".join(str(rank) for rank in range(41)) + ", 4095 ranks from 41 on",
        ),
    ],
)
def test_the_error_names_the_ranks_of_a_summed_set_in_any_order(ranks, named):
    for order in (ranks, ranks[::-1]):  # as the all-reduce may sum them
        bits = torch.tensor([distributed.rank_bit(rank) for rank in order], dtype=torch.float64)
        total = torch.zeros((), dtype=torch.float64)
        for value in bits:  # one at a time, rounding after each addition
            total += value
        message = _nonfinite_message([("price", total.item())], 7)
        assert message.startswith(
            f"Non-finite loss at global step 7: task 'price' on rank(s) {named}."
        )
