"""End to end: `flwr run` (local SuperLink, Ray simulation) with FedDST and with Flower's
FedAvg through the same client app; the run learns and the logged byte counts equal the
codec's prediction."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tomli_w
import tomllib
import torch
from conftest import free_ports

import sim
from feddst_flwr.codec import DEFAULT_VALUE_DTYPE, VALUE_DTYPES
from feddst_flwr.mask_coding import encode_mask
from feddst_flwr.masks import layer_counts, maskable_names, random_masks, readjust_alpha
from feddst_flwr.models import DigitsCNN

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
NODES = 5
PORT = str(free_ports(39191, 3))  # away from a developer's own local SuperLink (39091)
FEDDST = {"num-server-rounds": 5, "delta-r": 2, "r-end": 5, "alpha": 0.2}

pytestmark = pytest.mark.slow  # every test here runs `flwr run` (a SuperLink and Ray)


def flwr_run(
    home: Path, results: Path, run_name: str, overrides: dict, preset: str = "", env: dict[str, str] | None = None
) -> list[dict]:
    """Run the app with `flwr run --stream` (on a preset's settings if given, as
    `--run-config conf/X.toml` would; with `env` added to the environment) and return its
    metrics.jsonl records."""
    settings = {"clients-per-round": NODES, "results-dir": str(results), "run-name": run_name, **overrides}
    if preset:  # flwr takes a TOML file or key=value pairs, not both: write the merged file
        merged = {**tomllib.loads((ROOT / "conf" / f"{preset}.toml").read_text()), **settings}
        run_config = str(results / f"{run_name}.toml")
        Path(run_config).write_text(tomli_w.dumps(merged))
    else:
        run_config = " ".join(f"{k}={json.dumps(v)}" for k, v in settings.items())
    done = flwr_stream(home, run_config, env)
    path = results / run_name / "metrics.jsonl"
    assert done.returncode == 0 and path.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads(line) for line in path.read_text().splitlines()]


def flwr_stream(home: Path, run_config: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`flwr run --stream` of this app on the SuperLink of `home` (its ports and anything
    else in `env` override the module's); its output."""
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": PORT,
        "FLWR_LOCAL_CONTROL_API_PORT": str(int(PORT) + 2),
        **(env or {}),
    }
    flwr = Path(sys.executable).with_name("flwr")
    return subprocess.run(
        [str(flwr), "run", str(ROOT), "--run-config", run_config, "--stream"],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )


