"""Experiment reports: strategies compared at equal cumulative upload (the paper's axis),
from the `metrics.jsonl` files of `results/<experiment>/<strategy>-seed<k>/`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

GIB = 2**30
METRIC = "client-mean-accuracy"  # the paper's metric


@dataclass
class Run:
    """One finished run: its per-round records (round 0 is the initial model)."""

    strategy: str
    seed: int
    records: list[dict]

    def curve(self, metric: str = METRIC) -> tuple[np.ndarray, np.ndarray]:
        """(cumulative upload bytes, metric) at every evaluated round."""
        points = [(r["cum-upload-bytes"], r[metric]) for r in self.records if metric in r]
        upload, value = zip(*points)
        return np.asarray(upload, dtype=np.float64), np.asarray(value, dtype=np.float64)

    @property
    def total_upload(self) -> int:
        return self.records[-1]["cum-upload-bytes"]


def load_runs(experiment_dir: Path) -> dict[str, list[Run]]:
    """Finished runs (those with a `done` marker) by strategy, seeds in order."""
    runs: dict[str, list[Run]] = {}
    for run_dir in sorted(p for p in experiment_dir.iterdir() if (p / "done").exists()):
        strategy, _, seed = run_dir.name.rpartition("-seed")
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        runs.setdefault(strategy, []).append(Run(strategy, int(seed), records))
    for seeds in runs.values():
        seeds.sort(key=lambda run: run.seed)
    return runs


def value_at_cap(run: Run, cap: float, metric: str = METRIC) -> float:
    """The metric at a cumulative-upload cap, linearly interpolated between the evaluated
    rounds around it; a run that ended below the cap keeps its final value."""
    upload, value = run.curve(metric)
    return float(np.interp(cap, upload, value))  # np.interp holds the last value past the end


def _cell(runs: list[Run], cap: float, metric: str) -> str:
    """Table cell: mean (+- std over seeds) at the cap, starred when a seed ended below the cap
    (its final value)."""
    star = "*" if any(run.total_upload < cap for run in runs) else ""
    return _spread([value_at_cap(run, cap, metric) for run in runs]) + star


def caps(runs: dict[str, list[Run]], reference: str = "feddst") -> dict[str, float]:
    """The upload caps of the table: FedDST's mean total upload, half of it and twice it."""
    if reference not in runs:
        raise ValueError(f"the report needs finished '{reference}' runs for its upload caps; found {sorted(runs)}")
    total = float(np.mean([run.total_upload for run in runs[reference]]))
    return {"0.5x": total / 2, "1x": total, "2x": 2 * total}


