"""Deployment: certificates and node keys from deploy/certs.py, and FedDST on a real
SuperLink + 2 enrolled SuperNodes on loopback with TLS and SuperNode authentication
(deploy/local.py), 2 rounds with a readjustment round; a SuperNode with the CA certificate but
no enrolled key is refused; our payload byte counts against the SuperLink's own traffic."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_ports
from cryptography import x509

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "deploy"))
import local  # noqa: E402
from certs import create_certificates, create_node_key  # noqa: E402

NODES = 2
PORT = free_ports(39600, NODES + 2)  # SuperLink; SuperNodes (and the intruder) on the next ports
RUN_CONFIG = {
    "num-server-rounds": 2, "clients-per-round": NODES, "delta-r": 1, "r-end": 2, "alpha": 0.2,
    "local-epochs": 1, "classes-per-client": 5, "run-name": "deployed",
}  # fmt: skip


def test_certificates_have_loopback_sans_and_chain_to_the_ca(tmp_path):
    paths = create_certificates(tmp_path, ("superlink.example.org", "10.0.0.7"))
    ca = x509.load_pem_x509_certificate(paths["ca"].read_bytes())
    server = x509.load_pem_x509_certificate(paths["cert"].read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"localhost", "superlink.example.org"}
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "10.0.0.7"}
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert oct(paths["key"].stat().st_mode & 0o777) == "0o600"


def flwr(home: str, *args: str, timeout: float = 60) -> dict:
    """A `flwr` CLI call with --format json, against the deployment in FLWR_HOME=home."""
    env = {**os.environ, "FLWR_HOME": home, **local.ENV}
    done = subprocess.run(
        [local.bin_path("flwr"), *args, "--format", "json"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


def wait_for_run(home: str, run_id: str, timeout: float = 480) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        (run,) = flwr(home, "ls", local.FEDERATION, "--run-id", run_id)["runs"]
        if run["status"].startswith("finished"):
            return run
        time.sleep(2)
    raise TimeoutError(f"run {run_id} did not finish in {timeout} s")


@pytest.fixture
def deployment(tmp_path):
    info = local.up(tmp_path / "state", NODES, PORT, tls=True)
    try:
        yield info
    finally:
        pids = local.down(tmp_path / "state")
        assert pids and not any(local.alive(pid) for pid in pids)


def test_node_keys_are_openssh_ec_pairs(tmp_path):
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    private, public = create_node_key(tmp_path / "node")
    key = load_ssh_private_key(private.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and oct(private.stat().st_mode & 0o777) == "0o600"
    assert load_ssh_public_key(public.read_bytes()).public_numbers() == key.public_key().public_numbers()


def fake_executable(path: Path, code: str) -> Path:
    """An executable Python script standing in for a Flower command."""
    path.write_text(f"#!{sys.executable}\n{code}\n")
    path.chmod(0o755)
    return path


def test_up_records_the_superlink_at_once_and_reports_its_log_when_it_fails(tmp_path, monkeypatch):
    fake = fake_executable(tmp_path / "flower-superlink", "print('flower-superexec: not found', flush=True); exit(1)")
    monkeypatch.setattr(local, "bin_path", lambda name: str(fake))
    state = tmp_path / "state"
    with pytest.raises(RuntimeError) as raised:
        local.up(state, 2, free_ports(41100, 1), tls=False)
    pid = json.loads((state / "pids.json").read_text())["pids"]["superlink"]
    log = state / "logs" / "superlink.log"
    assert str(raised.value) == f"superlink (PID {pid}) exited; the last lines of {log}:\nflower-superexec: not found"
    assert local.down(state) == [pid] and not (state / "pids.json").exists()


def test_down_stops_the_processes_the_recorded_ones_started_in_sessions_of_their_own(tmp_path):
    """As the SuperLink starts its SuperExec (a session of its own), which starts a ServerApp."""
    grandchild = "import time; time.sleep(300)"
    child = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {grandchild!r}]); time.sleep(300)"
    parent = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}], start_new_session=True); time.sleep(300)"
    state = tmp_path / "state"
    (state / "logs").mkdir(parents=True)
    pid = local.spawn([sys.executable, "-c", parent], state / "logs" / "superlink.log")
    (state / "pids.json").write_text(json.dumps({"pids": {"superlink": pid}}))
    deadline = time.time() + 60
    while len(local.started_by([pid])) < 3 and time.time() < deadline:
        time.sleep(0.2)
    tree = local.started_by([pid])
    assert len(tree) == 3 and len({os.getsid(p) for p in tree}) == 2  # the child and grandchild: a session of their own

    assert local.down(state, grace=5) == tree
    assert not any(local.alive(p) for p in tree)


def online_nodes(home: str) -> list[str]:
    return [
        node["node-id"]
        for node in flwr(home, "supernode", "list", local.FEDERATION)["nodes"]
        if node["status"] == "online"
    ]


def refused_intruder(state: Path, ca: Path, timeout: float = 60) -> str:
    """Start a SuperNode with the CA certificate and a key that was never enrolled; wait for
    it to exit and return its log."""
    key, _ = create_node_key(state / "keys" / "intruder")
    pid = local.start_supernode(state, PORT, NODES, NODES + 1, ca, key)
    deadline = time.time() + timeout
    while local.alive(pid) and time.time() < deadline:
        time.sleep(0.5)
    assert not local.alive(pid), "an unenrolled SuperNode is still running"
    return (state / "logs" / f"supernode-{NODES}.log").read_text()


@pytest.mark.slow
def test_feddst_on_superlink_and_supernodes_with_tls(deployment, tmp_path):
    home = deployment["flwr_home"]
    assert "root-certificates" in Path(home, "config.toml").read_text()
    deadline = time.time() + 60
    while len(online_nodes(home)) < NODES and time.time() < deadline:
        time.sleep(1)
    assert len(online_nodes(home)) == NODES
    log = refused_intruder(tmp_path / "state", tmp_path / "state" / "certificates" / "ca.crt")
    assert "Failed to activate SuperNode" in log
    assert len(online_nodes(home)) == NODES  # the intruder never joined
    config = " ".join(f"{k}={json.dumps(v)}" for k, v in {**RUN_CONFIG, "results-dir": str(tmp_path)}.items())
    run_id = str(flwr(home, "run", ".", local.FEDERATION, "--run-config", config)["run-id"])
    run = wait_for_run(home, run_id)
    assert run["status"] == "finished:completed", run

    records = [json.loads(line) for line in (tmp_path / "deployed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2]
    assert all(r["replies"] == NODES and r["rejected"] == 0 for r in records[1:])
    assert records[1]["readjust-alpha"] > 0 and records[1]["mask-entered"] > 0  # a readjustment round
    assert records[2]["masks-sent"] == NODES  # the new mask went down
    for record in records[1:]:
        assert record["client-upload-bytes"] == record["upload-bytes"]
        assert record["client-download-bytes"] == record["download-bytes"]
    ours = records[-1]["cum-upload-bytes"] + records[-1]["cum-download-bytes"]
    superlink = run["network-traffic"]["total-bytes"]
    # the SuperLink counts whole Fleet API requests and responses: our payload plus message
    # metadata, config and metric records, protobuf framing and the node's polling, about 60 kB
    # in this run whatever the payload (59 kB over 1.09 MB in float32, 60 kB over 0.54 MB in float16)
    assert ours <= superlink <= ours + 100_000, (ours, run["network-traffic"])


def wait_for_round(metrics: Path, server_round: int, timeout: float = 480) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if metrics.exists() and any(
            json.loads(line)["round"] == server_round for line in metrics.read_text().splitlines()
        ):
            return
        time.sleep(1)
    raise TimeoutError(f"round {server_round} not recorded in {metrics} after {timeout} s")


@pytest.mark.slow
def test_a_node_lost_for_good_does_not_hang_the_run(tmp_path):
    """clients-per-round = the federation's 3 nodes; one is killed after round 1. The round it
    dies in ends by round-timeout (or the SuperLink's NODE_UNAVAILABLE reply, a failure, never
    a rejection); later rounds wait for it once, then sample the two left: the run finishes."""
    nodes, state = 3, tmp_path / "state"
    info = local.up(state, nodes, free_ports(41200, nodes + 1), tls=True)
    try:
        home = info["flwr_home"]
        deadline = time.time() + 60
        while len(online_nodes(home)) < nodes and time.time() < deadline:
            time.sleep(1)
        assert len(online_nodes(home)) == nodes
        config = {
            "num-server-rounds": 4, "clients-per-round": nodes, "round-timeout": 60.0, "local-epochs": 1,
            "partition": "iid", "run-name": "lost-node", "results-dir": str(tmp_path),
        }  # fmt: skip
        run_config = " ".join(f"{k}={json.dumps(v)}" for k, v in config.items())
        run_id = str(flwr(home, "run", ".", local.FEDERATION, "--run-config", run_config)["run-id"])
        metrics = tmp_path / "lost-node" / "metrics.jsonl"
        wait_for_round(metrics, 1)
        os.killpg(info["pids"]["supernode-2"], signal.SIGKILL)  # the node and its ClientApp, for good

        run = wait_for_run(home, run_id, timeout=600)
        assert run["status"] == "finished:completed", run
        records = [json.loads(line) for line in metrics.read_text().splitlines()]
        assert [r["round"] for r in records] == [0, 1, 2, 3, 4]
        assert records[1]["replies"] == nodes and all(r["rejected"] == 0 for r in records[1:])
        assert records[4]["replies"] == 2 and records[4]["failures"] == 0 and records[4]["skipped"] == 0
    finally:
        pids = local.down(state)
        assert pids and not any(local.alive(pid) for pid in pids)