def local_federation(home: Path) -> Path:
    """`home` as FLWR_HOME of a local simulation with NODES SuperNodes of one CPU each (no
    `init-args`: Ray takes the machine's CPUs, or joins the cluster of `RAY_ADDRESS`)."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n'
        f"options.num-supernodes = {NODES}\noptions.backend.client-resources.num-cpus = 1\n"
    )
    return home


@pytest.fixture(scope="module")
def flwr_home(tmp_path_factory):
    """FLWR_HOME with a 5-node local simulation; stops its SuperLink at the end."""
    home = local_federation(tmp_path_factory.mktemp("flwr-home"))
    try:
        yield home
    finally:
        sim.stop_superlink(home)


@pytest.fixture(scope="module")
def runs(flwr_home, tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    return {
        "feddst": flwr_run(flwr_home, results, "feddst", FEDDST),
        "fedavg": flwr_run(flwr_home, results, "fedavg", {"strategy": "fedavg", "num-server-rounds": 2}),
    }


def dense_tensor_bytes(tensor: torch.Tensor) -> int:
    buffer = io.BytesIO()
    np.save(buffer, tensor.numpy(), allow_pickle=False)
    return len(buffer.getvalue())


def predicted_sizes() -> tuple[int, int, int, float]:
    """(sparse payload without mask, full mask bytes, dense payload, density) for DigitsCNN
    at S=0.8. A full mask's coded size depends on its layers' counts only (the range coder's
    Bernoulli model gives every mask of a count the same probability): a random one stands in."""
    state = DigitsCNN().state_dict()
    maskable = maskable_names(DigitsCNN())
    counts = layer_counts({n: tuple(state[n].shape) for n in maskable}, 0.8, "erk")
    dense_part = sum(dense_tensor_bytes(t) for n, t in state.items() if n not in maskable)
    values = VALUE_DTYPES[DEFAULT_VALUE_DTYPE].itemsize * sum(counts.values())  # the run uses the default
    masks = random_masks({n: tuple(state[n].shape) for n in maskable}, counts, 0)
    full_masks = sum(len(encode_mask(mask.flatten().numpy())[1]) for mask in masks.values())
    density = sum(counts.values()) / sum(state[n].numel() for n in maskable)
    return values + dense_part, full_masks, sum(dense_tensor_bytes(t) for t in state.values()), density


def test_feddst_learns(runs):
    records = runs["feddst"]
    assert [r["round"] for r in records] == list(range(FEDDST["num-server-rounds"] + 1))
    assert records[0]["test-accuracy"] < 0.2
    assert records[-1]["test-accuracy"] >= 0.4
    density = predicted_sizes()[3]
    assert all(r["density"] == density and r["failures"] == 0 for r in records)
    assert records[-1]["flops"] < 0.5 * records[-1]["dense-flops"]


def test_feddst_bytes_match_codec(runs):
    """Every node is sampled every round, so the full mask travels down in round 1, a delta
    from the previous version after each round that changed the global mask, and a delta
    from the mask sent up on every readjust round (2 and 4)."""
    base, full_masks, _, _ = predicted_sizes()
    records = runs["feddst"]
    for previous, record in zip(records, records[1:]):
        mask_down = record["round"] == 1 or previous["mask-entered"] > 0
        mask_up = readjust_alpha(record["round"], FEDDST["alpha"], FEDDST["delta-r"], FEDDST["r-end"]) > 0
        assert record["masks-sent"] == NODES * mask_down
        if record["round"] == 1 or not mask_down:
            assert record["download-bytes"] == NODES * (base + full_masks * mask_down), record
        else:  # deltas from the previous version, where smaller than the full mask
            assert NODES * base < record["download-bytes"] < NODES * (base + full_masks), record
        if mask_up:  # deltas from the mask sent: alpha 0.2 moves a client's mask by far less than half
            assert NODES * base < record["upload-bytes"] < NODES * (base + full_masks / 2), record
        else:
            assert record["upload-bytes"] == NODES * base, record
        assert record["client-download-bytes"] == record["download-bytes"]
        assert record["client-upload-bytes"] == record["upload-bytes"]
    assert [r["round"] for r in records if r["readjust-alpha"] > 0] == [2, 4]
    assert records[2]["mask-entered"] > 0 and records[2]["mask-version"] == 1
    assert records[-1]["cum-upload-bytes"] == sum(r["upload-bytes"] for r in records)


def test_digits_mask_moves_on_every_readjust_round(flwr_home, tmp_path):
    """30 rounds on digits (default config, 2 local epochs): every readjust round with
    alpha_r > 0 brings new positions into the global mask, spread over several units."""
    records = flwr_run(flwr_home, tmp_path, "moving", {"num-server-rounds": 30, "local-epochs": 2, "eval-interval": 10})
    readjust = [r for r in records if r["readjust-alpha"] > 0]
    # delta-r 5, r-end 15: alpha_r(15) > 0 (the cosine runs over r-end + delta-r)
    assert [r["round"] for r in readjust] == [5, 10, 15]
    for record in readjust:
        assert record["mask-entered"] > 0 and record["mask-entered-units"] > 1, record
        assert sum(record["mask-votes"]) == record["mask-entered"]
    assert all(r["mask-entered"] == 0 and r["mask-votes"] == [] for r in records if r["readjust-alpha"] == 0)
    assert 0 < records[15]["mask-drift"] == records[-1]["mask-drift"]


def test_fedavg_through_the_same_client_app(runs):
    _, _, dense, _ = predicted_sizes()
    records = runs["fedavg"]
    assert len(records) == 3
    for record in records[1:]:
        assert record["download-bytes"] == record["upload-bytes"] == NODES * dense
        assert record["client-upload-bytes"] == record["upload-bytes"]
        assert record["density"] == 1.0
    assert records[-1]["test-accuracy"] > records[0]["test-accuracy"] + 0.2


@pytest.mark.skipif(not (SHARED_DATA / "mnist").is_dir(), reason=f"real MNIST not found at {SHARED_DATA}/mnist")
def test_mnist_preset_three_rounds(flwr_home, tmp_path):
    """conf/mnist-paper.toml (paper CNN, LotteryFL shards of 20) for 3 rounds on 5 clients
    (after 2 rounds on 10 images of 2 classes each the test loss may still be above its start)."""
    overrides = {"num-server-rounds": 3, "data-dir": str(SHARED_DATA), "cache-dir": str(tmp_path / "cache")}
    records = flwr_run(flwr_home, tmp_path, "mnist-preset", overrides, preset="mnist-paper")
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    assert records[-1]["replies"] == NODES and records[-1]["failures"] == 0
    assert 0.0 <= records[-1]["client-mean-accuracy"] <= 1.0
    assert records[-1]["test-loss"] < records[0]["test-loss"]
    assert records[-1]["test-accuracy"] > records[0]["test-accuracy"] + 0.1
    assert records[-1]["flops"] < 0.3 * records[-1]["dense-flops"]


def final_state(results: Path, run_name: str) -> dict:
    """The run's last checkpoint: global weights and strategy state (masks, RNG, ...)."""
    return torch.load(results / run_name / "checkpoint.pt", weights_only=True)


