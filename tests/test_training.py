"""Unit tests for feddst_flwr.training: masked SGD (momentum, weight decay, proximal
term), the dense task-loss gradient used for regrowth, evaluation and determinism."""

from __future__ import annotations

import copy
import inspect
import math

import numpy as np
import pytest
import torch
from conftest import erk_masks, random_data
from torch import nn
from torch.nn import functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

from feddst_flwr.data import TensorData
from feddst_flwr.masks import apply_masks
from feddst_flwr.models import DigitsCNN
from feddst_flwr.training import Evaluation, Readjustment, batches, dense_gradients, evaluate, readjust_epoch, train

WIDTH = 8  # a narrow DigitsCNN keeps the tests fast
NUM_CLASSES = 10  # DigitsCNN's outputs
SGD = {"epochs": 2, "batch_size": 8, "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-2}


def masked_model(seed: int = 0) -> tuple[nn.Module, dict, dict]:
    """A DigitsCNN with pruned weights already zero, its masks and counts."""
    torch.manual_seed(seed)
    model = DigitsCNN(width=WIDTH)
    masks, counts = erk_masks(model, 0.8, seed)
    apply_masks(dict(model.named_parameters()), masks)
    return model, masks, counts


def run(model: nn.Module, data: TensorData, masks=None, *, mu: float = 0.0, seed: int = 0, **overrides) -> float:
    options = {**SGD, **overrides}
    return train(model, data, masks, proximal_mu=mu, generator=torch.Generator().manual_seed(seed), **options).loss


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((a[n] - b[n]).pow(2).sum()) for n in a))


def sparse_layers(masks: dict) -> list[str]:
    """Layers with pruned positions (ERK keeps the tiny conv1 dense)."""
    names = [name for name, mask in masks.items() if not mask.all()]
    assert len(names) >= 2
    return names


def assert_exactly_masked(params: dict[str, torch.Tensor], masks: dict, counts: dict) -> None:
    for name, mask in masks.items():
        assert torch.count_nonzero(params[name][~mask]) == 0, name
        assert int(torch.count_nonzero(params[name])) == counts[name], name


# --------------------------------------------------------------------------- masked SGD


def test_masked_sgd_keeps_pruned_weights_and_momentum_zero_after_every_step(data):
    model, masks, counts = masked_model()
    params = dict(model.named_parameters())
    name_of = {id(p): name for name, p in params.items()}
    seen = {"steps": 0}

    def check(optimizer, _args, _kwargs):
        # runs right after SGD.step, before train() re-applies the masks
        seen["steps"] += 1
        assert_exactly_masked(params, masks, counts)
        for group in optimizer.param_groups:
            for p in group["params"]:
                name = name_of[id(p)]
                if name in masks:
                    buffer = optimizer.state[p]["momentum_buffer"]
                    assert torch.count_nonzero(buffer[~masks[name]]) == 0, name
                    assert torch.count_nonzero(buffer[masks[name]]) > 0, name

    before = weights(model)
    handle = register_optimizer_step_post_hook(check)
    try:
        run(model, data, masks)
    finally:
        handle.remove()

    assert seen["steps"] == SGD["epochs"] * math.ceil(len(data) / SGD["batch_size"])  # 2 * 3
    assert_exactly_masked(params, masks, counts)
    for name in masks:  # active weights did train
        assert not torch.equal(params[name][masks[name]], before[name][masks[name]])


@pytest.mark.parametrize("after_epoch", [0, 1, 2])
def test_readjustment_within_training_moves_masks_and_keeps_them_exact(data, after_epoch):
    """Readjusting after `after_epoch` of 2 epochs: every later step keeps the new masks
    exact (pruned weights and their momentum zero); regrown weights train unless the
    readjustment came after the last epoch (then they are uploaded at zero)."""
    model, masks, counts = masked_model()
    params = dict(model.named_parameters())
    name_of = {id(p): name for name, p in params.items()}
    snapshots = []

    def snapshot(optimizer, _args, _kwargs):
        buffers = {name_of[id(p)]: optimizer.state[p]["momentum_buffer"].clone() for p in optimizer.state}
        snapshots.append(({n: params[n].detach().clone() for n in masks}, buffers))

    handle = register_optimizer_step_post_hook(snapshot)
    try:
        result = train(
            model, data, masks, proximal_mu=0.0, generator=torch.Generator().manual_seed(0),
            readjust=Readjustment(alpha_r=0.3, after_epoch=after_epoch), **SGD,
        )  # fmt: skip
    finally:
        handle.remove()

    new = result.masks
    assert {n: int(m.sum()) for n, m in new.items()} == counts
    assert sum(int((new[n] & ~masks[n]).sum()) for n in masks) > 0
    assert all(torch.equal(new[n], masks[n]) for n in masks if masks[n].all())  # dense layers stay dense
    steps_per_epoch = math.ceil(len(data) / SGD["batch_size"])
    for step_params, buffers in snapshots[after_epoch * steps_per_epoch :]:
        for name, mask in new.items():
            assert torch.count_nonzero(step_params[name][~mask]) == 0, name  # before train() re-applies masks
            assert torch.count_nonzero(buffers[name][~mask]) == 0, name
    assert all(torch.count_nonzero(params[n][~new[n]]) == 0 for n in new)
    regrown = torch.cat([params[n].detach()[new[n] & ~masks[n]] for n in masks])
    assert torch.count_nonzero(regrown) == (0 if after_epoch == 2 else regrown.numel())


