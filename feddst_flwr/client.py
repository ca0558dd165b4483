"""One client round (Algorithm 1, steps 3-5): decode the download, masked local training,
readjustment on readjust rounds, encode the upload. Dense payloads (baselines) take the
same path without masks."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from . import protocol as P
from .codec import (
    CodecError,
    HeldMask,
    carries_mask,
    decode,
    encode,
    is_sparse,
    masks_from_record,
    masks_to_record,
    payload_bytes,
)
from .config import ExperimentConfig
from .data import TensorData
from .masks import Masks, active, difference, maskable_names, seeded_generator, shapes_of
from .training import Readjustment, dense_gradients, readjust_epoch, resolve_device, train
from .validation import check_number

MASK_STATE_KEY = "feddst-mask"  # Context.state: the global mask this node holds
VERSION_STATE_KEY = "feddst-mask-version"


class MissingMaskError(RuntimeError):
    """The server sent values for a mask version this node does not hold."""


@dataclass
class ClientResult:
    """A node's reply: the (sparse) weights, metrics, and PruneFL's gradients when asked."""

    arrays: ArrayRecord
    metrics: MetricRecord
    gradients: ArrayRecord | None = None

    def content(self) -> RecordDict:
        extra = {P.GRADIENTS: self.gradients} if self.gradients is not None else {}
        return RecordDict({P.ARRAYS: self.arrays, **extra, P.METRICS: self.metrics})


def held_mask(state: RecordDict, shapes: dict[str, tuple[int, ...]]) -> HeldMask | None:
    """The mask (and its version) stored in the node's Context state, if any."""
    if MASK_STATE_KEY not in state.array_records:
        return None
    version = int(state.config_records[VERSION_STATE_KEY]["version"])
    return HeldMask(masks_from_record(state.array_records[MASK_STATE_KEY], shapes), version)


def store_masks(state: RecordDict, masks: Masks, version: int) -> None:
    """Keep the global mask and its version in the node's Context state."""
    state.array_records[MASK_STATE_KEY] = masks_to_record(masks)
    state.config_records[VERSION_STATE_KEY] = ConfigRecord({"version": version})


def check_config(round_config: ConfigRecord, sparse: bool) -> None:
    """Validate the server's round config; CodecError names the bad key."""
    required = {P.SERVER_ROUND: (int, 0, None)} | ({P.MASK_VERSION: (int, 0, None)} if sparse else {})
    optional = {P.READJUST_ALPHA: (float, 0.0, 1.0), P.PROXIMAL_MU: (float, 0.0, None), P.UPLOAD_GRADIENTS: (int, 0, 1)}
    missing = sorted(set(required) - set(round_config))
    if missing:
        raise CodecError(f"server config lacks '{missing[0]}'")
    for key, bounds in {**required, **optional}.items():
        if key in round_config:
            check_number("server config", key, round_config[key], *bounds)


def receive(
    model: torch.nn.Module, arrays: ArrayRecord, round_config: ConfigRecord, node_state: RecordDict
) -> tuple[dict[str, torch.Tensor], Masks | None]:
    """Decode the server's payload (dense for baselines); a sparse one is decoded with the
    mask it carries (in full, or as a delta from the mask the node holds), which the node
    then keeps, or with the mask the node holds."""
    initial = model.state_dict()
    reference = shapes_of(initial, list(initial))
    check_config(round_config, is_sparse(arrays))
    if not is_sparse(arrays):
        return decode(arrays, reference, [], None).state, None
    maskable = maskable_names(model)
    version = int(round_config[P.MASK_VERSION])
    held = held_mask(node_state, shapes_of(initial, maskable))
    if not carries_mask(arrays) and (held is None or held.version != version):
        raise MissingMaskError(
            f"{P.MISSING_MASK}: the server sent values for mask version {version} without its mask "
            "and this node does not hold that version; it will get the mask next round"
        )
    decoded = decode(arrays, reference, maskable, held)
    if decoded.mask_sent:
        store_masks(node_state, decoded.masks, version)
    return decoded.state, decoded.masks


def on(masks: Masks | None, device: torch.device) -> Masks | None:
    """The masks on `device` (None stays None)."""
    return None if masks is None else {name: mask.to(device) for name, mask in masks.items()}


def injected_failure(cfg: ExperimentConfig, round_config: ConfigRecord, partition_id: int) -> bool:
    """Whether this node fails this round on purpose (client-failure-rate, for fault tests);
    drawn from (seed, round, partition-id), so a run's failures are reproducible."""
    if cfg.client_failure_rate == 0:
        return False
    draw = random.Random(f"{cfg.seed}:{round_config.get(P.SERVER_ROUND, 0)}:{partition_id}").random()
    return draw < cfg.client_failure_rate


def client_round(
    model: torch.nn.Module,
    data: TensorData,
    arrays: ArrayRecord,
    round_config: ConfigRecord,
    cfg: ExperimentConfig,
    node_state: RecordDict,
    partition_id: int,
) -> ClientResult:
    """Run one training round on a node and build its reply: `arrays` and `round_config`
    are the server's message, `cfg` the run config, `node_state` the node's Context state
    (it keeps the mask). The node's data order and tie-breaking draw from (seed, round,
    partition-id): clients of one round differ."""
    state, masks = receive(model, arrays, round_config, node_state)
    device = resolve_device(cfg.device)
    model.to(device).load_state_dict(state)
    data = data.to(device)

    generator = seeded_generator(cfg.seed, int(round_config[P.SERVER_ROUND]), partition_id)
    alpha_r = float(round_config.get(P.READJUST_ALPHA, 0.0))
    readjust = (
        Readjustment(alpha_r, readjust_epoch(cfg.readjust_at, cfg.local_epochs), cfg.grow_batches)
        if masks is not None and alpha_r > 0
        else None
    )
    local = train(
        model, data, on(masks, device),
        epochs=cfg.local_epochs, batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum,
        weight_decay=cfg.weight_decay, proximal_mu=float(round_config.get(P.PROXIMAL_MU, 0.0)), generator=generator,
        readjust=readjust,
    )  # fmt: skip
    local_masks = on(local.masks, torch.device("cpu"))
    entered = active(difference(local_masks, masks)) if masks is not None else 0

    weights = model.state_dict()
    weights = {name: tensor.cpu() for name, tensor in weights.items()}
    sent = HeldMask(masks, int(round_config[P.MASK_VERSION])) if masks is not None else None  # the server holds it too
    reply = (
        encode(weights, local_masks, entered > 0, cfg.value_dtype, sent) if sent is not None else ArrayRecord(weights)
    )
    gradients = None
    if int(round_config.get(P.UPLOAD_GRADIENTS, 0)):  # PruneFL reconfiguration round
        names = maskable_names(model)
        squared = dense_gradients(model, data, names, cfg.grow_batches, cfg.batch_size, generator, squared=True)
        gradients = ArrayRecord({name: tensor.cpu() for name, tensor in squared.items()})
    metrics = MetricRecord(
        {
            P.NUM_EXAMPLES: len(data),
            P.TRAIN_LOSS: local.loss,
            P.MASK_ENTERED: entered,
            P.UPLOAD_BYTES: payload_bytes(reply) + (payload_bytes(gradients) if gradients is not None else 0),
            P.DOWNLOAD_BYTES: payload_bytes(arrays),
            **{key: round_config[key] for key in P.ECHOED if key in round_config},  # what this reply answers
        }
    )
    return ClientResult(reply, metrics, gradients)