def assert_same_model(first: dict, second: dict) -> None:
    assert first["round"] == second["round"]
    for key in ("arrays", "masks"):
        one, other = (
            first["arrays"] if key == "arrays" else first["strategy"]["masks"],
            (second["arrays"] if key == "arrays" else second["strategy"]["masks"]),
        )
        assert one.keys() == other.keys() and all(torch.equal(one[n], other[n]) for n in one), key
    assert first["strategy"]["mask_version"] == second["strategy"]["mask_version"]


def without(record: dict, keys: tuple[str, ...]) -> dict:
    return {k: v for k, v in record.items() if k not in keys}


def test_same_seed_same_run(flwr_home, tmp_path):
    """Node ids change between runs; sampling by partition-id keeps a seeded run
    reproducible: identical metrics (bytes included) and identical final masks and weights."""
    overrides = {
        "num-server-rounds": 3,
        "clients-per-round": 2,
        "delta-r": 1,
        "r-end": 3,
        "alpha": 0.2,
        "checkpoint-every": 3,
    }
    first, second = (flwr_run(flwr_home, tmp_path, f"repeat-{i}", overrides) for i in range(2))
    assert [without(r, ("wall-time",)) for r in first] == [without(r, ("wall-time",)) for r in second]
    assert first[-1]["mask-version"] >= 1  # the readjustments moved the mask
    assert_same_model(final_state(tmp_path, "repeat-0"), final_state(tmp_path, "repeat-1"))


RESUME = {"num-server-rounds": 4, "clients-per-round": 2, "delta-r": 1, "r-end": 4, "alpha": 0.2, "checkpoint-every": 2}
DOWNLOAD = ("download-bytes", "client-download-bytes", "cum-download-bytes", "masks-sent")


def test_killed_run_resumes_to_the_uninterrupted_result(flwr_home, tmp_path):
    """A run whose last checkpoint is after round 2 (it stopped during round 3: the first
    run below has 3 rounds) resumed to round 4 ends with the uninterrupted run's weights,
    masks and metrics. Only downloads differ: the restarted nodes lost the mask, so each
    gets the full mask again on first contact."""
    straight = flwr_run(flwr_home, tmp_path, "straight", RESUME)
    interrupted = flwr_run(flwr_home, tmp_path, "resumed", {**RESUME, "num-server-rounds": 3})
    resumed = flwr_run(flwr_home, tmp_path, "resumed", {**RESUME, "resume": True})

    assert len(interrupted) == 4 and [r["round"] for r in resumed] == [0, 1, 2, 3, 4]
    assert [without(r, ("wall-time",)) for r in resumed[:3]] == [without(r, ("wall-time",)) for r in straight[:3]]
    assert [without(r, ("wall-time", *DOWNLOAD)) for r in resumed] == [
        without(r, ("wall-time", *DOWNLOAD)) for r in straight
    ]
    base, full_masks, _, _ = predicted_sizes()
    assert resumed[3]["masks-sent"] == RESUME["clients-per-round"]
    assert resumed[3]["download-bytes"] == RESUME["clients-per-round"] * (base + full_masks)
    assert_same_model(final_state(tmp_path, "resumed"), final_state(tmp_path, "straight"))


