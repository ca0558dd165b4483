"""Reader of IDX files (MNIST, Fashion-MNIST), raw or gzipped."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from .specs import DatasetNotFoundError, RawDataset


def idx_file(root: Path, stem: str) -> Path | None:
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


def from_idx(root: Path) -> RawDataset:
    def pair(prefix: str) -> tuple[np.ndarray, np.ndarray]:
        images = idx_file(root, f"{prefix}-images-idx3-ubyte")
        labels = idx_file(root, f"{prefix}-labels-idx1-ubyte")
        if images is None or labels is None:
            raise DatasetNotFoundError(f"{root}: missing {prefix}-images-idx3-ubyte or {prefix}-labels-idx1-ubyte")
        return read_idx(images)[:, None, :, :], read_idx(labels).astype(np.int64)

    return RawDataset(*pair("train"), *pair("t10k"))
