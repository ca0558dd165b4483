"""The public API for a user's own Flower app: FedDST's validated keyword-only constructor,
and `train_reply` with the user's own model and train function."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_data
from fakes import MASKABLE, SHAPES, Server, new_model, round_config
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from torch.nn import functional as F

import feddst_flwr
from feddst_flwr import protocol as P
from feddst_flwr.codec import carries_mask, is_sparse, payload_bytes
from feddst_flwr.masks import prune_and_regrow, seeded_generator
from feddst_flwr.training import LocalResult, LocalRound

pytestmark = pytest.mark.usefixtures("task_identity")


def own_train(data, *, leak: bool = False, readjust: bool = False, steps: int = 2):
    """A user's train function: full-batch SGD with weight decay, gradients masked (unless
    `leak`), and on readjust rounds FedDST's prune-and-regrow from the library."""

    def train_fn(model: torch.nn.Module, local: LocalRound) -> LocalResult:
        params = dict(model.named_parameters())
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-3)
        masks = local.masks
        for _ in range(steps):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(data.x), data.y)
            loss.backward()
            for name, mask in (masks or {}).items():
                if not leak:
                    params[name].grad.mul_(mask)
            optimizer.step()
        if readjust and masks and local.alpha_r > 0:  # regrow by the dense gradient
            optimizer.zero_grad()
            F.cross_entropy(model(data.x), data.y).backward()
            grads = {name: params[name].grad for name in masks}
            weights = {name: params[name].data for name in masks}
            masks = prune_and_regrow(weights, grads, masks, local.alpha_r, seeded_generator(0, local.server_round))
        return LocalResult(len(data), loss.item(), masks if readjust else None)

    return train_fn


def message(arrays: ArrayRecord, config: ConfigRecord) -> Message:
    return Message(RecordDict({"arrays": arrays, "config": config}), message_type=MessageType.TRAIN, dst_node_id=3)


# --------------------------------------------------------------------------- train_reply


def test_own_train_fn_sparse_round_replies_values_under_the_mask():
    server, data, state = Server(new_model()), random_data(), RecordDict()
    request = server.payload(send_mask=True)
    reply = feddst_flwr.train_reply(message(request, round_config(1)), state, new_model(), own_train(data))

    assert not reply.has_error()
    arrays, metrics = reply.content["arrays"], reply.content["metrics"]
    assert is_sparse(arrays) and not carries_mask(arrays)
    decoded = server.decode(arrays)
    for name, mask in server.masks.items():
        assert torch.count_nonzero(decoded.state[name][~mask]) == 0, name
        assert int(torch.count_nonzero(decoded.state[name])) == server.counts[name], name
    assert any(not torch.equal(decoded.state[n], server.state[n]) for n in server.state)  # it trained
    assert metrics[P.NUM_EXAMPLES] == len(data)
    assert metrics[P.UPLOAD_BYTES] == payload_bytes(arrays)
    assert metrics[P.DOWNLOAD_BYTES] == payload_bytes(request)
    assert metrics[P.SERVER_ROUND] == 1 and metrics[P.MASK_VERSION] == 0


def test_own_train_fn_readjusts_and_the_reply_carries_the_new_mask():
    server, data = Server(new_model()), random_data()
    config = round_config(5, alpha=0.2)
    reply = feddst_flwr.train_reply(
        message(server.payload(True), config), RecordDict(), new_model(), own_train(data, readjust=True)
    )

    arrays = reply.content["arrays"]
    assert carries_mask(arrays)
    decoded = server.decode(arrays)
    entered = sum(int((decoded.masks[n] & ~server.masks[n]).sum()) for n in server.masks)
    assert reply.content["metrics"][P.MASK_ENTERED] == entered > 0
    for name, mask in decoded.masks.items():
        assert int(mask.sum()) == server.counts[name], name


