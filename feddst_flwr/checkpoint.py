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
from .masks import all_finite, shapes_of

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
    saved = read_checkpoint(path)
    fields = {key: saved[key] for key in ("round", "arrays", "strategy", "recorder")}
    config = saved["config"]
    expected = fingerprint(cfg)
    differing = config_differences(config, expected)
    if differing:
        details = ", ".join(
            f"{key.replace('_', '-')}: {config.get(key)!r} -> {expected.get(key)!r}" for key in differing
        )
        raise CheckpointError(f"checkpoint {path} was written by a different experiment ({details})")
    check_fields(fields, cfg.num_server_rounds)
    return Checkpoint(**fields)


def config_differences(found: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """The run-config fingerprint keys on which a checkpoint's `found` and a run's `expected` differ."""
    return sorted(key for key in expected.keys() | found.keys() if expected.get(key) != found.get(key))


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint file as `save_checkpoint` wrote it: its format checked, its run-config
    fingerprint well formed (the other fields are checked against a run by `load_checkpoint`).
    CheckpointError names the file and the field."""
    try:
        saved = torch.load(path, weights_only=True)
        keys = ("format", "config", "round", "arrays", "strategy", "recorder")
        saved = {key: saved[key] for key in keys}
    except Exception as err:  # torch.load raises many types on damaged files
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable: {err}") from err
    _expect(saved["format"], int, "format")
    if saved["format"] != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {saved['format']}, this version reads {FORMAT}")
    check_config(saved["config"])
    return saved


def swapped(weights: Path, mask: Path) -> dict[str, Any]:
    """A checkpoint that trains one run's model under another run's mask (the swap test of
    docs/mask-dynamics.md): the checkpoint file `mask` (its round, mask, mask history, sampling
    RNG, records and run config) holding the model of the checkpoint file `weights`, masked
    layers zero outside the mask (positions the mask adds start at zero); the server
    optimizer's moments start afresh (they were the other model's). Written with
    `torch.save` as the checkpoint of a run of the mask run's config, that run resumes it.

    Parameters
    ----------
    weights : Path
        The checkpoint whose global model is kept.
    mask : Path
        The checkpoint whose mask and everything else is kept; of the same round and model.

    Returns
    -------
    dict[str, Any]
        The checkpoint, as `save_checkpoint` writes it.

    Raises
    ------
    CheckpointError
        A file is unreadable, or the two differ in round or in the model's tensors (named).
    """
    model, into = read_checkpoint(weights), read_checkpoint(mask)
    if model["round"] != into["round"]:
        raise CheckpointError(f"checkpoint {weights} is of round {model['round']}, {mask} of round {into['round']}")
    _tensors(model["arrays"], "arrays")
    _tensors(into["arrays"], "arrays")
    theirs, ours = shapes_of(model["arrays"], list(model["arrays"])), shapes_of(into["arrays"], list(into["arrays"]))
    if theirs != ours:
        differing = sorted(name for name in theirs.keys() | ours.keys() if theirs.get(name) != ours.get(name))
        raise CheckpointError(f"checkpoints {weights} and {mask} hold different models (tensors {differing})")
    masks = into["strategy"]["masks"]
    _tensors(masks, "strategy.masks", torch.bool)
    wrong = sorted(name for name, tensor in masks.items() if ours.get(name) != tuple(tensor.shape))
    if wrong:
        raise CheckpointError(f"checkpoint {mask}: field 'strategy.masks' has {wrong} not shaped like the model")
    arrays = {name: tensor * masks[name] if name in masks else tensor for name, tensor in model["arrays"].items()}
    strategy = {**into["strategy"], "optimizer": {"m": {}, "v": {}}}
    return {**into, "arrays": arrays, "strategy": strategy}


def check_config(config: Any) -> None:
    """The checkpoint's run-config fingerprint is a dict of key -> str, int, float or bool
    (what `fingerprint` writes); CheckpointError names the field otherwise."""
    _expect(config, dict, "config")
    for key, value in config.items():
        _expect(key, str, "config key")
        if not isinstance(value, (str, int, float)):  # bool is an int
            raise CheckpointError(
                f"checkpoint field 'config.{key}' is {type(value).__name__}, expected a run-config value"
            )


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


def _finite(tensors: dict[str, torch.Tensor], field: str, low: float | None = None) -> None:
    """Every floating tensor of `tensors` is finite (and, with `low`, >= low)."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not all_finite(tensor):
            raise CheckpointError(f"checkpoint field '{field}.{name}' holds non-finite values")
        if low is not None and bool((tensor < low).any()):
            raise CheckpointError(f"checkpoint field '{field}.{name}' holds values below {low}")


STRATEGY_FIELDS: dict[str, type | tuple[type, ...]] = {
    "masks": dict,
    "initial_masks": dict,
    "mask_version": int,
    "rng": tuple,
    "optimizer": dict,
}
RECORDER_FIELDS: dict[str, type | tuple[type, ...]] = {"records": list, "cumulative": dict, "elapsed": (int, float)}


