"""Benchmark: many simulated SuperNodes (issue 12): the MNIST paper preset with 1,000 and 5,000
supernodes for a few rounds (at 5,000, 5 images per class per client instead of 20: MNIST
holds no more), printing the peak summed RSS of every process the run started
(SuperLink, simulation runtime, Ray and its workers) and the seconds per round.

    python bench/scale.py [--supernodes 1000 5000] [--rounds 3]

RSS is read from /proc every half second and summed over the processes whose environment
carries the run's own FLWR_HOME (the SuperLink, the simulation runtime, Ray and its workers all
inherit it); shared pages count once per process, as `ps` shows them. Run it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from round_time import bench_config  # noqa: E402

import sim  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")
SMALLEST_CLASS = 5421  # MNIST training images of digit 5, the rarest class


def shard_size(supernodes: int, preset: int = 20, classes_per_client: int = 2) -> int:
    """The preset's images per class per client where MNIST holds enough (up to about 1,350
    supernodes), else as many as the rarest class allows: each class is held by
    supernodes * classes_per_client / 10 clients."""
    holders = -(-supernodes * classes_per_client // 10)
    return min(preset, SMALLEST_CLASS // holders)


def summed_rss(marker: bytes) -> int:
    """Bytes resident in the processes whose environment contains `marker` (this one excluded)."""
    total = 0
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            if marker not in Path(f"/proc/{name}/environ").read_bytes():
                continue
            total += int(Path(f"/proc/{name}/statm").read_text().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):  # exited, or not ours to read
            pass
    return total


class PeakMemory(threading.Thread):
    """Samples the summed RSS of the processes that carry `marker` in their environment."""

    def __init__(self, marker: str, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.marker, self.interval, self.peak = marker.encode(), interval, 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.interval):
            self.peak = max(self.peak, summed_rss(self.marker))


def measure(supernodes: int, rounds: int) -> tuple[int, float]:
    """(peak summed RSS in bytes, median seconds per round after the first) of one run."""
    with tempfile.TemporaryDirectory(prefix="feddst-scale-") as folder:
        config = {
            **bench_config(rounds, "cpu", Path(folder) / "results"),
            "run-name": f"scale-{supernodes}",
            "shard-size": shard_size(supernodes),
        }
        monitor = PeakMemory(f"FLWR_HOME={Path(folder) / 'flwr-home'}")
        monitor.start()
        try:
            sim.flwr_run(config, supernodes, Path(folder) / "flwr-home")
        finally:
            sim.stop_superlink(Path(folder) / "flwr-home")
            monitor.done.set()
            monitor.join()
        path = Path(config["results-dir"]) / config["run-name"] / "metrics.jsonl"
        wall = [json.loads(line)["wall-time"] for line in path.read_text().splitlines()]
    times = [b - a for a, b in zip(wall, wall[1:])]
    return monitor.peak, statistics.median(times[1:] or times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--supernodes", type=int, nargs="+", default=[1000, 5000])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rows = [(n, *measure(n, args.rounds)) for n in args.supernodes]
    print(f"\nMNIST paper preset, {args.rounds} rounds, 20 clients a round")
    print(
        "| supernodes | images per class per client | peak summed RSS GiB | seconds per round (median after the first) |"
    )
    print("|---|---|---|---|")
    for supernodes, peak, seconds in rows:
        print(f"| {supernodes} | {shard_size(supernodes)} | {peak / 2**30:.2f} | {seconds:.2f} |")


if __name__ == "__main__":
    main()
