"""One hostile reply per case, against FedDST and Flower's FedAvg, FedAvgM and FedAdam behind
the reply guard (validation.py): the round completes, `health.rejected` names the node and
the reason, and the global model (and FedDST's mask, the server optimizer's state) is
bit-identical to the same round run without that reply."""

from __future__ import annotations

import copy
import io
import random
import re
import time

import numpy as np
import pytest
import torch
from conftest import random_data
from fakes import MASKABLE, SHAPES, FakeGrid, make_strategy, new_model, run_client
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.server.superlink.linkstate.utils import (
    NODE_UNAVAILABLE_ERROR_REASON,
    create_message_error_unavailable_res_message,
)
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from feddst_flwr.codec import BITMASK_STYPE, DENSE_STYPE, VALUE_DTYPES, VALUES_STYPE, HeldMask, decode, encode
from feddst_flwr.mask_coding import CODED_HEADER, CODED_STYPE
from feddst_flwr.prunefl import PruneFL
from feddst_flwr.server_optimizer import ServerOptimizer
from feddst_flwr.validation import REPLY_METRICS, Health, ReplyGuard, StateCopy, guarded, nonfinite, outliers

pytestmark = pytest.mark.usefixtures("task_identity")

NODES = (1, 2, 3)
SAMPLE_ALL = {"fraction_train": 1.0, "fraction_evaluate": 0.0, "min_train_nodes": 3, "min_available_nodes": 3}
STRATEGIES = {
    "feddst": lambda: make_strategy(clients_per_round=3, max_update_norm=10.0),
    "fedavg": lambda: guarded(FedAvg)(**SAMPLE_ALL),
    "fedavgm": lambda: guarded(FedAvgM)(server_learning_rate=1.0, server_momentum=0.9, **SAMPLE_ALL),
    "fedadam": lambda: guarded(FedAdam)(eta=0.01, eta_l=0.1, **SAMPLE_ALL),
    # float32 values: a float16 payload cannot carry 3e38
    "feddst-adam": lambda: make_strategy(value_dtype="float32", server_optimizer=ServerOptimizer("adam", 0.01, 0.9)),
}


class Federation:
    """A guarded strategy and three in-process nodes (each with its own data and state)."""

    def __init__(self, cfg, name: str) -> None:
        self.cfg = cfg
        self.strategy: ReplyGuard = STRATEGIES[name]()
        self.strategy.max_update_norm = 10.0
        self.grid = FakeGrid(NODES, self.reply)
        self.states = {node: RecordDict() for node in NODES}
        self.data = {node: random_data(16, seed=node) for node in NODES}
        initial = ArrayRecord(new_model().state_dict())
        self.arrays = self.strategy.initialize(initial) if name.startswith("feddst") else initial

    def configure(self, server_round: int) -> list[Message]:
        random.seed(server_round)  # Flower's strategies sample with the global RNG
        return list(self.strategy.configure_train(server_round, self.arrays, ConfigRecord(), self.grid))

    def reply(self, message: Message) -> Message:
        node, content = message.metadata.dst_node_id, message.content
        result = run_client(
            new_model(), self.data[node], content["arrays"], content["config"], self.cfg, self.states[node], node
        )
        return Message(result.content(), reply_to=message)

    def replies(self, server_round: int) -> tuple[list[Message], list[Message]]:
        """Rounds 1 .. server_round - 1 in full, then that round's messages and replies."""
        for earlier in range(1, server_round):
            messages = self.configure(earlier)
            self.aggregate(earlier, [self.reply(m) for m in messages])
        messages = self.configure(server_round)
        return messages, [self.reply(m) for m in messages]

    def aggregate(self, server_round: int, replies: list[Message]):
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays is not None:
            self.arrays = arrays
        return arrays, metrics


# --------------------------------------------------------------------------- tampering helpers


def content(reply: Message, arrays: ArrayRecord | None = None, metrics: MetricRecord | None = None) -> RecordDict:
    arrays = reply.content["arrays"] if arrays is None else arrays
    return RecordDict({"arrays": arrays, "metrics": reply.content["metrics"] if metrics is None else metrics})


def metric(key: str, value):
    """Set (or, with value None, drop) one reply metric."""

    def tamper(reply: Message, strategy) -> RecordDict:
        metrics = {k: v for k, v in reply.content["metrics"].items() if k != key}
        return content(reply, metrics=MetricRecord(metrics if value is None else {**metrics, key: value}))

    return tamper


def echoed(key: str, change):
    """The echoed `key` of the reply changed by `change(value)`."""
    return lambda r, s: metric(key, change(r.content["metrics"][key]))(r, s)


