"""Update compression: codecs for a site's model update (local - global weights).

Pure NumPy, free of Flower. A site encodes the difference between the weights it
trained and the global weights it received; the server decodes it against the same
global weights back into full weights. The encoded form is a flat mapping of named
arrays (``"<tensor>::<part>"``) plus a small header of scalars, so it travels as a
Flower ``ArrayRecord`` + ``ConfigRecord`` and the bytes that travel really shrink:

| codec | per float tensor of n elements | bytes / float32 bytes |
| --- | --- | --- |
| ``none`` | the delta in the tensor's own dtype | 1 |
| ``fp16`` | the delta as float16 | 1/2 |
| ``int8`` | int8 codes + one float32 scale per block (or per tensor) | ~1/4 + 1/block |
| ``topk`` | int32 indices + float32 values of the largest ``ceil(k n)`` entries | ~2k |

Tensors that are not floating point (e.g. int64 counters) travel as the site's own
value, unchanged. With error feedback the site keeps what was not sent (the residual)
and adds it to its next update, so nothing is lost for good, only delayed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

import numpy as np

from fl_imaging.protocol import CodecKey

CODECS = ("none", "fp16", "int8", "topk")
SCALES = ("per_tensor", "blockwise")
# separates a tensor's name from the part of its encoding in an encoded update
PART_SEP = "::"
_INT8_MAX = 127


class CompressionError(ValueError):
    """A codec setting or an encoded update is invalid; the message says which."""


class Part(StrEnum):
    """The arrays an encoded tensor consists of (suffixes after :data:`PART_SEP`)."""

    DELTA = "delta"  # none: the delta itself
    FP16 = "fp16"  # fp16: the delta as float16
    INT8 = "int8"  # int8: codes, flat
    SCALE = "scale"  # int8: float32 scale per block (one for per-tensor scales)
    INDEX = "index"  # topk: int32 flat indices, ascending
    VALUE = "value"  # topk: float32 values at those indices
    RAW = "raw"  # non-float tensor: the site's own value, not a delta


# parts of a float tensor per codec
_FLOAT_PARTS: dict[str, tuple[Part, ...]] = {
    "none": (Part.DELTA,),
    "fp16": (Part.FP16,),
    "int8": (Part.INT8, Part.SCALE),
    "topk": (Part.INDEX, Part.VALUE),
}


@dataclass(frozen=True)
class Codec:
    """A codec and its parameters (validated on creation).

    Args:
        name: ``none``, ``fp16``, ``int8`` or ``topk``.
        scales: int8 only: ``blockwise`` (one scale per ``block_size`` elements) or
            ``per_tensor`` (one scale per tensor).
        block_size: int8 blockwise only: elements per scale (>= 1).
        topk_fraction: topk only: fraction of each tensor's entries sent, in (0, 1].

    Raises:
        CompressionError: an unknown codec or scale mode, ``block_size < 1``, or
            ``topk_fraction`` outside (0, 1]. The message names the parameter.
    """

    name: str = "none"
    scales: str = "blockwise"
    block_size: int = 256
    topk_fraction: float = 0.1

    def __post_init__(self) -> None:
        if self.name not in CODECS:
            raise CompressionError(f"codec {self.name!r} is unknown; choose one of {CODECS}")
        if self.scales not in SCALES:
            raise CompressionError(f"scales {self.scales!r} is unknown; choose one of {SCALES}")
        if isinstance(self.block_size, bool) or int(self.block_size) != self.block_size:
            raise CompressionError(f"block_size must be an integer, got {self.block_size!r}")
        if self.block_size < 1:
            raise CompressionError(f"block_size must be >= 1, got {self.block_size}")
        if not (0.0 < self.topk_fraction <= 1.0):
            raise CompressionError(f"topk_fraction must be in (0, 1], got {self.topk_fraction}")

    def header(self) -> dict[str, str | int | float]:
        """The scalars a decoder needs (what travels beside the arrays)."""
        return {
            CodecKey.NAME: self.name,
            CodecKey.SCALES: self.scales,
            CodecKey.BLOCK_SIZE: int(self.block_size),
            CodecKey.TOPK_FRACTION: float(self.topk_fraction),
        }

    @classmethod
    def from_header(cls, header: Mapping[str, object]) -> Codec:
        """The codec a :meth:`header` describes.

        Raises:
            CompressionError: a key is missing or a value is invalid.
        """
        missing = [k.value for k in CodecKey if k not in header]
        if missing:
            raise CompressionError(f"codec header lacks {missing}; got keys {sorted(header)}")
        return cls(
            name=str(header[CodecKey.NAME]),
            scales=str(header[CodecKey.SCALES]),
            block_size=int(header[CodecKey.BLOCK_SIZE]),  # type: ignore[call-overload]
            topk_fraction=float(header[CodecKey.TOPK_FRACTION]),  # type: ignore[arg-type]
        )


class CodecSettings(Protocol):
    """What :func:`codec_of` reads (``fl_imaging.config.CompressionConfig`` has it)."""

    codec: str
    scales: str
    block_size: int
    topk_fraction: float


def codec_of(settings: CodecSettings) -> Codec:
    """The validated :class:`Codec` of a compression config section."""
    return Codec(
        name=settings.codec,
        scales=settings.scales,
        block_size=settings.block_size,
        topk_fraction=settings.topk_fraction,
    )


@dataclass(frozen=True)
class EncodedUpdate:
    """An encoded update: the codec and its named arrays (``"<tensor>::<part>"``)."""

    codec: Codec
    arrays: dict[str, np.ndarray]

    @property
    def nbytes(self) -> int:
        """Bytes of the array payloads (without any container overhead)."""
        return sum(a.nbytes for a in self.arrays.values())


def part_key(tensor: str, part: Part) -> str:
    """Name of ``tensor``'s ``part`` in an encoded update."""
    return f"{tensor}{PART_SEP}{part.value}"


