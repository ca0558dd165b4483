"""sim.py (experiment runner: resumption, configs) and feddst_flwr.report (caps, tables, plots)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from fakes import MASKABLE, make_strategy, new_model
from flwr.app import ArrayRecord

import sim
from feddst_flwr import report
from feddst_flwr.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from feddst_flwr.registry import load_config

GIB = 2**30


def records(uploads_gib: list[float], accuracies: list[float], eval_every: int = 1) -> list[dict]:
    """Synthetic metrics.jsonl records: round r has cumulative upload uploads_gib[r]."""
    out = []
    for r, (up, acc) in enumerate(zip(uploads_gib, accuracies)):
        record = {"round": r, "cum-upload-bytes": int(up * GIB), "cum-download-bytes": int(2 * up * GIB),
                  "flops": 1e6 * (r + 1), "wall-time": 10.0 * r}  # fmt: skip
        if r % eval_every == 0 or r == len(uploads_gib) - 1:
            record["client-mean-accuracy"] = acc
        out.append(record)
    return out


def write_run(folder: Path, name: str, recs: list[dict], done: bool = True) -> None:
    (folder / name).mkdir(parents=True)
    (folder / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    if done:
        (folder / name / "done").write_text("")


@pytest.fixture
def experiment_dir(tmp_path) -> Path:
    write_run(tmp_path, "feddst-seed0", records([0, 1, 2], [0.1, 0.5, 0.7]))
    write_run(tmp_path, "feddst-seed1", records([0, 1, 2], [0.1, 0.6, 0.8]))
    write_run(tmp_path, "fedavgm-seed0", records([0, 2, 4, 6], [0.1, 0.3, 0.5, 0.9], eval_every=2))
    write_run(tmp_path, "fedavg-seed0", records([0, 1], [0.1, 0.2]), done=False)  # interrupted: not reported
    return tmp_path


def test_load_runs_takes_finished_runs_by_strategy_and_seed(experiment_dir):
    runs = report.load_runs(experiment_dir)
    assert sorted(runs) == ["fedavgm", "feddst"]
    assert [run.seed for run in runs["feddst"]] == [0, 1]


def test_value_at_cap_interpolates_between_evaluated_rounds(experiment_dir):
    run = report.load_runs(experiment_dir)["fedavgm"][0]  # evaluated at 0, 4 and 6 GiB: 0.1, 0.5, 0.9
    assert report.value_at_cap(run, 2 * GIB) == pytest.approx(0.3)  # halfway between 0 and 4 GiB
    assert report.value_at_cap(run, 5 * GIB) == pytest.approx(0.7)
    assert report.value_at_cap(run, 6 * GIB) == pytest.approx(0.9)
    assert report.value_at_cap(run, 6.5 * GIB) == pytest.approx(0.9)  # ended below the cap: final value


def test_caps_and_table(experiment_dir):
    runs = report.load_runs(experiment_dir)
    assert report.caps(runs) == {"0.5x": 1 * GIB, "1x": 2 * GIB, "2x": 4 * GIB}
    table = report.summary_table(runs)
    feddst = next(line for line in table.splitlines() if line.startswith("| feddst "))
    # mean +- std over seeds at 1, 2 and 4 GiB (both feddst runs ended at 2: final values, starred),
    # final, last-10 mean (all three: 0.433 and 0.5), rounds, upload/download GiB, MFLOPs, wall
    assert feddst == (
        "| feddst | 2 | 0.5500 ± 0.0500 | 0.7500 ± 0.0500 | 0.7500 ± 0.0500* | 0.7500 ± 0.0500 | 0.4667 ± 0.0333 "
        "| 2 | 2.000 | 4.000 | 3.00 | 20 |"
    )
    fedavgm = next(line for line in table.splitlines() if line.startswith("| fedavgm "))
    assert fedavgm.startswith("| fedavgm | 1 | 0.2000 | 0.3000 | 0.5000 | 0.9000 | 0.5000 | 3 | 6.000 | 12.000 |")
    assert "\\* a run ended below this upload cap" in table
    assert "at 0.5x (1.000 GiB)" in table.splitlines()[0]
    # paired by seed: only seed 0 has both (feddst 0.7 at 2 GiB; fedavgm 0.3 at 2 GiB, 0.5 at 4 GiB)
    assert "feddst - fedavgm at equal upload (2.000 GiB): +0.4000 (seed 0)" in table
    assert "feddst at 2.000 GiB - fedavgm at 2x (4.000 GiB): +0.2000 (seed 0)" in table
    assert "randommask" not in table


def test_gaps_pair_seeds_and_give_their_spread(experiment_dir):
    write_run(experiment_dir, "fedavgm-seed1", records([0, 2, 4], [0.1, 0.2, 0.4]))
    write_run(experiment_dir, "randommask-seed0", records([0, 1, 1.9], [0.1, 0.4, 0.6]))
    write_run(experiment_dir, "randommask-seed1", records([0, 1, 1.9], [0.1, 0.4, 0.5]))
    write_run(experiment_dir, "randommask-seed2", records([0, 1, 1.9], [0.1, 0.0, 0.0]))  # no feddst seed 2
    lines = report.gap_lines(report.load_runs(experiment_dir), 2 * GIB, "client-mean-accuracy")
    # equal upload: seed 0: 0.7 - 0.3 = 0.4, seed 1: 0.8 - 0.2 = 0.6; at 2x: 0.7 - 0.5, 0.8 - 0.4
    # over feddst's last 10 evaluations (here all three, at 0, 1 and 2 GiB):
    # seed 0: fedavgm 0.1, 0.2, 0.3 there: gaps 0, 0.3, 0.4; seed 1: fedavgm 0.1, 0.15, 0.2: 0, 0.45, 0.6
    last = "over feddst's last 10 evaluations:"
    assert (
        lines[0]
        == f"feddst - fedavgm at equal upload (2.000 GiB): +0.5000 ± 0.1000 (seeds 0, 1); {last} +0.2917 ± 0.0583"
    )
    # at 2x: seed 0: fedavgm at 0, 2, 4 GiB: 0.1, 0.3, 0.5: gaps 0, 0.2, 0.2; seed 1: 0.1, 0.2, 0.4: 0, 0.4, 0.4
    assert (
        lines[1]
        == f"feddst at 2.000 GiB - fedavgm at 2x (4.000 GiB): +0.3000 ± 0.1000 (seeds 0, 1); {last} +0.2000 ± 0.0667"
    )
    # randommask ended at 1.9 GiB: its final value; seed 2 has no feddst run and is left out
    # last 10: seed 0: randommask 0.1, 0.4, 0.6: 0, 0.1, 0.1; seed 1: 0.1, 0.4, 0.5: 0, 0.2, 0.3
    assert (
        lines[2]
        == f"feddst - randommask at equal upload (2.000 GiB): +0.2000 ± 0.1000 (seeds 0, 1); {last} +0.1167 ± 0.0500"
    )


def test_randommask_gap_is_given_without_fedavgm_runs(tmp_path):
    write_run(tmp_path, "feddst-seed0", records([0, 1, 2], [0.1, 0.5, 0.7]))
    write_run(tmp_path, "randommask-seed0", records([0, 1, 2], [0.1, 0.5, 0.6]))
    assert report.gap_lines(report.load_runs(tmp_path), 2 * GIB, "client-mean-accuracy") == [
        "(no fedavgm runs: the paper's FedDST - FedAvgM gap is not reported)",
        "feddst - randommask at equal upload (2.000 GiB): +0.1000 (seed 0); over feddst's last 10 evaluations: +0.0333",
    ]


def test_report_needs_feddst_runs(tmp_path):
    write_run(tmp_path, "fedavg-seed0", records([0, 1], [0.1, 0.2]))
    with pytest.raises(ValueError, match="needs finished 'feddst' runs"):
        report.summary_table(report.load_runs(tmp_path))


def test_write_report_makes_markdown_and_plot(experiment_dir):
    table = sim.write_report(experiment_dir, caption="Shortened: 2 rounds instead of 400.\n")
    text = (experiment_dir / "REPORT.md").read_text()
    assert text.endswith(table) and text.startswith(
        f"# {experiment_dir.name}\n\nShortened: 2 rounds instead of 400.\n\n"
    )
    assert (experiment_dir / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_experiment_caption_is_read_from_the_file(tmp_path):
    assert experiment(tmp_path).caption == ""
    path = tmp_path / "exp.toml"
    path.write_text('caption = "100 of the paper\'s 400 rounds"\n' + path.read_text())
    assert sim.Experiment.load(path).caption == "100 of the paper's 400 rounds"


def experiment(tmp_path, **extra) -> sim.Experiment:
    path = tmp_path / "exp.toml"
    path.write_text(
        'preset = "digits"\nstrategies = ["feddst", "fedavg"]\nseeds = [0, 1]\nnum-supernodes = 6\n'
        '[run-config]\nnum-server-rounds = 2\ndata-dir = "../shared/data"\n[strategy.fedavg]\nlr = 0.05\n'
        + "".join(extra.values())
    )
    return sim.Experiment.load(path)


def test_experiment_configs_layer_preset_overrides_and_identity(tmp_path):
    exp = experiment(tmp_path)
    config = exp.config("fedavg", 1, tmp_path / "out")
    assert config["dataset"] == "digits" and config["num-server-rounds"] == 2 and config["lr"] == 0.05
    assert (config["strategy"], config["seed"], config["run-name"]) == ("fedavg", 1, "fedavg-seed1")
    assert exp.config("feddst", 0, tmp_path)["lr"] == 0.1  # the preset's
    assert config["data-dir"] == str((sim.ROOT / "../shared/data").resolve())  # from the project root
    assert exp.runs() == [("feddst", 0), ("fedavg", 0), ("feddst", 1), ("fedavg", 1)]


def test_a_variant_is_a_strategy_with_its_own_name_and_settings(tmp_path):
    variant = '[strategy.feddst-paper]\nstrategy = "feddst"\nreadjust-at = "end"\n'
    path = tmp_path / "exp.toml"
    path.write_text(
        'preset = "digits"\nstrategies = ["feddst", "feddst-paper"]\nseeds = [0]\nnum-supernodes = 6\n'
        f'reference = "feddst-paper"\n{variant}'
    )
    exp = sim.Experiment.load(path)
    config = exp.config("feddst-paper", 0, tmp_path)
    assert (config["strategy"], config["readjust-at"], config["run-name"]) == ("feddst", "end", "feddst-paper-seed0")
    assert exp.config("feddst", 0, tmp_path)["readjust-at"] == "mid"  # the preset's value applies
    assert exp.reference == "feddst-paper" and experiment(tmp_path).reference == "feddst"


def test_a_strategy_section_may_set_its_own_seeds(tmp_path):
    exp = experiment(tmp_path, own="seeds = [2]\n")  # appended to [strategy.fedavg]
    assert exp.seeds_of("fedavg") == [2] and exp.seeds_of("feddst") == [0, 1]
    assert exp.runs() == [("feddst", 0), ("feddst", 1), ("fedavg", 2)]
    assert "seeds" not in exp.config("fedavg", 2, tmp_path)


def moving_records(accuracies: list[float], entered: list[int], drift: list[float]) -> list[dict]:
    """Records of a FedDST run: readjust rounds 1 and 2 (alpha > 0), mask statistics."""
    recs = records([0, 1, 2, 3], accuracies)
    for r, record in enumerate(recs):
        record.update({"readjust-alpha": 0.1 if r in (1, 2) else 0.0, "mask-drift": drift[r],
                       "mask-entered": entered[r], "mask-entered-units": 1, "mask-votes": []})  # fmt: skip
    return recs


def test_movement_table_and_plot(tmp_path):
    write_run(tmp_path, "feddst-seed0", moving_records([0.1, 0.2, 0.4, 0.6], [0, 10, 4, 0], [0, 0.1, 0.2, 0.2]))
    write_run(tmp_path, "feddst-seed1", moving_records([0.1, 0.4, 0.6, 0.8], [0, 20, 6, 0], [0, 0.2, 0.3, 0.4]))
    write_run(tmp_path, "fedavg-seed0", records([0, 1, 2], [0.1, 0.3, 0.5]))
    runs = report.load_runs(tmp_path)
    assert report.last_mean(runs["feddst"][0], evaluations=2) == pytest.approx(0.5)
    table = report.movement_table(runs)
    # entered per readjust round (10+20)/2, (4+6)/2; final drift 0.2 and 0.4; fedavg counts no mask
    assert table.splitlines()[2:] == ["| feddst | 2 | 15/5 | 0.300 ± 0.100 | - | - | - |"]  # no structure records
    assert report.movement_table({"fedavg": runs["fedavg"]}) == ""
    for seed, (explored, held, cv) in enumerate([(0.3, 0.5, 0.2), (0.5, 0.7, 0.4)]):
        recs = moving_records([0.1, 0.2, 0.4, 0.6], [0, 10, 4, 0], [0, 0.1, 0.2, 0.2])
        for r, record in enumerate(recs):
            record["mask-explored"] = explored
            if r in (1, 2):  # readjust rounds: held share and structure (the last one counts for CV)
                record["mask-leavers-held"] = held + 0.1 * (r - 1)
                record["mask-structure"] = {"a": {"indegree-cv": cv * r}, "b": {"indegree-cv": cv * r + 0.2}}
        write_run(tmp_path / "s", f"feddst-seed{seed}", recs)
    row = report.movement_table(report.load_runs(tmp_path / "s")).splitlines()[2]
    # explored 0.3/0.5; held (0.5+0.6)/2=0.55, (0.7+0.8)/2=0.75; CV at round 2: (0.4+0.6)/2=0.5, (0.8+1.0)/2=0.9
    assert row == "| feddst | 2 | 10/4 | 0.200 ± 0.000 | 0.400 ± 0.100 | 0.650 ± 0.100 | 0.700 ± 0.200 |"
    assert report.plot_mask_movement(runs, tmp_path / "mask.png")
    assert (tmp_path / "mask.png").read_bytes()[:4] == b"\x89PNG"
    assert not report.plot_mask_movement({"fedavg": runs["fedavg"]}, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()
    sim.write_report(tmp_path)
    text = (tmp_path / "REPORT.md").read_text()
    assert "Mask movement:" in text and "![mask movement](mask-movement.png)" in text


@pytest.mark.parametrize(
    "text, problem",
    [
        ('strategies = ["feddst"]\nseeds = [0]\nnum-supernodes = 5\n', "missing keys \\['preset'\\]"),
        ('preset = "nope"\nstrategies = ["feddst"]\nseeds = [0]\nnum-supernodes = 5\n', "preset 'nope' not found"),
        ('preset = "digits"\nstrategies = ["feddst"]\nseeds = [0]\nnum-supernodes = 5\n[strategy.fedavg]\nlr = 1.0\n',
         "not in the list"),
        ('preset = "digits"\nstrategies = ["feddst"]\nseeds = [0]\nnum-supernodes = 5\n[strategy.feddst]\nseeds = 1\n',
         "seeds = 1: expected a non-empty list of ints"),
        ('preset = "digits"\nstrategies = ["feddst"]\nseeds = [0]\nnum-supernodes = 5\n[strategy.feddst]\nseeds = []\n',
         "expected a non-empty list"),
        ('preset = "digits"\nstrategies = ["feddst"]\nseeds = ["0"]\nnum-supernodes = 5\n',
         "bad.toml: seeds = \\['0'\\]: expected a non-empty list of ints"),
    ],
)  # fmt: skip
def test_bad_experiment_files_are_named(tmp_path, text, problem):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=problem):
        sim.Experiment.load(path)


class FakeRunner:
    """Writes a run's metrics like the ServerApp would; can fail mid-run."""

    def __init__(self, fail: str = "", times: int = sim.ATTEMPTS) -> None:
        self.calls: list[str] = []
        self.resumed: list[str] = []
        self.fail, self.times = fail, times  # run `fail` ends early its first `times` attempts

    def __call__(self, config: dict, num_supernodes: int, home: Path) -> None:
        self.calls.append(config["run-name"])
        run_dir = Path(config["results-dir"]) / config["run-name"]
        run_dir.mkdir(parents=True, exist_ok=config.get("resume", False))
        if config.get("resume"):
            self.resumed.append(config["run-name"])
        failing = config["run-name"] == self.fail and self.calls.count(self.fail) <= self.times
        rounds = 1 if failing else config["num-server-rounds"] + 1
        (run_dir / "metrics.jsonl").write_text("{}\n" * rounds)


