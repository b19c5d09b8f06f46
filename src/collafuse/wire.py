"""Binary tensors on the wire: safetensors payloads, checked on the way in.

Every tensor payload between the services (disclosures ``x_tc``, sample requests and
hand-offs, model weights) is one safetensors blob: a little-endian ``u64`` header length,
a JSON header naming each tensor's dtype, shape and byte range, then the raw data. String
metadata (site id, config hash, step...) travels in the header's ``__metadata__``.

The receiver calls :func:`decode_tensors`, which refuses, with a :class:`WireError` naming
the problem, anything over the size limit (before parsing), corrupt bytes, missing or
unexpected keys, a dtype or shape outside the expected :class:`TensorSpec`, and NaN/Inf.
Float tensors sent as fp16 come back as float32.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

__all__ = [
    "DEFAULT_DTYPES",
    "MAX_BODY_BYTES",
    "PayloadTooLarge",
    "TensorSpec",
    "WireError",
    "canonical",
    "content_hash",
    "decode_tensors",
    "encode_tensors",
    "max_payload_bytes",
]

MAX_BODY_BYTES = 64 * 1024 * 1024
"""Default bound on one request body (64 MiB)."""

DEFAULT_DTYPES: tuple[str, ...] = ("float32", "float16")
"""Dtypes a float tensor may travel as: full precision or the fp16 wire option."""

_HEADER_LEN_BYTES = 8
_METADATA_KEY = "__metadata__"
_UPCAST = (torch.float16, torch.bfloat16)


class WireError(ValueError):
    """A tensor payload was refused; the message names the key and the problem."""


class PayloadTooLarge(WireError):
    """A payload over its size bound (HTTP 413, not 422)."""


@dataclass(frozen=True)
class TensorSpec:
    """What one tensor in a payload must look like.

    ``shape`` lists each dimension; ``None`` leaves that dimension free (typically the batch
    dimension: ``(None, 1, 28, 28)``). ``dtypes`` are torch dtype names without the
    ``torch.`` prefix (``"float32"``, ``"float16"``, ``"int64"``) as *sent* on the wire.
    """

    shape: tuple[int | None, ...]
    dtypes: tuple[str, ...] = DEFAULT_DTYPES

    def __post_init__(self) -> None:
        for dim in self.shape:
            if dim is not None and (not isinstance(dim, int) or dim < 0):
                raise ValueError(f"TensorSpec shape {self.shape}: dims must be ints >= 0 or None")
        if not self.dtypes:
            raise ValueError("TensorSpec dtypes must name at least one dtype")

    def matches_shape(self, shape: Sequence[int]) -> bool:
        """True when ``shape`` has the spec's rank and every fixed dimension agrees."""
        if len(shape) != len(self.shape):
            return False
        return all(want is None or want == got for want, got in zip(self.shape, shape, strict=True))


def content_hash(data: bytes) -> str:
    """SHA-256 hex digest of a payload: the idempotency key for uploads."""
    return hashlib.sha256(data).hexdigest()


def max_payload_bytes(
    n_items: int,
    item_shape: Sequence[int],
    *,
    bytes_per_value: int = 4,
    extra_per_item: int = 64,
    header_bytes: int = 16 * 1024,
) -> int:
    """Upper bound on a payload carrying ``n_items`` tensors of ``item_shape``.

    ``bytes_per_value`` is 4 for float32 (2 for fp16). ``extra_per_item`` leaves room for
    small per-item tensors (an int64 label and timestep take 16 bytes); ``header_bytes`` for
    the JSON header and metadata.
    """
    if n_items < 0:
        raise ValueError(f"n_items must be >= 0, got {n_items}")
    if any(d < 0 for d in item_shape):
        raise ValueError(f"item_shape must have dims >= 0, got {tuple(item_shape)}")
    per_item = math.prod(item_shape) * bytes_per_value + extra_per_item
    return n_items * per_item + header_bytes


def encode_tensors(
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    fp16: bool = False,
) -> bytes:
    """Serialise named tensors (and string metadata) into one safetensors payload.

    With ``fp16=True`` float32/float64 tensors travel as float16 (half the bytes); integer
    tensors are sent unchanged. Refuses non-finite values, and values that overflow fp16.
    """
    _check_metadata(metadata)
    prepared: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        prepared[key] = _prepare(key, tensor, fp16)
    return canonical(bytes(_st_save(prepared, metadata=dict(metadata) if metadata else None)))


def canonical(blob: bytes) -> bytes:
    """``blob`` with its JSON header's keys sorted: safetensors writes the metadata in hash-map
    order, which differs between calls, so equal tensors and metadata would otherwise give
    different bytes (and content hashes). The data section is unchanged."""
    size = int.from_bytes(blob[:_HEADER_LEN_BYTES], "little")
    header = json.loads(blob[_HEADER_LEN_BYTES : _HEADER_LEN_BYTES + size])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-(_HEADER_LEN_BYTES + len(text)) % 8)  # keep the data 8-byte aligned
    return len(text).to_bytes(_HEADER_LEN_BYTES, "little") + text + blob[_HEADER_LEN_BYTES + size :]


