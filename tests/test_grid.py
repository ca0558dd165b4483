"""MeteredGrid (payload bytes), OrderedGrid (stable node and reply order) and partition_ids."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

from feddst_flwr import protocol as P
from feddst_flwr.codec import encode, payload_bytes
from feddst_flwr.config import ConfigError
from feddst_flwr.grid import MeteredGrid, OrderedGrid, Traffic, check_partition_ids, partition_ids

pytestmark = pytest.mark.usefixtures("task_identity")


def first_k_mask(shape: tuple[int, ...], k: int) -> torch.Tensor:
    flat = torch.zeros(math.prod(shape), dtype=torch.bool)
    flat[:k] = True
    return flat.view(shape)


class EchoGrid:
    """Inner grid: replies to every message with a fixed reply content."""

    def __init__(self, reply_content) -> None:
        self.reply_content = reply_content
        self.sent: list[Message] = []

    def send_and_receive(self, messages, *, timeout=None):
        self.sent.extend(messages)
        return [self.reply_content(m) for m in messages]

    def push_messages(self, messages):
        self.sent.extend(messages)
        return [str(i) for i, _ in enumerate(messages)]

    def pull_messages(self, message_ids):
        return [self.reply_content(self.sent[int(i)]) for i in message_ids]

    def get_node_ids(self):
        return [7, 5, 6]


def tensors(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 6, generator=generator), "b": torch.randn(4, generator=generator)}


def sparse_record(send_mask: bool) -> ArrayRecord:
    masks = {"w": first_k_mask((4, 6), 7)}
    return encode(tensors(0), masks, send_mask)


def instruction(node_id: int, records: dict) -> Message:
    return Message(content=RecordDict(records), message_type=MessageType.TRAIN, dst_node_id=node_id)


def reply_for(message: Message) -> Message:
    node = message.metadata.dst_node_id
    if node == 3:
        return Message(Error(code=P.MISSING_MASK_CODE, reason="missing mask"), reply_to=message)
    arrays = sparse_record(send_mask=node == 2)
    metrics = MetricRecord({"num-examples": 10, "upload-bytes": 1000 + node, "download-bytes": 2000 + node})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=message)


def test_metered_grid_counts_payload_bytes_and_take_resets():
    grid = MeteredGrid(EchoGrid(reply_for))
    extra = ArrayRecord(tensors(1))  # a second ArrayRecord in one message counts too
    messages = [
        instruction(1, {"arrays": sparse_record(True), "config": ConfigRecord({"x": 1})}),
        instruction(2, {"arrays": sparse_record(False), "extra": extra}),
        instruction(3, {"arrays": ArrayRecord(tensors(2))}),
    ]
    replies = list(grid.send_and_receive(iter(messages), timeout=5.0))

    download = payload_bytes(sparse_record(True)) + payload_bytes(sparse_record(False)) + payload_bytes(extra)
    download += payload_bytes(ArrayRecord(tensors(2)))
    upload = payload_bytes(sparse_record(False)) + payload_bytes(sparse_record(True))  # node 3 replied an error
    assert payload_bytes(sparse_record(True)) - payload_bytes(sparse_record(False)) == 3  # 24 mask bits
    assert len(replies) == 3 and replies[2].has_error()
    traffic = grid.take()
    assert traffic == Traffic(
        download=download,
        upload=upload,
        client_download=2001 + 2002,
        client_upload=1001 + 1002,
        messages=3,
        replies=3,
        errors=1,
    )
    assert grid.take() == Traffic()


def test_metered_grid_counts_push_and_pull():
    inner = EchoGrid(reply_for)
    grid = MeteredGrid(inner)
    messages = [instruction(1, {"arrays": sparse_record(True)}), instruction(2, {"arrays": sparse_record(True)})]
    ids = list(grid.push_messages(messages))
    assert grid.traffic.download == 2 * payload_bytes(sparse_record(True)) and grid.traffic.replies == 0
    list(grid.pull_messages(ids))
    traffic = grid.take()
    assert (traffic.messages, traffic.replies) == (2, 2)
    assert traffic.upload == payload_bytes(sparse_record(False)) + payload_bytes(sparse_record(True))


class ShuffledGrid(EchoGrid):
    """Replies in reverse order of the messages, as a real runtime may."""

    def send_and_receive(self, messages, *, timeout=None):
        return list(reversed(super().send_and_receive(messages, timeout=timeout)))


def test_nodes_are_listed_by_partition_id_and_unknown_nodes_last():
    grid = OrderedGrid(EchoGrid(reply_for), node_order={7: 0, 6: 1})
    assert grid.get_node_ids() == [7, 6, 5]
    assert OrderedGrid(EchoGrid(reply_for)).get_node_ids() == [5, 6, 7]  # no partition ids known: by node id


def test_replies_come_back_in_the_order_the_messages_were_sent():
    grid = OrderedGrid(MeteredGrid(ShuffledGrid(reply_for)))
    messages = [instruction(node, {"arrays": sparse_record(False)}) for node in (4, 1, 2)]
    replies = grid.send_and_receive(messages, timeout=5.0)
    assert [r.metadata.src_node_id for r in replies] == [4, 1, 2]


def test_the_superlinks_reply_comes_back_in_the_place_of_the_instruction_it_answers():
    def reply(message: Message) -> Message:  # node 4 is lost: the SuperLink (node id 1) answers for it
        if message.metadata.dst_node_id == 4:
            return create_message_error_unavailable_res_message(message.metadata, "node_unavail")
        return reply_for(message)

    messages = [instruction(node, {"arrays": sparse_record(False)}) for node in (5, 4, 2)]
    for i, message in enumerate(messages):  # ids, as Flower's grids give them when they send
        message.metadata.__dict__["_message_id"] = f"id-{i}"
    replies = OrderedGrid(ShuffledGrid(reply)).send_and_receive(messages, timeout=5.0)
    assert [r.metadata.reply_to_message_id for r in replies] == ["id-0", "id-1", "id-2"]
    assert [r.metadata.src_node_id for r in replies] == [5, 1, 2] and replies[1].has_error()


def partition_reply(message: Message) -> Message:
    """A client app's answer to the partition-id query; node 6 is an old client without one."""
    assert message.metadata.message_type == MessageType.QUERY
    node = message.metadata.dst_node_id
    if node == 6:
        return Message(Error(code=0, reason="no query handler"), reply_to=message)
    return Message(RecordDict({"metrics": MetricRecord({P.PARTITION_ID: 12 - node})}), reply_to=message)


