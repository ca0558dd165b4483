"""Server aggregation (Algorithm 1, step 6): sparse weighted average, then re-prune to S.

Replies are summed one at a time, as they are decoded (`SparseSum`): no reply is made
dense and none is held. Per masked layer the sums live at the positions of the global
mask the replies were sent under (a reply that kept it adds its values there in one
contiguous pass); a reply that moved its mask also adds to sums over the whole layer.
Every position's sum is float64, in client order, as adding the dense replies one after
the other would give; the average keeps only the positions some client kept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from .codec import Sparse
from .masks import Masks, TieKeys, positions, tie_keys, top_k_among


@dataclass
class ClientUpdate:
    """One client's decoded reply: dense tensors (pruned weights zero), its masks, n_c, and
    (PruneFL reconfiguration rounds) its dense squared gradients. Once the strategy has
    added a reply to the round's `SparseSum`, it keeps only n_c and the gradients (state
    and masks empty)."""

    state: dict[str, torch.Tensor]
    masks: Masks
    num_examples: int
    gradients: dict[str, torch.Tensor] | None = None


@dataclass
class SparseUpdate:
    """One client's reply as it travelled (`codec.decode_sparse`), n_c, and (PruneFL
    reconfiguration rounds) its dense squared gradients."""

    payload: Sparse
    num_examples: int
    gradients: dict[str, torch.Tensor] | None = None

    def receipt(self) -> ClientUpdate:
        """What the round keeps of the reply once it is in the sum: n_c and the gradients."""
        return ClientUpdate({}, {}, self.num_examples, self.gradients)


@dataclass
class Votes:
    """Per masked layer, who kept each position: the number of clients, and their summed
    num_examples (the weights of the average)."""

    clients: Mapping[str, torch.Tensor]
    weight: Mapping[str, torch.Tensor]


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


@dataclass
class LayerAverage:
    """One masked layer's average at the positions some client kept.

    Attributes
    ----------
    shape : tuple[int, ...]
        The layer's shape.
    positions : torch.Tensor
        Flat positions some client kept, ascending (int64).
    average : torch.Tensor
        The float32 average there; zero where fewer than min_votes clients kept it.
    weight : torch.Tensor
        The summed num_examples of the clients that kept each position (float64).
    clients : torch.Tensor
        How many clients kept each position (int64).
    """

    shape: tuple[int, ...]
    positions: torch.Tensor
    average: torch.Tensor
    weight: torch.Tensor
    clients: torch.Tensor

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape))

    def dense(self, values: torch.Tensor) -> torch.Tensor:
        """`values` (at `positions`) as a tensor of the layer's shape, zero elsewhere."""
        flat = torch.zeros(self.numel, dtype=values.dtype)
        flat[self.positions] = values
        return flat.view(self.shape)

    def weight_at(self, positions: torch.Tensor) -> torch.Tensor:
        """The summed num_examples at flat `positions` (zero where no client kept one)."""
        index = torch.searchsorted(self.positions, positions).clamp_max(max(len(self.positions) - 1, 0))
        if not len(self.positions):
            return torch.zeros(len(positions), dtype=torch.float64)
        return torch.where(self.positions[index] == positions, self.weight[index], 0.0)


class DenseVotes(Mapping[str, torch.Tensor]):
    """One field of every layer's votes (`clients` or `weight`), made dense on access."""

    def __init__(self, layers: dict[str, LayerAverage], field_name: str) -> None:
        self.layers, self.field_name = layers, field_name

    def __getitem__(self, name: str) -> torch.Tensor:
        layer = self.layers[name]
        return layer.dense(getattr(layer, self.field_name))

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)


