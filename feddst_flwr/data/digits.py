"""scikit-learn's bundled digits (8x8, always offline), split into train and test."""

from __future__ import annotations

import zlib
from importlib import resources

import numpy as np

from .specs import DatasetError, RawDataset


def load_digits_split(test_fraction: float, seed: int) -> RawDataset:
    """scikit-learn's digits, stratified into train and test; a DatasetError names
    scikit-learn's data file when it cannot be read (a damaged installation)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    try:
        digits = load_digits()
    except (OSError, EOFError, ValueError, zlib.error) as err:
        path = resources.files("sklearn.datasets.data") / "digits.csv.gz"
        raise DatasetError(
            f"{path}: scikit-learn's digits cannot be read ({type(err).__name__}: {err}); reinstall scikit-learn"
        ) from err
    x = digits.images.astype(np.uint8)[:, None, :, :]
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target.astype(np.int64), test_size=test_fraction, random_state=seed, stratify=digits.target
    )
    return RawDataset(x_train, y_train, x_test, y_test)
