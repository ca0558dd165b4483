"""Tests for feddst_flwr.checkpoint and FedDST's resume: atomic save, clear errors for a
missing, corrupt or mismatched checkpoint, and a resumed strategy that ends where an
uninterrupted one does."""

from __future__ import annotations

import re
from dataclasses import asdict

import pytest
import torch
from fakes import MASKABLE, SHAPES, Federation, make_strategy, mask_flags, new_model
from flwr.app import ArrayRecord, RecordDict

from feddst_flwr.checkpoint import (
    FORMAT,
    Checkpoint,
    CheckpointError,
    after_round,
    checkpoint_path,
    fingerprint,
    load_checkpoint,
    save_checkpoint,
    swapped,
)
from feddst_flwr.prunefl import PruneFL
from feddst_flwr.server_optimizer import ServerOptimizer

pytestmark = pytest.mark.usefixtures("task_identity")


def small_checkpoint(server_round: int = 2) -> Checkpoint:
    state = new_model().state_dict()
    strategy = make_strategy()
    strategy.initialize(ArrayRecord(state))
    recorder = {"records": [{"round": 0, "test-accuracy": 0.1}], "cumulative": {"upload": 5}, "elapsed": 1.5}
    return Checkpoint(server_round, state, strategy.state_dict(), recorder)


def test_save_then_load_round_trips(make_cfg, tmp_path):
    cfg = make_cfg(results_dir=str(tmp_path), num_server_rounds=10)
    saved = small_checkpoint()
    path = save_checkpoint(cfg, saved)
    assert path == checkpoint_path(cfg) and [p.name for p in path.parent.iterdir()] == ["checkpoint.pt"]
    loaded = load_checkpoint(cfg)
    assert loaded.round == 2 and loaded.recorder == saved.recorder
    assert all(torch.equal(loaded.arrays[n], saved.arrays[n]) for n in SHAPES)
    assert all(torch.equal(loaded.strategy["masks"][n], saved.strategy["masks"][n]) for n in MASKABLE)
    assert loaded.strategy["rng"] == saved.strategy["rng"]


def test_resume_may_change_rounds_and_folders_but_not_the_experiment(make_cfg, tmp_path):
    save_checkpoint(make_cfg(results_dir=str(tmp_path), num_server_rounds=10), small_checkpoint())
    assert load_checkpoint(make_cfg(results_dir=str(tmp_path), num_server_rounds=20, resume=True)).round == 2
    with pytest.raises(CheckpointError, match=r"different experiment \(lr: 0.1 -> 0.5, seed: 0 -> 3\)"):
        load_checkpoint(
            make_cfg(results_dir=str(tmp_path), num_server_rounds=10, lr=0.5, seed=3, run_name="feddst-digits-seed0")
        )


def test_missing_checkpoint_is_an_error_not_a_fresh_start(make_cfg, tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(make_cfg(results_dir=str(tmp_path), resume=True))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_checkpoint_is_an_error(make_cfg, tmp_path, damage):
    cfg = make_cfg(results_dir=str(tmp_path), num_server_rounds=10)
    path = save_checkpoint(cfg, small_checkpoint())
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x80\x04junk" * 10, "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="corrupt or unreadable"):
        load_checkpoint(cfg)


def test_checkpoint_of_a_finished_run_is_an_error(make_cfg, tmp_path):
    save_checkpoint(make_cfg(results_dir=str(tmp_path), num_server_rounds=10), small_checkpoint(server_round=10))
    with pytest.raises(CheckpointError, match="nothing left"):
        load_checkpoint(make_cfg(results_dir=str(tmp_path), num_server_rounds=10))


def test_checkpoint_of_another_model_is_an_error():
    strategy = make_strategy()
    strategy.initialize(ArrayRecord(new_model().state_dict()))
    saved = small_checkpoint()
    arrays = {**saved.arrays, "fc2.bias": torch.zeros(3)}
    with pytest.raises(CheckpointError, match="checkpoint field .arrays. has shapes"):
        strategy.load_state_dict(saved.strategy, arrays)


def snapshot(federation: Federation, rounds: range) -> None:
    for server_round in rounds:
        federation.round(server_round)