def layer(name: str, make_array):
    """Replace (or add) one array of the reply's weights; make_array(original Array | None)."""

    def tamper(reply: Message, strategy) -> RecordDict:
        record = reply.content["arrays"]
        arrays = ArrayRecord(
            {**{k: record[k] for k in record}, name: make_array(record[name] if name in record else None)}
        )
        return content(reply, arrays)

    return tamper


def dropped(name: str):
    return lambda r, s: content(r, ArrayRecord({k: r.content["arrays"][k] for k in r.content["arrays"] if k != name}))


def dense(values: np.ndarray) -> Array:
    return Array(values)


def npy(header: dict, body: bytes = b"") -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue() + body


def raw(dtype: str, shape: tuple, data: bytes, stype: str = DENSE_STYPE) -> Array:
    return Array(dtype=dtype, shape=shape, stype=stype, data=data)


def poke(transform):
    """The array's values (dense or sparse) after transform(numpy copy in the wire dtype)."""

    def make(array: Array) -> Array:
        if array.stype == VALUES_STYPE:
            values = transform(np.frombuffer(array.data, dtype=VALUE_DTYPES[array.dtype]).copy())
            return raw(str(values.dtype), tuple(array.shape), values.tobytes(), VALUES_STYPE)
        return Array(transform(array.numpy().copy()))

    return make


def at(index: int, value: float):
    def transform(values: np.ndarray) -> np.ndarray:
        values.reshape(-1)[index] = value
        return values

    return transform


def scaled(factor: float):
    """Every array of the reply scaled by `factor` (still finite in float32)."""

    def tamper(reply: Message, strategy) -> RecordDict:
        record = reply.content["arrays"]
        arrays = ArrayRecord(
            {
                k: poke(lambda v: (v * factor).astype(v.dtype))(record[k])
                if record[k].dtype == "float32"
                else record[k]
                for k in record
            }
        )
        return content(reply, arrays)

    return tamper


def records(**extra):
    """The reply with extra records (placed before the expected ones)."""
    return lambda r, s: RecordDict({**extra, "arrays": r.content["arrays"], "metrics": r.content["metrics"]})


def remasked(change, name: str | None = None, array=None, delta_from: int | None = None):
    """FedDST: the reply re-encoded with its masks after change(flat fc1 mask), as deltas
    from the global mask said to be of version `delta_from` where that is smaller (None: no
    delta); then, if `name` is given, its array replaced by `array` (None: the reply's
    original one; a function: of the re-encoded one)."""

    def tamper(reply: Message, strategy) -> RecordDict:
        decoded = decode(reply.content["arrays"], SHAPES, MASKABLE, HeldMask(strategy.masks, strategy.mask_version))
        masks = {key: mask.clone() for key, mask in decoded.masks.items()}
        change(masks["fc1.weight"].view(-1))
        base = HeldMask(strategy.masks, delta_from) if delta_from is not None else None
        arrays = encode(decoded.state, masks, True, strategy.value_dtype, base)
        if name is not None:
            arrays[name] = (
                reply.content["arrays"][name] if array is None else array(arrays[name]) if callable(array) else array
            )
        return content(reply, arrays)

    return tamper


def grow_one(flat: torch.Tensor) -> None:
    flat[torch.nonzero(~flat)[0]] = True


def swap_one(flat: torch.Tensor) -> None:
    flat[torch.nonzero(flat)[0]] = False
    grow_one(flat)


HUGE_HEADER = raw("float32", (10,), npy({"descr": "<f4", "fortran_order": False, "shape": (2**29,)}))
ALL, SPARSE, DENSE = ("feddst", "fedavg", "fedavgm", "fedadam"), ("feddst",), ("fedavg", "fedavgm", "fedadam")

