"""One contract suite for every ``SidecarStore``: SQLite (a real file) and PostgreSQL (a
real server from Debian's package, started by devstack on a loopback port; one fresh
database per test). Both must behave identically; behaviour not pinned here is not
part of the interface (cloud_sidecar/store_api.py)."""

from __future__ import annotations

import itertools
import os
import secrets
import sqlite3
import subprocess
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cloud_sidecar.data_keys import SEALED_MAGIC, DataKeys, HsmCustody, is_sealed
from cloud_sidecar.errors import LabelError, StoreError
from cloud_sidecar.keys.hsm import Hsm
from cloud_sidecar.store import SCHEMA_VERSION, LabelSpan, Store
from cloud_sidecar.store_api import FEATURE_SHAPE, SidecarStore
from devstack.procs import require_tool
from devstack.softhsm import HsmToken, init_token
from fleet_protocol import batch
from fleet_protocol.errors import ReplayError
from fleet_protocol.labels import WINDOW_MS

PEM = (
    ec.generate_private_key(ec.SECP256R1())
    .public_key()
    .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
)
T0 = 1_764_000_000_000
_db_names = itertools.count()


@pytest.fixture(scope="module")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from devstack.errors import ToolMissingError
    from devstack.postgres import PostgresServer

    try:
        with PostgresServer(tmp_path_factory.mktemp("pg-logs")) as pg:
            yield pg
    except ToolMissingError as e:
        if os.environ.get("CI"):  # `make test` installs PostgreSQL: missing there is a failure
            pytest.fail(str(e))
        pytest.skip(str(e))


@dataclass(frozen=True)
class Tokens:
    """One SoftHSM2 configuration holding the store's token and an unrelated one."""

    ours: HsmToken
    other_label: str
    other_pin: str

    def keys(self, other: bool = False, on_new: Any = None) -> DataKeys:
        """Fresh data keys (as a restarted process has) custodied by our token or the other."""
        t = self.ours
        label, pin = (self.other_label, self.other_pin) if other else (t.label, t.user_pin)
        return DataKeys(HsmCustody(lambda: Hsm(str(t.module), label, pin)), on_new)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tokens]:
    saved = os.environ.get("SOFTHSM2_CONF")
    token = init_token(tmp_path_factory.mktemp("softhsm"))
    os.environ.update(token.env())
    other_pin = secrets.token_hex(8)
    subprocess.run(
        [require_tool("softhsm2-util"), "--init-token", "--free", "--label", "other-tenant",
         "--pin", other_pin, "--so-pin", secrets.token_hex(8)],
        env={**os.environ, **token.env()}, capture_output=True, check=True, timeout=60,
    )  # fmt: skip
    yield Tokens(token, "other-tenant", other_pin)
    if saved is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = saved


Opener = Callable[..., SidecarStore]
_OURS = object()  # opener default: fresh data keys on the store's own token


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(
    request: pytest.FixtureRequest, tmp_path: Path, tokens: Tokens
) -> Iterator[tuple[str, Opener]]:
    """(name, opener): each call of ``opener`` opens the same store once more (with fresh
    data keys on the store's SoftHSM token unless ``data_keys`` says otherwise)."""
    opened: list[SidecarStore] = []
    if request.param == "sqlite":
        path = tmp_path / "store.sqlite3"

        def opener(replay_window: int = 4096, data_keys: Any = _OURS) -> SidecarStore:
            keys = tokens.keys() if data_keys is _OURS else data_keys
            s = Store(path, "eu-central-1", replay_window, data_keys=keys)
            opened.append(s)
            return s
    else:
        pg = request.getfixturevalue("postgres")
        dsn = pg.create_database(f"contract_{os.getpid()}_{next(_db_names)}")
        from cloud_sidecar.store_pg import PgStore

        def opener(replay_window: int = 4096, data_keys: Any = _OURS) -> SidecarStore:
            keys = tokens.keys() if data_keys is _OURS else data_keys
            s = PgStore(dsn, "eu-central-1", replay_window, data_keys=keys)
            opened.append(s)
            return s

    yield request.param, opener
    for s in opened:
        s.close()


@pytest.fixture
def store(backend: tuple[str, Opener]) -> SidecarStore:
    s = backend[1]()
    s.register_device("pi-00", PEM)
    s.register_device("pi-01", PEM)
    return s


