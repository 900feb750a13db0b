"""A full device disk (``SQLITE_FULL``): the buffer says so, keeps what it holds, and
writes again when space returns; the listener's ``Keeper`` counts each refused sample
and goes on. The full disk is SQLite's ``PRAGMA max_page_count`` on the buffer's
connection (tests/faults/test_device_disk_full.py does the same end to end)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from edge_daemon.buffer import ReplayBuffer
from edge_daemon.errors import BufferError_
from edge_daemon.listen import Keeper
from edge_daemon.pipeline import Classified
from fleet_protocol.batch import SampleMeta
from fleet_protocol.features import N_BANDS, N_FRAMES

KEY = bytes(range(32))


def _meta(i: int) -> SampleMeta:
    return SampleMeta(
        sample_id=f"{i:032x}", captured_at_ms=1_700_000_000_000 + i, stream_offset_s=float(i),
        predicted="horn", score=0.4, model_sha256="ab" * 32, reason="low_confidence",
    )  # fmt: skip


def _feats(i: int) -> np.ndarray:
    return np.random.default_rng(i).standard_normal((N_BANDS, N_FRAMES)).astype(np.float16)


def _fill(buf: ReplayBuffer) -> None:
    pages = int(buf._db.execute("PRAGMA page_count").fetchone()[0])
    buf._db.execute(f"PRAGMA max_page_count = {pages}")


def _until_full(buf: ReplayBuffer, first: int) -> int:
    """Add samples from ``first`` until one is refused; the index of the refused one."""
    for i in range(first, first + 1000):
        try:
            buf.add(_meta(i), _feats(i))
        except BufferError_ as e:
            assert "full" in str(e), e  # before: "cannot rollback - no transaction is active"
            return i
    raise AssertionError("the buffer never filled")


def test_a_full_disk_refuses_with_sqlite_full_keeps_everything_and_recovers(
    tmp_path: Path,
) -> None:
    buf = ReplayBuffer(tmp_path / "b.sqlite3", KEY)
    for i in range(4):
        buf.add(_meta(i), _feats(i))
    buf.commit_batch("aa" * 16, 0, 1, b"envelope-0", [_meta(i).sample_id for i in range(2)])
    _fill(buf)
    refused = _until_full(buf, 4)
    with pytest.raises(BufferError_, match="full"):
        buf.commit_batch("bb" * 16, 1, 2, os.urandom(64 * 1024), [_meta(2).sample_id])
    assert [p.batch_id for p in buf.unacked()] == ["aa" * 16]
    assert buf.next_seq() == 1  # the refused batch took no sequence number
    assert len(buf.unbatched(100)) == refused - 2  # every sample that was stored is there
    buf._db.execute("PRAGMA max_page_count = 1073741823")  # space returns
    assert buf.add(_meta(refused), _feats(refused))
    buf.commit_batch("bb" * 16, 1, 2, b"envelope-1", [_meta(2).sample_id])
    assert buf.counts() == {"samples": refused + 1, "batches": 2, "batches_acked": 0}
    buf.close()


class _Clock:
    def captured_at_ms(self, sample_index: int) -> int:
        return sample_index


class _KeepAll:
    def decide(self, score: float, *, stream_s: float, pending_bytes: object) -> str:
        return "low_confidence"


def test_the_keeper_counts_refused_writes_and_the_listener_goes_on(tmp_path: Path) -> None:
    """Before: the BufferError_ ended the listener thread, and the main loop the daemon."""
    buf = ReplayBuffer(tmp_path / "b.sqlite3", KEY)
    keeper = Keeper(
        device="pi-01", source=_Clock(), selector=_KeepAll(),  # type: ignore[arg-type]
        buffer=buf, event_threshold=2.0, publish=lambda _t, _p: True,
    )  # fmt: skip

    def window(i: int) -> Classified:
        return Classified(i, float(i), "horn", 0.4, _feats(i).astype(np.float32), "ab" * 32)

    keeper(window(0))
    _fill(buf)
    for i in range(1, 40):
        keeper(window(i))  # never raises
    assert keeper.refused_write >= 30 and keeper.samples + keeper.refused_write == 40
    buf._db.execute("PRAGMA max_page_count = 1073741823")
    keeper(window(40))
    assert keeper.samples + keeper.refused_write == 41 and buf.counts()["samples"] == keeper.samples
    buf.close()