def test_own_train_fn_dense_round_for_a_baseline():
    model, data = new_model(), random_data()
    request = ArrayRecord(model.state_dict())
    config = ConfigRecord({P.SERVER_ROUND: 1})
    reply = feddst_flwr.train_reply(message(request, config), RecordDict(), new_model(), own_train(data))

    arrays = reply.content["arrays"]
    assert not is_sparse(arrays)
    trained = arrays.to_torch_state_dict()
    assert trained.keys() == model.state_dict().keys()
    assert any(not torch.equal(trained[n], t) for n, t in model.state_dict().items())


def test_masked_sgd_is_a_train_fn_for_train_reply():
    server, data = Server(new_model()), random_data()
    train_fn = feddst_flwr.masked_sgd(data, epochs=1, batch_size=8, lr=0.05, device="cpu")
    reply = feddst_flwr.train_reply(
        message(server.payload(True), round_config(5, alpha=0.2)), RecordDict(), new_model(), train_fn
    )

    decoded = server.decode(reply.content["arrays"])
    assert decoded.mask_sent
    assert all(int(decoded.masks[n].sum()) == server.counts[n] for n in server.masks)


def answer(train_fn, config: ConfigRecord | None = None) -> Message:
    """train_reply's answer to a sparse round (the mask sent in full) trained by `train_fn`."""
    server = Server(new_model())
    return feddst_flwr.train_reply(
        message(server.payload(True), config or round_config(5)), RecordDict(), new_model(), train_fn
    )


def trained_then(change, *, readjust: bool = False):
    """`own_train`, then `change(model, result)` (which may replace the result)."""
    train_fn = own_train(random_data(), readjust=readjust)

    def changed(model, local):
        result = train_fn(model, local)
        with torch.no_grad():
            return change(model, result) or result

    return changed


def grows_one(model, local):
    masks = {name: mask.clone() for name, mask in local.masks.items()}
    masks[MASKABLE[1]].view(-1)[torch.nonzero(~masks[MASKABLE[1]].view(-1))[0]] = True
    return LocalResult(8, 0.0, masks)


def moves(model, local):
    return own_train(random_data(), readjust=True)(model, LocalRound(local.server_round, local.masks, alpha_r=0.2))


def upload_gradients() -> ConfigRecord:
    config = round_config(2)
    config[P.UPLOAD_GRADIENTS] = 1
    return config


def as_double(model, result):
    model.double()


def inf_bias(model, result):
    model.fc1.bias.fill_(float("inf"))


NAN_GRADIENTS = trained_then(
    lambda model, result: LocalResult(
        result.num_examples, result.loss, None, {n: torch.full(SHAPES[n], float("nan")) for n in MASKABLE}
    )
)
CONTRACT_VIOLATIONS = {  # train_fn, round config, the error reply's reason (a regex)
    "weights outside the mask": (
        own_train(random_data(), leak=True),
        None,
        rf"^train_fn left \d+ nonzero weights outside the mask in '{MASKABLE[1]}' \(multiply the gradients",
    ),
    "a mask with another count": (
        grows_one,
        round_config(5, alpha=0.2),
        rf"^train_fn's mask of '{MASKABLE[1]}' must be bool of shape \(16, 8, 3, 3\) with \d+ active weights",
    ),
    "masks of other layers": (
        trained_then(lambda model, result: LocalResult(8, 0.0, {MASKABLE[0]: torch.ones(SHAPES[MASKABLE[0]]) > 0})),
        round_config(5, alpha=0.2),
        rf"^train_fn returned masks for \['{MASKABLE[0]}'\], the server's mask covers",
    ),
    "masks not a dict": (
        trained_then(lambda model, result: LocalResult(8, 0.0, [])),  # type: ignore[arg-type]
        round_config(5, alpha=0.2),
        r"^train_fn returned masks of type list, not a dict of bool tensors$",
    ),
    "a moved mask without readjustment": (
        moves,
        None,
        r"^train_fn moved the mask on a round without readjustment \(alpha_r = 0\)$",
    ),
    "no gradients for PruneFL": (
        own_train(random_data()),
        upload_gradients(),
        r"^the server asked for gradients of \[.*\] \(PruneFL\); train_fn returned none or others$",
    ),
    "a gradient of another shape": (
        trained_then(
            lambda model, result: LocalResult(8, 0.0, None, {n: torch.zeros(SHAPES[n])[:1] for n in MASKABLE})
        ),
        upload_gradients(),
        rf"^train_fn's gradient of '{MASKABLE[0]}' is \(1, 1, 3, 3\), not a tensor of shape \(8, 1, 3, 3\)$",
    ),
    "not a LocalResult": (
        trained_then(lambda model, result: (result.num_examples, result.loss)),
        None,
        r"^train_fn returned tuple, not a LocalResult$",
    ),
    "no examples": (
        trained_then(lambda model, result: LocalResult(0, result.loss)),
        None,
        r"^train_fn's LocalResult 'num_examples' = 0: expected in \[1, inf\]$",
    ),
    "a numpy loss": (
        trained_then(lambda model, result: LocalResult(8, np.float32(0.5))),  # type: ignore[arg-type]
        None,
        r"^train_fn's LocalResult 'loss' = np.float32\(0.5\): expected float$",
    ),
    "a double model": (
        trained_then(as_double),
        None,
        r"^train_fn changed 'conv1.weight' to torch.float64 of shape \(8, 1, 3, 3\); the server sent torch.float32",
    ),
}


