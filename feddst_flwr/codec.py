"""Wire format (Algorithm 1, steps 2 and 5): a masked state dict as ONE ArrayRecord.

Per maskable layer `name`:
  `name`        stype `feddst.values`: the active weights in row-major mask order, raw
                little-endian float32 (or float16) bytes; `shape` is the layer's shape.
  `name:mask`   only when the mask travels: the layer's mask in whichever coding is
                smallest for it (mask_coding.py): a plain bitmask, a range-coded mask, or
                a Rice-coded delta from a mask version the receiver holds.
Every other tensor is a plain `numpy.ndarray` Array, as Flower sends it.
"""

from __future__ import annotations

import functools
import io
import math
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from numpy.lib import format as npy_format

from .mask_coding import BITMASK_STYPE, MASK_STYPES, MaskCodingError, decode_mask, encode_mask
from .masks import Masks, Shapes, positions

VALUES_STYPE = "feddst.values"
DENSE_STYPE = "numpy.ndarray"
MASK_SUFFIX = ":mask"
VALUE_DTYPES: dict[str, np.dtype] = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}
TORCH_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16}
DEFAULT_VALUE_DTYPE = "float16"  # level with float32 in accuracy at half the bytes (docs/wire.md)
DENSE_DTYPES = ("float32", "int64")  # what a torch state dict of our models holds (int64: BN counters)
NPY_HEADER_LIMIT = 4096  # .npy header bytes allowed beyond the array data
FLOAT_EXPONENTS = {2: 0x7C00, 4: 0x7F800000, 8: 0x7FF0000000000000}  # by itemsize: all ones is Inf or NaN


class CodecError(ValueError):
    """A payload does not match the model or is malformed; the message names the layer."""


@dataclass(frozen=True)
class HeldMask:
    """The mask version a receiver holds: decodes payloads without a mask, and deltas."""

    masks: Masks
    version: int


@dataclass
class Decoded:
    """A decoded payload: dense float32 tensors (pruned weights zero) and the masks used."""

    state: dict[str, torch.Tensor]
    masks: Masks
    mask_sent: bool


@dataclass
class Sparse:
    """A decoded payload as it travelled: per masked layer its mask and the values at the
    mask's positions (row-major order, in the wire dtype), every other tensor dense float32.

    Attributes
    ----------
    dense : dict[str, torch.Tensor]
        The tensors that are not masked.
    values : dict[str, np.ndarray]
        Per masked layer, its active weights (float16 or float32, read-only).
    masks : Masks
        The masks used: the payload's, or the receiver's held ones (the same tensors).
    mask_sent : bool
        Whether the payload carried its masks.
    names : list[str]
        Every tensor's name, in the model's order.
    """

    dense: dict[str, torch.Tensor]
    values: dict[str, np.ndarray]
    masks: Masks
    mask_sent: bool
    names: list[str]

    def state(self) -> dict[str, torch.Tensor]:
        """The dense float32 state dict (pruned weights zero)."""
        return {name: self.dense[name] if name in self.dense else self._layer(name) for name in self.names}

    def _layer(self, name: str) -> torch.Tensor:
        mask = self.masks[name]
        dense = np.zeros(mask.numel(), dtype=np.float32)
        dense[positions(mask)] = self.values[name]
        return torch.from_numpy(dense).view(mask.shape)


def payload_bytes(record: ArrayRecord) -> int:
    """Bytes a payload occupies on the wire: the sum of its arrays' data lengths."""
    return sum(len(array.data) for array in record.values())


def is_sparse(record: ArrayRecord) -> bool:
    """True if the record carries FedDST sparse values."""
    return any(array.stype == VALUES_STYPE for array in record.values())


def carries_mask(record: ArrayRecord) -> bool:
    """True if the record carries masks."""
    return any(array.stype in MASK_STYPES for array in record.values())


def encode(
    state: dict[str, torch.Tensor],
    masks: Masks,
    send_mask: bool,
    value_dtype: str = DEFAULT_VALUE_DTYPE,
    base: HeldMask | None = None,
) -> ArrayRecord:
    """Encode a state dict: masked layers as values (+ their masks if send_mask, coded as a
    delta from `base` where that is smallest; `base` is a mask the receiver holds), rest dense."""
    values = encode_values(state, masks, value_dtype)
    return with_masks(values, encode_masks(masks, base)) if send_mask else values


