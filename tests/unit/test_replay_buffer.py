"""The replay buffer (real SQLite, software storage key): encryption at rest, atomic
batches, sequence numbers, eviction order."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from edge_daemon.buffer import ReplayBuffer
from edge_daemon.errors import BufferError_
from fleet_protocol.batch import SampleMeta
from fleet_protocol.features import N_FRAMES, N_MELS

KEY = bytes(range(32))


def _meta(i: int) -> SampleMeta:
    return SampleMeta(
        f"{i:032x}",
        1_700_000_000_000 + i,
        float(i),
        "horn",
        0.4,
        "siren",
        "ab" * 32,
        "disagreement",
    )


def _feats(i: int) -> np.ndarray:
    return np.full((N_MELS, N_FRAMES), i, dtype=np.float16)


def test_samples_survive_reopen_and_decrypt(tmp_path: Path) -> None:
    buf = ReplayBuffer(tmp_path / "b.sqlite3", KEY)
    assert buf.add(_meta(1), _feats(1))
    buf.close()
    again = ReplayBuffer(tmp_path / "b.sqlite3", KEY)
    [(meta, feats)] = again.unbatched(10)
    assert meta == _meta(1)
    assert np.array_equal(feats, _feats(1))


def test_features_are_not_stored_in_clear(tmp_path: Path) -> None:
    buf = ReplayBuffer(tmp_path / "b.sqlite3", KEY)
    marker = np.full((N_MELS, N_FRAMES), 1234.0, dtype=np.float16)
    buf.add(_meta(1), marker)
    buf.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert marker.tobytes()[:64] not in raw


def test_wrong_storage_key_cannot_read_samples(tmp_path: Path) -> None:
    ReplayBuffer(tmp_path / "b.sqlite3", KEY).add(_meta(1), _feats(1))
    with pytest.raises(BufferError_):
        ReplayBuffer(tmp_path / "b.sqlite3", os.urandom(32)).unbatched(10)


def test_duplicate_sample_id_is_not_stored_twice(tmp_path: Path) -> None:
    buf = ReplayBuffer(tmp_path / "b.sqlite3", KEY)
    assert buf.add(_meta(1), _feats(1))
    assert not buf.add(_meta(1), _feats(1))


def test_commit_batch_claims_samples_and_advances_sequence(tmp_path: Path) -> None:
    buf = ReplayBuffer(tmp_path / "b.sqlite3", KEY)
    for i in range(3):
        buf.add(_meta(i), _feats(i))
    assert buf.next_seq() == 0
    buf.commit_batch("a" * 32, 0, 1, b"env", [_meta(0).sample_id, _meta(1).sample_id])
    assert buf.next_seq() == 1
    assert [m.sample_id for m, _ in buf.unbatched(10)] == [_meta(2).sample_id]
    assert [p.batch_id for p in buf.unacked()] == ["a" * 32]
    assert buf.mark_acked("a" * 32)
    assert buf.unacked() == []


def test_reused_sequence_number_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    buf = ReplayBuffer(tmp_path / "b.sqlite3", KEY)
    buf.add(_meta(0), _feats(0))
    buf.commit_batch("a" * 32, 0, 1, b"env", [_meta(0).sample_id])
    buf.add(_meta(1), _feats(1))
    with pytest.raises(BufferError_):
        buf.commit_batch("b" * 32, 0, 1, b"env", [_meta(1).sample_id])
    assert len(buf.unbatched(10)) == 1
    assert buf.counts()["batches"] == 1


def test_eviction_drops_acknowledged_samples_before_unsent_ones(tmp_path: Path) -> None:
    one = len(_feats(0).tobytes()) + 16
    buf = ReplayBuffer(tmp_path / "b.sqlite3", KEY, max_bytes=3 * one)
    for i in range(2):
        buf.add(_meta(i), _feats(i))
    buf.commit_batch("a" * 32, 0, 1, b"env", [_meta(0).sample_id, _meta(1).sample_id])
    buf.mark_acked("a" * 32)
    for i in range(2, 4):
        buf.add(_meta(i), _feats(i))
    unsent = {m.sample_id for m, _ in buf.unbatched(10)}
    assert unsent == {_meta(2).sample_id, _meta(3).sample_id}
    assert buf.counts()["samples"] == 3
