"""The recording models and the hand-made reference of the gradient machinery's tests.

``NormalisedGradients`` (w_k = 1/||g_k||, the MGDA "l2" normalisation) is a real subclass whose
weights depend on the global Gramian, so any error in the gradients or their sync shows.
``RecordingNet`` saves, at every optimizer step, the weights and the parameters' gradients."""

import copy
import types
from pathlib import Path

import torch
from torch import Tensor

from lightning_lossagg.callbacks.gradient_weighting import GradientWeighting
from tests.models import ThreeTaskNet, one_batch_loader, quiet_trainer, reference_task_losses

STATIC = torch.tensor([2.0, 1.0, 1.0], dtype=torch.float64)
SOLD_WEIGHTED_ZERO = torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64)  # sold_weight=0.0


class NormalisedGradients(GradientWeighting):
    def weights_from_gramian(self, gramian):
        return gramian.diagonal().rsqrt()


class RecordingNet(ThreeTaskNet):
    def __init__(self, out_dir: str, rank_batches: list, **kwargs) -> None:
        super().__init__(**kwargs)
        self.out_dir, self.rank_batches = out_dir, rank_batches
        self.records: list[dict] = []  # every step's (one process)
        self.one_node_steps: list[bool] = []  # per step that tried: were the heads one node?

    def train_dataloader(self):
        return one_batch_loader(self.rank_batches[self.trainer.global_rank])

    def on_before_optimizer_step(self, optimizer):
        super().on_before_optimizer_step(optimizer)
        record = {
            "weights": self.loss_record.weights,
            "grads": {
                n: None if p.grad is None else p.grad.clone() for n, p in self.named_parameters()
            },
            "linear_heads": self._linear_heads,
            "one_node": list(self.one_node_steps),
        }
        self.records.append(record)
        torch.save(record, Path(self.out_dir) / f"rank{self.global_rank}.pt")

    def _predict_with_linear_heads(self, *args):
        predictions = super()._predict_with_linear_heads(*args)
        self.one_node_steps.append(predictions is not None)
        return predictions


class FactoredGradients(NormalisedGradients):
    linear_factors_from = 1  # the linear heads' factors from one task on (default: 5)


class LinearFactorsNet(RecordingNet):
    """Takes its linear heads' factors whatever the sizes (for batches this small the rule
    prefers the views' gradients)."""

    _linear_factors_pay = staticmethod(lambda heads, representation: True)


class ManyClassesNet(RecordingNet):
    """kind has 12 classes: the heads' 14 outputs make the views' gradients cheaper than the
    factors, whatever the batch."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.heads["kind"] = torch.nn.Linear(8, 12)


class InPlaceOutputNet(LinearFactorsNet):
    """kind's head output is changed in place: the factors are taken at the node that made it."""

    def forward_heads(self, shared):
        price, sold = self.heads["price"](shared), self.heads["sold"](shared)
        kind = self.heads["kind"](shared).mul_(2.0)
        return {"price": price.squeeze(-1), "kind": kind, "sold": sold.squeeze(-1)}


class OwnForwardNet(LinearFactorsNet):
    """kind's head has a forward of its own (a doubled weight): not a plain nn.Linear."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        head = self.heads["kind"]
        head.forward = types.MethodType(_doubled_weight, head)


def _doubled_weight(head, inputs):
    return torch.nn.functional.linear(inputs, 2.0 * head.weight, head.bias)


class ScaledHeadOutputNet(LinearFactorsNet):
    """A forward hook doubles kind's head output: the view's gradient is no longer the output's
    gradient times the weight, so the factors are refused."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.heads["kind"].register_forward_hook(_doubled)


def _doubled(module, args, output):
    return 2.0 * output


class PriceInputResidualNet(LinearFactorsNet):
    """price's prediction adds a residual of its head's input (the head's view, kept by a forward
    hook that leaves the output alone): the prediction reaches the view other than through the
    head, so the factors are refused."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.heads["price"].register_forward_hook(self._keep_price_input)

    def _keep_price_input(self, module, args, output) -> None:
        self.__dict__["price_input"] = args[0]

    def forward_heads(self, shared):
        predictions = ThreeTaskNet.forward_heads(self, shared)
        residual = self.__dict__.pop("price_input").sum(-1)  # nothing kept: deep copies work
        return {**predictions, "price": predictions["price"] + 0.5 * residual}


class WholeForwardNet(RecordingNet):
    """No forward_shared / forward_heads: per-task gradients go through the whole network."""

    forward_shared = forward_heads = None

    def forward(self, inputs):
        return ThreeTaskNet.forward_heads(self, ThreeTaskNet.forward_shared(self, inputs))


def reference_update(
    model, batch, rep_grad: bool, valid: tuple[int, ...] = (0, 1, 2), static: Tensor = STATIC
) -> dict:
    """LibMTL semantics by hand: heads get s_k ∇L_k; the trunk gets sum_k w_k s_k g_k with
    w_k = 1/||g_k||, g_k the global gradient of L_k at the parameters or the representation.
    Only the tasks in ``valid`` take part (the others: weight 0, no gradient)."""
    model = copy.deepcopy(model).double()
    inputs, targets = batch
    shared = ThreeTaskNet.forward_shared(model, inputs)
    predictions = (type(model).forward_heads or ThreeTaskNet.forward_heads)(model, shared)
    model.forward = lambda _: predictions
    all_losses = list(reference_task_losses(model, (inputs, targets)).values())
    losses = [all_losses[k] for k in valid]
    static = static[list(valid)]
    trunk = list(model.trunk.parameters())
    at = [shared] if rep_grad else trunk

    def gradient(loss):
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, at, retain_graph=True)])

    per_task = [gradient(loss) for loss in losses]
    weights = torch.stack([1 / g.norm() for g in per_task]) * static
    combined = sum(w * g for w, g in zip(weights, per_task, strict=True))
    if rep_grad:
        trunk_grads = torch.autograd.grad(
            shared, trunk, combined.view_as(shared), retain_graph=True
        )
    else:
        trunk_grads = torch.split(combined, [p.numel() for p in trunk])
    head_objective = sum(s * loss for s, loss in zip(static, losses, strict=True))
    heads = list(model.heads.parameters())
    head_grads = torch.autograd.grad(head_objective, heads, materialize_grads=True)
    grads = {}
    for (name, parameter), grad in zip(model.trunk.named_parameters(), trunk_grads, strict=True):
        grads[f"trunk.{name}"] = grad.reshape(parameter.shape)
    for (name, _), grad in zip(model.heads.named_parameters(), head_grads, strict=True):
        grads[f"heads.{name}"] = grad
    all_weights = torch.zeros(len(all_losses), dtype=torch.float64)
    all_weights[list(valid)] = weights
    return {"weights": all_weights, "grads": grads}


def fit_model(model, devices: int, method, precision: str = "64-true", steps: int = 1) -> None:
    quiet_trainer(devices, steps, precision, [method]).fit(model)


def assert_matches(result, reference):
    torch.testing.assert_close(result["weights"], reference["weights"], atol=1e-8, rtol=1e-6)
    for name, grad in reference["grads"].items():
        torch.testing.assert_close(result["grads"][name], grad, atol=1e-8, rtol=1e-6, msg=name)