@pytest.mark.parametrize("violation", CONTRACT_VIOLATIONS, ids=list(CONTRACT_VIOLATIONS))
def test_a_train_fn_that_breaks_the_contract_gets_an_error_reply_naming_how(violation):
    train_fn, config, reason = CONTRACT_VIOLATIONS[violation]
    reply = answer(train_fn, config)
    assert reply.has_error() and not reply.has_content()
    assert reply.error.code == P.TRAIN_CONTRACT_CODE
    assert re.search(reason, reply.error.reason), reply.error.reason


def nan_in(name: str, where: str):
    """Set the weights of `name` to NaN: all of them, or only those outside the mask."""

    def change(model, result):
        weight = model.state_dict()[name]
        weight[weight == 0 if where == "outside" else torch.ones_like(weight, dtype=torch.bool)] = float("nan")

    return trained_then(change)


DIVERGED = {  # train_fn, round config, the error reply's reason (exact)
    "NaN weights (before: 'nonzero outside the mask')": (
        nan_in(MASKABLE[1], "all"),
        None,
        f"train_fn returned non-finite weights in '{MASKABLE[1]}': training diverged",
    ),
    "NaN only outside the mask": (
        nan_in(MASKABLE[2], "outside"),
        None,
        f"train_fn returned non-finite weights in '{MASKABLE[2]}': training diverged",
    ),
    "an inf bias": (
        trained_then(inf_bias),
        None,
        "train_fn returned non-finite weights in 'fc1.bias': training diverged",
    ),
    "a NaN loss": (
        trained_then(lambda model, result: LocalResult(result.num_examples, float("nan"))),
        None,
        "train_fn returned a non-finite loss (nan): training diverged",
    ),
    "NaN gradients for PruneFL": (
        NAN_GRADIENTS,
        upload_gradients(),
        f"train_fn returned non-finite gradients of '{MASKABLE[0]}': training diverged",
    ),
}


@pytest.mark.parametrize("case", DIVERGED, ids=list(DIVERGED))
def test_a_diverged_train_fn_gets_an_error_reply_naming_the_weight(case):
    train_fn, config, reason = DIVERGED[case]
    reply = answer(train_fn, config)
    assert reply.has_error() and not reply.has_content()
    assert (reply.error.code, reply.error.reason) == (P.TRAIN_DIVERGED_CODE, reason)


def test_bad_and_unanswerable_messages_get_error_replies():
    server, data = Server(new_model()), random_data()
    no_config = Message(RecordDict({"arrays": server.payload(True)}), message_type=MessageType.TRAIN, dst_node_id=3)
    reply = feddst_flwr.train_reply(no_config, RecordDict(), new_model(), own_train(data))
    assert reply.has_error() and reply.error.code == P.BAD_MESSAGE_CODE and "'config'" in reply.error.reason

    without_mask = message(server.payload(False), round_config(2, version=4))
    reply = feddst_flwr.train_reply(without_mask, RecordDict(), new_model(), own_train(data))
    assert reply.has_error() and reply.error.code == P.MISSING_MASK_CODE and "version 4" in reply.error.reason


