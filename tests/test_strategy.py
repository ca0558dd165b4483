"""Tests for feddst_flwr.strategy: initial ERK mask, seeded sampling, the mask-version
bookkeeping (bitmask only to nodes that lack the current version), reply validation,
the readjustment schedule in the config, re-pruning, and build_strategy. Nodes are
simulated in-process by running client.client_round on each message."""

from __future__ import annotations

import math
import random
import re
import time

import pytest
import torch
from fakes import MASKABLE, SHAPES, FakeGrid, Federation, make_strategy, mask_flags, new_model
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx

from feddst_flwr.aggregation import ClientUpdate
from feddst_flwr.codec import (
    MASK_SUFFIX,
    CodecError,
    HeldMask,
    carries_mask,
    decode,
    encode,
    payload_bytes,
)
from feddst_flwr.masks import active, difference, hamming, layer_counts, units
from feddst_flwr.prunefl import PruneFL
from feddst_flwr.registry import build_strategy, effective_server_lr
from feddst_flwr.strategy import FedDST
from feddst_flwr.validation import Instruction, ReplyGuard, check_reply

pytestmark = pytest.mark.usefixtures("task_identity")


@pytest.fixture
def federation(make_cfg) -> Federation:
    return Federation(make_cfg())


def bitmask_bytes() -> int:
    return sum(math.ceil(math.prod(SHAPES[name]) / 8) for name in MASKABLE)


def assert_pruned_to(state: dict[str, torch.Tensor], masks: dict, counts: dict) -> None:
    for name, count in counts.items():
        assert int(masks[name].sum()) == count, name
        assert torch.count_nonzero(state[name][~masks[name]]) == 0, name


# --------------------------------------------------------------------------- initialize


def test_initialize_prunes_to_erk_counts_and_sparsity():
    strategy = make_strategy()
    dense = new_model().state_dict()
    state = strategy.initialize(ArrayRecord(dense)).to_torch_state_dict()

    counts = layer_counts({n: SHAPES[n] for n in MASKABLE}, 0.8, "erk")
    assert strategy.counts == counts
    assert_pruned_to(state, strategy.masks, counts)
    for name in MASKABLE:  # every kept weight keeps its initial (non-zero) value
        mask = strategy.masks[name]
        assert int(torch.count_nonzero(state[name])) == counts[name]
        assert torch.equal(state[name][mask], dense[name][mask])
    total = sum(math.prod(SHAPES[n]) for n in MASKABLE)
    assert sum(counts.values()) == round(0.2 * total)
    assert 1 - sum(counts.values()) / total == pytest.approx(0.8, abs=1 / total)
    for name in set(SHAPES) - set(MASKABLE):  # biases stay dense and untouched
        assert torch.equal(state[name], dense[name])


def test_initialize_rejects_unknown_maskable_name():
    strategy = FedDST(maskable=[*MASKABLE, "conv9.weight"])
    with pytest.raises(ValueError, match="conv9.weight"):
        strategy.initialize(ArrayRecord(new_model().state_dict()))


# --------------------------------------------------------------------------- sampling


NODES = list(range(100, 110))


def sample_sequence(seed: int, rounds: int = 6) -> list[list[int]]:
    strategy, grid = make_strategy(seed=seed), FakeGrid(NODES)
    return [strategy.sample(grid) for _ in range(rounds)]


def test_sampling_is_without_replacement_from_connected_nodes():
    for sample in sample_sequence(0):
        assert len(sample) == 3 == len(set(sample))
        assert set(sample) <= set(NODES)


def test_sampling_is_seeded_and_independent_of_the_global_rng():
    random.seed(1)
    first = sample_sequence(0)
    random.seed(2)
    assert sample_sequence(0) == first
    assert sample_sequence(1) != first


