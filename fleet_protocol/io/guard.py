"""Crash-proof loops: every thread of both services catches, counts, logs and goes on.

Owns ``LoopFaults``: a thread-safe count of the exceptions each named loop caught at its
top level (the MQTT network thread's message handler, the device's main loop, the
certificate renewer, the sensor and telemetry-resend loops, the sidecar's HSM reopen
and metrics loops). A loop wraps one iteration's work in ``faults.guard(loop)``.

Invariants:
- ``guard`` swallows any ``Exception`` the body raises (never ``BaseException``:
  ``SystemExit`` and ``KeyboardInterrupt`` still stop the process), counts it under
  ``(loop, exception type)``, logs it, and calls ``on_fault(loop, kind)`` (the sidecar's
  Prometheus counter ``loop_errors_total``); the hook's own failure is swallowed too,
  so a guarded loop never dies of input, whoever sent it;
- logging is bounded: the first ``LOG_FULL`` faults of a kind per loop carry a
  traceback, later ones one line every ``LOG_EVERY``; a flood of bad messages cannot
  fill the disk with tracebacks;
- ``BoundedWorker`` moves work off a thread that must stay responsive (the MQTT network
  thread): a bounded queue, one guarded thread, drops counted;
- ``counts()`` is a snapshot ``{"<loop>/<ExceptionType>": n}`` for status reports.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections import Counter
from collections.abc import Callable, Iterator

log = logging.getLogger(__name__)

LOG_FULL = 5
LOG_EVERY = 100

FaultHook = Callable[[str, str], None]


class LoopFaults:
    def __init__(self, on_fault: FaultHook | None = None) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, str]] = Counter()
        self._on_fault = on_fault

    @contextlib.contextmanager
    def guard(self, loop: str) -> Iterator[None]:
        """Run the ``with`` body; an ``Exception`` from it is recorded, never raised."""
        try:
            yield
        except Exception as e:
            self.record(loop, e)

    def record(self, loop: str, e: Exception) -> None:
        kind = type(e).__name__
        with self._lock:
            self._counts[(loop, kind)] += 1
            n = self._counts[(loop, kind)]
        if n <= LOG_FULL:
            log.error("%s: %s caught; the loop goes on", loop, kind, exc_info=e)
        elif n % LOG_EVERY == 0:
            log.error("%s: %d x %s caught so far (latest: %s)", loop, n, kind, str(e)[:200])
        if self._on_fault is not None:
            try:
                self._on_fault(loop, kind)
            except Exception:  # a broken counter must not kill the loop it guards
                log.exception("fault hook failed")

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {f"{loop}/{kind}": n for (loop, kind), n in sorted(self._counts.items())}

    def total(self, loop: str | None = None) -> int:
        with self._lock:
            return sum(n for (name, _), n in self._counts.items() if loop in (None, name))


class BoundedWorker:
    """One thread that handles ``(topic, payload)`` items from a bounded queue.

    For work that must stay off the MQTT network thread (enrollment signs in the HSM):
    ``offer`` never blocks; a full queue drops the item and counts it (``dropped``);
    the handler runs under ``faults.guard(name)``, so no item ends the thread.
    """

    def __init__(
        self,
        name: str,
        handle: Callable[[str, bytes], None],
        faults: LoopFaults,
        max_items: int = 64,
    ) -> None:
        self.name = name
        self.dropped = 0
        self._handle = handle
        self._faults = faults
        self._items: queue.Queue[tuple[str, bytes] | None] = queue.Queue(max_items)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        """The worker's thread runs (False before ``start`` and after ``stop``)."""
        return self._thread.is_alive()

    def offer(self, topic: str, payload: bytes) -> bool:
        try:
            self._items.put_nowait((topic, payload))
            return True
        except queue.Full:
            self.dropped += 1
            log.warning("%s: queue full; dropped a message on %s", self.name, topic[:120])
            return False

    def _run(self) -> None:
        while (item := self._items.get()) is not None:
            with self._faults.guard(self.name):
                self._handle(*item)

    def stop(self, timeout_s: float = 5.0) -> None:
        if not self._thread.is_alive():
            return
        with contextlib.suppress(queue.Full):
            self._items.put(None, timeout=timeout_s)
        self._thread.join(timeout_s)


__all__ = ["BoundedWorker", "LoopFaults"]
