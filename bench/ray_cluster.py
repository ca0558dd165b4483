"""Benchmark: the simulation on one Ray node versus a Ray cluster of two nodes on this machine
(issue 29): the MNIST paper preset for a few rounds through `flwr run` with `RAY_ADDRESS` set,
once on a single `ray start --head` node of 2 CPUs and once on a head and a second node of
1 CPU each, alternating, printing the median seconds per round after the first two.

    python bench/ray_cluster.py [--supernodes 400] [--rounds 6] [--repeats 2]

Both set-ups offer the same two ClientApp slots on the same two cores: the second node adds no
cores, so the difference is the cost of spreading the actors over two raylets. The helpers
(`LocalCluster`, `cluster_state`) also serve tests/test_ray_cluster.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from round_time import bench_config  # noqa: E402

import sim  # noqa: E402


def start_command(index: int, port: int, num_cpus: int, temp_dir: Path) -> list[str]:
    """`ray start` of node `index`: the head (0) with its GCS on `port`, its Ray Client server and
    dashboard on the next two (Ray's defaults, 10001 and 8265, would clash with another head on
    the machine), or a node joining it. All nodes share `temp_dir`, which also keeps the
    cluster's address out of /tmp/ray/ray_current_cluster, where any `ray.init()` on the
    machine would find and join it."""
    ray = str(Path(sys.executable).with_name("ray"))
    common = [f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    if index == 0:
        ports = [f"--port={port}", f"--ray-client-server-port={port + 1}", f"--dashboard-port={port + 2}"]
        return [ray, "start", "--head", *ports, "--include-dashboard=false", *common]
    return [ray, "start", f"--address=127.0.0.1:{port}", *common]


class LocalCluster:
    """Ray nodes started with `ray start` on this machine, each in a session of its own (the
    daemons it leaves behind keep its process group), so that `stop` ends exactly the processes
    started here and no other Ray (`ray stop` would end every Ray on the machine).

    Parameters
    ----------
    num_nodes : int
        Nodes to start: a head and `num_nodes - 1` more.
    port : int
        First of 3 free ports: the head's GCS (the cluster's address), Ray Client, dashboard.
    num_cpus : int
        CPUs each node offers to Ray.
    """

    def __init__(self, num_nodes: int, port: int, num_cpus: int = 1) -> None:
        self.num_nodes, self.port, self.num_cpus = num_nodes, port, num_cpus
        # short: Ray's socket paths under it must stay below the 107 characters of AF_UNIX
        self.temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
        self.groups: list[int] = []

    @property
    def address(self) -> str:
        """The head's GCS address, as `RAY_ADDRESS` and `ray start --address` take it."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> LocalCluster:
        """Start the head, then the other nodes; wait until all have joined. Raises with
        `ray start`'s output if one fails."""
        for index in range(self.num_nodes):
            command = start_command(index, self.port, self.num_cpus, self.temp_dir)
            process = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
            )
            self.groups.append(process.pid)
            output, _ = process.communicate(timeout=180)
            if process.returncode:
                raise RuntimeError(f"`{' '.join(command)}` failed ({process.returncode}):\n{output[-3000:]}")
        deadline = time.time() + 60
        while len(nodes := cluster_state(self.address)["nodes"]) < self.num_nodes:
            if time.time() > deadline:
                raise RuntimeError(f"{len(nodes)} of {self.num_nodes} Ray nodes joined {self.address} in 60 s")
            time.sleep(1)
        return self

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM every process group started here, SIGKILL what is left after `grace`
        seconds, delete the temp folder."""
        for group in self.groups:
            _signal_group(group, signal.SIGTERM)
        deadline = time.time() + grace
        while any(_group_members(group) for group in self.groups) and time.time() < deadline:
            time.sleep(0.5)
        for group in self.groups:
            _signal_group(group, signal.SIGKILL)
        self.groups = []
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _group_members(group: int) -> list[int]:
    """The live (not zombie) processes of a process group."""
    members = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            fields = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            members.append(int(name))
    return members


def _signal_group(group: int, signum: int) -> None:
    try:
        os.killpg(group, signum)
    except ProcessLookupError:
        pass


STATE_SCRIPT = """
import json, ray
from ray._private.state import actors
ray.init(address={address!r}, logging_level="ERROR", log_to_driver=False)
nodes = [{{"node": n["NodeID"], "cpus": n["Resources"].get("CPU", 0)}} for n in ray.nodes() if n["Alive"]]
found = [{{"class": a["ActorClassName"], "node": a["Address"]["NodeID"], "state": a["State"]}} for a in actors().values()]
print(json.dumps({{"nodes": nodes, "actors": found}}))
"""


def cluster_state(address: str) -> dict[str, list[dict]]:
    """The cluster's live nodes (`node` id, `cpus`) and every actor its GCS knows, dead ones
    included (`class`, `node` id, `state`), read by a short driver of its own: the public
    `ray.util.state` asks the dashboard's HTTP API, which needs `ray[default]` (not installed)."""
    done = subprocess.run(
        [sys.executable, "-c", STATE_SCRIPT.format(address=address)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if done.returncode:
        raise RuntimeError(f"reading the state of the Ray cluster at {address} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def seconds_per_round(nodes: int, supernodes: int, rounds: int, port: int) -> float:
    """Median seconds per round after the first two of the MNIST paper preset on a fresh local
    cluster of `nodes` nodes sharing 2 CPUs."""
    with tempfile.TemporaryDirectory(prefix="feddst-ray-cluster-") as folder:
        config = {**bench_config(rounds, "cpu", Path(folder) / "results"), "run-name": f"nodes-{nodes}"}
        home = Path(folder) / "flwr-home"
        with LocalCluster(num_nodes=nodes, port=port, num_cpus=2 // nodes) as cluster:
            os.environ["RAY_ADDRESS"] = cluster.address
            try:
                sim.flwr_run(config, supernodes, home)
            finally:
                sim.stop_superlink(home)
                del os.environ["RAY_ADDRESS"]
        path = Path(config["results-dir"]) / config["run-name"] / "metrics.jsonl"
        wall = [json.loads(line)["wall-time"] for line in path.read_text().splitlines()]
    times = [b - a for a, b in zip(wall, wall[1:])][:-1]  # the last round evaluates
    return statistics.median(times[2:] or times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--supernodes", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each set-up, alternating")
    parser.add_argument("--ray-port", type=int, default=26479, help="first of 3 free ports for the Ray head")
    parser.add_argument("--superlink-port", type=int, default=39891, help="first of 3 free ports for the SuperLink")
    args = parser.parse_args()
    os.environ["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(args.superlink_port)
    os.environ["FLWR_LOCAL_CONTROL_API_PORT"] = str(args.superlink_port + 2)
    times: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(args.repeats):
        for nodes in times:
            times[nodes].append(seconds_per_round(nodes, args.supernodes, args.rounds, args.ray_port))
    print(f"\nMNIST paper preset, {args.supernodes} supernodes, {args.rounds} rounds, 20 clients a round, 2 CPUs")
    print("| Ray nodes | CPUs per node | s per round (median after round 2), each run |")
    print("|---|---|---|")
    for nodes, values in times.items():
        print(f"| {nodes} | {2 // nodes} | {', '.join(f'{value:.2f}' for value in values)} |")


if __name__ == "__main__":
    main()