def decode_tensors(
    data: bytes,
    *,
    max_bytes: int,
    expect: Mapping[str, TensorSpec] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Parse and check a payload; return ``(tensors, metadata)``.

    Checks, in order: size (before any parsing), well-formed safetensors, the key set equals
    ``expect``'s, each tensor's dtype and shape against its spec, finiteness of float
    tensors. fp16/bf16 tensors are returned as float32. Raises :class:`WireError`.
    """
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"payload is {len(data)} bytes, over the limit of {max_bytes} bytes")
    metadata = _read_metadata(data)
    try:
        tensors = _st_load(bytes(data))
    except Exception as exc:  # safetensors raises its own SafetensorError (and others)
        raise WireError(f"corrupt payload: {exc}") from exc
    if expect is not None:
        _check_keys(tensors.keys(), expect.keys())
        for key, spec in expect.items():
            _check_spec(key, tensors[key], spec)
    for key, tensor in tensors.items():
        _check_finite(key, tensor)
    return {key: _upcast(t) for key, t in tensors.items()}, metadata


def _prepare(key: str, tensor: torch.Tensor, fp16: bool) -> torch.Tensor:
    """Detach, move to CPU, check and (optionally) halve one tensor for sending."""
    if not isinstance(key, str) or not key or key == _METADATA_KEY:
        raise WireError(f"tensor key {key!r} is not allowed (must be a non-empty string)")
    if not isinstance(tensor, torch.Tensor):
        raise WireError(f"tensor {key!r} is a {type(tensor).__name__}, not a torch.Tensor")
    out = tensor.detach().to("cpu")
    _check_finite(key, out)
    if fp16 and out.dtype in (torch.float32, torch.float64):
        out = out.to(torch.float16)
        if not bool(torch.isfinite(out).all()):
            raise WireError(f"tensor {key!r} overflows float16 (|x| > 65504); send it as fp32")
    # A private contiguous copy: safetensors refuses views and tensors sharing storage.
    return out.contiguous().clone()


def _check_metadata(metadata: Mapping[str, str] | None) -> None:
    """Safetensors metadata is a flat str -> str mapping."""
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise WireError(f"metadata entry {key!r}: keys and values must be strings")


def _read_metadata(data: bytes) -> dict[str, str]:
    """Read ``__metadata__`` from the safetensors JSON header, checking its framing."""
    if len(data) < _HEADER_LEN_BYTES:
        raise WireError(f"corrupt payload: {len(data)} bytes is too short for a header")
    (header_len,) = struct.unpack("<Q", data[:_HEADER_LEN_BYTES])
    if header_len > len(data) - _HEADER_LEN_BYTES:
        raise WireError(f"corrupt payload: header length {header_len} exceeds the payload")
    try:
        header = json.loads(data[_HEADER_LEN_BYTES : _HEADER_LEN_BYTES + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireError(f"corrupt payload: header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise WireError("corrupt payload: header is not a JSON object")
    metadata = header.get(_METADATA_KEY) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise WireError("corrupt payload: metadata is not a string-to-string mapping")
    return dict(metadata)


def _check_keys(got: Iterable[str], want: Iterable[str]) -> None:
    """The payload's tensor names must be exactly the expected ones."""
    got_set, want_set = set(got), set(want)
    missing, extra = sorted(want_set - got_set), sorted(got_set - want_set)
    if missing:
        raise WireError(f"payload is missing tensor(s) {missing}")
    if extra:
        raise WireError(f"payload has unexpected tensor(s) {extra}")


def _check_spec(key: str, tensor: torch.Tensor, spec: TensorSpec) -> None:
    """Dtype (as sent) and shape of one tensor against its spec."""
    dtype = str(tensor.dtype).removeprefix("torch.")
    if dtype not in spec.dtypes:
        raise WireError(f"tensor {key!r} has dtype {dtype}, expected one of {list(spec.dtypes)}")
    if not spec.matches_shape(tensor.shape):
        raise WireError(
            f"tensor {key!r} has shape {tuple(tensor.shape)}, expected {spec.shape} "
            "(None = any size)"
        )


def _check_finite(key: str, tensor: torch.Tensor) -> None:
    """Float tensors must hold no NaN and no +/-Inf."""
    if not tensor.is_floating_point():
        return
    n_nan = int(torch.isnan(tensor).sum())
    n_inf = int(torch.isinf(tensor).sum())
    if n_nan or n_inf:
        raise WireError(f"tensor {key!r} has non-finite values ({n_nan} NaN, {n_inf} Inf)")


def _upcast(tensor: torch.Tensor) -> torch.Tensor:
    """Half-precision floats come back as float32; everything else unchanged."""
    return tensor.to(torch.float32) if tensor.dtype in _UPCAST else tensor