# --------------------------------------------------------------------------- FedDST(...)


def test_feddst_arguments_are_keyword_only():
    with pytest.raises(TypeError):
        feddst_flwr.FedDST(MASKABLE)  # type: ignore[misc]
    strategy = feddst_flwr.FedDST(maskable=MASKABLE, sparsity=0.9, delta_r=3)
    assert (strategy.sparsity, strategy.delta_r) == (0.9, 3)


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("maskable", []),
        ("sparsity", 1.0),
        ("sparsity", -0.1),
        ("sparsity", float("nan")),
        ("sparsity_distribution", "erk2"),
        ("alpha", 1.5),
        ("delta_r", 0),
        ("delta_r", 2.0),
        ("r_end", -1),
        ("fraction_train", 0.0),
        ("clients_per_round", -1),
        ("min_train_nodes", 0),
        ("min_available_nodes", 0),
        ("proximal_mu", -1.0),
        ("min_votes", 0),
        ("min_fit_fraction", 1.5),
        ("max_num_examples", 0),
        ("max_update_norm", -1.0),
        ("value_dtype", "float64"),
        ("seed", "0"),
        ("server_optimizer", "momentum"),
        ("alpha", True),
    ],
)
def test_feddst_rejects_a_bad_argument_by_name(argument, value):
    options = {"maskable": MASKABLE, argument: value}
    with pytest.raises(ValueError, match=rf"^FedDST\({argument}="):
        feddst_flwr.FedDST(**options)


def test_prunefl_validates_like_feddst():
    with pytest.raises(ValueError, match=r"^PruneFL\(delta_r="):
        feddst_flwr.PruneFL(maskable=MASKABLE, delta_r=0)


def runtime_imports() -> dict[str, set[str]]:
    """The library's module graph: each module's relative imports outside `if` blocks
    (TYPE_CHECKING imports are not run)."""
    import ast

    root = Path(__file__).parent.parent / "feddst_flwr"
    files = {}
    for path in root.rglob("*.py"):
        parts = path.with_suffix("").relative_to(root.parent).parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                submodules = {f"{target}.{a.name}" for a in node.names} & set(files)
                deps |= submodules or ({target} & set(files))
        graph[name] = deps - {name}
    return graph


def test_the_import_graph_has_no_circle_and_config_is_a_schema():
    graph = runtime_imports()
    assert {"feddst_flwr.codec", "feddst_flwr.masks", "feddst_flwr.validation"} <= graph["feddst_flwr.strategy"]
    done, active = set(), []

    def visit(module: str) -> None:
        assert module not in active, f"import circle: {' -> '.join(active[active.index(module) :] + [module])}"
        if module in done:
            return
        active.append(module)
        for dep in sorted(graph[module]):
            visit(dep)
        active.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)
    heavy = {m for m in graph if m.startswith("feddst_flwr.data")} | {
        "feddst_flwr.models", "feddst_flwr.strategy", "feddst_flwr.registry", "feddst_flwr.prunefl"}  # fmt: skip
    assert not graph["feddst_flwr.config"] & heavy


def test_the_fab_holds_the_apps_and_the_library_only():
    """`flwr run .` packs a FAB from the repository: the committed records under results/ would
    push it past Flower's 10 MiB limit, so pyproject's fab-include names the apps and the library."""
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk
    from flwr.common.constant import FAB_MAX_SIZE

    root = Path(__file__).resolve().parents[1]
    fab = build_fab_from_disk(root)
    names = set(zipfile.ZipFile(io.BytesIO(fab)).namelist()) - {"pyproject.toml", ".info/CONTENT"}
    library = {str(p.relative_to(root)) for p in (root / "feddst_flwr").rglob("*.py")}
    assert names == {"server_app.py", "client_app.py"} | library
    assert len(fab) < FAB_MAX_SIZE