def test_resumption_skips_finished_runs_and_restarts_interrupted_ones(tmp_path):
    exp, results = experiment(tmp_path), tmp_path / "results"
    write_run(results, "feddst-seed0", records([0, 1, 2], [0.1, 0.2, 0.3]))  # finished
    write_run(results, "feddst-seed1", records([0, 1], [0.1, 0.2]), done=False)  # interrupted
    (results / "feddst-seed1" / "stale").write_text("from the interrupted run")
    runner = FakeRunner()
    sim.run_experiment(exp, results, runner)
    assert runner.calls == ["fedavg-seed0", "feddst-seed1", "fedavg-seed1"]
    assert not (results / "feddst-seed1" / "stale").exists()
    assert all((results / name / "done").exists() for name in ("feddst-seed1", "fedavg-seed0", "fedavg-seed1"))
    sim.run_experiment(exp, results, runner)  # everything finished: nothing runs again
    assert len(runner.calls) == 3


def test_an_interrupted_run_with_a_checkpoint_resumes(tmp_path):
    exp, results = experiment(tmp_path), tmp_path / "results"
    exp.per_strategy["feddst"] = {"checkpoint-every": 1}
    write_run(results, "feddst-seed0", records([0, 1], [0.1, 0.2]), done=False)
    (results / "feddst-seed0" / "checkpoint.pt").write_text("a checkpoint")
    runner = FakeRunner()
    exp.seeds = [0]
    sim.run_experiment(exp, results, runner)
    assert runner.calls == ["feddst-seed0", "fedavg-seed0"] and runner.resumed == ["feddst-seed0"]
    assert (results / "feddst-seed0" / "checkpoint.pt").exists()  # not deleted
    assert (results / "feddst-seed0" / "done").exists()