def test_configure_train_addresses_distinct_sampled_nodes():
    strategy = make_strategy()
    strategy.initialize(ArrayRecord(new_model().state_dict()))
    expected = make_strategy().sample(FakeGrid(NODES))
    messages = list(strategy.configure_train(1, ArrayRecord(new_model().state_dict()), ConfigRecord(), FakeGrid(NODES)))
    assert [m.metadata.dst_node_id for m in messages] == expected


@pytest.mark.parametrize("fraction, expected", [(0.3, 3), (0.55, 5), (0.1, 2)])  # 0.1 * 10 < min_train_nodes
def test_sample_size_from_fraction(fraction, expected):
    strategy = make_strategy(clients_per_round=0, fraction_train=fraction)
    assert len(set(strategy.sample(FakeGrid(NODES)))) == expected


def test_a_round_short_of_nodes_waits_once_then_samples_those_connected(caplog):
    """clients-per-round 3, one node lost for good: the first round waits round-timeout and
    samples the two left; the next does not wait again; once the node is back all three are."""
    strategy, grid = make_strategy(clients_per_round=3), FakeGrid([4, 5])
    strategy.round_timeout = 0.5
    started = time.monotonic()
    assert sorted(strategy.sample(grid)) == [4, 5]
    assert 0.5 <= time.monotonic() - started
    assert re.search(
        r"configure_train: 2 of the 3 nodes wanted are connected after waiting \d+\.\d s: the round samples 2$",
        caplog.text,
        re.MULTILINE,
    )
    started = time.monotonic()
    assert sorted(strategy.sample(grid)) == [4, 5]
    assert time.monotonic() - started < 0.2  # the outage's wait is spent
    grid.node_ids = [4, 5, 6]
    assert sorted(strategy.sample(grid)) == [4, 5, 6] and strategy.nodes_missing_since is None


def test_too_few_nodes_after_the_wait_stop_the_run_naming_how_many_are_missing():
    strategy = make_strategy(clients_per_round=5, min_fit_fraction=0.5)
    strategy.round_timeout = 0.2
    message = (
        r"1 of the 5 nodes wanted are connected after waiting \d+\.\d s \(round-timeout 0\.2 s\); a round needs at "
        r"least 3 \(min-fit-fraction 0\.5 x 5\): 2 missing"
    )
    with pytest.raises(RuntimeError) as raised:
        strategy.sample(FakeGrid([4]))
    assert re.fullmatch(message, str(raised.value)), raised.value


# --------------------------------------------------------------------------- mask bits only when needed


def test_bitmask_only_to_nodes_lacking_the_current_version(federation):
    strategy = federation.strategy
    first = federation.round(1)  # alpha_r = 0: the global mask stays
    assert mask_flags(first) == {1: True, 2: True, 3: True}
    assert strategy.mask_version == 0 and strategy.stats.mask_entered == 0
    assert strategy.delivered == {1: 0, 2: 0, 3: 0}

    old_masks = strategy.masks
    second = federation.configure(2)
    assert mask_flags(second) == {1: False, 2: False, 3: False}
    # the same values, minus exactly the coded masks, which are smaller than plain bitmasks
    mask_bytes = sum(len(a.data) for key, a in first[0].content["arrays"].items() if key.endswith(MASK_SUFFIX))
    assert payload_bytes(first[0].content["arrays"]) - payload_bytes(second[0].content["arrays"]) == mask_bytes
    assert 0 < mask_bytes < 0.9 * bitmask_bytes()
    federation.aggregate(2, [federation.reply(m) for m in second])  # readjust round (2 % delta_r == 0)

    assert 2 * strategy.stats.mask_entered == hamming(old_masks, strategy.masks) > 0  # a swap counts once
    assert strategy.mask_version == strategy.stats.mask_version == 1
    third = federation.configure(3)
    assert mask_flags(third) == {1: True, 2: True, 3: True}
    assert {m.content["config"]["mask-version"] for m in third} == {1}


