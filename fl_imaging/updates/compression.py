"""Update compression: codecs for a site's model update (local - global weights).

Pure NumPy, free of Flower. A site encodes the difference between the weights it
trained and the global weights it received; the server decodes it against the same
global weights back into full weights. The encoded form is a few named flat arrays
plus a small header of scalars, so it travels as a Flower ``ArrayRecord`` +
``ConfigRecord`` and the bytes that travel really shrink (n float entries in all):

| codec | arrays | bytes / float32 bytes |
| --- | --- | --- |
| ``none`` | ``delta``: the deltas (float32 for float32 models) | 1 |
| ``fp16`` | ``fp16``: the deltas as float16 | 1/2 |
| ``int8`` | ``int8`` codes + ``scale``: float32 per block (or per tensor) | ~1/4 + 1/block |
| ``topk`` | ``index`` int32 + ``value`` float32 of each tensor's largest ``ceil(k n_t)`` | ~2k |

The float tensors are packed one after another in sorted name order (each tensor
keeps its own int8 blocks and top-k selection), so a model of 50 tensors travels as
two arrays, not 100: Flower's per-array overhead (a header and object ids, ~0.4 kB)
would otherwise add ~1% of the float32 size to an int8 update. Tensors that are not
floating point (e.g. int64 counters) travel as ``<name>::raw``, the site's own value,
unchanged. With error feedback the site keeps what was not sent (the residual) and
adds it to its next update, so nothing is lost for good, only delayed.
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
# separates a pass-through tensor's name from its part: "<name>::raw"
PART_SEP = "::"
_INT8_MAX = 127


class CompressionError(ValueError):
    """A codec setting or an encoded update is invalid; the message says which."""


class Part(StrEnum):
    """The arrays of an encoded update (float parts hold every float tensor, packed)."""

    DELTA = "delta"  # none: the deltas themselves
    FP16 = "fp16"  # fp16: the deltas as float16
    INT8 = "int8"  # int8: codes
    SCALE = "scale"  # int8: float32 scale per block (one per tensor for per-tensor scales)
    INDEX = "index"  # topk: int32 indices into each tensor (flattened), ascending per tensor
    VALUE = "value"  # topk: float32 values at those indices
    RAW = "raw"  # non-float tensor "<name>::raw": the site's own value, not a delta


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
        try:
            block_size = int(header[CodecKey.BLOCK_SIZE])  # type: ignore[call-overload]
            fraction = float(header[CodecKey.TOPK_FRACTION])  # type: ignore[arg-type]
        except (TypeError, ValueError) as exc:
            raise CompressionError(f"codec header has a non-numeric value: {exc}") from exc
        return cls(
            name=str(header[CodecKey.NAME]),
            scales=str(header[CodecKey.SCALES]),
            block_size=block_size,
            topk_fraction=fraction,
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
    """An encoded update: the codec and its named arrays (packed parts, ``<name>::raw``)."""

    codec: Codec
    arrays: dict[str, np.ndarray]

    @property
    def nbytes(self) -> int:
        """Bytes of the array payloads (without any container overhead)."""
        return sum(a.nbytes for a in self.arrays.values())


def raw_key(tensor: str) -> str:
    """Name of a pass-through (non-float) tensor in an encoded update."""
    return f"{tensor}{PART_SEP}{Part.RAW.value}"


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
    """One tensor's flat parts (float32 codecs compute in float32)."""
    if codec.name == "none":
        return {Part.DELTA: delta.ravel()}
    if codec.name == "fp16":
        with np.errstate(over="ignore"):  # beyond float16's range becomes inf: screened out
            return {Part.FP16: delta.ravel().astype(np.float16)}
    if codec.name == "int8":
        codes, scales = quantize_int8(delta, _block(codec))
        return {Part.INT8: codes, Part.SCALE: scales}
    indices, kept = sparsify_topk(delta, codec.topk_fraction)
    return {Part.INDEX: indices, Part.VALUE: kept}


def _block(codec: Codec) -> int | None:
    return None if codec.scales == "per_tensor" else codec.block_size


