"""Fuzzing the wire decoder (hypothesis): random, truncated and mutated payloads only ever
raise CodecError; nothing else escapes, nothing hangs (hypothesis' per-example deadline),
and nothing allocates beyond the model's own size (tracemalloc peak)."""

from __future__ import annotations

import tracemalloc

import pytest
from flwr.app import Array, ArrayRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_codec import MASKABLE, good_record, make_masks, make_state, reference

from feddst_flwr import codec
from feddst_flwr.mask_coding import MASK_STYPES

SHAPES = reference(make_state())
NAMES = sorted(good_record(send_mask=True))  # every layer and bitmask key of a valid payload
DTYPES = ["float32", "float16", "float64", "int64", "bool", "object", "uint8", "<f4", ">f4", "", "garbage"]
STYPES = [codec.VALUES_STYPE, *MASK_STYPES, codec.DENSE_STYPE, "", "numpy.ndarray.evil"]
PEAK_LIMIT = 1 << 20  # bytes; the valid payload is about 200 bytes
FUZZ = settings(max_examples=500, deadline=500, suppress_health_check=[HealthCheck.too_slow])

shapes = st.lists(st.one_of(st.integers(0, 20), st.sampled_from([2**31, 2**40, -1])), max_size=5).map(tuple)


@st.composite
def mutated_arrays(draw, array: Array) -> Array:
    """One Array with its data truncated, extended, bit-flipped or replaced, and maybe
    its dtype, shape or stype changed."""
    data = bytearray(array.data)
    kind = draw(st.sampled_from(["truncate", "extend", "flip", "random", "keep"]))
    if kind == "truncate":
        data = data[: draw(st.integers(0, max(len(data) - 1, 0)))]
    elif kind == "extend":
        data += draw(st.binary(min_size=1, max_size=64))
    elif kind == "flip" and data:
        for position in draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=8)):
            data[position] ^= 1 << draw(st.integers(0, 7))
    elif kind == "random":
        data = bytearray(draw(st.binary(max_size=512)))
    dtype = draw(st.one_of(st.just(array.dtype), st.sampled_from(DTYPES)))
    shape = draw(st.one_of(st.just(tuple(array.shape)), shapes))
    stype = draw(st.one_of(st.just(array.stype), st.sampled_from(STYPES)))
    return Array(dtype=dtype, shape=shape, stype=stype, data=bytes(data))


@st.composite
def mutated_payloads(draw) -> tuple[ArrayRecord, bool]:
    """A valid payload (with or without bitmasks) with some arrays mutated, dropped or added."""
    send_mask = draw(st.booleans())
    record = good_record(send_mask=send_mask, value_dtype=draw(st.sampled_from(["float32", "float16"])))
    mutated = ArrayRecord()
    for name in record:
        if draw(st.integers(0, 9)) == 0:
            continue  # dropped
        mutated[name] = draw(mutated_arrays(record[name])) if draw(st.booleans()) else record[name]
    for name in draw(st.lists(st.sampled_from([*NAMES, "evil", "conv.weight:mask:mask"]), max_size=2)):
        mutated[name] = draw(mutated_arrays(record[name] if name in record else record["fc.bias"]))
    return mutated, draw(st.booleans())


def decode_within_memory(record: ArrayRecord, held) -> None:
    """Decode (`held`: the masks the receiver holds, version 0); the only exception allowed
    is CodecError, and the peak allocation is bounded."""
    tracemalloc.start()
    try:
        codec.decode(record, SHAPES, MASKABLE, codec.HeldMask(held, 0) if held is not None else None)
    except codec.CodecError:
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < PEAK_LIMIT, f"decoding allocated {peak} bytes"


@FUZZ
@given(mutated_payloads())
def test_mutated_payloads_only_raise_codec_error(payload):
    record, hold_mask = payload
    decode_within_memory(record, make_masks() if hold_mask else None)


@pytest.mark.slow
@settings(FUZZ, max_examples=10_000)
@given(mutated_payloads())
def test_mutated_payloads_slow(payload):
    record, hold_mask = payload
    decode_within_memory(record, make_masks() if hold_mask else None)


@FUZZ
@given(st.dictionaries(st.sampled_from([*NAMES, "x"]), st.builds(
    Array, dtype=st.sampled_from(DTYPES), shape=shapes, stype=st.sampled_from(STYPES), data=st.binary(max_size=256)
)))  # fmt: skip
def test_random_payloads_only_raise_codec_error(arrays):
    decode_within_memory(ArrayRecord(arrays), make_masks())


@FUZZ
@given(st.dictionaries(st.sampled_from([*MASKABLE, "x"]), st.builds(
    Array, dtype=st.sampled_from(DTYPES), shape=shapes, stype=st.sampled_from(STYPES), data=st.binary(max_size=64)
)))  # fmt: skip
def test_random_mask_records_only_raise_codec_error(arrays):
    with pytest.raises(codec.CodecError):
        codec.masks_from_record(ArrayRecord(arrays), {name: SHAPES[name] for name in MASKABLE})


@pytest.mark.parametrize("claimed", [(2**40,), (2**20, 2**20), (3, 2**40)])
def test_huge_claimed_shapes_are_rejected_without_allocating(claimed):
    record = good_record()
    for name in ["fc.weight", "fc.weight:mask", "fc.bias"]:
        tampered = ArrayRecord({**{key: record[key] for key in record}})
        tampered[name] = Array(
            dtype=record[name].dtype, shape=claimed, stype=record[name].stype, data=record[name].data
        )
        with pytest.raises(codec.CodecError, match="shape"):
            codec.decode(tampered, SHAPES, MASKABLE, None)
        decode_within_memory(tampered, None)
