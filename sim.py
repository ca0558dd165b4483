"""Experiment runner: one preset x strategies x seeds, each run through `flwr run` (Flower's
simulation engine on Ray), one after another; then the report.

    python sim.py NAME          # experiments/NAME.toml: run what is not finished yet, then report
    python sim.py report NAME   # report only
    python sim.py NAME --only A --only B   # only these strategies (e.g. arms split over worktrees)
    python sim.py NAME --only A --seed 1   # only these seeds (repeatable; e.g. seeds split over worktrees)
    python sim.py gain OUT.png NAME [NAME ...] [--strategy S]   # S - randommask against sparsity
    python sim.py swap NAME INTO --weights A --mask B --seed K   # INTO starts as A's model under B's mask

An experiment file names a preset (conf/<preset>.toml), the strategies, the seeds and the
number of simulated nodes, plus run-config overrides for all runs ([run-config]) and per
strategy ([strategy.NAME]); `reference` names the run whose upload sets the report's caps
(default feddst). A name in `strategies` may be a variant: its section sets
`strategy` (e.g. [strategy.feddst-paper] with strategy = "feddst" and readjust-at = "end").
A section's `seeds` replaces the experiment's for that strategy (e.g. one seed for a side arm).
Results go to results/<experiment>/<NAME>-seed<k>/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tomli_w
import tomllib

from feddst_flwr import report
from feddst_flwr.checkpoint import Checkpoint, config_differences, fingerprint, save_checkpoint, swapped
from feddst_flwr.registry import load_config

ROOT = Path(__file__).resolve().parent


@dataclass
class Experiment:
    """An experiment file, resolved."""

    name: str
    preset: dict
    strategies: list[str]
    seeds: list[int]
    num_supernodes: int
    run_config: dict = field(default_factory=dict)
    per_strategy: dict[str, dict] = field(default_factory=dict)
    caption: str = ""  # what the report says about the setting (e.g. rounds cut from the paper's)
    reference: str = "feddst"  # the run whose total upload sets the report's caps

    @classmethod
    def load(cls, path: Path) -> Experiment:
        spec = tomllib.loads(path.read_text())
        missing = {"preset", "strategies", "seeds", "num-supernodes"} - set(spec)
        if missing:
            raise ValueError(f"{path}: missing keys {sorted(missing)}")
        preset = ROOT / "conf" / f"{spec['preset']}.toml"
        if not preset.exists():
            raise ValueError(f"{path}: preset '{spec['preset']}' not found at {preset}")
        unknown = set(spec.get("strategy", {})) - set(spec["strategies"])
        if unknown:
            raise ValueError(f"{path}: [strategy.X] sections for strategies not in the list: {sorted(unknown)}")
        _check_seeds(path, "seeds", spec["seeds"])
        for name, section in spec.get("strategy", {}).items():
            if "seeds" in section:
                _check_seeds(path, f"[strategy.{name}] seeds", section["seeds"])
        return cls(
            path.stem, tomllib.loads(preset.read_text()), list(spec["strategies"]), list(spec["seeds"]),
            int(spec["num-supernodes"]), spec.get("run-config", {}), spec.get("strategy", {}), spec.get("caption", ""),
            spec.get("reference", "feddst"),
        )  # fmt: skip

    def seeds_of(self, strategy: str) -> list[int]:
        """The strategy's own `seeds` if its section sets them, else the experiment's."""
        return list(self.per_strategy.get(strategy, {}).get("seeds", self.seeds))

    def runs(self) -> list[tuple[str, int]]:
        """Seed by seed, so that an unfinished experiment compares every strategy on its first seeds."""
        seeds = sorted({seed for strategy in self.strategies for seed in self.seeds_of(strategy)})
        return [(strategy, seed) for seed in seeds for strategy in self.strategies if seed in self.seeds_of(strategy)]

    def config(self, strategy: str, seed: int, results: Path) -> dict:
        """The full run config of one run: preset, then overrides, then its identity; relative
        data and cache folders are taken from the project root."""
        own = {key: value for key, value in self.per_strategy.get(strategy, {}).items() if key != "seeds"}
        config = {
            **self.preset, **self.run_config, "strategy": strategy, **own,
            "seed": seed, "results-dir": str(results), "run-name": f"{strategy}-seed{seed}",
        }  # fmt: skip
        for key in ("data-dir", "cache-dir"):
            if config.get(key):
                config[key] = str((ROOT / config[key]).resolve())
        return config


def _check_seeds(path: Path, where: str, seeds: object) -> None:
    if not (isinstance(seeds, list) and seeds and all(type(s) is int for s in seeds)):
        raise ValueError(f"{path}: {where} = {seeds!r}: expected a non-empty list of ints")


Runner = Callable[[dict, int, Path], None]  # (run config, num supernodes, FLWR_HOME)


ATTEMPTS = 3  # a run that ends early (e.g. the SuperLink lost the run's heartbeat) is started again


def run_experiment(
    experiment: Experiment,
    results: Path,
    runner: Runner,
    only: list[str] | None = None,
    seeds: list[int] | None = None,
) -> None:
    """Run every (strategy, seed) without a `done` marker (of the strategies in `only` and the
    seeds in `seeds`, if given); a run left unfinished (by an interruption, or ending early: then up to ATTEMPTS
    times) continues from its checkpoint if it has one (`checkpoint-every` > 0, FedDST
    family), else it is deleted and restarted."""
    unknown = sorted(set(only or []) - set(experiment.strategies))
    if unknown:
        raise ValueError(f"--only {unknown}: not strategies of {experiment.name} ({experiment.strategies})")
    todo = [(s, k) for s, k in experiment.runs() if (not only or s in only) and (not seeds or k in seeds)]
    if seeds and not todo:
        raise ValueError(f"--seed {sorted(seeds)}: no run of {experiment.name} has these seeds")
    home = results / ".flwr-home"
    stop_superlink(home)  # an interrupted sim.py may have left a run going
    for index, (strategy, seed) in enumerate(todo, 1):
        run_dir = results / f"{strategy}-seed{seed}"
        if (run_dir / "done").exists():
            print(f"[{index}/{len(todo)}] {run_dir.name}: finished, skipped")
            continue
        config = experiment.config(strategy, seed, results)
        for attempt in range(1, ATTEMPTS + 1):
            print(f"[{index}/{len(todo)}] {run_dir.name}: {start_run(config, run_dir)}", flush=True)
            runner(config, experiment.num_supernodes, home)
            metrics = run_dir / "metrics.jsonl"
            records = len(metrics.read_text().splitlines()) if metrics.exists() else 0
            if records == config["num-server-rounds"] + 1:
                break
            problem = f"{run_dir}: run ended with {records} of {config['num-server-rounds'] + 1} records"
            if attempt == ATTEMPTS:
                raise RuntimeError(problem)
            print(f"{problem}; attempt {attempt + 1} of {ATTEMPTS}", flush=True)
            stop_superlink(home)
        (run_dir / "done").write_text("")
    stop_superlink(home)


def start_run(config: dict, run_dir: Path) -> str:
    """Set the run up to resume from its checkpoint if it has one, else from scratch (its
    folder deleted); says which."""
    if config.get("checkpoint-every", 0) > 0 and (run_dir / "checkpoint.pt").exists():
        config["resume"] = True
        return "resumed from its checkpoint"
    shutil.rmtree(run_dir, ignore_errors=True)
    return f"{config['num-server-rounds']} rounds"


def flwr_run(config: dict, num_supernodes: int, home: Path) -> None:
    """One run with `flwr run --stream` on a local simulation SuperLink; prints progress."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n'
        f"options.num-supernodes = {num_supernodes}\noptions.backend.client-resources.num-cpus = 1\n"
    )
    config_file = home / f"{config['run-name']}.toml"
    config_file.write_text(tomli_w.dumps(config))
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    command = [
        str(Path(sys.executable).with_name("flwr")),
        "run",
        str(ROOT),
        "--run-config",
        str(config_file),
        "--stream",
    ]
    metrics = Path(config["results-dir"]) / config["run-name"] / "metrics.jsonl"
    offset = 0
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as process:
        tail = []
        for line in process.stdout:
            tail = (tail + [line])[-40:]
            records, offset = new_records(metrics, offset)
            for record in records:
                print(progress(record, config["num-server-rounds"]), flush=True)
    if process.returncode:
        raise RuntimeError(f"flwr run failed ({process.returncode}):\n{''.join(tail)}")