# name -> (round, tamper(reply, strategy) -> RecordDict, regex of the reason, strategies). Round 2
# is a FedDST readjustment round (masks may travel), round 1 is not; baselines run either.
CASES = {
    # records
    "no arrays": (2, lambda r, s: RecordDict({"metrics": r.content["metrics"]}), "reply records", ALL),
    "no metrics": (2, lambda r, s: RecordDict({"arrays": r.content["arrays"]}), "reply records", ALL),
    "extra array record": (2, records(junk=ArrayRecord()), "reply records", ALL),
    "extra config record": (2, records(note=ConfigRecord({"x": "y"})), "reply records", ALL),
    "metric record first": (2, records(early=MetricRecord({"num-examples": 10**6})), "reply records", ALL),
    "trailing metric record": (2, lambda r, s: RecordDict({**content(r), "late": MetricRecord({"x": 1})}), "reply records", ALL),
    "metrics as a config record": (2, lambda r, s: RecordDict({"arrays": r.content["arrays"], "metrics": ConfigRecord({"upload-bytes": "many"})}), "reply records", ALL),
    # metrics
    "missing num-examples": (2, metric("num-examples", None), "reply metrics", ALL),
    "zero num-examples": (2, metric("num-examples", 0), "num-examples", ALL),
    "negative num-examples": (2, metric("num-examples", -16), "num-examples", ALL),
    "absurd num-examples": (2, metric("num-examples", 10**9), "num-examples", ALL),
    "fractional num-examples": (2, metric("num-examples", 15.5), "num-examples", ALL),
    "NaN num-examples": (2, metric("num-examples", float("nan")), "num-examples", ALL),
    "list num-examples": (2, metric("num-examples", [16, 16]), "num-examples", ALL),
    "NaN upload-bytes": (2, metric("upload-bytes", float("nan")), "upload-bytes", ALL),
    "inf upload-bytes": (2, metric("upload-bytes", float("inf")), "upload-bytes", ALL),
    "list upload-bytes": (2, metric("upload-bytes", [1, 2]), "upload-bytes", ALL),
    "negative download-bytes": (2, metric("download-bytes", -1), "download-bytes", ALL),
    "list train-loss": (2, metric("train-loss", [1.0, 2.0]), "train-loss", ALL),
    "NaN train-loss": (2, metric("train-loss", float("nan")), "train-loss", ALL),
    "negative train-loss": (2, metric("train-loss", -1.0), "train-loss", ALL),
    "extra metric": (2, metric("accuracy", 1.0), "reply metrics", ALL),
    "no round echo": (2, metric("server-round", None), "reply metrics", ALL),
    "stale round": (2, echoed("server-round", lambda v: v - 1), "stale", ALL),
    "future round": (2, echoed("server-round", lambda v: v + 1), "stale", ALL),
    "stale mask version": (2, echoed("mask-version", lambda v: v + 1), "mask-version", SPARSE),
    "no mask version echo": (2, metric("mask-version", None), "reply metrics", SPARSE),
    # arrays, every strategy
    "missing layer": (2, dropped("fc2.bias"), "missing|reply arrays", ALL),
    "extra layer": (2, layer("evil", lambda a: dense(np.zeros(3, np.float32))), "unexpected|reply arrays", ALL),
    "wrong shape": (2, layer("fc2.bias", lambda a: dense(np.zeros(11, np.float32))), "shape", ALL),
    "declared shape lies": (2, layer("fc2.bias", lambda a: raw("float32", (11,), a.data)), "shape", ALL),
    "NaN in a dense layer": (2, layer("fc2.bias", poke(at(3, np.nan))), "NaN", ALL),
    "inf in a dense layer": (2, layer("fc2.bias", poke(at(0, -np.inf))), "NaN or Inf", ALL),
    "float64 layer": (2, layer("fc2.bias", lambda a: dense(a.numpy().astype(np.float64))), "dtype", ALL),
    "int64 bias": (2, layer("fc2.bias", lambda a: dense(np.zeros(10, np.int64))), "dtype", ALL),
    "object dtype": (2, layer("fc2.bias", lambda a: raw("object", (10,), a.data)), "dtype", ALL),
    "oversized layer": (2, layer("fc2.bias", lambda a: raw("float32", (10,), Array(np.zeros(10**6, "<f4")).data)), "at most", ALL),
    "huge npy header": (2, layer("fc2.bias", lambda a: HUGE_HEADER), "payload shape", ALL),
    "truncated bytes": (2, layer("fc2.bias", lambda a: raw("float32", (10,), a.data[:-5])), "data bytes", ALL),
    "garbage bytes": (2, layer("fc2.bias", lambda a: raw("float32", (10,), b"\x93NUMPY" + bytes(80))), "header|bytes", ALL),
    "wrong stype": (2, layer("fc2.bias", lambda a: raw("float32", (10,), a.data, "numpy.ndarray.evil")), "stype", ALL),
    "huge finite values": (2, scaled(1e37), "update norm", ALL),
    "scaled by 1e30": (2, scaled(1e30), "update norm", ALL),
    # FedDST's sparse payload
    "NaN value": (2, layer("fc1.weight", poke(at(3, np.nan))), "NaN", SPARSE),
    "wrong value count": (2, layer("fc1.weight", lambda a: raw(a.dtype, tuple(a.shape), a.data[:-4], VALUES_STYPE)), "values but the mask", SPARSE),
    "float64 values": (2, layer("fc1.weight", poke(lambda v: v.astype("<f8"))), "dtype", SPARSE),
    "float32 values, float16 configured": (2, layer("fc1.weight", poke(lambda v: v.astype("<f4"))), "value-dtype", SPARSE),
    "short bitmask": (2, remasked(swap_one, "fc1.weight:mask", raw("bool", (0,), b"\x00", BITMASK_STYPE)), "mask shape", SPARSE),
    "mask delta from an old version": (2, remasked(swap_one, delta_from=-1 % 2**64), "holds version 0", SPARSE),
    "mask delta as a full mask": (2, remasked(swap_one, "fc1.weight:mask", lambda a: raw("bool", tuple(a.shape), a.data, CODED_STYPE), 0), "range code", SPARSE),
    "coded mask count lies": (2, remasked(swap_one, "fc1.weight:mask", lambda a: raw("bool", tuple(a.shape), CODED_HEADER.pack(7) + a.data[8:], CODED_STYPE)), "declared", SPARSE),
    "popcount != values": (2, remasked(grow_one, "fc1.weight", None), "values but the mask", SPARSE),
    "mask denser than S": (2, remasked(grow_one), "allows", SPARSE),
    "mask moved without readjustment": (1, remasked(swap_one), "without readjustment", SPARSE),
    # dense strategies
    "sparse payload to a dense strategy": (2, layer("fc1.weight", lambda a: raw("float32", tuple(a.shape), a.data[:16], VALUES_STYPE)), "stype", DENSE),
}  # fmt: skip
PAIRS = [(case, name) for case, (*_, names) in CASES.items() for name in names]