def is_compressible(array: np.ndarray) -> bool:
    """True for floating-point tensors (they travel as deltas); others pass through."""
    return np.issubdtype(array.dtype, np.floating)


# ---------------------------------------------------------------- per-tensor codecs


def quantize_int8(values: np.ndarray, block_size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 quantisation with one scale per block.

    Args:
        values: float array of any shape (flattened here).
        block_size: elements per scale; None: one scale for the whole array.

    Returns:
        ``(codes, scales)``: int8 codes of shape ``(n,)`` in [-127, 127] and float32
        scales of shape ``(ceil(n / block),)`` with ``value ~= code * scale`` and
        ``|value - code * scale| <= scale / 2``. A block of zeros has scale 0. Non-finite
        values make their block's scale non-finite, so they stay non-finite when decoded.
    """
    flat = np.asarray(values, dtype=np.float32).ravel()
    n = flat.size
    block = n if block_size is None else int(block_size)
    if n == 0:
        return np.zeros(0, np.int8), np.zeros(0, np.float32)
    blocks = -(-n // block)
    padded = np.zeros(blocks * block, np.float32)
    padded[:n] = flat
    padded = padded.reshape(blocks, block)
    with np.errstate(invalid="ignore"):
        scales = (np.max(np.abs(padded), axis=1) / _INT8_MAX).astype(np.float32)
        divisor = np.where((scales > 0) & np.isfinite(scales), scales, np.float32(1.0))
        scaled = np.nan_to_num(padded / divisor[:, None], nan=0.0, posinf=0.0, neginf=0.0)
    codes = np.clip(np.rint(scaled), -_INT8_MAX, _INT8_MAX).astype(np.int8).ravel()[:n]
    return codes, scales


def dequantize_int8(codes: np.ndarray, scales: np.ndarray, block_size: int | None) -> np.ndarray:
    """Float32 values ``codes * scale`` of shape ``(n,)``; the inverse of :func:`quantize_int8`.

    Raises:
        CompressionError: the number of scales does not fit ``n`` and ``block_size``.
    """
    codes = np.asarray(codes).ravel()
    scales = np.asarray(scales, dtype=np.float32).ravel()
    n = codes.size
    block = max(n, 1) if block_size is None else int(block_size)
    blocks = -(-n // block)
    if codes.dtype != np.int8:
        raise CompressionError(f"int8 codes must have dtype int8, got {codes.dtype}")
    if scales.size != blocks:
        raise CompressionError(
            f"{n} int8 codes in blocks of {block} need {blocks} scales, got {scales.size}"
        )
    if n == 0:
        return np.zeros(0, np.float32)
    padded = np.zeros(blocks * block, np.float32)
    padded[:n] = codes
    return (padded.reshape(blocks, block) * scales[:, None]).ravel()[:n]


def topk_count(size: int, fraction: float) -> int:
    """How many of ``size`` entries top-k keeps: ``ceil(fraction * size)``, at least 1."""
    return min(size, max(1, math.ceil(fraction * size))) if size else 0


def sparsify_topk(values: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """The ``ceil(fraction * n)`` entries of largest magnitude.

    Returns:
        ``(indices, kept)``: int32 flat indices (ascending) and the float32 values there,
        exactly as in ``values``.
    """
    flat = np.asarray(values, dtype=np.float32).ravel()
    if flat.size > np.iinfo(np.int32).max:
        raise CompressionError(f"top-k indices are int32: {flat.size} entries are too many")
    count = topk_count(flat.size, fraction)
    if count == flat.size:
        indices = np.arange(flat.size, dtype=np.int32)
    else:
        indices = np.sort(np.argpartition(np.abs(flat), flat.size - count)[flat.size - count :])
    indices = indices.astype(np.int32)
    return indices, flat[indices]


def densify_topk(indices: np.ndarray, kept: np.ndarray, size: int) -> np.ndarray:
    """Float32 array of ``size`` zeros with ``kept`` at ``indices``; inverse of sparsify.

    Raises:
        CompressionError: indices and values differ in length, or an index is out of range.
    """
    indices = np.asarray(indices).ravel()
    kept = np.asarray(kept, dtype=np.float32).ravel()
    if indices.size != kept.size:
        raise CompressionError(f"{indices.size} top-k indices but {kept.size} values")
    if not np.issubdtype(indices.dtype, np.integer):
        raise CompressionError(f"top-k indices must be integers, got {indices.dtype}")
    if indices.size and (indices.min() < 0 or indices.max() >= size):
        raise CompressionError(f"top-k index out of range [0, {size})")
    dense = np.zeros(size, np.float32)
    dense[indices] = kept
    return dense


def _encode_tensor(delta: np.ndarray, codec: Codec) -> dict[Part, np.ndarray]:
    if codec.name == "none":
        return {Part.DELTA: np.ascontiguousarray(delta)}
    if codec.name == "fp16":
        with np.errstate(over="ignore"):  # beyond float16's range becomes inf: screened out
            return {Part.FP16: delta.astype(np.float16)}
    if codec.name == "int8":
        block = None if codec.scales == "per_tensor" else codec.block_size
        codes, scales = quantize_int8(delta, block)
        return {Part.INT8: codes, Part.SCALE: scales}
    indices, kept = sparsify_topk(delta, codec.topk_fraction)
    return {Part.INDEX: indices, Part.VALUE: kept}


def _decode_tensor(
    name: str, parts: Mapping[Part, np.ndarray], codec: Codec, like: np.ndarray
) -> np.ndarray:
    """The delta of tensor ``name`` with ``like``'s shape and dtype."""
    try:
        if codec.name == "none":
            delta = parts[Part.DELTA]
            if delta.size != like.size:
                raise CompressionError(f"{delta.size} values for {like.size} entries")
        elif codec.name == "fp16":
            delta = parts[Part.FP16]
            if delta.dtype != np.float16 or delta.size != like.size:
                raise CompressionError(
                    f"expected {like.size} float16 values, got {delta.size} {delta.dtype}"
                )
        elif codec.name == "int8":
            codes = parts[Part.INT8]
            if codes.size != like.size:
                raise CompressionError(f"{codes.size} int8 codes for {like.size} entries")
            block = None if codec.scales == "per_tensor" else codec.block_size
            delta = dequantize_int8(codes, parts[Part.SCALE], block)
        else:
            indices = parts[Part.INDEX]
            expected = topk_count(like.size, codec.topk_fraction)
            if indices.size != expected:
                raise CompressionError(f"{indices.size} top-k entries, expected {expected}")
            delta = densify_topk(indices, parts[Part.VALUE], like.size)
    except CompressionError as exc:
        raise CompressionError(f"tensor {name!r} ({codec.name}): {exc}") from exc
    return np.asarray(delta).reshape(like.shape).astype(like.dtype, copy=False)


# ---------------------------------------------------------------- whole updates


def _check_same_tensors(
    local: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], what: str
) -> None:
    missing, extra = sorted(set(reference) - set(local)), sorted(set(local) - set(reference))
    if missing or extra:
        raise CompressionError(
            f"{what} does not match the global model's tensors: missing {missing[:5]}, "
            f"unexpected {extra[:5]}"
        )
    for name, ref in reference.items():
        if np.shape(local[name]) != np.shape(ref):
            raise CompressionError(
                f"{what}: tensor {name!r} has shape {np.shape(local[name])}, the global "
                f"model's has {np.shape(ref)}"
            )


