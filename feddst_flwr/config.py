"""Typed, validated view of the run config (`[tool.flwr.app.config]`): a schema of keys, types
and ranges. The names a key may take that the library's tables define (strategy, dataset,
partition, model) are checked where those tables live: `registry.load_config`."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from .codec import VALUE_DTYPES
from .mask_rules import MASK_RULES
from .masks import DISTRIBUTIONS, REGROW
from .server_optimizer import SERVER_OPTIMIZERS
from .training import DEVICES, READJUST_AT

MAX_ROUNDS = 100_000  # num-server-rounds, delta-r, r-end, eval-interval, checkpoint-every
MAX_NODES = 100_000  # clients-per-round, num-partitions, min-votes
MAX_EPOCHS = 1000  # local-epochs
MAX_BATCH = 1_000_000  # batch-size
MAX_GROW_BATCHES = 10_000  # grow-batches
MAX_SEED = 2**32 - 1  # seed: scikit-learn's train_test_split takes no larger one, numpy no negative one


class ConfigError(ValueError):
    """A run-config key is missing or has a bad value."""


@dataclass(frozen=True)
class ExperimentConfig:
    """All run-config keys; defaults live in pyproject.toml, documented in docs/configuration.md."""

    strategy: str
    num_server_rounds: int
    fraction_train: float
    clients_per_round: int
    local_epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    proximal_mu: float
    server_momentum: float
    server_optimizer: str
    server_lr: float
    server_beta2: float
    server_tau: float
    sparsity: float
    sparsity_distribution: str
    alpha: float
    delta_r: int
    r_end: int
    readjust_at: str
    grow_batches: int
    regrow: str
    min_votes: int
    mask_rule: str
    min_fit_fraction: float
    max_num_examples: int
    max_update_norm: float
    round_timeout: float
    client_failure_rate: float
    checkpoint_every: int
    resume: bool
    value_dtype: str
    device: str
    dataset: str
    data_dir: str
    cache_dir: str
    partition: str
    num_partitions: int
    shard_size: int
    classes_per_client: int
    dirichlet_beta: float
    test_fraction: float
    model: str
    eval_interval: int
    seed: int
    results_dir: str
    run_name: str

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> ExperimentConfig:
        """Build from Flower's run config (kebab-case keys); every key is required. The
        names of strategies, datasets, partitions and models are checked by
        `registry.load_config`, which the apps call."""
        values = {}
        for field in fields(cls):
            key = field.name.replace("_", "-")
            if key not in run_config:
                raise ConfigError(f"run config is missing key '{key}'")
            values[field.name] = _coerce(key, run_config[key], str(field.type))  # annotations are strings
        config = cls(**values)
        config.validate()
        return config

    @property
    def name(self) -> str:
        return self.run_name or f"{self.strategy}-{self.dataset}-seed{self.seed}"

    def validate(self) -> None:
        """Raise ConfigError naming the first key of a bad type or out of its range: a float
        that is not finite, or a value outside its range (the upper limits, `MAX_*`, are
        far beyond any experiment's: they stop a typo like local-epochs = 10**9)."""
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"run config '{field.name.replace('_', '-')}' = {value!r}: expected a finite number")
        checks = [
            (1 <= self.num_server_rounds <= MAX_ROUNDS, "num-server-rounds", f"in [1, {MAX_ROUNDS}]"),
            (0.0 < self.fraction_train <= 1.0, "fraction-train", "in (0, 1]"),
            (
                0 <= self.clients_per_round <= MAX_NODES,
                "clients-per-round",
                f"in [0, {MAX_NODES}] (0: use fraction-train)",
            ),
            (1 <= self.local_epochs <= MAX_EPOCHS, "local-epochs", f"in [1, {MAX_EPOCHS}]"),
            (1 <= self.batch_size <= MAX_BATCH, "batch-size", f"in [1, {MAX_BATCH}]"),
            (self.lr > 0, "lr", "> 0"),
            (0.0 <= self.momentum < 1.0, "momentum", "in [0, 1)"),
            (self.weight_decay >= 0, "weight-decay", ">= 0"),
            (self.proximal_mu >= 0, "proximal-mu", ">= 0"),
            (0.0 <= self.server_momentum < 1.0, "server-momentum", "in [0, 1)"),
            (self.server_optimizer in SERVER_OPTIMIZERS, "server-optimizer", f"one of {SERVER_OPTIMIZERS}"),
            (self.server_lr >= 0, "server-lr", ">= 0 (0: 1.0, or 0.01 for adam)"),
            (0.0 <= self.server_beta2 < 1.0, "server-beta2", "in [0, 1)"),
            (self.server_tau > 0, "server-tau", "> 0"),
            (0.0 <= self.sparsity < 1.0, "sparsity", "in [0, 1)"),
            (self.sparsity_distribution in DISTRIBUTIONS, "sparsity-distribution", f"one of {DISTRIBUTIONS}"),
            (0.0 <= self.alpha < 1.0, "alpha", "in [0, 1)"),
            (1 <= self.delta_r <= MAX_ROUNDS, "delta-r", f"in [1, {MAX_ROUNDS}]"),
            (0 <= self.r_end <= MAX_ROUNDS, "r-end", f"in [0, {MAX_ROUNDS}] (0: half the rounds)"),
            (self.readjust_at in READJUST_AT, "readjust-at", f"one of {READJUST_AT}"),
            (1 <= self.grow_batches <= MAX_GROW_BATCHES, "grow-batches", f"in [1, {MAX_GROW_BATCHES}]"),
            (self.regrow in REGROW, "regrow", f"one of {REGROW}"),
            (
                1 <= self.min_votes <= (self.clients_per_round or MAX_NODES),
                "min-votes",
                f"in [1, {self.clients_per_round}] (clients-per-round: no position gets more votes)"
                if self.clients_per_round
                else f"in [1, {MAX_NODES}]",
            ),
            (self.mask_rule in MASK_RULES, "mask-rule", f"one of {MASK_RULES}"),
            (0.0 <= self.min_fit_fraction <= 1.0, "min-fit-fraction", "in [0, 1]"),
            (self.max_num_examples >= 1, "max-num-examples", ">= 1"),
            (
                self.max_update_norm == 0 or self.max_update_norm >= 1,
                "max-update-norm",
                "0 (off) or >= 1 (x the median)",
            ),
            (self.round_timeout > 0, "round-timeout", "> 0 seconds"),
            (0.0 <= self.client_failure_rate < 1.0, "client-failure-rate", "in [0, 1)"),
            (0 <= self.checkpoint_every <= MAX_ROUNDS, "checkpoint-every", f"in [0, {MAX_ROUNDS}] (0: no checkpoints)"),
            (self.value_dtype in VALUE_DTYPES, "value-dtype", f"one of {tuple(VALUE_DTYPES)}"),
            (self.device in DEVICES, "device", f"one of {DEVICES} (auto: CUDA when available)"),
            (
                0 <= self.num_partitions <= MAX_NODES,
                "num-partitions",
                f"in [0, {MAX_NODES}] (0: the number of connected nodes)",
            ),
            (self.shard_size >= 0, "shard-size", ">= 0 (0: split each class among its clients)"),
            (self.classes_per_client >= 1, "classes-per-client", ">= 1"),
            (self.dirichlet_beta > 0, "dirichlet-beta", "> 0"),
            (0.0 < self.test_fraction < 1.0, "test-fraction", "in (0, 1)"),
            (1 <= self.eval_interval <= MAX_ROUNDS, "eval-interval", f"in [1, {MAX_ROUNDS}]"),
            (0 <= self.seed <= MAX_SEED, "seed", f"in [0, {MAX_SEED}] (scikit-learn's and numpy's seed range)"),
        ]
        for ok, key, expected in checks:
            if not ok:
                raise ConfigError(f"run config '{key}' = {getattr(self, key.replace('-', '_'))!r}: expected {expected}")


def _coerce(key: str, value: Any, annotation: str) -> Any:
    """Convert a TOML value to the field's type; ints are accepted for floats."""
    kind = {"int": int, "float": float, "str": str, "bool": bool}[annotation]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ConfigError(f"run config '{key}' = {value!r}: expected {annotation}")
    return value