def test_downloads_are_encode_of_the_global_model_and_code_a_mask_once_per_version(make_cfg):
    """Each download is what `codec.encode` gives for the node's held version (full mask,
    delta, or none), byte for byte; a mask's coding is made once per mask version and
    shared by the rounds it stays, and made again once the mask moves."""
    strategy = make_strategy(alpha=0.0, clients_per_round=2)
    federation = Federation(make_cfg(), strategy=strategy, node_ids=(1, 2, 3, 4))
    coded: dict[int, object] = {}
    for server_round in range(1, 5):
        messages = federation.configure(server_round)
        held = HeldMask(strategy.masks, strategy.mask_version)
        state = federation.arrays.to_torch_state_dict()
        for message in messages:
            sent = message.content["arrays"]
            expected = encode(state, strategy.masks, carries_mask(sent), strategy.value_dtype)
            assert list(sent) == list(expected)
            assert all(sent[key].data == expected[key].data for key in expected)
            if carries_mask(sent):
                first = coded.setdefault(held.version, sent[MASKABLE[0] + MASK_SUFFIX].data)
                assert sent[MASKABLE[0] + MASK_SUFFIX].data is first  # coded once, its bytes shared
        federation.aggregate(server_round, [federation.reply(m) for m in messages])
    assert strategy.mask_version == 0 and set(coded) == {0}

    moving = Federation(make_cfg(), strategy=make_strategy(r_end=10))
    moving.round(1)
    before = moving.strategy.coded_masks(None)
    moving.round(2)  # readjust round: the mask moves
    assert moving.strategy.mask_version == 1
    after = moving.strategy.coded_masks(None)
    key = MASKABLE[0] + MASK_SUFFIX
    assert after[key].data is not before[key].data and after[key].data is moving.strategy.coded_masks(None)[key].data
    third = moving.configure(3)  # every node holds version 0: a delta from it, where smaller
    held = HeldMask(moving.strategy.versions[0], 0)
    expected = encode(moving.arrays.to_torch_state_dict(), moving.strategy.masks, True, "float16", held)
    assert all(third[0].content["arrays"][key].data == expected[key].data for key in expected)


def test_mask_movement_statistics(federation):
    """mask-entered, -entered-units, -votes on a readjust round; drift from the initial mask."""
    strategy = federation.strategy
    initial = strategy.movement.initial
    federation.round(1)
    old = strategy.masks
    federation.round(2)  # readjust round
    stats, new = strategy.stats, strategy.masks
    entered = difference(new, old)
    assert stats.mask_entered == active(entered) > 0
    assert stats.mask_entered_units == units(entered) > 1
    assert len(stats.mask_votes) == 3 + 1 and sum(stats.mask_votes) == stats.mask_entered
    assert (
        stats.mask_drift == pytest.approx(active(difference(initial, new)) / active(initial)) and stats.mask_drift > 0
    )
    drift = stats.mask_drift
    federation.round(3)  # no readjustment: nothing enters, the drift stays
    assert (strategy.stats.mask_entered, strategy.stats.mask_entered_units, strategy.stats.mask_votes) == (0, 0, [])
    assert strategy.stats.mask_drift == drift


def test_reprune_tie_break_follows_the_seed_not_the_position(make_cfg):
    """Two FedDST servers that differ only in the seed, fed the same replies, keep different
    positions among ties; the same seed keeps the same."""

    def masks_after(seed: int) -> dict:
        federation = Federation(make_cfg(readjust_at="end"), strategy=make_strategy(r_end=10))
        federation.round(1)
        messages = federation.configure(2)
        replies = [federation.reply(m) for m in messages]
        federation.strategy.seed = seed
        federation.aggregate(2, replies)
        return federation.strategy.masks

    first, again, other = masks_after(0), masks_after(0), masks_after(1)
    assert hamming(first, again) == 0 and hamming(first, other) > 0


