"""How a layer's mask travels (part of the wire codec): whichever of three codings is
smallest for this layer and this message, named by the Array's stype.

  `feddst.bitmask`     np.packbits of the flattened mask: 1 bit per weight, zero padding.
  `feddst.mask-coded`  header `<Q` (active positions c), then the mask's bits range-coded
                       with a Bernoulli(c/n) model: about n H(c/n) bits.
  `feddst.mask-delta-rice`  header `<QQQBB` (base mask version, entered e, left l, Rice
                       parameters k_e, k_l), then the change from the base mask, which the
                       receiver holds, as two Rice-coded streams of gaps: the indices of the
                       entered positions among the base's n - a inactive ones, then those of
                       the left positions among its a active ones, each gap g (indices apart,
                       less one) as its remainder g mod 2^k (k bits, most significant first)
                       and its quotient g >> k in unary (that many zeros and a one); one
                       bitstring (np.packbits order): both streams' remainders, then both
                       streams' quotients, zero-padded to a byte. Entered positions are
                       inactive in the base and left ones active by construction; the size
                       is within a few percent of the entropy of the change, and coding and
                       decoding touch only the changed positions (vectorised).

Range coding is constriction's (`RangeEncoder`, 32-bit words, little-endian on the wire).
Decoding checks every count and parameter against the layer's size, reads at most the plain
bitmask's bytes plus 0.1 % and two words (the range coder's rounding and flush), checks that
the decoded counts are the declared ones, that every position lies in its layer and that the
code is consumed exactly.
"""

from __future__ import annotations

import math
import struct

import constriction
import numpy as np
from flwr.app import Array

BITMASK_STYPE = "feddst.bitmask"
CODED_STYPE = "feddst.mask-coded"
DELTA_STYPE = "feddst.mask-delta-rice"
MASK_STYPES = (BITMASK_STYPE, CODED_STYPE, DELTA_STYPE)
CODED_HEADER = struct.Struct("<Q")  # active positions
DELTA_HEADER = struct.Struct("<QQQBB")  # base mask version, entered and left positions, their Rice parameters
WORD = np.dtype("<u4")


class MaskCodingError(ValueError):
    """A coded mask is malformed or does not fit the layer; the message says how."""


def encode_mask(
    mask: np.ndarray, base: np.ndarray | None = None, version: int = 0, base_active: np.ndarray | None = None
) -> tuple[str, bytes]:
    """The smallest coding of a flat bool mask: (stype, data); a delta against `base`
    (the mask of `version` the receiver holds; `base_active`: its active positions, ascending,
    if known) is a candidate when given. The full range
    code is not computed when its size cannot undercut the delta's (`_full_code_floor`):
    after a readjustment the delta is far smaller, and coding every position twice would
    double the time."""
    candidates = [(BITMASK_STYPE, np.packbits(mask).tobytes())]
    delta = None if base is None else (DELTA_STYPE, _encode_delta(mask, base, version, base_active))
    if delta is None or _full_code_floor(int(np.count_nonzero(mask)), mask.size) <= len(delta[1]):
        candidates.append((CODED_STYPE, _encode_full(mask)))
    if delta is not None:
        candidates.append(delta)
    return min(candidates, key=lambda candidate: len(candidate[1]))  # the first of equal sizes


def _full_code_floor(count: int, size: int) -> float:
    """A lower bound on the bytes of the full coding of any mask with `count` active
    positions out of `size`. Under any Bernoulli model such a mask carries at least
    size * H(count / size) bits of information (Gibbs' inequality), and the range coder's
    interval never widens, so its words hold at least that, less one word of flush; the
    bound takes off 0.1 % and a second word for rounding."""
    if count in (0, size):
        return CODED_HEADER.size
    p = count / size
    bits = -size * (p * math.log2(p) + (1 - p) * math.log2(1 - p))
    return CODED_HEADER.size + (0.999 * bits - 2 * 32) / 8