def optimizer_state(strategy) -> dict:
    """The server optimizer's state of a strategy (momentum, Adam moments, FedDST's optimizer)."""
    state = {k: v for k, v in vars(strategy).items() if k in ("momentum_vector", "m_t", "v_t")}
    if hasattr(strategy, "server_optimizer"):
        state.update(m=strategy.server_optimizer.m, v=strategy.server_optimizer.v)
    return state


def assert_identical(federation: Federation, twin: Federation) -> None:
    state, twin_state = federation.arrays.to_torch_state_dict(), twin.arrays.to_torch_state_dict()
    assert all(torch.equal(state[name], twin_state[name]) for name in SHAPES)
    if hasattr(federation.strategy, "masks"):
        assert all(torch.equal(federation.strategy.masks[n], twin.strategy.masks[n]) for n in MASKABLE)
        assert federation.strategy.mask_version == twin.strategy.mask_version
    assert repr(optimizer_state(federation.strategy)) == repr(optimizer_state(twin.strategy))


def test_the_table_covers_forty_hostile_replies_for_every_strategy():
    assert len(CASES) >= 40
    assert all(sum(name in names for *_, names in CASES.values()) >= 40 for name in ALL)


PREPARED: dict[tuple[str, int], tuple[Federation, list[Message], list[Message]]] = {}


def prepared(cfg, name: str, server_round: int) -> tuple[Federation, list[Message], list[Message]]:
    """A federation of `name` with that round's messages and honest replies (a fresh copy of
    one computed once per test session: training is deterministic)."""
    if (name, server_round) not in PREPARED:
        federation = Federation(cfg, name)
        PREPARED[name, server_round] = (federation, *federation.replies(server_round))
    return copy.deepcopy(PREPARED[name, server_round])


@pytest.mark.parametrize("case, name", PAIRS, ids=[f"{n}-{c}" for c, n in PAIRS])
def test_a_hostile_reply_is_rejected_and_the_model_equals_a_round_without_it(make_cfg, case, name):
    server_round, tamper, reason, _ = CASES[case]
    federation, messages, replies = prepared(make_cfg(), name, server_round)
    twin, _, twin_replies = prepared(make_cfg(), name, server_round)
    hostile = Message(tamper(replies[1], federation.strategy), reply_to=messages[1])  # fmt: skip
    node = messages[1].metadata.dst_node_id

    arrays, _ = federation.aggregate(server_round, [replies[0], hostile, replies[2]])
    twin_arrays, _ = twin.aggregate(server_round, [twin_replies[0], twin_replies[2]])

    rejected = federation.strategy.health.rejected
    assert len(rejected) == 1 and rejected[0].startswith(f"node {node}:") and re.search(reason, rejected[0]), rejected
    assert arrays is not None and twin_arrays is not None
    assert_identical(federation, twin)


