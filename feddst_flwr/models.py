"""Models. None ends in softmax: they return logits for CrossEntropyLoss."""

from __future__ import annotations

import torch
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


MODELS = {"digits-cnn": DigitsCNN}


def build_model(name: str, seed: int) -> nn.Module:
    """Instantiate a model by run-config name with seeded initial weights."""
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}'; available: {sorted(MODELS)}")
    torch.manual_seed(seed)
    return MODELS[name]()