def test_partial_sampling_sends_the_mask_to_first_timers_only(make_cfg):
    strategy = make_strategy(alpha=0.0, clients_per_round=3)
    federation = Federation(make_cfg(), strategy=strategy, node_ids=(1, 2, 3, 4, 5))
    served: set[int] = set()
    mixed_rounds = 0
    for server_round in range(1, 6):
        messages = federation.configure(server_round)
        flags = mask_flags(messages)
        assert flags == {node: node not in served for node in flags}
        mixed_rounds += len(set(flags.values())) == 2
        federation.aggregate(server_round, [federation.reply(m) for m in messages])
        served |= set(flags)
    assert mixed_rounds >= 1 and federation.strategy.mask_version == 0


def test_error_reply_makes_the_node_get_the_mask_again(federation):
    federation.strategy.alpha = 0.0  # the mask never changes
    federation.round(1)
    federation.states[2] = RecordDict()  # node 2 lost its state: it cannot decode values only

    messages = federation.configure(2)
    replies = [federation.reply(m) for m in messages]
    error = next(r for r in replies if r.metadata.src_node_id == 2)
    assert error.has_error() and "version 0" in error.error.reason
    federation.aggregate(2, replies)

    assert federation.strategy.delivered == {1: 0, 3: 0}
    assert len(federation.strategy.stats.failures) == 1 and "node 2" in federation.strategy.stats.failures[0]
    third = federation.configure(3)
    assert mask_flags(third) == {1: False, 2: True, 3: False}
    federation.aggregate(3, [federation.reply(m) for m in third])
    assert federation.strategy.stats.failures == []
    assert federation.strategy.delivered == {1: 0, 2: 0, 3: 0}


def replies_for(federation: Federation, server_round: int) -> tuple[list[Message], list[Message]]:
    """Run rounds 1 .. server_round - 1, then return that round's messages and replies."""
    for earlier in range(1, server_round):
        federation.round(earlier)
    messages = federation.configure(server_round)
    return messages, [federation.reply(m) for m in messages]


def assert_same_global_model(strategy: FedDST, arrays, twin: FedDST, twin_arrays) -> None:
    """Bit-identical weights, mask and mask version."""
    state, twin_state = arrays.to_torch_state_dict(), twin_arrays.to_torch_state_dict()
    assert all(torch.equal(state[name], twin_state[name]) for name in SHAPES)
    assert all(torch.equal(strategy.masks[name], twin.masks[name]) for name in MASKABLE)
    assert strategy.mask_version == twin.mask_version


def twins(make_cfg, **options) -> tuple[Federation, Federation]:
    """Two identical federations: one meets the hostile reply, the other never sees it."""
    return tuple(
        Federation(make_cfg(), strategy=make_strategy(**options), node_ids=(1, 2, 3), same_data=False) for _ in range(2)
    )


@pytest.mark.parametrize(
    "min_fit_fraction, valid, skipped", [(0.5, 2, False), (0.5, 1, True), (1.0, 2, True), (0.0, 1, False)]
)
def test_min_fit_fraction_decides_whether_the_round_counts(make_cfg, min_fit_fraction, valid, skipped):
    federation, _ = twins(make_cfg, min_fit_fraction=min_fit_fraction)
    strategy = federation.strategy
    before, masks_before = federation.arrays, dict(strategy.masks)
    messages, replies = replies_for(federation, 1)
    arrays, metrics = federation.aggregate(1, replies[:valid])  # the others never replied (timed out)

    silent = sorted(m.metadata.dst_node_id for m in messages[valid:])
    assert strategy.stats.skipped == skipped
    assert strategy.stats.failures == [f"node {n}: no reply (failed, timed out or lost)" for n in silent]
    if skipped:
        assert (arrays, metrics) == (None, None) and federation.arrays is before
        assert all(torch.equal(masks_before[n], strategy.masks[n]) for n in MASKABLE) and strategy.mask_version == 0
    else:
        assert arrays is not None and federation.arrays is arrays


def test_all_replies_invalid_keeps_the_model(federation):
    messages = federation.configure(1)
    errors = [Message(Error(code=1, reason="boom"), reply_to=m) for m in messages]
    assert federation.strategy.aggregate_train(1, errors) == (None, None)
    assert len(federation.strategy.stats.failures) == 3 and federation.strategy.mask_version == 0


