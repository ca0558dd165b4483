"""Reply validation for every strategy (FedDST and Flower's own): a reply is used only if it
answers the instruction its node was sent, record for record and metric for metric; one bad
reply is turned into an error reply (the strategy drops it like a failed node) and the round
goes on. After aggregation the new global model and the strategy's whole state (server
momentum, Adam moments) must be finite, else the round is discarded and the state restored.

`guarded(FedAvg)(...)` is FedAvg behind this guard; `build_strategy` guards every strategy."""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING
from types import ModuleType
from typing import Any, TypeVar

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord
from flwr.common import log
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from . import protocol as P
from .codec import DENSE_STYPE, VALUE_DTYPES, CodecError, decode_dense, is_sparse
from .mask_rules import MASK_RULES
from .masks import DISTRIBUTIONS, all_finite
from .server_optimizer import ServerOptimizer

# kind, low, high (None: unbounded) of every metric a client reports; see `check_number`
REPLY_METRICS: dict[str, tuple[type, float, float | None]] = {
    P.NUM_EXAMPLES: (int, 1, None),  # the upper bound is the run's max-num-examples
    P.TRAIN_LOSS: (float, 0.0, None),
    P.MASK_ENTERED: (int, 0, None),
    P.UPLOAD_BYTES: (int, 0, None),
    P.DOWNLOAD_BYTES: (int, 0, None),
    P.SERVER_ROUND: (int, 0, None),
    P.MASK_VERSION: (int, 0, None),
}


def check_number(where: str, key: str, value: Any, kind: type, low: float, high: float | None) -> None:
    """`value` is an int (or, for kind float, an int or float), finite and in [low, high];
    CodecError names `where` and `key` otherwise."""
    allowed = (int, float) if kind is float else (int,)
    if isinstance(value, bool) or not isinstance(value, allowed):
        raise CodecError(f"{where} '{key}' = {value!r}: expected {kind.__name__}")
    if isinstance(value, float) and not math.isfinite(value) or value < low or (high is not None and value > high):
        raise CodecError(f"{where} '{key}' = {value!r}: expected in [{low}, {high if high is not None else 'inf'}]")


@dataclass(frozen=True)
class Instruction:
    """What a node was asked, and so what its reply must hold."""

    echo: dict[str, int]  # ECHOED keys of the instruction's config
    array_records: frozenset[str]
    sparse: bool  # FedDST's payload: values (and bitmasks) that the strategy decodes
    dense: dict[str, tuple[str, tuple[int, ...]]]  # dtype and shape of each dense array sent

    @classmethod
    def of(cls, message: Message) -> Instruction:
        config = message.content.config_records.get(P.CONFIG, ConfigRecord())
        echo = {key: int(P.number(config, key)) for key in P.ECHOED if key in config}
        records = {P.ARRAYS} | ({P.GRADIENTS} if config.get(P.UPLOAD_GRADIENTS, 0) else set())
        arrays = message.content.array_records.get(P.ARRAYS, ArrayRecord())
        dense = {name: (a.dtype, tuple(a.shape)) for name, a in arrays.items() if a.stype == DENSE_STYPE}
        return cls(echo, frozenset(records), is_sparse(arrays), dense)


def check_reply(reply: Message, instruction: Instruction, max_num_examples: int) -> None:
    """The reply's records, metrics and (dense) arrays answer `instruction`; CodecError names
    the first problem. Sparse values are FedDST's to decode (`codec.decode`)."""
    content = reply.content
    records = {
        "array": sorted(content.array_records), "config": sorted(content.config_records),
        "metric": sorted(content.metric_records),
    }  # fmt: skip
    expected = {"array": sorted(instruction.array_records), "config": [], "metric": [P.METRICS]}
    if records != expected:
        raise CodecError(f"reply records {records}, expected {expected}")
    check_metrics(content.metric_records[P.METRICS], instruction, max_num_examples)
    check_dense(content.array_records[P.ARRAYS], instruction)