def two_runs(make_cfg, tmp_path, rounds=(4, 4)):
    """Checkpoints of two runs with different masks and models: (weights run, mask run), their paths."""
    runs = []
    for index, (seed, server_round) in enumerate(zip((0, 1), rounds)):
        strategy = make_strategy(seed=seed, server_optimizer=ServerOptimizer("adam", lr=0.01, beta1=0.9))
        state = {name: tensor + index + 1 for name, tensor in new_model().state_dict().items()}  # dense, no zeros
        strategy.initialize(ArrayRecord(new_model().state_dict()))
        strategy.server_optimizer.m = {name: torch.ones(SHAPES[name]) for name in MASKABLE}  # a step taken
        recorder = {"records": [{"round": 0}], "cumulative": {"upload": 7 * seed}, "elapsed": 1.0}
        cfg = make_cfg(results_dir=str(tmp_path), run_name=f"run{seed}", num_server_rounds=10, seed=seed)
        checkpoint = Checkpoint(server_round, state, strategy.state_dict(), recorder)
        runs.append((checkpoint, save_checkpoint(cfg, checkpoint)))
    return runs


def test_swapped_checkpoint_is_one_runs_model_under_the_other_runs_mask(make_cfg, tmp_path):
    (model, model_path), (into, into_path) = two_runs(make_cfg, tmp_path)
    swap = swapped(model_path, into_path)
    masks = into.strategy["masks"]
    assert any(not torch.equal(masks[n], model.strategy["masks"][n]) for n in MASKABLE)
    for name in SHAPES:
        expected = model.arrays[name] * masks[name] if name in MASKABLE else model.arrays[name]
        assert torch.equal(swap["arrays"][name], expected)
    assert all(int(torch.count_nonzero(swap["arrays"][n])) == int(masks[n].sum()) for n in MASKABLE)
    assert swap["round"] == 4 and swap["recorder"] == into.recorder
    assert swap["strategy"]["rng"] == into.strategy["rng"] and swap["strategy"]["mask_version"] == 0
    assert swap["strategy"]["optimizer"] == {"m": {}, "v": {}}  # the other model's moments are dropped
    resumed_cfg = make_cfg(results_dir=str(tmp_path), run_name="swap", num_server_rounds=10, seed=1, resume=True)
    path = checkpoint_path(resumed_cfg)
    path.parent.mkdir()
    torch.save(swap, path)
    loaded = load_checkpoint(resumed_cfg)  # a run of the mask run's config resumes it
    strategy = make_strategy(seed=1, server_optimizer=ServerOptimizer("adam", lr=0.01, beta1=0.9))
    strategy.initialize(ArrayRecord(new_model().state_dict()))
    arrays = strategy.load_state_dict(loaded.strategy, loaded.arrays).to_torch_state_dict()
    assert all(torch.equal(strategy.masks[n], masks[n]) for n in MASKABLE)
    assert all(torch.equal(arrays[n], swap["arrays"][n]) for n in SHAPES)
    with pytest.raises(CheckpointError, match=r"different experiment \(seed: 1 -> 0\)"):
        load_checkpoint(make_cfg(results_dir=str(tmp_path), run_name="swap", num_server_rounds=10, seed=0))


def test_swapping_checkpoints_of_different_rounds_or_models_is_an_error(make_cfg, tmp_path):
    (_, first), (_, second) = two_runs(make_cfg, tmp_path, rounds=(4, 6))
    with pytest.raises(CheckpointError, match="round 4, .* of round 6"):
        swapped(first, second)
    saved = torch.load(second, weights_only=True)
    saved["round"] = 4
    saved["arrays"][FC] = torch.zeros(3)
    torch.save(saved, second)
    with pytest.raises(CheckpointError, match=rf"different models \(tensors \['{FC}'\]\)"):
        swapped(first, second)
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="broken.pt is corrupt"):
        swapped(first, tmp_path / "broken.pt")


