"""Shared fixtures: the pyproject run config, small data sets and ERK masks for
DigitsCNN, and the process identity Flower needs to build instruction messages."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
import tomllib
import torch

from feddst_flwr.config import ExperimentConfig
from feddst_flwr.data import TensorData
from feddst_flwr.masks import Masks, layer_counts, maskable_names, random_masks
from feddst_flwr.registry import load_config

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # client_app.py / server_app.py live at the repo root
    sys.path.insert(0, str(ROOT))


def free_ports(start: int, count: int) -> int:
    """The first port from `start` (in steps of `count`) that begins `count` consecutive free
    ports on 127.0.0.1: a SuperLink left over from an interrupted run, or another test session,
    must not answer in our test's stead."""
    for base in range(start, start + 100 * count, count):
        if all(_bindable(port) for port in range(base, base + count)):
            return base
    raise RuntimeError(f"no {count} consecutive free ports on 127.0.0.1 from {start}")


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@pytest.fixture(scope="session")
def pyproject_config() -> dict:
    """[tool.flwr.app.config] exactly as written in pyproject.toml."""
    with open(ROOT / "pyproject.toml", "rb") as handle:
        return tomllib.load(handle)["tool"]["flwr"]["app"]["config"]


@pytest.fixture
def run_config(pyproject_config) -> dict:
    """A mutable copy of the pyproject run config."""
    return dict(pyproject_config)


@pytest.fixture
def make_cfg(pyproject_config):
    """ExperimentConfig from the pyproject config with snake_case overrides
    (small local training by default so client rounds are fast)."""

    def make(**overrides) -> ExperimentConfig:
        values = {"local_epochs": 1, **overrides}
        config = {**pyproject_config, **{k.replace("_", "-"): v for k, v in values.items()}}
        return load_config(config)

    return make


def random_data(n: int = 24, seed: int = 0) -> TensorData:
    """n random 1x8x8 images with labels 0..9."""
    generator = torch.Generator().manual_seed(seed)
    return TensorData(torch.rand(n, 1, 8, 8, generator=generator), torch.randint(0, 10, (n,), generator=generator))


def erk_masks(model: torch.nn.Module, sparsity: float = 0.8, seed: int = 0) -> tuple[Masks, dict[str, int]]:
    """Random ERK masks over the model's maskable weights and their per-layer counts."""
    state = model.state_dict()
    shapes = {name: tuple(state[name].shape) for name in maskable_names(model)}
    counts = layer_counts(shapes, sparsity, "erk")
    return random_masks(shapes, counts, seed), counts


@pytest.fixture
def data() -> TensorData:
    return random_data()


@pytest.fixture
def task_identity(monkeypatch):
    """Flower fills instruction-message metadata from the running task's identity;
    outside the runtime we set one (restored after the test)."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 7)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