# --------------------------------------------------------------------------- config and re-pruning


def test_config_carries_schedule_mask_version_and_mu(federation):
    strategy = make_strategy(alpha=0.3, delta_r=2, r_end=5, proximal_mu=0.01)
    strategy.initialize(ArrayRecord(new_model().state_dict()))
    # alpha_r = alpha / 2 (1 + cos(pi r / (r_end + delta_r))) on rounds 2 and 4, 0 elsewhere and after r_end
    expected = {r: 0.0 for r in (1, 3, 5, 6)}
    expected.update({2: 0.15 * (1 + math.cos(2 * math.pi / 7)), 4: 0.15 * (1 + math.cos(4 * math.pi / 7))})
    for server_round, alpha_r in expected.items():
        messages = strategy.configure_train(server_round, federation.arrays, ConfigRecord({"lr": 0.5}), FakeGrid(NODES))
        for message in messages:
            config = message.content["config"]
            assert config["readjust-alpha"] == pytest.approx(alpha_r, abs=1e-15)
            assert config["proximal-mu"] == 0.01
            assert config["server-round"] == server_round
            assert config["mask-version"] == 0
            assert config["lr"] == 0.5
        assert strategy.stats.readjust_alpha == pytest.approx(alpha_r, abs=1e-15)


def test_aggregate_reprunes_to_exact_erk_counts(make_cfg):
    federation = Federation(make_cfg(), strategy=make_strategy(alpha=0.3), same_data=False)
    federation.round(1)
    messages = federation.configure(2)
    replies = [federation.reply(m) for m in messages]
    held = HeldMask(federation.strategy.masks, 0)
    client_masks = [decode(r.content["arrays"], SHAPES, MASKABLE, held).masks for r in replies]
    union = {name: torch.stack([m[name] for m in client_masks]).any(0) for name in MASKABLE}
    assert any(int(union[n].sum()) > federation.strategy.counts[n] for n in MASKABLE)  # more candidates than room

    arrays, _ = federation.aggregate(2, replies)

    state = arrays.to_torch_state_dict()
    assert_pruned_to(state, federation.strategy.masks, federation.strategy.counts)
    for name in MASKABLE:
        assert not (federation.strategy.masks[name] & ~union[name]).any(), name  # only voted positions kept


def test_randommask_mask_never_moves(make_cfg):
    federation = Federation(make_cfg(), strategy=make_strategy(alpha=0.0, clients_per_round=3))
    initial = federation.strategy.masks
    messages = [federation.round(r) for r in (1, 2, 3, 4)]
    assert federation.strategy.mask_version == 0
    assert hamming(initial, federation.strategy.masks) == 0
    assert {m.content["config"]["readjust-alpha"] for round_messages in messages for m in round_messages} == {0.0}
    assert [any(mask_flags(m).values()) for m in messages] == [True, False, False, False]


def test_start_runs_rounds_through_a_grid(make_cfg):
    federation = Federation(make_cfg())
    strategy, seen = federation.strategy, []

    def evaluate_fn(server_round, arrays):
        state = arrays.to_torch_state_dict()
        seen.append((server_round, strategy.mask_version, int(sum(torch.count_nonzero(state[n]) for n in MASKABLE))))

    initial = ArrayRecord(new_model().state_dict())
    result = strategy.start(grid=federation.grid, initial_arrays=initial, num_rounds=3, evaluate_fn=evaluate_fn)

    budget = sum(strategy.counts.values())
    assert [(r, v) for r, v, _ in seen] == [(0, 0), (1, 0), (2, 1), (3, 1)]
    assert all(active <= budget for _, _, active in seen) and seen[0][2] == budget
    assert_pruned_to(result.arrays.to_torch_state_dict(), strategy.masks, strategy.counts)
    assert sorted(result.train_metrics_clientapp) == [1, 2, 3]


# --------------------------------------------------------------------------- build_strategy


