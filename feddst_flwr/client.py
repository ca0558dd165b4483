"""One client round (Algorithm 1, steps 3-5): decode the download, local training under
the mask (readjusting it on readjust rounds), encode the upload. Dense payloads
(baselines) take the same path without masks. `train_reply` is the public entry point
for any ClientApp: its model, its TrainFn (`training.masked_sgd` or its own)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from logging import ERROR

import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.common import log

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
from .masks import Masks, active, all_finite, difference, hamming, maskable_names, masks_to, shapes_of
from .training import LocalResult, LocalRound, TrainFn
from .validation import check_number

MASK_STATE_KEY = "feddst-mask"  # Context.state: the global mask this node holds
VERSION_STATE_KEY = "feddst-mask-version"


class MissingMaskError(RuntimeError):
    """The server sent values for a mask version this node does not hold."""


class TrainFnError(ValueError):
    """The node's train function broke the TrainFn contract (see `training.TrainFn`);
    `train_reply` answers with an error reply of code `code` and this message."""

    code = P.TRAIN_CONTRACT_CODE


class TrainingDivergedError(TrainFnError):
    """The node's train function returned non-finite weights, gradients or loss."""

    code = P.TRAIN_DIVERGED_CODE


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
    version = int(P.number(state.config_records[VERSION_STATE_KEY], "version"))
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
    version = int(P.number(round_config, P.MASK_VERSION))
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


def injected_failure(rate: float, seed: int, round_config: ConfigRecord, partition_id: int) -> bool:
    """Whether this node fails this round on purpose (client-failure-rate, for fault tests);
    drawn from (seed, round, partition-id), so a run's failures are reproducible."""
    if rate == 0:
        return False
    return random.Random(f"{seed}:{int(P.number(round_config, P.SERVER_ROUND))}:{partition_id}").random() < rate


def client_round(
    model: torch.nn.Module,
    arrays: ArrayRecord,
    round_config: ConfigRecord,
    node_state: RecordDict,
    train_fn: TrainFn,
) -> ClientResult:
    """Run one training round on a node and build its reply: `arrays` and `round_config`
    are the server's message, `node_state` the node's Context state (it keeps the mask),
    `train_fn` the local training (`training.masked_sgd`, or the user's own), whose result
    is checked against the TrainFn contract (a TrainFnError, or TrainingDivergedError, says
    how it broke it). A sparse reply's values take the dtype of the values the server sent
    (its `value_dtype`)."""
    state, masks = receive(model, arrays, round_config, node_state)
    model.load_state_dict(state)
    local = LocalRound(
        server_round=int(P.number(round_config, P.SERVER_ROUND)),
        masks=masks,
        alpha_r=float(P.number(round_config, P.READJUST_ALPHA)) if masks is not None else 0.0,
        proximal_mu=float(P.number(round_config, P.PROXIMAL_MU)),
        upload_gradients=bool(P.number(round_config, P.UPLOAD_GRADIENTS)),
    )
    result = train_fn(model, local)
    weights = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    check_weights(weights, state)
    check_result(result)
    local_masks = checked_masks(result, local, weights)
    gradients = checked_gradients(result, local, weights)
    entered, reply = 0, ArrayRecord(weights)
    if masks is not None and local_masks is not None:  # a sparse round (checked_masks: masks for masks)
        entered = active(difference(local_masks, masks))
        sent = HeldMask(masks, int(P.number(round_config, P.MASK_VERSION)))  # the server holds it too
        reply = encode(weights, local_masks, entered > 0, arrays[next(iter(masks))].dtype, sent)
    metrics = MetricRecord(
        {
            P.NUM_EXAMPLES: result.num_examples,
            P.TRAIN_LOSS: result.loss,
            P.MASK_ENTERED: entered,
            P.UPLOAD_BYTES: payload_bytes(reply) + (payload_bytes(gradients) if gradients is not None else 0),
            P.DOWNLOAD_BYTES: payload_bytes(arrays),
            **{key: int(P.number(round_config, key)) for key in P.ECHOED if key in round_config},  # what it answers
        }
    )
    return ClientResult(reply, metrics, gradients)


def check_weights(weights: dict[str, torch.Tensor], sent: dict[str, torch.Tensor]) -> None:
    """The model a TrainFn trained: finite (else TrainingDivergedError), with the names,
    dtypes and shapes of the model the server sent (else TrainFnError), naming the weight."""
    for name, tensor in weights.items():
        if tensor.is_floating_point() and not all_finite(tensor):
            raise TrainingDivergedError(f"train_fn returned non-finite weights in '{name}': training diverged")
    if list(weights) != list(sent):
        raise TrainFnError(f"train_fn changed the model's weights from {list(sent)} to {list(weights)}")
    for name, tensor in weights.items():
        if tensor.dtype != sent[name].dtype or tensor.shape != sent[name].shape:
            raise TrainFnError(
                f"train_fn changed '{name}' to {tensor.dtype} of shape {tuple(tensor.shape)}; "
                f"the server sent {sent[name].dtype} of shape {tuple(sent[name].shape)}"
            )


def check_result(result: object) -> None:
    """A TrainFn's return value: a LocalResult whose `num_examples` is an int >= 1 and whose
    `loss` is a float >= 0, finite (else TrainingDivergedError)."""
    if not isinstance(result, LocalResult):
        raise TrainFnError(f"train_fn returned {type(result).__name__}, not a LocalResult")
    loss = result.loss
    if isinstance(loss, float) and not math.isfinite(loss):
        raise TrainingDivergedError(f"train_fn returned a non-finite loss ({loss}): training diverged")
    try:
        check_number("train_fn's LocalResult", "num_examples", result.num_examples, int, 1, None)
        check_number("train_fn's LocalResult", "loss", loss, float, 0.0, None)
    except CodecError as err:
        raise TrainFnError(str(err)) from err


