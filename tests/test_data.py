"""Tests for feddst_flwr.data: the digits split and the pathological non-IID partitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from feddst_flwr.data import load_dataset, load_partition, pathological_partitions



def test_digits_split_shapes_and_ranges():
    train, test = load_dataset("digits", 0.2, 0)
    assert len(train) + len(test) == 1797 and len(test) == 360  # ceil(0.2 * 1797)
    assert train.x.shape == (len(train), 1, 8, 8) and train.x.dtype == torch.float32
    assert float(train.x.min()) == 0.0 and float(train.x.max()) == 1.0
    assert train.y.dtype == torch.int64 and set(test.y.tolist()) == set(range(10))


@pytest.mark.parametrize("num_partitions", [10, 50])
def test_partitions_are_disjoint_two_class_and_cover_the_training_set(num_partitions):
    train, _ = load_dataset("digits", 0.2, 0)
    parts = pathological_partitions("digits", 0.2, 0, num_partitions)
    joined = np.concatenate(parts)
    assert len(joined) == len(set(joined.tolist())) == len(train)
    assert all(1 <= len(set(train.y[p].tolist())) <= 2 for p in parts)
    first = load_partition("digits", 0.2, 0, 0, num_partitions)
    assert torch.equal(first.y, train.y[torch.as_tensor(parts[0])])


@pytest.mark.parametrize("partition_id", [-1, 5])
def test_partition_id_out_of_range(partition_id):
    with pytest.raises(ValueError, match="partition-id"):
        load_partition("digits", 0.2, 0, partition_id, 5)


def test_five_partitions_use_every_class():
    train, _ = load_dataset("digits", 0.2, 0)
    parts = pathological_partitions("digits", 0.2, 0, 5)
    used = set().union(*(set(train.y[p].tolist()) for p in parts))
    assert used == set(range(10))
    assert sum(len(p) for p in parts) == len(train)


def test_every_client_holds_exactly_two_classes_with_balanced_shares():
    train, _ = load_dataset("digits", 0.2, 0)
    parts = pathological_partitions("digits", 0.2, 0, 50)
    assert all(len(set(train.y[p].tolist())) == 2 for p in parts)
    for label in range(10):  # a class's images are split evenly among its 10 holders
        shares = [int((train.y[p] == label).sum()) for p in parts if (train.y[p] == label).any()]
        assert len(shares) == 10 and max(shares) - min(shares) <= 1


def test_too_few_partitions_to_cover_the_classes_is_an_error():
    with pytest.raises(ValueError, match="4 partitions x 2 classes cannot cover all 10 classes"):
        pathological_partitions("digits", 0.2, 0, 4)
