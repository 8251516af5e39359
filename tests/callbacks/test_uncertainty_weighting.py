"""UncertaintyWeighting: its arguments, its optimum on fixed losses, and that it learns each
task's noise variance on generated regression tasks."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_lossagg import MultiTaskMixin, Task
from lightning_lossagg.callbacks import UncertaintyWeighting
from lightning_lossagg.demos.penguins import TaskDataset
from tests.callbacks import _fits as fits
from tests.callbacks._loss_based import at_step, global_losses, trainer
from tests.models import ThreeTaskNet, make_batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NOISE_STD = (0.1, 0.5, 2.0)  # variances 0.01, 0.25, 4


@pytest.mark.parametrize("lr", [0.0, -1e-3, float("nan"), float("inf"), "0.1", True])
def test_a_bad_learning_rate_is_refused(lr):
    with pytest.raises(ValueError, match="`lr` must be"):
        UncertaintyWeighting(lr=lr)


@pytest.mark.parametrize("tasks", ["kind", [1], None, 3])
def test_classification_tasks_must_be_a_list_of_names(tasks):
    with pytest.raises(ValueError, match="`classification_tasks` must be a list of task names"):
        UncertaintyWeighting(classification_tasks=tasks)


def test_an_unknown_classification_task_is_refused_listing_the_models_tasks():
    callback = UncertaintyWeighting(classification_tasks=["kind", "colour"])
    run = trainer([callback], max_epochs=1)
    with pytest.raises(ValueError, match=r"\['colour'\].*\['price', 'kind', 'sold'\]"):
        run.fit(ThreeTaskNet().double(), DataLoader([make_batch(6, seed=0)], batch_size=None))


def test_on_fixed_losses_the_variances_reach_the_optimum_of_each_form():
    # c e^-s L + s/2 is minimal at e^s = 2 c L: the loss for regression (c = 1/2), twice the loss
    # for classification (c = 1). Direct calls: one step of the log-variances per model step.
    callback = UncertaintyWeighting(lr=0.05, classification_tasks=["kind"])
    callback.setup(None, ThreeTaskNet(), "fit")  # tasks price, kind, sold
    step = global_losses([0.2, 1.5, 8.0])
    for _ in range(400):
        weights = callback.task_weights(at_step(0), step)
        callback.on_before_optimizer_step(None, at_step(0), None)
    variances = callback.state_to_log()["log_var"].exp()
    expected = torch.tensor([0.2, 3.0, 8.0], dtype=torch.float64)
    torch.testing.assert_close(variances, expected, rtol=0.02, atol=0)
    torch.testing.assert_close(weights, torch.tensor([0.5, 1.0, 0.5]) / expected, rtol=0.02, atol=0)


def test_a_task_without_labels_keeps_its_log_variance():
    callback = UncertaintyWeighting(lr=0.1)
    callback.setup(None, ThreeTaskNet(), "fit")
    for valid in ([True, True, True], [True, False, True], [True, False, True]):
        callback.task_weights(at_step(0), global_losses([3.0, 3.0, 3.0], valid))
        before = callback.state_dict()["scales"]["values"]
        callback.on_before_optimizer_step(None, at_step(0), None)
    after = callback.state_dict()["scales"]["values"]
    assert after[1] == before[1] and after[0] != before[0]


class LinearTasks(MultiTaskMixin, L.LightningModule):
    """A shared linear layer and one linear head per task: it can reach each task's noise floor."""

    def __init__(self, in_features: int, num_tasks: int) -> None:
        super().__init__(tasks={f"task_{k}": Task("mse") for k in range(num_tasks)})
        self.shared = nn.Linear(in_features, 16)
        self.heads = nn.ModuleDict({name: nn.Linear(16, 1) for name in self.task_names})

    def forward(self, inputs: Tensor) -> dict[str, Tensor]:
        shared = self.shared(inputs)
        return {name: head(shared).squeeze(-1) for name, head in self.heads.items()}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def linear_tasks(num_samples: int, in_features: int, seed: int) -> tuple[Tensor, dict]:
    """``y_k = x . b_k + noise_std[k] * e``: linear tasks of known noise."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(num_samples, in_features, generator=generator)
    coefficients = torch.randn(in_features, len(NOISE_STD), generator=generator)
    noise = torch.tensor(NOISE_STD) * torch.randn(num_samples, len(NOISE_STD), generator=generator)
    targets = inputs @ coefficients + noise
    return inputs, {f"task_{k}": targets[:, k] for k in range(len(NOISE_STD))}


def test_learns_each_tasks_noise_variance():
    inputs, targets = linear_tasks(4096, in_features=8, seed=0)
    # The achievable training MSE of each task: its least-squares residual (about sigma_k^2).
    design = torch.cat([inputs, torch.ones(len(inputs), 1)], dim=1)
    achievable = torch.stack(
        [
            (design @ torch.linalg.lstsq(design, y[:, None]).solution - y[:, None]).square().mean()
            for y in targets.values()
        ]
    )
    torch.testing.assert_close(achievable, torch.tensor(NOISE_STD) ** 2, rtol=0.05, atol=0)

    torch.manual_seed(0)
    callback = UncertaintyWeighting(lr=0.05)
    data = DataLoader(TaskDataset(inputs, targets), batch_size=256, shuffle=True)
    run = trainer([callback], max_epochs=40, precision="32-true")
    run.fit(LinearTasks(in_features=8, num_tasks=3), data)

    learned_variances = callback.state_to_log()["log_var"].exp().float()  # kept in float64
    torch.testing.assert_close(learned_variances, achievable, rtol=0.10, atol=0)


def test_by_default_the_first_step_moves_each_log_variance_by_0_01():
    # Adam's first step is lr * sign(gradient); d/ds (e^-s L / 2 + s/2) = (1 - L) / 2 at s = 0.
    callback = UncertaintyWeighting()
    callback.setup(None, ThreeTaskNet(), "fit")
    callback.task_weights(at_step(0), global_losses([2.0, 2.0, 2.0]))
    callback.on_before_optimizer_step(None, at_step(0), None)
    torch.testing.assert_close(
        callback.state_dict()["scales"]["values"], torch.full((3,), 0.01, dtype=torch.float64)
    )


def test_the_classification_tasks_key_the_state_in_any_order():
    one = UncertaintyWeighting(classification_tasks=["kind", "sold"])
    other = UncertaintyWeighting(classification_tasks=["sold", "kind"])
    assert one.state_key == other.state_key
    assert UncertaintyWeighting(classification_tasks=["kind"]).state_key != one.state_key


def test_a_checkpoint_keyed_by_the_classification_tasks_as_given_still_resumes(tmp_path):
    """Checkpoints written before the key was sorted key the state by the tasks as given: the
    same callback resumes from them as the uninterrupted fit went on."""
    tasks, batches = ["sold", "kind"], fits.training_batches(2)

    def fit(epochs: int, ckpt_path=None, saving: list = ()) -> UncertaintyWeighting:
        torch.manual_seed(0)
        callback = UncertaintyWeighting(lr=0.1, classification_tasks=tasks)
        run = fits.trainer([callback, *saving], epochs, enable_checkpointing=bool(saving))
        run.fit(ThreeTaskNet().double(), fits.loader(batches), ckpt_path=ckpt_path)
        return callback

    saving = ModelCheckpoint(tmp_path, "epoch0")
    first = fit(1, saving=[saving])
    checkpoint = torch.load(saving.best_model_path, weights_only=False)
    as_given = first._generate_state_key(lr=0.1, classification_tasks=tasks)
    checkpoint["callbacks"][as_given] = checkpoint["callbacks"].pop(first.state_key)
    torch.save(checkpoint, tmp_path / "as_given.ckpt")

    resumed = fit(2, ckpt_path=tmp_path / "as_given.ckpt")
    fits.assert_nested_equal(resumed.state_dict(), fit(2).state_dict())