def checked_masks(result: LocalResult, local: LocalRound, weights: dict[str, torch.Tensor]) -> Masks | None:
    """The mask the node trained under (on the CPU), checked against the TrainFn contract:
    the layers and per-layer counts of the mask sent, moved only on a readjust round, no
    weight left outside it. A violation is a TrainFnError naming the layer."""
    if local.masks is None:
        return None
    returned = result.masks
    if returned is not None and not (
        isinstance(returned, dict) and all(isinstance(mask, torch.Tensor) for mask in returned.values())
    ):
        raise TrainFnError(f"train_fn returned masks of type {type(returned).__name__}, not a dict of bool tensors")
    masks = local.masks if returned is None else masks_to(returned, "cpu")
    if set(masks) != set(local.masks):
        raise TrainFnError(
            f"train_fn returned masks for {sorted(masks)}, the server's mask covers {sorted(local.masks)}"
        )
    for name, mask in masks.items():
        sent = local.masks[name]
        if mask.dtype != torch.bool or mask.shape != sent.shape or int(mask.sum()) != int(sent.sum()):
            raise TrainFnError(
                f"train_fn's mask of '{name}' must be bool of shape {tuple(sent.shape)} with {int(sent.sum())} "
                "active weights, like the server's (readjustment regrows as many as it prunes)"
            )
    if local.alpha_r == 0 and hamming(masks, local.masks):
        raise TrainFnError("train_fn moved the mask on a round without readjustment (alpha_r = 0)")
    for name, mask in masks.items():
        outside = int(torch.count_nonzero(weights[name][~mask]))
        if outside:
            raise TrainFnError(
                f"train_fn left {outside} nonzero weights outside the mask in '{name}' "
                "(multiply the gradients by the mask, or re-apply it after each step)"
            )
    return local.masks if local.alpha_r == 0 else masks


def checked_gradients(result: LocalResult, local: LocalRound, weights: dict[str, torch.Tensor]) -> ArrayRecord | None:
    """PruneFL's squared gradients, when the server asked for them: one finite tensor of its
    weight's shape per masked layer (else TrainFnError, or TrainingDivergedError)."""
    if not local.upload_gradients:
        return None
    expected = sorted(local.masks or {})
    gradients = result.gradients
    if not isinstance(gradients, dict) or sorted(gradients) != expected:
        raise TrainFnError(f"the server asked for gradients of {expected} (PruneFL); train_fn returned none or others")
    for name, gradient in gradients.items():
        if not isinstance(gradient, torch.Tensor) or gradient.shape != weights[name].shape:
            shape = tuple(gradient.shape) if isinstance(gradient, torch.Tensor) else type(gradient).__name__
            raise TrainFnError(
                f"train_fn's gradient of '{name}' is {shape}, not a tensor of shape {tuple(weights[name].shape)}"
            )
        if not all_finite(gradient):
            raise TrainingDivergedError(f"train_fn returned non-finite gradients of '{name}': training diverged")
    return ArrayRecord(torch_state_dict={name: gradients[name].detach().cpu() for name in local.masks or {}})


def train_reply(
    msg: Message,
    node_state: RecordDict,
    model: torch.nn.Module,
    train_fn: TrainFn,
) -> Message:
    """A ClientApp's whole train handler: decode the server's message (FedDST's sparse
    payload or a baseline's dense one) into `model`, run `train_fn`, and reply with the
    encoded update and its metrics. A message that fails validation, values for a mask
    this node does not hold, and a `train_fn` that breaks its contract or diverges (NaN or
    inf weights, gradients or loss) get an error reply that says why, with its own code
    (`protocol.py`); nothing `train_reply` checks escapes as an exception.

    Parameters
    ----------
    msg : Message
        The server's train message (records "arrays" and "config").
    node_state : RecordDict
        The node's `context.state`, where the mask is kept between rounds.
    model : torch.nn.Module
        A fresh model of the run's architecture; the message's weights are loaded into it.
    train_fn : TrainFn
        Local training, `train_fn(model, local) -> LocalResult`: `training.masked_sgd`, or
        the user's own (it must keep pruned weights at zero and return a mask of the same
        counts; see `LocalRound` and `LocalResult`).

    Returns
    -------
    Message
        The reply: the update (sparse values and, when it changed, the mask, in the dtype of
        the values received) and its metrics, or an error reply that says why (code
        `BAD_MESSAGE_CODE`, `MISSING_MASK_CODE`, `TRAIN_CONTRACT_CODE` or `TRAIN_DIVERGED_CODE`).
    """
    if P.ARRAYS not in msg.content.array_records or P.CONFIG not in msg.content.config_records:
        return bad_message(msg, "it lacks the 'arrays' or the 'config' record")
    try:
        content = msg.content
        result = client_round(
            model, content.array_records[P.ARRAYS], content.config_records[P.CONFIG], node_state, train_fn
        )
    except MissingMaskError as err:
        return Message(Error(code=P.MISSING_MASK_CODE, reason=str(err)), reply_to=msg)
    except CodecError as err:
        return bad_message(msg, str(err))
    except TrainFnError as err:
        log(ERROR, "the train function failed its round: %s", err)
        return Message(Error(code=err.code, reason=str(err)), reply_to=msg)
    return Message(result.content(), reply_to=msg)


def bad_message(msg: Message, problem: str) -> Message:
    """Log and answer a server message that failed validation."""
    log(ERROR, "rejected the server's message: %s", problem)
    return Message(Error(code=P.BAD_MESSAGE_CODE, reason=f"rejected the server's message: {problem}"), reply_to=msg)
