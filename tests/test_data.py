"""Tests for feddst_flwr.data: the local loaders (IDX, image folder, .tar.gz, Hugging Face
parquet), the .npy and partition caches, the partition schemes and the paper's
client-mean accuracy. Every fixture file is written by the tests into tmp_path; the real
MNIST copy in ../shared/data is used when present."""

from __future__ import annotations

import gzip
import io
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from feddst_flwr import data
from feddst_flwr.data import (
    DatasetError,
    DatasetNotFoundError,
    PartitionScheme,
    RawDataset,
    client_mean_accuracy,
    client_test_weights,
    hub,
    idx,
    images,
    load_partition,
    load_raw,
    parquet,
    partition,
    partitions,
    read_idx,
    to_tensors,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]  # official train set
CLASSES = ("truck", "airplane", "cat")  # sorted: airplane=0, cat=1, truck=2


REAL_FROM_HUB = hub.from_hub


@pytest.fixture(autouse=True)
def fresh_and_offline(monkeypatch):
    """Every test starts from empty in-memory caches and may not reach the hub."""

    def no_network(name):
        raise AssertionError(f"hub.from_hub('{name}') called: no network access is allowed here")

    monkeypatch.setattr(hub, "from_hub", no_network)
    load_raw.cache_clear()
    partitions.cache_clear()
    yield
    load_raw.cache_clear()
    partitions.cache_clear()


@pytest.fixture
def cache(tmp_path) -> str:
    return str(tmp_path / "cache")


@pytest.fixture
def data_dir(tmp_path) -> Path:
    return tmp_path / "data"


# --------------------------------------------------------------------------- fixture writers


