"""Tests for the server's mask rules (feddst_flwr.mask_rules), the mask-structure metrics,
random regrowth and the final mask's file: hand-computed posteriors, seeded selection, a
bounded change per layer, survival across checkpoint and resume."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from fakes import MASKABLE, SHAPES, Federation, make_strategy
from flwr.app import RecordDict

from feddst_flwr import masks as M
from feddst_flwr.aggregation import Votes
from feddst_flwr.checkpoint import Checkpoint, CheckpointError
from feddst_flwr.mask_rules import ThompsonRule, numpy_rng

pytestmark = pytest.mark.usefixtures("task_identity")


def hand_votes() -> tuple[Votes, torch.Tensor]:
    """Six positions; the old mask keeps 0-2. Clients of 10 and 30 examples: the first keeps
    0, 1, 3 (grew 3), the second 0, 2, 4 (grew 4)."""
    clients = torch.tensor([2, 1, 1, 1, 1, 0])
    weight = torch.tensor([40.0, 10.0, 30.0, 10.0, 30.0, 0.0], dtype=torch.float64)
    return Votes({"w": clients}, {"w": weight}), torch.tensor([True, True, True, False, False, False])


def test_thompson_posterior_update_by_hand():
    votes, _ = hand_votes()
    chosen = {"w": torch.tensor([True, False, True, False, True, False])}  # the magnitude rule's choice
    rule = ThompsonRule(gamma=0.5)
    rule.update(votes, 40.0, chosen)
    share = np.array([1.0, 0.25, 0.75, 0.25, 0.75, 0.0])
    v = 0.5 * share + 0.5 * np.array([1, 0, 1, 0, 1, 0])
    assert np.allclose(rule.a["w"].numpy(), 1 + v, rtol=0, atol=1e-15)
    assert np.allclose(rule.b["w"].numpy(), 1 + (1 - v), rtol=0, atol=1e-15)
    rule.update(votes, 40.0, chosen)  # evidence accumulates
    assert np.allclose(rule.a["w"].numpy(), 1 + 2 * v, rtol=0, atol=1e-15)


def test_thompson_select_swaps_at_most_alpha_r_per_layer_and_only_grown_positions():
    torch.manual_seed(0)
    n, count = 4000, 800
    old = torch.zeros(n, dtype=torch.bool)
    old[torch.randperm(n)[:count]] = True
    clients = torch.where(old, 3, 0) + (torch.rand(n) < 0.3).long() * (~old).long()  # some outsiders grown by 1
    votes = Votes({"w": clients}, {"w": clients.double() * 10})
    rule = ThompsonRule()
    rule.update(votes, 30.0, {"w": old})
    for alpha_r in (0.0, 0.01, 0.1, 0.3):
        new = rule.select({"w": old}, votes, alpha_r, 1, numpy_rng(0, alpha_r))["w"]
        swaps = round(alpha_r * count)
        assert int(new.sum()) == count  # exact count
        assert int((new & ~old).sum()) == swaps == int((old & ~new).sum())
        assert not (new & ~old & (clients == 0)).any()  # entrants were grown by some client


def test_thompson_select_is_seeded():
    votes, old = hand_votes()
    rule = ThompsonRule()
    rule.update(votes, 40.0, {"w": old})
    picks = [rule.select({"w": old}, votes, 0.34, 1, numpy_rng(7, "thompson", 5))["w"] for _ in range(2)]
    assert torch.equal(picks[0], picks[1])
    others = {tuple(rule.select({"w": old}, votes, 0.34, 1, numpy_rng(s))["w"].tolist()) for s in range(30)}
    assert len(others) > 1  # the draw depends on the seed


def test_thompson_strategy_state_survives_checkpoint_and_resume(make_cfg):
    """Rounds 1-4 straight vs 1-2, checkpoint, 3-4 in a new strategy: same posteriors, mask, weights."""
    options = {"clients_per_round": 2, "delta_r": 1, "r_end": 4, "alpha": 0.2, "mask_rule": "thompson"}

    def federation() -> Federation:
        return Federation(make_cfg(), strategy=make_strategy(**options), node_ids=(1, 2, 3, 4), same_data=False)

    straight = federation()
    for server_round in range(1, 5):
        straight.round(server_round)
    interrupted = federation()
    for server_round in range(1, 3):
        interrupted.round(server_round)
    saved = Checkpoint(2, interrupted.arrays.to_torch_state_dict(), interrupted.strategy.state_dict(), {})
    resumed = federation()
    resumed.states = {node: RecordDict() for node in resumed.states}
    resumed.arrays = resumed.strategy.load_state_dict(saved.strategy, saved.arrays)
    for server_round in range(3, 5):
        resumed.round(server_round)
    assert straight.strategy.mask_version >= 2
    for name in MASKABLE:
        assert torch.equal(resumed.strategy.masks[name], straight.strategy.masks[name])
        assert torch.equal(resumed.strategy.thompson.a[name], straight.strategy.thompson.a[name])
    final, expected = resumed.arrays.to_torch_state_dict(), straight.arrays.to_torch_state_dict()
    assert all(torch.equal(final[n], expected[n]) for n in SHAPES)
    broken = dict(saved.strategy, posterior={"a": {}})
    with pytest.raises(CheckpointError, match="strategy.posterior"):
        federation().strategy.load_state_dict(broken, saved.arrays)


def test_thompson_readjust_round_changes_at_most_alpha_r_of_each_layer(make_cfg):
    strategy = make_strategy(clients_per_round=3, delta_r=1, r_end=4, alpha=0.3, mask_rule="thompson")
    federation = Federation(make_cfg(), strategy=strategy, same_data=False)
    federation.round(1)
    before = strategy.movement.initial
    alpha_r = M.readjust_alpha(1, 0.3, 1, 4)
    for name, mask in strategy.masks.items():
        assert int(mask.sum()) == strategy.counts[name]
        assert int((mask & ~before[name]).sum()) <= round(alpha_r * strategy.counts[name])


def test_unknown_mask_rule_is_named():
    with pytest.raises(ValueError, match="mask_rule='votes'"):
        make_strategy(mask_rule="votes")


# --------------------------------------------------------------------------- structure


def test_structure_of_a_hand_built_mask():
    mask = torch.zeros(4, 5, dtype=torch.bool)  # in-degrees 3, 1, 0, 4; columns 0-3 used
    mask[0, :3] = mask[1, 0] = mask[3, :4] = True
    degrees = np.array([3, 1, 0, 4])
    got = M.structure(mask)
    assert got["indegree-cv"] == pytest.approx(degrees.std() / degrees.mean(), rel=1e-12)
    assert got["units"] == 3 and got["inputs"] == 4
    conv = torch.zeros(2, 3, 2, 2, dtype=torch.bool)  # out channel 0: 2 weights in input channel 1
    conv[0, 1, 0, :] = True
    assert M.structure(conv) == {"indegree-cv": 1.0, "units": 1, "inputs": 1}


def test_readjust_round_records_structure_explored_and_held_leavers(make_cfg):
    strategy = make_strategy(clients_per_round=3, delta_r=1, r_end=4, alpha=0.3)
    federation = Federation(make_cfg(), strategy=strategy, same_data=False)
    federation.round(1)
    stats = strategy.stats
    assert set(stats.mask_structure) == set(MASKABLE)
    assert stats.mask_structure[MASKABLE[0]] == M.structure(strategy.masks[MASKABLE[0]])
    total = sum(math.prod(SHAPES[n]) for n in MASKABLE)
    ever = sum(int((strategy.movement.initial[n] | strategy.masks[n]).sum()) for n in MASKABLE)
    assert stats.mask_explored == pytest.approx(ever / total, rel=1e-12) and ever > M.active(strategy.masks)
    assert 0.0 <= stats.mask_leavers_held <= 1.0


def test_save_and_load_masks_round_trip(tmp_path):
    generator = torch.Generator().manual_seed(3)
    masks = {
        "a.weight": torch.rand(7, 3, 3, 3, generator=generator) < 0.2,
        "b": torch.rand(13, generator=generator) < 0.5,
    }
    M.save_masks(tmp_path / "m.npz", masks)
    loaded = M.load_masks(tmp_path / "m.npz")
    assert set(loaded) == set(masks) and all(torch.equal(loaded[n], masks[n]) for n in masks)


# --------------------------------------------------------------------------- random regrowth


def test_random_regrowth_is_uniform_over_inactive_positions_and_never_picks_kept_ones():
    """SET: 2000 readjustments of a 400-position layer (100 active, 25 regrown each): every
    position outside the kept ones is grown equally often (chi-square, 1 % level)."""
    n, count, alpha_r = 400, 100, 0.25
    mask = torch.zeros(n, dtype=torch.bool)
    mask[:count] = True
    weights = torch.linspace(1.0, 2.0, n) * mask  # kept: the 75 largest active = positions 25-99
    grown = torch.zeros(n)
    generator = torch.Generator().manual_seed(0)
    for _ in range(2000):
        new = M.prune_and_regrow({"w": weights.clone()}, None, {"w": mask}, alpha_r, generator, regrow="random")["w"]
        kept = torch.zeros(n, dtype=torch.bool)
        kept[25:100] = True
        assert int(new.sum()) == count and (new & kept).sum() == 75
        grown += (new & ~kept).float()
    counts = torch.cat([grown[:25], grown[100:]]).numpy()  # the 325 positions that may be grown
    expected = 2000 * 25 / 325
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 393.0  # chi-square 0.99 quantile, 324 degrees of freedom: 386.9 (393: margin)
    assert grown[25:100].sum() == 0


def test_gradient_regrowth_needs_gradients_and_unknown_regrow_is_named():
    mask = {"w": torch.tensor([True, False, True, False])}
    with pytest.raises(ValueError, match="needs the dense gradients"):
        M.prune_and_regrow({"w": torch.ones(4)}, None, mask, 0.5, torch.Generator(), regrow="gradient")
    with pytest.raises(ValueError, match="regrow 'momentum'"):
        M.prune_and_regrow({"w": torch.ones(4)}, None, mask, 0.5, torch.Generator(), regrow="momentum")