def test_resumed_strategy_ends_where_the_uninterrupted_one_does(make_cfg):
    """Rounds 1-5 straight vs rounds 1-2, checkpoint, then 3-5 in a new strategy whose nodes
    lost their state (a restarted run): same weights, mask, version and sampling."""
    options = {"clients_per_round": 2, "delta_r": 1, "r_end": 5, "alpha": 0.2, "server_optimizer": None}
    straight = Federation(make_cfg(), strategy=make_strategy(**options), node_ids=(1, 2, 3, 4), same_data=False)
    snapshot(straight, range(1, 6))

    interrupted = Federation(make_cfg(), strategy=make_strategy(**options), node_ids=(1, 2, 3, 4), same_data=False)
    snapshot(interrupted, range(1, 3))
    strategy = interrupted.strategy
    saved = Checkpoint(2, interrupted.arrays.to_torch_state_dict(), strategy.state_dict(), {})

    resumed = Federation(make_cfg(), strategy=make_strategy(**options), node_ids=(1, 2, 3, 4), same_data=False)
    resumed.states = {node: RecordDict() for node in resumed.states}  # the nodes forgot everything
    resumed.arrays = resumed.strategy.load_state_dict(saved.strategy, saved.arrays)
    first = resumed.configure(3)
    assert all(mask_flags(first).values())  # every node gets the bitmask again
    resumed.aggregate(3, [resumed.reply(m) for m in first])
    snapshot(resumed, range(4, 6))

    assert resumed.strategy.mask_version == straight.strategy.mask_version >= 2
    final, expected = resumed.arrays.to_torch_state_dict(), straight.arrays.to_torch_state_dict()
    assert all(torch.equal(final[n], expected[n]) for n in SHAPES)
    assert all(torch.equal(resumed.strategy.masks[n], straight.strategy.masks[n]) for n in MASKABLE)
    assert resumed.strategy.rng.getstate() == straight.strategy.rng.getstate()


def corrupted(checkpoint: Checkpoint, path: str, value) -> Checkpoint:
    """The checkpoint with the field at dotted `path` set to `value` (DROP: removed)."""
    checkpoint.strategy["initial_masks"] = dict(checkpoint.strategy["initial_masks"])  # not an alias of masks
    *parents, last = path[: -len(FC) - 1].split(".") + [FC] if path.endswith(FC) else path.split(".")
    holder = checkpoint
    for key in parents:
        holder = getattr(holder, key) if isinstance(holder, Checkpoint) else holder[key]
    if isinstance(holder, Checkpoint):
        setattr(holder, last, value)
    elif value is DROP:
        del holder[last]
    else:
        holder[last] = value
    return checkpoint


DROP = object()
FC = "fc1.weight"
CORRUPTIONS = {
    "round": "x", "arrays": [1, 2], "arrays.fc1.weight": [0.0, 1.0], "strategy": None, "strategy.masks": DROP,
    f"strategy.masks.{FC}": torch.zeros(SHAPES[FC]), f"strategy.initial_masks.{FC}": "mask",
    "strategy.mask_version": 1.5, "strategy.rng": DROP, "strategy.optimizer": {"m": {}}, "strategy.optimizer.m": [0],
    "recorder": "r", "recorder.records": DROP, "recorder.cumulative": {"bogus": 1}, "recorder.elapsed": "long",
}  # fmt: skip
SHAPE_CORRUPTIONS = {
    f"arrays.{FC}": torch.zeros(3), f"strategy.masks.{FC}": torch.zeros(3, dtype=torch.bool),
    f"strategy.initial_masks.{FC}": torch.zeros(2, 2, dtype=torch.bool), f"strategy.optimizer.m.{FC}": torch.zeros(1),
    "strategy.rng": (3, (1, 2), None),
}  # fmt: skip


@pytest.mark.parametrize("field", CORRUPTIONS)
def test_each_malformed_field_is_a_checkpoint_error_naming_it(make_cfg, tmp_path, field):
    cfg = make_cfg(results_dir=str(tmp_path), num_server_rounds=10)
    save_checkpoint(cfg, corrupted(small_checkpoint(), field, CORRUPTIONS[field]))
    with pytest.raises(CheckpointError, match=re.escape(field.split(f".{FC}")[0])):
        load_checkpoint(cfg)