def pixels(n: int, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """n random uint8 images (C, H, W); image i has pixel [0, 0, 0] = i so rows are identifiable."""
    images = np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(n) % 256
    return images


def expected_raw(x_train, y_train, x_test, y_test, writers=None) -> RawDataset:
    return RawDataset(x_train, np.asarray(y_train, np.int64), x_test, np.asarray(y_test, np.int64), writers)


def assert_same(raw: RawDataset, expected: RawDataset) -> None:
    for field in ("x_train", "y_train", "x_test", "y_test"):
        actual, wanted = getattr(raw, field), getattr(expected, field)
        assert actual.dtype == (np.uint8 if field.startswith("x") else np.int64), field
        np.testing.assert_array_equal(actual, wanted, err_msg=field)


def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX: magic 0, 0, 0x08 (uint8), ndim; each dim as 4-byte big-endian; the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


def write_mnist(folder: Path, gz: bool = False) -> RawDataset:
    """MNIST-layout IDX files (30 train / 10 test 28x28 images) in folder."""
    x_train, x_test = pixels(30, (1, 28, 28)), pixels(10, (1, 28, 28), seed=1)
    expected = expected_raw(x_train, np.arange(30) % 10, x_test, np.arange(10)[::-1])
    suffix = ".gz" if gz else ""
    for prefix, x, y in (("train", expected.x_train, expected.y_train), ("t10k", expected.x_test, expected.y_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", x[:, 0])
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", y)
    return expected


def png(image: np.ndarray) -> bytes:
    """PNG bytes of a (C, H, W) uint8 image (C = 1 grey or 3 RGB)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_tree(root: Path, train=CLASSES, test=CLASSES, per_class=(3, 2)) -> RawDataset:
    """train/<class>/NNNN.png and test/<class>/NNNN.png of 32x32 RGB images; labels
    follow the sorted class names."""
    splits = []
    for seed, (part, classes, n) in enumerate((("train", train, per_class[0]), ("test", test, per_class[1]))):
        images = pixels(n * len(classes), (3, 32, 32), seed)
        for i, image in enumerate(images):
            folder = root / part / sorted(classes)[i // n]
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i % n:04d}.png").write_bytes(png(image))
        splits += [images, np.arange(len(images)) // n]
    return expected_raw(*splits)


def write_tarball(tarball: Path, scratch: Path, prefix: str = "", **tree) -> RawDataset:
    """An image-folder tree packed as a .tar.gz (members <prefix>train/<class>/NNNN.png)."""
    expected = write_tree(scratch, **tree)
    tarball.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tarball, "w:gz") as archive:
        for part in ("train", "test"):
            archive.add(scratch / part, arcname=f"{prefix}{part}")
    return expected


def write_parquet(path: Path, image_key: str, images: np.ndarray, **columns) -> None:
    """A Hugging Face-style parquet export: image cells are {bytes, path} structs of PNGs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cells = [{"bytes": png(image), "path": f"{i}.png"} for i, image in enumerate(images)]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({image_key: cells, **{k: list(v) for k, v in columns.items()}}), path)


def write_cifar_parquet(folder: Path, image_key: str = "img", label_key: str = "label", **extra) -> RawDataset:
    expected = expected_raw(pixels(12, (3, 32, 32)), np.arange(12) % 10, pixels(5, (3, 32, 32), 1), [9, 0, 3, 3, 1])
    for part, x, y in (("train", expected.x_train, expected.y_train), ("test", expected.x_test, expected.y_test)):
        columns = {label_key: y, **{key: value(len(y)) for key, value in extra.items()}}
        write_parquet(folder / "plain_text" / f"{part}-00000-of-00001.parquet", image_key, x, **columns)
    return expected


WRITER_SIZES = {"f0003_41": 10, "f0000_14": 5, "f0001_07": 7, "f0002_33": 3}
WRITER_TEST = {"f0003_41": 2, "f0000_14": 1, "f0001_07": 1, "f0002_33": 1}  # round(0.2 * n)


def write_femnist(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One train parquet (image, character, writer_id) with rows of the writers interleaved."""
    writers = np.array([w for w, n in WRITER_SIZES.items() for _ in range(n)])
    writers = writers[np.random.default_rng(0).permutation(len(writers))]
    images, labels = pixels(len(writers), (1, 28, 28)), np.arange(len(writers)) % 3
    path = folder / "data" / "train-00000-of-00001.parquet"
    write_parquet(path, "image", images, character=labels, writer_id=writers)
    return images, labels, writers


def spy(monkeypatch, reader) -> list:
    """Count calls of a reader function of feddst_flwr.data (still calling it)."""
    calls, module = [], {"idx": idx, "images": images, "parquet": parquet}[reader.__module__.rsplit(".", 1)[1]]
    monkeypatch.setattr(module, reader.__name__, lambda *args: calls.append(args) or reader(*args))
    return calls


def scheme(kind: str = "pathological", num_partitions: int = 50, **options) -> PartitionScheme:
    return PartitionScheme(kind, num_partitions, **options)


def labelled(y_train: np.ndarray, y_test: np.ndarray | None = None) -> RawDataset:
    """A RawDataset with 1x1 blank images: enough for partitions (cache=None: not cached)."""
    y_test = np.arange(10) if y_test is None else y_test
    blank = np.zeros((len(y_train) + len(y_test), 1, 1, 1), np.uint8)
    x_train, x_test = blank[: len(y_train)], blank[len(y_train) :]
    return RawDataset(x_train, np.asarray(y_train, np.int64), x_test, np.asarray(y_test, np.int64))


def class_sets(raw: RawDataset, parts) -> list[set[int]]:
    return [set(raw.y_train[p].tolist()) for p in parts]


def assert_disjoint_cover(parts, n: int | None) -> None:
    """Partitions are disjoint; with n, together they are exactly 0..n-1."""
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined)
    if n is not None:
        np.testing.assert_array_equal(np.sort(joined), np.arange(n))


# --------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize(
    "name, folder", [("mnist", "mnist"), ("mnist", "MNIST/raw"), ("fashion-mnist", "FashionMNIST/raw")]
)
def test_idx_files_load_exactly(data_dir, cache, name, folder, gz):
    expected = write_mnist(data_dir / folder, gz)
    raw = load_raw(name, str(data_dir), cache)
    assert raw.x_train.shape == (30, 1, 28, 28) and raw.x_test.shape == (10, 1, 28, 28)
    assert_same(raw, expected)
    assert raw.writers is None and raw.cache is not None and Path(cache) in raw.cache.parents


def test_data_dir_may_be_the_dataset_folder_itself(data_dir, cache):
    expected = write_mnist(data_dir / "mnist", gz=True)
    assert_same(load_raw("mnist", str(data_dir / "mnist"), cache), expected)


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize(
    "content, problem",
    [
        (bytes([0, 0, 0x09, 1, 0, 0, 0, 2, 1, 2]), "not an IDX file"),  # dtype 0x09 (int8)
        (bytes([1, 0, 0x08, 1, 0, 0, 0, 2, 1, 2]), "not an IDX file"),
        (b"", "not an IDX file"),
        (bytes([0, 0, 0x08, 2, 0, 0, 0, 3, 0, 0, 0, 4]) + bytes(11), "holds 11"),  # 3x4 wants 12 bytes
        (bytes([0, 0, 0x08, 1, 0, 0, 0, 2, 1, 2, 3]), "holds 3"),  # too long
    ],
)
def test_read_idx_rejects_bad_files_naming_them(tmp_path, content, problem, suffix):
    path = tmp_path / f"train-images-idx3-ubyte{suffix}"
    path.write_bytes(gzip.compress(content) if suffix else content)
    with pytest.raises(DatasetError, match=re.escape(str(path)) + ".*" + problem):
        read_idx(path)


def test_read_idx_truncated_header_names_the_file(tmp_path):
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(bytes([0, 0, 0x08, 3, 0, 0, 0, 10]))  # 3 dims announced, 1 present
    with pytest.raises(DatasetError, match=re.escape(str(path))):
        read_idx(path)


def test_idx_with_a_missing_labels_file_is_not_found(data_dir, cache):
    write_mnist(data_dir / "mnist")
    (data_dir / "mnist" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_raw("mnist", str(data_dir), cache)


# --------------------------------------------------------------------------- image folder and tarball


def test_image_folder_labels_follow_sorted_class_names(data_dir, cache):
    expected = write_tree(data_dir / "cifar10")
    raw = load_raw("cifar10", str(data_dir), cache)
    assert raw.x_train.shape == (9, 3, 32, 32) and raw.x_test.shape == (6, 3, 32, 32)
    assert_same(raw, expected)  # exact pixels in (C, H, W)
    assert raw.y_train.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # airplane, cat, truck


@pytest.mark.parametrize("test_classes", [CLASSES + ("dog",), CLASSES[:2]], ids=["extra", "missing"])
def test_image_folder_whose_test_classes_differ_is_not_found(data_dir, cache, test_classes):
    write_tree(data_dir / "cifar10", test=test_classes)
    with pytest.raises(DatasetNotFoundError):
        load_raw("cifar10", str(data_dir), cache)


@pytest.mark.parametrize("prefix", ["", "cifar10/"])
def test_tarball_loads_like_the_folder(tmp_path, data_dir, cache, prefix):
    folder = tmp_path / "folder"
    expected = write_tarball(data_dir / "cifar10-jpg" / "cifar10-jpg.tar.gz", folder / "cifar10", prefix)
    from_tarball = load_raw("cifar10", str(data_dir), cache)
    assert_same(from_tarball, expected)
    assert from_tarball.cache.name.startswith("cifar10-")

    load_raw.cache_clear()  # the same tree as a folder decodes to the same arrays
    assert_same(load_raw("cifar10", str(folder), cache), from_tarball)


def test_tarball_whose_test_classes_differ_is_not_found(tmp_path, data_dir, cache):
    write_tarball(data_dir / "cifar10-jpg" / "c.tar.gz", tmp_path / "tree", test=CLASSES[:2])
    with pytest.raises(DatasetNotFoundError, match="same classes"):
        load_raw("cifar10", str(data_dir), cache)
    assert not list(Path(cache).glob("cifar10-*"))  # nothing cached


# --------------------------------------------------------------------------- parquet


def test_cifar10_parquet_export(data_dir, cache):
    expected = write_cifar_parquet(data_dir / "cifar10")
    assert_same(load_raw("cifar10", str(data_dir), cache), expected)


def test_cifar100_parquet_uses_the_fine_label(data_dir, cache):
    expected = write_cifar_parquet(data_dir / "cifar100", label_key="fine_label", coarse_label=lambda n: [19] * n)
    assert_same(load_raw("cifar100", str(data_dir), cache), expected)


def test_parquet_without_the_image_column_names_it(data_dir, cache):
    write_cifar_parquet(data_dir / "cifar10", image_key="image")
    with pytest.raises(DatasetNotFoundError, match="no column 'img'"):
        load_raw("cifar10", str(data_dir), cache)


def test_femnist_per_writer_test_split(data_dir, cache):
    images, labels, writers = write_femnist(data_dir / "femnist")
    raw = load_raw("femnist", str(data_dir), cache, 0.2, 0)

    assert raw.x_train.shape[1:] == (1, 28, 28) and raw.writers is not None
    train_rows, test_rows = raw.x_train[:, 0, 0, 0].astype(int), raw.x_test[:, 0, 0, 0].astype(int)
    np.testing.assert_array_equal(np.sort(np.concatenate([train_rows, test_rows])), np.arange(len(writers)))
    np.testing.assert_array_equal(raw.x_train, images[train_rows])  # pixels round-trip
    np.testing.assert_array_equal(raw.y_train, labels[train_rows])
    np.testing.assert_array_equal(raw.y_test, labels[test_rows])
    np.testing.assert_array_equal(raw.writers, writers[train_rows])  # writer of every training row
    held_out = dict(zip(*np.unique(writers[test_rows], return_counts=True)))
    assert held_out == WRITER_TEST
    assert dict(zip(*np.unique(raw.writers, return_counts=True))) == {
        w: n - WRITER_TEST[w] for w, n in WRITER_SIZES.items()
    }

    load_raw.cache_clear()  # another seed holds out other rows, as many per writer
    other = load_raw("femnist", str(data_dir), cache, 0.2, 1)
    assert not np.array_equal(other.x_test, raw.x_test) and len(other.y_test) == len(raw.y_test)


def test_natural_partition_is_one_client_per_writer(data_dir, cache):
    write_femnist(data_dir / "femnist")
    raw = load_raw("femnist", str(data_dir), cache)
    parts = partitions(raw, scheme("natural", len(WRITER_SIZES)))

    assert_disjoint_cover(parts, len(raw.y_train))
    owners = [set(raw.writers[p].tolist()) for p in parts]
    assert all(len(owner) == 1 for owner in owners)
    sizes = {owner.pop(): len(p) for owner, p in zip(owners, parts)}
    assert sizes == {writer: n - WRITER_TEST[writer] for writer, n in WRITER_SIZES.items()}

    fewer = partitions(raw, scheme("natural", 2))  # two whole writers
    assert len(fewer) == 2 and all(len(set(raw.writers[p].tolist())) == 1 for p in fewer)
    assert sum(map(len, fewer)) < len(raw.y_train)
    client = load_partition(raw, scheme("natural", 2), "femnist", 1)
    assert torch.equal(client.x, torch.from_numpy(raw.x_train[fewer[1]]).float() / 255)  # LEAF: raw [0, 1]

    with pytest.raises(ValueError, match="5 partitions requested but the data has 4 writers"):
        partitions(raw, scheme("natural", 5))


def test_natural_partition_needs_writers():
    with pytest.raises(ValueError, match="natural ids"):
        partitions(load_raw("digits"), scheme("natural", 5))


def test_partition_cache_tells_femnist_splits_apart(data_dir, cache):
    write_femnist(data_dir / "femnist")
    for split_seed in (0, 1):
        load_raw.cache_clear()
        raw = load_raw("femnist", str(data_dir), cache, 0.2, split_seed)
        parts = partitions(raw, scheme("pathological", 3, classes_per_client=1, seed=0))
        assert all(len(classes) == 1 for classes in class_sets(raw, parts)), split_seed


# --------------------------------------------------------------------------- not found, hub, caches


ALL_LAYOUTS = ["IDX", "image folder", "tar.gz", "parquet"]


@pytest.mark.parametrize(
    "name, folders, layouts",
    [
        ("mnist", ["mnist", "mnist-jpg", "mnist-png", "MNIST/raw"], ALL_LAYOUTS),
        ("cifar10", ["cifar10", "cifar10-jpg", "cifar10-png"], ALL_LAYOUTS),
        ("femnist", ["femnist", "femnist-jpg", "femnist-png"], ["parquet"]),  # writer ids only come with parquet
    ],
)
def test_missing_dataset_names_every_place_tried(data_dir, cache, name, folders, layouts):
    write_tree(data_dir / "cifar100")  # a neighbour's folder is not taken
    with pytest.raises(DatasetNotFoundError) as error:
        load_raw(name, str(data_dir), cache)
    message = str(error.value)
    assert f"dataset '{name}'" in message
    assert data.SPECS[name].hub_id in message and "data-dir" in message
    for folder in folders:
        assert str(data_dir / folder) in message, folder
    assert all(layout in message for layout in layouts)
    assert len(re.findall(re.escape(str(data_dir)) + "/", message)) == len(folders) * len(layouts)


def test_hub_download_is_cached(cache, monkeypatch):
    small = expected_raw(pixels(6, (1, 28, 28)), np.arange(6), pixels(2, (1, 28, 28), 1), [1, 0])
    calls = []
    monkeypatch.setattr(hub, "from_hub", lambda name: calls.append(name) or small)
    first = load_raw("mnist", "", cache)
    load_raw.cache_clear()
    second = load_raw("mnist", "", cache)
    assert calls == ["mnist"]
    assert_same(first, small)
    assert_same(second, small)


class FakeFederatedDataset:
    """Stands in for flwr_datasets.FederatedDataset: serves Hugging Face Datasets of PIL images."""

    splits: dict = {}

    def __init__(self, *, dataset: str, partitioners: dict, shuffle: bool) -> None:
        if dataset not in self.splits:
            raise ConnectionError(f"cannot reach the hub for {dataset}")
        self.dataset = dataset

    def load_split(self, split: str):
        return self.splits[self.dataset][split]


def hf_split(images: np.ndarray, labels, image_key: str = "img"):
    from datasets import Dataset
    from PIL import Image

    pil = [Image.fromarray(im.transpose(1, 2, 0) if im.shape[0] == 3 else im[0]) for im in images]
    return Dataset.from_dict({image_key: pil, "label": list(labels)})


def test_hub_loading_converts_federated_dataset_splits(cache, monkeypatch):
    import flwr_datasets

    train, test = pixels(5, (3, 32, 32)), pixels(3, (3, 32, 32), 1)
    FakeFederatedDataset.splits = {
        "uoft-cs/cifar10": {"train": hf_split(train, [0, 1, 2, 3, 4]), "test": hf_split(test, [9, 8, 7])}
    }
    monkeypatch.setattr(flwr_datasets, "FederatedDataset", FakeFederatedDataset)
    monkeypatch.setattr(hub, "from_hub", REAL_FROM_HUB)
    assert_same(load_raw("cifar10", "", cache), expected_raw(train, [0, 1, 2, 3, 4], test, [9, 8, 7]))


def test_hub_failure_names_the_hub_id_and_the_local_alternative(cache, monkeypatch):
    import flwr_datasets

    FakeFederatedDataset.splits = {}
    monkeypatch.setattr(flwr_datasets, "FederatedDataset", FakeFederatedDataset)
    monkeypatch.setattr(hub, "from_hub", REAL_FROM_HUB)
    with pytest.raises(DatasetNotFoundError, match=r"'uoft-cs/cifar100'.*ConnectionError.*data-dir"):
        load_raw("cifar100", "", cache)


LAYOUTS = {  # reader -> (dataset, writer of its source under data_dir)
    idx.from_idx: ("mnist", lambda data_dir: write_mnist(data_dir / "MNIST" / "raw", gz=True)),
    images.from_image_folder: ("cifar10", lambda data_dir: write_tree(data_dir / "cifar10")),
    images.from_tarball: (
        "cifar10",
        lambda data_dir: write_tarball(data_dir / "cifar10-png" / "c.tgz", data_dir / "t"),
    ),
    parquet.from_parquet: ("cifar10", lambda data_dir: write_cifar_parquet(data_dir / "cifar10")),
}


@pytest.mark.parametrize("decoder", LAYOUTS, ids=lambda reader: reader.__name__)
def test_decoded_arrays_are_cached_as_npy(data_dir, cache, monkeypatch, decoder):
    name, write = LAYOUTS[decoder]
    expected = write(data_dir)
    calls = spy(monkeypatch, decoder)

    first = load_raw(name, str(data_dir), cache)
    load_raw.cache_clear()
    second = load_raw(name, str(data_dir), cache)

    assert len(calls) == 1  # the second load read the .npy cache
    assert_same(second, expected)
    assert first.cache == second.cache and first.cache.parent == Path(cache)
    assert sorted(p.name for p in second.cache.iterdir()) == ["x_test.npy", "x_train.npy", "y_test.npy", "y_train.npy"]
    assert [p.name for p in Path(cache).iterdir()] == [first.cache.name]  # no staging folder left


def test_changed_source_files_invalidate_the_cache(data_dir, cache, monkeypatch):
    write_mnist(data_dir / "mnist")
    calls = spy(monkeypatch, idx.from_idx)
    first = load_raw("mnist", str(data_dir), cache)
    write_idx(data_dir / "mnist" / "t10k-images-idx3-ubyte", pixels(5, (1, 28, 28), 5)[:, 0])
    write_idx(data_dir / "mnist" / "t10k-labels-idx1-ubyte", np.full(5, 7, np.uint8))
    load_raw.cache_clear()
    second = load_raw("mnist", str(data_dir), cache)
    assert len(calls) == 2 and second.cache != first.cache
    assert second.y_test.tolist() == [7] * 5 and second.x_test.shape == (5, 1, 28, 28)


def test_partitions_are_cached_next_to_the_arrays(data_dir, cache, monkeypatch):
    write_mnist(data_dir / "mnist")
    raw = load_raw("mnist", str(data_dir), cache)
    pathological, iid = scheme("pathological", 5), scheme("iid", 4)
    first = partitions(raw, pathological)
    assert len(list(raw.cache.glob("partitions-*.npz"))) == 1
    partitions(raw, iid)
    assert len(list(raw.cache.glob("partitions-*.npz"))) == 2

    def fail(*_):
        raise AssertionError("partitions recomputed instead of read from the cache")

    monkeypatch.setattr(partition, "_partitions", fail)
    partitions.cache_clear()
    load_raw.cache_clear()
    again = partitions(load_raw("mnist", str(data_dir), cache), pathological)
    assert len(again) == len(first) == 5
    assert all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(first, again))


# --------------------------------------------------------------------------- real MNIST and digits


@pytest.fixture(scope="module")
def mnist(tmp_path_factory) -> RawDataset:
    if not (SHARED / "mnist").is_dir():
        pytest.skip(f"real MNIST is not in {SHARED / 'mnist'} (../shared/data next to the repository)")
    load_raw.cache_clear()
    return load_raw("mnist", str(SHARED), str(tmp_path_factory.mktemp("mnist-cache")))


def test_real_mnist(mnist):
    assert mnist.x_train.shape == (60000, 1, 28, 28) and mnist.x_test.shape == (10000, 1, 28, 28)
    assert np.bincount(mnist.y_train).tolist() == MNIST_TRAIN_COUNTS
    assert np.bincount(mnist.y_test).sum() == 10000 and set(mnist.y_test.tolist()) == set(range(10))
    assert (mnist.x_train.min(), mnist.x_train.max(), mnist.x_test.max()) == (0, 255, 255)


@pytest.fixture
def mnist_labels(request) -> RawDataset:
    """Real MNIST training labels when present, else synthetic ones with the same counts."""
    if (SHARED / "mnist").is_dir():
        return labelled(request.getfixturevalue("mnist").y_train)
    return labelled(np.random.default_rng(0).permutation(np.repeat(np.arange(10), MNIST_TRAIN_COUNTS)))


def test_digits_split():
    raw = load_raw("digits")
    assert len(raw.y_train) + len(raw.y_test) == 1797 and len(raw.y_test) == 360  # ceil(0.2 * 1797)
    assert raw.x_train.shape == (1437, 1, 8, 8) and raw.x_train.dtype == np.uint8
    assert (raw.x_train.min(), raw.x_train.max()) == (0, 16)
    assert set(raw.y_test.tolist()) == set(range(10)) and raw.cache is None
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        load_raw("imagenet")


def test_to_tensors_normalises_with_the_spec():
    raw = load_raw("digits")
    digits = to_tensors("digits", raw.x_train, raw.y_train)
    assert torch.equal(digits.x, torch.from_numpy(raw.x_train).float() / 16)  # mean 0, std 1: exactly x/16
    assert digits.x.dtype == torch.float32 and digits.y.dtype == torch.int64
    assert (float(digits.x.min()), float(digits.x.max())) == (0.0, 1.0)

    values = np.array([0, 51, 255], np.uint8)  # one constant image per channel value
    rgb = to_tensors("cifar10", np.broadcast_to(values[:, None, None, None], (3, 3, 2, 2)), [0, 1, 2])
    mean, std = np.array([0.4914, 0.4822, 0.4465]), np.array([0.2470, 0.2435, 0.2616])
    expected = (values[:, None] / 255 - mean[None, :]) / std[None, :]  # (image, channel)
    np.testing.assert_allclose(rgb.x[:, :, 1, 1].numpy(), expected, rtol=1e-6)
    grey = to_tensors("mnist", np.full((1, 1, 28, 28), 255, np.uint8), [3])
    assert float(grey.x.max()) == pytest.approx((1 - 0.1307) / 0.3081, rel=1e-6)


# --------------------------------------------------------------------------- pathological


def test_pathological_fixed_shards(mnist_labels):
    parts = partitions(mnist_labels, scheme("pathological", 400, shard_size=20))
    assert len(parts) == 400 and sum(map(len, parts)) == 16000
    assert_disjoint_cover(parts, None)
    for p in parts:
        counts = np.bincount(mnist_labels.y_train[p])
        assert counts[counts > 0].tolist() == [20, 20]
    holders = np.bincount([c for classes in class_sets(mnist_labels, parts) for c in classes])
    assert holders.tolist() == [80] * 10  # 800 slots over 10 classes, drawn as whole permutations


@pytest.mark.parametrize("num_partitions, per_client", [(50, 2), (7, 3), (13, 4), (10, 1)])
def test_pathological_split_each_class_evenly(num_partitions, per_client):
    raw = load_raw("digits")
    parts = partitions(raw, scheme("pathological", num_partitions, classes_per_client=per_client))
    assert_disjoint_cover(parts, len(raw.y_train))
    classes = class_sets(raw, parts)
    assert all(len(c) == per_client for c in classes)
    holders = np.bincount([c for cs in classes for c in cs], minlength=10)
    assert holders.max() - holders.min() <= 1 and holders.sum() == num_partitions * per_client
    for label in range(10):  # a class's images are split evenly among its holders
        shares = [int((raw.y_train[p] == label).sum()) for p, cs in zip(parts, classes) if label in cs]
        assert len(shares) == holders[label] and max(shares) - min(shares) <= 1
    if (num_partitions, per_client) == (50, 2):
        assert holders.tolist() == [10] * 10


@pytest.mark.parametrize(
    "options, problem",
    [
        ({"num_partitions": 4}, "4 partitions x 2 classes cannot cover all 10 classes; use at least 5 partitions"),
        ({"shard_size": 1000}, r"10 clients x shard-size 1000 = 10000 are needed"),
        ({"classes_per_client": 11}, r"classes per partition must be in \[1, 10\], got 11"),
        ({"classes_per_client": 0}, r"classes per partition must be in \[1, 10\], got 0"),
        ({"kind": "shards"}, "unknown partition 'shards'"),
    ],
)
def test_impossible_partitions_are_errors_naming_the_problem(options, problem):
    with pytest.raises(ValueError, match=problem):
        partitions(load_raw("digits"), scheme(**{"kind": "pathological", "num_partitions": 50, **options}))


@pytest.mark.parametrize("partition_id", [-1, 5])
def test_partition_id_out_of_range(partition_id):
    with pytest.raises(ValueError, match="partition-id"):
        load_partition(load_raw("digits"), scheme("pathological", 5), "digits", partition_id)


def test_load_partition_is_the_clients_rows_as_tensors():
    raw, split = load_raw("digits"), scheme("pathological", 5)
    client = load_partition(raw, split, "digits", 3)
    rows = partitions(raw, split)[3]
    assert torch.equal(client.y, torch.from_numpy(raw.y_train[rows]))
    assert torch.equal(client.x, to_tensors("digits", raw.x_train[rows], raw.y_train[rows]).x)


# --------------------------------------------------------------------------- iid and dirichlet
# on digits: the flwr-datasets partitioners take seconds on 60k MNIST rows


def test_iid_sizes_differ_by_at_most_one():
    raw = load_raw("digits")
    parts = partitions(raw, scheme("iid", 20))
    sizes = [len(p) for p in parts]
    assert len(parts) == 20 and max(sizes) - min(sizes) <= 1
    assert_disjoint_cover(parts, len(raw.y_train))
    assert not np.array_equal(parts[0], np.arange(len(parts[0])))  # shuffled, not contiguous rows
    assert all(len(c) >= 8 for c in class_sets(raw, parts))  # ~72 random rows hold most classes


def max_class_share(raw: RawDataset, parts) -> float:
    return float(np.mean([np.bincount(raw.y_train[p], minlength=10).max() / len(p) for p in parts]))


def test_dirichlet_skew_grows_as_beta_shrinks():
    raw = load_raw("digits")
    skewed, flat = (partitions(raw, scheme("dirichlet", 20, beta=beta)) for beta in (0.5, 100.0))
    for parts in (skewed, flat):
        assert len(parts) == 20
        assert_disjoint_cover(parts, len(raw.y_train))
    assert max_class_share(raw, skewed) > 0.25 and max_class_share(raw, flat) < 0.15
    assert max_class_share(raw, skewed) > 2 * max_class_share(raw, flat)


@pytest.mark.parametrize("kind", ["pathological", "iid", "dirichlet"])
def test_partitions_are_deterministic_per_seed(kind):
    raw = load_raw("digits")

    def split(seed: int) -> tuple[np.ndarray, ...]:
        partitions.cache_clear()
        return partitions(raw, scheme(kind, 20, seed=seed))

    first, again, other = split(0), split(0), split(1)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert any(not np.array_equal(a, b) for a, b in zip(first, other))


# --------------------------------------------------------------------------- client-mean accuracy

HAND_Y_TRAIN = np.array([0, 0, 1, 2, 2, 2, 3])
HAND_Y_TEST = np.array([0, 1, 1, 2, 2, 2, 3, 3, 3, 3])  # test counts 1, 2, 3, 4
HAND_PARTS = (np.array([0, 1]), np.array([2, 3, 4, 5]), np.array([1, 6]))  # classes {0}, {1, 2}, {0, 3}
HAND_WEIGHTS = {
    "pathological": [[1, 0, 0, 0], [0, 2 / 5, 3 / 5, 0], [1 / 5, 0, 0, 4 / 5]],  # test counts of its classes
    "iid": [[1, 0, 0, 0], [0, 1 / 4, 3 / 4, 0], [1 / 2, 0, 0, 1 / 2]],  # its own training labels
}
HAND_WEIGHTS["dirichlet"] = HAND_WEIGHTS["iid"]


@pytest.mark.parametrize("kind", HAND_WEIGHTS)
def test_client_test_weights_by_hand(kind):
    raw = labelled(HAND_Y_TRAIN, HAND_Y_TEST)
    weights = client_test_weights(raw, HAND_PARTS, scheme(kind, 3), 4)
    np.testing.assert_allclose(weights, HAND_WEIGHTS[kind], rtol=1e-12)


def test_client_mean_accuracy_by_hand():
    accuracy = np.array([0.5, 1.0, 0.0, 0.25])
    weights = np.array(HAND_WEIGHTS["pathological"])
    # clients: 0.5; 2/5 * 1 + 3/5 * 0 = 0.4; 1/5 * 0.5 + 4/5 * 0.25 = 0.3
    assert client_mean_accuracy(accuracy, weights) == pytest.approx((0.5 + 0.4 + 0.3) / 3, rel=1e-12)
    assert client_mean_accuracy(np.ones(4), weights) == pytest.approx(1.0)


def test_client_mean_accuracy_ignores_classes_absent_from_the_test_set():
    raw = labelled(HAND_Y_TRAIN, np.array([0, 1, 1, 2, 2, 2]))  # no class-3 test image
    weights = client_test_weights(raw, HAND_PARTS[:2], scheme("pathological", 2), 4)
    accuracy = np.array([0.5, 1.0, 0.0, np.nan])
    assert client_mean_accuracy(accuracy, weights) == pytest.approx((0.5 + 0.4) / 2)


def test_pathological_weights_on_a_real_partition():
    raw = load_raw("digits")
    split = scheme("pathological", 50)
    parts = partitions(raw, split)
    weights = client_test_weights(raw, parts, split, 10)
    assert weights.shape == (50, 10) and np.allclose(weights.sum(axis=1), 1)
    classes = sorted(class_sets(raw, parts)[0])
    test_counts = np.bincount(raw.y_test, minlength=10)
    expected = np.zeros(10)
    expected[classes] = test_counts[classes] / test_counts[classes].sum()
    np.testing.assert_allclose(weights[0], expected, rtol=1e-12)
    iid = scheme("iid", 10)
    rows = partitions(raw, iid)[4]
    own_labels = np.bincount(raw.y_train[rows], minlength=10) / len(rows)
    np.testing.assert_allclose(client_test_weights(raw, partitions(raw, iid), iid, 10)[4], own_labels, rtol=1e-12)


# --------------------------------------------------------------------------- damaged files


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_a_truncated_gz_idx_is_a_dataset_error_naming_it(data_dir, cache):
    write_mnist(data_dir / "mnist", gz=True)
    damaged = data_dir / "mnist" / "train-images-idx3-ubyte.gz"
    truncate(damaged)
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(damaged))}: cannot be read \(EOFError: Compressed file"):
        load_raw("mnist", str(data_dir), cache)


def test_idx_dimensions_whose_product_overflows_int64_are_counted_exactly(tmp_path):
    """Four dims of 2**16: numpy's product wraps to 0 (then 'cannot reshape array of size 0')."""
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(bytes([0, 0, 0x08, 4]) + (2**16).to_bytes(4, "big") * 4)
    with pytest.raises(
        DatasetError,
        match=rf"^{re.escape(str(path))}: header says \(65536, 65536, 65536, 65536\) \(18446744073709551616 bytes\) but holds 0$",
    ):
        read_idx(path)


def test_idx_images_and_labels_of_different_counts_are_a_dataset_error_naming_both(data_dir, cache):
    write_mnist(data_dir / "mnist")
    write_idx(data_dir / "mnist" / "train-images-idx3-ubyte", pixels(20, (1, 28, 28))[:, 0])
    write_idx(data_dir / "mnist" / "train-labels-idx1-ubyte", np.arange(15) % 10)
    images_file, labels_file = (data_dir / "mnist" / f"train-{kind}-ubyte" for kind in ("images-idx3", "labels-idx1"))
    with pytest.raises(
        DatasetError,
        match=rf"^{re.escape(str(images_file))} holds 20 images but {re.escape(str(labels_file))} 15 labels$",
    ):
        load_raw("mnist", str(data_dir), cache)


def test_idx_labels_in_place_of_images_are_a_dataset_error_naming_the_file(data_dir, cache):
    write_mnist(data_dir / "mnist")
    wrong = data_dir / "mnist" / "t10k-images-idx3-ubyte"
    write_idx(wrong, np.arange(10, dtype=np.uint8))
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(wrong))}: dimensions \(10,\), expected \(N, H, W\)"):
        load_raw("mnist", str(data_dir), cache)


def test_a_label_outside_the_datasets_classes_is_a_dataset_error_naming_the_source(data_dir, cache):
    """Before: label 200 in 10-class MNIST loaded, and the partitioner then advised 101 partitions."""
    write_mnist(data_dir / "mnist")
    labels = np.arange(30) % 10
    labels[7] = 200
    write_idx(data_dir / "mnist" / "train-labels-idx1-ubyte", labels)
    source = re.escape(str(data_dir / "mnist"))
    with pytest.raises(
        DatasetError,
        match=rf"^{source}: train label 200 \(sample 7; 1 such labels\) is outside \[0, 10\): dataset 'mnist' has 10 classes$",
    ):
        load_raw("mnist", str(data_dir), cache)
    assert not Path(cache).exists() or not any(Path(cache).iterdir())  # nothing cached


def test_more_class_folders_than_the_dataset_has_classes_is_a_dataset_error(data_dir, cache):
    classes = tuple(f"class{i:02d}" for i in range(11))
    write_tree(data_dir / "cifar10", train=classes, test=classes, per_class=(1, 1))
    with pytest.raises(
        DatasetError, match=rf"^{re.escape(str(data_dir / 'cifar10'))}: train label 10 .* outside \[0, 10\)"
    ):
        load_raw("cifar10", str(data_dir), cache)


def test_16_bit_images_are_a_dataset_error_not_rescaled_silently(data_dir, cache):
    from PIL import Image

    write_tree(data_dir / "cifar10")
    for path in (data_dir / "cifar10").rglob("*.png"):
        Image.fromarray(np.full((32, 32), 40000, np.uint16)).save(path)
    with pytest.raises(
        DatasetError,
        match=rf"^{re.escape(str(data_dir / 'cifar10'))}: train images are uint16 of shape \(9, 1, 32, 32\)",
    ):
        load_raw("cifar10", str(data_dir), cache)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_corrupt_image_in_a_folder_is_a_dataset_error_naming_the_file(data_dir, cache, damage):
    """Before: UnidentifiedImageError: cannot identify image file <_io.BytesIO ...>."""
    write_tree(data_dir / "cifar10")
    damaged = data_dir / "cifar10" / "train" / "cat" / "0001.png"
    if damage == "garbage":
        damaged.write_bytes(b"not a png at all")
    else:
        truncate(damaged, 0.6)
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(damaged))}: not a readable image \("):
        load_raw("cifar10", str(data_dir), cache)


def test_an_image_of_another_size_is_a_dataset_error_naming_it(data_dir, cache):
    write_tree(data_dir / "cifar10")
    odd = data_dir / "cifar10" / "test" / "truck" / "0001.png"
    odd.write_bytes(png(pixels(1, (3, 16, 16))[0]))
    first = data_dir / "cifar10" / "test" / "airplane" / "0000.png"
    with pytest.raises(
        DatasetError,
        match=rf"^{re.escape(str(odd))}: an image of shape \(3, 16, 16\), {re.escape(str(first))} has \(3, 32, 32\)$",
    ):
        load_raw("cifar10", str(data_dir), cache)


def test_a_truncated_tarball_is_a_dataset_error_naming_it(tmp_path, data_dir, cache):
    tarball = data_dir / "cifar10" / "c.tar.gz"
    write_tarball(tarball, tmp_path / "scratch", per_class=(20, 5))
    truncate(tarball)
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(tarball))}: cannot be read \("):
        load_raw("cifar10", str(data_dir), cache)


def test_a_corrupt_image_in_a_tarball_is_a_dataset_error_naming_the_member(tmp_path, data_dir, cache):
    tarball = data_dir / "cifar10" / "c.tar.gz"
    write_tree(tmp_path / "scratch")
    (tmp_path / "scratch" / "test" / "cat" / "0000.png").write_bytes(b"\x89PNG broken")
    with tarfile.open(tarball if tarball.parent.mkdir(parents=True) is None else tarball, "w:gz") as archive:
        for part in ("train", "test"):
            archive.add(tmp_path / "scratch" / part, arcname=f"cifar10/{part}")
    with pytest.raises(
        DatasetError, match=rf"^{re.escape(str(tarball))}:cifar10/test/cat/0000.png: not a readable image"
    ):
        load_raw("cifar10", str(data_dir), cache)


def test_a_truncated_parquet_file_is_a_dataset_error_naming_it(data_dir, cache):
    write_cifar_parquet(data_dir / "cifar10")
    damaged = data_dir / "cifar10" / "plain_text" / "test-00000-of-00001.parquet"
    truncate(damaged)
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(damaged))}: cannot be read \("):
        load_raw("cifar10", str(data_dir), cache)


def test_a_corrupt_image_cell_in_parquet_is_a_dataset_error_naming_file_and_row(data_dir, cache):
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_cifar_parquet(data_dir / "cifar10")
    path = data_dir / "cifar10" / "plain_text" / "train-00000-of-00001.parquet"
    table = pq.read_table(path).to_pydict()
    table["img"][4] = {"bytes": b"garbage", "path": "4.png"}
    pq.write_table(pa.table(table), path)
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(path))}: row 4: not a readable image \("):
        load_raw("cifar10", str(data_dir), cache)


def test_a_parquet_label_outside_the_classes_is_a_dataset_error(data_dir, cache):
    write_cifar_parquet(data_dir / "cifar10")
    path = data_dir / "cifar10" / "plain_text" / "test-00000-of-00001.parquet"
    write_parquet(path, "img", pixels(5, (3, 32, 32), 1), label=[9, 0, 3, 10, 1])
    with pytest.raises(DatasetError, match=r"test label 10 \(sample 3; 1 such labels\) is outside \[0, 10\)"):
        load_raw("cifar10", str(data_dir), cache)


def test_a_corrupt_hub_image_is_a_dataset_error_naming_the_hub_split_and_row(cache, monkeypatch):
    import flwr_datasets
    from datasets import Dataset, Features, Value
    from datasets import Image as HfImage

    train = pixels(3, (3, 32, 32))
    cells = [{"bytes": png(image), "path": None} for image in train]
    cells[2] = {"bytes": b"garbage", "path": None}
    broken = Dataset.from_dict(
        {"img": cells, "label": [0, 1, 2]}, features=Features({"img": HfImage(), "label": Value("int64")})
    )
    FakeFederatedDataset.splits = {"uoft-cs/cifar10": {"train": broken, "test": hf_split(train, [0, 1, 2])}}
    monkeypatch.setattr(flwr_datasets, "FederatedDataset", FakeFederatedDataset)
    monkeypatch.setattr(hub, "from_hub", REAL_FROM_HUB)
    with pytest.raises(DatasetError, match=r"^'uoft-cs/cifar10' train split, row 2: not a readable image \("):
        load_raw("cifar10", "", cache)


def test_a_hub_label_outside_the_classes_is_a_dataset_error_naming_the_hub_id(cache, monkeypatch):
    import flwr_datasets

    train, test = pixels(3, (3, 32, 32)), pixels(2, (3, 32, 32), 1)
    FakeFederatedDataset.splits = {
        "uoft-cs/cifar10": {"train": hf_split(train, [0, 1, 2]), "test": hf_split(test, [3, -1])}
    }
    monkeypatch.setattr(flwr_datasets, "FederatedDataset", FakeFederatedDataset)
    monkeypatch.setattr(hub, "from_hub", REAL_FROM_HUB)
    with pytest.raises(DatasetError, match=r"^uoft-cs/cifar10: test label -1 \(sample 1; 1 such labels\) is outside"):
        load_raw("cifar10", "", cache)


def test_a_damaged_scikit_learn_digits_file_is_a_dataset_error_naming_it(tmp_path, monkeypatch):
    import importlib.resources

    real = importlib.resources.files("sklearn.datasets.data") / "digits.csv.gz"
    copy = tmp_path / "digits.csv.gz"
    copy.write_bytes(real.read_bytes()[:5000])
    files = importlib.resources.files
    monkeypatch.setattr(
        importlib.resources, "files", lambda module: tmp_path if module == "sklearn.datasets.data" else files(module)
    )
    with pytest.raises(
        DatasetError, match=rf"^{re.escape(str(copy))}: scikit-learn's digits cannot be read \(EOFError"
    ):
        load_raw("digits")


@pytest.mark.parametrize("damage", ["truncated", "missing", "labels", "fewer-labels"])
def test_a_damaged_npy_cache_is_decoded_again_with_a_warning_naming_the_file(
    data_dir, cache, monkeypatch, caplog, damage
):
    """Before: 'Failed to read all data for array' (no file, no re-decode)."""
    expected = write_mnist(data_dir / "mnist")
    calls = spy(monkeypatch, idx.from_idx)
    folder = load_raw("mnist", str(data_dir), cache).cache
    damaged = folder / ("y_train.npy" if "labels" in damage else "x_train.npy")
    if damage == "truncated":
        truncate(damaged)
    elif damage == "missing":
        damaged.unlink()
    else:  # labels 10..34 in 10-class MNIST, or 15 labels for 30 images
        np.save(damaged, np.arange(30) + 5 if damage == "labels" else np.arange(15) % 10)
    load_raw.cache_clear()
    raw = load_raw("mnist", str(data_dir), cache)
    assert len(calls) == 2 and raw.cache == folder
    assert_same(raw, expected)
    assert sorted(p.name for p in Path(cache).iterdir()) == [folder.name]  # repaired in place, no staging left
    assert re.search(re.escape(str(folder)) + r".*decoding .* again", caplog.text)
    load_raw.cache_clear()
    assert_same(load_raw("mnist", str(data_dir), cache), expected)
    assert len(calls) == 2  # the repaired cache reads


def test_a_cache_that_stays_damaged_is_a_dataset_error_naming_the_folder_to_delete(data_dir, cache, monkeypatch):
    write_mnist(data_dir / "mnist")
    folder = load_raw("mnist", str(data_dir), cache).cache
    truncate(folder / "x_test.npy")
    write_arrays = data.cache.write_arrays

    def damaging(staging, raw):  # the disk damages every file it writes
        written = write_arrays(staging, raw)
        truncate(written / "x_test.npy")
        return written

    monkeypatch.setattr(data.cache, "write_arrays", damaging)
    load_raw.cache_clear()
    with pytest.raises(
        DatasetError,
        match=rf"^{re.escape(str(folder / 'x_test.npy'))}: damaged decoded-array cache .*; delete {re.escape(str(folder))} to",
    ):
        load_raw("mnist", str(data_dir), cache)


def test_a_damaged_partition_cache_is_computed_again(data_dir, cache, caplog):
    write_mnist(data_dir / "mnist")
    raw = load_raw("mnist", str(data_dir), cache)
    first = partitions(raw, scheme("pathological", 5))
    (stored,) = raw.cache.glob("partitions-*.npz")
    truncate(stored)
    partitions.cache_clear()
    again = partitions(raw, scheme("pathological", 5))
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert re.search(
        re.escape(str(stored)) + r": damaged partition cache .* computing the partitions again", caplog.text
    )


def test_the_server_does_not_report_a_damaged_partition_cache_as_a_split_problem(monkeypatch, make_cfg):
    """server_app turns the partitioner's ValueErrors into 'cannot split ...' advice; a
    DatasetError (a ValueError too) naming a damaged file must reach the user as it is."""
    import server_app

    def damaged(raw, scheme):
        raise DatasetError("/cache/partitions-0.npz: damaged partition cache (BadZipFile: ...)")

    monkeypatch.setattr(server_app, "partitions", damaged)
    with pytest.raises(DatasetError, match=r"^/cache/partitions-0.npz: damaged partition cache"):
        server_app.federation_partitions(labelled(np.arange(20) % 10), scheme("iid", 2), make_cfg())
