"""Reader of image folders (train/<class>/, test/<class>/), plain or inside a .tar.gz."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np

from .specs import DatasetNotFoundError, RawDataset


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes -> uint8 (C, H, W)."""
    from PIL import Image

    image = np.asarray(Image.open(io.BytesIO(data)))
    return image[None, :, :] if image.ndim == 2 else image.transpose(2, 0, 1)


def stack(images: list[np.ndarray], labels: list[int]) -> tuple[np.ndarray, np.ndarray]:
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def from_image_folder(root: Path) -> RawDataset:
    """torchvision's ImageFolder layout: train/<class>/* and test/<class>/*."""
    tree = {
        part: {
            cls.name: [(f.name, f.read_bytes) for f in cls.iterdir()] for cls in (root / part).iterdir() if cls.is_dir()
        }
        for part in ("train", "test")
    }
    return decode_tree(tree, root)


def from_tarball(tarball: Path) -> RawDataset:
    """An image-folder tree inside a .tar.gz, decoded straight from the archive."""
    tree: dict[str, dict[str, list]] = {"train": {}, "test": {}}
    with tarfile.open(tarball) as archive:
        for member in archive:
            parts = Path(member.name).parts
            if member.isfile() and len(parts) >= 3 and parts[-3] in tree:
                extracted = archive.extractfile(member)  # a regular file (isfile): never None
                assert extracted is not None
                data = extracted.read()
                tree[parts[-3]].setdefault(parts[-2], []).append((parts[-1], lambda data=data: data))
    return decode_tree(tree, tarball)


def decode_tree(tree: dict[str, dict[str, list]], source: Path) -> RawDataset:
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
                images.append(decode_image(read()))
                labels.append(label)
        return stack(images, labels)

    return RawDataset(*split("train"), *split("test"))
