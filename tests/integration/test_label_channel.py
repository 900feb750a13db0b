"""The label channel through the real broker: a downstream system sends, the sidecar stores.

A label source publishes ``LabelBatch`` messages with its certificate; the sidecar
serving in this process answers each on the source's result topic, stores accepted
labels (joined to uploaded samples by capture time) and refuses bad ones whole, while
it keeps serving uploads.
"""

from __future__ import annotations

import pytest

from devstack.errors import DevstackError
from devstack.labeler import send_labels
from fleet_protocol.labels import LabelRecord

from .conftest import LABEL_SOURCE as SOURCE
from .conftest import Cloud

pytestmark = pytest.mark.integration
T0 = 1_764_000_000_000


def test_a_device_cannot_send_labels(cloud: Cloud) -> None:
    """The broker's ACL lets only the label source write its topic: a device's publish is
    dropped, so no result ever comes back."""
    slot = cloud.stack.devices[0]
    with pytest.raises(DevstackError, match="no result"):
        send_labels(
            cloud.stack.endpoint(slot.cert),
            SOURCE,
            [LabelRecord(device=slot.device_id, label="rain", start_ms=T0, end_ms=T0 + 1000)],
            timeout_s=3,
        )


def _labels(cloud: Cloud) -> int:
    return sum(cloud.app.store.label_counts().values())


def test_a_label_source_sends_labels_and_gets_them_accepted(cloud: Cloud) -> None:
    device = cloud.stack.devices[0].device_id
    records = [
        LabelRecord(
            device=device, label="siren", start_ms=T0 + i * 10_000, end_ms=T0 + i * 10_000 + 4000
        )
        for i in range(25)
    ]
    before = _labels(cloud)
    results = send_labels(
        cloud.stack.endpoint(cloud.stack.label_source_certs[SOURCE]), SOURCE, records, per_batch=10
    )
    assert [(r.status, r.accepted) for r in results] == [
        ("accepted", 10),
        ("accepted", 10),
        ("accepted", 5),
    ]
    assert _labels(cloud) == before + 25
    assert cloud.app.store.label_counts()[SOURCE] >= 25


def test_bad_labels_are_refused_whole_and_the_sidecar_keeps_serving(cloud: Cloud) -> None:
    device = cloud.stack.devices[1].device_id
    before = _labels(cloud)
    endpoint = cloud.stack.endpoint(cloud.stack.label_source_certs[SOURCE])
    [unknown] = send_labels(
        endpoint,
        SOURCE,
        [
            LabelRecord(device=device, label="rain", start_ms=T0, end_ms=T0 + 1000),
            LabelRecord(device="pi-nobody", label="rain", start_ms=T0, end_ms=T0 + 1000),
        ],
    )
    assert unknown.status == "rejected"
    assert [(e.index, e.reason) for e in unknown.errors] == [(1, "unknown_device")]
    [contradiction] = send_labels(
        endpoint,
        SOURCE,
        [
            LabelRecord(device=device, label="rain", start_ms=T0, end_ms=T0 + 5000),
            LabelRecord(device=device, label="wind", start_ms=T0 + 4000, end_ms=T0 + 6000),
        ],
    )
    assert (
        contradiction.status == "rejected" and contradiction.errors[0].reason == "contradicts_label"
    )
    assert _labels(cloud) == before
    [ok] = send_labels(
        endpoint, SOURCE, [LabelRecord(device=device, label="wind", start_ms=T0, end_ms=T0 + 500)]
    )
    assert ok.status == "accepted"
    assert cloud.app.metrics.get("labels_rejected_total", reason="unknown_device") >= 1