def _batch(device: str, times_ms: list[int], ids: list[str] | None = None) -> batch.Batch:
    ids = ids or [os.urandom(16).hex() for _ in times_ms]
    metas = tuple(
        batch.SampleMeta(
            sample_id=i,
            captured_at_ms=t,
            stream_offset_s=0.0,
            predicted="horn",
            score=0.5,
            model_sha256="ab" * 32,
            reason="audit",
        )
        for i, t in zip(ids, times_ms, strict=True)
    )
    rng = np.random.default_rng(len(times_ms))
    feats = rng.normal(size=(len(metas), *FEATURE_SHAPE)).astype(np.float16)
    return batch.Batch(device, metas, feats)


def test_a_new_store_is_at_the_current_schema_and_reopening_keeps_its_data(
    backend: tuple[str, Opener],
) -> None:
    first = backend[1]()
    assert isinstance(first, SidecarStore)
    assert first.schema_version == SCHEMA_VERSION
    first.register_device("pi-00", PEM)
    first.close()
    again = backend[1]()
    assert again.schema_version == SCHEMA_VERSION
    assert again.counts() == {"devices": 1, "batches": 0, "samples": 0}


def test_a_store_newer_than_the_code_is_refused(backend: tuple[str, Opener]) -> None:
    name, opener = backend
    s = opener()
    if name == "sqlite":
        s._db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")  # type: ignore[attr-defined]
    else:
        with s._tx() as cur:  # type: ignore[attr-defined]
            cur.execute("INSERT INTO schema_migrations VALUES (%s, 0)", (SCHEMA_VERSION + 1,))
    s.close()
    with pytest.raises(StoreError, match="newer"):
        opener()


def test_devices_register_change_status_and_re_register_as_active(store: SidecarStore) -> None:
    d = store.device("pi-00")
    assert d is not None and d.status == "active" and d.last_seq == -1 and d.public_key_pem == PEM
    assert store.set_device_status("pi-00", "disabled")
    assert store.device("pi-00").status == "disabled"  # type: ignore[union-attr]
    assert not store.set_device_status("nobody", "disabled")
    assert store.device("nobody") is None
    assert store.register_device("pi-00", PEM).status == "active"


def test_a_batch_is_stored_whole_with_its_features_and_advances_last_seq(
    store: SidecarStore,
) -> None:
    b = _batch("pi-00", [T0, T0 + 1000, T0 + 2000])
    assert store.check_fresh("pi-00", "b1", 0, "d1")
    store.put_batch("b1", 0, "d1", b)
    assert store.counts() == {"devices": 2, "batches": 1, "samples": 3}
    keys = [("pi-00", m.sample_id) for m in reversed(b.samples)]
    got = store.features(keys)
    assert got.shape == (3, *FEATURE_SHAPE) and got.dtype == np.float32
    assert np.array_equal(got, b.features[::-1].astype(np.float32))
    assert store.capture_times() == {"pi-00": [T0, T0 + 1000, T0 + 2000]}
    assert store.samples_per_device() == {"pi-00": 3}


def test_a_retransmission_is_recognised_and_a_replay_is_refused(store: SidecarStore) -> None:
    store.put_batch("b1", 5, "d1", _batch("pi-00", [T0]))
    assert store.check_fresh("pi-00", "b1", 5, "d1") is False
    with pytest.raises(ReplayError):
        store.check_fresh("pi-00", "b1", 6, "other")
    with pytest.raises(ReplayError):
        store.check_fresh("pi-00", "b2", 5, "d2")
    with pytest.raises(ReplayError):
        store.put_batch("b2", 5, "d2", _batch("pi-00", [T0 + 1]))
    assert store.check_fresh("pi-01", "b3", 5, "d3")  # sequences are per device
    assert store.check_fresh("pi-00", "b4", 5, "d4", epoch=7)  # ... and per epoch


def test_batches_may_arrive_out_of_order_within_the_replay_window(
    backend: tuple[str, Opener],
) -> None:
    store = backend[1](replay_window=10)
    store.register_device("pi-00", PEM)
    for seq in (20, 12, 15):
        assert store.check_fresh("pi-00", f"b{seq}", seq, f"d{seq}")
        store.put_batch(f"b{seq}", seq, f"d{seq}", _batch("pi-00", [T0 + seq]))
    with pytest.raises(ReplayError) as e:
        store.check_fresh("pi-00", "b10", 10, "d10")
    assert e.value.reason == "stale_seq"
    with pytest.raises(ReplayError):
        store.put_batch("b9", 9, "d9", _batch("pi-00", [T0 + 9]))
    store.put_batch("e0", 9, "e0", _batch("pi-00", [T0 + 99]), epoch=3)  # a new epoch
    assert store.counts()["batches"] == 4


