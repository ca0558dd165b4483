"""The simulation on a Ray cluster of two nodes (two `ray start` processes on this machine,
one CPU each): `flwr run` joins it through `RAY_ADDRESS`, its ClientApp actors run on both
nodes, and the run equals the same seed on a single-node simulation."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import free_ports
from test_e2e import assert_same_model, final_state, flwr_run, local_federation, without

import sim

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from ray_cluster import LocalCluster, cluster_state  # noqa: E402

pytestmark = pytest.mark.slow  # two Ray nodes and two `flwr run`s

RAY_PORT = free_ports(26379, 3)  # the head's GCS, Ray Client and dashboard, away from Ray's defaults
SUPERLINK_PORTS = {"cluster": free_ports(39691, 3), "single": free_ports(39791, 3)}
RUN = {"num-server-rounds": 3, "clients-per-round": 4, "local-epochs": 1, "delta-r": 1, "r-end": 3, "alpha": 0.2,
       "checkpoint-every": 3, "seed": 3}  # fmt: skip


@pytest.fixture(scope="module")
def cluster():
    """A head and a second node of one CPU each; every process they started is stopped at the end."""
    with LocalCluster(num_nodes=2, port=RAY_PORT, num_cpus=1) as started:
        yield started


def run(mode: str, home: Path, results: Path, extra_env: dict[str, str]) -> list[dict]:
    """The digits preset for RUN on its own local SuperLink (started by this `flwr run`, so
    that it inherits `extra_env`); the SuperLink is stopped afterwards."""
    port = SUPERLINK_PORTS[mode]
    env = {"FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port), "FLWR_LOCAL_CONTROL_API_PORT": str(port + 2), **extra_env}
    try:
        return flwr_run(local_federation(home), results, mode, RUN, preset="digits", env=env)
    finally:
        sim.stop_superlink(home)


def test_clients_spread_over_both_nodes_and_the_run_equals_one_node(cluster, tmp_path):
    with ThreadPoolExecutor(2) as pool:  # side by side: each waits mostly on its own start-up
        joined = pool.submit(run, "cluster", tmp_path / "home-cluster", tmp_path, {"RAY_ADDRESS": cluster.address})
        # "local": a Ray of its own, even where a `ray start` cluster is this machine's default
        alone = pool.submit(run, "single", tmp_path / "home-single", tmp_path, {"RAY_ADDRESS": "local"})
        on_cluster, single = joined.result(), alone.result()
    state = cluster_state(cluster.address)
    nodes = {node["node"] for node in state["nodes"]}
    assert len(nodes) == 2 and all(node["cpus"] == 1 for node in state["nodes"])
    client_actors = [actor for actor in state["actors"] if actor["class"] == "ClientAppActor"]
    # one actor per CPU, so one on each node; none from the single-node run
    assert len(client_actors) == 2 and {actor["node"] for actor in client_actors} == nodes, state

    assert [r["round"] for r in on_cluster] == [0, 1, 2, 3]
    assert all(r["replies"] == RUN["clients-per-round"] and r["failures"] == 0 for r in on_cluster[1:])
    assert on_cluster[-1]["mask-version"] >= 1 and any(r["mask-entered"] > 0 for r in on_cluster)  # it moved
    assert [without(r, ("wall-time",)) for r in on_cluster] == [without(r, ("wall-time",)) for r in single]
    assert_same_model(final_state(tmp_path, "cluster"), final_state(tmp_path, "single"))
