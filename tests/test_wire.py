"""Tensors on the wire: round trips, and every refusal of decode_tensors."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save as st_save

from collafuse.wire import (
    MAX_BODY_BYTES,
    TensorSpec,
    WireError,
    content_hash,
    decode_tensors,
    encode_tensors,
    max_payload_bytes,
)

IMAGE_SPEC = TensorSpec(shape=(None, 1, 28, 28), dtypes=("float32", "float16"))
LABEL_SPEC = TensorSpec(shape=(None,), dtypes=("int64",))
EXPECT = {"x_tc": IMAGE_SPEC, "labels": LABEL_SPEC}


def _batch(n: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "x_tc": torch.randn(n, 1, 28, 28, generator=gen),
        "labels": torch.randint(0, 10, (n,), generator=gen),
    }


def _decode(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    return decode_tensors(data, max_bytes=MAX_BODY_BYTES, expect=EXPECT)


def test_round_trip_fp32_is_exact() -> None:
    batch = _batch()
    tensors, meta = _decode(encode_tensors(batch))
    assert meta == {}
    assert tensors["x_tc"].dtype == torch.float32
    assert torch.equal(tensors["x_tc"], batch["x_tc"])
    assert torch.equal(tensors["labels"], batch["labels"])


def test_round_trip_fp16_upcasts_and_halves_the_size() -> None:
    batch = _batch(n=8)
    full, half = encode_tensors(batch), encode_tensors(batch, fp16=True)
    assert len(half) < 0.6 * len(full)
    tensors, _ = _decode(half)
    assert tensors["x_tc"].dtype == torch.float32
    assert tensors["labels"].dtype == torch.int64  # integers are never halved
    assert torch.equal(tensors["labels"], batch["labels"])
    # fp16 has a 10-bit mantissa: relative error <= 2**-11 for normal values.
    err = (tensors["x_tc"] - batch["x_tc"]).abs()
    assert bool((err <= batch["x_tc"].abs() * 2**-11 + 2**-24).all())


def test_metadata_is_preserved() -> None:
    meta = {"site": "site-a", "config_sha256": "ab" * 32, "t_c": "600"}
    _, got = _decode(encode_tensors(_batch(), metadata=meta))
    assert got == meta


def test_decode_without_expect_returns_everything() -> None:
    tensors, _ = decode_tensors(encode_tensors({"w": torch.ones(2, 2)}), max_bytes=1024)
    assert set(tensors) == {"w"}


def test_non_contiguous_and_shared_tensors_encode() -> None:
    base = torch.arange(12.0).reshape(3, 4)
    tensors, _ = decode_tensors(
        encode_tensors({"a": base.t(), "b": base[:1]}), max_bytes=MAX_BODY_BYTES
    )
    assert torch.equal(tensors["a"], base.t())
    assert torch.equal(tensors["b"], base[:1])


def test_content_hash_is_stable_and_content_addressed() -> None:
    a1 = encode_tensors(_batch(seed=1), metadata={"site": "a"})
    a2 = encode_tensors(_batch(seed=1), metadata={"site": "a"})
    b = encode_tensors(_batch(seed=2), metadata={"site": "a"})
    assert a1 == a2
    assert content_hash(a1) == content_hash(a2)
    assert content_hash(a1) != content_hash(b)
    assert content_hash(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_oversize_is_refused_before_parsing() -> None:
    # Not even a valid header: only the size check can produce this message.
    with pytest.raises(WireError, match=r"1025 bytes, over the limit of 1024"):
        decode_tensors(b"\xff" * 1025, max_bytes=1024)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x01\x02",
        struct.pack("<Q", 10**12) + b"{}",  # header length beyond the payload
        struct.pack("<Q", 5) + b"nope!",  # header is not JSON
        struct.pack("<Q", 2) + b"[]",  # header is not an object
    ],
    ids=["empty", "short", "header-too-long", "not-json", "not-object"],
)
def test_corrupt_framing_is_refused(data: bytes) -> None:
    with pytest.raises(WireError, match="corrupt payload"):
        decode_tensors(data, max_bytes=MAX_BODY_BYTES)


def test_truncated_payload_is_refused() -> None:
    data = encode_tensors(_batch())
    with pytest.raises(WireError, match="corrupt payload"):
        decode_tensors(data[:-100], max_bytes=MAX_BODY_BYTES)


def test_wrong_offsets_are_refused() -> None:
    header = {"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 64]}}
    raw = json.dumps(header).encode()
    data = struct.pack("<Q", len(raw)) + raw + b"\0" * 16
    with pytest.raises(WireError, match="corrupt payload"):
        decode_tensors(data, max_bytes=MAX_BODY_BYTES)


def test_wrong_dtype_is_refused() -> None:
    batch = _batch()
    batch["x_tc"] = batch["x_tc"].double()
    with pytest.raises(WireError, match=r"'x_tc' has dtype float64"):
        _decode(encode_tensors(batch))
    batch = _batch()
    batch["labels"] = batch["labels"].float()
    with pytest.raises(WireError, match=r"'labels' has dtype float32"):
        _decode(encode_tensors(batch))


def test_fp16_refused_where_the_spec_does_not_allow_it() -> None:
    strict = {"x_tc": TensorSpec((None, 1, 28, 28), dtypes=("float32",)), "labels": LABEL_SPEC}
    with pytest.raises(WireError, match=r"dtype float16"):
        decode_tensors(encode_tensors(_batch(), fp16=True), max_bytes=MAX_BODY_BYTES, expect=strict)


@pytest.mark.parametrize("shape", [(3, 1, 28, 27), (3, 3, 28, 28), (3, 28, 28), (3, 1, 1, 28, 28)])
def test_wrong_shape_is_refused(shape: tuple[int, ...]) -> None:
    batch = _batch()
    batch["x_tc"] = torch.zeros(shape)
    with pytest.raises(WireError, match=r"'x_tc' has shape"):
        _decode(encode_tensors(batch))


def test_free_batch_dimension_accepts_any_batch() -> None:
    for n in (1, 5):
        tensors, _ = _decode(encode_tensors(_batch(n=n)))
        assert tensors["x_tc"].shape == (n, 1, 28, 28)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_refused_on_decode(bad: float) -> None:
    batch = _batch()
    batch["x_tc"][0, 0, 3, 4] = bad
    data = st_save(batch)  # bypass encode's own check: a hostile or buggy sender
    with pytest.raises(WireError, match=r"'x_tc' has non-finite values"):
        _decode(data)


def test_non_finite_and_fp16_overflow_are_refused_on_encode() -> None:
    with pytest.raises(WireError, match=r"'x' has non-finite values \(1 NaN, 0 Inf\)"):
        encode_tensors({"x": torch.tensor([1.0, float("nan")])})
    with pytest.raises(WireError, match=r"'x' overflows float16"):
        encode_tensors({"x": torch.tensor([1e6])}, fp16=True)


def test_missing_and_extra_keys_are_refused() -> None:
    batch = _batch()
    del batch["labels"]
    with pytest.raises(WireError, match=r"missing tensor\(s\) \['labels'\]"):
        _decode(encode_tensors(batch))
    batch = _batch()
    batch["secret"] = torch.zeros(1)
    with pytest.raises(WireError, match=r"unexpected tensor\(s\) \['secret'\]"):
        _decode(encode_tensors(batch))


def test_bad_inputs_to_encode_are_refused() -> None:
    with pytest.raises(WireError, match="metadata entry"):
        encode_tensors({"x": torch.zeros(1)}, metadata={"n": 3})  # type: ignore[dict-item]
    with pytest.raises(WireError, match=r"not a torch\.Tensor"):
        encode_tensors({"x": [1.0, 2.0]})  # type: ignore[dict-item]
    with pytest.raises(WireError, match="not allowed"):
        encode_tensors({"__metadata__": torch.zeros(1)})


def test_wire_error_is_a_value_error() -> None:
    assert issubclass(WireError, ValueError)


def test_tensor_spec_validates_itself() -> None:
    with pytest.raises(ValueError, match="dims must be"):
        TensorSpec(shape=(None, -1))
    with pytest.raises(ValueError, match="at least one dtype"):
        TensorSpec(shape=(1,), dtypes=())


def test_max_payload_bytes_bounds_a_real_payload() -> None:
    n = 16
    limit = max_payload_bytes(n, (1, 28, 28))
    data = encode_tensors(_batch(n=n), metadata={"site": "site-a"})
    assert len(data) <= limit < 2 * len(data)
    decode_tensors(data, max_bytes=limit, expect=EXPECT)
    half = max_payload_bytes(n, (1, 28, 28), bytes_per_value=2)
    assert len(encode_tensors(_batch(n=n), fp16=True)) <= half < limit
    assert MAX_BODY_BYTES == 64 * 1024 * 1024
    with pytest.raises(ValueError, match="n_items"):
        max_payload_bytes(-1, (1,))
