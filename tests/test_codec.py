"""Unit tests for feddst_flwr.codec: round trips, exact byte counts, the payload bound
and every validation error of decode."""

from __future__ import annotations

import io
import math
import tracemalloc

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from feddst_flwr import codec
from feddst_flwr.codec import BITMASK_STYPE, DENSE_STYPE, MASK_SUFFIX, NPY_HEADER_LIMIT, VALUES_STYPE, CodecError
from feddst_flwr.masks import layer_counts, maskable_names, positions, random_masks, shapes_of
from feddst_flwr.models import DigitsCNN

MASKABLE = ["conv.weight", "fc.weight"]


def bool_mask(shape: tuple[int, ...], positions: list[int]) -> torch.Tensor:
    flat = torch.zeros(math.prod(shape), dtype=torch.bool)
    flat[positions] = True
    return flat.view(shape)


def make_state() -> dict[str, torch.Tensor]:
    """conv.weight: 8 weights (one bitmask byte, no padding); fc.weight: 15 weights
    (two bitmask bytes, one padding bit); the biases stay dense."""
    generator = torch.Generator().manual_seed(0)
    return {
        "conv.weight": torch.randn(2, 1, 2, 2, generator=generator),
        "conv.bias": torch.randn(2, generator=generator),
        "fc.weight": torch.randn(3, 5, generator=generator),
        "fc.bias": torch.randn(3, generator=generator),
    }


def make_masks() -> dict[str, torch.Tensor]:
    return {
        "conv.weight": bool_mask((2, 1, 2, 2), [0, 3, 6]),
        "fc.weight": bool_mask((3, 5), [1, 2, 7, 11, 13, 14]),
    }


def reference(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in state.items()}


def good_record(send_mask: bool = True, value_dtype: str = "float32") -> ArrayRecord:
    return codec.encode(make_state(), make_masks(), send_mask, value_dtype)


def decode(record: ArrayRecord, held=None, version: int = 0) -> codec.Decoded:
    """Decode against the test model; `held`: the masks the receiver holds, of `version`."""
    base = codec.HeldMask(held, version) if held is not None else None
    return codec.decode(record, reference(make_state()), MASKABLE, base)


def npy_bytes(array: np.ndarray) -> int:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return len(buffer.getvalue())


def values_array(data: bytes, shape=(3, 5), dtype="float32", stype=VALUES_STYPE) -> Array:
    return Array(dtype=dtype, shape=shape, stype=stype, data=data)


def dense_array(values) -> Array:
    return Array(np.asarray(values))


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("send_mask", [True, False])
def test_round_trip_float32_is_exact(send_mask):
    state, masks = make_state(), make_masks()
    record = codec.encode(state, masks, send_mask, "float32")

    decoded = decode(record, held=None if send_mask else masks)

    assert decoded.mask_sent is send_mask
    assert set(decoded.state) == set(state)
    for name, tensor in state.items():
        expected = tensor * masks[name] if name in masks else tensor
        assert decoded.state[name].dtype == torch.float32
        assert torch.equal(decoded.state[name], expected)
    for name, mask in masks.items():
        assert torch.equal(decoded.masks[name], mask)
        assert (decoded.state[name][~mask] == 0).all()


def test_round_trip_float16_within_tolerance():
    state, masks = make_state(), make_masks()
    decoded = decode(codec.encode(state, masks, True, "float16"))
    for name in MASKABLE:
        assert torch.allclose(decoded.state[name], state[name] * masks[name], rtol=1e-3, atol=1e-3)
        assert (decoded.state[name][~masks[name]] == 0).all()
    assert torch.equal(decoded.state["fc.bias"], state["fc.bias"])  # dense stays float32


def test_sent_mask_wins_over_held_mask():
    record = good_record(send_mask=True)
    other = {name: ~mask for name, mask in make_masks().items()}
    decoded = decode(record, held=other)
    assert decoded.mask_sent
    assert all(torch.equal(decoded.masks[n], m) for n, m in make_masks().items())


def test_record_flags():
    with_mask, without_mask = good_record(True), good_record(False)
    assert codec.is_sparse(with_mask) and codec.carries_mask(with_mask)
    assert codec.is_sparse(without_mask) and not codec.carries_mask(without_mask)
    dense = ArrayRecord(make_state())
    assert not codec.is_sparse(dense) and not codec.carries_mask(dense)


