"""Datasets (hub or local files, decoded once and cached as .npy) and non-IID partitions.

Images are kept as uint8 (N, C, H, W) arrays; a client converts only its own subset to
normalised float32 tensors, once, so the training loop does no per-sample work.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import tarfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

PARTITIONS = ("pathological", "dirichlet", "iid", "natural")


@dataclass(frozen=True)
class DatasetSpec:
    """What the loaders and the models need to know about a named dataset."""

    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hub_id: str = ""
    image_key: str = "image"
    label_key: str = "label"
    idx_dir: str = ""  # torchvision's folder name for IDX files (MNIST/raw)
    scale: float = 255.0  # raw pixel value of full intensity
    writer_key: str = ""  # natural-partition column (FEMNIST)


SPECS = {
    "digits": DatasetSpec(10, (0.0,), (1.0,), scale=16.0),
    "mnist": DatasetSpec(10, (0.1307,), (0.3081,), "ylecun/mnist", idx_dir="MNIST"),
    "fashion-mnist": DatasetSpec(10, (0.2860,), (0.3530,), "zalando-datasets/fashion_mnist", idx_dir="FashionMNIST"),
    "cifar10": DatasetSpec(10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "uoft-cs/cifar10", "img"),
    "cifar100": DatasetSpec(
        100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), "uoft-cs/cifar100", "img", "fine_label"
    ),
    # LEAF feeds FEMNIST's CNN raw [0, 1] intensities
    "femnist": DatasetSpec(62, (0.0,), (1.0,), "flwrlabs/femnist", "image", "character", writer_key="writer_id"),
}
DATASETS = tuple(SPECS)


class DatasetNotFoundError(FileNotFoundError):
    """A named dataset is in none of the places tried."""


@dataclass(frozen=True)
class TensorData:
    """Images (N, C, H, W float32) and integer labels (N,)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device: torch.device) -> TensorData:
        return TensorData(self.x.to(device), self.y.to(device))


@dataclass(frozen=True, eq=False)  # hashed by identity: load_raw's cached object keys partitions()
class RawDataset:
    """Decoded splits as uint8 images (N, C, H, W) and int64 labels; writers for FEMNIST."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    writers: np.ndarray | None = None  # natural id of each training sample
    cache: Path | None = None  # folder of the decoded-array cache; partitions are cached there too


def to_tensors(name: str, x: np.ndarray, y: np.ndarray) -> TensorData:
    """Normalise uint8 images to float32 tensors with the dataset's mean and std."""
    spec = SPECS[name]
    images = torch.from_numpy(np.ascontiguousarray(x)).float().div_(spec.scale)
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    return TensorData((images - mean) / std, torch.from_numpy(np.asarray(y, dtype=np.int64)))


# ---------------------------------------------------------------- loading and caching


@lru_cache(maxsize=2)
def load_raw(
    name: str, data_dir: str = "", cache_dir: str = "", test_fraction: float = 0.2, seed: int = 0
) -> RawDataset:
    """Decoded dataset: scikit-learn's digits, local files under data_dir, or the hub
    (only when data_dir is empty). Decoded arrays are cached under cache_dir."""
    if name not in SPECS:
        raise ValueError(f"unknown dataset '{name}'; available: {DATASETS}")
    if name == "digits":
        return _digits(test_fraction, seed)
    source, decode = _find_local(name, Path(data_dir)) if data_dir else (SPECS[name].hub_id, lambda: _from_hub(name))
    raw = _cached(name, source, decode, Path(cache_dir) if cache_dir else default_cache_dir())
    return _with_writer_test_split(raw, test_fraction, seed) if SPECS[name].writer_key else raw


def default_cache_dir() -> Path:
    """$FEDDST_CACHE, else $XDG_CACHE_HOME/feddst-flwr, else ~/.cache/feddst-flwr."""
    if "FEDDST_CACHE" in os.environ:
        return Path(os.environ["FEDDST_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "feddst-flwr"


def _cached(name: str, source: str, decode, cache_dir: Path) -> RawDataset:
    """Load the .npy cache for this source, or decode once and write it atomically."""
    key = hashlib.sha1(f"{name}|{source}|{_signature(source)}".encode()).hexdigest()[:16]
    folder = cache_dir / f"{name}-{key}"
    fields = ("x_train", "y_train", "x_test", "y_test", "writers")
    if not folder.is_dir():
        raw = decode()
        staging = cache_dir / f".{name}-{key}-{os.getpid()}"
        staging.mkdir(parents=True, exist_ok=True)
        for f in fields:
            if getattr(raw, f) is not None:
                np.save(staging / f"{f}.npy", getattr(raw, f))
        try:
            staging.rename(folder)
        except OSError:  # another process cached it first
            shutil.rmtree(staging, ignore_errors=True)
    arrays = {f: np.load(folder / f"{f}.npy") for f in fields if (folder / f"{f}.npy").exists()}
    return RawDataset(**arrays, cache=folder)


def _signature(source: str) -> str:
    """Size and mtime of the local source (a path), so edited data invalidates the cache."""
    path = Path(source)
    if not path.exists():
        return ""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())[:2000]
    return ";".join(f"{p.name}:{p.stat().st_size}:{int(p.stat().st_mtime)}" for p in files)


def _digits(test_fraction: float, seed: int) -> RawDataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.images.astype(np.uint8)[:, None, :, :]
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target.astype(np.int64), test_size=test_fraction, random_state=seed, stratify=digits.target
    )
    return RawDataset(x_train, y_train, x_test, y_test)


