"""Test fakes shared by the test files: a narrow DigitsCNN, a Grid that hands messages to
in-process nodes, a FedDST federation of such nodes, and the server side of one exchange."""

from __future__ import annotations

import torch
from conftest import erk_masks, random_data
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, RecordDict

from client_app import trainer
from feddst_flwr import protocol as P
from feddst_flwr.client import MissingMaskError, client_round
from feddst_flwr.codec import HeldMask, carries_mask, decode, encode
from feddst_flwr.masks import apply_masks, maskable_names
from feddst_flwr.models import DigitsCNN
from feddst_flwr.strategy import FedDST

WIDTH = 8  # a narrow DigitsCNN keeps local training fast


def new_model() -> DigitsCNN:
    torch.manual_seed(0)
    return DigitsCNN(width=WIDTH)


MASKABLE = maskable_names(new_model())
SHAPES = {name: tuple(t.shape) for name, t in new_model().state_dict().items()}


class FakeGrid:
    """get_node_ids for sampling; send_and_receive hands messages to a responder."""

    def __init__(self, node_ids, responder=None) -> None:
        self.node_ids = list(node_ids)
        self.responder = responder

    def get_node_ids(self):
        return list(self.node_ids)

    def send_and_receive(self, messages, *, timeout=None):
        return [self.responder(message) for message in messages]


def run_client(model, data, arrays, config, cfg, node_state, partition_id: int):
    """client_round with the run config's masked SGD on `data`."""
    return client_round(model, arrays, config, node_state, trainer(cfg, data, partition_id))


def make_strategy(**overrides) -> FedDST:
    options = {"sparsity": 0.8, "alpha": 0.2, "delta_r": 2, "r_end": 10, "clients_per_round": 3, "seed": 0}
    return FedDST(maskable=MASKABLE, **{**options, **overrides})


class Federation:
    """A FedDST strategy plus in-process nodes that each keep a Context state."""

    def __init__(self, cfg, strategy: FedDST | None = None, node_ids=(1, 2, 3), same_data: bool = True) -> None:
        self.cfg = cfg
        self.strategy = strategy or make_strategy(clients_per_round=len(node_ids))
        self.grid = FakeGrid(node_ids, self.reply)
        self.states = {node: RecordDict() for node in node_ids}
        self.data = {node: random_data(16, seed=0 if same_data else node) for node in node_ids}
        self.arrays = self.strategy.initialize(ArrayRecord(new_model().state_dict()))

    def configure(self, server_round: int) -> list[Message]:
        return list(self.strategy.configure_train(server_round, self.arrays, ConfigRecord(), self.grid))

    def reply(self, message: Message) -> Message:
        node, content = message.metadata.dst_node_id, message.content
        arrays, config = content["arrays"], content["config"]
        try:
            result = run_client(new_model(), self.data[node], arrays, config, self.cfg, self.states[node], node)
        except MissingMaskError as err:
            return Message(Error(code=P.MISSING_MASK_CODE, reason=str(err)), reply_to=message)
        return Message(RecordDict({"arrays": result.arrays, "metrics": result.metrics}), reply_to=message)

    def aggregate(self, server_round: int, replies: list[Message]):
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays is not None:
            self.arrays = arrays
        return arrays, metrics

    def round(self, server_round: int) -> list[Message]:
        """One full round; returns the messages the server sent."""
        messages = self.configure(server_round)
        self.aggregate(server_round, [self.reply(m) for m in messages])
        return messages


def mask_flags(messages: list[Message]) -> dict[int, bool]:
    return {m.metadata.dst_node_id: carries_mask(m.content["arrays"]) for m in messages}


class Server:
    """The server side of one exchange: a masked global model and its payloads."""

    def __init__(self, model: torch.nn.Module, seed: int = 0) -> None:
        self.masks, self.counts = erk_masks(model, 0.8, seed)
        # values a float16 payload carries exactly, so that what a client receives equals `state`
        self.state = {
            name: t.half().float() if t.is_floating_point() else t.clone() for name, t in model.state_dict().items()
        }
        apply_masks(self.state, self.masks)
        self.reference = {name: tuple(t.shape) for name, t in self.state.items()}
        self.maskable = maskable_names(model)

    def payload(self, send_mask: bool) -> ArrayRecord:
        return encode(self.state, self.masks, send_mask)

    def decode(self, reply: ArrayRecord, version: int = 0):
        """Decode a reply as the server does: it holds its mask, of `version`."""
        return decode(reply, self.reference, self.maskable, HeldMask(self.masks, version))

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: self.reference[name] for name in self.maskable}


def round_config(server_round: int = 1, version: int = 0, alpha: float = 0.0, mu: float = 0.0) -> ConfigRecord:
    return ConfigRecord(
        {"server-round": server_round, "mask-version": version, "readjust-alpha": alpha, "proximal-mu": mu}
    )
