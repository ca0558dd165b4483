"""ClientApp: one handler for dense (baselines) and sparse (FedDST) payloads."""

import torch
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from feddst_flwr import protocol as P
from feddst_flwr.client import injected_failure, train_reply
from feddst_flwr.config import ExperimentConfig
from feddst_flwr.data import SPECS, TensorData, load_partition, load_raw
from feddst_flwr.models import build_model
from feddst_flwr.registry import load_config, partition_scheme
from feddst_flwr.training import TrainFn, masked_sgd

app = ClientApp()
torch.set_num_threads(1)  # simulated clients run side by side on the CPU cores


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train on this node's partition and reply with the (sparse) update."""
    cfg = load_config(context.run_config)
    partition = int(context.node_config[P.PARTITION_ID])
    round_config = msg.content.config_records.get(P.CONFIG, ConfigRecord())
    if injected_failure(cfg.client_failure_rate, cfg.seed, round_config, partition):
        return Message(
            Error(code=P.INJECTED_FAILURE_CODE, reason="injected failure (client-failure-rate)"), reply_to=msg
        )
    raw = load_raw(cfg.dataset, cfg.data_dir, cfg.cache_dir, cfg.test_fraction, cfg.seed)
    scheme = partition_scheme(cfg, cfg.num_partitions or int(context.node_config[P.NUM_PARTITIONS]))
    data = load_partition(raw, scheme, cfg.dataset, partition)
    model = build_model(cfg.model, SPECS[cfg.dataset].num_classes, cfg.seed)
    return train_reply(msg, context.state, model, trainer(cfg, data, partition))


def trainer(cfg: ExperimentConfig, data: TensorData, partition_id: int) -> TrainFn:
    """Local training of the node holding partition `partition_id`: our masked SGD with the
    run config's settings."""
    return masked_sgd(
        data, epochs=cfg.local_epochs, batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum,
        weight_decay=cfg.weight_decay, readjust_at=cfg.readjust_at, grow_batches=cfg.grow_batches, regrow=cfg.regrow,
        seed=cfg.seed, partition_id=partition_id, device=cfg.device,
    )  # fmt: skip


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server this node's partition-id (its stable identity across runs)."""
    metrics = MetricRecord({P.PARTITION_ID: int(context.node_config[P.PARTITION_ID])})
    return Message(RecordDict({P.METRICS: metrics}), reply_to=msg)