@pytest.mark.parametrize(
    ("readjust_at", "epochs", "expected"),
    [("end", 10, 10), ("last-epoch", 10, 9), ("mid", 10, 5), ("mid", 5, 2), ("last-epoch", 1, 0), ("mid", 1, 0)],
)
def test_readjust_epoch(readjust_at, epochs, expected):
    assert readjust_epoch(readjust_at, epochs) == expected


def test_readjust_epoch_rejects_unknown_mode():
    with pytest.raises(ValueError, match="readjust-at 'start'"):
        readjust_epoch("start", 10)


def test_masked_sgd_re_zeroes_pruned_weights_of_an_unmasked_start(data):
    torch.manual_seed(0)
    model = DigitsCNN(width=WIDTH)
    masks, counts = erk_masks(model)
    run(model, data, masks)
    assert_exactly_masked(dict(model.named_parameters()), masks, counts)


def test_unmasked_training_updates_every_weight(data):
    model, masks, _ = masked_model()
    run(model, data, None)
    params = dict(model.named_parameters())
    for name in sparse_layers(masks):  # pruned positions get gradients without masks
        assert torch.count_nonzero(params[name][~masks[name]]) > 0, name


def test_train_returns_mean_task_loss_over_steps(data):
    # lr 0: the weights never move, so every step's loss is the loss of the same model;
    # 24 samples in batches of 8 -> the mean of the batch means is the dataset mean
    model, masks, _ = masked_model()
    expected = evaluate(model, data, NUM_CLASSES).loss
    loss = run(model, data, masks, lr=0.0, mu=100.0)  # the proximal term is 0 at w = w0
    assert loss == pytest.approx(expected, rel=1e-5)


def test_train_returns_task_loss_without_the_proximal_term(data, monkeypatch):
    model, masks, _ = masked_model()
    recorded, cross_entropy = [], F.cross_entropy

    def recording(*args, **kwargs):
        loss = cross_entropy(*args, **kwargs)
        recorded.append(loss.item())
        return loss

    monkeypatch.setattr(F, "cross_entropy", recording)
    loss = run(model, data, masks, mu=5.0)
    assert len(recorded) == 6
    assert loss == pytest.approx(sum(recorded) / 6, rel=1e-12)


# --------------------------------------------------------------------------- proximal term


def test_proximal_term_pulls_weights_towards_the_start(data):
    model, masks, counts = masked_model()
    start = weights(model)
    plain, prox = copy.deepcopy(model), copy.deepcopy(model)

    run(plain, data, masks, mu=0.0)
    run(prox, data, masks, mu=5.0)

    assert distance(weights(prox), weights(plain)) > 0
    assert distance(weights(prox), start) < 0.9 * distance(weights(plain), start)
    assert_exactly_masked(dict(prox.named_parameters()), masks, counts)


def test_tiny_proximal_mu_still_changes_the_result(data):
    model, masks, _ = masked_model()
    plain, prox = copy.deepcopy(model), copy.deepcopy(model)
    run(plain, data, masks, mu=0.0)
    run(prox, data, masks, mu=1e-2)
    assert any(not torch.equal(a, b) for a, b in zip(plain.parameters(), prox.parameters()))


# --------------------------------------------------------------------------- dense gradients


def manual_task_gradients(model: nn.Module, data: TensorData, names, num_batches: int, batch_size: int, seed: int):
    """Sum over the first num_batches shuffled minibatches of d CE / d w."""
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    params = dict(model.named_parameters())
    total = {name: torch.zeros_like(params[name]) for name in names}
    for b in range(num_batches):
        index = order[b * batch_size : (b + 1) * batch_size]
        loss = F.cross_entropy(model(data.x[index]), data.y[index])
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        for name, grad in zip(names, grads):
            total[name] += grad
    return total


def test_dense_gradients_take_no_proximal_coefficient():
    assert not any("mu" in p or "prox" in p for p in inspect.signature(dense_gradients).parameters)


@pytest.mark.parametrize("num_batches", [1, 2])
def test_dense_gradients_equal_summed_task_loss_gradients(data, num_batches):
    model, masks, _ = masked_model()
    run(model, data, masks, mu=5.0)  # weights moved under a proximal term
    names = list(masks)
    trained = weights(model)

    grads = dense_gradients(model, data, names, num_batches, 8, torch.Generator().manual_seed(3))
    expected = manual_task_gradients(model, data, names, num_batches, 8, seed=3)

    assert set(grads) == set(names)
    for name in names:
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-5, atol=1e-7)
    for name in sparse_layers(masks):  # pruned positions get a gradient too
        assert torch.count_nonzero(grads[name][~masks[name]]) > 0, name
    assert all(torch.equal(trained[n], p) for n, p in model.named_parameters())  # no update
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in model.parameters())


