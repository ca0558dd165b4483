"""The `device` run-config key: training, readjustment and the server's evaluation run on it
(CUDA when `auto` finds one); encoding stays on the CPU. CUDA tests run where torch finds a
CUDA device and are skipped with the reason otherwise."""

from __future__ import annotations

import pytest
import torch
from fakes import Server, new_model, round_config, run_client
from flwr.app import RecordDict

from feddst_flwr.config import ConfigError
from feddst_flwr.training import evaluate, resolve_device

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="torch finds no CUDA device on this machine")


def test_auto_is_cuda_when_available_else_cpu():
    assert resolve_device("auto").type == ("cuda" if CUDA else "cpu")
    assert resolve_device("cpu").type == "cpu"


@pytest.mark.skipif(CUDA, reason="this machine has CUDA")
def test_cuda_without_a_cuda_device_is_a_clear_error():
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_device("cuda")


def test_unknown_device_is_a_config_error(make_cfg):
    with pytest.raises(ConfigError, match="device"):
        make_cfg(device="tpu")


def test_cpu_and_auto_give_the_same_round_on_a_cpu_machine(make_cfg, data):
    if CUDA:
        pytest.skip("auto is CUDA here; see the CUDA test")
    server = Server(new_model())
    replies = [
        run_client(new_model(), data, server.payload(True), round_config(5, 0, 0.2), make_cfg(device=device), RecordDict(), 0)
        for device in ("cpu", "auto")
    ]  # fmt: skip
    assert all(replies[0].arrays[name].data == replies[1].arrays[name].data for name in replies[0].arrays)


@needs_cuda
def test_a_cuda_round_matches_the_cpu_round(make_cfg, data):
    """Masks after readjustment nearly the same (GPU float sums differ in the last bits, so
    near-ties may fall the other way), values close where the masks agree."""
    server = Server(new_model())
    decoded = [
        server.decode(run_client(new_model(), data, server.payload(True), round_config(5, 0, 0.2),
                                   make_cfg(device=device), RecordDict(), 0).arrays)
        for device in ("cpu", "cuda")
    ]  # fmt: skip
    assert decoded[0].mask_sent and decoded[1].mask_sent
    for name, mask in decoded[0].masks.items():
        agree = mask == decoded[1].masks[name]
        assert agree.float().mean() > 0.99, name
        assert torch.allclose(decoded[0].state[name][agree], decoded[1].state[name][agree], atol=1e-3), name


@needs_cuda
def test_evaluation_on_cuda_matches_the_cpu(data):
    model = new_model()
    on_cpu = evaluate(model, data, 10)
    on_cuda = evaluate(model.to("cuda"), data.to(torch.device("cuda")), 10)
    assert on_cpu.accuracy == on_cuda.accuracy and abs(on_cpu.loss - on_cuda.loss) < 1e-4
