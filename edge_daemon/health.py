"""Is every pipeline stage making progress? The answer gates the systemd watchdog pings.

Owns ``Stage`` (a name, a progress counter and whether work is expected of it now),
``StageMonitor`` (decides, from successive readings, which stages stalled) and
``daemon_stages`` (the daemon's stages: capture, gate, classify, uplink).

A stage *stalls* when work is expected of it and its counter has not moved for
``stall_s`` seconds. The daemon sends ``WATCHDOG=1`` only while no stage stalls, so a
capture that hangs, a gate or model that never returns, or an uplink loop that stops
turning lets ``WatchdogSec=`` expire and systemd restarts the daemon. A broker outage is
not a stall: the uplink counts its loop turns (seal, resend attempts), not acks, so the
daemon keeps buffering without restarting while the network is down.

Invariants: pure logic with an injected clock (no threads, no I/O); reading a counter
never blocks (counters are plain ints written by one thread); a stage is never stalled
before ``stall_s`` has passed since the monitor first saw it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from edge_daemon.listen import Listener


@dataclass(frozen=True)
class Stage:
    name: str
    progress: Callable[[], int]
    expected: Callable[[], bool] = lambda: True


@dataclass
class _Seen:
    value: int
    since: float


@dataclass
class StageMonitor:
    stages: list[Stage]
    stall_s: float
    clock: Callable[[], float] = time.monotonic
    _seen: dict[str, _Seen] = field(default_factory=dict)

    def stalled(self) -> list[str]:
        """Names of the stages that stalled, in pipeline order; empty when all progress."""
        now = self.clock()
        out = []
        for stage in self.stages:
            value = stage.progress()
            seen = self._seen.get(stage.name)
            if seen is None or seen.value != value or not stage.expected():
                self._seen[stage.name] = _Seen(value, now)
                continue
            if now - seen.since >= self.stall_s:
                out.append(stage.name)
        return out


def daemon_stages(listener: Listener, loop_turns: Callable[[], int]) -> list[Stage]:
    """The edge daemon's stages, read from the listener's counters and the main loop.

    capture: audio blocks read (expected while the source has not ended);
    gate: windows judged by the privacy gate (every second of audio makes one);
    classify: windows classified (expected while the gate released more than that);
    uplink: main-loop turns that sealed and resent (expected always).
    """
    stats = listener.stats

    def listening() -> bool:
        return listener.alive and not listener.ended

    return [
        Stage("capture", lambda: stats.blocks, listening),
        Stage("gate", lambda: stats.windows_in, listening),
        Stage(
            "classify",
            lambda: stats.windows_classified,
            lambda: listening() and stats.windows_released > stats.windows_classified,
        ),
        Stage("uplink", loop_turns),
    ]
