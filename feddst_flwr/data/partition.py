"""Non-IID partitions of the training set over clients: the paper's pathological split, and
flwr-datasets' IID, Dirichlet and natural-id partitioners; cached next to the decoded arrays.

The pathological split stays ours: flwr-datasets' PathologicalPartitioner has no per-class
shard size, and its random class assignment draws each client's classes independently, so
some classes may be held by no client and others by many; LotteryFL's scheme (the paper's)
reads classes from random permutations, so every class is held about equally often."""

from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from logging import WARNING
from pathlib import Path

import numpy as np
from flwr.common import log

from .specs import DatasetError, RawDataset, TensorData, to_tensors

PARTITIONS = ("pathological", "dirichlet", "iid", "natural")


@dataclass(frozen=True)
class PartitionScheme:
    """How the training set is split over clients (run-config keys of the same names)."""

    kind: str = "pathological"
    num_partitions: int = 50
    shard_size: int = 0  # pathological: images per class per client (0: split each class among its holders)
    classes_per_client: int = 2
    beta: float = 0.5  # dirichlet concentration
    seed: int = 0


@lru_cache(maxsize=4)
def partitions(raw: RawDataset, scheme: PartitionScheme) -> tuple[np.ndarray, ...]:
    """Training indices of every client, cached next to the dataset's decoded arrays."""
    if raw.cache is None:
        return _partitions(raw, scheme)
    digest = hashlib.sha1(repr(scheme).encode() + raw.y_train.tobytes())  # content-addressed: every split
    if raw.writers is not None:
        digest.update(raw.writers.astype(str).tobytes())
    path = raw.cache / f"partitions-{digest.hexdigest()[:16]}.npz"
    if not path.exists():
        _store(path, _partitions(raw, scheme))
    try:
        return _load(path)
    except DatasetError as err:
        log(WARNING, "feddst-flwr: %s; computing the partitions again", err)
    _store(path, _partitions(raw, scheme))
    return _load(path)


def _store(path: Path, parts: tuple[np.ndarray, ...]) -> None:
    """Write the partitions to `path` atomically (a temporary file, then rename over it)."""
    staging = path.with_suffix(f".{os.getpid()}.npz")
    np.savez(staging, *parts)
    staging.replace(path)


def _load(path: Path) -> tuple[np.ndarray, ...]:
    """The partitions stored at `path`; a DatasetError names a damaged file."""
    try:
        with np.load(path) as stored:
            return tuple(stored[f"arr_{i}"] for i in range(len(stored.files)))
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:  # truncated or not .npz
        raise DatasetError(
            f"{path}: damaged partition cache ({type(err).__name__}: {err}); delete it to compute the partitions again"
        ) from err


def _partitions(raw: RawDataset, scheme: PartitionScheme) -> tuple[np.ndarray, ...]:
    labels = raw.y_train
    if scheme.kind == "pathological":
        return _pathological(labels, scheme)
    if scheme.kind == "iid":  # IidPartitioner takes contiguous shards: shuffle the rows first
        from flwr_datasets.partitioner import IidPartitioner

        order = np.random.default_rng(scheme.seed).permutation(len(labels))
        return _run_partitioner(IidPartitioner(scheme.num_partitions), index=order)
    if scheme.kind == "dirichlet":
        from flwr_datasets.partitioner import DirichletPartitioner

        partitioner = DirichletPartitioner(scheme.num_partitions, "label", scheme.beta, seed=scheme.seed)
        return _run_partitioner(partitioner, index=np.arange(len(labels)), label=labels)
    if scheme.kind == "natural":
        return _natural(raw, scheme)
    raise ValueError(f"unknown partition '{scheme.kind}'; available: {PARTITIONS}")


def _run_partitioner(partitioner, **columns: np.ndarray) -> tuple[np.ndarray, ...]:
    """Indices of every partition a flwr-datasets partitioner makes of rows with these columns."""
    from datasets import Dataset

    partitioner.dataset = Dataset.from_dict(columns)
    return tuple(
        np.sort(partitioner.load_partition(i).with_format("arrow")["index"].to_numpy())
        for i in range(partitioner.num_partitions)
    )


def _natural(raw: RawDataset, scheme: PartitionScheme) -> tuple[np.ndarray, ...]:
    """One client per natural id (FEMNIST writer); num_partitions of them, chosen by seed."""
    if raw.writers is None:
        raise ValueError("partition 'natural' needs a dataset with natural ids (femnist)")
    from flwr_datasets.partitioner import NaturalIdPartitioner

    per_writer = _run_partitioner(NaturalIdPartitioner("writer"), index=np.arange(len(raw.writers)), writer=raw.writers)
    if scheme.num_partitions > len(per_writer):
        raise ValueError(f"{scheme.num_partitions} partitions requested but the data has {len(per_writer)} writers")
    chosen = np.random.default_rng(scheme.seed).permutation(len(per_writer))[: scheme.num_partitions]
    return tuple(per_writer[i] for i in chosen)


def _pathological(labels: np.ndarray, scheme: PartitionScheme) -> tuple[np.ndarray, ...]:
    """LotteryFL's scheme: every client holds classes_per_client distinct classes and
    shard_size images of each (label-sorted shards); shard_size 0 splits each class's
    images evenly among the clients holding it."""
    rng = np.random.default_rng(scheme.seed)
    num_classes = int(labels.max()) + 1
    holders = _class_assignment(num_classes, scheme.num_partitions, scheme.classes_per_client, rng)
    parts: list[list[np.ndarray]] = [[] for _ in range(scheme.num_partitions)]
    for label, clients in enumerate(holders):
        pool = rng.permutation(np.flatnonzero(labels == label))
        if scheme.shard_size:
            needed = scheme.shard_size * len(clients)
            if needed > len(pool):
                raise ValueError(
                    f"class {label} has {len(pool)} training images but {len(clients)} clients x shard-size "
                    f"{scheme.shard_size} = {needed} are needed; lower shard-size or the number of partitions"
                )
            chunks = np.split(pool[:needed], len(clients))
        else:
            chunks = np.array_split(pool, len(clients))
        for client, chunk in zip(clients, chunks):
            parts[client].append(chunk)
    return tuple(np.sort(np.concatenate(chunks)) for chunks in parts)


def _class_assignment(
    num_classes: int, num_partitions: int, per_partition: int, rng: np.random.Generator
) -> list[list[int]]:
    """For each class, the clients holding it: clients read their classes `per_partition`
    at a time from a sequence of random permutations of all classes (balanced use)."""
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


def load_partition(raw: RawDataset, scheme: PartitionScheme, name: str, partition_id: int) -> TensorData:
    """One client's training data as normalised tensors."""
    if not 0 <= partition_id < scheme.num_partitions:
        raise ValueError(f"partition-id {partition_id} is outside [0, {scheme.num_partitions})")
    index = partitions(raw, scheme)[partition_id]
    return to_tensors(name, raw.x_train[index], raw.y_train[index])
