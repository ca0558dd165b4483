"""Server aggregation (Algorithm 1, step 6): sparse weighted average, then re-prune to S."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .masks import Masks, apply_masks, magnitude_prune


@dataclass
class ClientUpdate:
    """One client's decoded reply: dense tensors (pruned weights zero), its masks, n_c, and
    (PruneFL reconfiguration rounds) its dense squared gradients."""

    state: dict[str, torch.Tensor]
    masks: Masks
    num_examples: int
    gradients: dict[str, torch.Tensor] | None = None


@dataclass
class Votes:
    """Per masked layer, who kept each position: the number of clients, and their summed
    num_examples (the weights of the average)."""

    clients: dict[str, torch.Tensor]
    weight: dict[str, torch.Tensor]


@dataclass
class RoundStats:
    """What the last aggregation did to the global mask."""

    mask_version: int = 0
    readjust_alpha: float = 0.0
    mask_entered: int = 0  # positions that entered the global mask (a swap counts once)
    mask_entered_units: int = 0  # distinct output units (rows / output channels) they fall in
    mask_drift: float = 0.0  # fraction of the initial mask's positions no longer in the mask
    mask_explored: float = 0.0  # R_s: fraction of maskable positions ever in the global mask
    mask_leavers_held: float = 0.0  # share of the positions leaving the mask that some client still kept
    mask_structure: dict[str, dict[str, float | int]] = field(default_factory=dict)  # readjust rounds: per layer
    mask_votes: list[int] = field(default_factory=list)  # entering positions with 0, 1, 2, ... client votes
    masks_sent: int = 0  # nodes that got the mask (in full or as a delta) in this round's download
    failures: list[str] = field(default_factory=list)  # "node N: reason" per failed, refused or missing reply
    skipped: bool = False  # too few valid replies: the global model and mask were kept


def sparse_average(updates: list[ClientUpdate], min_votes: int = 1) -> tuple[dict[str, torch.Tensor], Votes]:
    """Average every tensor weighted by num_examples; a masked weight is averaged only over
    the clients that kept it, and is zero when fewer than min_votes clients kept it.
    Returns the averaged state and the votes of every masked position."""
    if not updates:
        raise ValueError("sparse_average needs at least one client update")
    total = float(sum(u.num_examples for u in updates))
    state, votes = {}, Votes({}, {})
    for name in updates[0].state:
        if name not in updates[0].masks:
            weighted = torch.zeros(updates[0].state[name].shape, dtype=torch.float64)
            for u in updates:  # in client order, as sum() adds
                weighted += u.num_examples * u.state[name].double()
            state[name] = (weighted / total).float()
            continue
        shape = updates[0].state[name].shape
        numerator = torch.zeros(shape.numel(), dtype=torch.float64)
        weight, clients = torch.zeros_like(numerator), torch.zeros(shape.numel(), dtype=torch.int64)
        for u in updates:  # accumulate each client's kept positions only (sparse, no stacked copies)
            kept = u.masks[name].flatten().nonzero().squeeze(1)
            numerator.index_add_(0, kept, u.state[name].flatten()[kept].double(), alpha=u.num_examples)
            weight.index_add_(0, kept, torch.full((len(kept),), float(u.num_examples), dtype=torch.float64))
            clients.index_add_(0, kept, torch.ones(len(kept), dtype=torch.int64))
        votes.weight[name], votes.clients[name] = weight.view(shape), clients.view(shape)
        average = numerator.view(shape) / votes.weight[name].clamp_min(1e-300)
        state[name] = torch.where(votes.clients[name] >= min_votes, average, torch.zeros_like(average)).float()
    return state, votes


def magnitude_reprune(
    state: dict[str, torch.Tensor], votes: Votes, counts: dict[str, int], generator: torch.Generator, min_votes: int = 1
) -> Masks:
    """The paper's server mask rule: per layer the counts[name] largest |averaged weight|
    among the positions at least min_votes clients kept; ties go to the larger
    sample-weighted vote, then to a random key from `generator`."""
    candidates = {name: clients >= min_votes for name, clients in votes.clients.items()}
    return magnitude_prune(state, candidates, counts, generator, votes.weight)


def aggregate(
    updates: list[ClientUpdate], counts: dict[str, int], generator: torch.Generator, min_votes: int = 1
) -> tuple[dict[str, torch.Tensor], Masks, Votes]:
    """theta^{r+1}, m^{r+1}: sparse average, then `magnitude_reprune`. Also returns the votes."""
    state, votes = sparse_average(updates, min_votes)
    masks = magnitude_reprune(state, votes, counts, generator, min_votes)
    apply_masks(state, masks)
    return state, masks, votes
