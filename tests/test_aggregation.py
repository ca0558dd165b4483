"""Unit tests for feddst_flwr.aggregation: sparse weighted average and re-prune.

Three hand-made clients, one masked layer "w" of shape (2, 3) (flat positions 0..5)
and a dense bias "b" of shape (2,):

    position     0     1     2     3     4      5
    A (n=10)   1.0  -1.0    -     -     -     0.5
    B (n=30)   2.0   3.0    -     -   -0.25    -
    C (n=60)    -    1.0    -   -4.0    -     2.0      ("-": pruned by that client)

Averages over the clients that kept each weight:
    0: (10*1 + 30*2) / 40            = 1.75
    1: (10*-1 + 30*3 + 60*1) / 100   = 1.4
    2: nobody kept it                = 0
    3: C only                        = -4.0
    4: B only                        = -0.25
    5: (10*0.5 + 60*2) / 70          = 125/70
Bias over all clients: A [1, 0], B [0, 2], C [2, 1] ->
    [(10 + 0 + 120) / 100, (0 + 60 + 60) / 100] = [1.3, 1.2]
"""

from __future__ import annotations

import math

import pytest
import torch

from feddst_flwr.aggregation import ClientUpdate, aggregate, sparse_average
from feddst_flwr.server_optimizer import ServerOptimizer

NAN = float("nan")  # marks a pruned position in the tables below
SHAPE = (2, 3)


def client(values: list[float], bias: list[float], num_examples: int, stale: float = 0.0) -> ClientUpdate:
    """A client update; pruned positions (NaN in `values`) hold `stale` in its state."""
    flat = torch.tensor(values, dtype=torch.float32)
    mask = ~flat.isnan()
    weights = torch.where(mask, flat, torch.tensor(stale))
    return ClientUpdate(
        state={"w": weights.view(SHAPE), "b": torch.tensor(bias)},
        masks={"w": mask.view(SHAPE)},
        num_examples=num_examples,
    )


def three_clients(stale: float = 0.0) -> list[ClientUpdate]:
    return [
        client([1.0, -1.0, NAN, NAN, NAN, 0.5], [1.0, 0.0], 10, stale),
        client([2.0, 3.0, NAN, NAN, -0.25, NAN], [0.0, 2.0], 30, stale),
        client([NAN, 1.0, NAN, -4.0, NAN, 2.0], [2.0, 1.0], 60, stale),
    ]


AVERAGED_W = [1.75, 1.4, 0.0, -4.0, -0.25, 125 / 70]
AVERAGED_B = [1.3, 1.2]


def flat(tensor: torch.Tensor) -> list[float]:
    return tensor.flatten().tolist()


def positions(mask: torch.Tensor) -> list[int]:
    return mask.flatten().nonzero().flatten().tolist()


# --------------------------------------------------------------------------- sparse average


def test_two_clients_weighted_by_samples():
    updates = [
        client([1.0, NAN, NAN, NAN, NAN, NAN], [0.0, 0.0], 10),
        client([5.0, NAN, NAN, NAN, NAN, NAN], [4.0, 8.0], 30),
    ]
    state, _ = sparse_average(updates)
    assert state["w"][0, 0].item() == pytest.approx((10 * 1.0 + 30 * 5.0) / 40)
    assert flat(state["b"]) == pytest.approx([30 * 4.0 / 40, 30 * 8.0 / 40])


def test_sparse_average_only_counts_clients_that_kept_a_weight():
    state, votes = sparse_average(three_clients())
    assert flat(state["w"]) == pytest.approx(AVERAGED_W, rel=1e-6)
    assert flat(votes.clients["w"]) == [2, 3, 0, 1, 1, 2]
    assert flat(votes.weight["w"]) == [40, 100, 0, 60, 30, 70]  # their summed num_examples


def test_pruned_positions_do_not_vote_even_with_stale_values():
    state, _ = sparse_average(three_clients(stale=100.0))
    assert flat(state["w"]) == pytest.approx(AVERAGED_W, rel=1e-6)


def test_weight_nobody_kept_is_zero():
    state, votes = sparse_average(three_clients(stale=100.0))
    assert state["w"].flatten()[2].item() == 0.0
    assert votes.clients["w"].flatten()[2] == 0


def test_dense_tensors_weighted_over_all_clients():
    state, votes = sparse_average(three_clients())
    assert flat(state["b"]) == pytest.approx(AVERAGED_B, rel=1e-6)
    assert "b" not in votes.clients and "b" not in votes.weight


def test_outputs_are_float32_with_original_shapes():
    state, votes = sparse_average(three_clients())
    assert state["w"].dtype == torch.float32 and tuple(state["w"].shape) == SHAPE
    assert state["b"].dtype == torch.float32 and tuple(state["b"].shape) == (2,)
    assert tuple(votes.clients["w"].shape) == tuple(votes.weight["w"].shape) == SHAPE


