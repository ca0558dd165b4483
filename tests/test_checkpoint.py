"""Tests for feddst_flwr.checkpoint and FedDST's resume: atomic save, clear errors for a
missing, corrupt or mismatched checkpoint, and a resumed strategy that ends where an
uninterrupted one does."""

from __future__ import annotations

import re

import pytest
import torch
from fakes import MASKABLE, SHAPES, Federation, make_strategy, mask_flags, new_model
from flwr.app import ArrayRecord, RecordDict

from feddst_flwr.checkpoint import Checkpoint, CheckpointError, checkpoint_path, load_checkpoint, save_checkpoint

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
