"""The strategies a run can name (run-config key `strategy`): one table from each name to
what it needs (sparse payload and mask, client readjustment, proximal term, Adam's server
learning rate) and how it is built."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx, Strategy

from .prunefl import PruneFL
from .server_optimizer import ServerOptimizer
from .strategy import FedDST
from .validation import guarded

if TYPE_CHECKING:
    from .config import ExperimentConfig


@dataclass(frozen=True)
class StrategySpec:
    """What a strategy needs, and its builder (config, maskable names) -> strategy."""

    build: Callable[[ExperimentConfig, list[str]], Strategy]
    sparse: bool = False  # FedDST's sparse payload, mask and round loop (with checkpoints)
    readjusts: bool = False  # clients readjust the mask every delta-r rounds (alpha); else alpha = 0
    proximal: bool = False  # clients add the proximal term (proximal-mu); else mu = 0
    adam: bool = False  # server-lr defaults to 0.01 (else 1.0)


def sampling(cfg: ExperimentConfig) -> dict[str, float | int]:
    """Flower's sampling options: max(int(n * fraction), min_train_nodes) nodes, so a fixed
    count (clients-per-round) rides on the minimum."""
    return {
        "fraction_train": cfg.fraction_train if not cfg.clients_per_round else 1e-9,
        "min_train_nodes": cfg.clients_per_round or 2,
        "min_available_nodes": max(cfg.clients_per_round, 2),
    }


def baseline(cls: type[Strategy], options: Callable[[ExperimentConfig], dict]) -> Callable:
    """A builder of Flower's strategy `cls` behind the reply guard (validation.py), with
    federated evaluation off (every strategy evaluates centrally)."""

    def build(cfg: ExperimentConfig, maskable: list[str]) -> Strategy:
        strategy = guarded(cls)(fraction_evaluate=0.0, **options(cfg), **sampling(cfg))
        strategy.max_num_examples, strategy.max_update_norm = cfg.max_num_examples, cfg.max_update_norm
        return strategy

    return build


def sparse(cls: type[FedDST]) -> Callable:
    """A builder of FedDST or a variant from the run config."""

    def build(cfg: ExperimentConfig, maskable: list[str]) -> FedDST:
        return cls(
            maskable=maskable,
            sparsity=cfg.sparsity,
            sparsity_distribution=cfg.sparsity_distribution,
            alpha=cfg.effective_alpha,
            delta_r=cfg.delta_r,
            r_end=cfg.r_end or None,  # run config: 0 means half the rounds, FedDST's None
            fraction_train=cfg.fraction_train,
            clients_per_round=cfg.clients_per_round,
            min_available_nodes=sampling(cfg)["min_available_nodes"],
            proximal_mu=cfg.effective_mu,
            min_votes=cfg.min_votes,
            mask_rule=cfg.mask_rule,
            min_fit_fraction=cfg.min_fit_fraction,
            max_num_examples=cfg.max_num_examples,
            max_update_norm=cfg.max_update_norm,
            value_dtype=cfg.value_dtype,
            seed=cfg.seed,
            server_optimizer=ServerOptimizer(
                cfg.server_optimizer, cfg.effective_server_lr, cfg.server_momentum, cfg.server_beta2, cfg.server_tau
            ),
        )

    return build


STRATEGIES: dict[str, StrategySpec] = {
    "fedavg": StrategySpec(baseline(FedAvg, lambda cfg: {})),
    "fedavgm": StrategySpec(
        baseline(
            FedAvgM,
            lambda cfg: {"server_learning_rate": cfg.effective_server_lr, "server_momentum": cfg.server_momentum},
        )
    ),
    "fedprox": StrategySpec(baseline(FedProx, lambda cfg: {"proximal_mu": cfg.proximal_mu}), proximal=True),
    "fedadam": StrategySpec(
        baseline(
            FedAdam,
            lambda cfg: {
                "eta": cfg.effective_server_lr,
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
