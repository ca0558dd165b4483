"""examples/custom-app, a Flower app of its own that uses only feddst-flwr's public API,
runs under `flwr run` (local SuperLink, Ray simulation, 10 nodes) and learns at density 0.2."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_ports

import sim

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "examples" / "custom-app"
PORT = free_ports(39391, 3)  # away from test_e2e's SuperLink and a developer's own (39091)
ROUND = re.compile(r"custom-app round (\d+): test accuracy ([\d.]+), density ([\d.]+)")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def rounds(tmp_path_factory) -> list[tuple[int, float, float]]:
    """(round, test accuracy, density) of one `flwr run examples/custom-app`."""
    home = tmp_path_factory.mktemp("flwr-home")
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n'
        "options.num-supernodes = 10\noptions.backend.client-resources.num-cpus = 1\n"
    )
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(PORT),
        "FLWR_LOCAL_CONTROL_API_PORT": str(PORT + 2),
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),  # feddst_flwr, installed or not
    }
    flwr = Path(sys.executable).with_name("flwr")
    try:
        done = subprocess.run(
            [str(flwr), "run", str(APP), "--stream"], env=env, capture_output=True, text=True, timeout=500
        )
    finally:
        sim.stop_superlink(home)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    return [(int(r), float(a), float(d)) for r, a, d in ROUND.findall(output)]


def test_custom_app_runs_every_round_at_the_configured_density(rounds):
    assert [r for r, _, _ in rounds] == list(range(16))
    assert all(density == 0.2 for _, _, density in rounds)


def test_custom_app_learns(rounds):
    accuracies = [a for _, a, _ in rounds]
    assert accuracies[0] < 0.2
    assert sum(accuracies[-3:]) / 3 >= 0.75