def encode_update(
    local: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    codec: Codec,
    residual: Mapping[str, np.ndarray] | None = None,
) -> tuple[EncodedUpdate, dict[str, np.ndarray] | None]:
    """Encode ``local - reference`` per tensor.

    Args:
        local: the site's trained weights (tensor name -> array).
        reference: the global weights the site received (same names and shapes).
        codec: how to encode each floating-point tensor's delta.
        residual: error feedback: what earlier rounds did not send (name -> float32
            array; an empty mapping starts it). It is added to this round's delta before
            encoding. None: no error feedback.

    Returns:
        ``(encoded, new_residual)``: the encoded update, and with error feedback the
        part of ``delta + residual`` that was not sent (None without error feedback).

    Raises:
        CompressionError: ``local`` and ``reference`` (or ``residual``) differ in
            tensor names or shapes.
    """
    _check_same_tensors(local, reference, "the local model")
    if residual:
        floats = {k: v for k, v in reference.items() if is_compressible(np.asarray(v))}
        _check_same_tensors(residual, floats, "the error-feedback residual")
    arrays: dict[str, np.ndarray] = {}
    new_residual: dict[str, np.ndarray] | None = None if residual is None else {}
    for name, ref in reference.items():
        ref = np.asarray(ref)
        value = np.asarray(local[name])
        if not is_compressible(ref):
            arrays[part_key(name, Part.RAW)] = np.array(value, dtype=ref.dtype)
            continue
        delta = value.astype(ref.dtype) - ref
        if residual is not None and name in residual:
            delta = delta + np.asarray(residual[name]).astype(ref.dtype, copy=False)
        parts = _encode_tensor(delta, codec)
        arrays.update({part_key(name, p): a for p, a in parts.items()})
        if new_residual is not None:
            sent = _decode_tensor(name, parts, codec, ref)
            new_residual[name] = (delta - sent).astype(np.float32)
    return EncodedUpdate(codec, arrays), new_residual


