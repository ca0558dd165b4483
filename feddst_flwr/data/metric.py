"""The paper's metric: the global model's mean accuracy over the clients' own test sets."""

from __future__ import annotations

import numpy as np

from .partition import PartitionScheme
from .specs import RawDataset


def client_test_weights(
    raw: RawDataset, parts: tuple[np.ndarray, ...], scheme: PartitionScheme, num_classes: int
) -> np.ndarray:
    """(clients, classes) weights of each client's test set over the classes: for
    `pathological` all test images of the client's classes (the paper's protocol), else
    the client's own training label distribution. Rows sum to 1."""
    counts = np.stack([np.bincount(raw.y_train[p], minlength=num_classes) for p in parts]).astype(np.float64)
    if scheme.kind == "pathological":
        counts = np.where(counts > 0, np.bincount(raw.y_test, minlength=num_classes), 0).astype(np.float64)
    return counts / np.maximum(counts.sum(axis=1, keepdims=True), 1e-300)


def client_mean_accuracy(class_accuracy: np.ndarray, weights: np.ndarray) -> float:
    """The paper's metric: the mean over clients of the global model's accuracy on each
    client's test set, from per-class accuracy on the central test set. Classes absent from
    the test set (NaN accuracy) are left out of a client's weights; a client with no test
    class left is left out of the mean."""
    present = ~np.isnan(class_accuracy)
    weights = weights * present
    mass = weights.sum(axis=1)
    per_client = weights @ np.where(present, class_accuracy, 0.0)
    return float((per_client[mass > 0] / mass[mass > 0]).mean())
