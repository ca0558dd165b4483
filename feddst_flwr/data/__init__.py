"""Datasets (scikit-learn's digits, local files, or the hub; decoded once and cached as .npy)
and their non-IID partitions over clients.

Images are kept as uint8 (N, C, H, W) arrays; a client converts only its own subset to
normalised float32 tensors, once, so the training loop does no per-sample work.

specs (what each dataset is), cache (load_raw), local (layouts under data-dir) with one
reader per format (idx, images, parquet; digits, hub), partition, metric (the paper's).
"""

from .cache import default_cache_dir, load_raw
from .idx import read_idx
from .metric import client_mean_accuracy, client_test_weights
from .partition import PARTITIONS, PartitionScheme, load_partition, partitions
from .specs import DATASETS, SPECS, DatasetError, DatasetNotFoundError, DatasetSpec, RawDataset, TensorData, to_tensors

__all__ = [
    "DATASETS",
    "PARTITIONS",
    "SPECS",
    "DatasetError",
    "DatasetNotFoundError",
    "DatasetSpec",
    "PartitionScheme",
    "RawDataset",
    "TensorData",
    "client_mean_accuracy",
    "client_test_weights",
    "default_cache_dir",
    "load_partition",
    "load_raw",
    "partitions",
    "read_idx",
    "to_tensors",
]