def new_records(path: Path, offset: int) -> tuple[list[dict], int]:
    """The complete records of metrics.jsonl after byte `offset`, and the new offset (0 again
    if the file was cut back, as a resumed run does)."""
    if not path.exists():
        return [], 0
    with path.open("rb") as stream:
        if stream.seek(0, os.SEEK_END) < offset:
            offset = 0
        stream.seek(offset)
        text = stream.read()
    complete = text[: text.rfind(b"\n") + 1]
    return [json.loads(line) for line in complete.splitlines()], offset + len(complete)


def progress(record: dict, total: int) -> str:
    """`  round r/R | acc ... | cum upload X MiB | ETA s` from a metrics.jsonl record (its
    `wall-time` counts the run's seconds so far, across resumptions)."""
    done = record["round"]
    eta = f"{record['wall-time'] / done * (total - done):.0f} s" if done else "-"
    accuracy = (
        f"acc {record['test-accuracy']:.4f} (client mean {record['client-mean-accuracy']:.4f}) loss {record['test-loss']:.4f}"
        if "test-accuracy" in record
        else "acc -"
    )
    return f"  round {done}/{total} | {accuracy} | cum upload {record['cum-upload-bytes'] / 2**20:.2f} MiB | ETA {eta}"


def stop_superlink(home: Path) -> None:
    """Stop the local SuperLink of this FLWR_HOME and the run processes it started."""
    found = subprocess.run(["pgrep", "-f", f"flower-superlink.*{home}"], capture_output=True, text=True)
    for pid in map(int, found.stdout.split()):
        children = subprocess.run(
            ["pgrep", "-f", f"flower-superexec.*--parent-pid {pid}"], capture_output=True, text=True
        )
        for child in map(int, children.stdout.split()):
            _terminate(child, group=True)  # superexec leads the group of the simulation's processes
        _terminate(pid)
    _wait_gone([int(pid) for pid in found.stdout.split()])