@pytest.mark.parametrize("field", SHAPE_CORRUPTIONS)
def test_a_field_shaped_unlike_the_model_is_a_checkpoint_error_naming_it(make_cfg, tmp_path, field):
    cfg = make_cfg(results_dir=str(tmp_path), num_server_rounds=10)
    save_checkpoint(cfg, corrupted(small_checkpoint(), field, SHAPE_CORRUPTIONS[field]))
    loaded = load_checkpoint(cfg)
    strategy = make_strategy()
    strategy.initialize(ArrayRecord(new_model().state_dict()))
    with pytest.raises(CheckpointError, match=re.escape(field.split(f".{FC}")[0])):
        strategy.load_state_dict(loaded.strategy, loaded.arrays)


def save_raw(cfg, **changes) -> None:
    """Write a checkpoint file as save_checkpoint does, with its top-level entries changed."""
    path = checkpoint_path(cfg)
    path.parent.mkdir(parents=True)
    saved = {"format": FORMAT, "config": fingerprint(cfg), **asdict(small_checkpoint())}
    torch.save({**saved, **changes}, path)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"format": torch.tensor([2, 2])}, r"^checkpoint field 'format' is Tensor, expected <class 'int'>$"),
        ({"format": "2"}, r"^checkpoint field 'format' is str, expected <class 'int'>$"),
        ({"config": [1, 2]}, r"^checkpoint field 'config' is list, expected <class 'dict'>$"),
        ({"config": {1: 2}}, r"^checkpoint field 'config key' is int, expected <class 'str'>$"),
        (
            {"config": {"seed": torch.zeros(2)}},
            r"^checkpoint field 'config.seed' is Tensor, expected a run-config value$",
        ),
    ],
    ids=["format-tensor", "format-str", "config-list", "config-int-key", "config-tensor-value"],
)
def test_format_and_config_are_type_checked_before_use(make_cfg, tmp_path, changes, message):
    cfg = make_cfg(results_dir=str(tmp_path), num_server_rounds=10)
    save_raw(cfg, **changes)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(cfg)


NAN = float("nan")
OUT_OF_RANGE = {  # field -> (value, the message naming it)
    "round": (-1, r"field 'round' = -1: expected in \[0, 10\)"),
    "strategy.mask_version": (-1, r"^checkpoint field 'strategy.mask_version' = -1: expected in \[0, 2\]"),
    "strategy.mask_version ": (3, r"^checkpoint field 'strategy.mask_version' = 3: expected in \[0, 2\]"),
    f"arrays.{FC}": (torch.full(SHAPES[FC], NAN), rf"^checkpoint field 'arrays.{FC}' holds non-finite values$"),
    "strategy.optimizer.m": (
        {FC: torch.full(SHAPES[FC], NAN, dtype=torch.float64)},
        rf"^checkpoint field 'strategy.optimizer.m.{FC}' holds non-finite values$",
    ),
    "strategy.optimizer.v": (
        {FC: -torch.ones(SHAPES[FC], dtype=torch.float64)},
        rf"^checkpoint field 'strategy.optimizer.v.{FC}' holds values below 0.0$",
    ),
    "strategy.explored": ({FC: torch.zeros(SHAPES[FC])}, rf"^checkpoint field 'strategy.explored.{FC}' has dtype"),
}


@pytest.mark.parametrize("field", OUT_OF_RANGE)
def test_a_field_out_of_its_range_is_a_checkpoint_error_naming_it(make_cfg, tmp_path, field):
    """A round < 0 would resume at round 0; a mask version < 0 (or beyond the round) makes
    every client refuse the round config; a NaN weight every client refuse the model; NaN
    moments or a negative Adam v make every round discarded."""
    value, message = OUT_OF_RANGE[field]
    cfg = make_cfg(results_dir=str(tmp_path), num_server_rounds=10)
    save_checkpoint(cfg, corrupted(small_checkpoint(server_round=2), field.strip(), value))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(cfg)


class Recorder:
    """A round recorder that records nothing."""

    def __call__(self, server_round, arrays):
        return None

    def state_dict(self):
        return {"records": [], "cumulative": {}, "elapsed": 0.0}