def check_metrics(metrics: MetricRecord, instruction: Instruction, max_num_examples: int) -> None:
    """Exactly the expected metric keys, each in range; echoed keys equal the instruction's."""
    expected = {key for key in REPLY_METRICS if key not in P.ECHOED} | set(instruction.echo)
    if set(metrics) != expected:
        raise CodecError(f"reply metrics {sorted(metrics)}, expected {sorted(expected)}")
    for key in sorted(expected):
        kind, low, high = REPLY_METRICS[key]
        check_number("reply metric", key, metrics[key], kind, low, max_num_examples if key == P.NUM_EXAMPLES else high)
    for key, value in instruction.echo.items():
        if metrics[key] != value:
            raise CodecError(f"reply answers {key} {metrics[key]}, this round sent {value} (stale or misdirected)")


def check_dense(record: ArrayRecord, instruction: Instruction) -> None:
    """The dense arrays come back with the dtypes they were sent with; a dense reply holds
    exactly the arrays sent, with their shapes, finite (FedDST's decoder checks the rest)."""
    if not instruction.sparse and set(record) != set(instruction.dense):
        raise CodecError(f"reply arrays {sorted(record)}, expected {sorted(instruction.dense)}")
    for name, (dtype, shape) in instruction.dense.items():
        if name in record and record[name].dtype != dtype:
            raise CodecError(f"layer '{name}': dtype '{record[name].dtype}', expected '{dtype}'")
        if not instruction.sparse:
            decode_dense(name, record[name], shape)


def update_norm(new: Mapping[str, np.ndarray], old: Mapping[str, np.ndarray]) -> float:
    """L2 norm of new - old over the floating-point arrays of `old`."""
    squares = (
        float(np.sum((new[name].astype(np.float64) - value) ** 2))
        for name, value in old.items() if np.issubdtype(value.dtype, np.floating)
    )  # fmt: skip
    return math.sqrt(sum(squares))


def peer_medians(norms: list[float]) -> list[float]:
    """Per update norm, the median of the others (leave-one-out): a reply is never judged
    against a median it pulls up itself, as with two replies, whose median is their mean."""
    return [statistics.median(norms[:i] + norms[i + 1 :]) for i in range(len(norms))]


def outliers(norms: list[float], factor: float) -> list[str | None]:
    """Per update norm, why it is refused (above `factor` x the median of the round's other
    norms, `peer_medians`), else None; factor 0 refuses nothing, and a lone reply has no
    peers to compare with."""
    if factor <= 0 or len(norms) < 2:
        return [None] * len(norms)
    return [
        f"update norm {norm:.4g} exceeds max-update-norm {factor} x the median of the other replies' {median:.4g}"
        if norm > factor * median else None
        for norm, median in zip(norms, peer_medians(norms))
    ]  # fmt: skip


def nonfinite(value: Any, path: str) -> str | None:
    """Where `value` holds a NaN or an infinity: `path` extended to the first floating-point
    array (numpy, torch, or a dense Flower `Array`) that does, looking through mappings,
    lists, tuples and objects' attributes (a strategy's whole state: the model, FedDST's
    server optimizer, Flower's `m_t`, `v_t` and `momentum_vector`); None if nothing does.

    Parameters
    ----------
    value : Any
        An array, or a container or object holding arrays.
    path : str
        How the caller names `value` (e.g. "v_t").

    Returns
    -------
    str | None
        E.g. "server_optimizer.v['fc1.weight']".
    """
    return next((where for where, array in arrays_in(value, path) if not _finite(array)), None)


def _finite(array: torch.Tensor | np.ndarray | Array) -> bool:
    if isinstance(array, Array):
        if array.stype != DENSE_STYPE:
            return True
        array = array.numpy()
    if isinstance(array, torch.Tensor):
        return not array.is_floating_point() or all_finite(array)
    if not np.issubdtype(array.dtype, np.floating):
        return True
    with np.errstate(over="ignore", invalid="ignore"):  # as all_finite: a finite sum first, else the exact check
        return bool(np.isfinite(array.sum()) or np.isfinite(array).all())


