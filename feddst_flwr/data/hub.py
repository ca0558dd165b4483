"""Reader of the Hugging Face hub, through flwr-datasets (needs network)."""

from __future__ import annotations

import numpy as np

from .specs import SPECS, DatasetNotFoundError, RawDataset


def from_hub(name: str) -> RawDataset:
    """Full splits through flwr-datasets' FederatedDataset (needs network)."""
    from flwr_datasets import FederatedDataset

    spec = SPECS[name]
    try:
        fds = FederatedDataset(dataset=spec.hub_id, partitioners={"train": 1}, shuffle=False)
        splits = {part: fds.load_split(part) for part in (["train"] if spec.writer_key else ["train", "test"])}
    except Exception as err:  # the hub client raises many types when offline
        raise DatasetNotFoundError(
            f"dataset '{name}': could not load '{spec.hub_id}' from the Hugging Face hub ({type(err).__name__}: "
            f"{err}). Set run-config data-dir to a folder with local files (see docs/configuration.md, 'Datasets')."
        ) from err

    def arrays(split) -> tuple[np.ndarray, np.ndarray]:
        images = [np.asarray(img) for img in split[spec.image_key]]
        images = [im[None] if im.ndim == 2 else im.transpose(2, 0, 1) for im in images]
        return np.stack(images).astype(np.uint8), np.asarray(split[spec.label_key], dtype=np.int64)

    train = arrays(splits["train"])
    writers = np.asarray(splits["train"][spec.writer_key]) if spec.writer_key else None
    test = arrays(splits["test"]) if "test" in splits else (np.empty((0,), np.uint8), np.empty((0,), np.int64))
    return RawDataset(train[0], train[1], test[0], test[1], writers)