def test_partition_ids_asks_every_node_and_skips_failures():
    inner = EchoGrid(partition_reply)
    assert partition_ids(inner) == {7: 5, 5: 7}
    assert sorted(m.metadata.dst_node_id for m in inner.sent) == [5, 6, 7]
    assert OrderedGrid(inner, partition_ids(inner)).get_node_ids() == [7, 5, 6]


def test_duplicate_and_out_of_range_partition_ids_are_an_error_naming_ids_and_nodes():
    def reply(message: Message) -> Message:
        ids = {7: 2, 5: 2, 6: 9, 8: -1, 9: 0}
        metrics = MetricRecord({P.PARTITION_ID: ids[message.metadata.dst_node_id]})
        return Message(RecordDict({"metrics": metrics}), reply_to=message)

    grid = EchoGrid(reply)
    grid.get_node_ids = lambda: [7, 5, 6, 8, 9]
    order = partition_ids(grid)
    assert order == {7: 2, 5: 2, 6: 9, 8: -1, 9: 0}
    expected = (
        "SuperNode partition-ids: partition-id 2 is claimed by nodes 5, 7; node 6 has partition-id 9, outside [0, 5); "
        "node 8 has partition-id -1, outside [0, 5) (each node needs its own, in [0, num-partitions))"
    )
    with pytest.raises(ConfigError) as raised:
        check_partition_ids(order, 5)
    assert str(raised.value) == expected
    check_partition_ids({7: 1, 5: 0, 6: 4}, 5)  # distinct, in range: nothing to say