@pytest.mark.parametrize("name", ALL)
def test_an_aggregate_that_is_not_finite_is_discarded_with_the_strategy_state(make_cfg, name, monkeypatch):
    federation, messages, replies = prepared(make_cfg(), name, 2)
    twin, _, _ = prepared(make_cfg(), name, 2)  # the state before aggregating round 2
    aggregate = federation.strategy._aggregate_train

    def overflowing(server_round, replies):  # the real step (it updates the state), then an inf
        arrays, metrics = aggregate(server_round, replies)
        arrays["fc2.bias"] = Array(np.full(10, np.inf, np.float32))
        return arrays, metrics

    monkeypatch.setattr(federation.strategy, "_aggregate_train", overflowing)
    before = federation.arrays
    assert federation.aggregate(2, replies) == (None, None)
    assert federation.strategy.health.discarded and federation.arrays is before
    assert_identical(federation, twin)


def test_huge_finite_replies_under_server_momentum_are_discarded_not_applied(make_cfg):
    federation, messages, replies = prepared(make_cfg(), "fedavgm", 2)
    federation.strategy.max_update_norm, federation.strategy.server_learning_rate = 0.0, 2.0
    huge = [Message(layer("fc2.bias", lambda a: dense(np.full(10, 3e38, np.float32)))(r, None), reply_to=m)
            for r, m in zip(replies, messages)]  # fmt: skip
    assert federation.aggregate(2, huge) == (None, None) and federation.strategy.health.discarded


def filled(value: float):
    """Every float32 array of the reply (dense or sparse values) set to `value`."""

    def tamper(reply: Message, strategy) -> RecordDict:
        record = reply.content["arrays"]
        fill = poke(lambda v: np.full_like(v, value))
        return content(
            reply, ArrayRecord({k: fill(record[k]) if record[k].dtype == "float32" else record[k] for k in record})
        )

    return tamper


def honest_rounds(federation: Federation, rounds: range) -> None:
    """Honest rounds in which the model trains: every round is kept and moves the weights."""
    for server_round in rounds:
        before = federation.arrays.to_torch_state_dict()
        arrays, _ = federation.aggregate(
            server_round, [federation.reply(m) for m in federation.configure(server_round)]
        )
        after = federation.arrays.to_torch_state_dict()
        assert arrays is not None and not federation.strategy.health.discarded, server_round
        assert all(not torch.equal(before[name], after[name]) for name in ("conv1.weight", "fc2.bias")), server_round


def test_a_finite_reply_that_overflows_fedadams_moments_is_discarded_then_the_model_trains(make_cfg, caplog):
    """3e38 is finite in float32, its square in v_t is not: the round is discarded with all of
    FedAdam's state, and the run goes on as if that round had had no replies."""
    federation, twin = Federation(make_cfg(), "fedadam"), Federation(make_cfg(), "fedadam")
    federation.strategy.max_update_norm = twin.strategy.max_update_norm = 0.0  # off, as by default
    federation.aggregate(1, federation.replies(1)[1])
    twin.aggregate(1, twin.replies(1)[1])
    before = copy.deepcopy(optimizer_state(federation.strategy))
    messages = federation.configure(2)
    replies = [federation.reply(m) for m in messages]
    replies[1] = Message(filled(3e38)(replies[1], federation.strategy), reply_to=messages[1])
    [twin.reply(m) for m in twin.configure(2)]  # the twin's nodes train too; none of it arrives

    assert federation.aggregate(2, replies) == (None, None) and federation.strategy.health.discarded
    assert "round 2 discarded, v_t['conv1.weight'] is not finite" in caplog.text
    assert repr(optimizer_state(federation.strategy)) == repr(before)
    assert twin.aggregate(2, []) == (None, None)
    honest_rounds(federation, range(3, 9))
    honest_rounds(twin, range(3, 9))
    assert_identical(federation, twin)
    assert nonfinite(optimizer_state(federation.strategy), "state") is None


def test_a_finite_reply_under_feddst_adam_keeps_the_moments_finite_and_the_model_trains(make_cfg):
    """FedDST's moments are float64: 3e38 (round 1, no readjustment) squares to about 1e74,
    finite, so the round is kept; the six honest rounds after it all move the model."""
    federation = Federation(make_cfg(value_dtype="float32"), "feddst-adam")
    federation.strategy.max_update_norm = 0.0
    messages = federation.configure(1)
    replies = [federation.reply(m) for m in messages]
    replies[1] = Message(filled(3e38)(replies[1], federation.strategy), reply_to=messages[1])

    arrays, _ = federation.aggregate(1, replies)
    optimizer = federation.strategy.server_optimizer
    assert arrays is not None and not federation.strategy.health.discarded
    assert nonfinite(optimizer_state(federation.strategy), "state") is None
    assert 1e73 < max(float(v.max()) for v in optimizer.v.values()) < 1e75  # 0.01 x (3e38 / 3)^2
    honest_rounds(federation, range(2, 8))
    assert nonfinite(optimizer_state(federation.strategy), "state") is None


