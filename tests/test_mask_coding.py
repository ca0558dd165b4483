"""feddst_flwr.mask_coding: exact round trips of every coding over densities 0..1, layer
sizes 1..10^6 and deltas of no to all positions; coded sizes against the entropy bound;
every malformed coded mask rejected with its reason, and fuzzed ones never anything else."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest
from flwr.app import Array
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from feddst_flwr.mask_coding import (
    BITMASK_STYPE,
    CODED_HEADER,
    CODED_STYPE,
    DELTA_HEADER,
    DELTA_STYPE,
    MaskCodingError,
    _encode_delta,
    _encode_full,
    _full_code_floor,
    decode_mask,
    encode_mask,
)

SIZES = [1, 2, 7, 8, 9, 100, 1000, 100_000, 1_000_000]
DENSITIES = [0.0, 1e-4, 0.004, 0.2, 0.5, 0.8, 0.999, 1.0]


def entropy(p: float) -> float:
    """Binary entropy in bits."""
    return 0.0 if p in (0.0, 1.0) else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def random_mask(size: int, density: float, seed: int = 0) -> np.ndarray:
    """Exactly round(density * size) positions set, at random."""
    mask = np.zeros(size, dtype=bool)
    mask[np.random.default_rng(seed).permutation(size)[: round(density * size)]] = True
    return mask


def flipped(mask: np.ndarray, fraction: float, seed: int = 1) -> np.ndarray:
    """The mask with round(fraction * size) random positions flipped (entered or left)."""
    changed = mask.copy()
    positions = np.random.default_rng(seed).permutation(mask.size)[: round(fraction * mask.size)]
    changed[positions] = ~changed[positions]
    return changed


def as_array(stype: str, data: bytes, size: int) -> Array:
    return Array(dtype="bool", shape=(size,), stype=stype, data=data)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("density", DENSITIES)
def test_every_coding_round_trips_exactly(size, density):
    mask = random_mask(size, density)
    base = flipped(mask, 0.01)
    codings = {
        BITMASK_STYPE: np.packbits(mask).tobytes(),
        CODED_STYPE: _encode_full(mask),
        DELTA_STYPE: _encode_delta(mask, base, 5),
    }
    for stype, data in codings.items():
        assert np.array_equal(decode_mask(as_array(stype, data, size), size, base, 5), mask), stype
    stype, data = encode_mask(mask, base, 5)
    assert len(data) == min(len(coded) for coded in codings.values())
    assert np.array_equal(decode_mask(as_array(stype, data, size), size, base, 5), mask)


@pytest.mark.parametrize("size", [1, 9, 1000, 1_000_000])
@pytest.mark.parametrize("changed", [0.0, 1e-6, 0.004, 0.05, 0.5, 1.0])
def test_deltas_of_none_to_all_positions_round_trip(size, changed):
    base = random_mask(size, 0.2)
    mask = flipped(base, changed)
    data = _encode_delta(mask, base, 2**40)
    assert np.array_equal(decode_mask(as_array(DELTA_STYPE, data, size), size, base, 2**40), mask)
    if changed in (0.0, 1.0):  # nothing to code: the header says it all
        assert len(data) == DELTA_HEADER.size


def test_full_mask_is_within_five_percent_of_the_entropy_bound():
    size, density = 1_000_000, 0.2
    data = _encode_full(random_mask(size, density))
    assert (len(data) - CODED_HEADER.size) * 8 <= 1.05 * entropy(density) * size
    assert CODED_HEADER.size <= 64


def test_delta_is_within_ten_percent_of_the_entropy_bound():
    size, changed = 1_000_000, 0.004
    base = random_mask(size, 0.2)
    data = _encode_delta(flipped(base, changed), base, 1)
    assert (len(data) - DELTA_HEADER.size) * 8 <= 1.10 * entropy(changed) * size
    assert DELTA_HEADER.size <= 64


def test_smallest_coding_is_chosen():
    size = 100_000
    base = random_mask(size, 0.2)
    assert encode_mask(random_mask(size, 0.5))[0] == BITMASK_STYPE  # incompressible
    assert encode_mask(base)[0] == CODED_STYPE
    assert encode_mask(flipped(base, 0.004), base, 3)[0] == DELTA_STYPE
    assert encode_mask(random_mask(size, 0.2, seed=9), base, 3)[0] == CODED_STYPE  # unrelated to the base


@pytest.mark.parametrize("size", [1, 7, 1000, 100_000])
@pytest.mark.parametrize("density", [0.0, 1e-3, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("changed", [0.0, 0.001, 0.05, 0.3, 0.6, 1.0])
def test_skipping_the_full_code_never_changes_the_choice(size, density, changed):
    base = random_mask(size, density)
    mask = flipped(base, changed, seed=size)
    full = _encode_full(mask)
    assert _full_code_floor(int(mask.sum()), size) <= len(full)
    candidates = [
        (BITMASK_STYPE, np.packbits(mask).tobytes()),
        (CODED_STYPE, full),
        (DELTA_STYPE, _encode_delta(mask, base, 2)),
    ]
    assert encode_mask(mask, base, 2) == min(candidates, key=lambda candidate: len(candidate[1]))


@given(st.integers(1, 3000), st.floats(0.0, 1.0), st.integers(0, 2**32 - 1))
@settings(max_examples=200, deadline=None)
def test_full_code_floor_is_below_every_full_code(size, density, seed):
    mask = np.random.default_rng(seed).random(size) < density
    assert _full_code_floor(int(mask.sum()), size) <= len(_encode_full(mask))


# --------------------------------------------------------------------------- rejections

SIZE = 4000
MASK = random_mask(SIZE, 0.2)
BASE = flipped(MASK, 0.01)
CODED = _encode_full(MASK)
DELTA = _encode_delta(MASK, BASE, 3)


def rejected(stype: str, data: bytes, *fragments: str, held=BASE, version: int = 3) -> None:
    with pytest.raises(MaskCodingError) as info:
        decode_mask(as_array(stype, data, SIZE), SIZE, held, version)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_unknown_stype():
    rejected("feddst.mask-evil", CODED, "stype")


def test_headers_shorter_than_declared():
    rejected(CODED_STYPE, CODED[:5], "shorter than its 8-byte header")
    rejected(DELTA_STYPE, DELTA[:20], "shorter than its 26-byte header")


def test_more_bytes_than_a_plain_bitmask_are_refused_before_decoding():
    rejected(CODED_STYPE, CODED[:8] + bytes(SIZE // 8 + 13), "more than its 8-byte header and 509 bytes of code")


def test_count_beyond_the_layer():
    rejected(CODED_STYPE, CODED_HEADER.pack(SIZE + 1) + CODED[8:], "4001 active positions", "layer of 4000")


@pytest.mark.parametrize("count", [int(MASK.sum()) - 1, int(MASK.sum()) + 1])
def test_count_differs_from_the_code(count):
    rejected(CODED_STYPE, CODED_HEADER.pack(count) + CODED[8:], "declared")


def test_partial_words_and_trailing_words():
    rejected(CODED_STYPE, CODED + b"\x01", "whole 32-bit words")
    rejected(CODED_STYPE, CODED + bytes(4) * 3, "beyond the declared positions")


def test_delta_without_a_held_mask_or_against_another_version():
    rejected(DELTA_STYPE, DELTA, "no mask is held", held=None)
    rejected(DELTA_STYPE, DELTA, "version 3", "holds version 4", version=4)


def test_held_mask_of_another_size():
    rejected(DELTA_STYPE, DELTA, "held mask has 3999 positions", held=BASE[:-1])


def test_delta_counts_beyond_the_base():
    version, entered, left, k_entered, k_left = DELTA_HEADER.unpack_from(DELTA)
    active, code = int(BASE.sum()), DELTA[DELTA_HEADER.size :]
    rejected(DELTA_STYPE, DELTA_HEADER.pack(version, SIZE - active + 1, left, k_entered, k_left) + code, "inactive")
    rejected(DELTA_STYPE, DELTA_HEADER.pack(version, entered, active + 1, k_entered, k_left) + code, "left", "active")


def test_delta_counts_that_lie():
    version, entered, left, k_entered, k_left = DELTA_HEADER.unpack_from(DELTA)
    code = DELTA[DELTA_HEADER.size :]
    rejected(DELTA_STYPE, DELTA_HEADER.pack(version, entered + 1, left, k_entered, k_left) + code, "declared")
    rejected(DELTA_STYPE, DELTA_HEADER.pack(version, entered - 1, left, k_entered, k_left) + code)


def test_delta_is_rice_coded_gaps_by_hand():
    """Base: positions 0 and 1 of 8 active. Position 1 leaves; 4 and 7 (inactive indices 2 and
    5) enter: entered gaps 2, 2 and k = 0 (every k in 0-2 costs 4 bits beyond the ones: the
    first is taken): 001 001; left: index 1 among 2, gap 1, k = 0: 01. One byte 0b00100101."""
    base = np.zeros(8, dtype=bool)
    base[[0, 1]] = True
    mask = base.copy()
    mask[[1]], mask[[4, 7]] = False, True
    data = _encode_delta(mask, base, 7)
    assert data == DELTA_HEADER.pack(7, 2, 1, 0, 0) + bytes([0b00100101])
    assert np.array_equal(decode_mask(as_array(DELTA_STYPE, data, 8), 8, base, 7), mask)


def test_rice_parameters_and_gaps_beyond_the_layer():
    version, entered, left, k_entered, k_left = DELTA_HEADER.unpack_from(DELTA)
    code = DELTA[DELTA_HEADER.size :]
    rejected(DELTA_STYPE, DELTA_HEADER.pack(version, entered, left, 40, k_left) + code, "Rice parameter 40")
    base = np.zeros(8, dtype=bool)
    base[[0, 1]] = True
    beyond = DELTA_HEADER.pack(7, 1, 0, 0, 0) + bytes([0b00000010])  # gap 6: index 6 of 6 inactive
    with pytest.raises(MaskCodingError, match="beyond the 6 positions"):
        decode_mask(as_array(DELTA_STYPE, beyond, 8), 8, base, 7)
    for trailing in (bytes([0b00100101, 0]), bytes([0b00100111])):  # a byte too many; a one past the code
        with pytest.raises(MaskCodingError):
            decode_mask(as_array(DELTA_STYPE, DELTA_HEADER.pack(7, 2, 1, 0, 0) + trailing, 8), 8, base, 7)
    short = DELTA_HEADER.pack(7, 2, 1, 1, 0) + bytes([0b01000000])  # k = 1: two remainder bits, then no quotient
    with pytest.raises(MaskCodingError, match="holds 0 quotients, 3 declared"):
        decode_mask(as_array(DELTA_STYPE, short, 8), 8, base, 7)


# --------------------------------------------------------------------------- fuzzing

FUZZ = settings(max_examples=500, deadline=1000, suppress_health_check=[HealthCheck.too_slow])
PEAK_LIMIT = 64 * SIZE  # bytes: a few int32 and bool copies of the layer


@st.composite
def mutated(draw) -> tuple[str, bytes]:
    """A valid coded or delta mask with its bytes truncated, extended, bit-flipped or
    its header rewritten, and maybe its stype swapped."""
    stype, data = draw(st.sampled_from([(CODED_STYPE, CODED), (DELTA_STYPE, DELTA)]))
    data = bytearray(data)
    kind = draw(st.sampled_from(["truncate", "extend", "flip", "header"]))
    if kind == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif kind == "extend":
        data += draw(st.binary(min_size=1, max_size=64))
    elif kind == "flip":
        for position in draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=8)):
            data[position] ^= 1 << draw(st.integers(0, 7))
    else:
        size = CODED_HEADER.size if stype == CODED_STYPE else DELTA_HEADER.size
        data[:size] = draw(st.binary(min_size=size, max_size=size))
    return draw(st.sampled_from([stype, stype, BITMASK_STYPE, CODED_STYPE, DELTA_STYPE])), bytes(data)


@FUZZ
@given(mutated())
def test_mutated_masks_only_raise_mask_coding_errors_within_memory(payload):
    stype, data = payload
    tracemalloc.start()
    try:
        decoded = decode_mask(as_array(stype, data, SIZE), SIZE, BASE, 3)
        assert decoded.shape == (SIZE,) and decoded.dtype == bool
    except MaskCodingError:
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < PEAK_LIMIT, f"decoding allocated {peak} bytes"