def test_a_run_that_ends_early_is_not_marked_done(tmp_path):
    exp, results, runner = experiment(tmp_path), tmp_path / "results", FakeRunner(fail="feddst-seed1")
    with pytest.raises(RuntimeError, match="1 of 3 records"):
        sim.run_experiment(exp, results, runner)
    assert runner.calls.count("feddst-seed1") == sim.ATTEMPTS
    assert (results / "feddst-seed0" / "done").exists() and not (results / "feddst-seed1" / "done").exists()


@pytest.mark.parametrize("checkpoint", [True, False])
def test_a_run_that_ends_early_is_tried_again(tmp_path, checkpoint):
    """With a checkpoint the next attempt resumes; without one it starts again from scratch."""
    exp, results, runner = experiment(tmp_path), tmp_path / "results", FakeRunner(fail="feddst-seed1", times=1)
    if checkpoint:
        exp.per_strategy["feddst"] = {"checkpoint-every": 1}
        (results / "feddst-seed1").mkdir(parents=True)
        (results / "feddst-seed1" / "checkpoint.pt").write_text("")
    sim.run_experiment(exp, results, runner)
    assert runner.calls == ["feddst-seed0", "fedavg-seed0", "feddst-seed1", "feddst-seed1", "fedavg-seed1"]
    assert runner.resumed == (["feddst-seed1", "feddst-seed1"] if checkpoint else [])
    assert all((results / f"{s}-seed{k}" / "done").exists() for s in ("feddst", "fedavg") for k in (0, 1))


