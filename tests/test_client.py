"""Tests for feddst_flwr.client.client_round (no Flower runtime: records are built
directly) and for the ClientApp's train handler in client_app.py."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from fakes import FakeGrid, Federation, Server, make_strategy, new_model, round_config, run_client
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp.strategy import FedProx

from feddst_flwr import protocol as P
from feddst_flwr import training as training_module
from feddst_flwr.client import MissingMaskError, held_mask, injected_failure
from feddst_flwr.codec import DENSE_STYPE, VALUE_DTYPES, CodecError, carries_mask, is_sparse, payload_bytes
from feddst_flwr.masks import hamming, maskable_names
from feddst_flwr.training import LocalTraining


@pytest.fixture
def server() -> Server:
    return Server(new_model())


@pytest.fixture
def spy(monkeypatch):
    """Replace local training by a recorder of what it was given (weights, masks, options)."""
    calls = []

    def fake_train(model, data, masks, **options):
        calls.append({"state": copy.deepcopy(model.state_dict()), "masks": masks, **options})
        return LocalTraining(0.0, masks)

    monkeypatch.setattr(training_module, "train", fake_train)
    return calls


# --------------------------------------------------------------------------- sparse rounds


def test_sparse_round_without_readjust_replies_values_only(server, make_cfg, data):
    request = server.payload(send_mask=True)
    result = run_client(new_model(), data, request, round_config(), make_cfg(), RecordDict(), 0)

    assert is_sparse(result.arrays) and not carries_mask(result.arrays)
    decoded = server.decode(result.arrays)
    assert not decoded.mask_sent
    for name, mask in server.masks.items():
        assert torch.count_nonzero(decoded.state[name][~mask]) == 0, name
        assert int(torch.count_nonzero(decoded.state[name])) == server.counts[name], name
        assert len(result.arrays[name].data) == 2 * server.counts[name]  # float16 values (the default) only
    assert any(not torch.equal(decoded.state[n], server.state[n]) for n in server.state)  # it trained

    metrics = result.metrics
    assert metrics["upload-bytes"] == payload_bytes(result.arrays)
    assert metrics["download-bytes"] == payload_bytes(request)
    assert metrics["upload-bytes"] < metrics["download-bytes"]  # the request carried the bitmask
    assert metrics["num-examples"] == len(data)
    assert metrics["mask-entered"] == 0


@pytest.mark.parametrize("readjust_at", ["end", "last-epoch", "mid"])
def test_readjust_round_returns_new_mask_with_erk_counts(server, make_cfg, data, readjust_at):
    node_state = RecordDict()
    config = round_config(server_round=5, version=0, alpha=0.2)
    cfg = make_cfg(readjust_at=readjust_at, local_epochs=2)
    result = run_client(new_model(), data, server.payload(True), config, cfg, node_state, 0)

    assert carries_mask(result.arrays)
    decoded = server.decode(result.arrays)
    assert decoded.mask_sent
    entered = sum(int((decoded.masks[n] & ~server.masks[n]).sum()) for n in server.masks)
    assert result.metrics["mask-entered"] == entered > 0
    for name, new_mask in decoded.masks.items():
        old_mask = server.masks[name]
        assert int(new_mask.sum()) == server.counts[name], name
        # per layer round(0.2 * active) drop and as many grow: at most k positions enter
        assert int((new_mask & ~old_mask).sum()) <= round(0.2 * server.counts[name]), name
        assert torch.count_nonzero(decoded.state[name][~new_mask]) == 0, name
        regrown = decoded.state[name][new_mask & ~old_mask]
        if readjust_at == "end":  # the paper: regrown weights are uploaded at zero
            assert torch.count_nonzero(regrown) == 0, name
        elif regrown.numel():  # trained for an epoch before upload
            assert torch.count_nonzero(regrown) == regrown.numel(), name
        if old_mask.all():  # a layer ERK keeps dense: never pruned, nothing zeroed
            assert new_mask.all() and torch.count_nonzero(decoded.state[name]) == old_mask.numel(), name
    assert any(server.masks[n].all() for n in server.masks)  # the case above was exercised
    assert result.metrics["upload-bytes"] == payload_bytes(result.arrays)
    # the node keeps the server's mask of this version, not its local readjustment
    held = held_mask(node_state, server.shapes())
    assert held.version == 0 and all(torch.equal(held.masks[name], server.masks[name]) for name in server.masks)


def test_clients_of_one_round_shuffle_differently(server, make_cfg, data, spy):
    """Same round, same partition size: the data order depends on the partition id."""
    orders = {}
    for partition_id in (0, 1, 0):
        run_client(new_model(), data, server.payload(True), round_config(3), make_cfg(), RecordDict(), partition_id)
        order = torch.randperm(len(data), generator=spy[-1]["generator"]).tolist()
        assert orders.setdefault(partition_id, order) == order  # reproducible
    assert orders[0] != orders[1]
    run_client(new_model(), data, server.payload(True), round_config(4), make_cfg(), RecordDict(), 0)
    assert torch.randperm(len(data), generator=spy[-1]["generator"]).tolist() != orders[0]  # and on the round


# --------------------------------------------------------------------------- mask versions on the node


def test_first_bitmask_is_stored_with_its_version(server, make_cfg, data, spy):
    node_state = RecordDict()
    assert held_mask(node_state, server.shapes()) is None

    run_client(new_model(), data, server.payload(True), round_config(version=3), make_cfg(), node_state, 0)

    held = held_mask(node_state, server.shapes())
    assert held is not None and held.version == 3 and set(held.masks) == set(server.masks)
    assert all(torch.equal(held.masks[name], server.masks[name]) for name in server.masks)


def test_same_version_without_bitmask_decodes_with_held_mask(server, make_cfg, data, spy):
    node_state = RecordDict()
    cfg = make_cfg()
    run_client(new_model(), data, server.payload(True), round_config(1, version=3), cfg, node_state, 0)
    request = server.payload(False)
    result = run_client(new_model(), data, request, round_config(2, version=3), cfg, node_state, 0)

    received = spy[-1]
    assert all(torch.equal(received["state"][n], server.state[n]) for n in server.state)
    assert all(torch.equal(received["masks"][n], server.masks[n]) for n in server.masks)
    assert server.decode(result.arrays, version=3).state.keys() == server.state.keys()
    assert result.metrics["download-bytes"] == payload_bytes(request)


@pytest.mark.parametrize("held_version", [None, 3])
def test_unknown_version_without_bitmask_raises_missing_mask(server, make_cfg, data, spy, held_version):
    node_state = RecordDict()
    if held_version is not None:
        config = round_config(version=held_version)
        run_client(new_model(), data, server.payload(True), config, make_cfg(), node_state, 0)
    calls = len(spy)

    with pytest.raises(MissingMaskError, match=r"version 4\b") as error:
        run_client(new_model(), data, server.payload(False), round_config(2, version=4), make_cfg(), node_state, 0)

    assert str(error.value).startswith(P.MISSING_MASK)
    assert len(spy) == calls  # no training happened
    if held_version is not None:  # the held mask is kept
        assert held_mask(node_state, server.shapes()).version == held_version


def test_new_version_with_bitmask_replaces_the_held_mask(make_cfg, data, spy):
    model = new_model()
    old, new = Server(model, seed=0), Server(model, seed=1)
    node_state = RecordDict()
    run_client(new_model(), data, old.payload(True), round_config(1, version=0), make_cfg(), node_state, 0)
    run_client(new_model(), data, new.payload(True), round_config(2, version=1), make_cfg(), node_state, 0)

    held = held_mask(node_state, new.shapes())
    assert held.version == 1 and all(torch.equal(held.masks[name], new.masks[name]) for name in new.masks)
    assert hamming(old.masks, new.masks) > 0


def test_round_options_reach_local_training(server, make_cfg, data, spy):
    cfg = make_cfg(lr=0.03, momentum=0.5, weight_decay=0.002, batch_size=4, local_epochs=2)
    run_client(new_model(), data, server.payload(True), round_config(mu=0.25), cfg, RecordDict(), 0)
    options = spy[-1]
    assert (options["epochs"], options["batch_size"], options["lr"]) == (2, 4, 0.03)
    assert (options["momentum"], options["weight_decay"], options["proximal_mu"]) == (0.5, 0.002, 0.25)


# --------------------------------------------------------------------------- dense payloads (baselines)


def test_dense_payload_gives_dense_reply(make_cfg, data):
    request = ArrayRecord(new_model().state_dict())
    config = ConfigRecord({"server-round": 1})  # what Flower's FedAvg sends
    result = run_client(new_model(), data, request, config, make_cfg(), RecordDict(), 0)

    assert not is_sparse(result.arrays) and not carries_mask(result.arrays)
    assert {array.stype for array in result.arrays.values()} == {DENSE_STYPE}
    state = result.arrays.to_torch_state_dict()
    assert state.keys() == new_model().state_dict().keys()
    assert all(torch.count_nonzero(state[name]) == state[name].numel() for name in maskable_names(new_model()))
    assert result.metrics["upload-bytes"] == payload_bytes(result.arrays) == payload_bytes(request)
    assert result.metrics["mask-entered"] == 0


@pytest.mark.usefixtures("task_identity")
def test_flower_fedprox_round_through_client_round(make_cfg, data, monkeypatch):
    seen = []
    real_train = training_module.train
    monkeypatch.setattr(
        training_module, "train", lambda *a, **kw: seen.append(kw["proximal_mu"]) or real_train(*a, **kw)
    )
    strategy = FedProx(proximal_mu=0.5, fraction_evaluate=0.0, min_train_nodes=2, min_available_nodes=2)
    initial = ArrayRecord(new_model().state_dict())
    messages = list(strategy.configure_train(1, initial, ConfigRecord(), FakeGrid([11, 12])))

    replies = []
    for message in messages:
        arrays, config = message.content["arrays"], message.content["config"]
        result = run_client(new_model(), data, arrays, config, make_cfg(), RecordDict(), 0)
        assert not is_sparse(result.arrays)
        replies.append(Message(RecordDict({"arrays": result.arrays, "metrics": result.metrics}), reply_to=message))
    arrays, metrics = strategy.aggregate_train(1, replies)

    assert seen == [0.5, 0.5]
    assert arrays is not None and arrays.to_torch_state_dict().keys() == new_model().state_dict().keys()
    assert metrics["upload-bytes"] == payload_bytes(replies[0].content["arrays"])


# --------------------------------------------------------------------------- client_app.train


@pytest.fixture
def client_app():
    """Import client_app.py without letting its set_num_threads(1) leak into other tests."""
    threads = torch.get_num_threads()
    import client_app as module

    torch.set_num_threads(threads)
    return module


@pytest.fixture
def context(run_config, tmp_path) -> Context:
    run_config.update({"local-epochs": 1, "batch-size": 64, "cache-dir": str(tmp_path / "cache")})
    node_config = {"partition-id": 0, "num-partitions": 5}
    return Context(run_id=7, node_id=3, node_config=node_config, state=RecordDict(), run_config=run_config)


def app_server(context: Context) -> Server:
    from feddst_flwr.data import SPECS
    from feddst_flwr.models import build_model
    from feddst_flwr.registry import load_config

    cfg = load_config(context.run_config)
    return Server(build_model(cfg.model, SPECS[cfg.dataset].num_classes, cfg.seed))


def instruction(arrays: ArrayRecord, config: ConfigRecord, node_id: int = 3) -> Message:
    content = RecordDict({"arrays": arrays, "config": config})
    return Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node_id)


@pytest.mark.usefixtures("task_identity")
def test_client_app_missing_mask_gives_error_reply(client_app, context):
    msg = instruction(app_server(context).payload(False), round_config(2, version=2))
    reply = client_app.app(msg, context)
    assert reply.has_error() and not reply.has_content()
    assert reply.error.code == P.MISSING_MASK_CODE
    assert "version 2" in reply.error.reason
    assert reply.metadata.dst_node_id == msg.metadata.src_node_id
    assert reply.metadata.src_node_id == msg.metadata.dst_node_id == 3


@pytest.mark.usefixtures("task_identity")
def test_client_app_trains_and_keeps_the_mask_in_context_state(client_app, context):
    from feddst_flwr.data import load_partition, load_raw
    from feddst_flwr.registry import load_config, partition_scheme

    server = app_server(context)
    first = client_app.app(instruction(server.payload(True), round_config(1, version=0)), context)
    second = client_app.train(instruction(server.payload(False), round_config(2, version=0)), context)

    cfg = load_config(context.run_config)
    raw = load_raw(cfg.dataset, cfg.data_dir, cfg.cache_dir, cfg.test_fraction, cfg.seed)
    partition = load_partition(raw, partition_scheme(cfg, 5), cfg.dataset, 0)
    assert (cfg.dataset, cfg.partition) == ("digits", "pathological") and 0 < len(partition) < len(raw.y_train)
    for reply in (first, second):
        assert not reply.has_error()
        assert set(reply.content.array_records) == {"arrays"} and set(reply.content.metric_records) == {"metrics"}
        assert reply.content["metrics"]["num-examples"] == len(partition)
        decoded = server.decode(reply.content["arrays"])
        assert all(int(decoded.masks[n].sum()) == server.counts[n] for n in server.masks)
    assert held_mask(context.state, server.shapes()).version == 0


def test_prunefl_reconfiguration_round_uploads_dense_squared_gradients(server, make_cfg, data):
    config = ConfigRecord({**round_config(), "upload-gradients": 1})
    result = run_client(new_model(), data, server.payload(True), config, make_cfg(), RecordDict(), 0)
    assert result.gradients is not None and set(result.gradients) == set(server.masks)
    for name, array in result.gradients.items():
        squared = array.numpy()
        assert squared.shape == tuple(server.masks[name].shape) and (squared >= 0).all()
    pruned = [name for name, mask in server.masks.items() if not mask.all()]  # ERK keeps small layers dense
    assert pruned and all((result.gradients[n].numpy()[~server.masks[n].numpy()] > 0).any() for n in pruned)
    assert result.metrics["upload-bytes"] == payload_bytes(result.arrays) + payload_bytes(result.gradients)
    assert set(result.content().array_records) == {"arrays", "gradients"}
    plain = run_client(new_model(), data, server.payload(True), round_config(), make_cfg(), RecordDict(), 0)
    assert plain.gradients is None and set(plain.content().array_records) == {"arrays"}


# --------------------------------------------------------------------------- hostile server messages


def nan_payload(server: Server) -> ArrayRecord:
    record = server.payload(True)
    name = server.maskable[0]
    values = np.frombuffer(record[name].data, dtype=VALUE_DTYPES[record[name].dtype]).copy()
    values[0] = np.nan
    record[name] = Array(
        dtype=record[name].dtype, shape=record[name].shape, stype=record[name].stype, data=values.tobytes()
    )
    return record


BAD_MESSAGES = {
    "no server-round": (lambda s: s.payload(True), ConfigRecord({"mask-version": 0}), "lacks 'server-round'"),
    "no mask-version": (lambda s: s.payload(True), ConfigRecord({"server-round": 1}), "lacks 'mask-version'"),
    "alpha above 1": (lambda s: s.payload(True), round_config(alpha=2.0), "readjust-alpha"),
    "NaN alpha": (lambda s: s.payload(True), round_config(alpha=float("nan")), "readjust-alpha"),
    "negative mu": (lambda s: s.payload(True), round_config(mu=-1.0), "proximal-mu"),
    "string round": (lambda s: s.payload(True), ConfigRecord({"server-round": "1", "mask-version": 0}), "expected int"),
    "NaN weights": (nan_payload, round_config(), "NaN"),
    "missing layer": (
        lambda s: ArrayRecord({k: v for k, v in s.payload(True).items() if k != "fc2.bias"}),
        round_config(),
        "missing",
    ),
}


@pytest.mark.parametrize("bad", BAD_MESSAGES, ids=list(BAD_MESSAGES))
def test_client_rejects_a_bad_server_message_and_keeps_its_mask(server, make_cfg, data, bad):
    make_payload, config, error = BAD_MESSAGES[bad]
    state = RecordDict()
    run_client(new_model(), data, server.payload(True), round_config(1), make_cfg(), state, 0)
    held = held_mask(state, server.shapes())
    with pytest.raises(CodecError, match=error):
        run_client(new_model(), data, make_payload(server), config, make_cfg(), state, 0)
    after = held_mask(state, server.shapes())
    assert after.version == held.version and all(torch.equal(held.masks[n], after.masks[n]) for n in held.masks)


@pytest.mark.usefixtures("task_identity")
def test_client_app_replies_with_an_error_to_a_bad_message(client_app, context):
    reply = client_app.app(instruction(nan_payload(app_server(context)), round_config(1)), context)
    assert reply.has_error() and reply.error.code == P.BAD_MESSAGE_CODE and "NaN" in reply.error.reason
    config_only = Message(RecordDict({"config": round_config(1)}), message_type=MessageType.TRAIN, dst_node_id=3)
    reply = client_app.app(config_only, context)
    assert reply.has_error() and reply.error.code == P.BAD_MESSAGE_CODE and "'arrays'" in reply.error.reason


@pytest.mark.usefixtures("task_identity")
def test_client_app_answers_a_diverged_training_with_an_error_reply(client_app, context):
    """Masked SGD with lr = 1e30 diverges: the ClientApp replies with code 4004 naming the
    first non-finite weight, instead of raising (or blaming the mask)."""
    context.run_config["lr"] = 1e30
    reply = client_app.app(instruction(app_server(context).payload(True), round_config(1)), context)
    assert reply.has_error() and reply.error.code == P.TRAIN_DIVERGED_CODE
    assert re.fullmatch(r"train_fn returned non-finite weights in '[\w.]+': training diverged", reply.error.reason)


def test_injected_failures_are_reproducible_and_at_the_configured_rate(make_cfg):
    cfg = make_cfg(client_failure_rate=0.3)
    draws = [
        injected_failure(cfg.client_failure_rate, cfg.seed, round_config(r), p) for r in range(1, 41) for p in range(50)
    ]
    assert draws == [
        injected_failure(cfg.client_failure_rate, cfg.seed, round_config(r), p) for r in range(1, 41) for p in range(50)
    ]
    assert 0.27 < sum(draws) / len(draws) < 0.33
    assert not any(injected_failure(0.0, 0, round_config(r), p) for r in range(1, 11) for p in range(50))


@pytest.mark.usefixtures("task_identity")
def test_client_app_injected_failure_is_an_error_reply(client_app, context):
    context.run_config["client-failure-rate"] = 0.999
    reply = client_app.app(instruction(app_server(context).payload(True), round_config(1)), context)
    assert reply.has_error() and reply.error.code == P.INJECTED_FAILURE_CODE


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("value_dtype", ["float32", "float16"])
def test_reply_values_take_the_dtype_the_server_sent(make_cfg, value_dtype):
    """The wire dtype is a server argument only: the client answers in the dtype it received,
    whatever its own run config says (float16 here), and the server accepts every reply."""
    strategy = make_strategy(value_dtype=value_dtype, clients_per_round=3)
    federation = Federation(make_cfg(value_dtype="float16"), strategy=strategy)
    messages = federation.configure(1)
    replies = [federation.reply(m) for m in messages]
    name = strategy.maskable[0]
    assert all(reply.content["arrays"][name].dtype == value_dtype for reply in replies)
    arrays, _ = federation.aggregate(1, replies)
    assert arrays is not None and not strategy.stats.failures
