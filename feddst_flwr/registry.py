"""The names a run can use: the strategies (run-config key `strategy`), one table from each
name to what it needs (sparse payload and mask, client readjustment, proximal term, Adam's
server learning rate) and how it is built, with the values derived from it; and the run config
checked against these tables and the datasets', partitions' and models' (`load_config`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx, Strategy

from .config import ConfigError, ExperimentConfig
from .data import DATASETS, PARTITIONS, PartitionScheme
from .models import MODELS
from .prunefl import PruneFL
from .server_optimizer import ServerOptimizer
from .strategy import FedDST
from .validation import ReplyGuard, guarded


@dataclass(frozen=True)
class StrategySpec:
    """What a strategy needs, and its builder (config, maskable names) -> strategy."""

    build: Callable[[ExperimentConfig, list[str]], Strategy]
    sparse: bool = False  # FedDST's sparse payload, mask and round loop (with checkpoints)
    readjusts: bool = False  # clients readjust the mask every delta-r rounds (alpha); else alpha = 0
    proximal: bool = False  # clients add the proximal term (proximal-mu); else mu = 0
    adam: bool = False  # server-lr defaults to 0.01 (else 1.0)


def sampling(cfg: ExperimentConfig) -> dict[str, Any]:
    """Flower's sampling options. Flower's strategies sample max(int(n * fraction_train),
    min_train_nodes) of n connected nodes and have no count of their own: for a fixed count
    (clients-per-round) the fraction is made negligible (1e-9: int(n * 1e-9) = 0 for any real
    federation; 0 itself is refused by Flower) so that the count rides on min_train_nodes."""
    return {
        "fraction_train": cfg.fraction_train if not cfg.clients_per_round else 1e-9,
        "min_train_nodes": cfg.clients_per_round or 2,
        "min_available_nodes": min_available_nodes(cfg),
    }


def min_available_nodes(cfg: ExperimentConfig) -> int:
    """The nodes a round waits for: clients-per-round, at least Flower's 2."""
    return max(cfg.clients_per_round, 2)


def baseline(cls: type[FedAvg], options: Callable[[ExperimentConfig], dict]) -> Callable:
    """A builder of Flower's strategy `cls` behind the reply guard (validation.py), with
    federated evaluation off (every strategy evaluates centrally)."""

    def build(cfg: ExperimentConfig, maskable: list[str]) -> Strategy:
        strategy = guarded(cls)(fraction_evaluate=0.0, **options(cfg), **sampling(cfg))
        guard = cast(ReplyGuard, strategy)  # guarded: a ReplyGuard too
        guard.max_num_examples, guard.max_update_norm = cfg.max_num_examples, cfg.max_update_norm
        guard.round_timeout, guard.min_fit_fraction = cfg.round_timeout, cfg.min_fit_fraction
        return strategy

    return build


def sparse(cls: type[FedDST]) -> Callable:
    """A builder of FedDST or a variant from the run config."""

    def build(cfg: ExperimentConfig, maskable: list[str]) -> FedDST:
        return cls(
            maskable=maskable,
            sparsity=cfg.sparsity,
            sparsity_distribution=cfg.sparsity_distribution,
            alpha=effective_alpha(cfg),
            delta_r=cfg.delta_r,
            r_end=cfg.r_end or None,  # run config: 0 means half the rounds, FedDST's None
            fraction_train=cfg.fraction_train,
            clients_per_round=cfg.clients_per_round,
            min_available_nodes=min_available_nodes(cfg),
            proximal_mu=effective_mu(cfg),
            min_votes=cfg.min_votes,
            mask_rule=cfg.mask_rule,
            min_fit_fraction=cfg.min_fit_fraction,
            max_num_examples=cfg.max_num_examples,
            max_update_norm=cfg.max_update_norm,
            value_dtype=cfg.value_dtype,
            seed=cfg.seed,
            server_optimizer=ServerOptimizer(
                cfg.server_optimizer, effective_server_lr(cfg), cfg.server_momentum, cfg.server_beta2, cfg.server_tau
            ),
        )

    return build


