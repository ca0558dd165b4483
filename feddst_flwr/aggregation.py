"""Server aggregation (Algorithm 1, step 6): sparse weighted average, then re-prune to S."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .masks import Masks, apply_masks, magnitude_prune


@dataclass
class ClientUpdate:
    """One client's decoded reply: dense tensors (pruned weights zero), its masks, n_c."""

    state: dict[str, torch.Tensor]
    masks: Masks
    num_examples: int


def sparse_average(updates: list[ClientUpdate], min_votes: int = 1) -> tuple[dict[str, torch.Tensor], Masks]:
    """Average every tensor weighted by num_examples; a masked weight is averaged only over
    the clients that kept it, and is zero when fewer than min_votes clients kept it.
    Returns the averaged state and, per masked layer, the positions that got enough votes."""
    if not updates:
        raise ValueError("sparse_average needs at least one client update")
    weights = [float(u.num_examples) for u in updates]
    state, voted = {}, {}
    for name in updates[0].state:
        stacked = torch.stack([u.state[name].double() for u in updates])
        if name not in updates[0].masks:
            state[name] = (_weighted(stacked, weights).sum(0) / sum(weights)).float()
            continue
        kept = torch.stack([u.masks[name] for u in updates])
        numerator = _weighted(stacked * kept, weights).sum(0)
        denominator = _weighted(kept.double(), weights).sum(0)
        voted[name] = kept.sum(0) >= min_votes
        average = torch.where(voted[name], numerator / denominator.clamp_min(1e-300), torch.zeros_like(numerator))
        state[name] = average.float()
    return state, voted


def aggregate(
    updates: list[ClientUpdate], counts: dict[str, int], min_votes: int = 1
) -> tuple[dict[str, torch.Tensor], Masks]:
    """theta^{r+1}, m^{r+1}: sparse average, then per-layer magnitude prune to the counts."""
    state, voted = sparse_average(updates, min_votes)
    masks = magnitude_prune(state, voted, counts)
    apply_masks(state, masks)
    return state, masks


def _weighted(stacked: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """Multiply each client's slice by its weight."""
    return stacked * torch.tensor(weights, dtype=torch.float64).view(-1, *[1] * (stacked.dim() - 1))