def _wait_gone(pids: list[int], timeout: float = 60.0) -> None:
    """Wait until the processes have exited (a SuperLink takes up to a minute to shut down and
    free its port); SIGKILL those still there after `timeout` seconds."""
    deadline = time.time() + timeout
    while (alive := [pid for pid in pids if Path(f"/proc/{pid}").exists()]) and time.time() < deadline:
        time.sleep(0.5)
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _terminate(pid: int, group: bool = False) -> None:
    """SIGTERM a process, or its whole process group; one already gone is fine."""
    try:
        if group:
            os.killpg(os.getpgid(pid), signal.SIGTERM)
        else:
            os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass


def write_report(results: Path, caption: str = "", reference: str = "feddst") -> str:
    """REPORT.md (title, caption, plot, table) and curves.png in the experiment's results
    folder; returns the table."""
    runs = report.load_runs(results)
    table = report.summary_table(runs, reference=reference)
    if paired := report.randommask_table(runs):
        table += f"\nAgainst the fixed random mask, each seed paired with the same seed at the same rounds:\n\n{paired}"
    if movement := report.movement_table(runs):
        table += f"\nMask movement:\n\n{movement}"
    caption = f"{caption.strip()}\n\n" if caption.strip() else ""
    plotted = report.plot_mask_movement(runs, results / "mask-movement.png")
    movement_plot = "\n![mask movement](mask-movement.png)\n" if plotted else ""
    (results / "REPORT.md").write_text(f"# {results.name}\n\n{caption}![curves](curves.png)\n\n{table}{movement_plot}")
    report.plot(runs, results / "curves.png")
    return table