STRATEGIES: dict[str, StrategySpec] = {
    "fedavg": StrategySpec(baseline(FedAvg, lambda cfg: {})),
    "fedavgm": StrategySpec(
        baseline(
            FedAvgM,
            lambda cfg: {"server_learning_rate": effective_server_lr(cfg), "server_momentum": cfg.server_momentum},
        )
    ),
    "fedprox": StrategySpec(baseline(FedProx, lambda cfg: {"proximal_mu": cfg.proximal_mu}), proximal=True),
    "fedadam": StrategySpec(
        baseline(
            FedAdam,
            lambda cfg: {
                "eta": effective_server_lr(cfg),
                "eta_l": cfg.lr,
                "beta_1": cfg.server_momentum,
                "beta_2": cfg.server_beta2,
                "tau": cfg.server_tau,
            },
        ),  # fmt: skip
        adam=True,
    ),
    "feddst": StrategySpec(sparse(FedDST), sparse=True, readjusts=True),
    "feddst-prox": StrategySpec(sparse(FedDST), sparse=True, readjusts=True, proximal=True),
    "randommask": StrategySpec(sparse(FedDST), sparse=True),  # FedDST whose random ERK mask never moves
    "prunefl": StrategySpec(sparse(PruneFL), sparse=True),  # its server reconfigures; clients never readjust
}


def build_strategy(cfg: ExperimentConfig, maskable: list[str]) -> Strategy:
    """The run config's strategy."""
    return STRATEGIES[cfg.strategy].build(cfg, maskable)


def is_sparse(cfg: ExperimentConfig) -> bool:
    """The run's strategy sends FedDST's sparse payload (and runs FedDST's round loop)."""
    return STRATEGIES[cfg.strategy].sparse


def effective_alpha(cfg: ExperimentConfig) -> float:
    """alpha for strategies whose clients readjust, else 0 (randommask: the random ERK mask
    never moves; PruneFL: its server reconfigures)."""
    return cfg.alpha if STRATEGIES[cfg.strategy].readjusts else 0.0


def effective_mu(cfg: ExperimentConfig) -> float:
    """Proximal coefficient of strategies that use one (fedprox, feddst-prox), else 0."""
    return cfg.proximal_mu if STRATEGIES[cfg.strategy].proximal else 0.0


def effective_server_lr(cfg: ExperimentConfig) -> float:
    """server-lr, or its default: 0.01 for Adam (fedadam, server-optimizer adam), else 1.0."""
    adam = STRATEGIES[cfg.strategy].adam or (is_sparse(cfg) and cfg.server_optimizer == "adam")
    return cfg.server_lr or (0.01 if adam else 1.0)


def partition_scheme(cfg: ExperimentConfig, num_partitions: int) -> PartitionScheme:
    """The run config's partition of the training set over `num_partitions` clients."""
    return PartitionScheme(
        cfg.partition, num_partitions, cfg.shard_size, cfg.classes_per_client, cfg.dirichlet_beta, cfg.seed
    )


def load_config(run_config: Mapping[str, Any]) -> ExperimentConfig:
    """Flower's run config, parsed (`ExperimentConfig.from_run_config`) and its names checked
    against the library's tables.

    Parameters
    ----------
    run_config : Mapping[str, Any]
        `context.run_config`: every key of pyproject's `[tool.flwr.app.config]`.

    Returns
    -------
    ExperimentConfig
        The typed config.

    Raises
    ------
    ConfigError
        Naming the first key that is missing, of a wrong type, out of range or an unknown name.
    """
    cfg = ExperimentConfig.from_run_config(run_config)
    sparse = tuple(name for name, spec in STRATEGIES.items() if spec.sparse)
    checks = [
        (cfg.strategy in STRATEGIES, "strategy", f"one of {tuple(STRATEGIES)}"),
        (cfg.dataset in DATASETS, "dataset", f"one of {DATASETS}"),
        (cfg.partition in PARTITIONS, "partition", f"one of {PARTITIONS}"),
        (cfg.model in MODELS, "model", f"one of {tuple(MODELS)}"),
        (cfg.strategy in sparse or not cfg.checkpoint_every, "checkpoint-every",
         f"0 for Flower's baseline strategies (checkpoints: {sparse})"),
        (cfg.strategy in sparse or not cfg.resume, "resume", f"false for Flower's baseline strategies (resume: {sparse})"),
    ]  # fmt: skip
    for ok, key, expected in checks:
        if not ok:
            raise ConfigError(f"run config '{key}' = {getattr(cfg, key.replace('-', '_'))!r}: expected {expected}")
    return cfg
