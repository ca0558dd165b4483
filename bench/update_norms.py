"""Benchmark: the spread of honest update norms in a round, to choose `max-update-norm` = k
(issue 27 item 9). A reply is refused when its update norm exceeds k x the median of the
round's other replies, so k must sit above the largest such ratio honest rounds reach
(docs/reliability.md, "Choosing `max-update-norm`").

Runs a paper preset (conf/<preset>.toml: 400 clients, 20 a round, FedDST) in this process, the
clients one after another with the ClientApp's own training (`client_app.trainer`), and prints,
per round, the sampled clients' update norms (the server's `validation.update_norm` of the
decoded reply against the model sent, as FedDST computes it): median, max, max / median, and
the largest norm / median of the other replies (`validation.peer_medians`), the ratio that
max-update-norm = k compares with k.

    python bench/update_norms.py mnist-paper cifar10-paper [--rounds 16] [--seed 0]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Iterable
from pathlib import Path

import tomllib
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from client_app import trainer  # noqa: E402
from feddst_flwr.client import client_round  # noqa: E402
from feddst_flwr.codec import HeldMask, decode  # noqa: E402
from feddst_flwr.data import SPECS, load_partition, load_raw  # noqa: E402
from feddst_flwr.masks import maskable_names  # noqa: E402
from feddst_flwr.models import build_model  # noqa: E402
from feddst_flwr.registry import build_strategy, load_config, partition_scheme  # noqa: E402
from feddst_flwr.strategy import FedDST  # noqa: E402
from feddst_flwr.validation import peer_medians, update_norm  # noqa: E402

NODES = 400  # the presets' federation


class InProcessGrid:
    """Nodes 1..NODES (partition-id = node id - 1) that train in this process when sent a message."""

    def __init__(self, config: dict) -> None:
        self.cfg = load_config(config)
        self.raw = load_raw(
            self.cfg.dataset, self.cfg.data_dir, self.cfg.cache_dir, self.cfg.test_fraction, self.cfg.seed
        )
        self.scheme = partition_scheme(self.cfg, NODES)
        self.states = {node: RecordDict() for node in range(1, NODES + 1)}

    def get_node_ids(self) -> list[int]:
        return list(self.states)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        return [self.reply(message) for message in messages]

    def reply(self, message: Message) -> Message:
        node, cfg = message.metadata.dst_node_id, self.cfg
        data = load_partition(self.raw, self.scheme, cfg.dataset, node - 1)
        model = build_model(cfg.model, SPECS[cfg.dataset].num_classes, cfg.seed)
        content = message.content
        result = client_round(
            model, content["arrays"], content["config"], self.states[node], trainer(cfg, data, node - 1)
        )
        return Message(result.content(), reply_to=message)


def norms(strategy: FedDST, replies: list[Message]) -> list[float]:
    """The update norm of every reply, as FedDST's max-update-norm computes it."""
    old = {name: tensor.numpy() for name, tensor in strategy.global_state.items()}
    held = HeldMask(strategy.masks, strategy.mask_version)
    decoded = [decode(r.content["arrays"], strategy.shapes, strategy.maskable, held) for r in replies]
    return [update_norm({name: t.numpy() for name, t in d.state.items()}, old) for d in decoded]


def measure(preset: str, rounds: int, seed: int) -> list[tuple[float, float]]:
    """Print one line per round; returns the rounds' (max / median, max / peers' median)."""
    defaults = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    values = tomllib.loads((ROOT / "conf" / f"{preset}.toml").read_text())
    config = {**defaults, **values, "data-dir": str((ROOT / values["data-dir"]).resolve()), "seed": seed,
              "device": "cpu"}  # fmt: skip
    grid = InProcessGrid(config)
    model = build_model(grid.cfg.model, SPECS[grid.cfg.dataset].num_classes, grid.cfg.seed)
    strategy = build_strategy(grid.cfg, maskable_names(model))
    assert isinstance(strategy, FedDST)
    strategy.resolve_r_end(grid.cfg.num_server_rounds)
    arrays, ratios = strategy.initialize(ArrayRecord(model.state_dict())), []
    for server_round in range(1, rounds + 1):
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
        replies = grid.send_and_receive(messages)
        values = norms(strategy, replies)
        median = statistics.median(values)
        ratios.append((max(values) / median, max(v / m for v, m in zip(values, peer_medians(values)))))
        print(
            f"{preset} seed {seed} round {server_round:3d}: {len(values)} replies, median {median:.4g}, "
            f"max {max(values):.4g}, max/median {ratios[-1][0]:.3f}, max/peers' median {ratios[-1][1]:.3f}, "
            f"min/median {min(values) / median:.3f}",
            flush=True,
        )
        arrays = strategy.aggregate_train(server_round, replies)[0] or arrays
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("presets", nargs="+")
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    # Flower builds instruction messages from the running task's identity; outside its runtime we set one
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, 1, 1
    for preset in args.presets:
        ratios = measure(preset, args.rounds, args.seed)
        for i, name in enumerate(("max/median", "max/peers' median")):
            values = [r[i] for r in ratios]
            print(
                f"{preset} seed {args.seed}: {name} over {len(values)} rounds: largest {max(values):.3f}, "
                f"median {statistics.median(values):.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