def encode_values(state: dict[str, torch.Tensor], masks: Masks, value_dtype: str = DEFAULT_VALUE_DTYPE) -> ArrayRecord:
    """A payload without masks: each masked layer's values at its mask's positions (in
    `value_dtype`), every other tensor dense.

    Parameters
    ----------
    state : dict[str, torch.Tensor]
        The state dict to send.
    masks : Masks
        The masks of the maskable layers (bool, the layers' shapes).
    value_dtype : str
        "float16" or "float32".

    Returns
    -------
    ArrayRecord
        The payload, in the state dict's order.
    """
    record = ArrayRecord()
    for name, tensor in state.items():
        tensor = tensor.detach().cpu()
        if name not in masks:
            record[name] = dense_array(tensor.numpy())
            continue
        taken = torch.from_numpy(np.take(tensor.numpy().ravel(), positions(masks[name].cpu())))
        values = taken.to(TORCH_DTYPES[value_dtype]).numpy()  # torch converts to float16 5x faster than numpy
        record[name] = Array(dtype=value_dtype, shape=tuple(tensor.shape), stype=VALUES_STYPE, data=values.tobytes())
    return record


def dense_array(array: np.ndarray) -> Array:
    """A dense tensor as Flower's `Array(ndarray)` holds it (`np.save`'s .npy bytes), built
    from the header numpy writes for its dtype and shape (cached) and its C-ordered bytes:
    a quarter of the time `np.save` takes on a model's small tensors.

    Parameters
    ----------
    array : np.ndarray
        The tensor's values.

    Returns
    -------
    Array
        stype `numpy.ndarray`, byte for byte what `Array(array)` holds for a C-ordered array.
    """
    array = np.require(array, requirements="C")  # np.ascontiguousarray would make a 0-d array 1-d
    shape = tuple(array.shape)
    data = _npy_header(array.dtype, shape) + array.tobytes()
    return Array(dtype=str(array.dtype), shape=shape, stype=DENSE_STYPE, data=data)


def encode_masks(masks: Masks, base: HeldMask | None = None) -> dict[str, Array]:
    """Each layer's mask in its smallest coding (a delta from `base`, the mask the receiver
    holds, where that is smallest), keyed `name:mask`: what `with_masks` adds to a payload."""
    coded = {}
    for name, mask in masks.items():
        stype, data = encode_mask(mask.detach().cpu().flatten().numpy(), *_held_layer(base, name))
        coded[name + MASK_SUFFIX] = Array(dtype="bool", shape=tuple(mask.shape), stype=stype, data=data)
    return coded


def with_masks(values: ArrayRecord, masks: dict[str, Array]) -> ArrayRecord:
    """The payload `values` with the coded `masks` (from `encode_masks`), each after its
    layer's values; the Arrays are shared, not copied."""
    unknown = sorted(set(masks) - {name + MASK_SUFFIX for name in values})
    if unknown:
        raise CodecError(f"masks {unknown} have no values in the payload")
    record = ArrayRecord()
    for name, array in values.items():
        record[name] = array
        if name + MASK_SUFFIX in masks:
            record[name + MASK_SUFFIX] = masks[name + MASK_SUFFIX]
    return record


def decode(record: ArrayRecord, reference: Shapes, maskable: list[str], held: HeldMask | None) -> Decoded:
    """Decode and validate a payload against the model's shapes.

    `reference` holds every state-dict tensor's shape; `maskable` names the masked ones;
    `held` is the mask the receiver already has (used when the payload carries none, and
    as the base of deltas).
    """
    sparse = decode_sparse(record, reference, maskable, held)
    return Decoded(sparse.state(), sparse.masks, sparse.mask_sent)


def decode_sparse(record: ArrayRecord, reference: Shapes, maskable: list[str], held: HeldMask | None) -> Sparse:
    """Decode and validate a payload as `decode` does, keeping the masked layers' values as
    they travelled (no dense copy)."""
    _check_names(record, reference, maskable)
    mask_keys = [name for name in maskable if name + MASK_SUFFIX in record]
    if mask_keys and len(mask_keys) != len(maskable):
        missing = sorted(set(maskable) - set(mask_keys))
        raise CodecError(f"payload has masks for some maskable layers but not for {missing}")
    mask_sent = bool(mask_keys)
    if maskable and not mask_sent and held is None:
        raise CodecError("payload carries no mask and no mask is held to decode it")
    dense, values, masks = {}, {}, {}
    for name, shape in reference.items():
        if name not in maskable:
            dense[name] = decode_dense(name, record[name], shape)
            continue
        if mask_sent:
            mask = _decode_mask(name, record[name + MASK_SUFFIX], shape, held)
        else:
            assert held is not None  # checked above
            mask = held.masks[name]
        if tuple(mask.shape) != shape:
            raise CodecError(f"layer '{name}': held mask has shape {tuple(mask.shape)}, expected {shape}")
        values[name] = _decode_values(name, record[name], shape, mask)
        masks[name] = mask
    return Sparse(dense, values, masks, mask_sent, list(reference))


