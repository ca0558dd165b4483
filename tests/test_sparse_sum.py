"""The streamed aggregate (aggregation.SparseSum, magnitude_reprune on its average, masks.TieKeys)
against the aggregate as it was before it streamed (issue 28): `reference_*` below is that
dense implementation (one dense float64 sum per layer, index_add_ per client in client
order, a full permutation per layer for tie keys), kept here only to compare with. Replies
travel through the codec (float16 values, masks as deltas), values on a coarse grid so
that the re-prune meets ties at its threshold."""

from __future__ import annotations

import math
import sys
import tracemalloc
from pathlib import Path

import pytest
import torch
from fakes import new_model
from flwr.app import ArrayRecord

from feddst_flwr.aggregation import ClientUpdate, SparseSum, Votes, magnitude_reprune
from feddst_flwr.codec import HeldMask, decode, decode_sparse, encode
from feddst_flwr.masks import Masks, TieKeys, apply_masks, layer_counts, maskable_names, random_masks, shapes_of
from feddst_flwr.models import build_model
from feddst_flwr.prunefl import PruneFL

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from wire import readjusted  # noqa: E402  (the bench's moved masks: round(fraction x active) dropped and grown)


def reference_sparse_average(updates: list[ClientUpdate], min_votes: int) -> tuple[dict[str, torch.Tensor], Votes]:
    total = float(sum(u.num_examples for u in updates))
    state, votes = {}, Votes({}, {})
    for name in updates[0].state:
        if name not in updates[0].masks:
            weighted = torch.zeros(updates[0].state[name].shape, dtype=torch.float64)
            for u in updates:
                weighted += u.num_examples * u.state[name].double()
            state[name] = (weighted / total).float()
            continue
        shape = updates[0].state[name].shape
        numerator = torch.zeros(shape.numel(), dtype=torch.float64)
        weight, clients = torch.zeros_like(numerator), torch.zeros(shape.numel(), dtype=torch.int64)
        for u in updates:
            kept = u.masks[name].flatten().nonzero().squeeze(1)
            numerator.index_add_(0, kept, u.state[name].flatten()[kept].double(), alpha=u.num_examples)
            weight.index_add_(0, kept, torch.full((len(kept),), float(u.num_examples), dtype=torch.float64))
            clients.index_add_(0, kept, torch.ones(len(kept), dtype=torch.int64))
        votes.weight[name], votes.clients[name] = weight.view(shape), clients.view(shape)
        average = numerator.view(shape) / votes.weight[name].clamp_min(1e-300)
        state[name] = torch.where(votes.clients[name] >= min_votes, average, torch.zeros_like(average)).float()
    return state, votes


def reference_top_k(
    scores: torch.Tensor, k: int, generator: torch.Generator, votes: torch.Tensor | None
) -> torch.Tensor:
    flat_scores, n = scores.flatten(), scores.numel()
    permutation = torch.randperm(n, generator=generator)
    if k <= 0 or k >= n:
        return torch.full_like(scores, k >= n and n > 0, dtype=torch.bool)
    threshold = torch.kthvalue(flat_scores, n - k + 1).values
    flat = flat_scores > threshold
    tied = torch.nonzero(flat_scores == threshold).squeeze(1)
    key = torch.empty(n, dtype=torch.long)
    key[permutation] = torch.arange(n)
    order = tied[torch.argsort(key[tied])]
    if votes is not None:
        order = order[torch.argsort(votes.flatten()[order], descending=True, stable=True)]
    flat[order[: k - int(torch.count_nonzero(flat))]] = True
    return flat.view(scores.shape)


def reference_prune(weights, candidates, counts, generator, votes=None) -> Masks:
    masks = {}
    for name, count in counts.items():
        scores = weights[name].abs().float()
        if candidates is not None:
            scores = torch.where(candidates[name], scores, torch.tensor(-1.0))
        masks[name] = reference_top_k(scores, count, generator, votes[name] if votes is not None else None)
    return masks