def summary_table(runs: dict[str, list[Run]], metric: str = METRIC, reference: str = "feddst") -> str:
    """Markdown table: metric at the caps, final and averaged over the last 10 evaluations (mean
    +- std over seeds), traffic, FLOPs and wall time (means); then the claims' gaps (gap_lines)."""
    limits = caps(runs, reference)
    header = (
        f"| strategy | seeds | {' | '.join(f'{metric} at {k} ({v / GIB:.3f} GiB)' for k, v in limits.items())} "
        "| final | last-10 mean | rounds | upload GiB | download GiB | forward MFLOPs | wall s |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for strategy, seeds in runs.items():
        final = [run.records[-1] for run in seeds]
        at_caps = " | ".join(_cell(seeds, cap, metric) for cap in limits.values())
        lines.append(
            f"| {strategy} | {len(seeds)} | {at_caps} | {_spread([_last(run, metric) for run in seeds])} "
            f"| {_spread([last_mean(run, metric) for run in seeds])} | {'/'.join(sorted({str(r['round']) for r in final}))} | {np.mean([r['cum-upload-bytes'] for r in final]) / GIB:.3f} "
            f"| {np.mean([r['cum-download-bytes'] for r in final]) / GIB:.3f} "
            f"| {np.mean([r['flops'] for r in final]) / 1e6:.2f} | {np.mean([r['wall-time'] for r in final]):.0f} |"
        )
    lines += [
        "",
        "\\* a run ended below this upload cap: its final value.",
        "",
        *gap_lines(runs, limits["1x"], metric, reference),
    ]
    return "\n".join(lines) + "\n"


def gap_lines(runs: dict[str, list[Run]], cap: float, metric: str, reference: str = "feddst") -> list[str]:
    """The claims, each seed paired with the same seed (same partition and initial model): FedDST
    minus FedAvgM at equal upload and with 2x upload for FedAvgM, and minus the fixed random mask
    at equal upload; each at the cap, then averaged over FedDST's last 10 evaluations (each
    against the other run at the same upload, or twice it), which a single evaluation's swing
    moves less."""
    at = f"{cap / GIB:.3f} GiB"
    ours = runs[reference]
    lines = (
        [
            f"{reference} - fedavgm at equal upload ({at}): {_gaps(ours, runs['fedavgm'], cap, 1, metric, reference)}",
            f"{reference} at {at} - fedavgm at 2x ({2 * cap / GIB:.3f} GiB): "
            f"{_gaps(ours, runs['fedavgm'], cap, 2, metric, reference)}",
        ]
        if "fedavgm" in runs
        else ["(no fedavgm runs: the paper's FedDST - FedAvgM gap is not reported)"]
    )
    if "randommask" in runs:
        lines.append(
            f"{reference} - randommask at equal upload ({at}): {_gaps(ours, runs['randommask'], cap, 1, metric, reference)}"
        )
    return lines


def _gaps(ours: list[Run], theirs: list[Run], cap: float, factor: float, metric: str, reference: str) -> str:
    """Mean +- std over the seeds both have of ours at `cap` minus theirs at `factor` x `cap`,
    then of ours minus theirs over our last 10 evaluations."""
    by_seed = {run.seed: run for run in theirs}
    pairs = [(run, by_seed[run.seed]) for run in ours if run.seed in by_seed]
    if not pairs:
        return "no seed in common"
    at_cap = [value_at_cap(a, cap, metric) - value_at_cap(b, factor * cap, metric) for a, b in pairs]
    over_last = [gap_over_last(a, b, factor, metric) for a, b in pairs]
    seeds = ", ".join(str(a.seed) for a, _ in pairs)
    return (
        f"{_spread(at_cap, signed=True)} (seed{'s' if len(pairs) > 1 else ''} {seeds}); "
        f"over {reference}'s last 10 evaluations: {_spread(over_last, signed=True)}"
    )


def gap_over_last(ours: Run, theirs: Run, factor: float = 1.0, metric: str = METRIC, evaluations: int = 10) -> float:
    """Ours minus theirs at `factor` times our upload, averaged over our last `evaluations`
    evaluated rounds."""
    upload, value = ours.curve(metric)
    there = [value_at_cap(theirs, factor * u, metric) for u in upload[-evaluations:]]
    return float(np.mean(value[-evaluations:] - np.asarray(there)))


def last_mean(run: Run, metric: str = METRIC, evaluations: int = 10) -> float:
    """The metric averaged over the run's last `evaluations` evaluated rounds."""
    return float(np.mean(run.curve(metric)[1][-evaluations:]))


def movement_table(runs: dict[str, list[Run]]) -> str:
    """Markdown table of the mask's movement, for strategies whose runs count it: positions
    entering per readjust round (mean over seeds), the final drift and R_s (mask-explored),
    the share of leaving positions some client still kept, and the output units' in-degree
    CV at the last readjustment (mean over layers) (mean +- std; "-" where records predate
    them); "" if none."""
    lines = [
        f"| {strategy} | {len(seeds)} | {_movement(seeds)} |"
        for strategy, seeds in runs.items()
        if "mask-drift" in seeds[0].records[-1]
    ]
    header = [
        "| strategy | seeds | entered per readjust round | drift at the end | explored (R_s) | leavers still held"
        " | in-degree CV |",
        "|---|---|---|---|---|---|---|",
    ]
    return "\n".join(header + lines) + "\n" if lines else ""


def _movement(seeds: list[Run]) -> str:
    """Seed-table cells of `movement_table`."""
    per_round = "/".join(f"{v:.0f}" for v in np.mean([entered_per_readjust(run) for run in seeds], axis=0)) or "-"
    cells = [per_round, _spread([run.records[-1]["mask-drift"] for run in seeds], digits=3)]
    cells.append(_optional([run.records[-1].get("mask-explored") for run in seeds]))
    readjusts = [[r for r in run.records if r.get("mask-structure")] for run in seeds]
    cells.append(_optional([np.mean([r["mask-leavers-held"] for r in rs]) if rs else None for rs in readjusts]))
    cv = [
        np.mean([layer["indegree-cv"] for layer in rs[-1]["mask-structure"].values()]) if rs else None
        for rs in readjusts
    ]
    cells.append(_optional(cv))
    return " | ".join(cells)


def _optional(values: list[float | None]) -> str:
    """_spread of the values, or "-" if some run lacks them."""
    present = [v for v in values if v is not None]
    return "-" if len(present) < len(values) else _spread(present, digits=3)


def paired_by_round(ours: Run, theirs: Run, metric: str = METRIC) -> tuple[np.ndarray, np.ndarray]:
    """(rounds, ours minus theirs) at the rounds both evaluated, round 0 excluded."""
    mine = {r["round"]: r[metric] for r in ours.records if metric in r and r["round"] > 0}
    other = {r["round"]: r[metric] for r in theirs.records if metric in r}
    rounds = np.asarray(sorted(set(mine) & set(other)), dtype=np.int64)
    return rounds, np.asarray([mine[r] - other[r] for r in rounds], dtype=np.float64)


def randommask_table(runs: dict[str, list[Run]], windows: int = 4, metric: str = METRIC) -> str:
    """Markdown table: every other sparse strategy minus the fixed random mask, each seed
    paired with the same seed at the same rounds: over the last 10 common evaluations, then
    averaged within `windows` equal windows of rounds (mean +- std over seeds); "" without
    randommask runs."""
    if "randommask" not in runs:
        return ""
    by_seed = {run.seed: run for run in runs["randommask"]}
    last = max(r["round"] for run in runs["randommask"] for r in run.records)
    edges = np.linspace(0, last, windows + 1).round().astype(int)
    header = [
        "| strategy | seeds | last-10 - randommask | "
        + " | ".join(f"rounds {a + 1}-{b}" for a, b in zip(edges[:-1], edges[1:]))
        + " |",
        "|---|---|---|" + "---|" * windows,
    ]
    lines = []
    for strategy, seeds in runs.items():
        pairs = [paired_by_round(run, by_seed[run.seed], metric) for run in seeds if run.seed in by_seed]
        if strategy == "randommask" or "mask-drift" not in seeds[0].records[-1] or not pairs:
            continue
        cells = [_spread([float(np.mean(gap[-10:])) for _, gap in pairs], signed=True)]
        for a, b in zip(edges[:-1], edges[1:]):
            means = [float(np.mean(gap[(rounds > a) & (rounds <= b)])) for rounds, gap in pairs]
            cells.append(_spread(means, signed=True) if all(np.isfinite(means)) else "-")
        lines.append(f"| {strategy} | {len(pairs)} | " + " | ".join(cells) + " |")
    return "\n".join(header + lines) + "\n" if lines else ""


@dataclass
class SparsityGain:
    """One experiment's paired gain of a strategy over randommask (last-10, by seed)."""

    experiment: str
    sparsity: float
    rounds: int
    gains: list[float]


def sparsity_gain(experiment_dir: Path, strategy: str = "feddst", metric: str = METRIC) -> SparsityGain:
    """`strategy` minus randommask over the last 10 common evaluations, each seed paired with
    the same seed, at the sparsity of the experiment's runs (their config.json)."""
    runs = load_runs(experiment_dir)
    missing = [name for name in (strategy, "randommask") if name not in runs]
    if missing:
        raise ValueError(f"{experiment_dir}: no finished runs of {missing}")
    by_seed = {run.seed: run for run in runs["randommask"]}
    pairs = [paired_by_round(run, by_seed[run.seed], metric) for run in runs[strategy] if run.seed in by_seed]
    config = json.loads((experiment_dir / f"{strategy}-seed{runs[strategy][0].seed}" / "config.json").read_text())
    gains = [float(np.mean(gap[-10:])) for _, gap in pairs]
    return SparsityGain(experiment_dir.name, config["sparsity"], config["num_server_rounds"], gains)


def plot_gain_vs_sparsity(points: list[SparsityGain], path: Path, metric: str = METRIC) -> None:
    """The moving mask's gain over the fixed random mask against sparsity: mean over seeds,
    error bars one std, each point labelled with its experiment's rounds and seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(6, 4))
    for rounds in sorted({p.rounds for p in points}):
        mine = sorted((p for p in points if p.rounds == rounds), key=lambda p: p.sparsity)
        means = [100 * np.mean(p.gains) for p in mine]
        stds = [100 * np.std(p.gains) for p in mine]
        axis.errorbar([p.sparsity for p in mine], means, yerr=stds, marker="o", capsize=4, label=f"{rounds} rounds")
        for p, mean in zip(mine, means):
            axis.annotate(f"{len(p.gains)} seeds", (p.sparsity, mean), textcoords="offset points", xytext=(6, 4))
    axis.axhline(0.0, color="grey", linewidth=0.8)
    axis.set_xlabel("sparsity S")
    axis.set_ylabel(f"moving - fixed mask, {metric}\n(points, last 10 evaluations)")
    axis.grid(alpha=0.3)
    axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def entered_per_readjust(run: Run) -> list[int]:
    """mask-entered on every readjust round (readjust-alpha > 0)."""
    return [r["mask-entered"] for r in run.records if r.get("readjust-alpha", 0) > 0]


def plot_mask_movement(runs: dict[str, list[Run]], path: Path) -> bool:
    """Positions entering the global mask per readjust round, and the drift from the
    initial mask over rounds, mean over seeds; False (no file) without mask records."""
    moving = {s: seeds for s, seeds in runs.items() if "mask-entered" in seeds[0].records[-1]}
    if not moving:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_readjust, by_round) = plt.subplots(1, 2, figsize=(12, 4.5))
    for strategy, seeds in moving.items():
        readjust_rounds = [r["round"] for r in seeds[0].records if r.get("readjust-alpha", 0) > 0]
        if readjust_rounds:
            entered = np.asarray([entered_per_readjust(run) for run in seeds], dtype=np.float64)
            by_readjust.plot(readjust_rounds, entered.mean(axis=0), marker="o", label=f"{strategy} (n={len(seeds)})")
        rounds = np.asarray([r["round"] for r in seeds[0].records])
        _band(by_round, rounds, np.stack([[r["mask-drift"] for r in run.records] for run in seeds]), strategy)
    by_readjust.set(xlabel="readjust round", ylabel="positions entering the global mask", yscale="symlog")
    by_round.set(xlabel="round", ylabel="mask drift (share of the initial mask gone)")
    for axis in (by_readjust, by_round):
        axis.grid(alpha=0.3)
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot(runs: dict[str, list[Run]], path: Path, metric: str = METRIC) -> None:
    """Metric vs cumulative upload (GiB) and vs round: mean over seeds, min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_upload, by_round) = plt.subplots(1, 2, figsize=(12, 4.5))
    for strategy, seeds in runs.items():
        grid = np.linspace(0, min(run.total_upload for run in seeds), 200)
        curves = np.stack([[value_at_cap(run, cap, metric) for cap in grid] for run in seeds])
        _band(by_upload, grid / GIB, curves, strategy)
        rounds = np.asarray([r["round"] for r in seeds[0].records if metric in r])
        values = np.stack([[r[metric] for r in run.records if metric in r] for run in seeds])
        _band(by_round, rounds, values, strategy)
    by_upload.set_xlabel("cumulative upload, all clients (GiB)")
    by_round.set_xlabel("round")
    for axis in (by_upload, by_round):
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _band(axis, x: np.ndarray, values: np.ndarray, label: str) -> None:
    (line,) = axis.plot(x, values.mean(axis=0), label=f"{label} (n={len(values)})")
    if len(values) > 1:
        axis.fill_between(x, values.min(axis=0), values.max(axis=0), color=line.get_color(), alpha=0.2)


def _last(run: Run, metric: str) -> float:
    return run.curve(metric)[1][-1]


def _spread(values: list[float], signed: bool = False, digits: int = 4) -> str:
    """The mean, and +- the population std when there is more than one value."""
    mean = _fmt(float(np.mean(values)), signed, digits)
    return f"{mean} ± {np.std(values):.{digits}f}" if len(values) > 1 else mean


def _fmt(value: float, signed: bool = False, digits: int = 4) -> str:
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
