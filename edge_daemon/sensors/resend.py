"""Re-publishing the telemetry that a broker outage held back.

Owns the resend loop over ``TelemetryStore.unpublished``/``mark_published``: while the
link is up, rows not yet published are regrouped into ``Telemetry`` messages (the rows of
one message were stored together: consecutive ids, same ``time_ms`` and ``period_ms``)
and published again, oldest first, in batches of at most ``batch_rows`` rows.

Invariants:
- a message's rows are marked published only after its publish succeeded; the first
  failure ends the round (the link went down again) and the rest waits, so the resent
  messages go out oldest first and none is skipped;
- delivery is at least once: a message whose acknowledgement was lost is sent again;
- a batch never splits a message unless that one message fills the batch;
- eviction stays the store's (``max_rows``, oldest first): a row evicted before it was
  resent is gone, and marking it is a no-op;
- live telemetry is not held back behind the backlog: new messages go out as they are
  measured, and each carries its own ``time_ms``;
- the loop runs on its own thread, checks every ``period_s`` and stops with the shared
  stop event (within one publish timeout).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from edge_daemon.errors import EdgeError
from edge_daemon.sensors.store import TelemetryStore
from fleet_protocol.io.guard import LoopFaults
from fleet_protocol.telemetry import MAX_READINGS, Reading, Telemetry

log = logging.getLogger(__name__)

Row = tuple[int, int, int, Reading]  # (row id, time_ms, period_ms, reading)
BATCH_ROWS = 1024
PERIOD_S = 5.0


def _message(device: str, key: tuple[int, int], readings: list[Reading]) -> Telemetry:
    return Telemetry(device=device, time_ms=key[0], period_ms=key[1], readings=tuple(readings))


def regroup(device: str, rows: list[Row]) -> list[tuple[list[int], Telemetry]]:
    """``rows`` (oldest first) as the messages they were stored from: ``(ids, telemetry)``."""
    out: list[tuple[list[int], Telemetry]] = []
    ids: list[int] = []
    readings: list[Reading] = []
    key = (0, 0)  # (time_ms, period_ms) of the message being gathered
    for row_id, time_ms, period_ms, reading in rows:
        same = row_id == ids[-1] + 1 and (time_ms, period_ms) == key if ids else False
        if ids and (not same or len(ids) == MAX_READINGS):
            out.append((ids, _message(device, key, readings)))
            ids, readings = [], []
        key = (time_ms, period_ms)
        ids.append(row_id)
        readings.append(reading)
    if ids:
        out.append((ids, _message(device, key, readings)))
    return out


class TelemetryResender:
    def __init__(
        self,
        device: str,
        store: TelemetryStore,
        publish: Callable[[Telemetry], bool],
        link_up: Callable[[], bool],
        batch_rows: int = BATCH_ROWS,
        period_s: float = PERIOD_S,
        faults: LoopFaults | None = None,
    ) -> None:
        self.device, self.store, self._publish, self._link_up = device, store, publish, link_up
        self.faults = faults if faults is not None else LoopFaults()
        self.batch_rows, self.period_s = batch_rows, period_s
        self.resent = 0  # messages re-published
        self._thread: threading.Thread | None = None

    def resend_once(self) -> int:
        """Re-publish one batch; the number of rows marked published (0: nothing to do,
        the link is down, or its first publish failed)."""
        if not self._link_up():
            return 0
        rows = self.store.unpublished(self.batch_rows)
        messages = regroup(self.device, rows)
        if len(rows) == self.batch_rows and len(messages) > 1:
            messages.pop()  # may go on past this batch: it leads the next one, whole
        marked = 0
        for ids, t in messages:
            try:
                ok = self._publish(t)
            except Exception as e:
                log.warning("telemetry resend failed: %s", e)
                ok = False
            if not ok:
                break
            self.store.mark_published(ids)
            marked += len(ids)
            self.resent += 1
        if marked:
            log.debug("re-published %d telemetry row(s) held back by an outage", marked)
        return marked

    def drain(self, stop: threading.Event) -> int:
        """Batch after batch until nothing is left, the link fails or ``stop`` is set."""
        total = 0
        while not stop.is_set():
            try:
                n = self.resend_once()
            except EdgeError as e:  # the store failed; try again next period
                log.error("%s", e)
                break
            if n == 0:
                break
            total += n
        return total

    def start(self, stop: threading.Event) -> None:
        def loop() -> None:
            while True:
                with self.faults.guard("telemetry_resend"):
                    self.drain(stop)
                if stop.wait(self.period_s):
                    return

        self._thread = threading.Thread(target=loop, name="telemetry-resend", daemon=True)
        self._thread.start()

    def join(self, timeout: float = 15.0) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