@dataclass
class SparseAverage:
    """The round's average: the tensors that are not masked, and every masked layer's
    `LayerAverage`; `names` in the model's order."""

    dense: dict[str, torch.Tensor]
    layers: dict[str, LayerAverage]
    names: list[str]

    def state(self, masks: Masks | None = None) -> dict[str, torch.Tensor]:
        """The averaged state dict, float32 (zero wherever no client kept a weight), with
        `masks` applied (as `masks.apply_masks` would) when given."""
        return {name: self.dense[name] if name in self.dense else self._layer(name, masks) for name in self.names}

    def _layer(self, name: str, masks: Masks | None) -> torch.Tensor:
        layer = self.layers[name]
        if masks is None:
            return layer.dense(layer.average)
        return layer.dense(layer.average * masks[name].flatten()[layer.positions])

    def votes(self) -> Votes:
        """The votes of every masked position (dense tensors, made on access)."""
        return Votes(DenseVotes(self.layers, "clients"), DenseVotes(self.layers, "weight"))


class _LayerSum:
    """One masked layer's running sums. `numerator` holds the weighted values at the held
    mask's positions; replies that sent a mask of their own also add to `moved` (numerator,
    weight and clients over the whole layer; their numerator stays zero at held positions)."""

    def __init__(self, held: torch.Tensor) -> None:
        self.held = held
        self.shape = tuple(held.shape)
        self.held_flat = held.flatten().numpy()
        self.positions = positions(held)
        self.numerator = np.zeros(len(self.positions))
        self.held_weight, self.held_clients = 0, 0
        self.moved: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self.rank = np.empty(0, dtype=np.int32)  # with the moved sums: each held position's index among them

    def add(self, values: np.ndarray, mask: torch.Tensor, num_examples: int, scratch: np.ndarray) -> None:
        weighted = np.multiply(values, float(num_examples), out=scratch[: len(values)], dtype=np.float64)
        if mask is self.held:
            np.add(self.numerator, weighted, out=self.numerator)
            self.held_weight += num_examples
            self.held_clients += 1
            return
        at = positions(mask)
        if self.moved is None:
            size = self.held_flat.size
            self.moved = (np.zeros(size), np.zeros(size), np.zeros(size, dtype=np.int32))
            self.rank = np.cumsum(self.held_flat, dtype=np.int32) - 1  # a held position's index among them
        numerator, weight, clients = self.moved
        in_held = self.held_flat[at]
        self.numerator[self.rank[at[in_held]]] += weighted[in_held]
        outside = ~in_held
        numerator[at[outside]] += weighted[outside]
        weight[at] += num_examples
        clients[at] += 1

    def average(self, min_votes: int) -> LayerAverage:
        """The layer's average; the sums become it (call once)."""
        if self.moved is None:  # one weight and one count for every position: broadcast, not stored
            count = len(self.positions)
            average = np.divide(self.numerator, max(float(self.held_weight), 1e-300), out=self.numerator)
            average = average.astype(np.float32) if self.held_clients >= min_votes else np.zeros(count, np.float32)
            return LayerAverage(
                self.shape,
                torch.from_numpy(self.positions.copy()),  # the mask's shared positions are read-only
                torch.from_numpy(average),
                torch.tensor(float(self.held_weight), dtype=torch.float64).expand(count),
                torch.tensor(self.held_clients, dtype=torch.int64).expand(count),
            )
        numerator, weight, clients = self.moved  # the held positions' sums join the moved ones
        self.moved, self.rank = None, np.empty(0, dtype=np.int32)
        numerator[self.positions] = self.numerator  # the moved numerator is zero there
        weight[self.positions] += self.held_weight
        clients[self.positions] += self.held_clients
        at = np.flatnonzero(clients)
        numerator, weight, clients = numerator[at], weight[at], clients[at]
        np.divide(numerator, np.maximum(weight, 1e-300), out=numerator)
        numerator[clients < min_votes] = 0.0
        return LayerAverage(
            self.shape,
            torch.from_numpy(at),
            torch.from_numpy(numerator.astype(np.float32)),
            torch.from_numpy(weight),
            torch.from_numpy(clients.astype(np.int64)),
        )