def test_min_votes_zeroes_weights_kept_by_too_few_clients():
    state, _ = sparse_average(three_clients(), min_votes=2)
    # positions 3 (C only) and 4 (B only) lose; 0, 1 and 5 keep their averages
    assert flat(state["w"]) == pytest.approx([1.75, 1.4, 0.0, 0.0, 0.0, 125 / 70], rel=1e-6)
    assert flat(state["b"]) == pytest.approx(AVERAGED_B, rel=1e-6)  # dense: no votes


def test_min_votes_three_needs_every_client():
    state, _ = sparse_average(three_clients(), min_votes=3)
    assert flat(state["w"]) == pytest.approx([0.0, 1.4, 0.0, 0.0, 0.0, 0.0], rel=1e-6)


def test_single_client_is_returned_unchanged():
    update = three_clients()[2]
    state, votes = sparse_average([update])
    assert torch.equal(state["w"], update.state["w"])
    assert torch.equal(state["b"], update.state["b"])
    assert torch.equal(votes.clients["w"] == 1, update.masks["w"])


def test_no_updates_is_an_error():
    with pytest.raises(ValueError):
        sparse_average([])


# --------------------------------------------------------------------------- aggregate (re-prune)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_aggregate_reprunes_to_count_by_magnitude():
    # |averages| at voted positions: 3: 4.0, 5: 1.786, 0: 1.75, 1: 1.4, 4: 0.25
    state, masks, votes = aggregate(three_clients(), {"w": 3}, gen())
    assert positions(masks["w"]) == [0, 3, 5]
    assert flat(state["w"]) == pytest.approx([1.75, 0.0, 0.0, -4.0, 0.0, 125 / 70], rel=1e-6)
    assert flat(state["b"]) == pytest.approx(AVERAGED_B, rel=1e-6)
    assert flat(votes.clients["w"]) == [2, 3, 0, 1, 1, 2]


@pytest.mark.parametrize("count", [0, 1, 2, 3, 4, 5])
def test_aggregate_keeps_exact_count_and_zeroes_the_rest(count):
    state, masks, _ = aggregate(three_clients(), {"w": count}, gen())
    assert int(masks["w"].sum()) == count
    assert (state["w"][~masks["w"]] == 0).all()
    kept = sorted(abs(v) for v in state["w"][masks["w"]].tolist())
    dropped = [abs(v) for i, v in enumerate(AVERAGED_W) if not masks["w"].flatten()[i]]
    assert all(k >= d for k in kept for d in dropped)


def test_aggregate_fills_count_when_too_few_weights_got_votes():
    # only 0, 1 and 5 get two votes; a fourth slot comes from the zero positions 2, 3, 4,
    # where 3 (C, n = 60) and 4 (B, n = 30) hold one vote each: the heavier vote, 3, wins
    state, masks, _ = aggregate(three_clients(), {"w": 4}, gen(), min_votes=2)
    assert positions(masks["w"]) == [0, 1, 3, 5]
    assert flat(state["w"]) == pytest.approx([1.75, 1.4, 0.0, 0.0, 0.0, 125 / 70], rel=1e-6)


def regrown_at_zero() -> list[ClientUpdate]:
    """Four clients share positions 0 and 1; each regrew new positions at value zero (the
    paper's upload): 2 by A (n=10), 4 by A and B (n=10+10), 5 by C (n=50), 3 by nobody."""
    return [
        client([1.0, 2.0, 0.0, NAN, 0.0, NAN], [0.0, 0.0], 10),
        client([1.0, 2.0, NAN, NAN, 0.0, NAN], [0.0, 0.0], 10),
        client([1.0, 2.0, NAN, NAN, NAN, 0.0], [0.0, 0.0], 50),
        client([1.0, 2.0, NAN, NAN, NAN, NAN], [0.0, 0.0], 10),
    ]


def test_reprune_ranks_zero_valued_regrowth_by_sample_weighted_votes_not_index():
    """Index order (2, 4, 5) and vote order (5: 50, 4: 20, 2: 10) disagree: votes win."""
    for seed in range(5):
        _, masks, _ = aggregate(regrown_at_zero(), {"w": 3}, gen(seed))
        assert positions(masks["w"]) == [0, 1, 5]
        _, masks, _ = aggregate(regrown_at_zero(), {"w": 4}, gen(seed))
        assert positions(masks["w"]) == [0, 1, 4, 5]


