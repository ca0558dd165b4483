"""Server mask rules (Algorithm 1, step 6): which positions the next global mask keeps,
given the sparse average of the clients' replies (run-config key `mask-rule`).

- `magnitude` (the paper's rule, `aggregation.magnitude_reprune`): per layer, the
  largest-magnitude averaged weights among the positions some client kept; ties go to
  votes, then to a random key.
- `thompson` (after FedRTS, Huang et al., NeurIPS 2025, code in FedPruning's
  `api/distributed/fedrts/`): per position a Beta posterior of "belongs in the mask",
  updated on every readjustment round from the votes (the sample-weighted share of replies
  whose mask keeps the position, mixed by `gamma` with the magnitude rule's choice); on a
  readjustment round, per layer, the round(alpha_r x count) kept positions with the lowest
  Thompson samples leave and as many positions that some client grew, with the highest
  samples, enter. The global mask changes by at most alpha_r per layer, and exploration
  anneals as the posteriors sharpen. FedRTS votes the same way but has its clients send
  gradient top-k lists; here the clients' own readjusted masks carry those votes.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from .aggregation import Votes
from .masks import Masks, top_k_mask

MASK_RULES = ("magnitude", "thompson")
THOMPSON_GAMMA = 0.5  # FedRTS's mix of the clients' votes and the aggregate's


def numpy_rng(*keys: int | str) -> np.random.Generator:
    """A numpy generator seeded from several keys (as `masks.seeded_generator`)."""
    return np.random.default_rng(random.Random(":".join(map(str, keys))).getrandbits(63))


class ThompsonRule:
    """FedRTS-style Thompson sampling over Beta posteriors (see the module docstring).

    Parameters
    ----------
    gamma : float (default: 0.5)
        Weight of the magnitude rule's choice in a position's vote; 1 - gamma goes to the
        sample-weighted share of replies that keep it.
    """

    def __init__(self, gamma: float = THOMPSON_GAMMA) -> None:
        self.gamma = gamma
        self.a: dict[str, torch.Tensor] = {}  # Beta posterior per position: prior Beta(1, 1)
        self.b: dict[str, torch.Tensor] = {}

    def update(self, votes: Votes, total_weight: float, chosen: Masks) -> None:
        """One readjustment round's evidence: v = (1 - gamma) share + gamma [chosen];
        a += v, b += 1 - v at every position of every masked layer."""
        for name, weight in votes.weight.items():
            v = (1 - self.gamma) * weight.double() / total_weight + self.gamma * chosen[name].double()
            self.a[name] = self.a.get(name, torch.ones_like(v)) + v
            self.b[name] = self.b.get(name, torch.ones_like(v)) + (1 - v)

    def select(self, old: Masks, votes: Votes, alpha_r: float, min_votes: int, rng: np.random.Generator) -> Masks:
        """The next mask on a readjustment round: per layer, n = min(round(alpha_r x count),
        kept positions, grown positions) swaps of the lowest-sampled kept positions for the
        highest-sampled positions outside `old` that at least `min_votes` clients grew."""
        masks = {}
        for name, mask in old.items():
            theta = torch.from_numpy(rng.beta(self.a[name].numpy(), self.b[name].numpy()))
            grown = ~mask & (votes.clients[name] >= min_votes)
            n = min(round(alpha_r * int(mask.sum())), int(mask.sum()), int(grown.sum()))
            generator = torch.Generator().manual_seed(int(rng.integers(2**62)))  # ties: measure zero
            leave = top_k_mask(torch.where(mask, 1 - theta, torch.tensor(-1.0, dtype=theta.dtype)), n, generator)
            enter = top_k_mask(torch.where(grown, theta, torch.tensor(-1.0, dtype=theta.dtype)), n, generator)
            masks[name] = (mask & ~leave) | enter
        return masks

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """The posteriors, for a checkpoint."""
        return {"a": self.a, "b": self.b}

    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        """Restore `state_dict()`."""
        self.a, self.b = dict(state["a"]), dict(state["b"])