def decode_mask(
    array: Array, size: int, held: np.ndarray | None, held_version: int, held_active: np.ndarray | None = None
) -> np.ndarray:
    """The flat bool mask of a layer of `size` weights from its Array; `held` is the flat
    mask of version `held_version` the receiver holds (needed for a delta), or None;
    `held_active` its active positions, ascending, if known."""
    limit = math.ceil(size / 8) + math.ceil(size / 8192) + 2 * WORD.itemsize
    if array.stype == BITMASK_STYPE:
        return _decode_bitmask(array.data, size)
    if array.stype == CODED_STYPE:
        (count,) = _header(CODED_HEADER, array.data, limit)
        if count > size:
            raise MaskCodingError(f"{count} active positions declared for a layer of {size}")
        (bits,) = _decode_streams(array.data[CODED_HEADER.size :], [(size, count)])
        return bits
    if array.stype == DELTA_STYPE:
        version, entered, left, k_entered, k_left = _header(DELTA_HEADER, array.data, limit)
        if held is None:
            raise MaskCodingError(f"delta against mask version {version}, and no mask is held")
        if version != held_version:
            raise MaskCodingError(f"delta against mask version {version}, the receiver holds version {held_version}")
        if held.size != size:
            raise MaskCodingError(f"held mask has {held.size} positions, the layer {size}")
        active = np.flatnonzero(held) if held_active is None else held_active
        was_active = len(active)
        if entered > size - was_active or left > was_active:
            raise MaskCodingError(
                f"delta declares {entered} entered and {left} left positions; the base mask has "
                f"{size - was_active} inactive and {was_active} active"
            )
        into, out_of = _decode_gaps(
            array.data[DELTA_HEADER.size :], [(size - was_active, entered, k_entered), (was_active, left, k_left)]
        )
        return _apply_delta(held, active, into, out_of)
    raise MaskCodingError(f"mask expected one of stypes {list(MASK_STYPES)}, got '{array.stype}'")


def _apply_delta(held: np.ndarray, active: np.ndarray, entered: np.ndarray, left: np.ndarray) -> np.ndarray:
    """The flat mask `held` (`active`: its active positions) with the `entered`-th of its
    inactive positions set and the `left`-th of its active positions cleared (ascending
    indices among them)."""
    before = active - np.arange(len(active))  # inactive positions before each active one
    mask = held.copy()
    mask[entered + np.searchsorted(before, entered, side="right")] = True  # the k-th inactive one
    mask[active[left]] = False
    return mask


def _encode_full(mask: np.ndarray) -> bytes:
    return CODED_HEADER.pack(int(np.count_nonzero(mask))) + _encode_streams([mask])


def _encode_delta(mask: np.ndarray, base: np.ndarray, version: int, active: np.ndarray | None = None) -> bytes:
    active = np.flatnonzero(base) if active is None else active
    changed = np.flatnonzero(mask != base)
    into, out_of = changed[mask[changed]], changed[~mask[changed]]
    entered = into - np.searchsorted(active, into)  # indices among the base's inactive positions
    left = np.searchsorted(active, out_of)  # and among its active ones
    coded = [_rice(entered, mask.size - len(active)), _rice(left, len(active))]
    header = DELTA_HEADER.pack(version, len(entered), len(left), coded[0][2], coded[1][2])
    bits = np.concatenate([remainders for _, remainders, _ in coded] + [unary for unary, _, _ in coded])
    return header + np.packbits(bits).tobytes()


