"""Benchmark: FedDST's server round against Flower's FedAvg aggregate on the same model,
side by side in one run (issue 28), and the client's per-round codec.

For each model (cifar10-cnn, femnist-cnn, resnet18) at S = 0.8 (ERK) and 20 and 100 replies:

  FedDST   the strategy's `aggregate_train` on the sparse replies (the reply guard's checks,
           decoding every reply, the sparse weighted average with votes, the magnitude
           re-prune, the server optimizer when set, the round's statistics), then its
           `configure_train` of the next round for the nodes that replied and one that holds
           no mask: values only (or with a delta, after the mask moved), and values with the
           full mask (the strategy codes a mask once per mask version).
  Flower   `aggregate_arrayrecords` (what FedAvg's `aggregate_train` averages with) on the
           same clients' dense float32 replies.

Two rounds per model: `steady` (no readjustment: every reply is values under the global
mask) and `readjust` (half the replies carry a mask that moved by alpha_r, as a delta).
Replies are the global model plus noise, built with the codec the clients use; num-examples
are drawn from 100-600. Seconds are the median and min over repetitions (the two sides
alternate); peak memory is the peak RSS of the process during the call above its RSS before
it (glibc's heap trimmed first, large blocks mmapped), in copies of the model's float32
weights. The client's codec: decoding a download and encoding the reply, on a steady round
(the download without a mask: the node holds it from the round before), a readjust round
(the same, the reply's moved mask as a delta) and the round after (`new mask`: the download
carries the moved global mask as a delta). `--train` adds a client's local training (the paper's local work: 10 epochs of
40 images, batch 32) per model. Prints markdown tables; one torch thread.

    python bench/server_round.py [--replies 20 100] [--models ...] [--repetitions 3] [--train] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from flwr.supercore.task_identity import TaskIdentity

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from wire import readjusted  # noqa: E402

from feddst_flwr import protocol as P  # noqa: E402
from feddst_flwr.client import receive, store_masks  # noqa: E402
from feddst_flwr.codec import DEFAULT_VALUE_DTYPE, HeldMask, encode  # noqa: E402
from feddst_flwr.data import TensorData  # noqa: E402
from feddst_flwr.masks import active, difference, maskable_names, readjust_alpha  # noqa: E402
from feddst_flwr.models import build_model  # noqa: E402
from feddst_flwr.strategy import FedDST  # noqa: E402
from feddst_flwr.training import train  # noqa: E402

MODELS = {"cifar10-cnn": 10, "femnist-cnn": 62, "resnet18": 10}
SPARSITY, ALPHA, DELTA_R, R_END = 0.8, 0.3, 2, 10
ROUNDS = {"steady": 1, "readjust": 2}  # server rounds: alpha_r = 0 on round 1, > 0 on round 2
CLIENT_ROUNDS = ("steady", "readjust", "new mask")
NOISE = 0.01
M_MMAP_THRESHOLD, MMAP_THRESHOLD = -3, 128 * 1024  # glibc mallopt: mmap large blocks, always


class BenchGrid:
    """The node ids a strategy samples from (nothing is sent)."""

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)


class Memory:
    """Peak RSS of this process during a call, above its RSS before (Linux; else None)."""

    def __init__(self) -> None:
        try:
            self.libc: ctypes.CDLL | None = ctypes.CDLL("libc.so.6")
            self.libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.libc = None

    @staticmethod
    def _status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    def peak(self, call: Callable[[], object]) -> tuple[float, int | None]:
        """(seconds, peak bytes above the start) of `call()`."""
        if self.libc is not None:
            self.libc.malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current RSS
            before = self._status("VmRSS")
        start = time.perf_counter()
        call()
        seconds = time.perf_counter() - start
        return seconds, (self._status("VmHWM") - before if self.libc is not None else None)


def model_bytes(state: dict[str, torch.Tensor]) -> int:
    """Bytes of the model's weights as float32: one 'model copy'."""
    return 4 * sum(t.numel() for t in state.values())