def test_encoded_layout():
    record = good_record(True)
    assert set(record) == {"conv.weight", "conv.bias", "fc.weight", "fc.bias", "conv.weight:mask", "fc.weight:mask"}
    assert record["fc.weight"].stype == VALUES_STYPE
    assert record["fc.weight"].shape == (3, 5)
    assert record["fc.weight:mask"].stype == BITMASK_STYPE
    assert record["fc.bias"].stype == DENSE_STYPE
    # fc.weight active flat positions 1, 2, 7, 11, 13, 14 -> bits 01100001 00010110
    assert record["fc.weight:mask"].data == bytes([0b01100001, 0b00010110])


@pytest.mark.parametrize(
    "array",
    [
        np.zeros((), np.int64),
        np.arange(5, dtype=np.float32),
        np.ones((3, 4, 5), np.float32),
        np.zeros((0, 3), np.float32),
    ],
    ids=["0-d int64", "vector", "3-d", "empty"],
)
def test_dense_array_holds_what_flowers_array_holds(array):
    ours, flowers = codec.dense_array(array), Array(array)
    assert (ours.data, ours.dtype, ours.shape, ours.stype) == (
        flowers.data,
        flowers.dtype,
        flowers.shape,
        flowers.stype,
    )


def test_dense_array_of_a_transposed_tensor_reads_back_equal():
    array = np.arange(12, dtype=np.float32).reshape(3, 4).T
    assert np.array_equal(codec.dense_array(array).numpy(), array)


def test_float16_values_are_numpys_rounding_bit_for_bit():
    # torch converts: the same round-to-nearest-even as numpy, subnormals, overflow to inf and NaN-free
    special = [65504.0, 65519.99, 65520.0, -7e4, 6e-8, 2.0**-25, 2.0**-25 * 1.0000001, 2.0**-24, 1e-45, -0.0]
    scales = np.repeat(np.float32([1e-7, 1e-4, 1.0, 1e3, 3e4]), 20_000)
    values = np.concatenate(
        [np.random.default_rng(0).standard_normal(scales.size).astype(np.float32) * scales, special]
    )
    values = values.astype(np.float32)
    state, masks = {"w": torch.from_numpy(values)}, {"w": torch.ones(values.size, dtype=torch.bool)}
    with np.errstate(over="ignore"):
        assert codec.encode_values(state, masks, "float16")["w"].data == values.astype(np.float16).tobytes()


# --------------------------------------------------------------------------- byte counts


def expected_bytes(send_mask: bool, itemsize: int) -> int:
    state, masks = make_state(), make_masks()
    total = 0
    for name, tensor in state.items():
        if name in masks:
            total += itemsize * int(masks[name].sum())
            total += math.ceil(tensor.numel() / 8) if send_mask else 0
        else:
            total += npy_bytes(tensor.numpy())
    return total


@pytest.mark.parametrize("send_mask", [True, False])
@pytest.mark.parametrize(("value_dtype", "itemsize"), [("float32", 4), ("float16", 2)])
def test_payload_bytes_are_exact(send_mask, value_dtype, itemsize):
    record = good_record(send_mask, value_dtype)
    assert codec.payload_bytes(record) == expected_bytes(send_mask, itemsize)


def test_payload_bytes_by_hand():
    # conv.weight: 3 active of 8 (1 mask byte); fc.weight: 6 active of 15 (2 mask bytes)
    dense = npy_bytes(np.zeros(2, np.float32)) + npy_bytes(np.zeros(3, np.float32))
    assert codec.payload_bytes(good_record(False)) == 4 * 9 + dense
    assert codec.payload_bytes(good_record(True)) == 4 * 9 + 3 + dense
    assert codec.payload_bytes(good_record(True, "float16")) == 2 * 9 + 3 + dense


def test_digits_cnn_payload_within_issue_bound():
    sparsity = 0.8
    model = DigitsCNN()
    state = model.state_dict()
    names = maskable_names(model)
    shapes = shapes_of(state, names)
    masks = random_masks(shapes, layer_counts(shapes, sparsity, "erk"), seed=0)
    n = sum(math.prod(shape) for shape in shapes.values())
    dense_raw = sum(t.numel() * t.element_size() for name, t in state.items() if name not in masks)

    bound = 4 * (1 - sparsity) * n + dense_raw + 1024
    assert codec.payload_bytes(codec.encode(state, masks, send_mask=False)) <= bound
    assert codec.payload_bytes(codec.encode(state, masks, send_mask=True)) <= bound + math.ceil(n / 8)