def _rice(indices: np.ndarray, domain: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Ascending indices among `domain` positions as Rice-coded gaps: the quotients in unary
    and the k-bit remainders (uint8 0/1 bits each), and k, the parameter that makes them
    fewest. None or all of the positions cost nothing (the count says it)."""
    if len(indices) in (0, domain):
        return np.zeros(0, dtype=np.uint8), np.zeros(0, dtype=np.uint8), 0
    gaps = np.diff(indices, prepend=-1) - 1
    guess = max(int(np.mean(gaps)), 1).bit_length() - 1  # the best k is within one of log2(mean gap)
    k = min(range(max(guess - 1, 0), guess + 2), key=lambda k: len(gaps) * k + int((gaps >> k).sum()))
    quotients = gaps >> k
    unary = np.zeros(int(quotients.sum()) + len(gaps), dtype=np.uint8)
    unary[np.cumsum(quotients + 1) - 1] = 1
    remainders = ((gaps[:, None] >> np.arange(k - 1, -1, -1)) & 1).astype(np.uint8)
    return unary, remainders.ravel(), k


def _decode_gaps(data: bytes, streams: list[tuple[int, int, int]]) -> list[np.ndarray]:
    """Inverse of the Rice-coded streams of `_encode_delta` for (domain, declared count, k)
    triples: every stream's remainders, then every stream's quotients in unary, padded with
    zeros to a byte. Returns each stream's ascending indices, checked to lie in its domain."""
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
    coded = [(domain, count, k) for domain, count, k in streams if count not in (0, domain)]
    for domain, _, k in streams:
        if k > max(domain, 1).bit_length():
            raise MaskCodingError(f"Rice parameter {k} for positions among {domain}")
    unary_start = sum(count * k for _, count, k in coded)
    if len(bits) < unary_start:
        raise MaskCodingError(f"gap code ends before the remainders of its {unary_start} bits")
    ones = np.flatnonzero(bits[unary_start:])
    declared = sum(count for _, count, _ in coded)
    if len(ones) != declared:
        raise MaskCodingError(f"gap code holds {len(ones)} quotients, {declared} declared positions")
    if declared and len(bits) - (unary_start + int(ones[-1]) + 1) >= 8:
        raise MaskCodingError("gap code has bytes beyond the declared positions")
    if not declared and len(bits):
        raise MaskCodingError("gap code has bytes and no declared positions")
    quotients = np.diff(ones, prepend=-1) - 1
    decoded, remainder, quotient = [], 0, 0
    for domain, count, k in streams:
        if count in (0, domain):
            decoded.append(np.arange(count, dtype=np.int64))
            continue
        gaps = quotients[quotient : quotient + count]
        if int(gaps.max()) > domain >> k:
            raise MaskCodingError(f"a gap beyond the {domain} positions it indexes")
        gaps = gaps << k
        for j, column in enumerate(bits[remainder : remainder + count * k].reshape(count, k).T):
            gaps |= column.astype(np.int64) << (k - 1 - j)
        indices = np.cumsum(gaps + 1) - 1
        if indices[-1] >= domain:
            raise MaskCodingError(f"position {int(indices[-1])} beyond the {domain} positions it indexes")
        decoded.append(indices)
        remainder, quotient = remainder + count * k, quotient + count
    return decoded


def _encode_streams(streams: list[np.ndarray]) -> bytes:
    """Range-code bool arrays one after the other, each with the Bernoulli model of its
    own frequency (all-zero and all-one streams cost nothing)."""
    encoder = constriction.stream.queue.RangeEncoder()
    for bits in streams:
        count = int(np.count_nonzero(bits))
        if 0 < count < bits.size:
            encoder.encode(bits.astype(np.int32), _model(count, bits.size))
    return encoder.get_compressed().astype(WORD).tobytes()


def _decode_streams(data: bytes, streams: list[tuple[int, int]]) -> list[np.ndarray]:
    """Inverse of _encode_streams for (length, declared count) pairs; checks the counts and
    that the code is consumed exactly."""
    if len(data) % WORD.itemsize:
        raise MaskCodingError(f"range code of {len(data)} bytes is not whole 32-bit words")
    decoder = constriction.stream.queue.RangeDecoder(np.frombuffer(data, dtype=WORD).astype(np.uint32))
    decoded = []
    for length, count in streams:
        if count in (0, length):
            decoded.append(np.full(length, count == length))
            continue
        try:
            bits = decoder.decode(_model(count, length), length).astype(bool)
        except Exception as err:  # constriction raises on codes it cannot read
            raise MaskCodingError(f"unreadable range code ({err})") from err
        if int(np.count_nonzero(bits)) != count:
            raise MaskCodingError(
                f"range code decodes to {int(np.count_nonzero(bits))} set positions, {count} declared"
            )
        decoded.append(bits)
    if not decoder.maybe_exhausted():
        raise MaskCodingError("range code has bytes beyond the declared positions")
    return decoded


def _model(count: int, length: int) -> constriction.stream.model.Bernoulli:
    return constriction.stream.model.Bernoulli(count / length, perfect=False)


def _header(header: struct.Struct, data: bytes, limit: int) -> tuple[int, ...]:
    """The header's fields, once the payload is known to be no larger than the header and
    `limit` bytes of code."""
    if len(data) < header.size:
        raise MaskCodingError(f"{len(data)} bytes, shorter than its {header.size}-byte header")
    if len(data) > header.size + limit:
        raise MaskCodingError(f"{len(data)} bytes, more than its {header.size}-byte header and {limit} bytes of code")
    return header.unpack_from(data)


def _decode_bitmask(data: bytes, size: int) -> np.ndarray:
    if len(data) != math.ceil(size / 8):
        raise MaskCodingError(f"bitmask has {len(data)} bytes, expected {math.ceil(size / 8)} for {size} weights")
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
    if bits[size:].any():
        raise MaskCodingError("bitmask padding bits are not zero")
    return bits[:size].astype(bool)
