"""FedDST (Bibikar et al., AAAI 2022) for Flower: the strategy for a ServerApp, and one
train handler for a ClientApp with its own model and train function."""

from .client import train_reply
from .masks import apply_masks, prune_and_regrow
from .prunefl import PruneFL
from .strategy import FedDST
from .training import LocalResult, LocalRound, TrainFn, masked_sgd

__all__ = [
    "FedDST",
    "LocalResult",
    "LocalRound",
    "PruneFL",
    "TrainFn",
    "apply_masks",
    "masked_sgd",
    "prune_and_regrow",
    "train_reply",
]
