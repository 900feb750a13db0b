"""The batch payload codec: round trip, byte caps, and only ProtocolError on bad input."""

from __future__ import annotations

import contextlib
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleet_protocol import batch
from fleet_protocol.errors import MalformedError, ProtocolError, TooLargeError
from fleet_protocol.features import N_BANDS, N_FRAMES


def _meta(i: int, **kw: object) -> batch.SampleMeta:
    base: dict[str, object] = {
        "sample_id": f"{i:032x}",
        "captured_at_ms": 1_700_000_000_000 + i,
        "stream_offset_s": float(i),
        "predicted": "horn",
        "score": 0.5,
        "model_sha256": "ab" * 32,
        "reason": "low_confidence",
    }
    if kw:  # an invalid sample, as a broken or hostile device would encode it
        return batch.SampleMeta.model_construct(**(base | kw))
    return batch.SampleMeta.model_validate(base)


def _batch(n: int = 3) -> batch.Batch:
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((n, N_BANDS, N_FRAMES)).astype(np.float16)
    return batch.Batch("pi-00", tuple(_meta(i) for i in range(n)), feats)


def test_round_trip_preserves_samples_and_features() -> None:
    b = _batch()
    out = batch.decode(batch.encode(b))
    assert out.samples == b.samples
    assert np.array_equal(out.features, b.features)
    assert out.device == "pi-00"


def test_zip_bomb_stops_at_the_inflate_cap() -> None:
    bomb = zlib.compress(b"\0" * (4 * 1024 * 1024))
    with pytest.raises(TooLargeError):
        batch.decode(bomb, batch.BatchLimits(max_plain=1024 * 1024))


def test_too_many_samples_is_rejected() -> None:
    with pytest.raises(TooLargeError):
        batch.decode(batch.encode(_batch(5)), batch.BatchLimits(max_samples=4))


def test_unknown_label_is_rejected() -> None:
    b = _batch(1)
    bad = batch.Batch(b.device, (_meta(0, predicted="unicorn"),), b.features)
    with pytest.raises(MalformedError):
        batch.decode(batch.encode(bad))


def test_feature_block_of_wrong_length_is_rejected() -> None:
    plain = zlib.decompress(batch.encode(_batch(2)))
    with pytest.raises(MalformedError):
        batch.decode(zlib.compress(plain[:-2]))


def test_manifest_length_beyond_payload_is_rejected() -> None:
    with pytest.raises(MalformedError):
        batch.decode(zlib.compress(struct.pack(">I", 1000) + b"{}"))


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_random_bytes_raise_only_protocol_errors(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        batch.decode_or_raise(data)


@settings(max_examples=1500, deadline=None)
@given(st.data())
def test_mutated_plaintext_raises_only_protocol_errors_or_decodes(data: st.DataObject) -> None:
    plain = bytearray(zlib.decompress(batch.encode(_batch(1))))
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, len(plain) - 1))
        plain[pos] = data.draw(st.integers(0, 255))
    with contextlib.suppress(ProtocolError):
        batch.decode(zlib.compress(bytes(plain)))
