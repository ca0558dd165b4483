"""ServerApp: wires the run config to a strategy (FedDST or a Flower baseline), the byte
meter and the per-round recorder."""

import random
from functools import partial
from logging import ERROR, INFO

import numpy as np
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from feddst_flwr.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from feddst_flwr.config import ConfigError, ExperimentConfig
from feddst_flwr.data import PartitionScheme, RawDataset, client_test_weights, load_raw, partitions, to_tensors
from feddst_flwr.grid import MeteredGrid, OrderedGrid, partition_ids
from feddst_flwr.masks import maskable_names
from feddst_flwr.metrics import RoundRecorder
from feddst_flwr.models import build_model
from feddst_flwr.registry import build_strategy
from feddst_flwr.strategy import FedDST

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the configured experiment; results go to <results-dir>/<run-name>/."""
    cfg = ExperimentConfig.from_run_config(context.run_config)
    random.seed(cfg.seed)  # Flower's baseline strategies sample with the global RNG
    model = build_model(cfg.model, cfg.num_classes, cfg.seed)
    raw = load_raw(cfg.dataset, cfg.data_dir, cfg.cache_dir, cfg.test_fraction, cfg.seed)
    metered = MeteredGrid(grid)  # payload bytes of every message and reply
    ordered = OrderedGrid(metered, partition_ids(grid))  # stable node and reply order: reproducible runs
    scheme = cfg.partition_scheme(cfg.num_partitions or len(list(grid.get_node_ids())))
    client_weights = client_test_weights(raw, federation_partitions(raw, scheme, cfg), scheme, cfg.num_classes)
    strategy = build_strategy(cfg, maskable_names(model))
    mask_state = (lambda: (strategy.masks, strategy.stats)) if cfg.is_sparse else None
    test_data = to_tensors(cfg.dataset, raw.x_test, raw.y_test)
    initial_arrays = ArrayRecord(model.state_dict())  # on the CPU; the recorder moves the model to cfg.device
    recorder = RoundRecorder(cfg, model, test_data, client_weights, metered, mask_state, lambda: strategy.health)
    run = {"grid": ordered, "initial_arrays": initial_arrays,
           "num_rounds": cfg.num_server_rounds, "timeout": cfg.round_timeout}  # fmt: skip
    if not cfg.is_sparse:  # Flower's own loop; no checkpoints (see config)
        strategy.start(**run, evaluate_fn=recorder)
        return
    resume = load_checkpoint(cfg) if cfg.resume else None
    if resume is not None:
        recorder.load_state_dict(resume.recorder)
    strategy.start(**run, evaluate_fn=partial(after_round, cfg, strategy, recorder), resume=resume)


def federation_partitions(raw: RawDataset, scheme: PartitionScheme, cfg: ExperimentConfig) -> tuple[np.ndarray, ...]:
    """The clients' training indices; a federation too small for the partition is a
    ConfigError that says how to fix it, logged as one line before Flower's traceback."""
    try:
        return partitions(raw, scheme)
    except ValueError as err:
        size = "num-partitions" if cfg.num_partitions else f"the federation's {scheme.num_partitions} SuperNodes"
        message = (
            f"cannot split {cfg.dataset} over {size}: {err}. Flower's default local simulation has 2 "
            'SuperNodes; the README runs with --federation-config "num-supernodes=50 client-resources-num-cpus=1"'
        )
        log(ERROR, "feddst-flwr: %s", message)
        raise ConfigError(message) from err


def after_round(
    cfg: ExperimentConfig, strategy: FedDST, recorder: RoundRecorder, server_round: int, arrays: ArrayRecord
) -> MetricRecord:
    """Record the round, then checkpoint every checkpoint-every rounds."""
    metrics = recorder(server_round, arrays)
    if cfg.checkpoint_every and server_round % cfg.checkpoint_every == 0:
        state = Checkpoint(server_round, arrays.to_torch_state_dict(), strategy.state_dict(), recorder.state_dict())
        log(INFO, "checkpoint after round %d: %s", server_round, save_checkpoint(cfg, state))
    return metrics
