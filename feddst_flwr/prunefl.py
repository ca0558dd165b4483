"""PruneFL (Jiang et al. 2022) as the FedDST paper compares it: FedDST's sparse round with a
server that reconfigures the mask from the clients' dense squared gradients."""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from . import protocol as P
from .aggregation import ClientUpdate, SparseUpdate
from .codec import CodecError, decode, decode_dense
from .masks import Masks, TieKeys, apply_masks, magnitude_prune, seeded_generator
from .movement import MaskMovement
from .strategy import FedDST
from .validation import Instruction, check_reply


class PruneFL(FedDST):
    """PruneFL (Jiang et al. 2022) as the FedDST paper compares it: the initial mask is one
    client's locally trained model pruned by magnitude to the ERK counts; clients never
    readjust (alpha = 0), but every delta_r rounds up to r_end they also upload their dense
    squared gradients (counted in full), and the server keeps, per layer, the weights of
    highest sample-weighted importance; weights that enter the mask start at zero."""

    asks_gradients = False  # this round is a reconfiguration round

    def initial_arrays(self, grid: Grid, arrays: ArrayRecord) -> ArrayRecord:
        """The round-1 global model: one client's pruning of the initial weights."""
        self.initialize(arrays)
        return self.prune_on_one_client(grid, arrays)

    def prune_on_one_client(self, grid: Grid, arrays: ArrayRecord) -> ArrayRecord:
        """Train the dense initial model on the first node (grid order), prune it by magnitude."""
        _, nodes = sample_nodes(grid, self.min_available_nodes, 1)
        content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: ConfigRecord({P.SERVER_ROUND: 0})})
        message = Message(content, dst_node_id=nodes[0], message_type=MessageType.TRAIN)
        (reply,) = grid.send_and_receive([message])
        try:
            if reply.has_error():
                raise CodecError(f"error reply {reply.error.code}: {reply.error.reason}")
            check_reply(reply, Instruction.of(message), self.max_num_examples)
        except CodecError as err:
            raise RuntimeError(f"PruneFL's initial pruning failed on node {nodes[0]}: {err}") from err
        state = decode(reply.content.array_records[self.arrayrecord_key], self.shapes, [], None).state
        self.masks = magnitude_prune(state, None, self.counts, seeded_generator(self.seed, "prunefl"))
        self.movement = MaskMovement(self.masks)
        apply_masks(state, self.masks)
        return ArrayRecord(state)

    def _configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Ask for dense squared gradients on reconfiguration rounds."""
        self.asks_gradients = server_round <= self.readjust_end and server_round % self.delta_r == 0
        config = ConfigRecord({**config, P.UPLOAD_GRADIENTS: int(self.asks_gradients)})
        return super()._configure_train(server_round, arrays, config, grid)

    def reconfigure(self, updates: list[ClientUpdate], masks: Masks, generator: torch.Generator | TieKeys) -> Masks:
        """On reconfiguration rounds, the top importance sum(n_c g_c^2) / sum(n_c) per layer."""
        reporting = [(u.num_examples, u.gradients) for u in updates if u.gradients is not None]
        if not reporting:
            return masks
        total = sum(n for n, _ in reporting)
        importance = {name: cast(torch.Tensor, sum(n * g[name] for n, g in reporting)) / total for name in masks}
        return magnitude_prune(importance, None, self.counts, generator)

    def _decode_reply(self, reply: Message) -> SparseUpdate:
        """FedDST's validation, plus the dense gradients on reconfiguration rounds."""
        update = super()._decode_reply(reply)
        if self.asks_gradients:
            record = reply.content.array_records[P.GRADIENTS]
            if set(record) != set(self.maskable):
                raise CodecError(f"gradients cover {sorted(record)}, expected {sorted(self.maskable)}")
            update.gradients = {name: decode_dense(name, record[name], self.shapes[name]) for name in self.maskable}
        return update