def arrays_in(value: Any, path: str, seen: set[int] | None = None) -> Iterator[tuple[str, Any]]:
    """Every array (numpy, torch, Flower `Array`) in `value` with its path, looking through
    mappings, lists, tuples and objects' attributes, each container and object once."""
    if isinstance(value, (Array, torch.Tensor, np.ndarray)):
        yield path, value
        return
    seen = set() if seen is None else seen
    if id(value) in seen:
        return
    if isinstance(value, Mapping):
        children: Iterable[tuple[str, Any]] = ((f"{path}[{key!r}]", item) for key, item in value.items())
    elif isinstance(value, (list, tuple)):
        children = ((f"{path}[{i}]", item) for i, item in enumerate(value))
    elif hasattr(value, "__dict__") and not callable(value) and not isinstance(value, ModuleType):
        children = ((f"{path}.{key}", item) for key, item in vars(value).items())
    else:
        return
    seen.add(id(value))
    for name, item in children:
        yield from arrays_in(item, name, seen)


class StateCopy:
    """A copy of a strategy's state to restore it from: every container and array copied,
    except torch tensors, which are kept as they are with their version counters (the
    strategies replace tensors rather than change them: a round's aggregate leaves the global
    model and the masks untouched, so they are not copied every round). `restore` refuses if
    one of them was changed in place since."""

    def __init__(self, state: dict[str, Any]) -> None:
        seen: set[int] = set()
        found = (arrays_in(value, name, seen) for name, value in state.items())
        self.tensors = [(where, t, t._version) for items in found for where, t in items if isinstance(t, torch.Tensor)]
        self.state = copy.deepcopy(state, {id(t): t for _, t, _ in self.tensors})

    def restore(self) -> dict[str, Any]:
        """The state as it was.

        Raises
        ------
        RuntimeError
            A tensor of the state was changed in place (named): it cannot be restored.
        """
        changed = [where for where, tensor, version in self.tensors if tensor._version != version]
        if changed:
            raise RuntimeError(f"aggregate_train changed {changed[0]} in place: the round cannot be undone")
        return self.state


def same_dtypes(arrays: ArrayRecord, reference: ArrayRecord) -> ArrayRecord:
    """`arrays` with the dtypes of `reference` (FedAdam's step returns float64 arrays)."""
    changed = {
        name: Array(array.numpy().astype(reference[name].dtype))
        for name, array in arrays.items() if name in reference and array.dtype != reference[name].dtype
    }  # fmt: skip
    return ArrayRecord({**{name: arrays[name] for name in arrays}, **changed}) if changed else arrays


@dataclass
class Health:
    """What validation did in the current round."""

    rejected: list[str] = field(default_factory=list)  # "node N: reason", one per refused reply
    discarded: bool = False  # the aggregate was not finite: the model stayed as it was