def test_the_round_zero_checkpoint_after_round_writes_loads(make_cfg, tmp_path):
    """after_round also checkpoints round 0 (start's initial evaluate_fn call): the initial
    mask (PruneFL's one-client pruning); resuming from it starts at round 1, so 0 is valid."""
    cfg = make_cfg(results_dir=str(tmp_path), num_server_rounds=10, checkpoint_every=3)
    strategy = make_strategy()
    arrays = strategy.initialize(ArrayRecord(new_model().state_dict()))
    after_round(cfg, strategy, Recorder(), 0, arrays)
    loaded = load_checkpoint(cfg)
    assert loaded.round == 0 and loaded.strategy["mask_version"] == 0


def one_more(mask: torch.Tensor) -> torch.Tensor:
    """The mask with its first inactive position set: one weight more than the sparsity allows."""
    mask = mask.clone()
    mask.view(-1)[torch.nonzero(~mask.view(-1))[0]] = True
    return mask


def one_fewer(mask: torch.Tensor) -> torch.Tensor:
    mask = mask.clone()
    mask.view(-1)[torch.nonzero(mask.view(-1))[0]] = False
    return mask


@pytest.mark.parametrize("field", ["masks", "initial_masks"])
@pytest.mark.parametrize("change", [one_more, one_fewer], ids=["one-more", "one-fewer"])
def test_a_mask_count_other_than_the_runs_is_a_checkpoint_error_naming_the_layer(make_cfg, tmp_path, field, change):
    """Before: a mask with one weight more loaded, then every honest reply was refused."""
    cfg = make_cfg(results_dir=str(tmp_path), num_server_rounds=10)
    saved = small_checkpoint()
    strategy = make_strategy()
    strategy.initialize(ArrayRecord(new_model().state_dict()))
    count = strategy.counts[FC]
    mask = change(saved.strategy[field][FC])
    save_checkpoint(cfg, corrupted(saved, f"strategy.{field}.{FC}", mask))
    loaded = load_checkpoint(cfg)
    kept = int(mask.sum())
    assert kept == count + (1 if change is one_more else -1)
    with pytest.raises(
        CheckpointError,
        match=rf"^checkpoint field 'strategy.{field}.{FC}' keeps {kept} weights; the run's sparsity keeps {count}$",
    ):
        strategy.load_state_dict(loaded.strategy, loaded.arrays)


def test_prunefl_state_with_its_own_mask_counts_loads(make_cfg):
    """PruneFL keeps the run's counts too (magnitude_prune to `counts`): its state reloads."""
    cfg = make_cfg()
    strategy = PruneFL(maskable=MASKABLE, sparsity=0.8, delta_r=2, r_end=4, clients_per_round=2, seed=0)
    federation = Federation(cfg, strategy=strategy, node_ids=(1, 2, 3), same_data=False)
    federation.round(1)
    state = strategy.state_dict()
    again = PruneFL(maskable=MASKABLE, sparsity=0.8, delta_r=2, r_end=4, clients_per_round=2, seed=0)
    again.initialize(ArrayRecord(new_model().state_dict()))
    again.load_state_dict(state, federation.arrays.to_torch_state_dict())
    assert all(torch.equal(again.masks[n], strategy.masks[n]) for n in MASKABLE)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("a", NAN, r"^checkpoint field 'strategy.posterior.a.fc1.weight' holds non-finite values$"),
        ("b", 0.0, r"^checkpoint field 'strategy.posterior.b' is not > 0 in \['fc1.weight'\]$"),
    ],
)
def test_thompson_posteriors_must_be_finite_and_positive(make_cfg, key, value, message):
    options = {"clients_per_round": 2, "delta_r": 1, "r_end": 4, "alpha": 0.2, "mask_rule": "thompson"}
    federation = Federation(make_cfg(), strategy=make_strategy(**options), node_ids=(1, 2, 3), same_data=False)
    federation.round(1)
    state = federation.strategy.state_dict()
    posterior = {k: dict(v) for k, v in state["posterior"].items()}
    posterior[key][FC] = torch.full_like(posterior[key][FC], value)
    fresh = make_strategy(**options)
    fresh.initialize(ArrayRecord(new_model().state_dict()))
    with pytest.raises(CheckpointError, match=message):
        fresh.load_state_dict({**state, "posterior": posterior}, federation.arrays.to_torch_state_dict())