def test_swap_starts_a_run_as_one_runs_model_under_another_runs_mask(tmp_path, pyproject_config):
    path = tmp_path / "exp.toml"
    path.write_text(
        'preset = "digits"\nstrategies = ["feddst", "randommask", "swap", "other"]\nseeds = [0]\nnum-supernodes = 6\n'
        '[run-config]\ndata-dir = "../shared/data"\ncheckpoint-every = 1\nnum-server-rounds = 2\n'
        '[strategy.swap]\nstrategy = "randommask"\nnum-server-rounds = 4\n'
        '[strategy.other]\nstrategy = "randommask"\nlr = 0.5\n'
    )
    exp, results = sim.Experiment.load(path), tmp_path / "results"
    saved = {}
    for seed, arm in enumerate(("feddst", "randommask")):
        strategy = make_strategy(seed=seed)
        strategy.initialize(ArrayRecord(new_model().state_dict()))
        state = {name: tensor + 1 for name, tensor in new_model().state_dict().items()}
        recorder = {"records": [{"round": 0}], "cumulative": {}, "elapsed": 1.0}
        saved[arm] = Checkpoint(2, state, strategy.state_dict(), recorder)
        save_checkpoint(load_config({**pyproject_config, **exp.config(arm, 0, results)}), saved[arm])
    with pytest.raises(ValueError, match=r"swap and feddst differ in run config \(strategy\)"):
        sim.swap(exp, results, "swap", "randommask", "feddst", 0)
    with pytest.raises(ValueError, match=r"other and randommask differ in run config \(lr\)"):
        sim.swap(exp, results, "other", "feddst", "randommask", 0)
    with pytest.raises(ValueError, match="'nope' is not a strategy"):
        sim.swap(exp, results, "nope", "feddst", "randommask", 0)
    assert "feddst's model under randommask's mask after round 2" in sim.swap(
        exp, results, "swap", "feddst", "randommask", 0
    )
    resumed = load_checkpoint(load_config({**pyproject_config, **exp.config("swap", 0, results), "resume": True}))
    masks = saved["randommask"].strategy["masks"]
    assert all(torch.equal(resumed.arrays[n], saved["feddst"].arrays[n] * masks[n]) for n in MASKABLE)
    assert all(torch.equal(resumed.strategy["masks"][n], masks[n]) for n in MASKABLE)
    with pytest.raises(ValueError, match="swap-seed0 exists"):
        sim.swap(exp, results, "swap", "feddst", "randommask", 0)
    assert not (results / "other-seed0").exists()