def _part_sizes(size: int, codec: Codec) -> dict[Part, int]:
    """Entries each part holds for one tensor of ``size`` entries."""
    if codec.name == "none":
        return {Part.DELTA: size}
    if codec.name == "fp16":
        return {Part.FP16: size}
    if codec.name == "int8":
        block = _block(codec) or max(size, 1)
        return {Part.INT8: size, Part.SCALE: -(-size // block)}
    count = topk_count(size, codec.topk_fraction)
    return {Part.INDEX: count, Part.VALUE: count}


def _decode_tensor(parts: Mapping[Part, np.ndarray], codec: Codec, size: int) -> np.ndarray:
    """One tensor's flat delta from its parts."""
    if codec.name == "none":
        return parts[Part.DELTA]
    if codec.name == "fp16":
        return parts[Part.FP16]
    if codec.name == "int8":
        return dequantize_int8(parts[Part.INT8], parts[Part.SCALE], _block(codec))
    return densify_topk(parts[Part.INDEX], parts[Part.VALUE], size)


# dtype of each packed part (DELTA: the model's float type, see _delta_dtype)
_PART_DTYPES = {
    Part.FP16: np.float16,
    Part.INT8: np.int8,
    Part.SCALE: np.float32,
    Part.INDEX: np.int32,
    Part.VALUE: np.float32,
}


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


def _float_names(reference: Mapping[str, np.ndarray]) -> list[str]:
    """The float tensors in packing order (sorted: independent of dict order)."""
    return sorted(n for n, a in reference.items() if is_compressible(np.asarray(a)))


def _delta_dtype(reference: Mapping[str, np.ndarray], codec: Codec) -> np.dtype:
    """Dtype deltas are computed in: the models' float type for ``none``, else float32."""
    floats = [np.asarray(reference[n]).dtype for n in _float_names(reference)]
    if codec.name == "none" and floats:
        return np.result_type(*floats)
    return np.dtype(np.float32)


def encode_update(
    local: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    codec: Codec,
    residual: Mapping[str, np.ndarray] | None = None,
) -> tuple[EncodedUpdate, dict[str, np.ndarray] | None]:
    """Encode ``local - reference`` per float tensor; pass other tensors through.

    Args:
        local: the site's trained weights (tensor name -> array).
        reference: the global weights the site received (same names and shapes).
        codec: how to encode the deltas.
        residual: error feedback: what earlier rounds did not send (float tensor name
            -> float32 array; an empty mapping starts it). It is added to this round's
            delta before encoding. None: no error feedback.

    Returns:
        ``(encoded, new_residual)``: the encoded update, and with error feedback the
        part of ``delta + residual`` that was not sent (None without error feedback).

    Raises:
        CompressionError: ``local`` and ``reference`` (or ``residual``) differ in
            tensor names or shapes.
    """
    _check_same_tensors(local, reference, "the local model")
    names = _float_names(reference)
    if residual:
        _check_same_tensors(residual, {n: reference[n] for n in names}, "the residual")
    dtype = _delta_dtype(reference, codec)
    packed: dict[Part, list[np.ndarray]] = {p: [] for p in _part_sizes(0, codec)}
    new_residual: dict[str, np.ndarray] | None = None if residual is None else {}
    for name in names:
        delta = np.asarray(local[name]).astype(dtype) - np.asarray(reference[name]).astype(dtype)
        if residual is not None and name in residual:
            delta = delta + np.asarray(residual[name]).astype(dtype)
        parts = _encode_tensor(delta, codec)
        for part, array in parts.items():
            packed[part].append(array)
        if new_residual is not None:
            sent = _decode_tensor(parts, codec, delta.size).reshape(delta.shape)
            new_residual[name] = (delta - sent).astype(np.float32)
    arrays: dict[str, np.ndarray] = {
        part.value: np.concatenate(chunks) if chunks else np.zeros(0, _PART_DTYPES.get(part, dtype))
        for part, chunks in packed.items()
    }
    for name, ref in reference.items():
        if not is_compressible(np.asarray(ref)):
            arrays[raw_key(name)] = np.array(local[name], dtype=np.asarray(ref).dtype)
    return EncodedUpdate(codec, arrays), new_residual


def decode_delta(
    encoded: EncodedUpdate, reference: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Per-tensor deltas of an encoded update (non-float tensors: the site's own value).

    Each result has the shape and dtype of the ``reference`` tensor of the same name.

    Raises:
        CompressionError: the encoded arrays do not fit ``reference`` and the codec
            (missing or unexpected arrays, wrong sizes or dtypes, out-of-range indices).
    """
    codec = encoded.codec
    names = _float_names(reference)
    sizes = {n: int(np.asarray(reference[n]).size) for n in names}
    expected = {p.value for p in _part_sizes(0, codec)}
    expected |= {raw_key(n) for n in reference if n not in sizes}
    missing, extra = sorted(expected - set(encoded.arrays)), sorted(set(encoded.arrays) - expected)
    if missing or extra:
        raise CompressionError(
            f"encoded update ({codec.name}) does not match the global model: missing "
            f"{missing[:5]}, unexpected {extra[:5]}"
        )
    totals: dict[Part, int] = dict.fromkeys(_part_sizes(0, codec), 0)
    for size in sizes.values():
        for part, count in _part_sizes(size, codec).items():
            totals[part] += count
    packed = {}
    for part, total in totals.items():
        array = np.asarray(encoded.arrays[part.value]).ravel()
        dtype = np.dtype(_PART_DTYPES.get(part, _delta_dtype(reference, codec)))
        if array.size != total or array.dtype != dtype:
            raise CompressionError(
                f"encoded update ({codec.name}): {part.value!r} holds {array.size} "
                f"{array.dtype} entries; the global model needs {total} {dtype.name}"
            )
        packed[part] = array
    out: dict[str, np.ndarray] = {}
    offsets = dict.fromkeys(totals, 0)
    for name in names:
        ref = np.asarray(reference[name])
        parts = {}
        for part, count in _part_sizes(sizes[name], codec).items():
            parts[part] = packed[part][offsets[part] : offsets[part] + count]
            offsets[part] += count
        try:
            delta = _decode_tensor(parts, codec, sizes[name])
        except CompressionError as exc:
            raise CompressionError(f"tensor {name!r} ({codec.name}): {exc}") from exc
        out[name] = np.asarray(delta).reshape(ref.shape).astype(ref.dtype, copy=False)
    for name, ref in reference.items():
        if name in sizes:
            continue
        raw = np.asarray(encoded.arrays[raw_key(name)])
        ref = np.asarray(ref)
        if raw.shape != ref.shape:
            raise CompressionError(
                f"tensor {name!r} (passed through): shape {raw.shape}, expected {ref.shape}"
            )
        out[name] = raw.astype(ref.dtype, copy=False)
    return {name: out[name] for name in reference}


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
