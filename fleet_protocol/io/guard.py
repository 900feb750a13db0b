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
- ``counts()`` is a snapshot ``{"<loop>/<ExceptionType>": n}`` for status reports.
"""

from __future__ import annotations

import contextlib
import logging
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


__all__ = ["LoopFaults"]
