"""Is every loop of ``cloud-sidecar serve`` making progress or idle? The answer gates
the systemd watchdog pings, as ``edge_daemon.health`` does for the daemon's stages.

Owns ``Beat`` (one loop's liveness: the work item in hand and since when, items done)
and ``LoopMonitor`` (which loops stalled). The sidecar's loops are event-driven: the
MQTT network thread runs ingest, label batches, device messages and OTA chunk requests;
the fleet worker runs enrollment and renewal off a bounded queue; the HSM reopen loop
runs only while the HSM is away. None of them has work to do at a steady rate, so
"no progress for a while" means nothing for them: an idle loop is healthy. A loop
*stalls* when one work item has been in hand for ``stall_s`` (a handler that never
returns: a hung HSM call, a database lock that is never released, a deadlock), or when
its thread is gone. The main loop (metrics file, audit checkpoints, TUF timestamp
refresh, rollout steps) sends the pings itself, so a hang there stops them by itself.

Invariants: pure logic with an injected clock (no threads, no I/O of its own); each
``Beat`` is driven by one thread at a time (its loop's), read from another without
blocking (plain attribute reads); a wrapped handler's exception passes through
unchanged (the loop's ``LoopFaults.guard`` counts it), after the beat is closed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


class Beat:
    """One loop's liveness; ``working()`` brackets each work item of the loop."""

    def __init__(self, name: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.done = 0
        self._clock = clock
        self._since: float | None = None

    @contextmanager
    def working(self) -> Iterator[None]:
        self._since = self._clock()
        try:
            yield
        finally:
            self._since = None
            self.done += 1

    def wrap(self, handler: Callable[P, R]) -> Callable[P, R]:
        """``handler``, each call bracketed by ``working()``."""

        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            with self.working():
                return handler(*args, **kwargs)

        return run

    def busy_s(self) -> float:
        """Seconds the work item in hand has taken so far; 0 when idle."""
        since = self._since
        return 0.0 if since is None else max(0.0, self._clock() - since)


@dataclass
class LoopMonitor:
    """The loops to watch, each with an optional "is its thread there" check."""

    stall_s: float
    beats: list[Beat] = field(default_factory=list)
    alive: dict[str, Callable[[], bool]] = field(default_factory=dict)

    def watch(self, beat: Beat, alive: Callable[[], bool] | None = None) -> Beat:
        self.beats.append(beat)
        if alive is not None:
            self.alive[beat.name] = alive
        return beat

    def stalled(self) -> dict[str, str]:
        """``{loop: why}`` for every stalled loop, in the order watched; empty when healthy."""
        out = {}
        for beat in self.beats:
            check = self.alive.get(beat.name)
            if check is not None and not check():
                out[beat.name] = "thread gone"
                continue
            busy = beat.busy_s()
            if busy >= self.stall_s:
                out[beat.name] = f"one item in hand for {busy:.0f} s"
        return out