# --------------------------------------------------------------------------- validation errors


def replaced(key: str, array: Array, send_mask: bool = True) -> ArrayRecord:
    """A good record with one array replaced."""
    record = good_record(send_mask)
    record[key] = array
    return record


def removed(key: str) -> ArrayRecord:
    """A good record (with masks) without one array."""
    record = good_record()
    del record[key]
    return record


def assert_rejected(record: ArrayRecord, *fragments: str, held=None) -> None:
    with pytest.raises(CodecError) as info:
        decode(record, held)
    for fragment in fragments:
        assert fragment in str(info.value)


def fc_values(count: int) -> bytes:
    return np.arange(1, count + 1, dtype="<f4").tobytes()


def test_unexpected_layer():
    record = good_record()
    record["extra.weight"] = dense_array([1.0])
    assert_rejected(record, "unexpected", "extra.weight")


def test_mask_for_a_dense_layer_is_unexpected():
    record = good_record()
    record["fc.bias" + MASK_SUFFIX] = record["fc.weight" + MASK_SUFFIX]
    assert_rejected(record, "unexpected", "fc.bias:mask")


def test_missing_layer():
    assert_rejected(removed("fc.bias"), "missing", "fc.bias")


def test_partial_bitmasks():
    assert_rejected(removed("fc.weight:mask"), "fc.weight")


def test_no_mask_and_nothing_held():
    assert_rejected(good_record(send_mask=False), "no mask")


def test_held_mask_of_wrong_shape():
    held = {**make_masks(), "fc.weight": torch.ones(5, 3, dtype=torch.bool)}
    assert_rejected(good_record(send_mask=False), "fc.weight", "held mask", held=held)


def test_wrong_stype_for_values():
    assert_rejected(replaced("fc.weight", values_array(fc_values(6), stype=DENSE_STYPE)), "fc.weight", VALUES_STYPE)


def test_dense_array_in_place_of_values():
    assert_rejected(replaced("fc.weight", dense_array(np.zeros((3, 5), np.float32))), "fc.weight", VALUES_STYPE)


def test_wrong_stype_for_mask():
    mask = good_record()["fc.weight:mask"]
    bad = Array(dtype="bool", shape=(3, 5), stype=DENSE_STYPE, data=mask.data)
    assert_rejected(replaced("fc.weight:mask", bad), "fc.weight", BITMASK_STYPE)


def test_wrong_stype_for_dense():
    bad = Array(dtype="float32", shape=(3,), stype=VALUES_STYPE, data=np.zeros(3, "<f4").tobytes())
    assert_rejected(replaced("fc.bias", bad), "fc.bias", DENSE_STYPE)


@pytest.mark.parametrize("dtype", ["float64", "int32", "bfloat16"])
def test_bad_value_dtype(dtype):
    assert_rejected(replaced("fc.weight", values_array(fc_values(6), dtype=dtype)), "fc.weight", dtype)


def test_values_shape_mismatch():
    assert_rejected(replaced("fc.weight", values_array(fc_values(6), shape=(5, 3))), "fc.weight", "shape")


def test_dense_shape_mismatch():
    assert_rejected(replaced("fc.bias", dense_array(np.zeros(4, np.float32))), "fc.bias", "shape")


@pytest.mark.parametrize("values", [np.array([True, False, True]), np.array([1.0, 2.0, 3.0])], ids=["bool", "float64"])
def test_dense_wrong_dtype(values):
    assert_rejected(replaced("fc.bias", dense_array(values)), "fc.bias", "dtype")


def test_dense_payload_dtype_must_match_the_declared_one():
    lying = Array(dtype="float32", shape=(3,), stype=DENSE_STYPE, data=dense_array(np.zeros(3, dtype="<i8")).data)
    assert_rejected(replaced("fc.bias", lying), "fc.bias", "differs from the declared")


def test_oversized_dense_array_is_rejected_before_reading_it():
    huge = Array(dtype="float32", shape=(3,), stype=DENSE_STYPE, data=bytes(12 + NPY_HEADER_LIMIT + 1))
    assert_rejected(replaced("fc.bias", huge), "fc.bias", "at most")


