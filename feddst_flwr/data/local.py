"""Finding a dataset under data-dir: the folder names and file layouts tried, each with its reader."""

from __future__ import annotations

from pathlib import Path

from . import idx, images, parquet
from .specs import SPECS, DatasetNotFoundError


def find_local(name: str, data_dir: Path):
    """(source path, decoder) of the first local layout found under the dataset's own
    folder names; DatasetNotFoundError listing every place tried otherwise."""
    spec = SPECS[name]
    names = [name, f"{name}-jpg", f"{name}-png"] + ([f"{spec.idx_dir}/raw"] if spec.idx_dir else [])
    roots = [data_dir / n for n in names] + ([data_dir] if data_dir.name in names else [])
    tried = []
    for root in roots:
        for layout, probe, decoder in layouts(name):
            tried.append(f"{root}/{layout}")
            found = probe(root) if root.is_dir() else None
            if found is not None:
                return str(found), lambda found=found, decoder=decoder: decoder(found)
    raise DatasetNotFoundError(
        f"dataset '{name}' not found under data-dir '{data_dir}'. Tried:\n  " + "\n  ".join(tried) + "\n"
        f"Provide one of these layouts, or leave data-dir empty to download '{spec.hub_id}' from the "
        "Hugging Face hub (see docs/configuration.md, 'Datasets')."
    )


def layouts(name: str) -> list:
    """(description, probe(root) -> source or None, decoder(source)) of each local format."""
    parquet_layout = ("**/train*.parquet (+ test*.parquet, Hugging Face export)",
                      lambda root: root if parquet.parquet_files(root, "train") else None,
                      lambda root: parquet.from_parquet(name, root))  # fmt: skip
    if SPECS[name].writer_key:  # natural ids only come with parquet
        return [parquet_layout]
    return [
        ("{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] (IDX)",
         lambda root: root if idx.idx_file(root, "train-images-idx3-ubyte") else None, idx.from_idx),
        ("train/<class>/*.png|jpg and test/<class>/ (image folder)",
         lambda root: root if (root / "train").is_dir() and (root / "test").is_dir() else None, images.from_image_folder),
        ("*.tar.gz of an image folder",
         lambda root: next(iter(sorted(root.glob("*.tar.gz")) + sorted(root.glob("*.tgz"))), None), images.from_tarball),
        parquet_layout,
    ]  # fmt: skip
