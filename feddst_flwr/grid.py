"""The server's view of the Grid (Flower's node messaging): payload byte metering, a
stable node order."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from logging import WARNING

from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from . import protocol as P
from .codec import CodecError, payload_bytes
from .config import ConfigError
from .validation import check_number, instruction_of


def partition_ids(grid: Grid, timeout: float = 600.0) -> dict[int, int]:
    """Ask every connected node for its partition-id (a QUERY message, answered by the
    client app); node ids change from run to run, partition ids do not."""
    query = RecordDict({P.CONFIG: ConfigRecord({P.QUERY: P.PARTITION_ID})})
    messages = [Message(query, dst_node_id=node, message_type=MessageType.QUERY) for node in grid.get_node_ids()]
    order = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = reply.metadata.src_node_id
        try:
            if reply.has_error() or P.METRICS not in reply.content.metric_records:
                raise CodecError("no partition-id in the reply")
            value = reply.content.metric_records[P.METRICS].get(P.PARTITION_ID)
            check_number("reply metric", P.PARTITION_ID, value, int, -math.inf, None)  # range: check_partition_ids
            order[node] = int(P.number(reply.content.metric_records[P.METRICS], P.PARTITION_ID))
        except CodecError as err:
            log(WARNING, "node %d has no valid partition-id (%s): it is listed after the others", node, err)
    return order


def check_partition_ids(order: dict[int, int], num_partitions: int) -> None:
    """Every node's partition-id (`partition_ids`: node id -> partition-id) is its own and in
    [0, num_partitions); ConfigError names the ids and the nodes otherwise (two nodes with one
    id would train on the same data, and their order would be Flower's, not the seed's)."""
    claims: dict[int, list[int]] = {}
    for node, partition in sorted(order.items()):
        claims.setdefault(partition, []).append(node)
    problems = [
        f"partition-id {partition} is claimed by nodes {', '.join(map(str, nodes))}"
        for partition, nodes in sorted(claims.items()) if len(nodes) > 1
    ] + [
        f"node {node} has partition-id {partition}, outside [0, {num_partitions})"
        for node, partition in sorted(order.items()) if not 0 <= partition < num_partitions
    ]  # fmt: skip
    if problems:
        raise ConfigError(
            f"SuperNode partition-ids: {'; '.join(problems)} (each node needs its own, in [0, num-partitions))"
        )


@dataclass
class Traffic:
    """Payload bytes counted by the server, and as reported by the clients themselves."""

    download: int = 0
    upload: int = 0
    client_download: int = 0
    client_upload: int = 0
    messages: int = 0
    replies: int = 0
    errors: int = 0  # replies that carry an error instead of content


def message_bytes(message: Message) -> int:
    """Payload bytes of a message: all its ArrayRecords (0 for an error reply)."""
    if message.has_error():
        return 0
    return sum(payload_bytes(record) for record in message.content.array_records.values())


def reported_bytes(metrics: MetricRecord, key: str) -> int:
    """A byte count a client reports, 0 unless it is a non-negative int (the strategy's
    reply guard rejects such a reply; the meter must not crash on it first)."""
    value = metrics.get(key, 0)
    try:
        check_number("reply metric", key, value, int, 0, None)
    except CodecError:
        return 0
    return int(P.number(metrics, key))


class GridWrapper(Grid):
    """A Grid that hands every call to the Grid it wraps; subclasses change one job."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.grid.send_and_receive(messages, timeout=timeout)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def set_run(self, run_id):  # type: ignore[no-untyped-def]
        return self.grid.set_run(run_id)

    @property
    def run(self):  # type: ignore[no-untyped-def]
        return self.grid.run

    def create_message(self, *args, **kwargs) -> Message:  # type: ignore[no-untyped-def]
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()


class MeteredGrid(GridWrapper):
    """Counts the payload bytes of every message sent and every reply received, identically
    in simulation and deployment; `take()` returns and resets the count."""

    def __init__(self, grid: Grid) -> None:
        super().__init__(grid)
        self.traffic = Traffic()

    def take(self) -> Traffic:
        traffic, self.traffic = self.traffic, Traffic()
        return traffic

    def _sent(self, messages: list[Message]) -> None:
        self.traffic.download += sum(message_bytes(m) for m in messages)
        self.traffic.messages += len(messages)

    def _received(self, replies: list[Message]) -> None:
        for reply in replies:
            self.traffic.upload += message_bytes(reply)
            self.traffic.replies += 1
            self.traffic.errors += reply.has_error()
            if not reply.has_error() and P.METRICS in reply.content.metric_records:
                metrics = reply.content.metric_records[P.METRICS]
                self.traffic.client_upload += reported_bytes(metrics, P.UPLOAD_BYTES)
                self.traffic.client_download += reported_bytes(metrics, P.DOWNLOAD_BYTES)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        self._sent(messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self._received(replies)
        return replies

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        self._sent(messages)
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self.grid.pull_messages(message_ids))
        self._received(replies)
        return replies


class OrderedGrid(GridWrapper):
    """Lists nodes in a stable order (by partition-id, see `partition_ids`; node ids change
    from run to run) and returns replies in the order of the messages they answer (the
    SuperLink's error replies included), so seeded sampling and aggregation are reproducible."""

    def __init__(self, grid: Grid, node_order: dict[int, int] | None = None) -> None:
        super().__init__(grid)
        self.node_order = node_order or {}

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        replies = self.grid.send_and_receive(messages, timeout=timeout)
        ids = {m.metadata.message_id: m for m in messages if m.metadata.message_id}
        by_node = {m.metadata.dst_node_id: m for m in messages}
        position = {id(m): i for i, m in enumerate(messages)}  # of the instruction a reply answers
        return sorted(replies, key=lambda r: position.get(id(instruction_of(r, ids, by_node)), len(messages)))

    def get_node_ids(self) -> Iterable[int]:
        """Connected nodes by partition-id (unknown nodes last, by id)."""
        nodes = self.grid.get_node_ids()
        return sorted(nodes, key=lambda n: (0, self.node_order[n]) if n in self.node_order else (1, n))
