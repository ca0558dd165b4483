"""ClientApp: one handler for dense (baselines) and sparse (FedDST) payloads."""

from logging import ERROR

import torch
from flwr.app import Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import log

from feddst_flwr import protocol as P
from feddst_flwr.client import MissingMaskError, client_round, injected_failure
from feddst_flwr.codec import CodecError
from feddst_flwr.config import ExperimentConfig
from feddst_flwr.data import load_partition, load_raw
from feddst_flwr.models import build_model

app = ClientApp()
torch.set_num_threads(1)  # simulated clients run side by side on the CPU cores


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train on this node's partition and reply with the (sparse) update."""
    if P.ARRAYS not in msg.content.array_records or P.CONFIG not in msg.content.config_records:
        return bad_message(msg, "it lacks the 'arrays' or the 'config' record")
    cfg = ExperimentConfig.from_run_config(context.run_config)
    partition = int(context.node_config[P.PARTITION_ID])
    if injected_failure(cfg, msg.content[P.CONFIG], partition):
        return Message(
            Error(code=P.INJECTED_FAILURE_CODE, reason="injected failure (client-failure-rate)"), reply_to=msg
        )
    raw = load_raw(cfg.dataset, cfg.data_dir, cfg.cache_dir, cfg.test_fraction, cfg.seed)
    scheme = cfg.partition_scheme(cfg.num_partitions or int(context.node_config[P.NUM_PARTITIONS]))
    data = load_partition(raw, scheme, cfg.dataset, partition)
    model = build_model(cfg.model, cfg.num_classes, cfg.seed)
    try:
        result = client_round(model, data, msg.content[P.ARRAYS], msg.content[P.CONFIG], cfg, context.state, partition)
    except MissingMaskError as err:
        return Message(Error(code=P.MISSING_MASK_CODE, reason=str(err)), reply_to=msg)
    except CodecError as err:
        return bad_message(msg, str(err))
    return Message(result.content(), reply_to=msg)


def bad_message(msg: Message, problem: str) -> Message:
    """Log and answer a server message that failed validation."""
    log(ERROR, "rejected the server's message: %s", problem)
    return Message(Error(code=P.BAD_MESSAGE_CODE, reason=f"rejected the server's message: {problem}"), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server this node's partition-id (its stable identity across runs)."""
    metrics = MetricRecord({P.PARTITION_ID: int(context.node_config[P.PARTITION_ID])})
    return Message(RecordDict({P.METRICS: metrics}), reply_to=msg)
