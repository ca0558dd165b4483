"""A Ray cluster of several nodes on this machine (for the multi-node test and benchmark):
one `ray start` per node, each with its own ports, temp folder and CPU count, all on
127.0.0.1; stopped by process group, never with `ray stop` (which ends every Ray on the machine).

The README's "Beyond one machine" gives the same commands for real machines.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PORTS_PER_NODE = 50  # 10 for Ray's services, 40 for its worker processes
HOST = "127.0.0.1"


def node_ports(base: int, index: int) -> dict[str, int]:
    """The fixed ports of node `index` (0 is the head) in the block from `base`: Ray's
    defaults (8265, 52365, ...) would collide between two nodes of one machine."""
    first = base + PORTS_PER_NODE * index
    ports = {
        "node-manager-port": first + 1,
        "object-manager-port": first + 2,
        "dashboard-agent-listen-port": first + 3,
        "dashboard-agent-grpc-port": first + 4,
        "metrics-export-port": first + 5,
        "runtime-env-agent-port": first + 6,
        "min-worker-port": first + 10,
        "max-worker-port": first + PORTS_PER_NODE - 1,
    }
    if index == 0:
        ports |= {"port": first, "dashboard-port": first + 7, "ray-client-server-port": first + 8}
    return ports


def start_command(base: int, index: int, num_cpus: int, temp_dir: Path) -> list[str]:
    """`ray start` of node `index`: the head (`--head`) or a worker joining it (`--address`)."""
    role = ["--head", "--include-dashboard=false"] if index == 0 else ["--address", f"{HOST}:{base}"]
    ports = [f"--{name}={port}" for name, port in node_ports(base, index).items()]
    return [
        str(Path(sys.executable).with_name("ray")), "start", *role, *ports, f"--num-cpus={num_cpus}",
        f"--node-ip-address={HOST}", f"--temp-dir={temp_dir}", "--object-store-memory=200000000",
        "--disable-usage-stats",
    ]  # fmt: skip


class LocalCluster:
    """Ray nodes started with `ray start`, each in its own process group (the daemons it
    leaves behind keep that group), so that `stop` ends exactly the processes started here.

    Parameters
    ----------
    num_nodes : int
        Nodes to start: a head and `num_nodes - 1` workers.
    base_port : int
        First port of a free block of `num_nodes * PORTS_PER_NODE`; the head's GCS listens on it.
    num_cpus : int
        CPUs each node offers to Ray.
    """

    def __init__(self, num_nodes: int, base_port: int, num_cpus: int = 1) -> None:
        self.num_nodes, self.base_port, self.num_cpus = num_nodes, base_port, num_cpus
        # short: Ray's socket paths under it must stay below the 107 characters of AF_UNIX
        self.temp_root = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
        self.groups: list[int] = []

    @property
    def address(self) -> str:
        """The head's GCS address, as `RAY_ADDRESS` or `ray start --address` take it."""
        return f"{HOST}:{self.base_port}"

    def start(self) -> LocalCluster:
        """Start the head, then the workers; raises with `ray start`'s output if one fails."""
        for index in range(self.num_nodes):
            command = start_command(self.base_port, index, self.num_cpus, self.temp_root / f"node{index}")
            process = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
            )
            self.groups.append(process.pid)
            output, _ = process.communicate(timeout=120)
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
        seconds (Ray's GCS outlives a SIGTERM once its raylet is gone), delete the temp folder."""
        for group in self.groups:
            _signal_group(group, signal.SIGTERM)
        deadline = time.time() + grace
        while any(_group_members(group) for group in self.groups) and time.time() < deadline:
            time.sleep(0.5)
        for group in self.groups:
            _signal_group(group, signal.SIGKILL)
        self.groups = []
        subprocess.run(["rm", "-rf", str(self.temp_root)], check=False)

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
    `ray.util.state` needs the full dashboard (`ray[default]`), which this install lacks."""
    done = subprocess.run(
        [sys.executable, "-c", STATE_SCRIPT.format(address=address)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if done.returncode:
        raise RuntimeError(f"reading the state of the Ray cluster at {address} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
