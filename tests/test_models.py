"""Model zoo: parameter counts computed by hand from the layer sizes, output shapes, logits
(no softmax), seeded construction and forward FLOPs of the paper's CIFAR-10 CNN."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from feddst_flwr.masks import maskable_names
from feddst_flwr.metrics import forward_flops
from feddst_flwr.models import MODELS, build_model

# Each layer is (weights, biases); maskable = conv/linear weights only.


def _conv(cout: int, cin: int, k: int, bias: bool = True) -> tuple[int, int]:
    return cout * cin * k * k, cout if bias else 0


def _linear(fin: int, fout: int) -> tuple[int, int]:
    return fout * fin, fout


def _bn(c: int) -> int:
    return 2 * c  # weight and bias (running stats are buffers, not parameters)


# digits-cnn, width 32, 8x8 input: two 3x3 pad-1 convs, one 2x2 pool -> 64 x 4 x 4
DIGITS = [_conv(32, 1, 3), _conv(64, 32, 3), _linear(64 * 4 * 4, 128), _linear(128, 10)]
# mnist-cnn: 28 -conv5-> 24 -pool3/1-> 22 -conv5-> 18 -pool3/1-> 16 -> 20 * 16 * 16 = 5120
MNIST = [_conv(10, 1, 5), _conv(20, 10, 5), _linear(20 * 16 * 16, 50), _linear(50, 10)]
# cifar10-cnn: 32 -conv5-> 28 -pool3/1-> 26 -conv5-> 22 -pool3/1-> 20 -> 16 * 20 * 20 = 6400
CIFAR10 = [_conv(6, 3, 5), _conv(16, 6, 5), _linear(6400, 120), _linear(120, 84), _linear(84, 10)]
CIFAR100 = [_conv(6, 3, 5), _conv(16, 6, 5), _linear(6400, 120), _linear(120, 100)]
# femnist-cnn: 28 -conv5 pad2-> 28 -pool2-> 14 -conv5 pad2-> 14 -pool2-> 7 -> 64 * 7 * 7 = 3136
FEMNIST = [_conv(32, 1, 5), _conv(64, 32, 5), _linear(3136, 2048), _linear(2048, 62)]


def _resnet18_counts(num_classes: int) -> tuple[int, int]:
    """(parameters, maskable weights) of the CIFAR ResNet-18 (3x3 bias-free stem)."""
    weights = 64 * 3 * 3 * 3  # stem conv, no bias
    norms = _bn(64)
    cin = 64
    for cout in (64, 128, 256, 512):  # 4 stages of 2 BasicBlocks
        for block in range(2):
            block_in = cin if block == 0 else cout
            weights += cout * block_in * 3 * 3 + cout * cout * 3 * 3  # two 3x3 convs, no bias
            norms += 2 * _bn(cout)
            if block == 0 and block_in != cout:  # projection shortcut: 1x1 conv + BN
                weights += cout * block_in
                norms += _bn(cout)
        cin = cout
    weights += 512 * num_classes
    return weights + norms + num_classes, weights


def _counts(layers: list[tuple[int, int]]) -> tuple[int, int]:
    return sum(w + b for w, b in layers), sum(w for w, _ in layers)


EXPECTED = {  # name: (num_classes, total parameters, maskable weights)
    "digits-cnn": (10, *_counts(DIGITS)),
    "mnist-cnn": (10, *_counts(MNIST)),
    "cifar10-cnn": (10, *_counts(CIFAR10)),
    "cifar100-cnn": (100, *_counts(CIFAR100)),
    "femnist-cnn": (62, *_counts(FEMNIST)),
    "resnet18": (10, *_resnet18_counts(10)),
}


def _maskable_count(model: nn.Module) -> int:
    params = dict(model.named_parameters())
    return sum(params[name].numel() for name in maskable_names(model))


def test_registry_keys() -> None:
    assert set(MODELS) == set(EXPECTED)


def test_hand_counts_written_out() -> None:
    """The helpers above agree with fully written-out arithmetic for the headline numbers."""
    assert _counts(CIFAR10) == (
        (6 * 3 * 5 * 5 + 6) + (16 * 6 * 5 * 5 + 16) + (6400 * 120 + 120) + (120 * 84 + 84) + (84 * 10 + 10),
        6 * 3 * 5 * 5 + 16 * 6 * 5 * 5 + 6400 * 120 + 120 * 84 + 84 * 10,
    )
    assert _counts(CIFAR10) == (782_006, 781_770)  # ~782k weights, as in the paper
    assert _counts(MNIST) == (
        (10 * 1 * 5 * 5 + 10) + (20 * 10 * 5 * 5 + 20) + (5120 * 50 + 50) + (50 * 10 + 10),
        261_750,
    )
    assert _counts(FEMNIST) == (
        (32 * 25 + 32) + (64 * 32 * 25 + 64) + (3136 * 2048 + 2048) + (2048 * 62 + 62),
        6_601_504,
    )
    # torchvision's ImageNet-stem resnet18 with 10 classes has 11,181,642 parameters; the
    # 3x3 bias-free stem replaces 64*3*7*7 stem weights by 64*3*3*3.
    assert _resnet18_counts(10)[0] == 11_181_642 - 64 * 3 * 7 * 7 + 64 * 3 * 3 * 3 == 11_173_962


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_parameter_counts(name: str) -> None:
    num_classes, total, maskable = EXPECTED[name]
    model = build_model(name, num_classes, seed=0)
    assert sum(p.numel() for p in model.parameters()) == total
    assert _maskable_count(model) == maskable


def test_resnet18_stem() -> None:
    model = build_model("resnet18", 10, seed=0)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1) and model.conv1.padding == (1, 1)
    assert model.conv1.bias is None
    assert isinstance(model.maxpool, nn.Identity)
    assert len(maskable_names(model)) == 1 + 16 + 3 + 1  # stem, 16 block convs, 3 shortcuts, fc


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_forward_returns_logits(name: str) -> None:
    num_classes = EXPECTED[name][0]
    model = build_model(name, num_classes, seed=0)
    assert len(model.input_shape) == 3
    model.eval()
    with torch.no_grad():
        assert model(torch.zeros(2, *model.input_shape)).shape == (2, num_classes)
        out = model(torch.randn(4, *model.input_shape, generator=torch.Generator().manual_seed(1)))
    assert out.shape == (4, num_classes)
    assert torch.isfinite(out).all()
    assert (out < 0).any()  # not probabilities
    assert not torch.allclose(out.sum(dim=1), torch.ones(4))


def test_no_softmax_modules() -> None:
    for name, (num_classes, _, _) in EXPECTED.items():
        model = build_model(name, num_classes, seed=0)
        assert not any(isinstance(m, (nn.Softmax, nn.LogSoftmax)) for m in model.modules()), name


def test_num_classes_changes_head() -> None:
    model = build_model("cifar10-cnn", 7, seed=0)
    assert model(torch.zeros(1, *model.input_shape)).shape == (1, 7)
    assert _maskable_count(model) == 781_770 - 84 * 10 + 84 * 7


def test_build_model_is_seeded() -> None:
    for name, (num_classes, _, _) in EXPECTED.items():
        a = build_model(name, num_classes, seed=3).state_dict()
        b = build_model(name, num_classes, seed=3).state_dict()
        c = build_model(name, num_classes, seed=4).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
        assert any(not torch.equal(a[k], c[k]) for k in a), name


def test_build_model_errors() -> None:
    with pytest.raises(ValueError, match="no-such-net") as info:
        build_model("no-such-net", 10, seed=0)
    assert "cifar10-cnn" in str(info.value)  # lists the available ones
    with pytest.raises(ValueError, match="num_classes"):
        build_model("mnist-cnn", 0, seed=0)


def test_forward_flops_cifar10_cnn() -> None:
    macs = (
        6 * 28 * 28 * 3 * 5 * 5  # conv1: 6 x 28 x 28 outputs, 3*5*5 MACs each
        + 16 * 22 * 22 * 6 * 5 * 5  # conv2 on the 26x26 pooled map
        + 6400 * 120
        + 120 * 84
        + 84 * 10
    )
    assert forward_flops(build_model("cifar10-cnn", 10, seed=0)) == 2 * macs == 4_586_640  # ~4.6 MFLOPs
