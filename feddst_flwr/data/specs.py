"""What the loaders, partitioners and models know of each named dataset, and the two
forms data takes: decoded uint8 splits (RawDataset) and a client's tensors (TensorData)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


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


class DatasetError(ValueError):
    """A dataset file is damaged or inconsistent (truncated, undecodable, images and labels
    that do not match, labels outside the dataset's classes); the message names the file."""


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


def check_raw(name: str, raw: RawDataset, where: str) -> None:
    """Decoded splits a run can use: uint8 images (N, C, H, W), as many int labels, each in
    [0, num_classes) of the dataset's spec, and one writer per training sample when there
    are writers.

    Parameters
    ----------
    name : str
        The dataset (a key of SPECS).
    raw : RawDataset
        The decoded dataset.
    where : str
        What the splits were read from (a file or folder, a hub id), for the error.

    Raises
    ------
    DatasetError
        Naming `where`, the split and the problem.
    """
    num_classes = SPECS[name].num_classes
    for split, x, y in (("train", raw.x_train, raw.y_train), ("test", raw.x_test, raw.y_test)):
        if x.dtype != np.uint8 or (len(x) and x.ndim != 4):
            raise DatasetError(f"{where}: {split} images are {x.dtype} of shape {x.shape}, expected uint8 (N, C, H, W)")
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise DatasetError(f"{where}: {split} labels are {y.dtype} of shape {y.shape}, expected integers (N,)")
        if len(x) != len(y):
            raise DatasetError(f"{where}: the {split} split has {len(x)} images and {len(y)} labels")
        outside = np.flatnonzero((y < 0) | (y >= num_classes))
        if len(outside):
            raise DatasetError(
                f"{where}: {split} label {y[outside[0]]} (sample {outside[0]}; {len(outside)} such labels) is "
                f"outside [0, {num_classes}): dataset '{name}' has {num_classes} classes"
            )
    if raw.writers is not None and len(raw.writers) != len(raw.y_train):
        raise DatasetError(f"{where}: {len(raw.writers)} writer ids for {len(raw.y_train)} training samples")
