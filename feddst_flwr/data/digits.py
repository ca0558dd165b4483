"""scikit-learn's bundled digits (8x8, always offline), split into train and test."""

from __future__ import annotations

import numpy as np

from .specs import RawDataset


def load_digits_split(test_fraction: float, seed: int) -> RawDataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.images.astype(np.uint8)[:, None, :, :]
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target.astype(np.int64), test_size=test_fraction, random_state=seed, stratify=digits.target
    )
    return RawDataset(x_train, y_train, x_test, y_test)
