"""Unit tests for feddst_flwr.masks: layer-wise sparsity, random masks, pruning,
prune-and-regrow, the readjustment schedule and the small mask helpers."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from feddst_flwr import masks as M

CONV_AND_LINEAR = {"a": (4, 2, 3, 3), "b": (10, 72)}  # 72 and 720 weights


def sizes(shapes: M.Shapes) -> dict[str, int]:
    return {name: math.prod(shape) for name, shape in shapes.items()}


def global_density(densities: dict[str, float], shapes: M.Shapes) -> float:
    n = sizes(shapes)
    return sum(densities[name] * n[name] for name in shapes) / sum(n.values())


def mask_from_positions(shape: tuple[int, ...], positions: list[int]) -> torch.Tensor:
    flat = torch.zeros(math.prod(shape), dtype=torch.bool)
    flat[positions] = True
    return flat.view(shape)


def positions(mask: torch.Tensor) -> list[int]:
    return mask.flatten().nonzero().flatten().tolist()


# --------------------------------------------------------------------------- densities


@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.9])
def test_erk_densities_match_rigl_rule(sparsity):
    # raw ERK density sum(shape)/prod(shape): a -> 12/72, b -> 82/720
    # eps * (12/72 * 72 + 82/720 * 720) = eps * (12 + 82) = (1 - S) * 792
    eps = (1 - sparsity) * 792 / 94
    expected = {"a": eps * 12 / 72, "b": eps * 82 / 720}
    assert all(d < 1 for d in expected.values())  # no layer saturates in this case

    densities = M.layer_densities(CONV_AND_LINEAR, sparsity, "erk")

    assert densities == pytest.approx(expected, rel=1e-12)
    assert global_density(densities, CONV_AND_LINEAR) == pytest.approx(1 - sparsity, rel=1e-12)


def test_erk_small_layer_stays_dense_and_others_are_rescaled():
    shapes = {"tiny": (2, 3), "big": (500, 400)}
    # first pass: eps = 0.1 * 200006 / (5 + 900) -> tiny gets eps * 5/6 ~ 18.4 > 1
    first_eps = 0.1 * 200_006 / (5 + 900)
    assert first_eps * 5 / 6 > 1
    # tiny is dense (6 weights); big alone must hold the rest of the budget
    big_density = (0.1 * 200_006 - 6) / 200_000

    densities = M.layer_densities(shapes, 0.9, "erk")

    assert densities["tiny"] == 1.0
    assert densities["big"] == pytest.approx(big_density, rel=1e-12)
    assert global_density(densities, shapes) == pytest.approx(0.1, rel=1e-12)


def test_er_ignores_kernel_dims():
    # ER raw density (fan_in + fan_out) / (fan_in * fan_out) on shape[0], shape[1]:
    # a -> 6/8 (times 72 weights = 54), b -> 82/720 (times 720 weights = 82)
    sparsity = 0.8
    eps = (1 - sparsity) * 792 / (54 + 82)
    expected = {"a": eps * 6 / 8, "b": eps * 82 / 720}

    densities = M.layer_densities(CONV_AND_LINEAR, sparsity, "er")

    assert densities == pytest.approx(expected, rel=1e-12)
    assert densities != pytest.approx(M.layer_densities(CONV_AND_LINEAR, sparsity, "erk"))


def test_uniform_gives_every_layer_one_minus_s():
    shapes = {**CONV_AND_LINEAR, "c": (2, 3)}
    assert M.layer_densities(shapes, 0.7, "uniform") == pytest.approx({n: 0.3 for n in shapes}, rel=1e-12)


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5])
def test_sparsity_out_of_range_is_rejected(sparsity):
    with pytest.raises(ValueError, match="sparsity"):
        M.layer_densities(CONV_AND_LINEAR, sparsity)


def test_unknown_distribution_is_rejected():
    with pytest.raises(ValueError, match="unknown sparsity distribution"):
        M.layer_densities(CONV_AND_LINEAR, 0.5, "gaussian")


@pytest.mark.parametrize("distribution", ["erk", "er", "uniform"])
def test_zero_sparsity_of_a_representable_shape_is_fully_dense(distribution):
    assert M.layer_densities(CONV_AND_LINEAR, 0.0, distribution) == {"a": 1.0, "b": 1.0}


@pytest.mark.parametrize("distribution", ["erk", "er"])
def test_zero_sparsity_is_fully_dense_for_any_shape(distribution):
    # {"w": (9, 2)}: scale * raw = 1.0000000000000002 > 1.0 -> dense set == all layers
    assert M.layer_densities({"w": (9, 2)}, 0.0, distribution) == {"w": 1.0}


# --------------------------------------------------------------------------- counts

COUNT_CASES = [
    (CONV_AND_LINEAR, 0.5),
    (CONV_AND_LINEAR, 0.8),
    (CONV_AND_LINEAR, 0.95),
    ({"tiny": (2, 3), "big": (500, 400)}, 0.9),
    ({"x": (3, 3), "y": (7, 5, 2), "z": (1, 1), "w": (13, 11)}, 0.37),
    ({"x": (3, 3), "y": (7, 5, 2), "z": (1, 1), "w": (13, 11)}, 0.99),
    ({"only": (17, 19)}, 0.333),
]


@pytest.mark.parametrize("distribution", ["erk", "er", "uniform"])
@pytest.mark.parametrize(("shapes", "sparsity"), COUNT_CASES)
def test_layer_counts_sum_exactly_and_fit(shapes, sparsity, distribution):
    counts = M.layer_counts(shapes, sparsity, distribution)
    n = sizes(shapes)

    assert set(counts) == set(shapes)
    assert sum(counts.values()) == round((1 - sparsity) * sum(n.values()))
    assert all(0 <= counts[name] <= n[name] for name in shapes)


def test_layer_counts_follow_densities():
    densities = M.layer_densities(CONV_AND_LINEAR, 0.8)
    counts = M.layer_counts(CONV_AND_LINEAR, 0.8)
    n = sizes(CONV_AND_LINEAR)
    for name in CONV_AND_LINEAR:  # floor or ceil of the exact count
        assert abs(counts[name] - densities[name] * n[name]) < 1


def test_layer_counts_keep_saturated_layer_full():
    assert M.layer_counts({"tiny": (2, 3), "big": (500, 400)}, 0.9)["tiny"] == 6


# --------------------------------------------------------------------------- random masks


def test_random_masks_have_exact_counts_and_shapes():
    counts = {"a": 10, "b": 0, "c": 6}
    shapes = {"a": (4, 2, 3, 3), "b": (5, 4), "c": (2, 3)}
    masks = M.random_masks(shapes, counts, seed=3)
    for name, shape in shapes.items():
        assert masks[name].dtype == torch.bool
        assert tuple(masks[name].shape) == shape
        assert int(masks[name].sum()) == counts[name]


def test_random_masks_are_seeded():
    counts = M.layer_counts(CONV_AND_LINEAR, 0.8)
    first = M.random_masks(CONV_AND_LINEAR, counts, seed=0)
    again = M.random_masks(CONV_AND_LINEAR, counts, seed=0)
    other = M.random_masks(CONV_AND_LINEAR, counts, seed=1)

    assert M.hamming(first, again) == 0
    assert M.hamming(first, other) > 0


# --------------------------------------------------------------------------- top-k / magnitude prune


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_top_k_mask_keeps_largest_scores():
    scores = torch.tensor([[0.5, 2.5, 1.0], [2.0, -3.0, 1.5]])
    assert positions(M.top_k_mask(scores, 2, gen())) == [1, 3]
    assert positions(M.top_k_mask(scores, 4, gen())) == [1, 2, 3, 5]
    assert int(M.top_k_mask(scores, 0, gen()).sum()) == 0
    assert int(M.top_k_mask(scores, 6, gen()).sum()) == 6


def test_top_k_mask_breaks_ties_by_votes_before_index():
    scores = torch.tensor([1.0, 1.0, 1.0, 1.0, 5.0])
    votes = torch.tensor([1.0, 2.0, 0.0, 7.0, 0.0])  # index order and vote order disagree
    for seed in range(5):
        assert positions(M.top_k_mask(scores, 3, gen(seed), votes)) == [1, 3, 4]


def test_top_k_mask_breaks_equal_votes_by_seed_not_position():
    """Among 40 equal candidates, which 5 win depends on the seed, and over seeds every
    position wins sometimes: no bias towards low (or high) indices."""
    scores, votes = torch.zeros(40), torch.ones(40)
    picks = [positions(M.top_k_mask(scores, 5, gen(seed), votes)) for seed in range(60)]
    assert picks[0] == positions(M.top_k_mask(scores, 5, gen(0), votes))  # seeded: reproducible
    assert len({tuple(p) for p in picks}) > 50
    assert {i for p in picks for i in p} == set(range(40))
    assert abs(sum(sum(p) for p in picks) / (5 * len(picks)) - 19.5) < 3  # mean index near the middle


def test_magnitude_prune_keeps_largest_magnitudes_among_candidates():
    weights = {"w": torch.tensor([[3.0, -5.0, 0.1], [-0.2, 4.0, 9.0]])}
    candidates = {"w": mask_from_positions((2, 3), [0, 1, 2, 3, 4])}  # 9.0 at 5 is no candidate

    mask = M.magnitude_prune(weights, candidates, {"w": 3}, gen())["w"]

    assert positions(mask) == [0, 1, 4]  # |-5|, |4|, |3|


def test_magnitude_prune_fills_from_non_candidates_when_too_few():
    weights = {"w": torch.tensor([[3.0, -1.0, 2.0], [0.0, 4.0, 0.0]])}
    candidates = {"w": mask_from_positions((2, 3), [1, 2])}

    masks = [M.magnitude_prune(weights, candidates, {"w": 4}, gen(seed))["w"] for seed in range(20)]

    assert all(int(mask.sum()) == 4 and mask.flatten()[[1, 2]].all() for mask in masks)  # every candidate kept
    assert len({tuple(positions(mask)) for mask in masks}) > 1  # the fill is drawn by the seed


def test_magnitude_prune_keeps_zero_valued_candidate_before_non_candidates():
    weights = {"w": torch.tensor([0.0, 7.0, 0.0])}
    candidates = {"w": mask_from_positions((3,), [2])}
    assert positions(M.magnitude_prune(weights, candidates, {"w": 1}, gen())["w"]) == [2]


def test_magnitude_prune_ranks_equal_magnitudes_by_votes():
    """Server re-prune: zero-valued regrown positions tie; the one more clients chose wins."""
    weights = {"w": torch.tensor([0.0, 0.0, 0.0, 3.0])}
    votes = {"w": torch.tensor([20.0, 60.0, 40.0, 10.0])}
    mask = M.magnitude_prune(weights, None, {"w": 3}, gen(), votes)["w"]
    assert positions(mask) == [1, 2, 3]


# --------------------------------------------------------------------------- prune and regrow


def regrow_case():
    """Layer "w" (2, 4): active 0..4, alpha_r = 0.4 -> k = round(2.0) = 2.
    Drop the two smallest |w| among active: positions 3 (0.05) and 1 (-0.1).
    Outside the kept ones: 1, 3, 5, 6, 7. Active position 0 has the largest |grad|
    and must not be grown; grown are 6 (|g| = 5) and 3 (|g| = 4, just dropped).
    Layer "d" (2, 2) is fully active (a layer ERK keeps dense): left alone."""
    weights = {
        "w": torch.tensor([[0.5, -0.1, 0.3, 0.05], [-0.9, 0.0, 0.0, 0.0]]),
        "d": torch.tensor([[0.1, -2.0], [3.0, 0.2]]),
    }
    grads = {
        "w": torch.tensor([[100.0, 0.2, -50.0, 4.0], [60.0, 1.0, -5.0, 0.5]]),
        "d": torch.tensor([[0.0, 0.0], [0.0, 0.0]]),
    }
    masks = {"w": mask_from_positions((2, 4), [0, 1, 2, 3, 4]), "d": torch.ones(2, 2, dtype=torch.bool)}
    return weights, grads, masks


def test_prune_and_regrow_drops_smallest_and_grows_largest_gradient():
    weights, grads, masks = regrow_case()
    new = M.prune_and_regrow(weights, grads, masks, 0.4, gen())
    assert positions(new["w"]) == [0, 2, 3, 4, 6]
    assert positions(new["d"]) == [0, 1, 2, 3]


def test_prune_and_regrow_keeps_active_count_per_layer():
    weights, grads, masks = regrow_case()
    new = M.prune_and_regrow(weights, grads, masks, 0.4, gen())
    assert {n: int(m.sum()) for n, m in new.items()} == {n: int(m.sum()) for n, m in masks.items()}


def test_prune_and_regrow_zeroes_dropped_keeps_regrown_and_dense_layers():
    weights, grads, masks = regrow_case()
    before = {n: w.clone() for n, w in weights.items()}
    M.prune_and_regrow(weights, grads, masks, 0.4, gen())
    # w: kept 0, 2, 4 unchanged; dropped 1 is zero; 3, dropped and regrown, keeps 0.05; grown 6 is zero
    assert torch.equal(weights["w"], torch.tensor([[0.5, 0.0, 0.3, 0.05], [-0.9, 0.0, 0.0, 0.0]]))
    assert torch.equal(weights["d"], before["d"])  # dense layer: never pruned or regrown


def test_prune_and_regrow_zeroes_stale_values_at_grown_positions():
    weights, grads, masks = regrow_case()
    weights["w"][1, 2] = 7.0  # a pruned position holding a stale value, grown this step
    new = M.prune_and_regrow(weights, grads, masks, 0.4, gen())
    assert new["w"][1, 2]
    assert weights["w"][1, 2] == 0.0


def test_prune_and_regrow_with_zero_alpha_changes_nothing():
    weights, grads, masks = regrow_case()
    before = {n: w.clone() for n, w in weights.items()}
    new = M.prune_and_regrow(weights, grads, masks, 0.0, gen())
    assert M.hamming(new, masks) == 0
    assert all(torch.equal(weights[n], before[n]) for n in weights)


def test_prune_and_regrow_breaks_gradient_ties_by_seed_not_index():
    """All inactive positions have the same gradient: which one grows depends on the seed."""
    weights = {"w": torch.tensor([1.0, 2.0, 3.0, 4.0] + [0.0] * 16)}
    masks = {"w": mask_from_positions((20,), [0, 1, 2, 3])}
    grads = {"w": torch.ones(20)}
    grown = set()
    for seed in range(30):
        new = M.prune_and_regrow({"w": weights["w"].clone()}, grads, masks, 0.25, gen(seed))
        grown |= set(positions(new["w"])) - {1, 2, 3}
    assert len(grown) > 8  # not always position 0 or 4


# --------------------------------------------------------------------------- schedule


@pytest.mark.parametrize(
    ("server_round", "expected"),
    [
        (5, 0.1 / 2 * (1 + math.cos(math.pi / 5))),  # cos(pi r / (r_end + delta_r))
        (10, 0.1 / 2 * (1 + math.cos(2 * math.pi / 5))),
        (15, 0.1 / 2 * (1 + math.cos(3 * math.pi / 5))),
        (20, 0.1 / 2 * (1 + math.cos(4 * math.pi / 5))),  # the last readjustment, at R_end, still moves
        (1, 0.0),
        (7, 0.0),  # not a multiple of delta_r
        (25, 0.0),  # after r_end
        (40, 0.0),
    ],
)
def test_readjust_alpha_cosine_schedule(server_round, expected):
    assert M.readjust_alpha(server_round, alpha=0.1, delta_r=5, r_end=20) == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize(("delta_r", "r_end"), [(5, 100), (10, 100), (15, 200), (5, 50), (3, 10), (1, 7)])
def test_readjust_alpha_last_readjustment_at_or_before_r_end_moves_the_mask(delta_r, r_end):
    last = r_end // delta_r * delta_r
    assert M.readjust_alpha(last, alpha=0.3, delta_r=delta_r, r_end=r_end) > 0
    assert M.readjust_alpha(last + delta_r, alpha=0.3, delta_r=delta_r, r_end=r_end) == 0.0


def test_readjust_alpha_off_when_alpha_zero():
    assert M.readjust_alpha(5, alpha=0.0, delta_r=5, r_end=20) == 0.0


# --------------------------------------------------------------------------- helpers


def test_difference_active_and_units():
    old = {"x": mask_from_positions((3, 4), [0, 1, 5]), "y": mask_from_positions((2, 1, 2, 2), [0])}
    new = {"x": mask_from_positions((3, 4), [0, 2, 3, 9]), "y": mask_from_positions((2, 1, 2, 2), [0, 7])}
    entered = M.difference(new, old)
    assert positions(entered["x"]) == [2, 3, 9] and positions(entered["y"]) == [7]
    assert M.active(entered) == 4
    assert M.units(entered) == 2 + 1  # rows 0 and 2 of x, output channel 1 of y


def test_seeded_generator_mixes_its_keys():
    def draw(*keys):
        return torch.randint(0, 2**30, (4,), generator=M.seeded_generator(*keys)).tolist()

    assert draw(0, 1, 2) == draw(0, 1, 2)
    assert len({tuple(draw(0, r, c)) for r in range(5) for c in range(5)}) == 25
    assert draw(1, 2) != draw(12) and draw(0, 12) != draw(1, 2)


def test_hamming_counts_differing_positions_over_layers():
    a = {"x": mask_from_positions((2, 3), [0, 1]), "y": mask_from_positions((4,), [3])}
    b = {"x": mask_from_positions((2, 3), [1, 2]), "y": mask_from_positions((4,), [0, 1])}
    assert M.hamming(a, b) == 2 + 3
    assert M.hamming(a, a) == 0


def test_total_density_and_densities():
    masks = {"x": mask_from_positions((2, 3), [0, 1, 2]), "y": mask_from_positions((10,), [4])}
    assert M.total_density(masks) == pytest.approx(4 / 16)
    assert M.densities(masks) == pytest.approx({"x": 0.5, "y": 0.1})


def test_apply_masks_zeroes_pruned_only():
    weights = {"w": torch.tensor([1.0, -2.0, 3.0])}
    M.apply_masks(weights, {"w": mask_from_positions((3,), [1])})
    assert torch.equal(weights["w"], torch.tensor([0.0, -2.0, 0.0]))


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
        self.seq = nn.Conv1d(2, 2, 1)


def test_maskable_names_are_conv_and_linear_weights_only():
    model = SmallNet()
    names = M.maskable_names(model)
    assert names == ["conv.weight", "head.1.weight", "head.3.weight", "seq.weight"]
    assert set(names) <= set(model.state_dict())


def test_shapes_of():
    state = SmallNet().state_dict()
    assert M.shapes_of(state, ["conv.weight", "head.1.weight"]) == {
        "conv.weight": (2, 1, 3, 3),
        "head.1.weight": (4, 8),
    }


def test_maskable_names_of_a_bare_linear_match_its_state_dict():
    model = nn.Linear(3, 2)
    assert M.maskable_names(model) == ["weight"]


def sorted_top_k(scores: torch.Tensor, k: int, generator: torch.Generator, votes=None) -> torch.Tensor:
    """Reference: the first k of the total order (score, then votes, descending; then the
    place in a random permutation), by sorting every position."""
    order = torch.randperm(scores.numel(), generator=generator)
    for key in (votes, scores):  # stable sorts, least significant key first
        if key is not None:
            order = order[torch.argsort(key.flatten()[order], descending=True, stable=True)]
    flat = torch.zeros(scores.numel(), dtype=torch.bool)
    flat[order[:k]] = True
    return flat.view(scores.shape)


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 300),
    st.integers(0, 5),
    st.booleans(),
    st.integers(0, 2**31),
    st.floats(0.0, 1.0),
)
def test_top_k_selects_the_first_k_of_the_total_order(n, levels, with_votes, seed, fraction):
    """Few distinct score levels (many ties) and votes: the same positions as sorting everything."""
    data = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, levels + 1, (n,), generator=data).float() - float(levels == 0)
    votes = torch.randint(0, 3, (n,), generator=data).double() if with_votes else None
    k = round(fraction * n)
    mine = M.top_k_mask(scores, k, torch.Generator().manual_seed(seed), votes)
    assert int(mine.sum()) == k
    assert torch.equal(mine, sorted_top_k(scores, k, torch.Generator().manual_seed(seed), votes))


@pytest.mark.parametrize(
    ("values", "dtype", "finite"),
    [
        ([1.0, -2.0], torch.float32, True),
        ([3e38] * 4, torch.float32, True),  # the sum overflows: the exact check decides
        ([60000.0] * 4, torch.float16, True),
        ([1.0, float("nan")], torch.float32, False),
        ([float("inf"), -float("inf")], torch.float32, False),  # the sum is NaN
        ([1.0, float("inf")], torch.float16, False),
    ],
)
def test_all_finite_is_exact_when_the_fast_sum_overflows(values, dtype, finite):
    assert M.all_finite(torch.tensor(values, dtype=dtype)) is finite


def test_skipped_permutations_leave_the_generator_as_drawn_ones():
    """TieKeys.skip takes the draws of torch.randperm's shuffle (n - 1 for n positions):
    the generator's stream afterwards is the same, whatever the sizes."""
    sizes = [0, 1, 2, 7, 1000, 300_000, 5_000_000]
    eager, lazy = torch.Generator().manual_seed(5), M.TieKeys(torch.Generator().manual_seed(5))
    for n in sizes:
        torch.randperm(n, generator=eager)
        lazy.skip(n)
    assert torch.equal(lazy.generator().get_state(), eager.get_state())


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 200), st.integers(0, 3), st.floats(0.0, 1.0)), min_size=1, max_size=6))
def test_selections_sharing_tie_keys_match_selections_sharing_a_generator(layers):
    """Several layers selected one after the other from one stream (as the re-prune does):
    lazily drawn keys give the masks and the final generator state of eager permutations."""
    data = torch.Generator().manual_seed(len(layers))
    eager, keys = torch.Generator().manual_seed(11), M.TieKeys(torch.Generator().manual_seed(11))
    for n, levels, fraction in layers:
        scores = torch.randint(0, levels + 1, (n,), generator=data).float()
        k = round(fraction * n)
        reference = sorted_top_k(scores, k, eager)
        assert torch.equal(M.top_k_mask(scores, k, keys), reference)
    assert torch.equal(keys.generator().get_state(), eager.get_state())


