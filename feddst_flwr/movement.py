"""How the global mask moves: the statistics every round records (metrics.md, mask-*)."""

from __future__ import annotations

import torch

from .aggregation import RoundStats, Votes
from .masks import Masks, active, difference, structure, units


class MaskMovement:
    """The global mask's history: its round-1 mask (for `mask-drift`) and every position it
    ever held (for `mask-explored`).

    Parameters
    ----------
    initial : Masks
        The round-1 global mask.
    """

    def __init__(self, initial: Masks) -> None:
        self.initial = initial
        self.explored = dict(initial)

    def drift(self, masks: Masks) -> float:
        """Fraction of the initial mask's positions that are not in `masks`."""
        return active(difference(self.initial, masks)) / max(active(self.initial), 1)

    def explored_fraction(self) -> float:
        """R_s (Liu et al. 2021): the fraction of maskable positions ever in the global mask."""
        return active(self.explored) / max(sum(mask.numel() for mask in self.explored.values()), 1)

    def record(self, stats: RoundStats, old: Masks, new: Masks, votes: Votes, num_updates: int) -> bool:
        """Fill `stats` with the movement from `old` to `new` (and, on readjustment rounds,
        `new`'s structure and the share of leavers some client still held); returns whether
        any position entered (the mask then needs a new version)."""
        entered, left = difference(new, old), difference(old, new)
        stats.mask_entered = active(entered)
        stats.mask_entered_units = units(entered)
        stats.mask_drift = self.drift(new)
        self.explored = {name: self.explored[name] | mask for name, mask in new.items()}
        stats.mask_explored = self.explored_fraction()
        if stats.readjust_alpha > 0:
            stats.mask_structure = {name: structure(mask) for name, mask in new.items()}
            held = sum(int((votes.clients[name][mask] > 0).sum()) for name, mask in left.items())
            stats.mask_leavers_held = held / max(active(left), 1)
        if stats.mask_entered:
            holders = torch.cat([votes.clients[name][mask] for name, mask in entered.items()])
            stats.mask_votes = torch.bincount(holders, minlength=num_updates + 1).tolist()
        return stats.mask_entered > 0
