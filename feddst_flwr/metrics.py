"""Measurements and reporting: payload bytes on the wire, forward FLOPs, and the per-round
record written to `<results-dir>/<run-name>/metrics.jsonl`."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from logging import INFO
from pathlib import Path
from typing import Any, ClassVar, Protocol, cast

import numpy as np
import torch
from flwr.app import ArrayRecord, MetricRecord
from flwr.common import log
from torch import nn

from .aggregation import RoundStats
from .data import TensorData, client_mean_accuracy
from .grid import MeteredGrid, Traffic
from .masks import MASKABLE_MODULES, Masks, densities, save_masks, total_density, weight_name
from .training import evaluate, resolve_device
from .validation import Health


def forward_flops(model: nn.Module, masks: Masks | None = None) -> int:
    """FLOPs (2 x multiply-adds) of one forward pass of one sample through the conv and
    linear layers, counting only active weights when masks are given."""
    masks = masks or {}
    macs = 0

    def count(name: str, module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        nonlocal macs
        active = int(torch.count_nonzero(masks[name])) if name in masks else cast(torch.Tensor, module.weight).numel()
        positions = 1 if isinstance(module, nn.Linear) else output[0, 0].numel()  # conv: output positions
        macs += active * positions

    hooks = [
        module.register_forward_hook(partial(count, weight_name(mod_name)))
        for mod_name, module in model.named_modules()
        if isinstance(module, MASKABLE_MODULES)
    ]
    with torch.no_grad():
        model.eval()
        shape = cast(tuple[int, ...], model.input_shape)  # every model of models.py has one
        model(torch.zeros(1, *shape, device=next(model.parameters()).device))
    for handle in hooks:
        handle.remove()
    return 2 * macs


class RecordedRun(Protocol):
    """What the recorder needs of the run config (ExperimentConfig): where it writes, the
    device it evaluates on, when it evaluates, and dataclass fields for config.json."""

    __dataclass_fields__: ClassVar[dict[str, Any]]
    results_dir: str
    device: str
    eval_interval: int
    num_server_rounds: int

    @property
    def name(self) -> str: ...


class RoundRecorder:
    """Flower `evaluate_fn`: after every round, evaluate the global model (every
    eval-interval rounds), collect traffic and mask statistics, append one JSON line to
    metrics.jsonl and log one line."""

    def __init__(
        self,
        cfg: RecordedRun,
        num_classes: int,
        model: nn.Module,
        test_data: TensorData,
        client_weights: np.ndarray,
        grid: MeteredGrid,
        mask_state: Callable[[], tuple[Masks, RoundStats]] | None,
        health: Callable[[], Health] = Health,
    ) -> None:
        self.cfg = cfg
        self.num_classes = num_classes
        device = resolve_device(cfg.device)
        self.model = model.to(device)  # the server evaluates on the run's device
        self.test_data = test_data.to(device)
        self.client_weights = client_weights
        self.grid = grid
        self.mask_state = mask_state
        self.health = health
        self.run_dir = Path(cfg.results_dir) / cfg.name
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
        self.path = self.run_dir / "metrics.jsonl"
        self.path.write_text("")
        self.dense_flops = forward_flops(model)
        self.cumulative = Traffic()
        self.records: list[dict] = []
        self.started = time.time()

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        self.model.load_state_dict(arrays.to_torch_state_dict())
        record: dict = {"round": server_round}
        if server_round % self.cfg.eval_interval == 0 or server_round == self.cfg.num_server_rounds:
            result = evaluate(self.model, self.test_data, self.num_classes)
            record["test-loss"], record["test-accuracy"] = result.loss, result.accuracy
            record["client-mean-accuracy"] = client_mean_accuracy(result.class_accuracy, self.client_weights)
        record.update(self._traffic())
        record.update(self._sparsity())
        if self.mask_state is not None and server_round == self.cfg.num_server_rounds:
            save_masks(self.run_dir / "final-mask.npz", self.mask_state()[0])  # the mask's structure, kept
        record["wall-time"] = time.time() - self.started
        self.records.append(record)
        with self.path.open("a") as out:
            out.write(json.dumps(record) + "\n")
        log(INFO, self._line(record))
        return MetricRecord({k: v for k, v in record.items() if isinstance(v, (int, float))})

    def state_dict(self) -> dict:
        """The records so far and the running totals (for a checkpoint)."""
        return {"records": self.records, "cumulative": asdict(self.cumulative), "elapsed": time.time() - self.started}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a checkpoint: metrics.jsonl holds exactly its records again."""
        self.records = list(state["records"])
        self.cumulative = Traffic(**state["cumulative"])
        self.started = time.time() - state["elapsed"]
        self.path.write_text("".join(json.dumps(record) + "\n" for record in self.records))

    def _traffic(self) -> dict:
        traffic = self.grid.take()
        for key, value in asdict(traffic).items():
            setattr(self.cumulative, key, getattr(self.cumulative, key) + value)
        return {
            "upload-bytes": traffic.upload,
            "download-bytes": traffic.download,
            "client-upload-bytes": traffic.client_upload,
            "client-download-bytes": traffic.client_download,
            "cum-upload-bytes": self.cumulative.upload,
            "cum-download-bytes": self.cumulative.download,
            "replies": traffic.replies,
            "error-replies": traffic.errors,
            "failures": traffic.messages - traffic.replies,
            "rejected": len(self.health().rejected),
            "discarded": int(self.health().discarded),
        }

    def _sparsity(self) -> dict:
        if self.mask_state is None:
            return {"density": 1.0, "flops": self.dense_flops, "dense-flops": self.dense_flops}
        masks, stats = self.mask_state()
        return {
            "density": total_density(masks),
            "layer-density": densities(masks),
            "mask-version": stats.mask_version,
            "readjust-alpha": stats.readjust_alpha,
            "mask-entered": stats.mask_entered,
            "mask-entered-units": stats.mask_entered_units,
            "mask-drift": stats.mask_drift,
            "mask-explored": stats.mask_explored,
            "mask-leavers-held": stats.mask_leavers_held,
            "mask-structure": stats.mask_structure,
            "mask-votes": stats.mask_votes,
            "masks-sent": stats.masks_sent,
            "skipped": int(stats.skipped),
            "flops": forward_flops(self.model, masks),
            "dense-flops": self.dense_flops,
        }

    def _line(self, r: dict) -> str:
        accuracy = (
            f"acc {r['test-accuracy']:.4f} (client mean {r['client-mean-accuracy']:.4f}) loss {r['test-loss']:.4f}"
            if "test-accuracy" in r
            else "acc -"
        )
        mask = (
            f" | mask v{r['mask-version']} entered {r['mask-entered']} ({r['mask-entered-units']} units)"
            f" drift {r['mask-drift']:.3f}"
            if "mask-version" in r
            else ""
        )
        return (
            f"[round {r['round']}/{self.cfg.num_server_rounds}] {accuracy} | up {r['upload-bytes'] / 1024:.1f} KiB"
            f" (cum {r['cum-upload-bytes'] / 2**20:.2f} MiB) down {r['download-bytes'] / 1024:.1f} KiB"
            f" (cum {r['cum-download-bytes'] / 2**20:.2f} MiB) | density {r['density']:.3f}{mask}"
            f" | FLOPs {r['flops'] / r['dense-flops']:.3f}x dense"
        )
