"""Models. None ends in softmax: they return logits for CrossEntropyLoss.

Every model takes `num_classes` as its first constructor argument and has a class attribute
`input_shape`, the (C, H, W) shape of one sample (used e.g. by `metrics.forward_flops`).
The paper's models (FedDST, Bibikar et al. AAAI 2022, from the authors' code) are the
MNIST, CIFAR-10 and CIFAR-100 CNNs; FEMNIST uses LEAF's CNN and ResNet-18 is the CIFAR
variant (3x3 stem, no max-pool) used by later FedDST comparisons."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from functools import partial

import torch
import torchvision
from torch import Tensor, nn


class DigitsCNN(nn.Module):
    """Small CNN for scikit-learn's 8x8 digits: 2 conv (w, 2w channels) + 2 linear layers."""

    input_shape = (1, 8, 8)

    def __init__(self, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(2 * width * 4 * 4, 4 * width)
        self.fc2 = nn.Linear(4 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x).relu()
        x = self.pool(self.conv2(x).relu())
        return self.fc2(self.fc1(x.flatten(1)).relu())


class ConvNet(nn.Module):
    """Two conv + ReLU + max-pool stages, then linear layers with ReLU between them: the
    shape of the paper's MNIST/CIFAR CNNs and of LEAF's FEMNIST CNN."""

    def __init__(
        self,
        num_classes: int,
        input_shape: tuple[int, int, int],
        channels: tuple[int, int],
        hidden: tuple[int, ...],
        kernel: int = 5,
        padding: int = 0,
        pool: tuple[int, int] = (3, 1),  # (kernel, stride)
    ) -> None:
        super().__init__()
        self.input_shape = input_shape
        self.conv1 = nn.Conv2d(input_shape[0], channels[0], kernel, padding=padding)
        self.conv2 = nn.Conv2d(channels[0], channels[1], kernel, padding=padding)
        self.pool = nn.MaxPool2d(pool[0], stride=pool[1])
        with torch.no_grad():
            flat = self.features(torch.zeros(1, *input_shape)).shape[1]
        sizes = (flat, *hidden, num_classes)
        self.fc = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))

    def features(self, x: Tensor) -> Tensor:
        x = self.pool(self.conv1(x).relu())
        return self.pool(self.conv2(x).relu()).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        for layer in self.fc[:-1]:
            x = layer(x).relu()
        return self.fc[-1](x)


class ResNet18(torchvision.models.ResNet):
    """CIFAR ResNet-18: torchvision's resnet18 (no pretrained weights) with a 3x3 stride-1
    stem conv without bias and no stem max-pool, for 32x32 inputs."""

    input_shape = (3, 32, 32)

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(torchvision.models.resnet.BasicBlock, [2, 2, 2, 2], num_classes=num_classes)
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision's init
        self.maxpool = nn.Identity()


# name -> constructor taking num_classes. Flattened sizes: MNIST 28-conv5->24-pool3/1->22
# -conv5->18-pool3/1->16: 20*16*16 = 5120; CIFAR 32->28->26->22->20: 16*20*20 = 6400
# (~782k weights, ~4.6 MFLOPs); LEAF FEMNIST 28-conv5 pad2->28-pool2->14->14->7: 64*7*7 = 3136.
MODELS: dict[str, Callable[[int], nn.Module]] = {
    "digits-cnn": DigitsCNN,
    "mnist-cnn": partial(ConvNet, input_shape=(1, 28, 28), channels=(10, 20), hidden=(50,)),
    "cifar10-cnn": partial(ConvNet, input_shape=(3, 32, 32), channels=(6, 16), hidden=(120, 84)),
    "cifar100-cnn": partial(ConvNet, input_shape=(3, 32, 32), channels=(6, 16), hidden=(120,)),
    "femnist-cnn": partial(ConvNet, input_shape=(1, 28, 28), channels=(32, 64), hidden=(2048,), padding=2, pool=(2, 2)),
    "resnet18": ResNet18,
}


def build_model(name: str, num_classes: int, seed: int) -> nn.Module:
    """Instantiate a model by run-config name for `num_classes` classes, with initial
    weights seeded by `seed` (torch.manual_seed before construction)."""
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}'; available: {sorted(MODELS)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    torch.manual_seed(seed)
    return MODELS[name](int(num_classes))