def _with_writer_test_split(raw: RawDataset, test_fraction: float, seed: int) -> RawDataset:
    """FEMNIST has one split: hold out test_fraction of every writer's samples (seeded)."""
    rng = np.random.default_rng(seed)
    test = np.zeros(len(raw.y_train), dtype=bool)
    for writer in np.unique(raw.writers):
        own = rng.permutation(np.flatnonzero(raw.writers == writer))
        test[own[: int(round(test_fraction * len(own)))]] = True
    return RawDataset(
        raw.x_train[~test], raw.y_train[~test], raw.x_train[test], raw.y_train[test], raw.writers[~test], raw.cache
    )


def _find_local(name: str, data_dir: Path):
    """(source path, decoder) of the first local layout found under the dataset's own
    folder names; DatasetNotFoundError listing every place tried otherwise."""
    spec = SPECS[name]
    names = [name, f"{name}-jpg", f"{name}-png"] + ([f"{spec.idx_dir}/raw"] if spec.idx_dir else [])
    roots = [data_dir / n for n in names] + ([data_dir] if data_dir.name in names else [])
    tried = []
    for root in roots:
        for layout, probe, decoder in _layouts(name):
            tried.append(f"{root}/{layout}")
            found = probe(root) if root.is_dir() else None
            if found is not None:
                return str(found), lambda found=found, decoder=decoder: decoder(found)
    raise DatasetNotFoundError(
        f"dataset '{name}' not found under data-dir '{data_dir}'. Tried:\n  " + "\n  ".join(tried) + "\n"
        f"Provide one of these layouts, or leave data-dir empty to download '{spec.hub_id}' from the "
        "Hugging Face hub (see README, 'Datasets')."
    )


def _layouts(name: str) -> list:
    """(description, probe(root) -> source or None, decoder(source)) of each local format."""
    parquet = ("**/train*.parquet (+ test*.parquet, Hugging Face export)",
               lambda root: root if _parquet_files(root, "train") else None,
               lambda root: _from_parquet(name, root))  # fmt: skip
    if SPECS[name].writer_key:  # natural ids only come with parquet
        return [parquet]
    return [
        ("{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] (IDX)",
         lambda root: root if _idx_file(root, "train-images-idx3-ubyte") else None, _from_idx),
        ("train/<class>/*.png|jpg and test/<class>/ (image folder)",
         lambda root: root if (root / "train").is_dir() and (root / "test").is_dir() else None, _from_image_folder),
        ("*.tar.gz of an image folder",
         lambda root: next(iter(sorted(root.glob("*.tar.gz")) + sorted(root.glob("*.tgz"))), None), _from_tarball),
        parquet,
    ]  # fmt: skip


def _idx_file(root: Path, stem: str) -> Path | None:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (raw or .gz): big-endian magic (0, 0, dtype 0x08 = uint8, ndim), dims, data."""
    data = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes (magic {data[:4].hex()})")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f"{path}: truncated header ({len(data)} bytes for {ndim} dimensions)")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} ({int(np.prod(dims))} bytes) but holds {body.size}")
    return body.reshape(dims)


def _from_idx(root: Path) -> RawDataset:
    def pair(prefix: str) -> tuple[np.ndarray, np.ndarray]:
        images = _idx_file(root, f"{prefix}-images-idx3-ubyte")
        labels = _idx_file(root, f"{prefix}-labels-idx1-ubyte")
        if images is None or labels is None:
            raise DatasetNotFoundError(f"{root}: missing {prefix}-images-idx3-ubyte or {prefix}-labels-idx1-ubyte")
        return read_idx(images)[:, None, :, :], read_idx(labels).astype(np.int64)

    return RawDataset(*pair("train"), *pair("t10k"))


def _decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes -> uint8 (C, H, W)."""
    from PIL import Image

    image = np.asarray(Image.open(io.BytesIO(data)))
    return image[None, :, :] if image.ndim == 2 else image.transpose(2, 0, 1)


def _stack(images: list[np.ndarray], labels: list[int]) -> tuple[np.ndarray, np.ndarray]:
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def _from_image_folder(root: Path) -> RawDataset:
    """torchvision's ImageFolder layout: train/<class>/* and test/<class>/*."""
    tree = {
        part: {
            cls.name: [(f.name, f.read_bytes) for f in cls.iterdir()] for cls in (root / part).iterdir() if cls.is_dir()
        }
        for part in ("train", "test")
    }
    return _decode_tree(tree, root)


