"""Loading a named dataset (digits, local files or the hub), decoded once and cached as .npy."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from functools import lru_cache
from logging import WARNING
from pathlib import Path

import numpy as np
from flwr.common import log

from . import digits, hub, local
from .specs import DATASETS, SPECS, DatasetError, RawDataset, check_raw

FIELDS = ("x_train", "y_train", "x_test", "y_test", "writers")  # the cache's .npy files


@lru_cache(maxsize=2)
def load_raw(
    name: str, data_dir: str = "", cache_dir: str = "", test_fraction: float = 0.2, seed: int = 0
) -> RawDataset:
    """Decoded dataset: scikit-learn's digits, local files under data_dir, or the hub
    (only when data_dir is empty). Decoded arrays are cached under cache_dir."""
    if name not in SPECS:
        raise ValueError(f"unknown dataset '{name}'; available: {DATASETS}")
    if name == "digits":
        return digits.load_digits_split(test_fraction, seed)
    source, decode = (
        local.find_local(name, Path(data_dir)) if data_dir else (SPECS[name].hub_id, lambda: hub.from_hub(name))
    )
    raw = cached(name, source, decode, Path(cache_dir) if cache_dir else default_cache_dir())
    return with_writer_test_split(raw, test_fraction, seed) if SPECS[name].writer_key else raw


def default_cache_dir() -> Path:
    """$FEDDST_CACHE, else $XDG_CACHE_HOME/feddst-flwr, else ~/.cache/feddst-flwr."""
    if "FEDDST_CACHE" in os.environ:
        return Path(os.environ["FEDDST_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "feddst-flwr"


def cached(name: str, source: str, decode: Callable[[], RawDataset], cache_dir: Path) -> RawDataset:
    """Load the .npy cache for this source, or decode once (checked: `check_raw`) and
    write it atomically. A damaged cache (a truncated or missing .npy, arrays that fail the
    check) is logged and decoded again, its files replaced one by one, atomically; if it
    still cannot be read, a DatasetError names the file and the folder to delete."""
    key = hashlib.sha1(f"{name}|{source}|{_signature(source)}".encode()).hexdigest()[:16]
    folder = cache_dir / f"{name}-{key}"
    if not folder.is_dir():
        staging = write_arrays(cache_dir / f".{name}-{key}-{os.getpid()}", decoded(name, source, decode))
        try:
            staging.rename(folder)
        except OSError:  # another process cached it first
            shutil.rmtree(staging, ignore_errors=True)
    try:
        return read_cache(name, folder)
    except DatasetError as err:
        log(WARNING, "feddst-flwr: %s; decoding %s again", err, source)
    staging = write_arrays(cache_dir / f".{name}-{key}-{os.getpid()}", decoded(name, source, decode))
    for file in staging.iterdir():  # each replaced atomically: a reader sees the old file or the new one
        file.replace(folder / file.name)
    staging.rmdir()
    return read_cache(name, folder)


def decoded(name: str, source: str, decode: Callable[[], RawDataset]) -> RawDataset:
    """`decode()`, checked against the dataset's spec; a DatasetError names `source`."""
    raw = decode()
    check_raw(name, raw, source)
    return raw


def write_arrays(folder: Path, raw: RawDataset) -> Path:
    """Save the arrays of `raw` as <field>.npy in `folder` (created); returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for field in FIELDS:
        if getattr(raw, field) is not None:
            np.save(folder / f"{field}.npy", getattr(raw, field))
    return folder


def read_cache(name: str, folder: Path) -> RawDataset:
    """The decoded arrays cached in `folder`, checked (`check_raw`); a DatasetError names a
    missing or unreadable file, or the folder, and says to delete the folder."""
    required = FIELDS if SPECS[name].writer_key else FIELDS[:-1]
    arrays = {}
    for field in FIELDS:
        path = folder / f"{field}.npy"
        if field not in required and not path.exists():
            continue
        try:
            arrays[field] = np.load(path)
        except (OSError, ValueError, EOFError) as err:  # missing, truncated, not .npy
            raise DatasetError(
                f"{path}: damaged decoded-array cache ({type(err).__name__}: {err}); "
                f"delete {folder} to decode the dataset again"
            ) from err
    raw = RawDataset(**arrays, cache=folder)
    check_raw(name, raw, f"{folder} (decoded-array cache: delete it to decode the dataset again)")
    return raw


def _signature(source: str) -> str:
    """Size and mtime of the local source (a path), so edited data invalidates the cache."""
    path = Path(source)
    if not path.exists():
        return ""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())[:2000]
    return ";".join(f"{p.name}:{p.stat().st_size}:{int(p.stat().st_mtime)}" for p in files)


def with_writer_test_split(raw: RawDataset, test_fraction: float, seed: int) -> RawDataset:
    """FEMNIST has one split: hold out test_fraction of every writer's samples (seeded)."""
    rng = np.random.default_rng(seed)
    test = np.zeros(len(raw.y_train), dtype=bool)
    writers = raw.writers
    assert writers is not None  # natural partitions only, whose datasets have writers
    for writer in np.unique(writers):
        own = rng.permutation(np.flatnonzero(writers == writer))
        test[own[: int(round(test_fraction * len(own)))]] = True
    return RawDataset(
        raw.x_train[~test], raw.y_train[~test], raw.x_train[test], raw.y_train[test], writers[~test], raw.cache
    )
