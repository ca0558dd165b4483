"""Benchmark: dataset decode and cache, building 400 partitions, and a client's data loading
per round against its local training time (issue 3's speed targets).

    python bench/data_loading.py --data-dir ../shared/data [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from feddst_flwr.data import PartitionScheme, load_partition, load_raw, partitions
from feddst_flwr.masks import layer_counts, maskable_names, random_masks, shapes_of
from feddst_flwr.models import build_model
from feddst_flwr.training import train

PRESETS = {"mnist": "mnist-cnn", "cifar10": "cifar10-cnn"}


def timed(fn, *args, **kwargs):
    """(fn(*args, **kwargs), seconds it took)."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--cache-dir", default="")
    args = parser.parse_args()
    cache = args.cache_dir or tempfile.mkdtemp(prefix="feddst-bench-")
    torch.set_num_threads(1)
    for name, model_name in PRESETS.items():
        load_raw.cache_clear()
        _, first = timed(load_raw, name, args.data_dir, cache)
        load_raw.cache_clear()
        raw, cached = timed(load_raw, name, args.data_dir, cache)
        print(f"{name}: first decode {first:.2f} s, cached load {cached:.2f} s ({len(raw.y_train)} train images)")
        for kind in ("pathological", "iid", "dirichlet"):
            scheme = PartitionScheme(kind, 400, shard_size=20 if kind == "pathological" else 0, beta=0.5)
            partitions.cache_clear()
            _, built = timed(partitions, raw, scheme)
            partitions.cache_clear()
            _, reloaded = timed(partitions, raw, scheme)
            print(f"  400 {kind} partitions: built {built:.2f} s, from cache {reloaded:.3f} s")
        scheme = PartitionScheme("pathological", 400, shard_size=20)
        _, first_loading = timed(load_partition, raw, scheme, name, 7)  # reads the partition cache
        data, loading = timed(load_partition, raw, scheme, name, 7)  # every later round
        model = build_model(model_name, 10, 0)
        state = model.state_dict()
        shapes = shapes_of(state, maskable_names(model))
        masks = random_masks(shapes, layer_counts(shapes, 0.8), 0)
        _, training = timed(
            train, model, data, masks, epochs=10, batch_size=32, lr=0.01, momentum=0.9, weight_decay=1e-3,
            proximal_mu=0.0, generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
        print(
            f"  client round ({len(data)} images, preset E=10, batch 32): data loading {loading * 1e3:.2f} ms "
            f"({first_loading * 1e3:.1f} ms the first time in a process), training {training * 1e3:.0f} ms "
            f"-> loading is {100 * loading / training:.2f}% of training ({100 * first_loading / training:.1f}% first)"
        )


if __name__ == "__main__":
    main()
