"""Benchmark: many simulated SuperNodes (issue 12): the MNIST paper preset with 1,000 and 5,000
supernodes for a few rounds (at 5,000, 5 images per class per client instead of 20: MNIST
holds no more), printing the peak summed RSS and PSS of every process the run started
(SuperLink, simulation runtime, Ray and its workers) and the median seconds per round after
the first.

    python bench/scale.py [--supernodes 1000 5000] [--rounds 3]

Memory is read from /proc/<pid>/smaps_rollup every half second and summed over the processes
whose environment carries the run's own FLWR_HOME (the SuperLink, the simulation runtime, Ray
and its workers all inherit it): RSS counts a shared page once per process, as `ps` shows it;
PSS shares it out, so summed PSS is what the run occupies. Run it alone.
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

SMALLEST_CLASS = 5421  # MNIST training images of digit 5, the rarest class


def shard_size(supernodes: int, preset: int = 20, classes_per_client: int = 2) -> int:
    """The preset's images per class per client where MNIST holds enough (up to about 1,350
    supernodes), else as many as the rarest class allows: each class is held by
    supernodes * classes_per_client / 10 clients."""
    holders = -(-supernodes * classes_per_client // 10)
    return min(preset, SMALLEST_CLASS // holders)


def summed_memory(marker: bytes) -> tuple[int, int]:
    """(RSS, PSS) in bytes, summed over the processes whose environment contains `marker`
    (this one excluded). PSS splits each shared page among the processes that map it, so
    the summed PSS is the memory the run really occupies; summed RSS counts torch's shared
    libraries once per process."""
    rss = pss = 0
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            if marker not in Path(f"/proc/{name}/environ").read_bytes():
                continue
            rollup = Path(f"/proc/{name}/smaps_rollup").read_text().splitlines()
        except OSError:  # exited, or not ours to read
            continue
        fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in rollup[1:] if line.endswith("kB")}
        rss, pss = rss + fields.get("Rss", 0), pss + fields.get("Pss", 0)
    return rss, pss


class PeakMemory(threading.Thread):
    """Samples the summed RSS and PSS of the processes that carry `marker` in their environment."""

    def __init__(self, marker: str, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.marker, self.interval, self.peak = marker.encode(), interval, (0, 0)
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.interval):
            rss, pss = summed_memory(self.marker)
            self.peak = (max(self.peak[0], rss), max(self.peak[1], pss))


def measure(supernodes: int, rounds: int) -> tuple[tuple[int, int], float]:
    """((peak summed RSS, peak summed PSS) in bytes, median seconds per round after the
    first) of one run."""
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
    print("| supernodes | images per class per client | peak summed RSS GiB | peak summed PSS GiB | s per round |")
    print("|---|---|---|---|---|")
    for supernodes, (rss, pss), seconds in rows:
        print(f"| {supernodes} | {shard_size(supernodes)} | {rss / 2**30:.2f} | {pss / 2**30:.2f} | {seconds:.2f} |")


if __name__ == "__main__":
    main()
