"""Which serve loops stalled (cloud_sidecar.health): idle is healthy, one item held past
stall_s or a vanished thread is a stall; the app withholds WATCHDOG=1 on a stall."""

from __future__ import annotations

import pytest

from cloud_sidecar.health import Beat, LoopMonitor


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_an_idle_loop_is_healthy_however_long_it_waits() -> None:
    clock = Clock()
    monitor = LoopMonitor(30)
    monitor.watch(Beat("mqtt", clock))
    clock.t += 10_000
    assert monitor.stalled() == {}


def test_one_item_held_past_stall_s_is_a_stall_until_it_returns() -> None:
    clock = Clock()
    monitor = LoopMonitor(30)
    beat = monitor.watch(Beat("fleet", clock))
    with beat.working():
        clock.t += 29
        assert monitor.stalled() == {}
        clock.t += 2
        assert monitor.stalled() == {"fleet": "one item in hand for 31 s"}
    assert monitor.stalled() == {} and beat.done == 1


def test_a_vanished_thread_is_a_stall_even_when_idle() -> None:
    monitor = LoopMonitor(30)
    alive = [True]
    monitor.watch(Beat("fleet", Clock()), lambda: alive[0])
    monitor.watch(Beat("mqtt", Clock()))
    assert monitor.stalled() == {}
    alive[0] = False
    assert monitor.stalled() == {"fleet": "thread gone"}


def test_a_wrapped_handler_returns_its_value_and_its_exception_still_closes_the_item() -> None:
    clock = Clock()
    beat = Beat("mqtt", clock)
    assert beat.wrap(lambda topic, payload: (topic, len(payload)))("t", b"abc") == ("t", 3)

    def boom(topic: str, payload: bytes) -> None:
        clock.t += 100
        raise ValueError("bad message")

    with pytest.raises(ValueError, match="bad message"):
        beat.wrap(boom)("t", b"")
    assert beat.busy_s() == 0 and beat.done == 2
