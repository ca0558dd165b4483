"""Reader of Hugging Face parquet exports."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .images import decode_image, stack
from .specs import SPECS, DatasetNotFoundError, RawDataset


def parquet_files(root: Path, split: str) -> list[Path]:
    return sorted(p for p in root.rglob(f"{split}*.parquet"))


def from_parquet(name: str, root: Path) -> RawDataset:
    """Hugging Face parquet exports: an image column of {bytes, path} and a label column."""
    import pyarrow.parquet as pq

    spec = SPECS[name]

    def split(part: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        files = parquet_files(root, part)
        if not files:
            return np.empty((0,), np.uint8), np.empty((0,), np.int64), None
        table = pq.read_table(files).to_pydict()
        for key in (spec.image_key, spec.label_key) + ((spec.writer_key,) if spec.writer_key else ()):
            if key not in table:
                raise DatasetNotFoundError(f"{files[0]}: no column '{key}' (columns: {sorted(table)})")
        x, y = stack([decode_image(cell["bytes"]) for cell in table[spec.image_key]], table[spec.label_key])
        writers = np.asarray(table[spec.writer_key]) if spec.writer_key else None
        return x, y, writers

    x_train, y_train, writers = split("train")
    x_test, y_test, _ = split("test")
    return RawDataset(x_train, y_train, x_test, y_test, writers)
