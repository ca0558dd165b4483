"""Local training (Algorithm 1, step 3): masked SGD with optional proximal term, the dense
task-loss gradient used for regrowth (step 4), and evaluation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .masks import REGROW, Masks, apply_masks, masks_to, prune_and_regrow, seeded_generator

if TYPE_CHECKING:  # annotations only: the run config's schema (config.py) imports this module
    from .data import TensorData


def batches(data: TensorData, batch_size: int, generator: torch.Generator | None):
    """Yield (x, y) minibatches, reshuffled on every call when a generator is given."""
    order = torch.randperm(len(data), generator=generator) if generator is not None else torch.arange(len(data))
    for start in range(0, len(data), batch_size):
        index = order[start : start + batch_size].to(data.y.device)
        yield data.x[index], data.y[index]


READJUST_AT = ("end", "last-epoch", "mid")
DEVICES = ("auto", "cuda", "cpu")


def resolve_device(name: str) -> torch.device:
    """The torch device for the run config's `device`: auto is CUDA when available, else CPU."""
    if name not in DEVICES:
        raise ValueError(f"device '{name}' not in {DEVICES}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device = 'cuda' but torch finds no CUDA device (use 'auto' or 'cpu')")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def readjust_epoch(readjust_at: str, epochs: int) -> int:
    """Local epochs trained before the readjustment: `end` after the last one (the paper:
    regrown weights are uploaded at zero), `last-epoch` before the last one, `mid` after
    E // 2 (regrown weights train one, or E - E // 2, epochs before upload)."""
    if readjust_at not in READJUST_AT:
        raise ValueError(f"readjust-at '{readjust_at}' not in {READJUST_AT}")
    return {"end": epochs, "last-epoch": epochs - 1, "mid": epochs // 2}[readjust_at]


@dataclass
class Readjustment:
    """Prune-and-regrow within local training (Algorithm 1, step 4): after `after_epoch`
    epochs, drop a fraction alpha_r of each layer's weights and regrow as many: by the
    dense gradient summed over `grow_batches` minibatches (`regrow = "gradient"`) or at
    random (`"random"`)."""

    alpha_r: float
    after_epoch: int
    grow_batches: int = 1
    regrow: str = "gradient"


@dataclass
class LocalTraining:
    """Mean task loss over all steps, and the masks the model ends with."""

    loss: float
    masks: Masks | None


@dataclass(frozen=True)
class LocalRound:
    """What the server asks of one round of local training (a TrainFn's second argument)."""

    server_round: int
    masks: Masks | None  # the mask to train under (None: a dense baseline round)
    alpha_r: float = 0.0  # readjustment ratio of this round; 0: keep the mask
    proximal_mu: float = 0.0  # FedProx coefficient; 0: no proximal term
    upload_gradients: bool = False  # PruneFL asks for the summed squared dense gradients


@dataclass
class LocalResult:
    """What a TrainFn returns: its training examples (the aggregation weight), mean loss,
    the readjusted mask (None: the mask it was given) and, when asked, the gradients."""

    num_examples: int
    loss: float
    masks: Masks | None = None
    gradients: dict[str, torch.Tensor] | None = None


TrainFn = Callable[[nn.Module, LocalRound], LocalResult]
"""Trains the model in place. Weights outside the mask start at zero and must end at zero
(multiply the gradients by the mask, as `train` does); on readjust rounds (alpha_r > 0) a
TrainFn may move the mask (`masks.prune_and_regrow`), keeping each layer's count."""


def masked_sgd(
    data: TensorData,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    readjust_at: str = "mid",
    grow_batches: int = 1,
    regrow: str = "gradient",
    seed: int = 0,
    partition_id: int = 0,
    device: str = "auto",
) -> TrainFn:
    """Our TrainFn: `train` on `data` with the round's options, FedDST's readjustment after
    readjust-at, PruneFL's gradients when asked. Data order and tie-breaking draw from
    (seed, round, partition_id), so the clients of one round differ.

    Parameters
    ----------
    data : TensorData
        The node's training partition.
    epochs, batch_size, lr, momentum, weight_decay : int, int, float, float, float
        Local SGD: E epochs of mini-batches (run config `local-epochs`, `batch-size`, `lr`,
        `momentum`, `weight-decay`).
    readjust_at : str (default: "mid")
        When the client readjusts its mask on a readjustment round: "end" (the paper's, after
        training), "last-epoch" or "mid" (within training; see `readjust_epoch`).
    grow_batches : int (default: 1)
        Mini-batches whose dense gradients rank the regrowth.
    regrow : str (default: "gradient")
        "gradient" (RigL) or "random" (SET); see `masks.prune_and_regrow`.
    seed, partition_id : int
        Seed the data order and tie-breaking with the round.
    device : str (default: "auto")
        "auto" (CUDA when available), "cpu" or "cuda".

    Returns
    -------
    TrainFn
        `train_fn(model, local) -> LocalResult`, for `client.train_reply`.
    """
    readjust_after = readjust_epoch(readjust_at, epochs)
    if regrow not in REGROW:
        raise ValueError(f"regrow '{regrow}' not in {REGROW}")

    def train_fn(model: nn.Module, local: LocalRound) -> LocalResult:
        on = resolve_device(device)
        model.to(on)
        local_data = data.to(on)
        generator = seeded_generator(seed, local.server_round, partition_id)
        masks = None if local.masks is None else masks_to(local.masks, on)
        readjust = (
            Readjustment(local.alpha_r, readjust_after, grow_batches, regrow) if masks and local.alpha_r > 0 else None
        )
        trained = train(
            model, local_data, masks,
            epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum, weight_decay=weight_decay,
            proximal_mu=local.proximal_mu, generator=generator, readjust=readjust,
        )  # fmt: skip
        gradients = None
        if local.upload_gradients:
            names = list(local.masks or {})
            gradients = dense_gradients(model, local_data, names, grow_batches, batch_size, generator, squared=True)
        return LocalResult(len(data), trained.loss, trained.masks, gradients)

    return train_fn


def train(
    model: nn.Module,
    data: TensorData,
    masks: Masks | None,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    proximal_mu: float,
    generator: torch.Generator,
    readjust: Readjustment | None = None,
) -> LocalTraining:
    """E epochs of SGD; with masks, pruned weights get no gradient and are re-zeroed after
    every step, so neither gradients, momentum nor weight decay revive them. With
    `readjust`, the masks are readjusted once, after readjust.after_epoch epochs (epochs:
    after the last one); training goes on with the new masks and one optimizer."""
    masks = masks or {}
    params = dict(model.named_parameters())
    apply_masks({name: params[name].data for name in masks}, masks)
    global_params = {name: p.detach().clone() for name, p in params.items()} if proximal_mu > 0 else {}
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    total, steps = 0.0, 0
    for epoch in range(epochs + 1):  # the last pass only readjusts (after_epoch = epochs)
        if readjust is not None and masks and epoch == readjust.after_epoch:
            masks = _readjusted(model, data, masks, readjust, batch_size, generator, optimizer)
        if epoch == epochs:
            break
        model.train()
        for x, y in batches(data, batch_size, generator):
            optimizer.zero_grad()
            task_loss = F.cross_entropy(model(x), y)
            loss = task_loss
            if proximal_mu > 0:
                loss = loss + proximal_mu / 2 * sum((params[n] - g).pow(2).sum() for n, g in global_params.items())
            loss.backward()
            for name, mask in masks.items():
                grad = params[name].grad
                assert grad is not None  # every masked layer takes part in the loss
                grad.mul_(mask)
            optimizer.step()
            apply_masks({name: params[name].data for name in masks}, masks)
            total += task_loss.item()
            steps += 1
    return LocalTraining(total / max(steps, 1), masks or None)


def _readjusted(
    model: nn.Module,
    data: TensorData,
    masks: Masks,
    readjust: Readjustment,
    batch_size: int,
    generator: torch.Generator,
    optimizer: torch.optim.Optimizer,
) -> Masks:
    """Prune and regrow the model's weights in place; dropped weights lose their momentum."""
    grads = None
    if readjust.regrow == "gradient":
        grads = dense_gradients(model, data, list(masks), readjust.grow_batches, batch_size, generator)
    params = dict(model.named_parameters())
    weights = {name: params[name].data for name in masks}
    new_masks = prune_and_regrow(weights, grads, masks, readjust.alpha_r, generator, readjust.regrow)
    for name, mask in new_masks.items():
        buffer = optimizer.state.get(params[name], {}).get("momentum_buffer")
        if buffer is not None:
            buffer.mul_(mask)
    return new_masks


def dense_gradients(
    model: nn.Module,
    data: TensorData,
    names: list[str],
    num_batches: int,
    batch_size: int,
    generator: torch.Generator,
    squared: bool = False,
) -> dict[str, torch.Tensor]:
    """Gradient of the task loss (no proximal term) w.r.t. the full weight tensors, pruned
    positions included, summed over num_batches minibatches; with `squared`, the sum of the
    per-batch squared gradients (PruneFL's importance)."""
    params = dict(model.named_parameters())
    model.train()
    total = {name: torch.zeros_like(params[name]) for name in names}
    for i, (x, y) in enumerate(batches(data, batch_size, generator)):
        if i == num_batches:
            break
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for name in names:
            grad = params[name].grad
            assert grad is not None  # every masked layer takes part in the loss
            grad = grad.detach()
            total[name] += grad * grad if squared else grad
    model.zero_grad()
    return total


@dataclass
class Evaluation:
    """Mean cross-entropy, accuracy and per-class accuracy (NaN for absent classes)."""

    loss: float
    accuracy: float
    class_accuracy: np.ndarray


@torch.no_grad()
def evaluate(model: nn.Module, data: TensorData, num_classes: int, batch_size: int = 512) -> Evaluation:
    """Evaluate a model on a dataset in one pass."""
    model.eval()
    loss = 0.0
    correct = torch.zeros(num_classes, dtype=torch.long, device=data.y.device)
    for x, y in batches(data, batch_size, None):
        logits = model(x)
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += torch.bincount(y[logits.argmax(1) == y], minlength=num_classes)
    total = torch.bincount(data.y, minlength=num_classes).cpu().numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        class_accuracy = correct.cpu().numpy() / total
    return Evaluation(loss / len(data), int(correct.sum()) / len(data), class_accuracy)
