"""Tests for feddst_flwr.config (run-config parsing and validation) and for the
measurements in feddst_flwr.metrics (forward FLOPs)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from feddst_flwr.config import ConfigError, ExperimentConfig
from feddst_flwr.data import SPECS, PartitionScheme
from feddst_flwr.metrics import forward_flops
from feddst_flwr.models import DigitsCNN
from feddst_flwr.registry import build_strategy, effective_alpha, effective_mu, is_sparse, load_config, partition_scheme
from feddst_flwr.strategy import FedDST

KEYS = [field.name.replace("_", "-") for field in dataclasses.fields(ExperimentConfig)]


def parse(run_config: dict, **changes) -> ExperimentConfig:
    return load_config({**run_config, **changes})


# --------------------------------------------------------------------------- config


def test_pyproject_config_parses(pyproject_config):
    assert set(pyproject_config) == set(KEYS)  # every key documented in pyproject, none extra
    cfg = load_config(pyproject_config)
    assert (cfg.strategy, cfg.num_server_rounds, cfg.local_epochs, cfg.batch_size) == ("feddst", 60, 10, 8)
    assert (cfg.lr, cfg.weight_decay, cfg.sparsity, cfg.alpha, cfg.delta_r) == (0.1, 1e-3, 0.8, 0.3, 5)
    assert is_sparse(cfg) and effective_alpha(cfg) == 0.3 and cfg.readjust_at == "mid" and effective_mu(cfg) == 0.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("key", KEYS)
def test_missing_key_is_named(run_config, key):
    del run_config[key]
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(run_config)


@pytest.mark.parametrize(
    "key, value",
    [
        ("local-epochs", "10"),
        ("local-epochs", 10.0),
        ("seed", True),
        ("lr", "0.1"),
        ("lr", True),
        ("strategy", 3),
        ("run-name", 0),
        ("sparsity", None),
        ("num-partitions", 2.0),
        ("shard-size", "20"),
        ("dirichlet-beta", "0.5"),
        ("data-dir", 0),
        ("partition", None),
    ],
)
def test_wrong_type_is_named(run_config, key, value):
    with pytest.raises(ConfigError, match=f"'{key}'.*expected"):
        parse(run_config, **{key: value})


def test_int_is_accepted_for_float(run_config):
    cfg = parse(run_config, **{"lr": 1, "weight-decay": 0})
    assert isinstance(cfg.lr, float) and cfg.lr == 1.0
    assert isinstance(cfg.weight_decay, float) and cfg.weight_decay == 0.0


OUT_OF_RANGE = [
    ("strategy", "fedsgd"), ("num-server-rounds", 0), ("fraction-train", 0.0), ("fraction-train", 1.5),
    ("clients-per-round", -1), ("local-epochs", 0), ("batch-size", 0), ("lr", 0.0), ("lr", -0.1),
    ("momentum", 1.0), ("momentum", -0.1), ("weight-decay", -1e-4), ("proximal-mu", -0.01),
    ("server-momentum", 1.0), ("server-momentum", -0.5), ("sparsity", 1.0), ("sparsity", -0.1),
    ("sparsity-distribution", "gaussian"), ("alpha", 1.0), ("alpha", -0.01), ("delta-r", 0), ("r-end", -1),
    ("grow-batches", 0), ("min-votes", 0), ("value-dtype", "bfloat16"), ("test-fraction", 0.0),
    ("test-fraction", 1.0), ("eval-interval", 0), ("dataset", "imagenet"), ("model", "resnet-1000"),
    ("server-optimizer", "sgd"), ("server-lr", -0.1), ("server-beta2", 1.0), ("server-tau", 0.0),
    ("partition", "shards"), ("num-partitions", -1), ("shard-size", -1), ("classes-per-client", 0),
    ("dirichlet-beta", 0.0), ("dirichlet-beta", -0.5),
]  # fmt: skip


ABOVE_LIMIT = [  # the upper limits: far beyond any experiment, they stop a typo
    ("num-server-rounds", 100_001), ("clients-per-round", 100_001), ("local-epochs", 1001),
    ("local-epochs", 10**9), ("batch-size", 1_000_001), ("delta-r", 100_001), ("r-end", 100_001),
    ("grow-batches", 10_001), ("checkpoint-every", 100_001), ("num-partitions", 100_001),
    ("eval-interval", 100_001), ("seed", 2**32), ("seed", -1),
    ("lr", math.inf), ("round-timeout", math.inf), ("max-update-norm", math.inf), ("dirichlet-beta", math.inf),
    ("weight-decay", math.inf), ("proximal-mu", math.nan),
]  # fmt: skip
OUT_OF_RANGE += ABOVE_LIMIT


@pytest.mark.parametrize("key, value", OUT_OF_RANGE)
def test_out_of_range_value_is_named(run_config, key, value):
    with pytest.raises(ConfigError, match=f"'{key}' = {value!r}"):
        parse(run_config, **{key: value})


BOUNDARIES = [
    ("fraction-train", 1.0), ("clients-per-round", 0), ("momentum", 0.0), ("momentum", 0.99),
    ("weight-decay", 0.0), ("server-momentum", 0.0), ("sparsity", 0.0), ("alpha", 0.0), ("r-end", 0),
    ("num-server-rounds", 1), ("strategy", "randommask"), ("sparsity-distribution", "uniform"),
    ("value-dtype", "float16"), ("num-partitions", 0), ("shard-size", 0), ("classes-per-client", 1),
    ("dirichlet-beta", 1e-3), ("partition", "iid"), ("partition", "dirichlet"), ("partition", "natural"),
    ("dataset", "femnist"), ("data-dir", "/some/where"), ("cache-dir", "/tmp/cache"),
]  # fmt: skip


BOUNDARIES += [
    ("num-server-rounds", 100_000), ("clients-per-round", 100_000), ("local-epochs", 1000),
    ("batch-size", 1_000_000), ("delta-r", 100_000), ("r-end", 100_000), ("grow-batches", 10_000),
    ("checkpoint-every", 100_000), ("num-partitions", 100_000), ("eval-interval", 100_000), ("seed", 0),
    ("seed", 2**32 - 1),
]  # fmt: skip


@pytest.mark.parametrize("key, value", BOUNDARIES)
def test_boundary_values_are_accepted(run_config, key, value):
    cfg = parse(run_config, **{key: value})
    assert getattr(cfg, key.replace("-", "_")) == value


def test_a_billion_local_epochs_is_an_error_naming_the_key_and_its_range(run_config):
    """Before: accepted, and the node started training."""
    with pytest.raises(ConfigError, match=r"^run config 'local-epochs' = 1000000000: expected in \[1, 1000\]$"):
        parse(run_config, **{"local-epochs": 10**9})


def test_a_non_finite_float_is_an_error_naming_the_key(run_config):
    with pytest.raises(ConfigError, match=r"^run config 'round-timeout' = inf: expected a finite number$"):
        parse(run_config, **{"round-timeout": math.inf})


def test_min_votes_beyond_clients_per_round_is_an_error(run_config):
    """No position can get more votes than there are replies: every weight would be zero."""
    assert parse(run_config, **{"clients-per-round": 10, "min-votes": 10}).min_votes == 10
    with pytest.raises(
        ConfigError, match=r"^run config 'min-votes' = 11: expected in \[1, 10\] \(clients-per-round: no position"
    ):
        parse(run_config, **{"clients-per-round": 10, "min-votes": 11})
    with pytest.raises(ConfigError, match=r"^run config 'min-votes' = 100001: expected in \[1, 100000\]$"):
        parse(run_config, **{"clients-per-round": 0, "min-votes": 100_001})


def test_partition_scheme_and_num_classes(run_config):
    changes = {"partition": "dirichlet", "shard-size": 7, "classes-per-client": 3, "dirichlet-beta": 2, "seed": 5}
    cfg = parse(run_config, dataset="cifar100", **changes)
    assert partition_scheme(cfg, 12) == PartitionScheme("dirichlet", 12, 7, 3, 2.0, 5)
    assert SPECS[cfg.dataset].num_classes == 100


def test_pyproject_data_defaults(pyproject_config):
    cfg = load_config(pyproject_config)
    assert (cfg.dataset, cfg.data_dir, cfg.cache_dir, cfg.test_fraction) == ("digits", "", "", 0.2)
    # the paper's pathological split: 2 classes per client, each class split among its holders
    assert partition_scheme(cfg, 50) == PartitionScheme("pathological", 50, 0, 2, 0.5, 0)
    assert cfg.num_partitions == 0  # 0: one partition per connected node


@pytest.mark.parametrize("rounds, r_end, expected", [(60, 0, 30), (61, 0, 30), (1, 0, 0), (60, 7, 7), (10, 25, 25)])
def test_r_end_zero_is_half_the_rounds_in_the_run_config_and_none_in_feddst(run_config, rounds, r_end, expected):
    cfg = parse(run_config, **{"num-server-rounds": rounds, "r-end": r_end})
    strategy = build_strategy(cfg, ["fc1.weight"])
    assert strategy.r_end == (r_end or None)
    strategy.resolve_r_end(rounds)
    assert strategy.readjust_end == expected


def test_feddst_r_end_none_before_start_is_a_clear_error():
    strategy = FedDST(maskable=["fc1.weight"])
    assert (strategy.alpha, strategy.delta_r, strategy.r_end) == (0.3, 5, None)  # the measured defaults
    with pytest.raises(ValueError, match=r"r_end=None\) means half of num_rounds"):
        _ = strategy.readjust_end
    assert FedDST(maskable=["fc1.weight"], r_end=0).readjust_end == 0  # 0: never readjust


def test_run_name_default_and_override(run_config):
    assert parse(run_config).name == "feddst-digits-seed0"
    assert parse(run_config, strategy="fedavgm", seed=3).name == "fedavgm-digits-seed3"
    assert parse(run_config, **{"run-name": "mine"}).name == "mine"


@pytest.mark.parametrize(
    "strategy, sparse, alpha, mu",
    [("fedavg", False, 0.0, 0.0), ("fedavgm", False, 0.0, 0.0), ("fedprox", False, 0.0, 0.02),
     ("fedadam", False, 0.0, 0.0), ("feddst", True, 0.3, 0.0), ("feddst-prox", True, 0.3, 0.02),
     ("randommask", True, 0.0, 0.0), ("prunefl", True, 0.0, 0.0)],
)  # fmt: skip
def test_strategy_derived_properties(run_config, strategy, sparse, alpha, mu):
    cfg = parse(run_config, strategy=strategy, **{"proximal-mu": 0.02})
    assert (is_sparse(cfg), effective_alpha(cfg), effective_mu(cfg)) == (sparse, alpha, mu)


# --------------------------------------------------------------------------- forward FLOPs

# DigitsCNN(width 32) on 1x8x8, per sample (multiply-adds):
#   conv1 3x3, 1 -> 32, 8x8 output:   32*1*9  = 288 weights   x 64 positions = 18,432
#   conv2 3x3, 32 -> 64, 8x8 output:  64*32*9 = 18,432       x 64 positions = 1,179,648
#   fc1 1024 -> 128:                  131,072
#   fc2 128 -> 10:                    1,280
DENSE_MACS = 18_432 + 1_179_648 + 131_072 + 1_280


def first_k_mask(shape: tuple[int, ...], k: int) -> torch.Tensor:
    flat = torch.zeros(math.prod(shape), dtype=torch.bool)
    flat[:k] = True
    return flat.view(shape)


def test_forward_flops_dense_digits_cnn():
    assert DENSE_MACS == 1_330_432
    assert forward_flops(DigitsCNN()) == 2 * DENSE_MACS == 2_660_864


def test_forward_flops_counts_active_weights_only():
    model = DigitsCNN()
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters() if name.endswith("weight")}
    active = {"conv1.weight": 100, "conv2.weight": 1_000, "fc1.weight": 10_000, "fc2.weight": 50}
    masks = {name: first_k_mask(shapes[name], k) for name, k in active.items()}
    assert forward_flops(model, masks) == 2 * (100 * 64 + 1_000 * 64 + 10_000 + 50) == 160_900
    # a layer without a mask counts dense
    partial = {"fc1.weight": masks["fc1.weight"]}
    assert forward_flops(model, partial) == 2 * (DENSE_MACS - 131_072 + 10_000)


def test_forward_flops_does_not_change_the_model():
    model = DigitsCNN()
    before = {name: t.clone() for name, t in model.state_dict().items()}
    forward_flops(model)
    assert all(torch.equal(before[name], t) for name, t in model.state_dict().items())
    assert not any(module._forward_hooks for module in model.modules())


def test_forward_flops_masks_a_root_level_layer():
    from feddst_flwr.masks import maskable_names

    model = nn.Linear(4, 3)
    model.input_shape = (4,)
    (name,) = maskable_names(model)  # "weight"
    masks = {name: first_k_mask((3, 4), 5)}
    assert forward_flops(model, masks) == 2 * 5
