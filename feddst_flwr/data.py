"""Datasets and non-IID partitions, held in memory as tensors."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch


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
    if name != "digits":
        raise ValueError(f"unknown dataset '{name}'; available: ['digits']")
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
    """Training indices per client, each client holding `classes_per_partition` classes
    (flwr-datasets' PathologicalPartitioner; every class is used)."""
    from datasets import Dataset
    from flwr_datasets.partitioner import PathologicalPartitioner

    train, _ = load_dataset(name, test_fraction, seed)
    partitioner = PathologicalPartitioner(
        num_partitions=num_partitions,
        partition_by="label",
        num_classes_per_partition=classes_per_partition,
        class_assignment_mode="first-deterministic",
        seed=seed,
    )
    partitioner.dataset = Dataset.from_dict({"label": train.y.tolist(), "index": list(range(len(train)))})
    return tuple(np.asarray(partitioner.load_partition(i)["index"]) for i in range(num_partitions))


def load_partition(name: str, test_fraction: float, seed: int, partition_id: int, num_partitions: int) -> TensorData:
    """One client's training data."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} is outside [0, {num_partitions})")
    train, _ = load_dataset(name, test_fraction, seed)
    return train.subset(pathological_partitions(name, test_fraction, seed, num_partitions)[partition_id])
