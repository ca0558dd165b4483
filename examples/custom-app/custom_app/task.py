"""The app's own model, data and train function: an MLP on scikit-learn's digits (offline),
two classes per node; nothing here comes from feddst-flwr but the mask helpers."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F

from feddst_flwr import LocalResult, LocalRound, TrainFn, prune_and_regrow

TEST_SIZE = 360


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


def new_model() -> MLP:
    torch.manual_seed(0)
    return MLP()


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits, shuffled once, pixels scaled to [0, 1]."""
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    return torch.tensor(x[order] / 16.0, dtype=torch.float32), torch.tensor(y[order])


def test_set() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = digits()
    return x[:TEST_SIZE], y[:TEST_SIZE]


def partition(partition_id: int, num_partitions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-IID: the training digits sorted by label, cut into 2 * num_partitions shards;
    node i gets shards i and i + num_partitions (about two classes)."""
    x, y = digits()
    x, y = x[TEST_SIZE:], y[TEST_SIZE:]
    shards = np.array_split(np.argsort(y.numpy(), kind="stable"), 2 * num_partitions)
    index = torch.tensor(np.concatenate([shards[partition_id], shards[partition_id + num_partitions]]))
    return x[index], y[index]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def own_train(x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> TrainFn:
    """Full-batch SGD with the gradients multiplied by FedDST's mask, so weights outside
    it stay zero; on readjust rounds, halfway through, FedDST's prune-and-regrow moves the
    mask (regrowth by the dense gradient), and training goes on under the new mask."""

    def train_fn(model: nn.Module, local: LocalRound) -> LocalResult:
        params = dict(model.named_parameters())
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        masks = local.masks
        for step in range(steps):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            if masks and local.alpha_r > 0 and step == steps // 2:
                grads = {name: params[name].grad.clone() for name in masks}  # dense: before masking
                weights = {name: params[name].data for name in masks}
                masks = prune_and_regrow(weights, grads, masks, local.alpha_r, torch.Generator().manual_seed(step))
                for name, mask in masks.items():  # dropped weights lose their momentum
                    buffer = optimizer.state.get(params[name], {}).get("momentum_buffer")
                    if buffer is not None:
                        buffer.mul_(mask)
            for name, mask in (masks or {}).items():
                params[name].grad.mul_(mask)
            optimizer.step()
        return LocalResult(num_examples=len(y), loss=loss.item(), masks=masks)

    return train_fn