def test_failing_clients_are_dropped_and_the_run_finishes(flwr_home, tmp_path):
    """client-failure-rate 0.3: error replies are dropped (not validation rejections), the
    rest is aggregated."""
    overrides = {"num-server-rounds": 4, "client-failure-rate": 0.3}
    records = flwr_run(flwr_home, tmp_path, "dropouts", overrides)
    assert [r["round"] for r in records] == [0, 1, 2, 3, 4]
    assert all(r["replies"] == NODES for r in records[1:])  # error replies are replies
    assert sum(r["error-replies"] for r in records[1:]) > 0 and all(r["rejected"] == 0 for r in records)
    assert records[-1]["test-accuracy"] > records[0]["test-accuracy"] + 0.2, records


def test_clients_slower_than_the_round_timeout_are_dropped(flwr_home, tmp_path):
    """With a round timeout no client can meet, no reply counts: every round is skipped
    and the global model stays the initial one."""
    records = flwr_run(flwr_home, tmp_path, "timeouts", {"num-server-rounds": 2, "round-timeout": 0.01})
    assert all(r["replies"] == 0 and r["failures"] == NODES and r["skipped"] == 1 for r in records[1:])
    assert records[-1]["test-accuracy"] == records[0]["test-accuracy"]


@pytest.mark.parametrize(
    "overrides",
    [{"strategy": "fedavgm"}, {"strategy": "fedprox", "proximal-mu": 0.01}, {"strategy": "fedadam"},
     {"strategy": "feddst-prox", "proximal-mu": 0.01}, {"strategy": "randommask"},
     {"strategy": "feddst", "server-optimizer": "adam"}],
    ids=["fedavgm", "fedprox", "fedadam", "feddst-prox", "randommask", "feddst-adam"],
)  # fmt: skip
def test_every_strategy_runs_two_rounds(flwr_home, tmp_path, overrides):
    records = flwr_run(flwr_home, tmp_path, "two-rounds", {"num-server-rounds": 2, "local-epochs": 1, **overrides})
    assert [r["round"] for r in records] == [0, 1, 2]
    assert all(r["replies"] == NODES and r["failures"] == r["error-replies"] == r["rejected"] == 0 for r in records[1:])
    assert records[-1]["test-loss"] < records[0]["test-loss"]
    sparse = overrides["strategy"] not in ("fedavgm", "fedprox", "fedadam")
    assert (records[-1]["density"] < 0.5) == sparse


def test_prunefl_counts_its_dense_uploads(flwr_home, tmp_path):
    """Round 0 carries the dense exchange with the pruning client; reconfiguration round 1
    adds every client's dense squared gradients (np.save of each maskable tensor)."""
    base, full_masks, dense, _ = predicted_sizes()
    state, maskable = DigitsCNN().state_dict(), maskable_names(DigitsCNN())
    gradients = sum(dense_tensor_bytes(state[name]) for name in maskable)
    overrides = {"strategy": "prunefl", "num-server-rounds": 2, "delta-r": 1, "r-end": 1, "local-epochs": 1}
    records = flwr_run(flwr_home, tmp_path, "prunefl", overrides)
    assert records[0]["download-bytes"] == records[0]["upload-bytes"] == dense  # one client, dense both ways
    assert records[1]["upload-bytes"] == records[1]["client-upload-bytes"] == NODES * (base + gradients)
    assert records[1]["download-bytes"] == NODES * (base + full_masks)  # first contact: everyone gets the mask
    assert records[1]["mask-entered"] > 0 and records[1]["density"] == records[0]["density"]
    assert records[2]["upload-bytes"] == NODES * base  # no reconfiguration after r-end
    assert NODES * base < records[2]["download-bytes"] <= NODES * (base + full_masks)  # the new mask (deltas or full)


def test_too_small_federation_fails_with_one_clear_line(flwr_home, tmp_path):
    """5 SuperNodes x 1 class cannot hold 10 classes: the ServerApp says so before anything runs."""
    settings = {"classes-per-client": 1, "results-dir": str(tmp_path), "run-name": "small"}
    done = flwr_stream(flwr_home, " ".join(f"{k}={json.dumps(v)}" for k, v in settings.items()))
    lines = [line for line in (done.stdout + done.stderr).splitlines() if "feddst-flwr: cannot split" in line]
    assert lines and "the federation's 5 SuperNodes" in lines[0] and "num-supernodes=50" in lines[0], done.stdout[
        -3000:
    ]
    assert not (tmp_path / "small" / "metrics.jsonl").exists()
