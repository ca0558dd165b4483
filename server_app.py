"""ServerApp: wires the run config to a strategy (FedDST or a Flower baseline), the byte
meter and the per-round recorder."""

import random

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from feddst_flwr.config import ExperimentConfig
from feddst_flwr.data import load_dataset
from feddst_flwr.masks import maskable_names
from feddst_flwr.metrics import MeteredGrid, RoundRecorder
from feddst_flwr.models import build_model
from feddst_flwr.strategy import FedDST, build_strategy

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the configured experiment; results go to <results-dir>/<run-name>/."""
    cfg = ExperimentConfig.from_run_config(context.run_config)
    random.seed(cfg.seed)  # Flower's baseline strategies sample with the global RNG
    model = build_model(cfg.model, cfg.seed)
    _, test_data = load_dataset(cfg.dataset, cfg.test_fraction, cfg.seed)
    strategy = build_strategy(cfg, maskable_names(model))
    metered = MeteredGrid(grid)
    mask_state = (lambda: (strategy.masks, strategy.stats)) if isinstance(strategy, FedDST) else None
    recorder = RoundRecorder(cfg, model, test_data, metered, mask_state)
    strategy.start(
        grid=metered,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=cfg.num_server_rounds,
        evaluate_fn=recorder,
    )