def noisy(state: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The state plus Gaussian noise on every floating-point tensor (BN counters as they are)."""
    return {
        name: t + NOISE * torch.randn(t.shape, generator=generator) if t.is_floating_point() else t.clone()
        for name, t in state.items()
    }


class Round:
    """One model's strategy after configure_train of a round, and its clients' replies."""

    def __init__(self, model_name: str, replies: int, kind: str, seed: int = 0) -> None:
        model = build_model(model_name, MODELS[model_name], seed)
        self.maskable = maskable_names(model)
        self.strategy = FedDST(
            maskable=self.maskable, sparsity=SPARSITY, alpha=ALPHA, delta_r=DELTA_R, r_end=R_END,
            clients_per_round=replies, seed=seed,
        )  # fmt: skip
        arrays = self.strategy.initialize(ArrayRecord(model.state_dict()))
        self.server_round = ROUNDS[kind]
        messages = list(
            self.strategy.configure_train(
                self.server_round, arrays, ConfigRecord(), BenchGrid(list(range(1, replies + 1)))
            )
        )
        self.model_copy = model_bytes(self.strategy.global_state)
        alpha_r = readjust_alpha(self.server_round, ALPHA, DELTA_R, R_END)
        generator = torch.Generator().manual_seed(seed + 1)
        sizes = torch.randint(100, 601, (replies,), generator=generator).tolist()
        held = HeldMask(self.strategy.masks, self.strategy.mask_version)
        self.replies, self.dense = [], []
        for i, message in enumerate(messages):
            masks = self.strategy.masks
            if alpha_r > 0 and i % 2 == 0:
                masks = readjusted(masks, alpha_r, generator)
            state = noisy(self.strategy.global_state, generator)
            for name, mask in masks.items():
                state[name].mul_(mask)
            metrics = MetricRecord(
                {
                    P.NUM_EXAMPLES: sizes[i], P.TRAIN_LOSS: 1.0, P.MASK_ENTERED: active(difference(masks, held.masks)),
                    P.UPLOAD_BYTES: 0, P.DOWNLOAD_BYTES: 0, P.SERVER_ROUND: self.server_round,
                    P.MASK_VERSION: held.version,
                }
            )  # fmt: skip
            reply = encode(state, masks, masks is not held.masks, DEFAULT_VALUE_DTYPE, held)
            self.replies.append(Message(RecordDict({P.ARRAYS: reply, P.METRICS: metrics}), reply_to=message))
            self.dense.append(
                RecordDict({P.ARRAYS: ArrayRecord(state), P.METRICS: MetricRecord({P.NUM_EXAMPLES: sizes[i]})})
            )

    def feddst(self) -> Callable[[], object]:
        """The server round on a fresh copy of the strategy (the copy is not timed)."""
        strategy = copy.deepcopy(self.strategy)
        strategy.clients_per_round = len(self.replies) + 1  # every node that replied, and one that holds no mask
        grid = BenchGrid(list(range(1, len(self.replies) + 2)))

        def run() -> object:
            arrays, _ = strategy.aggregate_train(self.server_round, self.replies)
            assert arrays is not None, strategy.stats.failures
            return strategy.configure_train(self.server_round + 1, arrays, ConfigRecord(), grid)

        return run

    def flower(self) -> Callable[[], object]:
        return lambda: aggregate_arrayrecords(self.dense, P.NUM_EXAMPLES)


def timed(memory: Memory, sides: dict[str, Callable[[], Callable[[], object]]], repetitions: int) -> dict[str, tuple]:
    """Per side: (median s, min s, peak bytes) over `repetitions`, the sides alternating."""
    seconds: dict[str, list[float]] = {side: [] for side in sides}
    peaks: dict[str, list[int]] = {side: [] for side in sides}
    for _ in range(repetitions):
        for side, prepare in sides.items():
            call = prepare()
            took, peak = memory.peak(call)
            seconds[side].append(took)
            if peak is not None:
                peaks[side].append(peak)
            del call
    return {
        side: (statistics.median(seconds[side]), min(seconds[side]), max(peaks[side]) if peaks[side] else None)
        for side in sides
    }


def copies(peak: int | None, model_copy: int) -> str:
    return "-" if peak is None else f"{peak / model_copy:.2f}"


def server_rows(memory: Memory, models: list[str], replies: list[int], repetitions: int) -> list[str]:
    rows = []
    for model_name in models:
        for count in replies:
            for kind in ROUNDS:
                bench = Round(model_name, count, kind)
                result = timed(memory, {"feddst": bench.feddst, "flower": bench.flower}, repetitions)
                (f_med, f_min, f_peak), (b_med, b_min, b_peak) = result["feddst"], result["flower"]
                rows.append(
                    f"| {model_name} | {count} | {kind} | {f_med:.3f} | {f_min:.3f} | {b_med:.3f} | {b_min:.3f} | "
                    f"{f_med / b_med:.2f} | {copies(f_peak, bench.model_copy)} | {copies(b_peak, bench.model_copy)} |"
                )
                print(rows[-1], flush=True)
                del bench
    return rows


def client_codec(model_name: str, kind: str, repetitions: int) -> tuple[float, float]:
    """(median, min) seconds of a client's codec in one round: decode the download, encode
    the reply. `steady`: the download has no mask (the node holds it, unpacked the round
    before); `readjust`: the same, and the reply carries its moved mask as a delta; `new mask`:
    the download carries a moved global mask as a delta from the one the node holds (the round
    after a readjustment), the reply is values under it."""
    model = build_model(model_name, MODELS[model_name], 0)
    bench = Round(model_name, 2, "steady" if kind == "new mask" else kind)
    strategy = bench.strategy
    version = strategy.mask_version
    alpha_r = readjust_alpha(ROUNDS["readjust"] if kind == "new mask" else bench.server_round, ALPHA, DELTA_R, R_END)
    moved = readjusted(strategy.masks, alpha_r, torch.Generator().manual_seed(3)) if alpha_r > 0 else None
    weights = {name: t.clone() for name, t in strategy.global_state.items()}
    for name, mask in (moved or strategy.masks).items():
        weights[name].mul_(mask)
    if kind == "new mask":
        assert moved is not None
        download = encode(weights, moved, True, strategy.value_dtype, HeldMask(strategy.masks, version))
        config = ConfigRecord({P.SERVER_ROUND: ROUNDS["readjust"] + 1, P.MASK_VERSION: version + 1})
    else:
        download = encode(strategy.global_state, strategy.masks, False, strategy.value_dtype)
        config = ConfigRecord({P.SERVER_ROUND: bench.server_round, P.MASK_VERSION: version})
    node_state = RecordDict()
    store_masks(node_state, strategy.masks, version)
    receive(model, encode(strategy.global_state, strategy.masks, False, strategy.value_dtype), ConfigRecord(
        {P.SERVER_ROUND: 1, P.MASK_VERSION: version}), node_state)  # fmt: skip  # the round before

    def run() -> None:  # as client_round: a reply goes under the masks received, or its own moved ones
        _, masks = receive(model, download, config, node_state)
        assert masks is not None
        sent = HeldMask(masks, int(config[P.MASK_VERSION]))
        reply_masks = moved if kind == "readjust" else masks
        encode(weights, reply_masks, kind == "readjust", strategy.value_dtype, sent)

    seconds = []
    for _ in range(repetitions):
        store_masks(node_state, strategy.masks, version)  # the node holds the old mask again (not timed)
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), min(seconds)


def client_rows(models: list[str], repetitions: int) -> list[str]:
    rows = []
    for model_name in models:
        cells = []
        for kind in CLIENT_ROUNDS:
            median, low = client_codec(model_name, kind, repetitions)
            cells.append(f"{1000 * median:.1f} | {1000 * low:.1f}")
        rows.append(f"| {model_name} | {' | '.join(cells)} |")
        print(rows[-1], flush=True)
    return rows


def local_training(model_name: str, repetitions: int) -> tuple[float, float]:
    """(median, min) seconds of the paper's local work: 10 epochs of 40 images, batch 32,
    under the model's S = 0.8 mask, on the CPU."""
    bench = Round(model_name, 2, "steady")
    model = build_model(model_name, MODELS[model_name], 0)
    model.load_state_dict(bench.strategy.global_state)
    generator = torch.Generator().manual_seed(0)
    data = TensorData(
        torch.randn((40, *model.input_shape), generator=generator), torch.randint(0, MODELS[model_name], (40,))
    )
    seconds = []
    for _ in range(repetitions):
        start = time.perf_counter()
        train(
            model, data, bench.strategy.masks, epochs=10, batch_size=32, lr=0.01, momentum=0.9, weight_decay=1e-3,
            proximal_mu=0.0, generator=generator,
        )  # fmt: skip
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), min(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--replies", nargs="+", type=int, default=[20, 100])
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--train", action="store_true", help="also time a client's local training per model")
    parser.add_argument("--quick", action="store_true", help="cifar10-cnn, 4 replies, one repetition (a test)")
    args = parser.parse_args()
    if args.quick:
        args.models, args.replies, args.repetitions = ["cifar10-cnn"], [4], 1
    torch.set_num_threads(1)
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1  # as in a ServerApp: messages need them
    memory = Memory()
    print(f"S = {SPARSITY}, one torch thread, {args.repetitions} repetitions; peak memory in model copies (float32)\n")
    print(
        "| model | replies | round | FedDST median s | min s | Flower FedAvg median s | min s | ratio (median) "
        "| FedDST peak extra | Flower peak extra |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    server_rows(memory, args.models, args.replies, args.repetitions)
    print(
        "\n| model | client codec, steady: median ms | min ms | readjust: median ms | min ms "
        "| new mask: median ms | min ms |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    client_rows(args.models, max(args.repetitions, 5))
    if args.train:
        print("\n| model | parameters | local training (10 epochs of 40 images, batch 32): median s | min s |")
        print("|---|---:|---:|---:|")
        for model_name in args.models:
            median, low = local_training(model_name, args.repetitions)
            size = sum(t.numel() for t in build_model(model_name, MODELS[model_name], 0).state_dict().values())
            print(f"| {model_name} | {size / 1e6:.2f} M | {median:.2f} | {low:.2f} |", flush=True)


if __name__ == "__main__":
    main()