def _from_tarball(tarball: Path) -> RawDataset:
    """An image-folder tree inside a .tar.gz, decoded straight from the archive."""
    tree: dict[str, dict[str, list]] = {"train": {}, "test": {}}
    with tarfile.open(tarball) as archive:
        for member in archive:
            parts = Path(member.name).parts
            if member.isfile() and len(parts) >= 3 and parts[-3] in tree:
                data = archive.extractfile(member).read()
                tree[parts[-3]].setdefault(parts[-2], []).append((parts[-1], lambda data=data: data))
    return _decode_tree(tree, tarball)


def _decode_tree(tree: dict[str, dict[str, list]], source: Path) -> RawDataset:
    """Decode {split: {class: [(file name, read bytes)]}}; classes are the sorted folder
    names, which must be the same in train and test."""
    classes = sorted(tree["train"])
    if not classes or sorted(tree["test"]) != classes:
        raise DatasetNotFoundError(
            f"{source}: expected train/<class>/ and test/<class>/ with the same classes, "
            f"found train {classes} and test {sorted(tree['test'])}"
        )

    def split(part: str) -> tuple[np.ndarray, np.ndarray]:
        images, labels = [], []
        for label, cls in enumerate(classes):
            for _, read in sorted(tree[part][cls], key=lambda entry: entry[0]):
                images.append(_decode_image(read()))
                labels.append(label)
        return _stack(images, labels)

    return RawDataset(*split("train"), *split("test"))


def _parquet_files(root: Path, split: str) -> list[Path]:
    return sorted(p for p in root.rglob(f"{split}*.parquet"))


def _from_parquet(name: str, root: Path) -> RawDataset:
    """Hugging Face parquet exports: an image column of {bytes, path} and a label column."""
    import pyarrow.parquet as pq

    spec = SPECS[name]

    def split(part: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        files = _parquet_files(root, part)
        if not files:
            return np.empty((0,), np.uint8), np.empty((0,), np.int64), None
        table = pq.read_table(files).to_pydict()
        for key in (spec.image_key, spec.label_key) + ((spec.writer_key,) if spec.writer_key else ()):
            if key not in table:
                raise DatasetNotFoundError(f"{files[0]}: no column '{key}' (columns: {sorted(table)})")
        x, y = _stack([_decode_image(cell["bytes"]) for cell in table[spec.image_key]], table[spec.label_key])
        writers = np.asarray(table[spec.writer_key]) if spec.writer_key else None
        return x, y, writers

    x_train, y_train, writers = split("train")
    x_test, y_test, _ = split("test")
    return RawDataset(x_train, y_train, x_test, y_test, writers)


def _from_hub(name: str) -> RawDataset:
    """Full splits through flwr-datasets' FederatedDataset (needs network)."""
    from flwr_datasets import FederatedDataset

    spec = SPECS[name]
    try:
        fds = FederatedDataset(dataset=spec.hub_id, partitioners={"train": 1}, shuffle=False)
        splits = {part: fds.load_split(part) for part in (["train"] if spec.writer_key else ["train", "test"])}
    except Exception as err:  # the hub client raises many types when offline
        raise DatasetNotFoundError(
            f"dataset '{name}': could not load '{spec.hub_id}' from the Hugging Face hub ({type(err).__name__}: "
            f"{err}). Set run-config data-dir to a folder with local files (see README, 'Datasets')."
        ) from err

    def arrays(split) -> tuple[np.ndarray, np.ndarray]:
        images = [np.asarray(img) for img in split[spec.image_key]]
        images = [im[None] if im.ndim == 2 else im.transpose(2, 0, 1) for im in images]
        return np.stack(images).astype(np.uint8), np.asarray(split[spec.label_key], dtype=np.int64)

    train = arrays(splits["train"])
    writers = np.asarray(splits["train"][spec.writer_key]) if spec.writer_key else None
    test = arrays(splits["test"]) if "test" in splits else (np.empty((0,), np.uint8), np.empty((0,), np.int64))
    return RawDataset(*train, *test, writers)


# ---------------------------------------------------------------- partitions


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
        parts = _partitions(raw, scheme)
        staging = path.with_suffix(f".{os.getpid()}.npz")
        np.savez(staging, *parts)
        staging.replace(path)
    with np.load(path) as stored:
        return tuple(stored[f"arr_{i}"] for i in range(len(stored.files)))


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


def client_test_weights(
    raw: RawDataset, parts: tuple[np.ndarray, ...], scheme: PartitionScheme, num_classes: int
) -> np.ndarray:
    """(clients, classes) weights of each client's test set over the classes: for
    `pathological` all test images of the client's classes (the paper's protocol), else
    the client's own training label distribution. Rows sum to 1."""
    counts = np.stack([np.bincount(raw.y_train[p], minlength=num_classes) for p in parts]).astype(np.float64)
    if scheme.kind == "pathological":
        counts = (counts > 0) * np.bincount(raw.y_test, minlength=num_classes)
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


def load_partition(raw: RawDataset, scheme: PartitionScheme, name: str, partition_id: int) -> TensorData:
    """One client's training data as normalised tensors."""
    if not 0 <= partition_id < scheme.num_partitions:
        raise ValueError(f"partition-id {partition_id} is outside [0, {scheme.num_partitions})")
    index = partitions(raw, scheme)[partition_id]
    return to_tensors(name, raw.x_train[index], raw.y_train[index])