def test_bitmask_shape_mismatch():
    mask = good_record()["fc.weight:mask"]
    bad = Array(dtype="bool", shape=(5, 3), stype=BITMASK_STYPE, data=mask.data)
    assert_rejected(replaced("fc.weight:mask", bad), "fc.weight", "shape")


@pytest.mark.parametrize("data", [bytes([0b01100001]), bytes([0b01100001, 0b00010110, 0])])
def test_bitmask_wrong_byte_length(data):
    bad = Array(dtype="bool", shape=(3, 5), stype=BITMASK_STYPE, data=data)
    assert_rejected(replaced("fc.weight:mask", bad), "fc.weight", "bytes")


def test_bitmask_nonzero_padding_bit():
    # 15 weights -> the 16th (last) bit of the second byte is padding
    bad = Array(dtype="bool", shape=(3, 5), stype=BITMASK_STYPE, data=bytes([0b01100001, 0b00010111]))
    assert_rejected(replaced("fc.weight:mask", bad), "fc.weight", "padding")


@pytest.mark.parametrize("count", [5, 7, 0])
def test_popcount_differs_from_value_count(count):
    # the mask has 6 active weights in fc.weight
    assert_rejected(replaced("fc.weight", values_array(fc_values(count))), "fc.weight", f"{count} values", "6 active")


def test_popcount_checked_against_held_mask_too():
    record = replaced("fc.weight", values_array(fc_values(7)), send_mask=False)
    assert_rejected(record, "fc.weight", "7 values", held=make_masks())


@pytest.mark.parametrize(("dtype", "length"), [("float32", 6 * 4 - 1), ("float32", 6 * 4 + 2), ("float16", 6 * 2 + 1)])
def test_value_bytes_not_a_multiple_of_itemsize(dtype, length):
    bad = values_array(bytes(length), dtype=dtype)
    assert_rejected(replaced("fc.weight", bad), "fc.weight", "not a multiple")


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_non_finite_sparse_values(bad_value, dtype):
    values = np.arange(1, 7).astype(dtype)
    values[4] = bad_value
    bad = values_array(values.astype(codec.VALUE_DTYPES[dtype]).tobytes(), dtype=dtype)
    assert_rejected(replaced("fc.weight", bad), "fc.weight", "NaN or Inf")


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_non_finite_dense_values(bad_value):
    assert_rejected(
        replaced("fc.bias", dense_array(np.array([0.0, bad_value, 1.0], np.float32))), "fc.bias", "NaN or Inf"
    )


@pytest.mark.parametrize("data", [b"not a numpy file", b"", b"\x93NUMPY\x01\x00garbage"])
def test_unreadable_dense_bytes(data):
    bad = Array(dtype="float32", shape=(3,), stype=DENSE_STYPE, data=data)
    assert_rejected(replaced("fc.bias", bad), "fc.bias", "unreadable")


def test_object_array_dense_bytes_are_unreadable():
    buffer = io.BytesIO()
    np.save(buffer, np.array([1, "x", None], dtype=object), allow_pickle=True)
    declared_object = Array(dtype="object", shape=(3,), stype=DENSE_STYPE, data=buffer.getvalue())
    assert_rejected(replaced("fc.bias", declared_object), "fc.bias", "dtype 'object'")
    lying = Array(dtype="float32", shape=(3,), stype=DENSE_STYPE, data=buffer.getvalue())
    assert_rejected(replaced("fc.bias", lying), "fc.bias", "differs from the declared")  # never unpickled


