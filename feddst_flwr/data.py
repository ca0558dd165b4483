"""Datasets and non-IID partitions, held in memory as tensors."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch


DATASETS = ("digits",)


@dataclass(frozen=True)
class TensorData:
    """Images (N, C, H, W float32) and integer labels (N,)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, indices: np.ndarray) -> TensorData:
        index = torch.as_tensor(indices, dtype=torch.long)
        return TensorData(self.x[index], self.y[index])


@lru_cache(maxsize=4)
def load_dataset(name: str, test_fraction: float, seed: int) -> tuple[TensorData, TensorData]:
    """(train, test) splits of a named dataset; `digits` is scikit-learn's bundled set."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset '{name}'; available: {DATASETS}")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target, test_size=test_fraction, random_state=seed, stratify=digits.target
    )
    return _tensors(x_train, y_train), _tensors(x_test, y_test)


def _tensors(x: np.ndarray, y: np.ndarray) -> TensorData:
    return TensorData(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y.astype(np.int64)))


@lru_cache(maxsize=4)
def pathological_partitions(
    name: str, test_fraction: float, seed: int, num_partitions: int, classes_per_partition: int = 2
) -> tuple[np.ndarray, ...]:
    """Training indices per client, each client holding `classes_per_partition` distinct
    classes; every class is used whenever num_partitions * classes_per_partition >= the
    number of classes, and a class's images are split evenly among its clients."""
    train, _ = load_dataset(name, test_fraction, seed)
    labels = train.y.numpy()
    rng = np.random.default_rng(seed)
    holders = _class_assignment(int(labels.max()) + 1, num_partitions, classes_per_partition, rng)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
    for label, clients in enumerate(holders):
        indices = rng.permutation(np.flatnonzero(labels == label))
        for client, chunk in zip(clients, np.array_split(indices, len(clients))):
            parts[client].append(chunk)
    return tuple(np.sort(np.concatenate(chunks)) for chunks in parts)


def _class_assignment(num_classes: int, num_partitions: int, per_partition: int, rng: np.random.Generator) -> list[list[int]]:
    """For each class, the clients holding it: clients read their classes `per_partition`
    at a time from a sequence of random permutations of all classes."""
    if not 1 <= per_partition <= num_classes:
        raise ValueError(f"classes per partition must be in [1, {num_classes}], got {per_partition}")
    if num_partitions * per_partition < num_classes:
        raise ValueError(
            f"{num_partitions} partitions x {per_partition} classes cannot cover all {num_classes} classes; "
            f"use at least {-(-num_classes // per_partition)} partitions (num-supernodes)"
        )
    slots: list[int] = []
    while len(slots) < num_partitions * per_partition:
        straddle = slots[len(slots) - len(slots) % per_partition :]  # a client's classes so far
        permutation = rng.permutation(num_classes).tolist()
        while set(straddle) & set(permutation[: per_partition - len(straddle)]):
            permutation = rng.permutation(num_classes).tolist()
        slots += permutation
    holders: list[list[int]] = [[] for _ in range(num_classes)]
    for position, label in enumerate(slots[: num_partitions * per_partition]):
        holders[label].append(position // per_partition)
    return holders


def load_partition(name: str, test_fraction: float, seed: int, partition_id: int, num_partitions: int) -> TensorData:
    """One client's training data."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} is outside [0, {num_partitions})")
    train, _ = load_dataset(name, test_fraction, seed)
    return train.subset(pathological_partitions(name, test_fraction, seed, num_partitions)[partition_id])