def decode_delta(
    encoded: EncodedUpdate, reference: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Per-tensor deltas of an encoded update (non-float tensors: the site's own value).

    Each result has the shape and dtype of the ``reference`` tensor of the same name.

    Raises:
        CompressionError: the encoded arrays do not fit ``reference`` and the codec
            (missing or unexpected tensors or parts, wrong sizes, out-of-range indices).
    """
    codec = encoded.codec
    by_tensor: dict[str, dict[Part, np.ndarray]] = {}
    unknown = []
    for key, array in encoded.arrays.items():
        name, sep, part = key.rpartition(PART_SEP)
        if not sep or part not in Part._value2member_map_:
            unknown.append(key)
            continue
        by_tensor.setdefault(name, {})[Part(part)] = np.asarray(array)
    missing, extra = [], list(unknown)
    for name, ref in reference.items():
        expected = _FLOAT_PARTS[codec.name] if is_compressible(np.asarray(ref)) else (Part.RAW,)
        got = by_tensor.get(name, {})
        missing += [part_key(name, p) for p in expected if p not in got]
        extra += [part_key(name, p) for p in got if p not in expected]
    extra += [part_key(n, p) for n, parts in by_tensor.items() if n not in reference for p in parts]
    if missing or extra:
        raise CompressionError(
            f"encoded update ({codec.name}) does not match the global model: missing "
            f"{sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}"
        )
    out = {}
    for name, ref in reference.items():
        ref = np.asarray(ref)
        parts = by_tensor[name]
        if is_compressible(ref):
            out[name] = _decode_tensor(name, parts, codec, ref)
            continue
        raw = parts[Part.RAW]
        if raw.shape != ref.shape:
            raise CompressionError(
                f"tensor {name!r} (passed through): shape {raw.shape}, expected {ref.shape}"
            )
        out[name] = raw.astype(ref.dtype, copy=False)
    return out


def decode_update(
    encoded: EncodedUpdate, reference: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The site's weights: ``reference + delta`` per float tensor, the sent value otherwise.

    With codec ``none`` this is the site's weights up to one float rounding of
    ``reference + (local - reference)``.

    Raises:
        CompressionError: as :func:`decode_delta`.
    """
    deltas = decode_delta(encoded, reference)
    out = {}
    for name, ref in reference.items():
        ref = np.asarray(ref)
        out[name] = (ref + deltas[name]).astype(ref.dtype) if is_compressible(ref) else deltas[name]
    return out
