"""Benchmark: the steady-state round time of our Ray simulation against a bare single-process
PyTorch loop doing the same local work, side by side in one run (issue 12).

Both run the MNIST paper preset (conf/mnist-paper.toml: 400 clients of 2 classes x 20 images,
20 clients a round, 10 local epochs, batch 32, the paper's CNN at S = 0.8, FedDST). The bare
loop trains the same clients (same partitions, model, masks, epochs and batch size, with
`training.train`) one after the other in this process and averages them; nothing else. Round
times are the differences of the server's `wall-time` (simulation) or of a timer (bare loop);
"steady" is every round after the first two, the last round (it evaluates) excluded.

    python bench/round_time.py [--rounds 12] [--supernodes 400] [--device cpu] [--threads N] [--bare-only]

`--bare-only` times the bare loop alone (a GPU machine without Ray: bench/device_check.sh).
Run it alone: on 2 cores anything beside it changes both figures.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import tomllib
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import sim  # noqa: E402
from feddst_flwr.data import SPECS, load_partition, load_raw  # noqa: E402
from feddst_flwr.masks import apply_masks, layer_counts, maskable_names, masks_to, random_masks, shapes_of  # noqa: E402
from feddst_flwr.models import build_model  # noqa: E402
from feddst_flwr.registry import load_config, partition_scheme  # noqa: E402
from feddst_flwr.training import resolve_device, train  # noqa: E402


def bench_config(rounds: int, device: str, results: Path) -> dict:
    """The run config: pyproject defaults, the MNIST paper preset, a short run without
    readjustment or evaluation before the last round."""
    defaults = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    preset = tomllib.loads((ROOT / "conf" / "mnist-paper.toml").read_text())
    return {
        **defaults, **preset, "data-dir": str((ROOT / preset["data-dir"]).resolve()), "num-server-rounds": rounds,
        "eval-interval": rounds + 1, "r-end": rounds, "delta-r": rounds + 1, "device": device, "strategy": "feddst",
        "results-dir": str(results), "run-name": f"round-time-{device}",
    }  # fmt: skip


def steady(times: list[float]) -> tuple[float, float]:
    """Median and min over the rounds after the first two."""
    rest = times[2:] or times
    return statistics.median(rest), min(rest)


def simulation_round_times(config: dict, supernodes: int, home: Path) -> list[float]:
    """Per-round seconds of a Ray simulation (`flwr run` on a local SuperLink)."""
    sim.flwr_run(config, supernodes, home)
    sim.stop_superlink(home)
    path = Path(config["results-dir"]) / config["run-name"] / "metrics.jsonl"
    wall = [json.loads(line)["wall-time"] for line in path.read_text().splitlines()]
    return [b - a for a, b in zip(wall, wall[1:])][:-1]  # the last round evaluates


def bare_round_times(config: dict, supernodes: int) -> list[float]:
    """Per-round seconds of the same local work in one process, clients one after another."""
    cfg = load_config({**config, "run-name": "bare"})
    device = resolve_device(cfg.device)
    raw = load_raw(cfg.dataset, cfg.data_dir, cfg.cache_dir, cfg.test_fraction, cfg.seed)
    scheme = partition_scheme(cfg, supernodes)
    model = build_model(cfg.model, SPECS[cfg.dataset].num_classes, cfg.seed).to(device)
    state = model.state_dict()
    names = maskable_names(model)
    masks = random_masks(shapes_of(state, names), layer_counts(shapes_of(state, names), cfg.sparsity, "erk"), cfg.seed)
    masks = masks_to(masks, device)
    apply_masks(state, masks)
    rng, times = random.Random(cfg.seed), []
    for server_round in range(1, cfg.num_server_rounds):
        started = time.perf_counter()
        updates = []
        for partition in rng.sample(range(supernodes), cfg.clients_per_round):
            data = load_partition(raw, scheme, cfg.dataset, partition).to(device)
            model.load_state_dict(state)
            train(
                model, data, masks, epochs=cfg.local_epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                momentum=cfg.momentum, weight_decay=cfg.weight_decay, proximal_mu=0.0,
                generator=torch.Generator().manual_seed(server_round * supernodes + partition),
            )  # fmt: skip
            updates.append({name: tensor.detach().clone() for name, tensor in model.state_dict().items()})
        state = {name: sum(u[name] for u in updates) / len(updates) for name in state}
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return times


def table_row(device: str, simulated: tuple[float, float] | None, bare: tuple[float, float]) -> str:
    """One device's row of (median, min) seconds; the simulation's cells are '-' without one."""
    sim_cells = "- | -" if simulated is None else f"{simulated[0]:.2f} | {simulated[1]:.2f}"
    ratio = "-" if simulated is None else f"{simulated[0] / bare[0]:.2f}"
    return f"| {device} | {sim_cells} | {bare[0]:.2f} | {bare[1]:.2f} | {ratio} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--supernodes", type=int, default=400)
    parser.add_argument("--device", choices=["cpu", "cuda"], action="append", help="default: cpu, and cuda if present")
    parser.add_argument("--threads", type=int, default=0, help="torch threads of the bare loop (0: torch's default)")
    parser.add_argument("--bare-only", action="store_true", help="time the bare loop alone (no Ray simulation)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.device or ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
    print(
        f"MNIST paper preset, {args.supernodes} supernodes, {args.rounds} rounds; bare loop with {torch.get_num_threads()} torch threads"
    )
    print("| device | simulation median s | min s | bare loop median s | min s | ratio (median) |")
    print("|---|---|---|---|---|---|", flush=True)
    for device in devices:  # each row as soon as it is measured
        with tempfile.TemporaryDirectory(prefix="feddst-round-time-") as folder:
            config = bench_config(args.rounds, device, Path(folder) / "results")
            simulated = (
                None
                if args.bare_only
                else steady(simulation_round_times(config, args.supernodes, Path(folder) / "flwr-home"))
            )
            bare = steady(bare_round_times(config, args.supernodes))
        print(table_row(device, simulated, bare), flush=True)


if __name__ == "__main__":
    main()
