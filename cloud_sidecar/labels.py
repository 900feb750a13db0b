"""Labels from outside the device: the label channel's service and the CSV import.

A city's downstream systems (incident management, a human reviewer, another sensor) send
``(device, time range or event id, label)`` records: as ``LabelBatch`` messages on
``fleet/v1/labels/<source>`` (the broker's ACL lets only that source write there, so the
source is the topic's, never the payload's), or as a CSV file an operator imports with
``cloud-sidecar labels import --csv FILE --source NAME``. Both go through
``LabelService.import_records``.

Invariants:
- an import is all or nothing: an unknown device, an unknown class, a malformed time, a
  record contradicting another in the same import or a stored label (overlapping span,
  same device, another class) refuses the whole import, names every record at fault,
  and changes nothing;
- every import, accepted or refused, is written to the audit log (source, channel, id,
  content digest, counts) and counted in metrics by outcome and reason;
- labels are joined to samples later, by device and capture time (``Store.labelled_samples``),
  so they may arrive before the samples they describe; unlabelled samples stay;
- every untrusted read is capped: ``LabelBatch.MAX_BYTES`` per message,
  ``MAX_CSV_BYTES`` and ``MAX_CSV_ROWS`` per file.

CSV: UTF-8, a header row, columns ``device,label`` and either ``start,end`` or
``event_id``; times are Unix milliseconds or ISO 8601 with a time zone
(``2026-12-02T08:15:00Z``); end is exclusive. Extra columns are refused.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from pydantic import ValidationError

from cloud_sidecar.audit import AuditLog
from cloud_sidecar.errors import LabelError
from cloud_sidecar.metrics import Metrics
from cloud_sidecar.store import LabelSpan
from cloud_sidecar.store_api import LabelRecords
from fleet_protocol import topics
from fleet_protocol.errors import ProtocolError
from fleet_protocol.labels import LabelBatch, LabelRecord, LabelResult
from fleet_protocol.labels import LabelError as LabelErrorMsg

log = logging.getLogger(__name__)

MAX_CSV_BYTES = 16 * 1024 * 1024
MAX_CSV_ROWS = 100_000
MAX_REPORTED = 100  # problems named in a result; the audit entry holds the count
CSV_COLUMNS = {"device", "label", "start", "end", "event_id"}


class LabelService:
    def __init__(self, store: LabelRecords, audit: AuditLog, metrics: Metrics) -> None:
        self.store = store
        self.audit = audit
        self.metrics = metrics

    # -- the MQTT channel ------------------------------------------------------

    def handle(self, topic: str, payload: bytes) -> tuple[str, bytes] | None:
        """One ``LabelBatch`` message → the (topic, bytes) of its ``LabelResult``."""
        try:
            source = topics.source_of_labels(topic)
        except ProtocolError as e:
            self.metrics.inc("labels_rejected_total", reason=e.reason)
            log.warning("label message on an unexpected topic %s: %s", topic[:120], e)
            return None
        digest = hashlib.sha256(payload).hexdigest()
        try:
            batch = LabelBatch.from_bytes(payload)
        except ProtocolError as e:
            result = self.refuse(source, "mqtt", "?", digest, 0, [(-1, e.reason, str(e))])
        else:
            result = self.import_records(
                batch.labels, source=source, via="mqtt", import_id=batch.batch_id, digest=digest
            )
        return topics.labels_result(source), result.to_bytes()

    # -- CSV import ------------------------------------------------------------

    def import_csv(self, path: Path, source: str) -> LabelResult:
        """Read (capped), parse and import a CSV file; refused as a whole on any problem."""
        import_id = path.name[:64]
        try:
            if path.stat().st_size > MAX_CSV_BYTES:
                raise LabelError(
                    "too large",
                    [(-1, "too_large", f"{path} exceeds {MAX_CSV_BYTES} bytes; split it")],
                )
            data = path.read_bytes()
        except OSError as e:
            return self.refuse(
                source, "csv", import_id, "", 0, [(-1, "unreadable", f"{path}: {e.strerror}")]
            )
        except LabelError as e:
            return self.refuse(source, "csv", import_id, "", 0, e.problems)
        digest = hashlib.sha256(data).hexdigest()
        try:
            records = parse_csv(data)
        except LabelError as e:
            return self.refuse(source, "csv", import_id, digest, 0, e.problems)
        return self.import_records(
            records, source=source, via="csv", import_id=import_id, digest=digest
        )

    # -- both channels -------------------------------------------------------

    def import_records(
        self,
        records: Sequence[LabelRecord],
        *,
        source: str,
        via: str,
        import_id: str,
        digest: str,
    ) -> LabelResult:
        problems: list[tuple[int, str, str]] = []
        devices: dict[str, bool] = {}
        for i, r in enumerate(records):
            if r.device not in devices:
                devices[r.device] = self.store.device(r.device) is not None
            if not devices[r.device]:
                problems.append((i, "unknown_device", f"no device {r.device!r} is registered"))
        spans = [LabelSpan(r.device, *r.span(), r.label) for r in records]
        problems += _contradictions(spans)
        if not problems:
            try:
                n = self.store.add_labels(spans, source, f"{source}/{import_id}")
            except LabelError as e:
                problems = e.problems
            else:
                self.metrics.inc("labels_imported_total", n, source=source, via=via)
                self.audit.append(
                    "labels.imported",
                    source,
                    via=via,
                    import_id=import_id,
                    digest=digest,
                    labels=n,
                    devices=sorted(devices),
                )
                log.info("imported %d labels from %s (%s)", n, source, via)
                return LabelResult(batch_id=import_id, status="accepted", accepted=n, errors=())
        return self.refuse(source, via, import_id, digest, len(records), problems)

    def refuse(
        self,
        source: str,
        via: str,
        import_id: str,
        digest: str,
        n: int,
        problems: list[tuple[int, str, str]],
    ) -> LabelResult:
        """Refuse an import as a whole: audit, count, and the result naming the problems."""
        reasons = sorted({reason for _, reason, _ in problems})
        for reason in reasons:
            self.metrics.inc("labels_rejected_total", reason=reason)
        self.audit.append(
            "labels.rejected",
            source,
            via=via,
            import_id=import_id,
            digest=digest,
            labels=n,
            problems=len(problems),
            reasons=reasons,
        )
        log.warning(
            "refused %d labels from %s (%s): %s",
            n,
            source,
            via,
            "; ".join(m for *_, m in problems[:3]),
        )
        return LabelResult(
            batch_id=import_id[:64] or "?",
            status="rejected",
            accepted=0,
            errors=tuple(
                LabelErrorMsg(index=i, reason=reason[:64], message=msg[:500])
                for i, reason, msg in problems[:MAX_REPORTED]
            ),
        )


def _contradictions(spans: list[LabelSpan]) -> list[tuple[int, str, str]]:
    """Records of one import that overlap another record of another class, same device."""
    order = sorted(range(len(spans)), key=lambda i: (spans[i].device_id, spans[i].start_ms))
    problems: list[tuple[int, str, str]] = []
    open_spans: list[int] = []  # earlier spans of the same device still running
    device = None
    for i in order:
        s = spans[i]
        if s.device_id != device:
            device, open_spans = s.device_id, []
        open_spans = [j for j in open_spans if spans[j].end_ms > s.start_ms]
        for j in open_spans:
            if spans[j].label != s.label:
                problems.append(
                    (i, "contradicts_label", f"record {i} ({s.label}) overlaps record {j}"
                     f" ({spans[j].label}) on {s.device_id}")
                )  # fmt: skip
                break
        open_spans.append(i)
    return problems


def parse_csv(data: bytes) -> list[LabelRecord]:
    """CSV bytes → label records; ``LabelError`` naming every bad row (1-based lines)."""
    if len(data) > MAX_CSV_BYTES:
        raise LabelError(
            f"CSV of {len(data)} bytes exceeds {MAX_CSV_BYTES}; split it",
            [(-1, "too_large", f"{len(data)} bytes > {MAX_CSV_BYTES}")],
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise LabelError("CSV is not UTF-8", [(-1, "malformed", str(e)[:200])]) from e
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    try:
        header = set(reader.fieldnames or ())
    except csv.Error as e:
        raise LabelError("CSV header unreadable", [(-1, "malformed", str(e)[:200])]) from e
    if not {"device", "label"} <= header or not header <= CSV_COLUMNS:
        raise LabelError(
            f"CSV columns must be device,label and start,end or event_id; got {sorted(header)}",
            [(-1, "malformed", f"columns {sorted(header)}")],
        )
    records: list[LabelRecord] = []
    problems: list[tuple[int, str, str]] = []
    try:
        for row in reader:
            line = reader.line_num
            if len(records) + len(problems) >= MAX_CSV_ROWS:
                raise LabelError(
                    f"CSV has more than {MAX_CSV_ROWS} rows; split it",
                    [(-1, "too_large", f"> {MAX_CSV_ROWS} rows")],
                )
            try:
                records.append(_record(row))
            except (ValueError, ValidationError) as e:
                problems.append((line, "malformed", f"line {line}: {_why(e)}"))
    except csv.Error as e:
        problems.append((reader.line_num, "malformed", f"line {reader.line_num}: {e}"))
    if problems:
        raise LabelError(f"{len(problems)} bad row(s) in the CSV", problems)
    if not records:
        raise LabelError("the CSV holds no labels", [(-1, "empty", "no rows")])
    return records


def _record(row: dict[str, str | None]) -> LabelRecord:
    if None in row or any(v is None for v in row.values()):
        raise ValueError("wrong number of fields")
    fields: dict[str, object] = {"device": row["device"], "label": row["label"]}
    if row.get("event_id"):
        fields["event_id"] = row["event_id"]
    if row.get("start") or row.get("end"):
        fields["start_ms"] = _time_ms(str(row.get("start") or ""))
        fields["end_ms"] = _time_ms(str(row.get("end") or ""))
    return LabelRecord.model_validate(fields)


def _time_ms(value: str) -> int:
    v = value.strip()
    if v.isdigit():
        return int(v)
    try:
        t = datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError as e:
        raise ValueError(f"{v[:40]!r} is neither Unix ms nor ISO 8601") from e
    if t.tzinfo is None:
        raise ValueError(f"{v[:40]!r} has no time zone (add Z or +01:00)")
    return round(t.timestamp() * 1000)


def _why(e: Exception) -> str:
    if isinstance(e, ValidationError):
        err = e.errors(include_url=False)[0]
        loc = ".".join(str(x) for x in err["loc"])
        return f"{loc + ': ' if loc else ''}{err['msg']}"[:300]
    return str(e)[:300]
