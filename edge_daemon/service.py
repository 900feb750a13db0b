"""The daemon's main loop: serves acks, updates, resends and status while audio flows.

Owns ``Mailbox`` (messages from the network thread that need the main loop: the OTA
tree) and ``serve`` (the loop itself). The listener thread captures and classifies on
its own; this loop never waits for audio, and audio never waits for it.

Each tick (at most ``tick_s``, sooner when a message arrives): hand the next mailbox
message to the OTA client; seal full batches; resend batches unacknowledged past their
retry interval; when the source has ended, seal what is left once; write the status
report when something changed or ``report_s`` passed. Stops when ``stop`` is set.

Invariants:
- the mailbox keeps the latest message per topic (retained OTA metadata supersedes
  itself), for at most ``MAX_TOPICS`` topics; a message for a further topic is dropped
  and counted, never blocks the network thread;
- an exception from the OTA client, the outbox or the report is logged and counted
  (``LoopStats.errors`` and ``faults``, loops ``main`` and ``report``) and the loop goes on (no input kills the loop); the listener's own failure (a capture or
  model error) ends the loop by re-raising it, so the daemon exits with its code.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from edge_daemon.listen import Listener
from edge_daemon.uplink import Outbox
from fleet_protocol.io.guard import LoopFaults

log = logging.getLogger(__name__)

MAX_TOPICS = 64


class Mailbox:
    """Latest payload per topic, oldest topic first; safe between threads."""

    def __init__(self, max_topics: int = MAX_TOPICS) -> None:
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._cond = threading.Condition()
        self._max = max_topics
        self.dropped = 0

    def put(self, topic: str, payload: bytes) -> None:
        with self._cond:
            if topic not in self._items and len(self._items) >= self._max:
                self.dropped += 1
                log.warning("mailbox full (%d topics); dropped a message on %s", self._max, topic)
                return
            self._items.pop(topic, None)  # a newer message for a topic replaces the older
            self._items[topic] = payload
            self._cond.notify()

    def get(self, timeout: float) -> tuple[str, bytes] | None:
        with self._cond:
            if not self._items:
                self._cond.wait(timeout)
            if not self._items:
                return None
            return self._items.popitem(last=False)


@dataclass
class LoopStats:
    ticks: int = 0
    messages: int = 0
    errors: int = 0


def serve(
    *,
    stop: threading.Event,
    listener: Listener,
    outbox: Outbox,
    mailbox: Mailbox,
    handle: Callable[[str, bytes], None],
    report: Callable[[], None],
    tick_s: float = 0.5,
    report_s: float = 5.0,
    faults: LoopFaults | None = None,
) -> LoopStats:
    """Run the main loop until ``stop``; re-raise the listener's failure, if any."""
    stats = LoopStats()
    flushed = False
    last_report = 0.0
    while not stop.is_set():
        stats.ticks += 1
        item = mailbox.get(timeout=tick_s)
        changed = False
        try:
            if item is not None:
                stats.messages += 1
                handle(*item)
                changed = True
            if not listener.alive:
                if listener.error is not None:
                    raise listener.error
                if not flushed:  # a finite source ended: send what is left
                    outbox.seal(force=True)
                    flushed = changed = True
            outbox.seal(force=False)
            outbox.resend_due()
        except Exception as e:
            if listener.error is not None and not listener.alive:
                raise
            stats.errors += 1
            if faults is not None:
                faults.record("main", e)
            else:
                log.exception("main loop: error (the daemon keeps serving)")
        if outbox.acked.is_set():
            outbox.acked.clear()
            changed = True
        now = time.monotonic()
        if changed or now - last_report >= report_s:
            try:
                report()
            except Exception as e:
                stats.errors += 1
                if faults is not None:
                    faults.record("report", e)
                else:
                    log.exception("main loop: status report failed")
            last_report = now
    return stats
