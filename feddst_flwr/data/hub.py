"""Reader of the Hugging Face hub, through flwr-datasets (needs network)."""

from __future__ import annotations

import numpy as np

from .images import stack
from .specs import SPECS, DatasetError, DatasetNotFoundError, RawDataset


def from_hub(name: str) -> RawDataset:
    """Full splits through flwr-datasets' FederatedDataset (needs network); a split that
    cannot be decoded is a DatasetError naming the hub id, the split and its cache files."""
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

    def arrays(part: str) -> tuple[np.ndarray, np.ndarray]:
        split = splits[part]
        files = [entry["filename"] for entry in split.cache_files]
        where = f"'{spec.hub_id}' {part} split" + (f" ({', '.join(files)})" if files else "")
        images: list[np.ndarray] = []
        try:
            for image in split[spec.image_key]:  # the datasets library decodes each image with PIL here
                images.append(np.asarray(image))
        except (OSError, SyntaxError, ValueError) as err:
            raise DatasetError(
                f"{where}, row {len(images)}: not a readable image ({type(err).__name__}: {err})"
            ) from err
        images = [im[None] if im.ndim == 2 else im.transpose(2, 0, 1) for im in images]
        x, y = stack(images, split[spec.label_key], lambda row: f"{where}, row {row}")
        return x.astype(np.uint8), y

    train = arrays("train")
    writers = np.asarray(splits["train"][spec.writer_key]) if spec.writer_key else None
    test = arrays("test") if "test" in splits else (np.empty((0,), np.uint8), np.empty((0,), np.int64))
    return RawDataset(train[0], train[1], test[0], test[1], writers)