class CountingKeys(TieKeys):
    """TieKeys that count the permutations drawn (ties actually broken)."""

    drawn = 0

    def keys(self, n: int, positions: torch.Tensor) -> torch.Tensor:
        CountingKeys.drawn += 1
        return super().keys(n, positions)


class Replies:
    """Encoded replies of one model under one global mask: every `moved_every`-th client
    (0: none) moved its mask; values on a grid of 1/8 (many ties)."""

    def __init__(self, model: torch.nn.Module, count: int, moved_every: int, seed: int) -> None:
        state = model.state_dict()
        self.maskable = maskable_names(model)
        self.shapes = shapes_of(state, list(state))
        self.counts = layer_counts(shapes_of(state, self.maskable), 0.8, "erk")
        self.held = HeldMask(random_masks(shapes_of(state, self.maskable), self.counts, seed), 0)
        generator = torch.Generator().manual_seed(seed)
        self.records, self.sizes = [], torch.randint(1, 600, (count,), generator=generator).tolist()
        for i in range(count):
            masks = (
                readjusted(self.held.masks, 0.3, generator) if moved_every and i % moved_every == 0 else self.held.masks
            )
            values = {
                name: torch.round(8 * (t + 0.05 * torch.randn(t.shape, generator=generator))) / 8
                if t.is_floating_point() else t
                for name, t in state.items()
            }  # fmt: skip
            for name, mask in masks.items():
                values[name].mul_(mask)
            self.records.append(encode(values, masks, masks is not self.held.masks, "float16", self.held))

    def streamed(self) -> SparseSum:
        total = SparseSum(self.held.masks)
        for record, size in zip(self.records, self.sizes, strict=True):
            total.add(decode_sparse(record, self.shapes, self.maskable, self.held), size)
        return total

    def dense(self) -> list[ClientUpdate]:
        decoded = [decode(record, self.shapes, self.maskable, self.held) for record in self.records]
        return [ClientUpdate(d.state, d.masks, size) for d, size in zip(decoded, self.sizes, strict=True)]


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, so that equality is bit for bit (-0.0 is not 0.0)."""
    return tensor.contiguous().view(torch.uint8)


CASES = [  # model, replies, every n-th reply moved (0: none), min_votes
    ("digits", 5, 0, 1),
    ("digits", 6, 2, 1),
    ("digits", 7, 1, 1),
    ("digits", 6, 2, 3),
    ("digits", 4, 3, 5),
    ("cifar10-cnn", 4, 2, 1),
    ("cifar10-cnn", 3, 0, 2),
]


def model_of(name: str) -> torch.nn.Module:
    return new_model() if name == "digits" else build_model(name, 10, 0)


@pytest.mark.parametrize("model_name, count, moved_every, min_votes", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_streamed_aggregate_equals_the_dense_one(model_name, count, moved_every, min_votes, seed):
    """Weights bit for bit, votes, masks, and the re-prune generator's state afterwards."""
    replies = Replies(model_of(model_name), count, moved_every, seed)
    average = replies.streamed().average(min_votes)
    state, votes = average.state(), average.votes()
    keys = CountingKeys(torch.Generator().manual_seed(seed + 7))
    masks = magnitude_reprune(average, replies.counts, keys, min_votes)

    ref_state, ref_votes = reference_sparse_average(replies.dense(), min_votes)
    generator = torch.Generator().manual_seed(seed + 7)
    candidates = {name: clients >= min_votes for name, clients in ref_votes.clients.items()}
    ref_masks = reference_prune(ref_state, candidates, replies.counts, generator, ref_votes.weight)

    assert list(state) == list(ref_state)
    assert all(torch.equal(bits(state[name]), bits(ref_state[name])) for name in state)
    for name in replies.maskable:
        assert torch.equal(votes.clients[name], ref_votes.clients[name])
        assert torch.equal(bits(votes.weight[name]), bits(ref_votes.weight[name]))
        assert torch.equal(masks[name], ref_masks[name]), name
    assert torch.equal(keys.generator().get_state(), generator.get_state())
    apply_masks(ref_state, ref_masks)
    pruned = average.state(masks)
    assert all(torch.equal(bits(pruned[name]), bits(ref_state[name])) for name in state)


