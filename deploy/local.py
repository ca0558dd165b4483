"""Start and stop a FedDST deployment on this machine: one `flower-superlink` and N
`flower-supernode` processes (SuperNode i: its own --port, partition-id=i of N), insecure on
loopback or with TLS (certificates from deploy/certs.py) and SuperNode authentication: with
--tls the SuperLink admits only enrolled nodes (`--enable-supernode-auth`); each SuperNode gets
a key pair, its public key is enrolled with `flwr supernode register`, and it signs in with
its private key. Processes run in their own sessions and are stopped by PID; logs and PIDs
live in the state folder.

    python deploy/local.py up --nodes 2 --tls      # prints the `flwr run` command to use
    python deploy/local.py down
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from certs import create_certificates, create_node_key  # noqa: E402

FEDERATION = "local-deployment"
ENV = {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


def bin_path(name: str) -> str:
    """A Flower executable next to this Python (the environment feddst-flwr is installed in)."""
    return str(Path(sys.executable).with_name(name))


def write_flwr_config(home: Path, port: int, ca: Path | None) -> None:
    """$FLWR_HOME/config.toml naming this deployment as the default SuperLink connection."""
    home.mkdir(parents=True, exist_ok=True)
    security = f'root-certificates = "{ca}"' if ca else "insecure = true"
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{FEDERATION}"\n\n[superlink.{FEDERATION}]\naddress = "127.0.0.1:{port}"\n{security}\n'
    )


def wait_for_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def spawn(command: list[str], log: Path) -> int:
    """Start a process in its own session (so `down` can stop its children too)."""
    with log.open("ab") as out:
        process = subprocess.Popen(
            command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **ENV}
        )
    return process.pid


def up(state: Path, nodes: int, port: int, tls: bool) -> dict:
    """Start the SuperLink and the SuperNodes; returns (and saves) the PIDs and settings."""
    if (state / "pids.json").exists():
        raise RuntimeError(f"{state / 'pids.json'} exists: run `python deploy/local.py down --dir {state}` first")
    (state / "logs").mkdir(parents=True, exist_ok=True)
    certs = create_certificates(state / "certificates") if tls else None
    link_security = (
        ["--ssl-ca-certfile", str(certs["ca"]), "--ssl-certfile", str(certs["cert"]), "--ssl-keyfile", str(certs["key"])]
        if certs else ["--insecure"]
    )  # fmt: skip
    pids = {"superlink": spawn(
        [bin_path("flower-superlink"), "--port", str(port), "--disable-runtime-dependency-installation", *link_security,
         *(["--enable-supernode-auth"] if tls else [])],
        state / "logs" / "superlink.log",
    )}  # fmt: skip
    wait_for_port(port)
    home = state / "flwr-home"
    write_flwr_config(home, port, certs["ca"] if certs else None)
    info = {"pids": pids, "port": port, "tls": tls, "flwr_home": str(home)}
    (state / "pids.json").write_text(json.dumps(info, indent=2))
    for i in range(nodes):
        key = enrol(state, f"supernode-{i}") if tls else None
        pids[f"supernode-{i}"] = start_supernode(state, port, i, nodes, certs["ca"] if certs else None, key)
        (state / "pids.json").write_text(json.dumps(info, indent=2))
    return info


def enrol(state: Path, name: str) -> Path:
    """Create a key pair for SuperNode `name` and register its public key with the SuperLink
    (`flwr supernode register`); returns the private key's path."""
    private, public = create_node_key(state / "keys" / name)
    home = json.loads((state / "pids.json").read_text())["flwr_home"]
    done = subprocess.run(
        [bin_path("flwr"), "supernode", "register", str(public), FEDERATION], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, **ENV, "FLWR_HOME": home}, timeout=60,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"enrolling {name} failed: {done.stdout}{done.stderr}")
    return private


def start_supernode(state: Path, port: int, index: int, nodes: int, ca: Path | None, key: Path | None) -> int:
    """Start SuperNode `index` (partition-id index of nodes): TLS with `ca`, signing in with
    the private `key` when given; returns its PID."""
    security = ["--root-certificates", str(ca)] if ca else ["--insecure"]
    auth = ["--auth-supernode-private-key", str(key)] if key else []
    return spawn(
        [bin_path("flower-supernode"), "--superlink", f"127.0.0.1:{port}", "--port", str(port + 1 + index),
         "--node-config", f"partition-id={index} num-partitions={nodes}", *security, *auth],
        state / "logs" / f"supernode-{index}.log",
    )  # fmt: skip


def down(state: Path, grace: float = 10.0) -> list[int]:
    """Stop every process started by `up` (SIGTERM to its session, SIGKILL after grace)."""
    path = state / "pids.json"
    if not path.exists():
        return []
    pids = list(json.loads(path.read_text())["pids"].values())
    for pid in pids:
        _signal_group(pid, signal.SIGTERM)
    deadline = time.time() + grace
    while time.time() < deadline and any(alive(pid) for pid in pids):
        time.sleep(0.2)
    for pid in pids:
        _signal_group(pid, signal.SIGKILL)
    path.unlink()
    return pids


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def alive(pid: int) -> bool:
    """Whether the process still runs (a finished child of ours is reaped first)."""
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
        if waited:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--dir", type=Path, default=ROOT / ".deploy", help="state folder (PIDs, logs, certificates)")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--port", type=int, default=9091, help="SuperLink port; SuperNode i uses port + 1 + i")
    parser.add_argument(
        "--tls",
        action="store_true",
        help="TLS (deploy/certs.py) and SuperNode authentication: only enrolled nodes join",
    )
    args = parser.parse_args()
    if args.action == "down":
        print(f"stopped {down(args.dir)}")
        return
    info = up(args.dir, args.nodes, args.port, args.tls)
    print(f"started {info['pids']}; logs in {args.dir / 'logs'}. Run FedDST on it with:")
    print(
        f"  FLWR_HOME={info['flwr_home']} FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 flwr run . {FEDERATION} --stream"
    )


if __name__ == "__main__":
    main()