def test_progress_lines_from_metrics_records(tmp_path):
    """Only complete records are read, each once; a file cut back (resume) is read again."""
    path = tmp_path / "metrics.jsonl"
    evaluated = {"round": 15, "test-accuracy": 0.7306, "client-mean-accuracy": 0.73, "test-loss": 0.8669,
                 "cum-upload-bytes": int(18.04 * 2**20), "wall-time": 30.0}  # fmt: skip
    path.write_text(json.dumps(evaluated) + "\n" + '{"round": 16, "cum-up')  # the second is half written
    records, offset = sim.new_records(path, 0)
    assert records == [evaluated] and sim.new_records(path, offset) == ([], offset)
    text = sim.progress(records[0], 60)
    assert text == "  round 15/60 | acc 0.7306 (client mean 0.7300) loss 0.8669 | cum upload 18.04 MiB | ETA 90 s"
    path.write_text(json.dumps({"round": 16, "cum-upload-bytes": 0, "wall-time": 32.0}) + "\n")  # cut back
    records, _ = sim.new_records(path, offset)
    assert sim.progress(records[0], 60) == "  round 16/60 | acc - | cum upload 0.00 MiB | ETA 88 s"


def test_wait_gone_kills_a_process_that_outlives_its_timeout():
    stubborn = subprocess.Popen(["sh", "-c", "trap '' TERM; exec sleep 30"])  # ignored signals survive exec
    time.sleep(0.2)  # the trap is set
    os.kill(stubborn.pid, signal.SIGTERM)
    sim._wait_gone([stubborn.pid], timeout=1.0)
    assert stubborn.wait(timeout=5) == -signal.SIGKILL
    sim._wait_gone([stubborn.pid], timeout=1.0)  # reaped, gone: returns at once


