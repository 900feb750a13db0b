"""One contract suite for every ``ReplayStore``: the in-memory one and the SQLite one
(real SQLite file, software storage key) must behave identically."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from edge_daemon.buffer import MemoryReplayStore, ReplayStore, SqliteReplayStore
from edge_daemon.buffer_schema import sample_charge
from edge_daemon.errors import BufferError_
from fleet_protocol.batch import SampleMeta
from fleet_protocol.features import N_BANDS, N_FRAMES

KEY = bytes(range(32))
ONE = sample_charge()
MB = 1024 * 1024
Factory = Callable[[int], ReplayStore]


def meta(i: int, reason: str = "low_confidence") -> SampleMeta:
    return SampleMeta.model_validate(
        {
            "sample_id": f"{i:032x}",
            "captured_at_ms": 1_700_000_000_000 + i,
            "stream_offset_s": float(i),
            "predicted": "horn",
            "score": 0.4,
            "model_sha256": "ab" * 32,
            "reason": reason,
        }
    )


def feats(i: int) -> np.ndarray:
    return np.full((N_BANDS, N_FRAMES), i, dtype=np.float16)


@pytest.fixture(params=["memory", "sqlite"])
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Factory]:
    opened: list[ReplayStore] = []

    def factory(max_bytes: int = 64 * MB) -> ReplayStore:
        store: ReplayStore
        if request.param == "memory":
            store = MemoryReplayStore(max_bytes)
        else:
            store = SqliteReplayStore(tmp_path / f"b{len(opened)}.sqlite3", KEY, max_bytes)
        opened.append(store)
        return store

    yield factory
    for s in opened:
        s.close()


def ids(pairs: list[tuple[SampleMeta, np.ndarray]]) -> list[int]:
    return [int(m.sample_id, 16) for m, _ in pairs]


def test_added_samples_come_back_oldest_first_with_their_features(make: Factory) -> None:
    store = make(64 * MB)
    for i in (3, 1, 2):
        assert store.add(meta(i), feats(i))
    out = store.unbatched(10)
    assert ids(out) == [3, 1, 2]
    assert out[0][0] == meta(3)
    assert all(np.array_equal(f, feats(int(m.sample_id, 16))) for m, f in out)
    assert ids(store.unbatched(2)) == [3, 1]


def test_a_sample_id_is_stored_once(make: Factory) -> None:
    store = make(64 * MB)
    assert store.add(meta(1), feats(1))
    assert not store.add(meta(1), feats(9))
    assert store.counts()["samples"] == 1
    assert store.stored_bytes() == ONE


def test_commit_batch_claims_samples_advances_sequence_and_holds_envelope(make: Factory) -> None:
    store = make(64 * MB)
    for i in range(3):
        store.add(meta(i), feats(i))
    assert store.next_seq() == 0
    store.commit_batch("a" * 32, 0, 1, b"env", [meta(0).sample_id, meta(1).sample_id])
    assert store.next_seq() == 1
    assert ids(store.unbatched(10)) == [2]
    [pending] = store.unacked()
    assert (pending.batch_id, pending.seq, pending.envelope) == ("a" * 32, 0, b"env")
    assert store.stored_bytes() == 3 * ONE + 3
    assert store.pending_bytes() == 3 * ONE + 3


def test_a_sample_is_never_claimed_by_two_batches(make: Factory) -> None:
    store = make(64 * MB)
    store.add(meta(0), feats(0))
    store.commit_batch("a" * 32, 0, 1, b"e", [meta(0).sample_id])
    store.commit_batch("b" * 32, 1, 2, b"e", [meta(0).sample_id])
    store.mark_acked("a" * 32)
    assert store.pending_bytes() == 1  # only b's envelope: the sample went with a


def test_reused_sequence_or_batch_id_is_refused_and_changes_nothing(make: Factory) -> None:
    store = make(64 * MB)
    store.add(meta(0), feats(0))
    store.commit_batch("a" * 32, 0, 1, b"env", [meta(0).sample_id])
    store.add(meta(1), feats(1))
    with pytest.raises(BufferError_):
        store.commit_batch("b" * 32, 0, 1, b"env", [meta(1).sample_id])
    with pytest.raises(BufferError_):
        store.commit_batch("a" * 32, 1, 1, b"env", [meta(1).sample_id])
    assert ids(store.unbatched(10)) == [1]
    assert store.counts() == {"samples": 2, "batches": 1, "batches_acked": 0}
    assert store.next_seq() == 1


def test_unacked_batches_come_in_sequence_order_until_acked_once(make: Factory) -> None:
    store = make(64 * MB)
    for seq, bid in enumerate(("c" * 32, "a" * 32, "b" * 32)):
        store.commit_batch(bid, seq, seq, bid.encode(), [])
    assert [p.seq for p in store.unacked()] == [0, 1, 2]
    assert store.mark_acked("a" * 32)
    assert not store.mark_acked("a" * 32)
    assert not store.mark_acked("f" * 32)
    assert [p.batch_id for p in store.unacked()] == ["c" * 32, "b" * 32]
    assert store.counts() == {"samples": 0, "batches": 3, "batches_acked": 1}


def test_eviction_drops_acknowledged_samples_before_unsent_ones(make: Factory) -> None:
    store = make(3 * ONE)
    for i in range(2):
        store.add(meta(i), feats(i))
    store.commit_batch("a" * 32, 0, 1, b"", [meta(0).sample_id, meta(1).sample_id])
    store.mark_acked("a" * 32)
    for i in range(2, 4):
        assert store.add(meta(i), feats(i))
    assert ids(store.unbatched(10)) == [2, 3]
    assert store.counts()["samples"] == 3
    assert store.stored_bytes() <= 3 * ONE


def test_unsent_samples_are_evicted_lowest_priority_then_oldest_first(make: Factory) -> None:
    store = make(4 * ONE)
    store.add(meta(0, "low_confidence"), feats(0))
    store.add(meta(1, "audit"), feats(1))
    store.add(meta(2, "low_confidence"), feats(2))
    store.add(meta(3, "audit"), feats(3))
    assert store.add(meta(4, "low_confidence"), feats(4))  # evicts audit 1
    assert store.add(meta(5, "low_confidence"), feats(5))  # evicts audit 3
    assert store.add(meta(6, "low_confidence"), feats(6))  # evicts low_confidence 0, the oldest
    assert ids(store.unbatched(10)) == [2, 4, 5, 6]


def test_a_new_sample_below_everything_kept_is_not_stored(make: Factory) -> None:
    store = make(2 * ONE)
    store.add(meta(0, "low_confidence"), feats(0))
    store.add(meta(1, "low_confidence"), feats(1))
    assert not store.add(meta(2, "audit"), feats(2))
    assert ids(store.unbatched(10)) == [0, 1]


def test_samples_in_unacknowledged_batches_are_never_evicted(make: Factory) -> None:
    store = make(2 * ONE)
    store.add(meta(0), feats(0))
    store.add(meta(1), feats(1))
    store.commit_batch("a" * 32, 0, 1, b"", [meta(0).sample_id, meta(1).sample_id])
    assert not store.add(meta(2), feats(2))  # nothing evictable: the newcomer goes
    assert store.counts()["samples"] == 2


def test_stored_bytes_stay_within_budget_under_churn(make: Factory) -> None:
    budget = 10 * ONE
    store = make(budget)
    rng = np.random.default_rng(0)
    seq = 0
    for i in range(60):
        store.add(meta(i, str(rng.choice(["audit", "low_confidence"]))), feats(i))
        assert store.stored_bytes() <= budget
        if i % 7 == 6:
            batch = [m.sample_id for m, _ in store.unbatched(3)]
            store.commit_batch(f"{seq:032x}", seq, i, b"", batch)
            store.mark_acked(f"{seq:032x}")
            seq += 1
    assert store.counts()["samples"] == 10


def test_a_store_has_one_nonzero_epoch_and_a_new_store_a_new_one(make: Factory) -> None:
    a, b = make(), make()
    assert a.epoch() == a.epoch() != 0
    assert b.epoch() not in (0, a.epoch())
