"""Reader of image folders (train/<class>/, test/<class>/), plain or inside a .tar.gz."""

from __future__ import annotations

import io
import tarfile
import zlib
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np

from .specs import DatasetError, DatasetNotFoundError, RawDataset

Entry = tuple[str, str, Callable[[], bytes]]  # (file name, where it is, read its bytes)


def decode_image(data: bytes, where: Callable[[], str]) -> np.ndarray:
    """Encoded image bytes -> uint8 (C, H, W); a DatasetError names `where()` (the file, or
    the file and row) when PIL cannot decode them (corrupt or truncated)."""
    from PIL import Image

    try:
        image = np.asarray(Image.open(io.BytesIO(data)))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DatasetError(f"{where()}: not a readable image ({type(err).__name__}: {err})") from err
    return image[None, :, :] if image.ndim == 2 else image.transpose(2, 0, 1)


def stack(images: list[np.ndarray], labels: Sequence, where: Callable[[int], str]) -> tuple[np.ndarray, np.ndarray]:
    """The images of one split as one (N, C, H, W) array and their labels as int64; a
    DatasetError names `where(i)`, the first sample whose image shape differs from the
    first one's or whose label is not an integer."""
    for i, image in enumerate(images):
        if image.shape != images[0].shape:
            raise DatasetError(f"{where(i)}: an image of shape {image.shape}, {where(0)} has {images[0].shape}")
    try:
        label_array = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as err:
        first = next(i for i, label in enumerate(labels) if not isinstance(label, (int, np.integer)))
        raise DatasetError(f"{where(first)}: label {labels[first]!r} is not an integer class") from err
    return np.stack(images), label_array


def from_image_folder(root: Path) -> RawDataset:
    """torchvision's ImageFolder layout: train/<class>/* and test/<class>/*."""
    tree = {
        part: {
            cls.name: [(f.name, str(f), f.read_bytes) for f in cls.iterdir()]
            for cls in (root / part).iterdir()
            if cls.is_dir()
        }
        for part in ("train", "test")
    }
    return decode_tree(tree, root)


def from_tarball(tarball: Path) -> RawDataset:
    """An image-folder tree inside a .tar.gz, decoded straight from the archive; a
    DatasetError names the archive when it is truncated or corrupt."""
    tree: dict[str, dict[str, list[Entry]]] = {"train": {}, "test": {}}
    try:
        with tarfile.open(tarball) as archive:
            for member in archive:
                parts = Path(member.name).parts
                if member.isfile() and len(parts) >= 3 and parts[-3] in tree:
                    extracted = archive.extractfile(member)  # a regular file (isfile): never None
                    assert extracted is not None
                    data = extracted.read()
                    entry = (parts[-1], f"{tarball}:{member.name}", lambda data=data: data)
                    tree[parts[-3]].setdefault(parts[-2], []).append(entry)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:  # truncated or corrupt archive
        raise DatasetError(f"{tarball}: cannot be read ({type(err).__name__}: {err})") from err
    return decode_tree(tree, tarball)


def decode_tree(tree: dict[str, dict[str, list[Entry]]], source: Path) -> RawDataset:
    """Decode {split: {class: [(file name, where it is, read bytes)]}}; classes are the
    sorted folder names, which must be the same in train and test."""
    classes = sorted(tree["train"])
    if not classes or sorted(tree["test"]) != classes:
        raise DatasetNotFoundError(
            f"{source}: expected train/<class>/ and test/<class>/ with the same classes, "
            f"found train {classes} and test {sorted(tree['test'])}"
        )

    def split(part: str) -> tuple[np.ndarray, np.ndarray]:
        images, labels, places = [], [], []
        for label, cls in enumerate(classes):
            for _, where, read in sorted(tree[part][cls], key=lambda entry: entry[0]):
                images.append(decode_image(read(), partial(str, where)))  # where it is, for an error
                labels.append(label)
                places.append(where)
        if not images:
            raise DatasetError(f"{source}: no images in {part}/<class>/")
        return stack(images, labels, places.__getitem__)

    return RawDataset(*split("train"), *split("test"))