@pytest.mark.parametrize("path", sorted((sim.ROOT / "experiments").glob("*.toml")), ids=lambda path: path.stem)
def test_committed_experiment_files_load(path, tmp_path):
    """Every experiment in experiments/ loads and gives a run config for each of its runs."""
    experiment = sim.Experiment.load(path)
    runs = experiment.runs()
    configs = [experiment.config(strategy, seed, tmp_path) for strategy, seed in runs]
    assert configs and all(config["run-name"] == f"{s}-seed{k}" for config, (s, k) in zip(configs, runs))


def test_only_runs_the_named_strategies_and_names_unknown_ones(tmp_path):
    exp, results = experiment(tmp_path), tmp_path / "results"
    runner = FakeRunner()
    sim.run_experiment(exp, results, runner, only=["fedavg"])
    assert runner.calls == ["fedavg-seed0", "fedavg-seed1"]
    with pytest.raises(ValueError, match=r"--only \['fedprox'\]: not strategies of exp"):
        sim.run_experiment(exp, results, runner, only=["fedprox"])


def test_seed_runs_only_the_named_seeds_and_names_absent_ones(tmp_path):
    exp, results = experiment(tmp_path), tmp_path / "results"
    runner = FakeRunner()
    sim.run_experiment(exp, results, runner, only=["fedavg"], seeds=[1])
    assert runner.calls == ["fedavg-seed1"]
    with pytest.raises(ValueError, match=r"--seed \[7\]: no run of exp has these seeds"):
        sim.run_experiment(exp, results, runner, seeds=[7])


