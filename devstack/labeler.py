"""A downstream label source, as a city's incident system would run it (simulation side).

``send_labels`` publishes ``LabelBatch`` messages on ``fleet/v1/labels/<source>`` with
the source's own client certificate (the broker's ACL lets it write only there and read
only its results) and waits for the sidecar's ``LabelResult`` for each batch.
Invariant: it goes through the broker and the label channel exactly as a real
downstream system does; it never touches the sidecar's store.
"""

from __future__ import annotations

import queue
import uuid
from collections.abc import Sequence

from devstack.errors import DevstackError
from fleet_protocol import topics
from fleet_protocol.errors import ProtocolError
from fleet_protocol.io.mqtt import MqttEndpoint, MqttLink
from fleet_protocol.labels import MAX_LABELS_PER_BATCH, LabelBatch, LabelRecord, LabelResult


def send_labels(
    endpoint: MqttEndpoint,
    source: str,
    records: Sequence[LabelRecord],
    *,
    per_batch: int = 2000,
    timeout_s: float = 30.0,
) -> list[LabelResult]:
    """Send ``records`` in batches of ``per_batch``; return each batch's result."""
    if not 0 < per_batch <= MAX_LABELS_PER_BATCH:
        raise ValueError(f"per_batch must be in 1..{MAX_LABELS_PER_BATCH}")
    results: queue.Queue[bytes] = queue.Queue()
    link = MqttLink(
        endpoint,
        client_id=f"{source}-{uuid.uuid4().hex[:8]}",
        on_message=lambda _t, payload: results.put(payload),
    )
    link.subscribe(topics.labels_result(source), 1)
    link.start(wait_s=15)
    out: list[LabelResult] = []
    try:
        for i in range(0, len(records), per_batch):
            batch = LabelBatch(
                batch_id=f"{source}-{uuid.uuid4().hex[:12]}",
                labels=tuple(records[i : i + per_batch]),
            )
            if not link.publish(topics.labels(source), batch.to_bytes(), qos=1, timeout_s=10):
                raise DevstackError(f"the broker did not take label batch {batch.batch_id}")
            out.append(_result_for(results, batch.batch_id, timeout_s))
    finally:
        link.stop()
    return out


def _result_for(results: queue.Queue[bytes], batch_id: str, timeout_s: float) -> LabelResult:
    while True:
        try:
            payload = results.get(timeout=timeout_s)
        except queue.Empty as e:
            raise DevstackError(f"no result for label batch {batch_id} in {timeout_s} s") from e
        try:
            result = LabelResult.from_bytes(payload)
        except ProtocolError:
            continue
        if result.batch_id == batch_id:
            return result
