"""Models. None ends in softmax: they return logits for CrossEntropyLoss.

Every model takes `num_classes` as its first constructor argument and has a class attribute
`input_shape`, the (C, H, W) shape of one sample (used e.g. by `metrics.forward_flops`).
The paper's models (FedDST, Bibikar et al. AAAI 2022, from the authors' code) are the
MNIST, CIFAR-10 and CIFAR-100 CNNs; FEMNIST uses LEAF's CNN and ResNet-18 is the CIFAR
variant (3x3 stem, no max-pool) used by later FedDST comparisons."""

from __future__ import annotations

import numbers

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


class MNISTCNN(nn.Module):
    """The paper's MNIST CNN: 28 -conv5-> 24 -pool3/1-> 22 -conv5-> 18 -pool3/1-> 16,
    so the flattened size is 20 * 16 * 16 = 5120."""

    input_shape = (1, 28, 28)

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, 5)
        self.conv2 = nn.Conv2d(10, 20, 5)
        self.pool = nn.MaxPool2d(3, stride=1)
        self.fc1 = nn.Linear(20 * 16 * 16, 50)
        self.fc2 = nn.Linear(50, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.conv1(x).relu())
        x = self.pool(self.conv2(x).relu())
        return self.fc2(self.fc1(x.flatten(1)).relu())


class CIFAR10CNN(nn.Module):
    """The paper's CIFAR-10 CNN (~782k weights, ~4.6 MFLOPs): 32 -conv5-> 28 -pool3/1-> 26
    -conv5-> 22 -pool3/1-> 20, so the flattened size is 16 * 20 * 20 = 6400."""

    input_shape = (3, 32, 32)

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.pool = nn.MaxPool2d(3, stride=1)
        self.fc1 = nn.Linear(16 * 20 * 20, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.conv1(x).relu())
        x = self.pool(self.conv2(x).relu())
        x = self.fc1(x.flatten(1)).relu()
        return self.fc3(self.fc2(x).relu())


class CIFAR100CNN(nn.Module):
    """The paper's CIFAR-100 CNN: the CIFAR-10 CNN without the 84-unit layer."""

    input_shape = (3, 32, 32)

    def __init__(self, num_classes: int = 100) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.pool = nn.MaxPool2d(3, stride=1)
        self.fc1 = nn.Linear(16 * 20 * 20, 120)
        self.fc2 = nn.Linear(120, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.conv1(x).relu())
        x = self.pool(self.conv2(x).relu())
        return self.fc2(self.fc1(x.flatten(1)).relu())


class FEMNISTCNN(nn.Module):
    """LEAF's FEMNIST CNN: 28 -conv5 pad2-> 28 -pool2-> 14 -conv5 pad2-> 14 -pool2-> 7,
    so the flattened size is 64 * 7 * 7 = 3136."""

    input_shape = (1, 28, 28)

    def __init__(self, num_classes: int = 62) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, 5, padding=2)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(64 * 7 * 7, 2048)
        self.fc2 = nn.Linear(2048, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.conv1(x).relu())
        x = self.pool(self.conv2(x).relu())
        return self.fc2(self.fc1(x.flatten(1)).relu())


class ResNet18(torchvision.models.ResNet):
    """CIFAR ResNet-18: torchvision's resnet18 (no pretrained weights) with a 3x3 stride-1
    stem conv without bias and no stem max-pool, for 32x32 inputs."""

    input_shape = (3, 32, 32)

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(torchvision.models.resnet.BasicBlock, [2, 2, 2, 2], num_classes=num_classes)
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision's init
        self.maxpool = nn.Identity()


MODELS: dict[str, type[nn.Module]] = {
    "digits-cnn": DigitsCNN,
    "mnist-cnn": MNISTCNN,
    "cifar10-cnn": CIFAR10CNN,
    "cifar100-cnn": CIFAR100CNN,
    "femnist-cnn": FEMNISTCNN,
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