def test_nonfinite_names_the_first_non_finite_array_of_a_state():
    state = {
        "m": [np.zeros(2)],
        "v": {"w": torch.tensor([1.0, float("inf")])},
        "masks": torch.ones(2, dtype=torch.bool),
    }
    assert nonfinite(state, "state") == "state['v']['w']"
    assert nonfinite(ServerOptimizer("adam", 0.1, 0.9), "server_optimizer") is None
    assert nonfinite(ArrayRecord({"b": Array(np.array([np.nan], np.float32))}), "model") == "model['b']"
    large = np.full(4, 3e38, np.float32)  # finite, though its float32 sum overflows
    assert nonfinite({"a": large, "t": torch.from_numpy(large)}, "state") is None
    large[2] = -np.inf
    assert nonfinite({"a": large}, "state") == "state['a']"


def test_the_state_copy_keeps_tensors_and_refuses_to_restore_one_changed_in_place():
    tensor, array = torch.ones(3), np.zeros(2)
    state = {"global_state": {"w": tensor}, "m_t": [array]}
    before = StateCopy(state)
    state["m_t"][0] += 1.0  # numpy arrays (Flower's moments) are copied
    restored = before.restore()
    assert restored["global_state"]["w"] is tensor and restored["m_t"][0].tolist() == [0.0, 0.0]
    tensor.add_(1.0)
    with pytest.raises(RuntimeError, match=r"changed global_state\['w'\] in place: the round cannot be undone"):
        before.restore()


@pytest.mark.parametrize(
    "build",
    [
        lambda: make_strategy(clients_per_round=3),
        lambda: make_strategy(clients_per_round=3, server_optimizer=ServerOptimizer("adam", 0.01, 0.9)),
        lambda: make_strategy(clients_per_round=3, server_optimizer=ServerOptimizer("momentum", 1.0, 0.9)),
        lambda: make_strategy(clients_per_round=3, mask_rule="thompson"),
        lambda: PruneFL(maskable=MASKABLE, sparsity=0.8, delta_r=2, r_end=10, clients_per_round=3, seed=0),
    ],
    ids=["feddst", "adam", "momentum", "thompson", "prunefl"],
)
def test_feddst_rounds_change_no_state_tensor_in_place(make_cfg, build):
    """The reply guard keeps the state's tensors instead of copying them (StateCopy): FedDST's
    aggregate, readjust rounds included, must replace tensors, never change them in place."""
    federation = Federation(make_cfg(), "feddst")
    federation.strategy = build()
    federation.arrays = federation.strategy.initialize(ArrayRecord(new_model().state_dict()))
    for server_round in range(1, 6):  # delta_r 2: rounds 2 and 4 readjust
        messages = federation.configure(server_round)
        before = StateCopy(federation.strategy.state())
        federation.aggregate(server_round, [federation.reply(m) for m in messages])
        before.restore()
    assert federation.strategy.mask_version > 0


def test_update_norms_are_judged_against_the_median_of_the_other_replies():
    reason = "update norm {} exceeds max-update-norm 10.0 x the median of the other replies' {}"
    assert outliers([1.0, 100.0], 10.0) == [None, reason.format(100, 1)]  # the mean of the two would let it pass
    assert outliers([1.0, 2.0, 30.0], 10.0) == [None, None, reason.format(30, 1.5)]
    assert outliers([1.0, 100.0], 0.0) == [None, None] and outliers([100.0], 10.0) == [None]


@pytest.mark.parametrize("name", ["feddst", "fedavg"])
def test_a_scaled_update_is_refused_when_only_two_replies_are_valid(make_cfg, name):
    federation, messages, replies = prepared(make_cfg(), name, 2)
    federation.strategy.max_update_norm = 10.0
    scaled_reply = Message(scaled(100.0)(replies[1], federation.strategy), reply_to=messages[1])
    federation.aggregate(2, [replies[0], scaled_reply])  # the third node does not answer
    (rejected,) = federation.strategy.health.rejected
    assert re.fullmatch(
        rf"node {messages[1].metadata.dst_node_id}: update norm \S+ exceeds max-update-norm 10.0 x the median of "
        r"the other replies' \S+",
        rejected,
    ), rejected


