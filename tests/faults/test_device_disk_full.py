"""A full device disk: buffer writes fail with SQLITE_FULL, the daemon keeps serving,
counts the refused samples, loses nothing already buffered, and recovers when space
returns; every batch is stored exactly once.

Real components as in test_two_ingest_workers.py, with the device's own SQLite replay
buffer (WAL, synchronous=FULL, features encrypted) instead of the in-memory one. The
full disk is SQLite's ``PRAGMA max_page_count`` on the buffer's connection, set to the
pages in use: every write that needs a new page fails with ``SQLITE_FULL`` ("database
or disk is full"), as on an SD card with no block left (no small tmpfs here). The
listener's ``Keeper`` takes the classified windows as in the daemon; the buffer's
storage key is a fixed software key (where it comes from does not matter to a full disk).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from devstack.stack import DevStack
from edge_daemon.buffer import SqliteReplayStore
from edge_daemon.errors import BufferError_
from edge_daemon.listen import Keeper
from edge_daemon.pipeline import Classified
from fleet_protocol.batch import SampleMeta
from fleet_protocol.features import N_BANDS, N_FRAMES

from .uplink_rig import Rig

pytestmark = [pytest.mark.integration, pytest.mark.slow]
KEY = bytes(range(3, 35))
BEFORE, DURING, AFTER = 16, 12, 10  # windows kept before, during and after the full disk


class _Clock:
    def captured_at_ms(self, sample_index: int) -> int:
        return 1_700_000_000_000 + sample_index // 16


class _KeepAll:
    """The selection policy reduced to "keep every window" (selection is not under test)."""

    def decide(self, score: float, *, stream_s: float, pending_bytes: object) -> str:
        return "low_confidence"


def _window(i: int) -> Classified:
    f = np.full((N_BANDS, N_FRAMES), i % 5, np.float32)
    return Classified(i, float(i), "horn", 0.4, f, "ab" * 32)


def _pages(buf: SqliteReplayStore) -> int:
    return int(buf._db.execute("PRAGMA page_count").fetchone()[0])


def _cap(buf: SqliteReplayStore, pages: int) -> None:
    buf._db.execute(f"PRAGMA max_page_count = {pages}")  # the full disk


def test_a_full_device_disk_refuses_new_samples_keeps_serving_and_loses_nothing(
    tmp_path: Path,
) -> None:
    buf = SqliteReplayStore(tmp_path / "device" / "buffer.sqlite3", KEY)
    with DevStack(tmp_path / "stack", n_devices=1) as stack:
        rig = Rig(stack, tmp_path, buffer=buf)
        keeper = Keeper(
            device=rig.slot.device_id, source=_Clock(), selector=_KeepAll(),  # type: ignore[arg-type]
            buffer=buf, event_threshold=2.0, publish=lambda _t, _p: True,
        )  # fmt: skip
        try:
            rig.start_worker()
            for i in range(BEFORE):
                keeper(_window(i))
            assert rig.outbox.seal() == BEFORE // 2  # sealed offline: held in the buffer
            _cap(buf, _pages(buf))  # the disk is full
            for i in range(BEFORE, BEFORE + DURING):
                keeper(_window(i))  # refused one by one; the listener goes on
            refused = keeper.refused_write  # the last partly filled pages took a few
            assert refused >= DURING // 2 and keeper.samples + refused == BEFORE + DURING
            with pytest.raises(BufferError_, match="full"):
                _probe(buf)  # what the daemon's Keeper met: SQLITE_FULL
            rig.connect()
            rig.outbox.resend_due()
            rig.until_all_acked()  # what was buffered before the disk filled goes out
            acked_while_full = buf.counts()["batches_acked"]
            _cap(buf, 1 << 30)  # space returns
            for i in range(BEFORE + DURING, BEFORE + DURING + AFTER):
                keeper(_window(i))
            sealed_after = rig.outbox.seal(force=True)
            rig.until_all_acked()
            stored, distinct, samples = rig.stored()
            counts = buf.counts()
        finally:
            rig.close()
            buf.close()
    s = rig.outbox.stats
    kept = keeper.samples
    print(
        f"windows kept {kept} + refused on the full disk {keeper.refused_write}; batches sealed"
        f" {s.batches_sealed} (acked while full {acked_while_full}, after space returned"
        f" {sealed_after}), stored {stored}: lost {s.batches_sealed - stored}, stored twice"
        f" {stored - distinct}; samples stored {samples}; acks {s.acks}, resends {s.resends}"
    )
    assert acked_while_full == BEFORE // 2 and refused == keeper.refused_write
    assert kept + refused == BEFORE + DURING + AFTER and sealed_after >= AFTER // 2
    assert stored == distinct == s.batches_sealed and samples == kept
    assert counts["samples"] == kept and counts["batches_acked"] == counts["batches"]
    assert s.rejected == {}


def _probe(buf: SqliteReplayStore) -> None:
    meta = SampleMeta(
        sample_id="f" * 32, captured_at_ms=1, stream_offset_s=0.0, predicted="horn",
        score=0.4, model_sha256="ab" * 32, reason="low_confidence",
    )  # fmt: skip
    buf.add(meta, np.zeros((N_BANDS, N_FRAMES), np.float16))
