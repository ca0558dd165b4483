"""Reader of Hugging Face parquet exports."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

from .images import decode_image, stack
from .specs import SPECS, DatasetError, DatasetNotFoundError, RawDataset


def parquet_files(root: Path, split: str) -> list[Path]:
    return sorted(p for p in root.rglob(f"{split}*.parquet"))


def from_parquet(name: str, root: Path) -> RawDataset:
    """Hugging Face parquet exports: an image column of {bytes, path} and a label column; a
    DatasetError names the file (and row) that cannot be read."""
    import pyarrow.parquet as pq

    spec = SPECS[name]

    def split(part: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        files = parquet_files(root, part)
        if not files:
            return np.empty((0,), np.uint8), np.empty((0,), np.int64), None
        table = read_table(files)
        for key in (spec.image_key, spec.label_key) + ((spec.writer_key,) if spec.writer_key else ()):
            if key not in table:
                raise DatasetNotFoundError(f"{files[0]}: no column '{key}' (columns: {sorted(table)})")

        def where(row: int) -> str:  # the file holding a row of the concatenated table
            for file in files:
                rows = pq.ParquetFile(file).metadata.num_rows
                if row < rows:
                    return f"{file}: row {row}"
                row -= rows
            return f"{files[-1]}: row {row}"

        images = []
        for row, cell in enumerate(table[spec.image_key]):
            place = partial(where, row)
            images.append(decode_image(image_bytes(cell, place), place))
        x, y = stack(images, table[spec.label_key], where)
        writers = np.asarray(table[spec.writer_key]) if spec.writer_key else None
        return x, y, writers

    x_train, y_train, writers = split("train")
    x_test, y_test, _ = split("test")
    return RawDataset(x_train, y_train, x_test, y_test, writers)


def read_table(files: list[Path]) -> dict[str, list]:
    """The rows of `files` as columns; a DatasetError names the first file that cannot be
    read (truncated or not parquet)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(files).to_pydict()
    except (pa.ArrowException, OSError) as err:
        for file in files:
            try:
                pq.read_table(file)
            except (pa.ArrowException, OSError) as damage:
                raise DatasetError(f"{file}: cannot be read ({type(damage).__name__}: {damage})") from err
        raise DatasetError(f"{', '.join(map(str, files))}: cannot be read ({type(err).__name__}: {err})") from err


def image_bytes(cell: object, where: Callable[[], str]) -> bytes:
    """The encoded image of a parquet image cell ({bytes, path})."""
    data = cell.get("bytes") if isinstance(cell, dict) else None
    if not isinstance(data, bytes):
        raise DatasetError(f"{where()}: image cell {type(cell).__name__} holds no encoded image bytes")
    return data
