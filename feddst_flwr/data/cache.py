"""Loading a named dataset (digits, local files or the hub), decoded once and cached as .npy."""

from __future__ import annotations

import hashlib
import os
import shutil
from functools import lru_cache
from pathlib import Path

import numpy as np

from . import digits, hub, local
from .specs import DATASETS, SPECS, RawDataset


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


def cached(name: str, source: str, decode, cache_dir: Path) -> RawDataset:
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
