"""The daemon's main loop and mailbox (pure logic, in-memory fakes).

The loop with the real broker, TPM, HSM and a never-ending source is
tests/integration/test_daemon_endless.py.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import pytest

from edge_daemon.service import Mailbox, serve


def test_mailbox_keeps_the_latest_message_per_topic_oldest_topic_first() -> None:
    box = Mailbox()
    box.put("a", b"1")
    box.put("b", b"1")
    box.put("a", b"2")  # supersedes a/1, and a moves behind b
    assert box.get(0) == ("b", b"1")
    assert box.get(0) == ("a", b"2")
    assert box.get(0.01) is None


def test_a_full_mailbox_drops_and_counts_messages_for_new_topics_without_blocking() -> None:
    box = Mailbox(max_topics=2)
    for t in ("a", "b", "c"):
        box.put(t, b"x")
    box.put("a", b"y")  # a known topic still updates
    assert box.dropped == 1
    assert [box.get(0), box.get(0), box.get(0)] == [("b", b"x"), ("a", b"y"), None]


def test_mailbox_get_wakes_as_soon_as_a_message_arrives() -> None:
    box = Mailbox()
    threading.Timer(0.05, box.put, ("t", b"m")).start()
    t0 = time.monotonic()
    assert box.get(5.0) == ("t", b"m")
    assert time.monotonic() - t0 < 2.0


@dataclass
class FakeListener:
    alive: bool = True
    error: BaseException | None = None


@dataclass
class FakeOutbox:
    calls: list[str] = field(default_factory=list)
    acked: threading.Event = field(default_factory=threading.Event)
    fail_seal: bool = False

    def seal(self, force: bool = False) -> int:
        self.calls.append("flush" if force else "seal")
        if self.fail_seal:
            raise OSError("disk full")
        return 0

    def resend_due(self) -> int:
        self.calls.append("resend")
        return 0


def _serve(
    listener: FakeListener, outbox: FakeOutbox, box: Mailbox, stop: threading.Event, **kw: object
) -> threading.Thread:
    handled: list[tuple[str, bytes]] = kw.pop("handled", [])  # type: ignore[assignment]
    th = threading.Thread(
        target=serve,
        kwargs={
            "stop": stop,
            "listener": listener,
            "outbox": outbox,
            "mailbox": box,
            "handle": kw.pop("handle", lambda t, p: handled.append((t, p))),
            "report": kw.pop("report", lambda: None),
            "tick_s": 0.01,
        },
        daemon=True,
    )
    th.start()
    return th


def test_the_loop_serves_updates_seals_and_resends_while_the_listener_runs() -> None:
    stop, box, out, handled = threading.Event(), Mailbox(), FakeOutbox(), []
    th = _serve(FakeListener(), out, box, stop, handled=handled)
    box.put("fleet/v1/ota/stable/targets.json", b"meta")
    time.sleep(0.2)
    stop.set()
    th.join(2)
    assert handled == [("fleet/v1/ota/stable/targets.json", b"meta")]
    assert {"seal", "resend"} <= set(out.calls) and "flush" not in out.calls


def test_when_a_finite_source_ends_the_rest_is_sealed_once_and_serving_goes_on() -> None:
    stop, box, out = threading.Event(), Mailbox(), FakeOutbox()
    listener = FakeListener(alive=False)
    handled: list[tuple[str, bytes]] = []
    th = _serve(listener, out, box, stop, handled=handled)
    time.sleep(0.1)
    box.put("ota", b"later")
    time.sleep(0.1)
    stop.set()
    th.join(2)
    assert out.calls.count("flush") == 1
    assert handled == [("ota", b"later")]


def test_errors_in_an_update_or_the_outbox_are_counted_and_the_loop_goes_on() -> None:
    stop, box, out = threading.Event(), Mailbox(), FakeOutbox(fail_seal=True)

    def handle(topic: str, payload: bytes) -> None:
        raise ValueError("bad update")

    result: list[object] = []

    def run() -> None:
        result.append(
            serve(
                stop=stop,
                listener=FakeListener(),  # type: ignore[arg-type]
                outbox=out,  # type: ignore[arg-type]
                mailbox=box,
                handle=handle,
                report=lambda: None,
                tick_s=0.01,
            )
        )

    th = threading.Thread(target=run)
    th.start()
    box.put("t", b"x")
    time.sleep(0.2)
    stop.set()
    th.join(2)
    stats = result[0]
    assert stats.errors >= 2  # type: ignore[attr-defined]
    assert stats.messages == 1  # type: ignore[attr-defined]


def test_a_listener_failure_ends_the_loop_with_that_error() -> None:
    listener = FakeListener(alive=False, error=RuntimeError("capture device gone"))
    with pytest.raises(RuntimeError, match="capture device gone"):
        serve(
            stop=threading.Event(),
            listener=listener,  # type: ignore[arg-type]
            outbox=FakeOutbox(),  # type: ignore[arg-type]
            mailbox=Mailbox(),
            handle=lambda t, p: None,
            report=lambda: None,
            tick_s=0.01,
        )