def test_positions_are_the_active_indices_kept_per_mask_until_it_changes():
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[0, 1] = mask[2, 3] = True
    first = M.positions(mask)
    assert first.tolist() == [1, 11] and M.positions(mask) is first and not first.flags.writeable
    mask[1, 0] = True  # in place: the version counter moves, the positions are found again
    assert M.positions(mask).tolist() == [1, 4, 11]
    assert M.positions(mask.view(12)).tolist() == [1, 4, 11]  # a view of the changed mask too
    assert M.positions(torch.zeros(0, dtype=torch.bool)).tolist() == []


@pytest.mark.parametrize("n, count", [(1, 1), (10, 3), (1000, 1000), (5000, 17)])
def test_tie_keys_are_places_in_one_permutation_whatever_the_order_of_positions(n, count):
    """keys(n, positions) is each position's place in torch.randperm(n) (positions given in
    any order), and leaves the generator as the permutation did."""
    eager, lazy = torch.Generator().manual_seed(n), M.TieKeys(torch.Generator().manual_seed(n))
    positions = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:count]
    permutation = torch.randperm(n, generator=eager)
    place = torch.empty(n, dtype=torch.long)
    place[permutation] = torch.arange(n)
    assert torch.equal(lazy.keys(n, positions), place[positions])
    assert torch.equal(lazy.generator().get_state(), eager.get_state())
