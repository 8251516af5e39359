"""The examples a newcomer runs first must keep working."""

import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest

from lightning_lossagg.callbacks import LossLogger
from lightning_lossagg.demos import PenguinsDataModule, PenguinsNet

EXAMPLES = Path(__file__).parents[1] / "examples"


def test_house_prices_trains_both_tasks_with_price_weighted_two_to_one(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    from house_prices import main

    metrics = main(max_epochs=2, enable_progress_bar=False)
    assert metrics["val/weight/price"] == 2.0 and metrics["val/weight/kind"] == 1.0
    assert metrics["val/weighted/price"] == pytest.approx(2 * metrics["val/loss/price"])
    # Better than predicting the mean price (MSE 1 on standardised prices) and chance on 3 types.
    assert metrics["val/loss/price"] < 0.5 and metrics["val/loss/kind"] < 0.8


def test_compare_methods_trains_the_demo_with_each_method(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    from compare_methods import TASKS, main

    L.seed_everything(0)
    untrained, data = PenguinsNet(), PenguinsDataModule()
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[LossLogger()]
    )
    (before,) = trainer.validate(untrained, data, verbose=False)

    methods = ["static", "UncertaintyWeighting", "MGDA", "UPGrad"]
    results = main(methods, epochs=3)
    assert list(results) == methods
    for method, figures in results.items():
        assert figures["static_loss"] == pytest.approx(sum(figures[task] for task in TASKS))
        assert figures["static_loss"] < 0.5 * before["val/static_loss"], method  # it trained
        assert figures["ms/step"] > 0


@pytest.mark.ddp
def test_ddp_example_runs_on_two_processes():
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "ddp.py")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=EXAMPLES,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "val/loss/price" in result.stdout
