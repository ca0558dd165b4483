"""ServerApp: wires the run config to a strategy (FedDST or a Flower baseline), the byte
meter and the per-round recorder."""

import random
from functools import partial
from logging import ERROR

import numpy as np
from flwr.app import ArrayRecord, Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from feddst_flwr.checkpoint import after_round, resume_point
from feddst_flwr.config import ConfigError, ExperimentConfig
from feddst_flwr.data import (
    SPECS,
    DatasetError,
    PartitionScheme,
    RawDataset,
    client_test_weights,
    load_raw,
    partitions,
    to_tensors,
)
from feddst_flwr.grid import MeteredGrid, OrderedGrid, check_partition_ids, partition_ids
from feddst_flwr.masks import maskable_names
from feddst_flwr.metrics import RoundRecorder
from feddst_flwr.models import build_model
from feddst_flwr.registry import build_strategy, is_sparse, load_config, partition_scheme

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the configured experiment; results go to <results-dir>/<run-name>/."""
    cfg = load_config(context.run_config)
    random.seed(cfg.seed)  # Flower's baseline strategies sample with the global RNG
    num_classes = SPECS[cfg.dataset].num_classes
    model = build_model(cfg.model, num_classes, cfg.seed)
    raw = load_raw(cfg.dataset, cfg.data_dir, cfg.cache_dir, cfg.test_fraction, cfg.seed)
    metered = MeteredGrid(grid)  # payload bytes of every message and reply
    order = partition_ids(grid)
    scheme = partition_scheme(cfg, cfg.num_partitions or len(list(grid.get_node_ids())))
    check_partition_ids(order, scheme.num_partitions)
    ordered = OrderedGrid(metered, order)  # stable node and reply order: reproducible runs
    client_weights = client_test_weights(raw, federation_partitions(raw, scheme, cfg), scheme, num_classes)
    strategy = build_strategy(cfg, maskable_names(model))
    sparse = is_sparse(cfg)
    mask_state = (lambda: (strategy.masks, strategy.stats)) if sparse else None
    test_data = to_tensors(cfg.dataset, raw.x_test, raw.y_test)
    initial_arrays = ArrayRecord(model.state_dict())  # on the CPU; the recorder moves the model to cfg.device
    recorder = RoundRecorder(
        cfg, num_classes, model, test_data, client_weights, metered, mask_state, lambda: strategy.health
    )
    run = {"grid": ordered, "initial_arrays": initial_arrays,
           "num_rounds": cfg.num_server_rounds, "timeout": cfg.round_timeout}  # fmt: skip
    if not sparse:  # Flower's own loop; no checkpoints (see registry.load_config)
        strategy.start(**run, evaluate_fn=recorder)
        return
    resume = resume_point(cfg, recorder)
    strategy.start(**run, evaluate_fn=partial(after_round, cfg, strategy, recorder), resume=resume)


def federation_partitions(raw: RawDataset, scheme: PartitionScheme, cfg: ExperimentConfig) -> tuple[np.ndarray, ...]:
    """The clients' training indices; a federation too small for the partition is a
    ConfigError that says how to fix it, logged as one line before Flower's traceback."""
    try:
        return partitions(raw, scheme)
    except DatasetError:  # a damaged partition cache, named: not a split problem
        raise
    except ValueError as err:
        size = "num-partitions" if cfg.num_partitions else f"the federation's {scheme.num_partitions} SuperNodes"
        message = (
            f"cannot split {cfg.dataset} over {size}: {err}. Flower's default local simulation has 2 "
            'SuperNodes; the README runs with --federation-config "num-supernodes=50 client-resources-num-cpus=1"'
        )
        log(ERROR, "feddst-flwr: %s", message)
        raise ConfigError(message) from err
