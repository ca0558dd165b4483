"""Benchmark: bytes on the wire per message kind, for the paper's MNIST and CIFAR-10 models
at S = 0.5, 0.8 and 0.9 (ERK), against a dense float32 message and the entropy bounds (issue 13).

Every payload is built by the codec the apps use (`codec.encode`) and measured with
`codec.payload_bytes`, as the byte meter does. Message kinds:
  upload            the sparse values a client sends on a round without readjustment
  download, mask    values + the full mask (a node that holds no mask version)
  download          values only (the node holds the current mask)
  upload, readjust  values + the client's mask as a delta from the mask it was sent; the
  = download, delta same size as values + the global mask as a delta from the version a
                    node holds, when the global mask moved as much
A readjustment swaps k = round(alpha_r * active) positions per layer (drop k, grow k), as
`masks.prune_and_regrow` does; which positions does not change the coded size (the coder's
model depends on the counts only). `alpha_r` is the preset's first readjust round (the
largest) and the mean over its schedule; a changed global mask is assumed to move as much as
one client's readjustment. Mask bits per parameter are compared with the bound
sum_l n_l H(d_l) (full, d_l the layer's density) and sum_l n_l H(q_l) (delta, q_l the
layer's fraction of positions that changed).

    python bench/wire.py [--value-dtype float32|float16|both]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import tomllib
import torch
from flwr.app import ArrayRecord

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from feddst_flwr.codec import MASK_SUFFIX, HeldMask, encode, payload_bytes  # noqa: E402
from feddst_flwr.masks import Masks, layer_counts, maskable_names, random_masks, readjust_alpha, shapes_of  # noqa: E402
from feddst_flwr.models import build_model  # noqa: E402

PRESETS = {"MNIST": "mnist-paper", "CIFAR-10": "cifar10-paper"}
SPARSITIES = (0.5, 0.8, 0.9)


def entropy(p: float) -> float:
    """Binary entropy in bits."""
    return 0.0 if p <= 0.0 or p >= 1.0 else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def readjusted(masks: Masks, alpha_r: float, generator: torch.Generator) -> Masks:
    """Each layer with round(alpha_r * active) active positions dropped and as many grown."""
    new = {}
    for name, mask in masks.items():
        flat, count = mask.flatten().clone(), int(mask.sum())
        k = round(alpha_r * count)
        if k and count < flat.numel():
            on, off = torch.nonzero(flat).flatten(), torch.nonzero(~flat).flatten()
            flat[on[torch.randperm(len(on), generator=generator)[:k]]] = False
            flat[off[torch.randperm(len(off), generator=generator)[:k]]] = True
        new[name] = flat.view(mask.shape)
    return new


def mask_bytes(record: ArrayRecord) -> int:
    return sum(len(array.data) for key, array in record.items() if key.endswith(MASK_SUFFIX))


def schedule(preset: dict) -> list[float]:
    """alpha_r of every readjust round of the preset."""
    rounds = range(1, preset["r-end"] + 1)
    return [
        a for a in (readjust_alpha(r, preset["alpha"], preset["delta-r"], preset["r-end"]) for r in rounds) if a > 0
    ]


def rows(dataset: str, sparsity: float, value_dtype: str) -> list[str]:
    """The table rows of one model, sparsity and value dtype."""
    preset = tomllib.loads((ROOT / "conf" / f"{PRESETS[dataset]}.toml").read_text())
    model = build_model(preset["model"], 10, 0)
    state = model.state_dict()
    maskable = maskable_names(model)
    shapes = shapes_of(state, maskable)
    n = sum(math.prod(shape) for shape in shapes.values())
    counts = layer_counts(shapes, sparsity, preset["sparsity-distribution"])
    masks = random_masks(shapes, counts, 0)
    dense = payload_bytes(ArrayRecord(state))
    full_bound = sum(math.prod(shapes[k]) * entropy(counts[k] / math.prod(shapes[k])) for k in shapes)

    def line(kind: str, record: ArrayRecord, bound: float | None = None) -> str:
        size, bits = payload_bytes(record), mask_bytes(record) * 8
        mask = f"{bits / n:.4f} | {bits / bound:.3f}" if bound else "- | -"
        return f"| {dataset} | {sparsity} | {value_dtype} | {kind} | {size:,} | {size / dense:.4f} | {mask} |"

    out = [
        line("upload", encode(state, masks, False, value_dtype)),
        line("download, mask", encode(state, masks, True, value_dtype), full_bound),
        line("download", encode(state, masks, False, value_dtype)),
    ]
    alphas = schedule(preset)
    for label, alpha_r in (("first", alphas[0]), ("mean", statistics.mean(alphas))):
        moved = readjusted(masks, alpha_r, torch.Generator().manual_seed(1))
        changed = {k: int((moved[k] ^ masks[k]).sum()) for k in shapes}
        delta_bound = sum(math.prod(shapes[k]) * entropy(changed[k] / math.prod(shapes[k])) for k in shapes)
        delta = encode(state, moved, True, value_dtype, HeldMask(masks, 0))
        out.append(line(f"upload, readjust = download, delta ({label} alpha_r {alpha_r:.4f})", delta, delta_bound))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--value-dtype", choices=["float32", "float16", "both"], default="both")
    dtypes = ["float32", "float16"] if (choice := parser.parse_args().value_dtype) == "both" else [choice]
    print("| model | S | values | message | bytes | x dense float32 | mask bits / param | mask / entropy bound |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    for dataset in PRESETS:
        for sparsity in SPARSITIES:
            for value_dtype in dtypes:
                print("\n".join(rows(dataset, sparsity, value_dtype)), flush=True)


if __name__ == "__main__":
    main()
