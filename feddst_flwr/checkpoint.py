"""Checkpoint and resume: the server's state (global model, strategy, recorder) saved
atomically to `<results-dir>/<run-name>/checkpoint.pt` every `checkpoint-every` rounds
(`after_round`), and loaded, checked against the run config and the model, when the run config
says `resume = true` (`resume_point`; the strategy restores its part in `start`)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from dataclasses import fields as fields_of
from logging import INFO
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from flwr.app import ArrayRecord, MetricRecord
from flwr.common import log

from .grid import Traffic
from .masks import shapes_of

FORMAT = 2  # 2: the strategy state holds the initial mask (mask-drift)
# Keys that may change between the interrupted run and its resumption.
RESUMABLE_CHANGES = (
    "num_server_rounds",
    "resume",
    "checkpoint_every",
    "round_timeout",
    "data_dir",
    "cache_dir",
    "results_dir",
    "run_name",
)


class RunConfig(Protocol):
    """What a checkpoint needs of the run config (ExperimentConfig): where the run writes,
    how many rounds it has, when to checkpoint and whether to resume, and dataclass fields to
    fingerprint."""

    __dataclass_fields__: ClassVar[dict[str, Any]]
    results_dir: str
    num_server_rounds: int
    checkpoint_every: int
    resume: bool

    @property
    def name(self) -> str: ...


class Stateful(Protocol):
    """A part of the server whose state a checkpoint holds (FedDST, RoundRecorder)."""

    def state_dict(self) -> dict[str, Any]: ...


class Recorder(Stateful, Protocol):
    """The round recorder (metrics.RoundRecorder): Flower's evaluate_fn, restorable."""

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or belongs to another experiment."""


@dataclass
class Checkpoint:
    """The server's state after `round`."""

    round: int
    arrays: dict[str, torch.Tensor]
    strategy: dict[str, Any]
    recorder: dict[str, Any]


def fingerprint(cfg: RunConfig) -> dict[str, Any]:
    """The run config keys a checkpoint must agree with."""
    return {key: value for key, value in asdict(cfg).items() if key not in RESUMABLE_CHANGES}


def checkpoint_path(cfg: RunConfig) -> Path:
    return Path(cfg.results_dir) / cfg.name / "checkpoint.pt"


def save_checkpoint(cfg: RunConfig, checkpoint: Checkpoint) -> Path:
    """Write the checkpoint atomically: a temporary file, fsync, then rename over the old one."""
    path = checkpoint_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("wb") as out:
        torch.save({"format": FORMAT, "config": fingerprint(cfg), **asdict(checkpoint)}, out)
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, path)
    return path


def load_checkpoint(cfg: RunConfig) -> Checkpoint:
    """The run's last checkpoint; CheckpointError if it is missing, corrupt or mismatched."""
    path = checkpoint_path(cfg)
    if not path.exists():
        raise CheckpointError(f"resume = true but there is no checkpoint at {path} (set checkpoint-every > 0)")
    try:
        saved = torch.load(path, weights_only=True)
        fields = {key: saved[key] for key in ("round", "arrays", "strategy", "recorder")}
        version, config = saved["format"], saved["config"]
    except Exception as err:  # torch.load raises many types on damaged files
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable: {err}") from err
    if version != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {version}, this version reads {FORMAT}")
    expected = fingerprint(cfg)
    differing = sorted(key for key in expected.keys() | config.keys() if expected.get(key) != config.get(key))
    if differing:
        details = ", ".join(
            f"{key.replace('_', '-')}: {config.get(key)!r} -> {expected.get(key)!r}" for key in differing
        )
        raise CheckpointError(f"checkpoint {path} was written by a different experiment ({details})")
    check_fields(fields)
    if fields["round"] >= cfg.num_server_rounds:
        raise CheckpointError(
            f"checkpoint {path} is at round {fields['round']}: nothing left of {cfg.num_server_rounds} rounds"
        )
    return Checkpoint(**fields)


def _expect(value: Any, kind: type | tuple[type, ...], field: str) -> None:
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise CheckpointError(f"checkpoint field '{field}' is {type(value).__name__}, expected {kind}")


def _tensors(value: Any, field: str, dtype: torch.dtype | None = None) -> None:
    """A dict of name -> tensor (of `dtype` when given)."""
    _expect(value, dict, field)
    for name, tensor in value.items():
        _expect(name, str, f"{field} key")
        _expect(tensor, torch.Tensor, f"{field}.{name}")
        if dtype is not None and tensor.dtype != dtype:
            raise CheckpointError(f"checkpoint field '{field}.{name}' has dtype {tensor.dtype}, expected {dtype}")