def test_the_error_reply_that_replaces_a_rejected_one_names_the_reason(make_cfg):
    federation = Federation(make_cfg(), "fedavg")
    messages, replies = federation.replies(1)
    stale = Message(metric("server-round", 7)(replies[0], federation.strategy), reply_to=messages[0])
    (screened, *_) = federation.strategy.screen([stale, *replies[1:]])
    assert screened.has_error() and "stale" in screened.error.reason


def test_replies_from_unsent_nodes_and_second_replies_are_dropped(make_cfg):
    federation, twin = Federation(make_cfg(), "fedavg"), Federation(make_cfg(), "fedavg")
    _, replies = federation.replies(1)
    _, twin_replies = twin.replies(1)
    stranger = Message(replies[0].content, reply_to=Message(RecordDict(), dst_node_id=99, message_type="train"))
    federation.aggregate(1, [*replies, replies[0], stranger])
    twin.aggregate(1, twin_replies)
    assert [r.split(":")[0] for r in federation.strategy.health.rejected] == [
        f"node {replies[0].metadata.src_node_id}",
        "node 99",
    ]
    assert_identical(federation, twin)


def sent_with_ids(federation: Federation, server_round: int) -> tuple[list[Message], list[Message]]:
    """A round's messages given ids as Flower's grids give them when they send them, and the
    nodes' replies (each carrying its instruction's id as reply_to_message_id)."""
    messages = federation.configure(server_round)
    for i, message in enumerate(messages):
        message.metadata.__dict__["_message_id"] = f"instruction-{server_round}-{i}"
    return messages, [federation.reply(m) for m in messages]


@pytest.mark.parametrize("name", ["feddst", "fedavg"])
def test_the_superlinks_node_unavailable_reply_is_that_nodes_failure_not_a_rejection(make_cfg, name):
    """Flower's SuperLink answers an instruction to a node that stopped heartbeating itself:
    an error reply from node 1 (the SuperLink) whose reply_to_message_id is the instruction's."""
    federation, twin = Federation(make_cfg(), name), Federation(make_cfg(), name)
    messages, replies = sent_with_ids(federation, 1)
    _, twin_replies = sent_with_ids(twin, 1)
    lost = messages[1].metadata.dst_node_id
    unavailable = create_message_error_unavailable_res_message(messages[1].metadata, "node_unavail")
    assert unavailable.metadata.src_node_id == SUPERLINK_NODE_ID != lost

    arrays, _ = federation.aggregate(1, [replies[0], unavailable, replies[2]])
    twin.aggregate(1, [twin_replies[0], twin_replies[2]])

    assert arrays is not None and federation.strategy.health.rejected == []
    if name == "feddst":
        failure = f"node {lost}: error reply {ErrorCode.NODE_UNAVAILABLE}: {NODE_UNAVAILABLE_ERROR_REASON}"
        assert federation.strategy.stats.failures == [failure]
    assert_identical(federation, twin)


def test_replies_are_matched_to_instructions_by_message_id(make_cfg):
    federation, twin = Federation(make_cfg(), "feddst"), Federation(make_cfg(), "feddst")
    messages, replies = sent_with_ids(federation, 1)
    _, twin_replies = sent_with_ids(twin, 1)
    (first, second, third), stranger = (
        (m.metadata.dst_node_id for m in messages),
        Message(replies[0].content, reply_to=Message(RecordDict(), dst_node_id=99, message_type="train")),
    )
    answers_second = Message(replies[0].content, reply_to=messages[1])  # node `first`'s reply to `second`'s instruction
    answers_second.metadata.__dict__["_src_node_id"] = first

    federation.aggregate(1, [answers_second, *replies, replies[2], stranger])
    twin.aggregate(1, twin_replies)

    assert federation.strategy.health.rejected == [
        f"node {first}: a reply to the instruction of node {second}",
        f"node {third}: a second reply",
        "node 99: a reply to no instruction of this round",
    ]
    assert_identical(federation, twin)


def test_a_valid_round_rejects_nothing(make_cfg):
    for name in ALL:
        federation = Federation(make_cfg(), name)
        for server_round in (1, 2, 3):
            messages = federation.configure(server_round)
            arrays, _ = federation.aggregate(server_round, [federation.reply(m) for m in messages])
            assert arrays is not None and federation.strategy.health.rejected == [], (name, server_round)


# --------------------------------------------------------------------------- fuzzing

METRIC_VALUES = st.one_of(
    st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.integers(-5, 5), max_size=3), st.lists(st.floats(allow_nan=True), max_size=3),
)  # fmt: skip
METRIC_KEYS = st.sampled_from([*REPLY_METRICS, "accuracy", ""])