def test_the_cases_break_ties():
    """The cases above break ties by the random key (not only by magnitude or votes)."""
    CountingKeys.drawn = 0
    for model_name, count, moved_every, min_votes in CASES[:5]:
        replies = Replies(model_of(model_name), count, moved_every, 0)
        magnitude_reprune(
            replies.streamed().average(min_votes), replies.counts, CountingKeys(torch.Generator()), min_votes
        )
    assert CountingKeys.drawn > 0


def test_prunefl_reconfiguration_after_the_streamed_reprune_equals_the_dense_one():
    """PruneFL's gradient replies: its importance re-prune draws from the same stream after
    the magnitude re-prune, which drew lazily."""
    replies = Replies(new_model(), 5, 2, 3)
    strategy = PruneFL(maskable=replies.maskable, sparsity=0.8, delta_r=2, r_end=4, seed=0)
    strategy.initialize(ArrayRecord(new_model().state_dict()))
    assert strategy.counts == replies.counts
    generator = torch.Generator().manual_seed(5)
    gradients = [
        {name: torch.round(4 * torch.rand(replies.shapes[name], generator=generator)) for name in replies.maskable}
        for _ in replies.sizes
    ]  # few levels: ties
    receipts = [ClientUpdate({}, {}, n, g) for n, g in zip(replies.sizes, gradients, strict=True)]

    keys = TieKeys(torch.Generator().manual_seed(9))
    masks = magnitude_reprune(replies.streamed().average(1), replies.counts, keys, 1)
    masks = strategy.reconfigure(receipts, masks, keys)

    ref_state, ref_votes = reference_sparse_average(replies.dense(), 1)
    reference = torch.Generator().manual_seed(9)
    reference_prune(
        ref_state, {n: c >= 1 for n, c in ref_votes.clients.items()}, replies.counts, reference, ref_votes.weight
    )
    total = sum(replies.sizes)
    importance = {
        name: sum(n * g[name] for n, g in zip(replies.sizes, gradients, strict=True)) / total for name in masks
    }
    ref_masks = reference_prune(importance, None, replies.counts, reference)
    assert all(torch.equal(masks[name], ref_masks[name]) for name in masks)
    assert torch.equal(keys.generator().get_state(), reference.get_state())


def peak_of_streaming(replies: Replies, count: int) -> int:
    """tracemalloc's peak (numpy's memory: the sums, the decoded values and masks, the
    average) while the first `count` replies are decoded one at a time and summed."""
    tracemalloc.start()
    total = SparseSum(replies.held.masks)
    for record, size in zip(replies.records[:count], replies.sizes[:count], strict=True):
        total.add(decode_sparse(record, replies.shapes, replies.maskable, replies.held), size)
    total.average(1)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def test_peak_memory_of_summing_replies_does_not_grow_with_their_number():
    """Replies under the global mask: the sums live at its positions, whatever the count."""
    replies = Replies(build_model("cifar10-cnn", 10, 0), 50, 0, 0)
    model_bytes = 4 * sum(math.prod(shape) for shape in replies.shapes.values())
    few, many = peak_of_streaming(replies, 5), peak_of_streaming(replies, 50)
    assert many < 1.05 * few + 64 * 1024, (few, many)
    assert many < 2.5 * model_bytes, many / model_bytes


def test_peak_memory_of_summing_moved_masks_is_bounded_by_the_layers():
    """Replies that moved their masks add to sums over whole layers, and the average covers
    the union of the masks: at most every position, whatever the number of replies."""
    replies = Replies(build_model("cifar10-cnn", 10, 0), 50, 2, 0)
    model_bytes = 4 * sum(math.prod(shape) for shape in replies.shapes.values())
    # per position: the moved sums and ranks (8 + 8 + 4 + 4 bytes) and the average's arrays
    # (8 + 8 + 8 + 4), plus two model copies for the sums at the global mask and one reply
    bound = ((24 + 28) / 4 + 2) * model_bytes
    assert peak_of_streaming(replies, 5) < peak_of_streaming(replies, 50) < bound