STRATEGY_FIELDS: dict[str, type | tuple[type, ...]] = {
    "masks": dict,
    "initial_masks": dict,
    "mask_version": int,
    "rng": tuple,
    "optimizer": dict,
}
RECORDER_FIELDS: dict[str, type | tuple[type, ...]] = {"records": list, "cumulative": dict, "elapsed": (int, float)}


def check_fields(fields: dict[str, Any]) -> None:
    """Every field of a checkpoint has its type (shapes are checked against the model by the
    strategy); CheckpointError names the first that does not."""
    _expect(fields["round"], int, "round")
    _tensors(fields["arrays"], "arrays")
    strategy, recorder = fields["strategy"], fields["recorder"]
    for holder, spec in (("strategy", STRATEGY_FIELDS), ("recorder", RECORDER_FIELDS)):
        _expect(fields[holder], dict, holder)
        for key, kind in spec.items():
            if key not in fields[holder]:
                raise CheckpointError(f"checkpoint field '{holder}.{key}' is missing")
            _expect(fields[holder][key], kind, f"{holder}.{key}")
    _tensors(strategy["masks"], "strategy.masks", torch.bool)
    _tensors(strategy["initial_masks"], "strategy.initial_masks", torch.bool)
    for key in ("m", "v"):
        if key not in strategy["optimizer"]:
            raise CheckpointError(f"checkpoint field 'strategy.optimizer.{key}' is missing")
        _tensors(strategy["optimizer"][key], f"strategy.optimizer.{key}")
    counters = {f.name for f in fields_of(Traffic)}
    for key, value in recorder["cumulative"].items():
        if key not in counters:
            raise CheckpointError(f"checkpoint field 'recorder.cumulative' has an unknown counter '{key}'")
        _expect(value, int, f"recorder.cumulative.{key}")


def check_shapes(
    state: dict[str, Any],
    arrays: dict[str, torch.Tensor],
    shapes: dict[str, tuple[int, ...]],
    maskable: list[str],
    posterior: bool = False,
) -> None:
    """A checkpoint's tensors are shaped like the model: the global `arrays` like `shapes`,
    the strategy's masks, initial masks, explored positions and (with `posterior`, the
    thompson rule's) posteriors like the `maskable` layers, its optimizer moments like the
    layers they belong to; CheckpointError names the first field that is not."""
    masked = {name: shapes[name] for name in maskable}
    expected = {"arrays": (arrays, shapes), "strategy.masks": (state["masks"], masked),
                "strategy.initial_masks": (state["initial_masks"], masked),
                "strategy.explored": (state.get("explored", state["masks"]), masked)}  # fmt: skip
    for key, (tensors, want) in expected.items():
        if shapes_of(tensors, list(tensors)) != want:
            raise CheckpointError(
                f"checkpoint field '{key}' has shapes {shapes_of(tensors, list(tensors))}, the model {want}"
            )
    for key in ("m", "v"):
        wrong = sorted(n for n, t in state["optimizer"][key].items() if shapes.get(n) != tuple(t.shape))
        if wrong:
            raise CheckpointError(
                f"checkpoint field 'strategy.optimizer.{key}' has tensors {wrong} not shaped like the model"
            )
    if posterior:
        found = state.get("posterior") or {}
        if set(found) != {"a", "b"} or any(
            set(found[key]) - set(maskable) or any(tuple(t.shape) != masked[n] for n, t in found[key].items())
            for key in ("a", "b")
        ):
            raise CheckpointError(
                "checkpoint field 'strategy.posterior' is not the thompson rule's posteriors over the masked layers"
            )


def after_round(
    cfg: RunConfig, strategy: Stateful, recorder: Recorder, server_round: int, arrays: ArrayRecord
) -> MetricRecord:
    """FedDST's evaluate_fn: record the round, then checkpoint every checkpoint-every rounds."""
    metrics = recorder(server_round, arrays)
    if cfg.checkpoint_every and server_round % cfg.checkpoint_every == 0:
        state = Checkpoint(server_round, arrays.to_torch_state_dict(), strategy.state_dict(), recorder.state_dict())
        log(INFO, "checkpoint after round %d: %s", server_round, save_checkpoint(cfg, state))
    return metrics


def resume_point(cfg: RunConfig, recorder: Recorder) -> Checkpoint | None:
    """With resume = true: the run's last checkpoint, the recorder restored from it (the
    strategy restores its own part when `start` gets it); else None."""
    if not cfg.resume:
        return None
    checkpoint = load_checkpoint(cfg)
    recorder.load_state_dict(checkpoint.recorder)
    return checkpoint