def test_randommask_table_pairs_seeds_at_the_same_rounds(tmp_path):
    rounds = [0, 1, 2, 3, 4]

    def sparse(accuracies: list[float]) -> list[dict]:
        return [{**record, "mask-drift": 0.0} for record in records(rounds, accuracies)]

    write_run(tmp_path, "randommask-seed0", sparse([0.1, 0.2, 0.3, 0.4, 0.5]))
    write_run(tmp_path, "randommask-seed1", sparse([0.1, 0.3, 0.3, 0.3, 0.3]))
    write_run(tmp_path, "feddst-seed0", sparse([0.1, 0.3, 0.3, 0.3, 0.6]))
    write_run(tmp_path, "feddst-seed1", sparse([0.1, 0.3, 0.3, 0.4, 0.4]))
    write_run(tmp_path, "fedavg-seed0", records(rounds, [0.1] * 5))
    table = report.randommask_table(report.load_runs(tmp_path), windows=2)
    # seed 0 gaps at rounds 1-4: +0.1, 0, -0.1, +0.1; seed 1: 0, 0, +0.1, +0.1
    # last-10 (all 4): 0.025 and 0.05; rounds 1-2: 0.05 and 0; rounds 3-4: 0 and 0.1
    assert table.splitlines() == [
        "| strategy | seeds | last-10 - randommask | rounds 1-2 | rounds 3-4 |",
        "|---|---|---|---|---|",
        "| feddst | 2 | +0.0375 ± 0.0125 | +0.0250 ± 0.0250 | +0.0500 ± 0.0500 |",
    ]
    assert report.randommask_table({"feddst": report.load_runs(tmp_path)["feddst"]}) == ""


def test_sparsity_gain_pairs_seeds_and_reads_sparsity_from_the_config(tmp_path):
    rounds = [0, 1, 2, 3, 4]
    for name, accuracies in [("randommask-seed0", [0.1, 0.2, 0.3, 0.4, 0.5]), ("randommask-seed1", [0.1, 0.3, 0.3, 0.3, 0.3]),
                             ("feddst-seed0", [0.1, 0.3, 0.3, 0.3, 0.6]), ("feddst-seed1", [0.1, 0.3, 0.3, 0.4, 0.4]),
                             ("feddst-seed2", [0.9] * 5)]:  # fmt: skip
        write_run(tmp_path / "s95", name, records(rounds, accuracies))
        (tmp_path / "s95" / name / "config.json").write_text(json.dumps({"sparsity": 0.95, "num_server_rounds": 4}))
    gain = report.sparsity_gain(tmp_path / "s95")
    # seed 2 has no randommask partner: left out; last-10 of rounds 1-4 is all four gaps
    assert (gain.experiment, gain.sparsity, gain.rounds) == ("s95", 0.95, 4)
    assert gain.gains == pytest.approx([0.025, 0.05])
    report.plot_gain_vs_sparsity([gain], tmp_path / "gain.png")
    assert (tmp_path / "gain.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="no finished runs of \\['thompson'\\]"):
        report.sparsity_gain(tmp_path / "s95", strategy="thompson")