def check_fields(fields: dict[str, Any], num_rounds: int) -> None:
    """Every field of a checkpoint has its type, and its values their range: a round in
    [0, num_rounds) (0: written after the initial mask, before round 1), finite model and
    optimizer state (Adam's `v` >= 0), a mask version in [0, round] (it grows by at most
    one a round); shapes and mask counts are checked against the model by the strategy
    (`check_shapes`). CheckpointError names the first field that does not."""
    _expect(fields["round"], int, "round")
    if not 0 <= fields["round"] < num_rounds:
        raise CheckpointError(
            f"checkpoint field 'round' = {fields['round']}: expected in [0, {num_rounds}) "
            f"({num_rounds} or more: nothing left of the run's {num_rounds} rounds)"
        )
    _tensors(fields["arrays"], "arrays")
    _finite(fields["arrays"], "arrays")
    strategy, recorder = fields["strategy"], fields["recorder"]
    for holder, spec in (("strategy", STRATEGY_FIELDS), ("recorder", RECORDER_FIELDS)):
        _expect(fields[holder], dict, holder)
        for key, kind in spec.items():
            if key not in fields[holder]:
                raise CheckpointError(f"checkpoint field '{holder}.{key}' is missing")
            _expect(fields[holder][key], kind, f"{holder}.{key}")
    if not 0 <= strategy["mask_version"] <= fields["round"]:
        raise CheckpointError(
            f"checkpoint field 'strategy.mask_version' = {strategy['mask_version']}: "
            f"expected in [0, {fields['round']}] (at most one new version a round)"
        )
    _tensors(strategy["masks"], "strategy.masks", torch.bool)
    _tensors(strategy["initial_masks"], "strategy.initial_masks", torch.bool)
    if "explored" in strategy:  # absent in older checkpoints
        _tensors(strategy["explored"], "strategy.explored", torch.bool)
    for key in ("m", "v"):
        if key not in strategy["optimizer"]:
            raise CheckpointError(f"checkpoint field 'strategy.optimizer.{key}' is missing")
        _tensors(strategy["optimizer"][key], f"strategy.optimizer.{key}")
        _finite(strategy["optimizer"][key], f"strategy.optimizer.{key}", 0.0 if key == "v" else None)
    counters = {f.name for f in fields_of(Traffic)}
    for key, value in recorder["cumulative"].items():
        if key not in counters:
            raise CheckpointError(f"checkpoint field 'recorder.cumulative' has an unknown counter '{key}'")
        _expect(value, int, f"recorder.cumulative.{key}")


def check_shapes(
    state: dict[str, Any],
    arrays: dict[str, torch.Tensor],
    shapes: dict[str, tuple[int, ...]],
    counts: dict[str, int],
    posterior: bool = False,
) -> None:
    """A checkpoint's tensors fit the run: the global `arrays` shaped like `shapes`; the
    strategy's masks, initial masks, explored positions and (with `posterior`, the thompson
    rule's) posteriors like the masked layers (the keys of `counts`), each mask and initial
    mask keeping exactly `counts[name]` weights (every mask rule keeps a layer's count);
    the posteriors finite and > 0; its optimizer moments like the layers they belong to.
    CheckpointError names the first field that does not."""
    maskable = list(counts)
    masked = {name: shapes[name] for name in maskable}
    expected = {"arrays": (arrays, shapes), "strategy.masks": (state["masks"], masked),
                "strategy.initial_masks": (state["initial_masks"], masked),
                "strategy.explored": (state.get("explored", state["masks"]), masked)}  # fmt: skip
    for key, (tensors, want) in expected.items():
        if shapes_of(tensors, list(tensors)) != want:
            raise CheckpointError(
                f"checkpoint field '{key}' has shapes {shapes_of(tensors, list(tensors))}, the model {want}"
            )
    for key in ("masks", "initial_masks"):
        for name, mask in state[key].items():
            kept = int(torch.count_nonzero(mask))
            if kept != counts[name]:
                raise CheckpointError(
                    f"checkpoint field 'strategy.{key}.{name}' keeps {kept} weights; the run's sparsity keeps {counts[name]}"
                )
    for key in ("m", "v"):
        wrong = sorted(n for n, t in state["optimizer"][key].items() if shapes.get(n) != tuple(t.shape))
        if wrong:
            raise CheckpointError(
                f"checkpoint field 'strategy.optimizer.{key}' has tensors {wrong} not shaped like the model"
            )
    if posterior:
        check_posterior(state.get("posterior"), masked)


def check_posterior(found: Any, masked: dict[str, tuple[int, ...]]) -> None:
    """The thompson rule's Beta posteriors `a` and `b`: empty (before the first readjustment
    round) or one tensor per masked layer, shaped like it, finite and > 0 (numpy's beta
    sampler refuses anything else); CheckpointError names the field otherwise."""
    if not isinstance(found, dict) or set(found) != {"a", "b"}:
        raise CheckpointError("checkpoint field 'strategy.posterior' is not the thompson rule's posteriors (a and b)")
    for key in ("a", "b"):
        field = f"strategy.posterior.{key}"
        _tensors(found[key], field)
        if set(found[key]) not in (set(), set(masked)) or set(found[key]) != set(found["a"]):
            raise CheckpointError(f"checkpoint field '{field}' covers {sorted(found[key])}, not the masked layers")
        wrong = sorted(name for name, tensor in found[key].items() if tuple(tensor.shape) != masked[name])
        if wrong:
            raise CheckpointError(f"checkpoint field '{field}' has tensors {wrong} not shaped like the model")
        _finite(found[key], field)
        wrong = sorted(name for name, tensor in found[key].items() if not bool((tensor > 0).all()))
        if wrong:
            raise CheckpointError(f"checkpoint field '{field}' is not > 0 in {wrong}")


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