@pytest.mark.parametrize(
    "name, cls", [("fedavg", FedAvg), ("fedavgm", FedAvgM), ("fedprox", FedProx), ("fedadam", FedAdam)]
)
def test_build_strategy_baselines(make_cfg, name, cls):
    cfg = make_cfg(strategy=name, proximal_mu=0.01, max_num_examples=99, max_update_norm=5.0)
    strategy = build_strategy(cfg, MASKABLE)
    assert type(strategy).__mro__[1:3] == (ReplyGuard, cls)  # Flower's strategy behind the reply guard
    assert (strategy.max_num_examples, strategy.max_update_norm) == (99, 5.0)
    assert strategy.fraction_evaluate == 0.0
    assert (strategy.fraction_train, strategy.min_train_nodes, strategy.min_available_nodes) == (0.2, 2, 2)
    if name == "fedavgm":
        assert (strategy.server_momentum, strategy.server_learning_rate) == (0.9, 1.0)
    if name == "fedprox":
        assert strategy.proximal_mu == 0.01
    if name == "fedadam":  # server-lr 0 means Adam's default step 0.01
        assert (strategy.eta, strategy.beta_1, strategy.beta_2, strategy.tau) == (0.01, 0.9, 0.99, 1e-3)


@pytest.mark.parametrize(
    "strategy, optimizer, server_lr, expected",
    [("fedadam", "none", 0.0, 0.01), ("fedadam", "none", 0.1, 0.1), ("fedavgm", "none", 0.0, 1.0),
     ("feddst", "adam", 0.0, 0.01), ("feddst", "momentum", 0.0, 1.0), ("feddst", "momentum", 0.5, 0.5)],
)  # fmt: skip
def test_server_lr_defaults_per_optimizer(make_cfg, strategy, optimizer, server_lr, expected):
    cfg = make_cfg(strategy=strategy, server_optimizer=optimizer, server_lr=server_lr)
    assert effective_server_lr(cfg) == expected
    built = build_strategy(cfg, MASKABLE)
    if strategy == "feddst":
        assert (built.server_optimizer.kind, built.server_optimizer.lr) == (optimizer, expected)


@pytest.mark.parametrize("name", ["fedavg", "fedavgm", "fedprox"])
def test_build_strategy_baselines_sample_clients_per_round(make_cfg, name):
    strategy = build_strategy(make_cfg(strategy=name, clients_per_round=3), MASKABLE)
    messages = strategy.configure_train(1, ArrayRecord(new_model().state_dict()), ConfigRecord(), FakeGrid(NODES))
    assert len({m.metadata.dst_node_id for m in messages}) == 3


@pytest.mark.parametrize(
    "name, alpha, mu", [("feddst", 0.3, 0.0), ("feddst-prox", 0.3, 0.01), ("randommask", 0.0, 0.0)]
)
def test_build_strategy_sparse(make_cfg, name, alpha, mu):
    cfg = make_cfg(
        strategy=name,
        proximal_mu=0.01,
        clients_per_round=4,
        min_fit_fraction=0.75,
        max_num_examples=99,
        max_update_norm=5.0,
    )
    strategy = build_strategy(cfg, MASKABLE)
    assert type(strategy) is FedDST and isinstance(strategy, ReplyGuard)
    assert (strategy.min_fit_fraction, strategy.max_num_examples, strategy.max_update_norm) == (0.75, 99, 5.0)
    assert (strategy.alpha, strategy.proximal_mu) == (alpha, mu)
    assert strategy.maskable == MASKABLE
    assert (strategy.sparsity, strategy.sparsity_distribution, strategy.delta_r, strategy.r_end) == (
        0.8,
        "erk",
        5,
        None,
    )
    strategy.resolve_r_end(cfg.num_server_rounds)  # what start() does: r-end = 0 is half the rounds
    assert strategy.r_end == cfg.num_server_rounds // 2
    assert (strategy.clients_per_round, strategy.min_available_nodes, strategy.seed) == (4, 4, 0)
    assert (strategy.min_votes, strategy.value_dtype) == (1, "float16")
    assert strategy.configure_evaluate(1, ArrayRecord(), ConfigRecord(), FakeGrid(NODES)) == []


