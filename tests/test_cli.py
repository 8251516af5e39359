"""The real LightningCLI on the real configs, with W&B in offline mode read back from disk."""

from pathlib import Path

import pytest
import torch

from lightning_lossagg.cli import build_cli
from lightning_lossagg.demos import PenguinsNet
from tests.wandb_records import OfflineRun, read_offline_run

CONFIGS = Path(__file__).parents[1] / "configs"
TASKS = ("species", "sex", "body_mass")


@pytest.fixture(autouse=True)
def _command_line(monkeypatch):
    monkeypatch.setattr("sys.argv", ["lossagg"])  # as if run as `lossagg ...`


def _fit_penguins_with_wandb(save_dir: Path, *args: str) -> OfflineRun:
    """``lossagg fit`` of the penguins config for 2 epochs (``args`` added): its offline W&B run,
    read back once finished as the end of the ``lossagg`` process finishes it, with every task's
    loss, weight and validation loss (checked). An absolute ``save_dir``: W&B's service process,
    started by an earlier test, resolves relative paths against its own working directory."""
    config = [f"--config={CONFIGS / 'penguins.yaml'}", "--trainer.max_epochs=2"]
    cli = build_cli(["fit", *config, f"--trainer.logger.init_args.save_dir={save_dir}", *args])
    cli.trainer.logger.experiment.finish()
    run = read_offline_run(save_dir / "wandb", wait_for_exit_s=30)
    for task in TASKS:
        for key in (f"train/loss/{task}", f"train/weight/{task}", f"val/loss/{task}"):
            assert key in run.history_keys, key
    return run


def test_lossagg_fit_on_penguins_writes_every_task_to_the_offline_wandb_run(tmp_path):
    run = _fit_penguins_with_wandb(tmp_path / "runs" / "penguins")
    assert "train/loss" in run.history_keys and "val/loss" in run.history_keys
    assert run.config["hidden"] == 64
    assert list((tmp_path / "runs" / "penguins").rglob("*.ckpt"))


@pytest.mark.ddp
def test_lossagg_fits_the_penguins_config_on_two_processes(tmp_path):
    # The real config with DDP from the command line: rank 0's offline W&B run has every task's
    # figures, and the checkpoint counts each rank's share of the batches (240 training
    # penguins, 120 per rank in batches of 32: 4 steps per epoch).
    # Under ddp_spawn the W&B run is made in this process and rank 0 attaches to it.
    save_dir = tmp_path / "runs" / "penguins"
    _fit_penguins_with_wandb(save_dir, "--trainer.strategy=ddp_spawn", "--trainer.devices=2")
    last = torch.load(tmp_path / "runs/penguins/checkpoints/last.ckpt", weights_only=False)
    assert last["global_step"] == 8


@pytest.mark.parametrize("subcommand", ["validate", "test"])
def test_lossagg_evaluates_the_demo(subcommand, tmp_path):
    cli = build_cli(
        [subcommand, f"--config={CONFIGS / 'penguins.yaml'}", "--trainer.logger=false"],
    )
    metrics = cli.trainer.callback_metrics
    prefix = "val" if subcommand == "validate" else "test"
    for task in TASKS:
        assert f"{prefix}/loss/{task}" in metrics


def test_the_saved_config_is_the_latest_fits_and_evaluation_leaves_it(tmp_path):
    # A second fit with the same config replaces the first's saved config (it must not stop at
    # the file); a test of its checkpoint keeps it: the record of what the fit ran.
    args = [
        f"--config={CONFIGS / 'penguins.yaml'}",
        "--trainer.logger=false",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=1",
        "--trainer.limit_val_batches=1",
    ]
    build_cli(["fit", *args])
    (saved,) = tmp_path.rglob("config.yaml")
    build_cli(["fit", *args, "--trainer.limit_train_batches=2"])
    assert "limit_train_batches: 2" in saved.read_text()
    cli = build_cli(["test", *args[:2], "--trainer.limit_test_batches=3"])
    assert "test/loss" in cli.trainer.callback_metrics
    assert "limit_train_batches: 2" in saved.read_text()
    assert "limit_test_batches: 3" not in saved.read_text()