def _pack_mask(mask: torch.Tensor) -> Array:
    """1 bit per weight, row-major, zero padding bits."""
    bits = np.packbits(mask.flatten().numpy())
    return Array(dtype="bool", shape=tuple(mask.shape), stype=BITMASK_STYPE, data=bits.tobytes())


def _check_names(record: ArrayRecord, reference: Shapes, maskable: list[str]) -> None:
    allowed = set(reference) | {name + MASK_SUFFIX for name in maskable}
    unexpected = sorted(set(record) - allowed)
    missing = sorted(set(reference) - set(record))
    if unexpected:
        raise CodecError(f"payload has unexpected layers {unexpected}")
    if missing:
        raise CodecError(f"payload is missing layers {missing}")


def decode_dense(name: str, array: Array, shape: tuple[int, ...]) -> torch.Tensor:
    """A dense numpy.ndarray Array, validated (stype, dtype, declared and actual shape, size
    before reading, finite values)."""
    if array.stype != DENSE_STYPE:
        raise CodecError(f"layer '{name}': dense tensor expected stype '{DENSE_STYPE}', got '{array.stype}'")
    if array.dtype not in DENSE_DTYPES:
        raise CodecError(f"layer '{name}': dense dtype '{array.dtype}' not in {sorted(DENSE_DTYPES)}")
    if tuple(array.shape) != shape:
        raise CodecError(f"layer '{name}': declared shape {tuple(array.shape)}, expected {shape}")
    limit = math.prod(shape) * np.dtype(array.dtype).itemsize + NPY_HEADER_LIMIT
    if len(array.data) > limit:
        raise CodecError(f"layer '{name}': {len(array.data)} bytes for shape {shape}, at most {limit} expected")
    values = read_npy(name, array.data, np.dtype(array.dtype), shape)
    _check_finite(name, values)
    return torch.from_numpy(values.astype(np.float32))


