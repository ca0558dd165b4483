"""Every name that crosses the wire between the ServerApp and the ClientApp, declared once:
record names, round-config keys, reply-metric keys, the partition-id query and the error
codes of replies. (Array stypes of the sparse payload are the codec's: codec.py,
mask_coding.py.)"""

from collections.abc import Mapping
from typing import Any

# Records of a message
ARRAYS = "arrays"  # the model: dense (baselines) or FedDST's sparse payload
CONFIG = "config"  # the server's round config
METRICS = "metrics"  # a reply's metrics
GRADIENTS = "gradients"  # PruneFL: dense squared gradients, on reconfiguration rounds only

# Round config, server to client
SERVER_ROUND = "server-round"
MASK_VERSION = "mask-version"  # FedDST: the version of the mask the values are sent under
READJUST_ALPHA = "readjust-alpha"  # alpha_r; 0 or absent: no readjustment this round
PROXIMAL_MU = "proximal-mu"
UPLOAD_GRADIENTS = "upload-gradients"  # PruneFL: 1 on reconfiguration rounds

# Reply metrics, client to server
NUM_EXAMPLES = "num-examples"  # the weight of the reply in the average
TRAIN_LOSS = "train-loss"
MASK_ENTERED = "mask-entered"  # positions the client's readjustment brought into its mask
UPLOAD_BYTES = "upload-bytes"  # payload bytes as the client counted them
DOWNLOAD_BYTES = "download-bytes"
ECHOED = (SERVER_ROUND, MASK_VERSION)  # config keys a reply carries back unchanged

# The partition-id query (a QUERY message whose config record holds QUERY = PARTITION_ID)
QUERY = "query"
PARTITION_ID = "partition-id"  # also the node-config key that names a node's partition
NUM_PARTITIONS = "num-partitions"  # node-config key: how many partitions the federation has

# Error codes of replies
MISSING_MASK_CODE = 4001  # the node lacks the mask version it was sent values for
MISSING_MASK = "feddst-missing-mask"  # the reason of such a reply starts with this
BAD_MESSAGE_CODE = 4002  # the node refused the server's message (the reason follows)
INJECTED_FAILURE_CODE = 4003  # a failure drawn with probability client-failure-rate (fault tests)
TRAIN_DIVERGED_CODE = 4004  # the node's train function returned non-finite weights, gradients or loss
TRAIN_CONTRACT_CODE = 4005  # the node's train function broke the TrainFn contract (the reason names how)
REJECTED_CODE = 4010  # the server refused the reply (the reason follows)


def number(record: Mapping[str, Any], key: str, default: int | float = 0) -> int | float:
    """The number under `key` of a config or metric record (`default` if absent). Callers
    read records that validation has checked; anything else is a TypeError naming the key.

    Parameters
    ----------
    record : Mapping[str, Any]
        A ConfigRecord or MetricRecord.
    key : str
        One of the keys above.
    default : int | float
        The value of an absent key.

    Returns
    -------
    int | float
        The value, for the caller to convert with int() or float().
    """
    value = record.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"record key '{key}' holds {type(value).__name__} {value!r}, not a number")
    return value