def test_reprune_breaks_equal_votes_by_seed():
    """Positions 2, 3, 4, 5 regrown at zero by one client each, all n = 10: the seed decides."""
    updates = [client([1.0] + [NAN] * 5, [0.0, 0.0], 10)] + [
        client([1.0] + [0.0 if i == j else NAN for i in range(1, 6)], [0.0, 0.0], 10) for j in range(2, 6)
    ]
    picks = {tuple(positions(aggregate(updates, {"w": 2}, gen(seed))[1]["w"])) for seed in range(20)}
    assert picks == {(0, 2), (0, 3), (0, 4), (0, 5)}


# --------------------------------------------------------------------------- server optimizer


def optimizer_case():
    """Previous global (w kept at positions 0 and 1 of 3) and a re-pruned aggregate keeping 1
    and 2: position 0 leaves, 1 stays, 2 enters."""
    old = {"w": torch.tensor([1.0, 2.0, 0.0]), "b": torch.tensor([0.5])}
    new = {"w": torch.tensor([0.0, 3.0, 0.03]), "b": torch.tensor([1.5])}
    return old, new, {"w": torch.tensor([False, True, True])}, {"w": torch.tensor([True, True, False])}


def test_server_optimizer_none_takes_the_aggregate():
    old, new, masks, old_masks = optimizer_case()
    assert ServerOptimizer("none", 1.0, 0.9).step(old, new, masks, old_masks) is new


def test_server_optimizer_momentum_by_hand():
    old, new, masks, old_masks = optimizer_case()
    opt = ServerOptimizer("momentum", lr=0.5, beta1=0.9)
    first = opt.step(old, new, masks, old_masks)  # v = delta = (-1, 1, .) for w, (1) for b; theta = old + 0.5 v
    assert torch.equal(first["w"], torch.tensor([0.0, 2.5, 0.03]))  # 0 left: exactly 0; 2 entered: its aggregate
    assert torch.equal(first["b"], torch.tensor([1.0]))
    assert torch.equal(opt.m["w"], torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))  # left and entered: 0
    second = opt.step(first, new, masks, masks)  # nothing enters: v = 0.9 v + (new - first)
    expected = torch.tensor([0.0, 2.5 + 0.5 * (0.9 + 0.5), 0.03 + 0.5 * (0.03 - 0.03)])
    assert torch.equal(second["w"], expected)


def test_server_optimizer_adam_by_hand():
    old, new, masks, old_masks = optimizer_case()
    opt = ServerOptimizer("adam", lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    state = opt.step(old, new, masks, old_masks)
    m, v = (1 - 0.9) * 1.0, (1 - 0.99) * 1.0**2  # position 1: (1 - beta1) delta, (1 - beta2) delta^2, delta = 1
    assert state["w"][1] == torch.tensor(2.0 + 0.1 * m / (math.sqrt(v) + 1e-3), dtype=torch.float64).float()
    assert state["w"][0] == 0 and state["w"][2] == torch.tensor(0.03)  # left: 0; entered: its aggregate exactly
    assert torch.equal(opt.m["w"], torch.tensor([0.0, m, 0.0], dtype=torch.float64))
    assert torch.equal(opt.v["w"], torch.tensor([0.0, v, 0.0], dtype=torch.float64))
    assert torch.allclose(state["b"], torch.tensor([0.5 + 0.1 * 0.1 / (0.1 + 1e-3)]))


def test_server_optimizer_entered_weight_then_steps_from_its_aggregate():
    """RigL's rule: a new connection keeps its value; its moments start at zero, so its first
    step afterwards is Adam's first step (lr * sign of its delta, up to tau)."""
    old, new, masks, old_masks = optimizer_case()
    opt = ServerOptimizer("adam", lr=0.01, beta1=0.9, beta2=0.99, tau=1e-3)
    first = opt.step(old, new, masks, old_masks)
    target = {"w": torch.tensor([0.0, 3.0, 0.05]), "b": torch.tensor([1.5])}
    second = opt.step(first, target, masks, masks)
    delta = 0.05 - float(first["w"][2])
    expected = float(first["w"][2]) + 0.01 * (0.1 * delta) / ((0.01 * delta**2) ** 0.5 + 1e-3)
    assert float(second["w"][2]) == pytest.approx(expected, rel=1e-6)


def test_server_optimizer_moments_stay_finite_on_float32_extremes():
    """A float32-finite reply of 3e38 must not overflow Adam's second moment (float64)."""
    old = {"w": torch.zeros(3)}
    new = {"w": torch.full((3,), 3e38)}
    masks = {"w": torch.ones(3, dtype=torch.bool)}
    opt = ServerOptimizer("adam", lr=0.01, beta1=0.9)
    opt.step(old, new, masks, masks)
    assert torch.isfinite(opt.v["w"]).all() and torch.isfinite(opt.m["w"]).all()


def test_unknown_server_optimizer():
    with pytest.raises(ValueError, match="server optimizer 'sgd'"):
        ServerOptimizer("sgd", 1.0, 0.9)