def npy_with_header(header: dict, body: bytes = b"") -> bytes:
    """A .npy payload with a hand-written header (numpy's writer would refuse to lie)."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue() + body


def test_npy_header_declaring_a_huge_shape_is_rejected_before_allocating():
    data = npy_with_header({"descr": "<f4", "fortran_order": False, "shape": (2**29,)})  # 2 GiB if believed
    assert len(data) < 200
    tracemalloc.start()
    assert_rejected(
        replaced("fc.bias", Array(dtype="float32", shape=(3,), stype=DENSE_STYPE, data=data)),
        "fc.bias",
        "payload shape",
    )
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1 << 20


@pytest.mark.parametrize("body", [b"", b"\0" * 8, b"\0" * 16], ids=["empty", "short", "long"])
def test_npy_body_of_the_wrong_size_is_rejected(body):
    data = npy_with_header({"descr": "<f4", "fortran_order": False, "shape": (3,)}, body)
    assert_rejected(
        replaced("fc.bias", Array(dtype="float32", shape=(3,), stype=DENSE_STYPE, data=data)), "fc.bias", "data bytes"
    )


def test_fortran_order_npy_reads_as_numpy_would():
    values = np.asfortranarray(np.arange(12, dtype="<f4").reshape(3, 4))
    buffer = io.BytesIO()
    np.save(buffer, values)
    assert np.array_equal(codec.read_npy("w", buffer.getvalue(), np.dtype("<f4"), (3, 4)), values)


# --------------------------------------------------------------------------- mask records


def test_masks_record_round_trip():
    masks = make_masks()
    record = codec.masks_to_record(masks)
    assert all(array.stype == BITMASK_STYPE for array in record.values())
    restored = codec.masks_from_record(record, {n: tuple(m.shape) for n, m in masks.items()})
    assert set(restored) == set(masks)
    assert all(torch.equal(restored[n], masks[n]) for n in masks)


@pytest.mark.parametrize(
    "shapes",
    [
        {"conv.weight": (2, 1, 2, 2)},
        {"conv.weight": (2, 1, 2, 2), "fc.weight": (3, 5), "other.weight": (2, 2)},
        {"conv.weight": (2, 1, 2, 2), "fc2.weight": (3, 5)},
    ],
)
def test_masks_record_name_mismatch(shapes):
    with pytest.raises(CodecError, match="stored masks"):
        codec.masks_from_record(codec.masks_to_record(make_masks()), shapes)


def test_stored_masks_are_unpacked_once_while_the_bits_are_the_same():
    masks = make_masks()
    shapes = {n: tuple(m.shape) for n, m in masks.items()}
    first = codec.masks_from_record(codec.masks_to_record(masks), shapes)
    assert all(first[n] is masks[n] for n in masks)  # the stored tensors themselves
    again = codec.masks_from_record(codec.masks_to_record(masks), shapes)  # equal bits, new bytes objects
    assert all(again[n] is first[n] for n in masks)
    assert all(positions(again[n]) is positions(first[n]) for n in masks)
    moved = {n: m.clone() for n, m in masks.items()}
    moved["fc.weight"][0] = ~moved["fc.weight"][0]
    changed = codec.masks_from_record(codec.masks_to_record(moved), shapes)
    assert all(changed[n] is moved[n] for n in masks)  # storing primes the cache with the stored tensors
    record = codec.masks_to_record(masks)
    codec.masks_from_record(codec.masks_to_record(moved), shapes)
    unpacked = codec.masks_from_record(record, shapes)  # other bits than the last stored: unpacked
    assert all(unpacked[n] is not masks[n] and torch.equal(unpacked[n], masks[n]) for n in masks)


def test_stored_mask_changed_in_place_is_unpacked_again():
    masks = make_masks()
    shapes = {n: tuple(m.shape) for n, m in masks.items()}
    stored = {n: m.clone() for n, m in masks.items()}
    record = codec.masks_to_record(masks)
    held = codec.masks_from_record(record, shapes)
    held["fc.weight"][0, 0] = ~held["fc.weight"][0, 0]  # a caller's in-place change
    restored = codec.masks_from_record(record, shapes)
    assert restored["fc.weight"] is not held["fc.weight"]
    assert all(torch.equal(restored[n], stored[n]) for n in masks)


def test_stored_mask_with_a_wrong_declared_shape_is_rejected_after_a_hit():
    masks = make_masks()
    shapes = {n: tuple(m.shape) for n, m in masks.items()}
    record = codec.masks_to_record(masks)
    codec.masks_from_record(record, shapes)
    bits = record["fc.weight"]
    record["fc.weight"] = Array(dtype="bool", shape=(5, 3), stype=BITMASK_STYPE, data=bits.data)
    with pytest.raises(CodecError, match="fc.weight"):
        codec.masks_from_record(record, shapes)


def test_masks_record_shape_mismatch():
    with pytest.raises(CodecError, match="fc.weight"):
        codec.masks_from_record(codec.masks_to_record(make_masks()), {"conv.weight": (2, 1, 2, 2), "fc.weight": (5, 3)})