class ReplyGuard(Strategy):
    """The guard around a strategy's training rounds: replies are checked against the
    instruction each node got, update-norm outliers are refused (max_update_norm), and a
    round after which the aggregate or the strategy's state (`state()`) is not finite is
    discarded, the state restored. A subclass implements `_configure_train` and `_aggregate_train` (where Flower's strategies implement
    `configure_train` and `aggregate_train`, which the guard wraps: a subclass that overrides
    those is a TypeError, as it would bypass the guard); `guarded(cls)` does it for Flower's
    strategies."""

    max_num_examples: int = 1_000_000
    max_update_norm: float = 0.0  # multiple of the median of the other replies' update norms; 0: off
    round_timeout: float = 3600.0  # seconds a round waits for missing nodes (see nodes_for_round)
    min_fit_fraction: float = 0.5  # the share of the sample a round needs connected after that wait
    nodes_missing_since: float | None = None  # time.monotonic() when wanted nodes went missing
    health: Health  # this round's (see configure_train)
    _sent: dict[int, Message]  # node id -> this round's instruction
    _global: ArrayRecord  # this round's global model

    def __new__(cls, *args: Any, **kwargs: Any) -> ReplyGuard:
        guard = super().__new__(cls)  # the round state of every instance, whatever its __init__
        guard.health, guard._sent, guard._global = Health(), {}, ArrayRecord()
        return guard

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in ("configure_train", "aggregate_train"):
            if name in vars(cls):
                raise TypeError(
                    f"{cls.__name__} overrides {name}, which would bypass the reply guard: "
                    f"override _{name} instead (ReplyGuard.{name} wraps it)"
                )

    def _configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        raise NotImplementedError

    def _aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        raise NotImplementedError

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The strategy's messages, remembered as the instructions replies must answer."""
        self.health = Health()
        messages = list(self._configure_train(server_round, arrays, config, grid))
        self._sent = {m.metadata.dst_node_id: m for m in messages}
        self._global = arrays
        return messages

    def nodes_for_round(self, grid: Grid, wanted: int, size: int) -> list[int]:
        """The connected nodes a round samples `size` from, once `wanted` are connected.

        Flower's `sample_nodes` waits for them without a bound; here the wait lasts at most
        `round_timeout` seconds from when they were first missing (a node lost for good costs
        one wait, not one a round). Then the round goes on with the nodes connected if at
        least ceil(min_fit_fraction x size) (at least 1) are, and says so in the log.

        Parameters
        ----------
        grid : Grid
            The server's grid.
        wanted : int
            The nodes the round waits for (the sample size, at least min_available_nodes).
        size : int
            The nodes the round samples.

        Returns
        -------
        list[int]
            The connected node ids, in the grid's order.

        Raises
        ------
        RuntimeError
            Fewer are connected after the wait: the message says how many are missing.
        """
        since = time.monotonic() if self.nodes_missing_since is None else self.nodes_missing_since
        while (
            len(nodes := list(grid.get_node_ids())) < wanted
            and (left := since + self.round_timeout - time.monotonic()) > 0
        ):
            log(
                INFO,
                "Waiting for nodes to connect: %d connected, %d wanted (at most %.0f s more)",
                len(nodes),
                wanted,
                left,
            )
            time.sleep(min(1.0, left))
        self.nodes_missing_since = since if len(nodes) < wanted else None
        if len(nodes) >= wanted:
            return nodes
        need, waited = max(1, math.ceil(self.min_fit_fraction * size)), time.monotonic() - since
        if len(nodes) < need:
            raise RuntimeError(
                f"{len(nodes)} of the {wanted} nodes wanted are connected after waiting {waited:.1f} s "
                f"(round-timeout {self.round_timeout:g} s); a round needs at least {need} "
                f"(min-fit-fraction {self.min_fit_fraction:g} x {size}): {need - len(nodes)} missing"
            )
        log(
            WARNING,
            "configure_train: %d of the %d nodes wanted are connected after waiting %.1f s: the round samples %d",
            len(nodes), wanted, waited, min(size, len(nodes)),
        )  # fmt: skip
        return nodes

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The strategy's aggregate of the screened replies, if it is finite."""
        replies = self.screen(list(replies))
        before = StateCopy(self.state())
        arrays, metrics = self._aggregate_train(server_round, replies)
        problem = nonfinite(arrays, "the aggregated model") or next(
            (where for name, value in self.state().items() if (where := nonfinite(value, name)) is not None), None
        )
        if problem is not None:
            vars(self).update(before.restore())
            self.health.discarded = True
            log(WARNING, "aggregate_train: round %d discarded, %s is not finite", server_round, problem)
            return None, None
        return (None if arrays is None else same_dtypes(arrays, self._global)), metrics

    def state(self) -> dict[str, Any]:
        """The strategy's state across rounds (every attribute but the guard's round state):
        after aggregation it must be finite, else all of it is restored."""
        return {name: value for name, value in vars(self).items() if name not in ("health", "_sent", "_global")}

    def screen(self, replies: list[Message]) -> list[Message]:
        """The replies, each refused one replaced by an error reply naming the reason; the
        SuperLink's own error reply for an instruction (its node is unavailable) replaced by
        the same error from that node, a failure of that node."""
        checked, answered = [], set()
        ids = {m.metadata.message_id: m for m in self._sent.values() if m.metadata.message_id}
        for reply in replies:
            node, sent = reply.metadata.src_node_id, instruction_of(reply, ids, self._sent)
            if sent is None or sent.metadata.dst_node_id in answered:
                self.reject(node, "a second reply" if sent is not None else "a reply to no instruction of this round")
                continue
            if node != sent.metadata.dst_node_id:
                if node != SUPERLINK_NODE_ID or not reply.has_error():
                    self.reject(node, f"a reply to the instruction of node {sent.metadata.dst_node_id}")
                    continue
                reply = Message(reply.error, reply_to=sent)
            answered.add(sent.metadata.dst_node_id)
            try:
                if not reply.has_error():  # an error reply is the strategy's (a failed node)
                    check_reply(reply, Instruction.of(sent), self.max_num_examples)
                checked.append(reply)
            except CodecError as err:
                checked.append(self.refuse(sent, str(err)))
        return self.refuse_outliers(checked)

    def reject(self, node: int, reason: str) -> None:
        """Count and log one reply refused by validation."""
        self.health.rejected.append(f"node {node}: {reason}")
        log(WARNING, "rejected the reply of node %d: %s", node, reason)

    def refuse(self, sent: Message, reason: str) -> Message:
        """Reject the reply to `sent`; the error reply that replaces it."""
        self.reject(sent.metadata.dst_node_id, reason)
        return Message(Error(code=P.REJECTED_CODE, reason=f"rejected by the server: {reason}"), reply_to=sent)

    def refuse_outliers(self, replies: list[Message]) -> list[Message]:
        """Dense replies whose update norm is an outlier (max_update_norm); FedDST bounds
        its sparse updates after decoding them."""
        if self.max_update_norm <= 0:
            return replies
        dense = [
            i for i, r in enumerate(replies) if not r.has_error() and not is_sparse(r.content.array_records[P.ARRAYS])
        ]
        old = {name: array.numpy() for name, array in self._global.items()}
        norms = [
            update_norm({n: a.numpy() for n, a in replies[i].content.array_records[P.ARRAYS].items()}, old)
            for i in dense
        ]
        for i, reason in zip(dense, outliers(norms, self.max_update_norm)):
            if reason is not None:
                replies[i] = self.refuse(self._sent[replies[i].metadata.src_node_id], reason)
        return replies