@st.composite
def fuzzed_contents(draw, reply: Message, case_names: list[str], strategy) -> RecordDict:
    """A reply's content after one table case, then random metric edits and record shuffles."""
    content = CASES[draw(st.sampled_from(case_names))][1](reply, strategy) if draw(st.booleans()) else reply.content
    metrics = dict(content.metric_records.get("metrics", MetricRecord()))
    for key, value in draw(st.lists(st.tuples(METRIC_KEYS, st.one_of(st.none(), METRIC_VALUES)), max_size=4)):
        metrics.pop(key, None)
        if value is not None:
            metrics[key] = value
    records = {**content.array_records, **content.config_records}
    extra = draw(st.sampled_from([{}, {"junk": ConfigRecord({"x": 1})}, {"gradients": ArrayRecord()}]))
    order = draw(st.permutations([*records, "metrics", *extra]))
    every = {**records, "metrics": MetricRecord(metrics), **extra}
    return RecordDict({name: every[name] for name in order})


def fuzz_screen(make_cfg, name: str, examples: int) -> None:
    """Fuzzed replies through the guard's screen: a refusal or acceptance, never an exception."""
    federation, messages, replies = prepared(make_cfg(), name, 2)
    case_names = [case for case, (*_, names) in CASES.items() if name in names]

    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(st.data())
    def screen_one(data):
        content = data.draw(fuzzed_contents(replies[1], case_names, federation.strategy))
        federation.strategy.health = Health()
        (screened,) = federation.strategy.screen([Message(content, reply_to=messages[1])])
        assert screened.has_error() == bool(federation.strategy.health.rejected)

    screen_one()


@pytest.mark.parametrize("name", ["feddst", "fedavgm"])
def test_fuzzed_replies_are_refused_or_accepted_never_an_exception(make_cfg, name):
    fuzz_screen(make_cfg, name, 250)


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_fuzzed_replies_slow(make_cfg, name):
    fuzz_screen(make_cfg, name, 2500)


def test_every_guard_has_its_own_round_state():
    """A reply rejected by one strategy before any round is not counted by another."""
    first, second = guarded(FedAvg)(), make_strategy()
    first.reject(7, "hostile")
    assert first.health.rejected == ["node 7: hostile"]
    assert second.health.rejected == [] and guarded(FedAvg)().health.rejected == []
    assert first._sent is not second._sent


@pytest.mark.parametrize("method", ["configure_train", "aggregate_train"])
def test_overriding_a_guarded_method_is_refused(method):
    with pytest.raises(TypeError, match=f"overrides {method}, which would bypass the reply guard: override _{method}"):
        type("Mine", (guarded(FedAvg),), {method: lambda self, *args: None})
    with pytest.raises(TypeError, match=f"Mine overrides {method}"):
        type("Mine", (type(make_strategy()),), {method: lambda self, *args: None})


# --------------------------------------------------------------------------- Flower's sampling, bounded


@pytest.mark.parametrize("name", ["fedavg", "fedavgm", "fedadam"])
def test_guarded_flower_strategy_short_of_nodes_waits_round_timeout_then_samples_those_there(name, caplog):
    """A fixed count of 3 (as registry.sampling builds it), one node lost for good: Flower's own
    sampling would wait forever; behind the guard the round waits round-timeout, samples the
    two left, and Flower's minimums are as they were afterwards."""
    strategy = STRATEGIES[name]()
    strategy.fraction_train, strategy.round_timeout = 1e-9, 0.3
    arrays = ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))})
    started = time.monotonic()
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid([4, 5])))
    assert time.monotonic() - started >= 0.3
    assert sorted(m.metadata.dst_node_id for m in messages) == [4, 5]
    assert "2 of the 3 nodes wanted are connected after waiting" in caplog.text
    assert (strategy.min_train_nodes, strategy.min_available_nodes) == (3, 3)
    back = list(strategy.configure_train(2, arrays, ConfigRecord(), FakeGrid([4, 5, 6])))
    assert sorted(m.metadata.dst_node_id for m in back) == [4, 5, 6] and strategy.nodes_missing_since is None


def test_guarded_flower_strategy_with_too_few_nodes_stops_naming_how_many_are_missing():
    strategy = STRATEGIES["fedavg"]()
    strategy.round_timeout = 0.2
    arrays = ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))})
    with pytest.raises(RuntimeError, match=r"1 of the 3 nodes wanted .* needs at least 2 .*: 1 missing$"):
        strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid([4]))