def read_npy(name: str, data: bytes, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """The array in .npy bytes, read only if its header declares exactly `dtype` and
    `shape` and the data that follows is exactly that size (np.load would allocate what
    the header declares before reading). A header byte for byte as numpy writes it for
    that dtype and shape (what Flower's Array holds) is taken without parsing it."""
    expected = _npy_header(dtype, shape)
    if data[: len(expected)] == expected:
        body, fortran_order = memoryview(data)[len(expected) :], False
    else:
        body, fortran_order = _parsed_npy(name, data, dtype, shape)
    if len(body) != math.prod(shape) * dtype.itemsize:
        raise CodecError(
            f"layer '{name}': {len(body)} data bytes, expected {math.prod(shape) * dtype.itemsize} for {shape}"
        )
    return np.frombuffer(body, dtype=dtype).reshape(shape, order="F" if fortran_order else "C")


@functools.lru_cache(maxsize=4096)
def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The .npy magic and header numpy writes (np.save) for a C-ordered array."""
    stream = io.BytesIO()
    npy_format.write_array_header_1_0(
        stream, {"descr": npy_format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    )
    return stream.getvalue()


def _parsed_npy(name: str, data: bytes, dtype: np.dtype, shape: tuple[int, ...]) -> tuple[memoryview, bool]:
    """The data after a parsed .npy header that declares `dtype` and `shape`, and its order."""
    stream = io.BytesIO(data)
    try:
        version = npy_format.read_magic(stream)
        read_header = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
        declared, fortran_order, declared_dtype = read_header(stream, max_header_size=NPY_HEADER_LIMIT)
    except Exception as err:  # numpy raises several types on malformed headers
        raise CodecError(f"layer '{name}': unreadable numpy header ({err})") from err
    if declared_dtype != dtype:
        raise CodecError(f"layer '{name}': payload dtype {declared_dtype} differs from the declared '{dtype}'")
    if tuple(declared) != shape:
        raise CodecError(f"layer '{name}': payload shape {tuple(declared)}, expected {shape}")
    return memoryview(data)[stream.tell() :], bool(fortran_order)


def _decode_mask(name: str, array: Array, shape: tuple[int, ...], held: HeldMask | None) -> torch.Tensor:
    if tuple(array.shape) != shape:
        raise CodecError(f"layer '{name}': mask shape {tuple(array.shape)}, expected {shape}")
    try:
        bits = decode_mask(array, math.prod(shape), *_held_layer(held, name))
    except MaskCodingError as err:
        raise CodecError(f"layer '{name}': {err}") from err
    return torch.from_numpy(bits).view(shape)


def _held_layer(held: HeldMask | None, name: str) -> tuple[np.ndarray | None, int, np.ndarray | None]:
    """The flat mask of layer `name` the receiver holds (None: none held), its version and
    its active positions (cached on the mask)."""
    if held is None or name not in held.masks:
        return None, 0, None
    mask = held.masks[name]
    return mask.flatten().numpy(), held.version, positions(mask)


def _decode_values(name: str, array: Array, shape: tuple[int, ...], mask: torch.Tensor) -> np.ndarray:
    if array.stype != VALUES_STYPE:
        raise CodecError(f"layer '{name}': sparse values expected stype '{VALUES_STYPE}', got '{array.stype}'")
    if array.dtype not in VALUE_DTYPES:
        raise CodecError(f"layer '{name}': value dtype '{array.dtype}' not in {sorted(VALUE_DTYPES)}")
    if tuple(array.shape) != shape:
        raise CodecError(f"layer '{name}': shape {tuple(array.shape)}, expected {shape}")
    dtype = VALUE_DTYPES[array.dtype]
    if len(array.data) % dtype.itemsize:
        raise CodecError(f"layer '{name}': {len(array.data)} value bytes is not a multiple of {dtype.itemsize}")
    active = len(positions(mask))
    if len(array.data) // dtype.itemsize != active:
        raise CodecError(
            f"layer '{name}': {len(array.data) // dtype.itemsize} values but the mask has {active} active weights"
        )
    values = np.frombuffer(array.data, dtype=dtype)
    _check_finite(name, values)
    return values


def _check_finite(name: str, values: np.ndarray) -> None:
    """A float is finite unless its exponent bits are all set: one integer pass."""
    if values.dtype.kind != "f" or not values.size:
        return
    exponent = FLOAT_EXPONENTS[values.dtype.itemsize]
    if (values.view(values.dtype.str.replace("f", "u")) & exponent).max() == exponent:
        raise CodecError(f"layer '{name}': values contain NaN or Inf")


def masks_to_record(masks: Masks) -> ArrayRecord:
    """Pack masks into bitmask Arrays (to keep them in a node's Context state); unpacking
    them again (`masks_from_record`) gives back these very tensors while they are unchanged."""
    record = ArrayRecord()
    for name, mask in masks.items():
        record[name] = _pack_mask(mask)
        if mask.device.type == "cpu":
            _keep_unpacked(name, record[name], mask)
    return record


def masks_from_record(record: ArrayRecord, shapes: Shapes) -> Masks:
    """Inverse of masks_to_record, validated against the layer shapes."""
    if set(record) != set(shapes):
        raise CodecError(f"stored masks cover {sorted(record)}, expected {sorted(shapes)}")
    wrong = sorted(name for name, array in record.items() if array.stype != BITMASK_STYPE)
    if wrong:
        raise CodecError(f"stored masks {wrong} are not plain bitmasks")
    return {name: _stored_layer(name, record[name], shape) for name, shape in shapes.items()}


# layer -> the last stored mask unpacked: (its bits, shape, tensor, the tensor's version counter)
_STORED: dict[str, tuple[bytes, tuple[int, ...], torch.Tensor, int]] = {}


def _stored_layer(name: str, array: Array, shape: tuple[int, ...]) -> torch.Tensor:
    """A stored layer's mask, unpacked once: a node holds the same mask round after round,
    so the tensor (and the positions cached on it) is reused while the stored bits and the
    shape are the same and the tensor has not been changed in place since."""
    cached = _STORED.get(name)
    if cached is not None:
        bits, cached_shape, mask, version = cached
        if cached_shape == shape == tuple(array.shape) and mask._version == version and bits == array.data:
            return mask
    mask = _decode_mask(name, array, shape, None)
    _keep_unpacked(name, array, mask)
    return mask


def _keep_unpacked(name: str, array: Array, mask: torch.Tensor) -> None:
    """Remember `mask` as the unpacked stored bitmask `array` of layer `name`."""
    _STORED[name] = (bytes(array.data), tuple(mask.shape), mask, mask._version)
