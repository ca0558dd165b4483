"""Reader of IDX files (MNIST, Fashion-MNIST), raw or gzipped."""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np

from .specs import DatasetError, DatasetNotFoundError, RawDataset


def idx_file(root: Path, stem: str) -> Path | None:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (raw or .gz): big-endian magic (0, 0, dtype 0x08 = uint8, ndim), dims, data.

    Parameters
    ----------
    path : Path
        The file; a `.gz` suffix means gzipped.

    Returns
    -------
    np.ndarray
        The uint8 array of the dimensions the header declares.

    Raises
    ------
    DatasetError
        Naming the file: unreadable (a truncated or corrupt .gz), not an IDX file of
        unsigned bytes, or holding another number of bytes than its header declares.
    """
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as file:
            data = file.read()
    except (OSError, EOFError, zlib.error) as err:  # truncated or corrupt gzip stream
        raise DatasetError(f"{path}: cannot be read ({type(err).__name__}: {err})") from err
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DatasetError(f"{path}: not an IDX file of unsigned bytes (magic {data[:4].hex()})")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise DatasetError(f"{path}: truncated header ({len(data)} bytes for {ndim} dimensions)")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    size = math.prod(dims)  # Python ints: numpy's product of four 2**16 dims wraps to 0
    if body.size != size:
        raise DatasetError(f"{path}: header says {dims} ({size} bytes) but holds {body.size}")
    return body.reshape(dims)


def from_idx(root: Path) -> RawDataset:
    """The IDX files of MNIST's layout under `root`: train and t10k, images and labels; a
    DatasetError names the file whose dimensions or count do not match."""

    def pair(prefix: str) -> tuple[np.ndarray, np.ndarray]:
        images_file = idx_file(root, f"{prefix}-images-idx3-ubyte")
        labels_file = idx_file(root, f"{prefix}-labels-idx1-ubyte")
        if images_file is None or labels_file is None:
            raise DatasetNotFoundError(f"{root}: missing {prefix}-images-idx3-ubyte or {prefix}-labels-idx1-ubyte")
        images, labels = read_idx(images_file), read_idx(labels_file)
        if images.ndim != 3 or labels.ndim != 1:
            wrong, shape = (images_file, images.shape) if images.ndim != 3 else (labels_file, labels.shape)
            raise DatasetError(f"{wrong}: dimensions {shape}, expected (N, H, W) images and (N,) labels")
        if len(images) != len(labels):
            raise DatasetError(f"{images_file} holds {len(images)} images but {labels_file} {len(labels)} labels")
        return images[:, None, :, :], labels.astype(np.int64)

    return RawDataset(*pair("train"), *pair("t10k"))