def test_dense_gradients_of_more_batches_than_exist_use_all_data(data):
    model, masks, _ = masked_model()
    names = list(masks)
    grads = dense_gradients(model, data, names, 50, 8, torch.Generator().manual_seed(1))
    expected = manual_task_gradients(model, data, names, 3, 8, seed=1)  # 24 samples = 3 batches
    for name in names:
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- evaluate


class FirstPixels(nn.Module):
    """Logits are the first `k` input values: lets losses be worked out by hand."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, : self.k]


def logits_data(logits: list[list[float]], labels: list[int]) -> TensorData:
    """Samples whose pixels are the given logits (for FirstPixels)."""
    x = torch.tensor(logits)
    return TensorData(x.view(len(x), 1, 1, -1), torch.tensor(labels))


def test_evaluate_matches_hand_computed_loss_and_accuracy():
    data = logits_data([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.5, 0.0]], [0, 2, 1])
    # CE = log(sum exp) - logit[label]
    expected_loss = (
        (math.log(math.e**2 + 2) - 2.0)  # sample 0, correct
        + math.log(2 + math.e)  # sample 1, label 2 scores 0, predicted 1
        + (math.log(2 + math.exp(0.5)) - 0.5)  # sample 2, correct
    ) / 3
    for batch_size in (1, 2, 512):  # uneven last batch must not bias the mean
        result = evaluate(FirstPixels(3), data, 3, batch_size=batch_size)
        assert isinstance(result, Evaluation)
        assert result.loss == pytest.approx(expected_loss, rel=1e-6)
        assert result.accuracy == pytest.approx(2 / 3)
        np.testing.assert_array_equal(result.class_accuracy, [1.0, 1.0, 0.0])


def test_evaluate_class_accuracy_by_hand_with_an_absent_class():
    # 4 classes; class 2 never occurs in the data (NaN), class 3 is never predicted right
    data = logits_data(
        [
            [5.0, 0.0, 0.0, 0.0],  # label 0 -> 0  right
            [0.0, 5.0, 0.0, 0.0],  # label 0 -> 1  wrong
            [0.0, 5.0, 0.0, 0.0],  # label 1 -> 1  right
            [0.0, 5.0, 0.0, 0.0],  # label 1 -> 1  right
            [0.0, 0.0, 5.0, 0.0],  # label 1 -> 2  wrong (a prediction of the absent class)
            [0.0, 0.0, 0.0, 5.0],  # label 0 -> 3  wrong
            [5.0, 0.0, 0.0, 0.0],  # label 3 -> 0  wrong
        ],
        [0, 0, 1, 1, 1, 0, 3],
    )
    for batch_size in (1, 3, 512):
        result = evaluate(FirstPixels(4), data, 4, batch_size=batch_size)
        assert result.class_accuracy.shape == (4,)
        np.testing.assert_allclose(result.class_accuracy, [1 / 3, 2 / 3, np.nan, 0.0])
        assert result.accuracy == pytest.approx(3 / 7)
        # per-class accuracies weighted by class counts give back the overall accuracy
        counts = np.bincount(data.y.numpy(), minlength=4)
        assert np.nansum(result.class_accuracy * counts) / counts.sum() == pytest.approx(result.accuracy)


def test_evaluate_matches_full_batch_computation_on_digits_cnn(data):
    model, _, _ = masked_model()
    with torch.no_grad():
        logits = model(data.x)
    result = evaluate(model, data, NUM_CLASSES, batch_size=5)
    predicted = logits.argmax(1)
    assert result.loss == pytest.approx(float(F.cross_entropy(logits, data.y)), rel=1e-5)
    assert result.accuracy == int((predicted == data.y).sum()) / len(data)
    for label in range(NUM_CLASSES):
        chosen = data.y == label
        expected = float((predicted[chosen] == label).float().mean()) if chosen.any() else math.nan
        np.testing.assert_allclose(result.class_accuracy[label], expected, rtol=1e-12, err_msg=str(label))
    assert not model.training


# --------------------------------------------------------------------------- determinism


def test_same_generator_seed_gives_identical_weights(data):
    model, masks, _ = masked_model()
    first, second, other = (copy.deepcopy(model) for _ in range(3))
    run(first, data, masks, seed=11)
    run(second, data, masks, seed=11)
    run(other, data, masks, seed=12)
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(first.parameters(), other.parameters()))


def test_batches_reshuffle_per_call_and_cover_the_data():
    data = random_data(10)
    generator = torch.Generator().manual_seed(0)
    first = torch.cat([y for _, y in batches(data, 4, generator)])
    second = torch.cat([y for _, y in batches(data, 4, generator)])
    sizes = [len(y) for _, y in batches(data, 4, None)]
    assert sorted(first.tolist()) == sorted(data.y.tolist()) == sorted(second.tolist())
    assert sizes == [4, 4, 2]
    assert torch.equal(torch.cat([y for _, y in batches(data, 4, None)]), data.y)  # no generator: in order
    order_a = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(first, data.y[order_a])
