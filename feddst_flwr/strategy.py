"""The FedDST server strategy (Algorithm 1, steps 1, 2, 6 and 7) on Flower's Message API."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from . import protocol as P
from .aggregation import ClientUpdate, RoundStats, SparseSum, SparseUpdate, magnitude_reprune
from .checkpoint import Checkpoint, CheckpointError, check_shapes
from .codec import DEFAULT_VALUE_DTYPE, CodecError, HeldMask, decode_sparse, encode_masks, encode_values, with_masks
from .mask_rules import ThompsonRule, numpy_rng
from .masks import (
    Masks,
    TieKeys,
    apply_masks,
    hamming,
    layer_counts,
    random_masks,
    readjust_alpha,
    seeded_generator,
    shapes_of,
)
from .movement import MaskMovement
from .server_optimizer import ServerOptimizer
from .validation import ReplyGuard, check_strategy_arguments, outliers, update_norm


class FedDST(ReplyGuard):
    """Federated Dynamic Sparse Training (Bibikar et al., AAAI 2022).

    Parameters
    ----------
    maskable : list[str]
        State-dict names of the weight tensors to sparsify (conv/linear weights).
    sparsity : float (default: 0.8)
        Global sparsity S over the maskable weights.
    sparsity_distribution : str (default: "erk")
        Layer-wise sparsity: "erk", "er" or "uniform".
    alpha : float (default: 0.3)
        Initial readjustment ratio; alpha_r = alpha/2 (1 + cos(pi r / (r_end + delta_r))) on
        readjustment rounds. 0: fixed mask. (The paper uses 0.01-0.05; 0.3 is RigL's and our
        measured default.)
    delta_r : int (default: 5)
        Rounds between readjustments.
    r_end : int | None (default: None)
        Last round that may readjust; None: half of `num_rounds`, set when `start` runs
        (as the run config's `r-end = 0`); 0: never readjust.
    fraction_train : float (default: 1.0)
        Fraction of connected nodes sampled per round (without replacement).
    clients_per_round : int (default: 0)
        If > 0, sample exactly this many nodes instead of a fraction.
    min_train_nodes, min_available_nodes : int (default: 2)
        As in Flower's FedAvg.
    proximal_mu : float (default: 0.0)
        FedProx coefficient sent to clients as "proximal-mu".
    min_votes : int (default: 1)
        A weight kept by fewer clients than this is zero after aggregation.
    mask_rule : str (default: "magnitude")
        The server's mask rule (mask_rules.py): "magnitude" (the paper's re-prune) or
        "thompson" (FedRTS-style Beta posteriors, at most alpha_r of a layer changes per
        readjustment).
    min_fit_fraction : float (default: 0.5)
        A round is aggregated only if at least this fraction of the sampled nodes replied
        validly; otherwise it is skipped and the global model and mask are kept.
    max_num_examples : int (default: 1_000_000)
        A reply claiming more training examples than this is rejected (it would dominate
        the weighted average).
    max_update_norm : float (default: 0.0)
        A reply whose update (its values minus the global model's) has an L2 norm above
        this multiple of the median of the round's other valid replies is rejected
        (leave-one-out: with two replies, each is judged against the other); 0: no bound.
    value_dtype : str (default: "float16")
        Wire dtype of the sparse values ("float16" or "float32"), downloads and replies: a
        client answers in the dtype of the values it received.
    seed : int (default: 0)
        Seeds the initial mask, the node sampling, and the random key that breaks ties
        (after votes) in the re-prune.
    server_optimizer : ServerOptimizer | None (default: None)
        FedOpt step on the aggregated sparse pseudo-gradient; None: plain FedDST.
    """

    # pylint: disable=too-many-arguments,too-many-instance-attributes
    def __init__(
        self,
        *,
        maskable: list[str],
        sparsity: float = 0.8,
        sparsity_distribution: str = "erk",
        alpha: float = 0.3,
        delta_r: int = 5,
        r_end: int | None = None,
        fraction_train: float = 1.0,
        clients_per_round: int = 0,
        min_train_nodes: int = 2,
        min_available_nodes: int = 2,
        proximal_mu: float = 0.0,
        min_votes: int = 1,
        mask_rule: str = "magnitude",
        min_fit_fraction: float = 0.5,
        max_num_examples: int = 1_000_000,
        max_update_norm: float = 0.0,
        value_dtype: str = DEFAULT_VALUE_DTYPE,
        seed: int = 0,
        server_optimizer: ServerOptimizer | None = None,
        weighted_by_key: str = P.NUM_EXAMPLES,
        arrayrecord_key: str = P.ARRAYS,
        configrecord_key: str = P.CONFIG,
    ) -> None:
        self.maskable = list(maskable)
        self.sparsity = sparsity
        self.sparsity_distribution = sparsity_distribution
        self.alpha = alpha
        self.delta_r = delta_r
        self.r_end = r_end
        self.fraction_train = fraction_train
        self.clients_per_round = clients_per_round
        self.min_train_nodes = min_train_nodes
        self.min_available_nodes = min_available_nodes
        self.proximal_mu = proximal_mu
        self.min_votes = min_votes
        self.mask_rule = mask_rule
        self.min_fit_fraction = min_fit_fraction
        self.max_num_examples = max_num_examples
        self.max_update_norm = max_update_norm
        self.value_dtype = value_dtype
        self.seed = seed
        self.server_optimizer = server_optimizer or ServerOptimizer("none", 1.0, 0.0)
        self.weighted_by_key = weighted_by_key
        self.arrayrecord_key = arrayrecord_key
        self.configrecord_key = configrecord_key
        check_strategy_arguments(self)
        self.thompson = ThompsonRule() if mask_rule == "thompson" else None
        self.rng = random.Random(seed)
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.counts: dict[str, int] = {}
        self.masks: Masks = {}
        self.movement = MaskMovement({})  # the round-1 mask and every position ever held
        self.mask_version = 0
        self.delivered: dict[int, int] = {}  # node id -> mask version it holds
        self.versions: dict[int, Masks] = {}  # mask versions some node holds: bases of download deltas
        self.sampled: list[int] = []  # this round's nodes
        self.global_state: dict[str, torch.Tensor] = {}  # the model sent this round
        self._coded: dict[int | None, dict[str, tuple[str, tuple[int, ...], bytes]]] = {}  # of _coded_version
        self._coded_version = -1
        self.stats = RoundStats()
        self.round_timeout = 3600.0  # seconds a round waits for replies, and for missing nodes (`start` sets it)

    def summary(self) -> None:
        """Log the strategy's configuration."""
        log(
            INFO,
            "\t├──> FedDST: S=%.3f (%s), alpha=%.3f, delta-r=%d, r-end=%s, min-votes=%d, mask-rule=%s",
            self.sparsity,
            self.sparsity_distribution,
            self.alpha,
            self.delta_r,
            self.r_end,
            self.min_votes,
            self.mask_rule,
        )
        log(
            INFO,
            "\t└──> Sampling: fraction %.2f, clients-per-round %d, seed %d",
            self.fraction_train,
            self.clients_per_round,
            self.seed,
        )

    def initialize(self, arrays: ArrayRecord) -> ArrayRecord:
        """Step 1: draw the random ERK mask and prune the initial weights with it."""
        state = arrays.to_torch_state_dict()
        unknown = sorted(set(self.maskable) - set(state))
        if unknown:
            raise ValueError(f"maskable layers {unknown} are not in the initial arrays")
        self.shapes = shapes_of(state, list(state))
        maskable_shapes = shapes_of(state, self.maskable)
        self.counts = layer_counts(maskable_shapes, self.sparsity, self.sparsity_distribution)
        self.masks = random_masks(maskable_shapes, self.counts, self.seed)
        self.movement = MaskMovement(self.masks)
        self._coded_version = -1  # a new mask: no coding of it yet
        apply_masks(state, self.masks)
        return ArrayRecord(state)

    def initial_arrays(self, grid: Grid, arrays: ArrayRecord) -> ArrayRecord:
        """The round-1 global model: the initial weights pruned with a random ERK mask."""
        return self.initialize(arrays)

    # pylint: disable=too-many-locals
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        resume: Checkpoint | None = None,
    ) -> Result:
        """Flower's round loop (training, then `evaluate_fn`; FedDST has no federated
        evaluation, so evaluate_config is unused), from round 1 or after a checkpoint."""
        self.resolve_r_end(num_rounds)
        self.round_timeout = timeout
        log(INFO, "Starting %s strategy:", self.__class__.__name__)
        self.summary()
        train_config = train_config or ConfigRecord()
        if resume is None:
            arrays, first = self.initial_arrays(grid, initial_arrays), 1
            if evaluate_fn:
                evaluate_fn(0, arrays)
        else:
            self.initialize(initial_arrays)
            arrays, first = self.load_state_dict(resume.strategy, resume.arrays), resume.round + 1
            log(INFO, "Resuming after round %d (mask version %d)", resume.round, self.mask_version)
        result = Result(arrays=arrays)
        for server_round in range(first, num_rounds + 1):
            log(INFO, "[ROUND %s/%s]", server_round, num_rounds)
            messages = self.configure_train(server_round, arrays, train_config, grid)
            replies = grid.send_and_receive(messages, timeout=timeout)
            new_arrays, metrics = self.aggregate_train(server_round, replies)
            if new_arrays is not None:
                arrays = result.arrays = new_arrays
            if metrics is not None:
                result.train_metrics_clientapp[server_round] = metrics
            evaluation = evaluate_fn(server_round, arrays) if evaluate_fn else None
            if evaluation is not None:
                result.evaluate_metrics_serverapp[server_round] = evaluation
        return result

    def resolve_r_end(self, num_rounds: int) -> None:
        """r_end = None means half of the run's rounds: fix it now that they are known."""
        if self.r_end is None:
            self.r_end = num_rounds // 2

    @property
    def readjust_end(self) -> int:
        """R_end, once known (`start` sets it from num_rounds when r_end is None)."""
        if self.r_end is None:
            raise ValueError(
                f"{type(self).__name__}(r_end=None) means half of num_rounds: call start(), or "
                "resolve_r_end(num_rounds), before configure_train, or pass r_end"
            )
        return self.r_end

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs besides the global model: the mask, its version, the
        sampling RNG, the server optimizer, the explored positions and the mask rule's
        posteriors. Delivered mask versions are not kept: they
        describe the nodes' memory of this run, which a restarted run does not have."""
        return {
            "masks": self.masks,
            "initial_masks": self.movement.initial,
            "mask_version": self.mask_version,
            "rng": self.rng.getstate(),
            "optimizer": {"m": self.server_optimizer.m, "v": self.server_optimizer.v},
            "explored": self.movement.explored,
            "posterior": self.thompson.state_dict() if self.thompson else {},
        }

    def load_state_dict(self, state: dict[str, Any], arrays: dict[str, torch.Tensor]) -> ArrayRecord:
        """Restore `state_dict()` after `initialize`; returns the global model `arrays`."""
        check_shapes(state, arrays, self.shapes, self.counts, posterior=self.thompson is not None)
        self.masks, self.mask_version = state["masks"], state["mask_version"]
        self._coded_version = -1
        self.movement = MaskMovement(state["initial_masks"])
        try:
            self.rng.setstate(state["rng"])
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"checkpoint field 'strategy.rng' is not a random.Random state ({err})") from err
        self.server_optimizer.m, self.server_optimizer.v = state["optimizer"]["m"], state["optimizer"]["v"]
        self.movement.explored = state.get("explored", self.masks)  # older checkpoints: from the resumed mask on
        if self.thompson is not None:
            self.thompson.load_state_dict(state["posterior"])
        return ArrayRecord(arrays)

    def sample(self, grid: Grid) -> list[int]:
        """Step 2: sample nodes without replacement with the strategy's seeded RNG.

        A round wants `clients_per_round` nodes (else the fraction, at least min_train_nodes),
        and at least min_available_nodes connected. It waits for them at most `round_timeout`
        seconds from when they were first missing (a node lost for good costs one wait, not
        one a round); then it samples the nodes connected if at least ceil(min_fit_fraction x
        the sample size) are, and logs it.

        Raises
        ------
        RuntimeError
            Fewer nodes than that are connected: the message says how many are missing.
        """
        connected = len(list(grid.get_node_ids()))
        size = self.clients_per_round or max(int(connected * self.fraction_train), self.min_train_nodes)
        nodes = self.nodes_for_round(grid, max(size, self.min_available_nodes), size)
        return self.rng.sample(nodes, min(size, len(nodes)))  # in the grid's order (OrderedGrid: by partition-id)

    def _configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Step 2 and 7: global values for every node, the mask only for nodes that do not
        hold the current mask version (as a delta from the version a node holds, where
        that is smaller)."""
        state = self.global_state = arrays.to_torch_state_dict()
        alpha_r = readjust_alpha(server_round, self.alpha, self.delta_r, self.readjust_end)
        self.stats = RoundStats(
            mask_version=self.mask_version,
            readjust_alpha=alpha_r,
            mask_drift=self.movement.drift(self.masks),
            mask_explored=self.movement.explored_fraction(),
        )
        config = ConfigRecord(
            {
                **config,
                P.SERVER_ROUND: server_round,
                P.MASK_VERSION: self.mask_version,
                P.READJUST_ALPHA: alpha_r,
                P.PROXIMAL_MU: self.proximal_mu,
            }
        )
        values = encode_values(state, self.masks, self.value_dtype)  # every payload's, encoded once
        payloads: dict[int | None, ArrayRecord] = {}  # by the version the node holds
        messages = []
        self.sampled = self.sample(grid)
        for node_id in self.sampled:
            holds = self.delivered.get(node_id)
            send_mask = holds != self.mask_version
            if holds not in payloads:
                payloads[holds] = with_masks(values, self.coded_masks(holds)) if send_mask else values
            content = RecordDict({self.arrayrecord_key: payloads[holds], self.configrecord_key: config})
            messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node_id))
            self.stats.masks_sent += send_mask
        log(
            INFO,
            "configure_train: %d nodes, %d get the mask (version %d), alpha_r=%.4f",
            len(messages),
            self.stats.masks_sent,
            self.mask_version,
            alpha_r,
        )
        return messages

    def coded_masks(self, holds: int | None) -> dict[str, Array]:
        """The global mask coded for a node that holds mask version `holds` (None: no mask;
        a delta from a held version where that is smaller); each coding is made once per
        mask version and reused while the mask stays. The codes are kept as our own bytes and
        each call returns new Arrays: Flower may change an Array it has sent (its data becomes
        a memoryview in deployment), which a strategy's state must not hold."""
        if self._coded_version != self.mask_version:
            self._coded, self._coded_version = {}, self.mask_version
        if holds not in self._coded:
            base = HeldMask(self.versions[holds], holds) if holds in self.versions else None
            coded = encode_masks(self.masks, base)
            self._coded[holds] = {
                key: (array.stype, tuple(array.shape), bytes(array.data)) for key, array in coded.items()
            }
        return {
            key: Array(dtype="bool", shape=shape, stype=stype, data=data)
            for key, (stype, shape, data) in self._coded[holds].items()
        }

    def _aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Step 6: validate every reply, sparse weighted average, re-prune to S. A reply
        that fails validation, and a sampled node that did not reply, count as failures;
        with fewer valid replies than min-fit-fraction of the sampled nodes the round is
        skipped and the global model and mask stay as they were. Each valid reply is added
        to the round's sums as it is decoded (with max-update-norm, once every norm is known)."""
        total, receipts, held = SparseSum(self.masks), [], []
        contents, nodes, pending = [], [], set(self.sampled)
        for reply in replies:  # screened by ReplyGuard: each from a sampled node, at most once
            node_id = reply.metadata.src_node_id
            pending.discard(node_id)
            if reply.has_error():
                self._fail(node_id, f"error reply {reply.error.code}: {reply.error.reason}")
                continue
            try:
                update = self._decode_reply(reply)
            except CodecError as err:
                self._fail(node_id, str(err), refused=True)
                continue
            if self.max_update_norm > 0:
                held.append(update)  # added once every norm is known
            else:
                receipts.append(self._add(total, update))
            contents.append(reply.content)
            nodes.append(node_id)
        for node_id in sorted(pending):
            self._fail(node_id, "no reply (failed, timed out or lost)")
        if self.max_update_norm > 0:  # off by default: no norms computed, no reply held
            old = {name: tensor.numpy() for name, tensor in self.global_state.items()}
            norms = [update_norm({name: t.numpy() for name, t in u.payload.state().items()}, old) for u in held]
            for i, reason in reversed(list(enumerate(outliers(norms, self.max_update_norm)))):
                if reason is not None:
                    self._fail(nodes[i], reason, refused=True)
                    del held[i], contents[i], nodes[i]
            receipts = [self._add(total, u) for u in held]
        for node_id in nodes:
            self.delivered[node_id] = self.mask_version
        self.versions[self.mask_version] = self.masks
        self.versions = {version: self.versions[version] for version in set(self.delivered.values())}
        if len(receipts) < math.ceil(self.min_fit_fraction * len(self.sampled)) or not receipts:
            self.stats.skipped = True
            log(
                WARNING,
                "aggregate_train: round %d skipped, %d of %d sampled nodes replied validly (min-fit-fraction %.2f)",
                server_round,
                len(receipts),
                len(self.sampled),
                self.min_fit_fraction,
            )
            return None, None
        keys = TieKeys(seeded_generator(self.seed, "re-prune", server_round))
        average = total.average(self.min_votes)
        votes = average.votes()
        masks = magnitude_reprune(average, self.counts, keys, self.min_votes)
        if self.thompson is not None and self.stats.readjust_alpha > 0:
            self.thompson.update(votes, float(total.total), masks)
            rng = numpy_rng(self.seed, "thompson", server_round)
            masks = self.thompson.select(self.masks, votes, self.stats.readjust_alpha, self.min_votes, rng)
        masks = self.reconfigure(receipts, masks, keys)
        if self.movement.record(self.stats, self.masks, masks, votes, len(receipts)):
            self.mask_version += 1
        state = average.state(masks)
        del total, average, votes  # the round's sums (about a model copy) go before the model is built
        state = self.server_optimizer.step(self.global_state, state, masks, self.masks)
        self.stats.mask_version = self.mask_version
        self.masks = masks
        return ArrayRecord(state), aggregate_metricrecords(contents, self.weighted_by_key)

    def _fail(self, node_id: int, reason: str, refused: bool = False) -> None:
        """Count a failure (refused: a reply that failed validation); the node gets the
        mask again next time (its state is unknown)."""
        self.delivered.pop(node_id, None)
        self.stats.failures.append(f"node {node_id}: {reason}")
        if refused:
            self.reject(node_id, reason)
        else:
            log(WARNING, "aggregate_train: lost node %d: %s", node_id, reason)

    def reconfigure(self, updates: list[ClientUpdate], masks: Masks, generator: torch.Generator | TieKeys) -> Masks:
        """The next global mask after aggregation: FedDST keeps the re-pruned one. `updates`
        hold each reply's num_examples and gradients (its values are in the sums)."""
        return masks

    @staticmethod
    def _add(total: SparseSum, update: SparseUpdate) -> ClientUpdate:
        """Add a reply to the round's sums; what the round keeps of it."""
        total.add(update.payload, update.num_examples)
        return update.receipt()

    def _decode_reply(self, reply: Message) -> SparseUpdate:
        """Decode one reply's sparse payload (ReplyGuard has checked its records and
        metrics); CodecError names the problem."""
        content = reply.content
        num_examples = int(P.number(content.metric_records[P.METRICS], self.weighted_by_key))
        values = content.array_records[self.arrayrecord_key]
        for name in self.maskable:
            if name in values and values[name].dtype != self.value_dtype:
                raise CodecError(
                    f"layer '{name}': values of dtype '{values[name].dtype}', value-dtype is '{self.value_dtype}'"
                )
        decoded = decode_sparse(
            content.array_records[self.arrayrecord_key],
            self.shapes,
            self.maskable,
            HeldMask(self.masks, self.mask_version),
        )
        for name, mask in decoded.masks.items() if decoded.mask_sent else ():  # held: the global mask
            kept = int(torch.count_nonzero(mask))
            if kept > self.counts[name]:
                raise CodecError(
                    f"layer '{name}': mask keeps {kept} weights, sparsity {self.sparsity} allows {self.counts[name]}"
                )
        if decoded.mask_sent and self.stats.readjust_alpha == 0 and hamming(decoded.masks, self.masks):
            raise CodecError("mask differs from the global one on a round without readjustment")
        return SparseUpdate(decoded, num_examples)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedDST evaluates the global model centrally (pass `evaluate_fn` to `start`)."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """No federated evaluation (see configure_evaluate)."""
        return None