def gain_plot(path: Path, experiments: list[str], strategy: str) -> str:
    """Plot `strategy` minus randommask against sparsity from finished experiments; returns
    one line per experiment."""
    points = [report.sparsity_gain(ROOT / "results" / name, strategy) for name in experiments]
    report.plot_gain_vs_sparsity(points, path)
    return "\n".join(
        f"{p.experiment}: S = {p.sparsity}, {p.rounds} rounds, {strategy} - randommask (last-10) "
        f"{100 * np.mean(p.gains):+.2f} +- {100 * np.std(p.gains):.2f} points over {len(p.gains)} seeds"
        for p in points
    )


def swap(experiment: Experiment, results: Path, into: str, weights: str, mask: str, seed: int) -> str:
    """Start run INTO-seed<seed> from the last checkpoints of runs `weights` and `mask` (of
    the same round): `weights`' model under `mask`'s mask (`checkpoint.swapped`); running the
    experiment then resumes it. INTO is a strategy of the experiment with `mask`'s run config
    (rounds aside); its folder must not exist yet."""
    for name in (into, weights, mask):
        if name not in experiment.strategies:
            raise ValueError(f"swap: '{name}' is not a strategy of {experiment.name} ({experiment.strategies})")
    run_dir = results / f"{into}-seed{seed}"
    if run_dir.exists():
        raise ValueError(f"swap: {run_dir} exists; delete it to start the swap again")
    sources = {name: results / f"{name}-seed{seed}" / "checkpoint.pt" for name in (weights, mask)}
    for path in sources.values():
        if not path.exists():
            raise ValueError(f"swap: no checkpoint at {path}")
    defaults = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    cfg = load_config({**defaults, **experiment.config(into, seed, results)})  # as flwr run merges them
    state = swapped(sources[weights], sources[mask])
    differing = config_differences(state["config"], fingerprint(cfg))
    if differing:
        raise ValueError(
            f"swap: {into} and {mask} differ in run config ({', '.join(differing)}): INTO must run {mask}'s config"
        )
    save_checkpoint(cfg, Checkpoint(state["round"], state["arrays"], state["strategy"], state["recorder"]))
    return f"{run_dir.name}: {weights}'s model under {mask}'s mask after round {state['round']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("args", nargs="+", metavar="[report] EXPERIMENT")
    parser.add_argument("--only", action="append", metavar="STRATEGY", help="run only this strategy (repeatable)")
    parser.add_argument("--seed", action="append", type=int, help="run only this seed (repeatable)")
    parser.add_argument("--strategy", default="feddst", help="gain: the moving-mask arm (default feddst)")
    parser.add_argument("--weights", help="swap: the run whose model INTO starts from")
    parser.add_argument("--mask", help="swap: the run whose mask (and run config) INTO continues")
    parsed = parser.parse_args()
    args = parsed.args
    if args[0] == "gain":
        print(gain_plot(Path(args[1]), args[2:], parsed.strategy))
        return
    only_report = args[0] == "report"
    name = args[1] if args[0] == "swap" else args[-1]
    path = Path(name)
    if not path.exists():
        path = ROOT / "experiments" / f"{name}.toml"
    experiment = Experiment.load(path)
    results = ROOT / "results" / experiment.name
    if args[0] == "swap":
        if len(args) != 3 or not (parsed.weights and parsed.mask and parsed.seed and len(parsed.seed) == 1):
            parser.error("swap NAME INTO needs --weights A --mask B and one --seed K")
        print(swap(experiment, results, args[2], parsed.weights, parsed.mask, parsed.seed[0]))
        return
    if not only_report:
        run_experiment(experiment, results, flwr_run, parsed.only, parsed.seed)
    print(write_report(results, experiment.caption, experiment.reference))


if __name__ == "__main__":
    main()