class SparseSum:
    """The running sums of a round's replies, added one at a time in client order.

    Parameters
    ----------
    held : Masks
        The global mask the replies were sent under: a reply that carries no mask of its
        own uses these very tensors (`codec.decode_sparse`), and is added without
        touching the rest of the layer.
    """

    def __init__(self, held: Masks) -> None:
        self.layers = {name: _LayerSum(mask) for name, mask in held.items()}
        self.scratch = np.empty(0)  # one reply's weighted values of a layer
        self.dense: dict[str, np.ndarray] = {}
        self.names: list[str] = []
        self.total = 0

    def add(self, payload: Sparse, num_examples: int) -> None:
        """Add one decoded reply, weighted by its num_examples."""
        if not self.names:
            self.names = list(payload.names)
        for name, tensor in payload.dense.items():
            if name not in self.dense:
                self.dense[name] = np.zeros(tensor.shape)
            self.dense[name] += np.multiply(tensor.numpy(), float(num_examples), dtype=np.float64)
        for name, values in payload.values.items():
            if len(values) > len(self.scratch):
                self.scratch = np.empty(len(values))
            self.layers[name].add(values, payload.masks[name], num_examples, self.scratch)
        self.total += num_examples

    def average(self, min_votes: int = 1) -> SparseAverage:
        """Every tensor averaged weighted by num_examples; a masked weight only over the
        clients that kept it, and zero when fewer than min_votes clients kept it. The sums
        become the average: call once."""
        if not self.names:
            raise ValueError("sparse_average needs at least one client update")
        dense = {
            name: torch.from_numpy(np.asarray(total / float(self.total), np.float32))
            for name, total in self.dense.items()
        }
        layers = {name: layer.average(min_votes) for name, layer in self.layers.items()}
        return SparseAverage(dense, layers, self.names)


def sparse_sum(updates: list[ClientUpdate]) -> SparseSum:
    """The sum of dense client updates (their masked layers taken at their masks)."""
    if not updates:
        raise ValueError("sparse_average needs at least one client update")
    total = SparseSum(updates[0].masks)
    for update in updates:
        values = {
            name: np.compress(mask.flatten().numpy(), update.state[name].numpy().ravel())
            for name, mask in update.masks.items()
        }
        dense = {name: tensor for name, tensor in update.state.items() if name not in update.masks}
        total.add(Sparse(dense, values, update.masks, True, list(update.state)), update.num_examples)
    return total


def sparse_average(updates: list[ClientUpdate], min_votes: int = 1) -> tuple[dict[str, torch.Tensor], Votes]:
    """Average every tensor weighted by num_examples; a masked weight is averaged only over
    the clients that kept it, and is zero when fewer than min_votes clients kept it.
    Returns the averaged state and the votes of every masked position."""
    average = sparse_sum(updates).average(min_votes)
    return average.state(), average.votes()


def magnitude_reprune(
    average: SparseAverage, counts: dict[str, int], generator: torch.Generator | TieKeys, min_votes: int = 1
) -> Masks:
    """The paper's server mask rule: per layer the counts[name] largest |averaged weight|
    among the positions at least min_votes clients kept; ties go to the larger
    sample-weighted vote, then to a random key from `generator` (`masks.top_k_among`)."""
    keys, masks = tie_keys(generator), {}
    for name, count in counts.items():
        layer = average.layers[name]
        positions, scores = layer.positions, layer.average.abs()
        if len(layer.clients) and int(layer.clients.min()) < min_votes:
            candidate = layer.clients >= min_votes
            positions, scores = positions[candidate], scores[candidate]
        votes: Callable[[torch.Tensor], torch.Tensor] = layer.weight_at
        flat = top_k_among(layer.numel, count, positions, scores, keys, votes)
        masks[name] = flat.view(layer.shape)
    if keys is not generator:
        keys.generator()  # a plain generator leaves as randperm would have left it
    return masks


def aggregate(
    updates: list[ClientUpdate], counts: dict[str, int], generator: torch.Generator, min_votes: int = 1
) -> tuple[dict[str, torch.Tensor], Masks, Votes]:
    """theta^{r+1}, m^{r+1}: sparse average, then `magnitude_reprune`. Also returns the votes."""
    average = sparse_sum(updates).average(min_votes)
    masks = magnitude_reprune(average, counts, generator, min_votes)
    return average.state(masks), masks, average.votes()