# --------------------------------------------------------------------------- PruneFL


def test_build_strategy_prunefl(make_cfg):
    strategy = build_strategy(make_cfg(strategy="prunefl", alpha=0.05), MASKABLE)
    assert type(strategy) is PruneFL and strategy.alpha == 0.0  # clients never readjust


def prunefl() -> PruneFL:
    strategy = PruneFL(maskable=MASKABLE, sparsity=0.8, delta_r=2, r_end=4, seed=0)
    strategy.initialize(ArrayRecord(new_model().state_dict()))
    return strategy


def test_prunefl_keeps_the_top_sample_weighted_importance_per_layer():
    strategy = prunefl()
    generator = torch.Generator().manual_seed(3)
    grads = [{n: torch.rand(SHAPES[n], generator=generator) for n in MASKABLE} for _ in range(2)]
    updates = [ClientUpdate({}, {}, 10, grads[0]), ClientUpdate({}, {}, 30, grads[1]), ClientUpdate({}, {}, 5)]
    masks = strategy.reconfigure(updates, strategy.masks, generator)
    for name in MASKABLE:
        importance = (10 * grads[0][name] + 30 * grads[1][name]) / 40  # the client without gradients has no say
        assert int(masks[name].sum()) == strategy.counts[name]
        if not masks[name].all():  # ERK may keep a small layer dense
            assert importance[masks[name]].min() >= importance[~masks[name]].max()
    assert (
        strategy.reconfigure(updates[2:], strategy.masks, generator) is strategy.masks
    )  # no gradients: mask unchanged


def test_prunefl_asks_for_gradients_on_reconfiguration_rounds_only():
    strategy = prunefl()
    arrays = ArrayRecord(new_model().state_dict())
    asked = [
        strategy.configure_train(r, arrays, ConfigRecord(), FakeGrid(NODES))[0].content["config"]["upload-gradients"]
        for r in range(1, 7)
    ]
    assert asked == [0, 1, 0, 1, 0, 0]


GRADIENT_PROBLEMS = {
    "names": "gradients cover", "nan": "NaN", "unasked": "expected \\{'array': \\['arrays'\\],",
    "missing": "expected \\{'array': \\['arrays', 'gradients'\\],",
}  # fmt: skip


HONEST_METRICS = {"num-examples": 4, "train-loss": 0.5, "mask-entered": 0, "upload-bytes": 9, "download-bytes": 9}


@pytest.mark.parametrize("problem", GRADIENT_PROBLEMS)
def test_prunefl_rejects_bad_gradients(problem):
    strategy = prunefl()
    strategy.asks_gradients = problem != "unasked"
    model = new_model()
    apply = {n: p.detach() * strategy.masks[n] for n, p in model.state_dict().items() if n in strategy.masks}
    state = {**model.state_dict(), **apply}

    gradients = {n: torch.ones(SHAPES[n]) for n in MASKABLE}
    if problem == "names":
        gradients.pop(MASKABLE[0])
    elif problem == "nan":
        gradients[MASKABLE[1]][0] = float("nan")
    extra = {} if problem == "missing" else {"gradients": ArrayRecord(gradients)}
    content = RecordDict(
        {"arrays": encode(state, strategy.masks, False), **extra, "metrics": MetricRecord(HONEST_METRICS)}
    )
    reply = Message(content, reply_to=Message(RecordDict(), dst_node_id=100, message_type="train"))
    records = frozenset({"arrays", "gradients"} if strategy.asks_gradients else {"arrays"})
    with pytest.raises(CodecError, match=GRADIENT_PROBLEMS[problem]):
        check_reply(reply, Instruction({}, records, sparse=True, dense={}), 10)  # the reply guard's check
        strategy._decode_reply(reply)
