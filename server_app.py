"""ServerApp: wires the run config to a strategy (FedDST or a Flower baseline), the byte
meter and the per-round recorder."""

import random

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from feddst_flwr.config import ExperimentConfig
from feddst_flwr.data import client_test_weights, load_raw, partitions, to_tensors
from feddst_flwr.masks import maskable_names
from feddst_flwr.grid import ServerGrid, partition_ids
from feddst_flwr.metrics import RoundRecorder
from feddst_flwr.models import build_model
from feddst_flwr.strategy import FedDST, build_strategy

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the configured experiment; results go to <results-dir>/<run-name>/."""
    cfg = ExperimentConfig.from_run_config(context.run_config)
    random.seed(cfg.seed)  # Flower's baseline strategies sample with the global RNG
    model = build_model(cfg.model, cfg.num_classes, cfg.seed)
    raw = load_raw(cfg.dataset, cfg.data_dir, cfg.cache_dir, cfg.test_fraction, cfg.seed)
    server_grid = ServerGrid(grid, partition_ids(grid))  # stable node order: reproducible sampling
    scheme = cfg.partition_scheme(cfg.num_partitions or len(list(grid.get_node_ids())))
    client_weights = client_test_weights(raw, partitions(raw, scheme), scheme, cfg.num_classes)
    strategy = build_strategy(cfg, maskable_names(model))
    mask_state = (lambda: (strategy.masks, strategy.stats)) if isinstance(strategy, FedDST) else None
    test_data = to_tensors(cfg.dataset, raw.x_test, raw.y_test)
    recorder = RoundRecorder(cfg, model, test_data, client_weights, server_grid, mask_state)
    strategy.start(
        grid=server_grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=cfg.num_server_rounds,
        evaluate_fn=recorder,
    )