def test_a_batch_repeating_a_stored_sample_is_refused_and_stores_nothing(
    store: SidecarStore,
) -> None:
    sid = os.urandom(16).hex()
    store.put_batch("b1", 0, "d1", _batch("pi-00", [T0], [sid]))
    with pytest.raises(ReplayError):
        store.put_batch(
            "b2", 1, "d2", _batch("pi-00", [T0 + 1, T0 + 2], [os.urandom(16).hex(), sid])
        )
    assert store.counts()["samples"] == 1 and store.counts()["batches"] == 1
    assert store.check_fresh("pi-00", "b2", 1, "d2")  # its sequence number stays free


def test_two_writers_racing_for_one_sequence_store_it_once(backend: tuple[str, Opener]) -> None:
    a, b = backend[1](), backend[1]()
    a.register_device("pi-00", PEM)
    results: list[str] = []

    def put(s: SidecarStore, bid: str) -> None:
        try:
            s.put_batch(bid, 7, bid, _batch("pi-00", [T0]))
            results.append("stored")
        except (ReplayError, StoreError):
            results.append("refused")

    threads = [threading.Thread(target=put, args=(s, f"b-{i}")) for i, s in enumerate((a, b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == ["refused", "stored"]
    assert a.counts()["batches"] == 1


def test_a_claim_is_used_once_by_its_device_before_it_expires(store: SidecarStore) -> None:
    store.add_claim("c1", "pi-00", "h" * 64, expires_ms=T0 + 10_000)
    assert store.use_claim("nope", "pi-00", "h" * 64, T0) == "unknown_claim"
    assert store.use_claim("c1", "pi-00", "x" * 64, T0) == "bad_token"
    assert store.use_claim("c1", "pi-01", "h" * 64, T0) == "claim_device_mismatch"
    assert store.use_claim("c1", "pi-00", "h" * 64, T0 + 20_000) == "claim_expired"
    assert store.use_claim("c1", "pi-00", "h" * 64, T0) == ""
    assert store.use_claim("c1", "pi-00", "h" * 64, T0) == "claim_used"


def test_revoking_a_device_lists_every_certificate_it_was_issued(store: SidecarStore) -> None:
    store.add_certificate("01", "pi-00", T0, T0 + 1000, "claim")
    store.add_certificate("02", "pi-00", T0, T0 + 2000, "renew")
    assert [c[0] for c in store.certificates("pi-00")] == ["01", "02"]
    assert sorted(store.revoke_device("pi-00", T0 + 5) or []) == ["01", "02"]
    assert store.device("pi-00").status == "revoked"  # type: ignore[union-attr]
    assert all(c[2] == T0 + 5 for c in store.certificates("pi-00"))
    assert store.revoke_device("nobody", T0) is None


def test_labels_join_samples_by_window_midpoint_with_provenance(store: SidecarStore) -> None:
    b = _batch("pi-00", [T0, T0 + 5_000, T0 + 20_000])
    store.put_batch("b1", 0, "d1", b)
    n = store.add_labels(
        [LabelSpan("pi-00", T0 + WINDOW_MS // 2, T0 + 10_000, "siren")], "incidents", "i-1"
    )
    assert n == 1 and store.label_counts() == {"incidents": 1}
    got = store.labelled_samples()
    assert [(s.device_id, s.sample_id, s.label) for s in got] == sorted(
        ("pi-00", m.sample_id, "siren") for m in b.samples[:2]
    )
    s0 = next(s for s in got if s.sample_id == b.samples[0].sample_id)
    assert (s0.source, s0.captured_at_ms, s0.batch_id) == ("incidents", T0, "b1")
    assert (s0.model_sha256, s0.reason) == ("ab" * 32, "audit")
    assert (s0.predicted, s0.score) == ("horn", 0.5)


def test_sample_scores_are_selected_by_reason_and_capture_time(store: SidecarStore) -> None:
    store.put_batch("b1", 0, "d1", _batch("pi-00", [T0, T0 + 1000, T0 + 2000]))
    assert store.sample_scores("audit", T0 + 1000, T0 + 5000) == [0.5, 0.5]
    assert store.sample_scores("low_confidence", 0, T0 + 5000) == []


def test_a_contradicting_label_import_is_refused_whole_and_agreeing_ones_are_kept(
    store: SidecarStore,
) -> None:
    store.add_labels([LabelSpan("pi-00", T0, T0 + 1000, "siren")], "a", "i-1")
    with pytest.raises(LabelError) as e:
        store.add_labels(
            [
                LabelSpan("pi-01", T0, T0 + 1000, "horn"),
                LabelSpan("pi-00", T0 + 500, T0 + 1500, "horn"),
            ],
            "b",
            "i-2",
        )
    assert [p[0] for p in e.value.problems] == [1]
    assert store.label_counts() == {"a": 1}
    assert store.add_labels([LabelSpan("pi-00", T0, T0 + 1000, "siren")], "b", "i-3") == 1


def test_features_of_an_unknown_sample_raise_a_store_error(store: SidecarStore) -> None:
    with pytest.raises(StoreError):
        store.features([("pi-00", "0" * 32)])


def test_an_old_sqlite_store_upgrades_in_order(tmp_path: Path) -> None:
    from cloud_sidecar import store_schema

    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript("BEGIN; " + store_schema.SCHEMA + " PRAGMA user_version=1; COMMIT;")
    db.close()
    s = Store(path, "eu")
    assert s.schema_version == SCHEMA_VERSION
    s.register_device("pi-00", PEM)
    s.add_labels([LabelSpan("pi-00", T0, T0 + 1000, "siren")], "a", "i-1")  # table of step 3
    s.close()


def test_deleted_samples_are_gone_and_others_stay(store: SidecarStore) -> None:
    b = _batch("pi-00", [T0, T0 + 1000, T0 + 2000])
    store.put_batch("b1", 0, "d1", b)
    gone = [("pi-00", b.samples[1].sample_id), ("pi-00", "0" * 32)]
    assert store.delete_samples(gone) == 1
    assert store.capture_times() == {"pi-00": [T0, T0 + 2000]}
    with pytest.raises(StoreError):
        store.features(gone[:1])


# -- features at rest: sealed under data keys wrapped by the HSM (docs/adr/0022) ----------


def _raw(name: str, s: SidecarStore, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
    """Run ``sql`` on the store's own connection, below the store's API (the raw rows)."""
    if name == "sqlite":
        return list(s._db.execute(sql, params).fetchall())  # type: ignore[attr-defined]
    with s._tx() as cur:  # type: ignore[attr-defined]
        cur.execute(sql.replace("?", "%s"), params)
        return list(cur.fetchall()) if cur.description else []


def _clear_windows(b: batch.Batch) -> dict[str, bytes]:
    return {
        m.sample_id: np.asarray(f, "<f2").tobytes()
        for m, f in zip(b.samples, b.features, strict=True)
    }


def _keys(b: batch.Batch) -> list[tuple[str, str]]:
    return [(b.device, m.sample_id) for m in b.samples]


def test_stored_features_are_ciphertext_in_the_raw_database_bytes(
    backend: tuple[str, Opener],
) -> None:
    name, opener = backend
    s = opener()
    s.register_device("pi-00", PEM)
    b = _batch("pi-00", [T0, T0 + 1000, T0 + 2000])
    s.put_batch("b1", 0, "d1", b)
    clear = _clear_windows(b)
    raw = dict(_raw(name, s, "SELECT sample_id, features FROM samples"))
    assert sorted(raw) == sorted(clear)
    for sid, column in raw.items():
        blob = bytes(column)
        assert blob.startswith(SEALED_MAGIC) and is_sealed(blob)
        assert zlib.compress(clear[sid]) not in blob and clear[sid][:32] not in blob
    if name == "sqlite":  # and nowhere in the database files either
        (path,) = [r[2] for r in _raw(name, s, "PRAGMA database_list") if r[1] == "main"]
        files = [Path(path), Path(path + "-wal")]
        disk = b"".join(f.read_bytes() for f in files if f.exists())
        assert all(zlib.compress(c) not in disk and c[:32] not in disk for c in clear.values())
    got = s.features(_keys(b))
    np.testing.assert_array_equal(got, np.asarray(b.features, np.float32))


def test_a_store_without_the_hsm_key_cannot_read_the_features(
    backend: tuple[str, Opener], tokens: Tokens
) -> None:
    opener = backend[1]
    s = opener()
    s.register_device("pi-00", PEM)
    b = _batch("pi-00", [T0, T0 + 1000])
    s.put_batch("b1", 0, "d1", b)
    s.close()
    elsewhere = opener(data_keys=tokens.keys(other=True))  # another token: no store-kek of ours
    with pytest.raises(StoreError, match="does not open data key"):
        elsewhere.features(_keys(b))
    keyless = opener(data_keys=None)
    assert keyless.counts()["samples"] == 2  # everything but the features is served
    with pytest.raises(StoreError, match="without data keys"):
        keyless.features(_keys(b))
    with pytest.raises(StoreError, match="without data keys"):
        keyless.put_batch("b2", 1, "d2", _batch("pi-00", [T0 + 5000]))
    assert keyless.counts()["samples"] == 2
    np.testing.assert_array_equal(opener().features(_keys(b)), np.asarray(b.features, np.float32))


def test_a_sealed_window_moved_to_another_row_does_not_open(
    backend: tuple[str, Opener],
) -> None:
    name, opener = backend
    s = opener()
    s.register_device("pi-00", PEM)
    b = _batch("pi-00", [T0, T0 + 1000])
    s.put_batch("b1", 0, "d1", b)
    (a, a_blob), (c, _) = sorted(_raw(name, s, "SELECT sample_id, features FROM samples"))
    _raw(name, s, "UPDATE samples SET features=? WHERE sample_id=?", (bytes(a_blob), c))
    with pytest.raises(StoreError, match=f"pi-00/{c}.*do not open"):
        s.features([("pi-00", c)])
    assert s.features([("pi-00", a)]).shape == (1, *FEATURE_SHAPE)


def test_after_a_data_key_rotation_new_rows_use_the_new_key_and_old_rows_stay_readable(
    backend: tuple[str, Opener], tokens: Tokens
) -> None:
    name, opener = backend
    told: list[tuple[str, str]] = []
    keys = tokens.keys(on_new=lambda row, reason: told.append((row.kid, reason)))
    s = opener(data_keys=keys)
    s.register_device("pi-00", PEM)
    old, new = _batch("pi-00", [T0]), _batch("pi-00", [T0 + 1000])
    s.put_batch("b1", 0, "d1", old)
    first = keys.current_kid
    second = s.rotate_data_key()
    s.put_batch("b2", 1, "d2", new)
    assert told == [(first, "first"), (second, "rotated")] and first != second
    stored = dict(_raw(name, s, "SELECT kid, wrapped FROM data_keys"))
    assert sorted(stored) == sorted([first, second])
    assert all(len(bytes(w)) == 12 + 32 + 16 for w in stored.values())  # sealed by the HSM
    kid_of = {
        sid: bytes(blob)[len(SEALED_MAGIC) : len(SEALED_MAGIC) + 8].hex()
        for sid, blob in _raw(name, s, "SELECT sample_id, features FROM samples")
    }
    assert kid_of == {old.samples[0].sample_id: first, new.samples[0].sample_id: second}
    s.close()
    again = opener()  # a restarted process: both keys unsealed again by the HSM
    both = again.features(_keys(old) + _keys(new))
    want = np.concatenate([old.features, new.features]).astype(np.float32)
    np.testing.assert_array_equal(both, want)


def test_the_upgrade_to_schema_5_seals_features_stored_in_clear(
    backend: tuple[str, Opener], tokens: Tokens
) -> None:
    name, opener = backend
    s = opener()
    s.register_device("pi-00", PEM)
    b = _batch("pi-00", [T0, T0 + 1000, T0 + 2000])
    s.put_batch("b1", 0, "d1", b)
    # back to what a schema-4 store held: the windows in clear, no data key table
    for sid, window in _clear_windows(b).items():
        _raw(
            name, s, "UPDATE samples SET features=? WHERE sample_id=?", (zlib.compress(window), sid)
        )
    _raw(name, s, "DROP TABLE data_keys")
    if name == "sqlite":
        _raw(name, s, "PRAGMA user_version=4")
    else:
        _raw(name, s, "DELETE FROM schema_migrations WHERE version=5")
    s.close()
    with pytest.raises(StoreError, match="schema 5 seals"):
        opener(data_keys=None)
    told: list[str] = []
    keys = tokens.keys(on_new=lambda _row, reason: told.append(reason))
    up = opener(data_keys=keys)
    assert up.schema_version == SCHEMA_VERSION == 5
    assert told == ["schema 5 sealed 3 rows stored in clear"]
    raw = _raw(name, up, "SELECT features FROM samples")
    assert len(raw) == 3 and all(is_sealed(bytes(r[0])) for r in raw)
    np.testing.assert_array_equal(up.features(_keys(b)), np.asarray(b.features, np.float32))