def instruction_of(reply: Message, ids: Mapping[str, Message], by_node: Mapping[int, Message]) -> Message | None:
    """The instruction `reply` answers: the one whose message id is its reply_to_message_id
    (`ids`, message id -> instruction), or, where it has none (messages get ids from Flower's
    runtime when sent), the one sent to its sender (`by_node`, node id -> instruction)."""
    reply_to = reply.metadata.reply_to_message_id
    return ids.get(reply_to) if reply_to else by_node.get(reply.metadata.src_node_id)


S = TypeVar("S", bound=Strategy)


def guarded(cls: type[S]) -> type[S]:
    """Flower's strategy `cls` behind ReplyGuard: `guarded(FedAvg)(fraction_train=0.5)`. Its
    sampling waits for missing nodes at most `round_timeout` (`ReplyGuard.nodes_for_round`)."""

    def configure_train(
        self: Any, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        # Flower's sample size (FedAvg.configure_train), then its own sampling from the nodes
        # that are there: its minimums lowered to their number for this round if some are missing
        size = max(int(len(list(grid.get_node_ids())) * self.fraction_train), self.min_train_nodes)
        there = len(self.nodes_for_round(grid, max(size, self.min_available_nodes), size))
        minimums = self.min_train_nodes, self.min_available_nodes
        self.min_train_nodes, self.min_available_nodes = min(self.min_train_nodes, there), min(minimums[1], there)
        try:
            return cls.configure_train(self, server_round, arrays, config, grid)
        finally:
            self.min_train_nodes, self.min_available_nodes = minimums

    hooks = {"_configure_train": configure_train, "_aggregate_train": cls.aggregate_train, "__module__": __name__}
    return type(f"Guarded{cls.__name__}", (ReplyGuard, cls), hooks)


def whole(value: Any) -> bool:
    """An int (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool)


def real(value: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_strategy_arguments(strategy: Any) -> None:
    """Raise ValueError naming the first `FedDST` constructor argument out of its range.

    `strategy` is a FedDST (or a subclass) whose `__init__` has set its arguments as attributes;
    typed `Any` because the point is to check values of any type (and so that validation does not
    import the strategy it validates)."""
    checks = [
        (bool(strategy.maskable) and all(isinstance(n, str) for n in strategy.maskable), "maskable",
         "a non-empty list of state-dict names"),
        (real(strategy.sparsity) and 0.0 <= strategy.sparsity < 1.0, "sparsity", "in [0, 1)"),
        (strategy.sparsity_distribution in DISTRIBUTIONS, "sparsity_distribution", f"one of {DISTRIBUTIONS}"),
        (real(strategy.alpha) and 0.0 <= strategy.alpha <= 1.0, "alpha", "in [0, 1]"),
        (whole(strategy.delta_r) and strategy.delta_r >= 1, "delta_r", "an int >= 1"),
        (strategy.r_end is None or (whole(strategy.r_end) and strategy.r_end >= 0), "r_end", "None or an int >= 0"),
        (real(strategy.fraction_train) and 0.0 < strategy.fraction_train <= 1.0, "fraction_train", "in (0, 1]"),
        (whole(strategy.clients_per_round) and strategy.clients_per_round >= 0, "clients_per_round", "an int >= 0"),
        (whole(strategy.min_train_nodes) and strategy.min_train_nodes >= 1, "min_train_nodes", "an int >= 1"),
        (whole(strategy.min_available_nodes) and strategy.min_available_nodes >= 1, "min_available_nodes", "an int >= 1"),
        (real(strategy.proximal_mu) and strategy.proximal_mu >= 0, "proximal_mu", ">= 0"),
        (whole(strategy.min_votes) and strategy.min_votes >= 1, "min_votes", "an int >= 1"),
        (strategy.mask_rule in MASK_RULES, "mask_rule", f"one of {MASK_RULES}"),
        (real(strategy.min_fit_fraction) and 0.0 <= strategy.min_fit_fraction <= 1.0, "min_fit_fraction", "in [0, 1]"),
        (whole(strategy.max_num_examples) and strategy.max_num_examples >= 1, "max_num_examples", "an int >= 1"),
        (real(strategy.max_update_norm) and strategy.max_update_norm >= 0, "max_update_norm", ">= 0 (0: no bound)"),
        (strategy.value_dtype in VALUE_DTYPES, "value_dtype", f"one of {tuple(VALUE_DTYPES)}"),
        (whole(strategy.seed), "seed", "an int"),
        (isinstance(strategy.server_optimizer, ServerOptimizer), "server_optimizer", "a ServerOptimizer or None"),
    ]  # fmt: skip
    for ok, name, expected in checks:
        if not ok:
            raise ValueError(f"{type(strategy).__name__}({name}={getattr(strategy, name)!r}): expected {expected}")