def test_ckpt_path_last_resumes_the_previous_run_of_a_config_from_its_end(tmp_path):
    # The W&B logger gives each run a folder of its own: the configs keep the checkpoints in
    # one folder, so that `--ckpt_path last` finds the previous run's. With a learning rate of 0
    # the monitored loss never improves after the first epoch: last.ckpt must still be the end.
    args = [
        f"--config={CONFIGS / 'penguins.yaml'}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs' / 'penguins'}",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
    ]
    first = build_cli(["fit", *args, "--trainer.max_epochs=2", "--model.init_args.lr=0.0"])
    first.trainer.logger.experiment.finish()
    last = torch.load(tmp_path / "runs/penguins/checkpoints/last.ckpt", weights_only=False)
    assert last["global_step"] == 4  # not the best epoch's 2
    second = build_cli(["fit", *args, "--trainer.max_epochs=3", "--ckpt_path=last"])
    second.trainer.logger.experiment.finish()
    assert second.trainer.ckpt_path is not None
    assert Path(second.trainer.ckpt_path).name == "last.ckpt"
    assert second.trainer.global_step == 6  # one more epoch
    # A fresh fit's last.ckpt replaces the one before (no last-v1.ckpt beside an old last.ckpt
    # that `lossagg test --ckpt_path .../last.ckpt` would take).
    fresh = build_cli(["fit", *args, "--trainer.max_epochs=1"])
    fresh.trainer.logger.experiment.finish()
    assert sorted(p.name for p in (tmp_path / "runs/penguins/checkpoints").glob("last*")) == [
        "last.ckpt"
    ]
    last = torch.load(tmp_path / "runs/penguins/checkpoints/last.ckpt", weights_only=False)
    assert last["global_step"] == 2


def test_the_optimizer_and_its_scheduler_come_from_the_command_line(tmp_path):
    # LightningCLI's --optimizer and --lr_scheduler replace the model's configure_optimizers
    # (the demo's Adam). One epoch of StepLR(gamma=0.1) leaves a tenth of the learning rate.
    cli = build_cli(
        [
            "fit",
            f"--config={CONFIGS / 'penguins.yaml'}",
            "--trainer.logger=false",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
            "--optimizer=torch.optim.AdamW",
            "--optimizer.lr=0.005",
            "--lr_scheduler=torch.optim.lr_scheduler.StepLR",
            "--lr_scheduler.step_size=1",
            "--lr_scheduler.gamma=0.1",
        ]
    )
    (optimizer,) = cli.trainer.optimizers
    assert type(optimizer) is torch.optim.AdamW
    assert optimizer.param_groups[0]["initial_lr"] == 0.005
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0005)


def test_lossagg_predicts_with_the_demo(tmp_path):
    cli = build_cli(["predict", f"--config={CONFIGS / 'penguins.yaml'}", "--trainer.logger=false"])
    predictions = cli.trainer.predict_loop.predictions
    assert predictions and set(predictions[0]) == set(TASKS)


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({"body_mass": -1.0}, r"weights\['body_mass'\]: Task.weight must be >= 0"),
        ({"bodymass": 2.0}, r"Unknown task\(s\) \['bodymass'\] in weights"),
    ],
)
def test_a_bad_demo_weight_names_its_task(weights, message):
    with pytest.raises(ValueError, match=message):
        PenguinsNet(weights=weights)


def _classes_of_the_cli() -> list[tuple[str, str]]:
    """(option, class path) of every callback, model and data module the library offers."""
    import lightning as L

    from lightning_lossagg import callbacks, demos

    found = [
        ("--trainer.callbacks.help", f"lightning_lossagg.callbacks.{name}")
        for name in callbacks.__all__
        if isinstance(getattr(callbacks, name), type)
        and issubclass(getattr(callbacks, name), L.Callback)
    ]
    for name in demos.__all__:
        option = (
            "--model.help" if issubclass(getattr(demos, name), L.LightningModule) else "--data.help"
        )
        found.append((option, f"lightning_lossagg.demos.{name}"))
    return found


def test_the_help_of_every_class_describes_each_of_its_arguments(capsys):
    # jsonargparse guesses each docstring's style: one with many lines opening on a :math: or
    # :class: role read as reST, and GradNorm's, UncertaintyWeighting's and IMTLG's arguments
    # showed no description.
    import inspect
    import re

    classes = _classes_of_the_cli()
    assert len(classes) > 20
    for option, path in classes:
        with pytest.raises(SystemExit):
            build_cli(["fit", option, path])
        text = capsys.readouterr().out
        module, _, name = path.rpartition(".")
        cls = getattr(__import__(module, fromlist=[name]), name)
        prefix = option.removesuffix(".help")
        for argument in inspect.signature(cls).parameters:
            if argument in ("args", "kwargs"):
                continue
            # From the option's line to its "(type: ...)": the option(s) and the description.
            start = re.search(rf"^  {re.escape(prefix)}\.{argument}\b", text, re.M)
            assert start is not None, (path, argument)
            block = text[start.start() : text.index("(type:", start.start())]
            described = re.sub(rf"{re.escape(prefix)}\.{argument}\+? \S+,?", "", block)
            assert described.strip(), f"{path}: no description of {argument!r}"
