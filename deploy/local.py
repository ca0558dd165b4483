"""Start and stop a FedDST deployment on this machine: one `flower-superlink` and N
`flower-supernode` processes (SuperNode i: its own --port, partition-id=i of N), insecure on
loopback or with TLS (certificates from deploy/certs.py) and SuperNode authentication: with
--tls the SuperLink admits only enrolled nodes (`--enable-supernode-auth`); each SuperNode gets
a key pair, its public key is enrolled with `flwr supernode register`, and it signs in with
its private key. Processes run in their own sessions; their PIDs are recorded as soon as they
start, and `down` stops them and every process they started (the SuperLink's SuperExec and
ServerApp processes, which run in sessions of their own) by PID. Logs and PIDs live in the
state folder; a process that fails to start is reported with the last lines of its log.

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


LOG_TAIL = 20  # lines of a failing process's log in the error


def bin_path(name: str) -> str:
    """A Flower executable next to this Python (the environment feddst-flwr is installed in)."""
    return str(Path(sys.executable).with_name(name))


def environment() -> dict[str, str]:
    """The processes' environment: this one, with this Python's folder first on PATH (the
    SuperLink starts `flower-superexec`, and that `flwr-serverapp`, from PATH)."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, **ENV, "PATH": path}


def write_flwr_config(home: Path, port: int, ca: Path | None) -> None:
    """$FLWR_HOME/config.toml naming this deployment as the default SuperLink connection."""
    home.mkdir(parents=True, exist_ok=True)
    security = f'root-certificates = "{ca}"' if ca else "insecure = true"
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{FEDERATION}"\n\n[superlink.{FEDERATION}]\naddress = "127.0.0.1:{port}"\n{security}\n'
    )


def wait_for_port(port: int, pid: int, log: Path, timeout: float = 60.0) -> None:
    """Wait until process `pid` listens on `port`; RuntimeError with the last lines of its
    `log` if it exits first or nothing listens after `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline and alive(pid):
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    what = "exited" if not alive(pid) else f"does not listen on 127.0.0.1:{port} after {timeout:.0f} s"
    raise RuntimeError(f"{log.stem} (PID {pid}) {what}; the last lines of {log}:\n{tail(log)}")


def tail(log: Path, lines: int = LOG_TAIL) -> str:
    """The last `lines` lines of a log file."""
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def spawn(command: list[str], log: Path) -> int:
    """Start a process in its own session, its output appended to `log`; returns its PID."""
    with log.open("ab") as out:
        process = subprocess.Popen(
            command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=environment()
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
    home = state / "flwr-home"
    write_flwr_config(home, port, certs["ca"] if certs else None)
    pids: dict[str, int] = {}
    info = {"pids": pids, "port": port, "tls": tls, "flwr_home": str(home)}
    log = state / "logs" / "superlink.log"
    pids["superlink"] = spawn(
        [bin_path("flower-superlink"), "--port", str(port), "--disable-runtime-dependency-installation", *link_security,
         *(["--enable-supernode-auth"] if tls else [])],
        log,
    )  # fmt: skip
    (state / "pids.json").write_text(json.dumps(info, indent=2))
    wait_for_port(port, pids["superlink"], log)
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
        env={**environment(), "FLWR_HOME": home}, timeout=60,
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
    """Stop every process started by `up` and every process they started (SIGTERM, SIGKILL
    after `grace` seconds), by PID; returns the PIDs."""
    path = state / "pids.json"
    if not path.exists():
        return []
    recorded = list(json.loads(path.read_text())["pids"].values())
    pids = started_by(recorded)  # before any of them exits: orphans leave the tree
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.time() + grace
    while time.time() < deadline and any(alive(pid) for pid in pids):
        time.sleep(0.2)
    pids = sorted({*pids, *started_by([pid for pid in pids if alive(pid)])})  # and what started meanwhile
    for pid in pids:
        _signal(pid, signal.SIGKILL)
    path.unlink()
    return pids


def started_by(pids: list[int]) -> list[int]:
    """`pids` and all their descendants, by the parent PIDs in /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (command)": state, ppid, ...
        except (OSError, IndexError):
            continue  # exited meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), list(pids)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, []))
    return sorted(found)


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def alive(pid: int) -> bool:
    """Whether the process still runs (a finished child of ours is reaped first; a zombie
    whose parent has not reaped it has stopped)."""
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
        if waited:
            return False
    except ChildProcessError:
        pass
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


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
