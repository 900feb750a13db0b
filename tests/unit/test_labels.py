"""The label channel: messages, CSV import, all-or-nothing imports, and the join to samples.

Runs ``LabelService`` on the real SQLite store (a temp file) and the real audit log; the
MQTT path of the same service is tested against a real broker in
tests/integration/test_label_channel.py.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from cloud_sidecar.audit import AuditLog
from cloud_sidecar.labels import MAX_CSV_BYTES, LabelService, parse_csv
from cloud_sidecar.metrics import Metrics
from cloud_sidecar.store import Store
from fleet_protocol import batch, topics
from fleet_protocol.errors import MalformedError, TooLargeError
from fleet_protocol.features import N_BANDS, N_FRAMES
from fleet_protocol.labels import LabelBatch, LabelRecord, LabelResult, event_id
from tests.unit.store_keys import memory_data_keys

T0 = 1_764_000_000_000
PEM = (
    b"-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----\n"
)


@pytest.fixture
def svc(tmp_path: Path) -> LabelService:
    store = Store(tmp_path / "store.sqlite3", "eu-central-1", data_keys=memory_data_keys())
    for d in ("pi-00", "pi-01"):
        store._db.execute(  # a registered device, without a real key (not needed here)
            "INSERT INTO devices(device_id, public_key_pem, key_id, registered_at_ms)"
            " VALUES (?,?,?,?)",
            (d, PEM, "k-" + d, 0),
        )
    return LabelService(store, AuditLog(tmp_path / "audit.jsonl", "eu-central-1"), Metrics())


def _store_samples(store: Store, device: str, times_ms: list[int]) -> list[str]:
    metas = tuple(
        batch.SampleMeta(
            sample_id=os.urandom(16).hex(),
            captured_at_ms=t,
            stream_offset_s=0.0,
            predicted="horn",
            score=0.5,
            model_sha256="ab" * 32,
            reason="audit",
        )
        for t in times_ms
    )
    feats = np.zeros((len(metas), N_BANDS, N_FRAMES), np.float16)
    store.put_batch(os.urandom(16).hex(), 0, "d" * 64, batch.Batch(device, metas, feats))
    return [m.sample_id for m in metas]


def _rec(device: str, label: str, start: int, end: int) -> LabelRecord:
    return LabelRecord(device=device, label=label, start_ms=start, end_ms=end)


def _audit(svc: LabelService) -> list[dict[str, object]]:
    return [json.loads(line) for line in svc.audit.path.read_text().splitlines()]


def _n_labels(svc: LabelService) -> int:
    return sum(svc.store.label_counts().values())


# -- messages ---------------------------------------------------------------------------


def test_a_label_names_either_a_time_range_or_an_event_of_its_device() -> None:
    assert _rec("pi-00", "siren", T0, T0 + 5000).span() == (T0, T0 + 5000)
    by_event = LabelRecord(device="pi-00", label="horn", event_id=event_id("pi-00", T0))
    assert by_event.span() == (T0, T0 + 1000)
    bad = [
        {"device": "pi-00", "label": "horn"},  # no span
        {"device": "pi-00", "label": "horn", "start_ms": 5, "end_ms": 5},  # empty
        {"device": "pi-00", "label": "horn", "event_id": "pi-01@5"},  # another device's event
        {"device": "pi-00", "label": "horn", "event_id": "pi-00@5", "start_ms": 1, "end_ms": 2},
        {"device": "pi-00", "label": "unicorn", "start_ms": 1, "end_ms": 2},
        {"device": "PI 00", "label": "horn", "start_ms": 1, "end_ms": 2},
        {"device": "pi-00", "label": "horn", "start_ms": 1, "end_ms": 10**12},  # > a week
    ]
    for doc in bad:
        with pytest.raises(MalformedError):
            LabelBatch.from_bytes(json.dumps({"batch_id": "b", "labels": [doc]}).encode())


def test_an_oversized_label_message_is_refused_before_parsing() -> None:
    with pytest.raises(TooLargeError):
        LabelBatch.from_bytes(b" " * (LabelBatch.MAX_BYTES + 1))


# -- imports ----------------------------------------------------------------------------


def test_labels_join_samples_by_device_and_capture_time_and_unlabelled_samples_stay(
    svc: LabelService,
) -> None:
    ids = _store_samples(svc.store, "pi-00", [T0, T0 + 1000, T0 + 7000])
    other = _store_samples(svc.store, "pi-01", [T0])
    result = svc.import_records(
        [_rec("pi-00", "siren", T0, T0 + 2000)],
        source="incidents",
        via="test",
        import_id="i1",
        digest="x",
    )
    assert result.status == "accepted" and result.accepted == 1
    labelled = {
        (s.device_id, s.sample_id): (s.label, s.source) for s in svc.store.labelled_samples()
    }
    assert labelled == {
        ("pi-00", ids[0]): ("siren", "incidents"),
        ("pi-00", ids[1]): ("siren", "incidents"),
    }
    assert svc.store.counts()["samples"] == 4  # ids[2] and other[0] stay, unlabelled
    assert other[0] not in {sid for _, sid in labelled}


def test_labels_may_arrive_before_the_samples_they_describe(svc: LabelService) -> None:
    svc.import_records(
        [_rec("pi-01", "rain", T0, T0 + 60_000)], source="s", via="test", import_id="i", digest=""
    )
    [sid] = _store_samples(svc.store, "pi-01", [T0 + 30_000])
    assert [(s.sample_id, s.label) for s in svc.store.labelled_samples()] == [(sid, "rain")]


def test_unknown_device_refuses_the_whole_import_and_changes_nothing(svc: LabelService) -> None:
    result = svc.import_records(
        [_rec("pi-00", "siren", T0, T0 + 1000), _rec("pi-99", "horn", T0, T0 + 1000)],
        source="incidents",
        via="test",
        import_id="i1",
        digest="x",
    )
    assert result.status == "rejected" and result.accepted == 0
    assert [(e.index, e.reason) for e in result.errors] == [(1, "unknown_device")]
    assert _n_labels(svc) == 0
    assert _audit(svc)[-1]["kind"] == "labels.rejected"
    assert svc.metrics.get("labels_rejected_total", reason="unknown_device") == 1


def test_contradicting_labels_in_one_import_are_refused(svc: LabelService) -> None:
    result = svc.import_records(
        [_rec("pi-00", "siren", T0, T0 + 3000), _rec("pi-00", "horn", T0 + 2000, T0 + 4000)],
        source="s",
        via="test",
        import_id="i",
        digest="",
    )
    assert result.status == "rejected"
    assert result.errors[0].reason == "contradicts_label"
    assert _n_labels(svc) == 0


def test_a_label_contradicting_a_stored_one_is_refused_and_agreeing_ones_are_kept(
    svc: LabelService,
) -> None:
    first = [_rec("pi-00", "siren", T0, T0 + 3000)]
    assert svc.import_records(first, source="a", via="t", import_id="1", digest="").accepted == 1
    clash = svc.import_records(
        [_rec("pi-01", "rain", T0, T0 + 1000), _rec("pi-00", "horn", T0 + 2999, T0 + 5000)],
        source="b",
        via="t",
        import_id="2",
        digest="",
    )
    assert clash.status == "rejected"
    assert [(e.index, e.reason) for e in clash.errors] == [(1, "contradicts_stored_label")]
    assert "siren" in clash.errors[0].message and "from a" in clash.errors[0].message
    assert _n_labels(svc) == 1  # the rain label of the refused import is not stored either
    agree = [_rec("pi-00", "siren", T0 + 1000, T0 + 4000)]  # overlaps, same class: a re-send
    ok = svc.import_records(agree, source="b", via="t", import_id="3", digest="")
    assert ok.status == "accepted"
    assert _n_labels(svc) == 2


def test_every_import_is_audited_with_its_source_channel_and_digest(svc: LabelService) -> None:
    svc.import_records(
        [_rec("pi-00", "wind", T0, T0 + 1000)], source="rev-anna", via="csv", import_id="f.csv",
        digest="abc",
    )  # fmt: skip
    entry = _audit(svc)[-1]
    assert entry["kind"] == "labels.imported" and entry["subject"] == "rev-anna"
    assert entry["details"] == {
        "via": "csv",
        "import_id": "f.csv",
        "digest": "abc",
        "labels": 1,
        "devices": ["pi-00"],
    }


# -- CSV --------------------------------------------------------------------------------


def test_csv_with_ranges_iso_times_and_event_ids_imports(svc: LabelService, tmp_path: Path) -> None:
    csv = tmp_path / "labels.csv"
    csv.write_text(
        "device,label,start,end,event_id\n"
        f"pi-00,siren,{T0},{T0 + 2000},\n"
        "pi-00,horn,2025-12-24T18:00:00Z,2025-12-24T18:00:05+00:00,\n"
        f"pi-01,dog_bark,,,{event_id('pi-01', T0)}\n"
    )
    result = svc.import_csv(csv, "reviewer-anna")
    assert result.status == "accepted" and result.accepted == 3
    [sid] = _store_samples(svc.store, "pi-01", [T0])
    assert [(s.sample_id, s.label) for s in svc.store.labelled_samples()] == [(sid, "dog_bark")]


@pytest.mark.parametrize(
    ("text", "reason", "where"),
    [
        ("device,label,start,end\npi-00,unicorn,1,2\n", "malformed", "line 2: label"),
        ("device,label,start,end\npi-00,horn,2025-12-24T18:00:00,x\n", "malformed", "no time zone"),
        ("device,label,start,end\npi-00,horn,5,3\n", "malformed", "end_ms must be after"),
        ("device,label,start,end,extra\npi-00,horn,1,2,x\n", "malformed", "columns"),
        ("device,label,start,end\npi-00,horn,1\n", "malformed", "wrong number of fields"),
        ("device,label,start,end\n", "empty", "no rows"),
        ("device,label,start,end\npi-77,horn,1,2\n", "unknown_device", "pi-77"),
    ],
)
def test_bad_csv_gets_a_clear_error_and_changes_nothing(
    svc: LabelService, tmp_path: Path, text: str, reason: str, where: str
) -> None:
    csv = tmp_path / "bad.csv"
    csv.write_text(text)
    result = svc.import_csv(csv, "reviewer-anna")
    assert result.status == "rejected"
    assert any(e.reason == reason and where in e.message for e in result.errors), result.errors
    assert _n_labels(svc) == 0
    assert _audit(svc)[-1]["kind"] == "labels.rejected"


def test_an_oversized_or_unreadable_csv_is_refused_without_reading_it(
    svc: LabelService, tmp_path: Path
) -> None:
    big = tmp_path / "big.csv"
    with big.open("wb") as f:
        f.truncate(MAX_CSV_BYTES + 1)  # sparse: never read
    assert svc.import_csv(big, "r").errors[0].reason == "too_large"
    assert svc.import_csv(tmp_path / "missing.csv", "r").errors[0].reason == "unreadable"
    assert _n_labels(svc) == 0


def test_csv_rows_are_validated_like_messages() -> None:
    records = parse_csv(b"\xef\xbb\xbfdevice,label,start,end\npi-00,rain,1000,2000\n")
    assert records == [_rec("pi-00", "rain", 1000, 2000)]


# -- the MQTT channel's message handling (the broker path: tests/integration) -----------


def test_a_label_message_is_answered_on_its_sources_result_topic(svc: LabelService) -> None:
    msg = LabelBatch(batch_id="b-1", labels=(_rec("pi-00", "siren", T0, T0 + 1000),))
    topic, payload = svc.handle(topics.labels("incidents"), msg.to_bytes()) or ("", b"")
    assert topic == topics.labels_result("incidents")
    result = LabelResult.from_bytes(payload)
    assert (result.batch_id, result.status, result.accepted) == ("b-1", "accepted", 1)
    assert _audit(svc)[-1]["subject"] == "incidents"  # the source is the topic's


def test_a_malformed_label_message_is_refused_audited_and_answered(svc: LabelService) -> None:
    topic, payload = svc.handle(topics.labels("incidents"), b'{"batch_id": 7}') or ("", b"")
    result = LabelResult.from_bytes(payload)
    assert topic == topics.labels_result("incidents") and result.status == "rejected"
    assert result.errors[0].index == -1
    assert _audit(svc)[-1]["kind"] == "labels.rejected"
    assert svc.handle("fleet/v1/pi-00/upload", b"{}") is None


def test_the_store_refuses_a_contradiction_even_when_two_imports_race(tmp_path: Path) -> None:
    """The overlap check runs inside the write transaction: a second connection that
    commits a contradicting label first makes the later import fail as a whole."""
    store = Store(tmp_path / "s.sqlite3", "eu", data_keys=memory_data_keys())
    from cloud_sidecar.errors import LabelError
    from cloud_sidecar.store import LabelSpan

    other = sqlite3.connect(tmp_path / "s.sqlite3")
    other.execute(
        "INSERT INTO labels(device_id, start_ms, end_ms, label, source, import_id,"
        " created_at_ms, region) VALUES ('pi-00', 0, 1000, 'rain', 'x', 'x', 0, 'eu')"
    )
    other.commit()
    with pytest.raises(LabelError):
        store.add_labels(
            [LabelSpan("pi-00", 2000, 3000, "horn"), LabelSpan("pi-00", 500, 1500, "horn")],
            "y",
            "y",
        )
    assert store.label_counts() == {"x": 1}
