"""The benchmark `bench/round_time.py` as the GPU check (bench/device_check.sh) runs it:
`--bare-only`, no Ray, one row per device."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("round_time", ROOT / "bench" / "round_time.py")
round_time = importlib.util.module_from_spec(spec)
spec.loader.exec_module(round_time)


def test_table_row_with_and_without_a_simulation():
    assert round_time.table_row("cpu", (3.6, 3.5), (2.88, 2.7)) == "| cpu | 3.60 | 3.50 | 2.88 | 2.70 | 1.25 |"
    assert round_time.table_row("cuda", None, (0.61, 0.6)) == "| cuda | - | - | 0.61 | 0.60 | - |"


def test_steady_skips_the_first_two_rounds():
    assert round_time.steady([9.0, 8.0, 3.0, 1.0, 2.0]) == (2.0, 1.0)
    assert round_time.steady([4.0, 5.0]) == (4.5, 4.0)  # too short: every round


@pytest.mark.slow
def test_bare_only_prints_one_cpu_row():
    """Three rounds of the MNIST paper preset's local work (20 clients x 10 epochs), no Ray."""
    done = subprocess.run(
        [sys.executable, "bench/round_time.py", "--bare-only", "--device", "cpu", "--rounds", "3", "--threads", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| cpu")]
    assert len(rows) == 1 and re.fullmatch(r"\| cpu \| - \| - \| \d+\.\d\d \| \d+\.\d\d \| - \|", rows[0]), done.stdout


@pytest.mark.slow
def test_server_round_bench_quick_prints_its_tables():
    """bench/server_round.py --quick: cifar10-cnn, 4 replies, both rounds, the client's codec
    on its three rounds."""
    done = subprocess.run(
        [sys.executable, "bench/server_round.py", "--quick"], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| cifar10-cnn |")]
    assert [row.split(" | ")[2] for row in rows[:2]] == ["steady", "readjust"], done.stdout
    assert len(rows) == 3 and all(re.search(r"\| \d+\.\d+ \|$", row) for row in rows), done.stdout
    assert len(re.findall(r"\| \d+\.\d+ (?=\|)", rows[2])) == 6, done.stdout  # steady, readjust, new mask
