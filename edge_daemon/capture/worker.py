"""The capture process: reads a source and pushes frames to the daemon over ZeroMQ.

Run by ``CaptureProcess`` as ``python -m edge_daemon.capture.worker``. It owns the
sound card and nothing else: no model, no gate, no buffer, so inference can never
delay a read.

Invariants:
- the read loop never waits for the consumer: a frame is sent with ``NOBLOCK``; when
  the consumer lags by more than the high-water mark the frame is dropped, counted in
  ``dropped`` (sent in every later frame header) and logged, never silently;
- every frame carries the capture time of its first sample (``captured_ns``), from the
  source's own timeline (a file's start time plus its offset; a live read's clock);
- a source that runs without a clock (a file not paced in real time) is not
  dropped from: it waits for the consumer instead, since it cannot overrun;
- a ``CaptureError`` ends the process with exit code 4 after an ERROR frame carrying the
  message; the natural end of a finite source sends END and exits 0;
- a restarted capture process (``--restarted``) treats a live device that is missing as
  lost and retries it: it was there before, so its absence is not a configuration mistake;
- it never outlives the daemon that started it: the kernel sends it SIGTERM when its
  parent dies (``PR_SET_PDEATHSIG``), and a watcher stops it if it is re-parented anyway
  (an orphan would hold the sound card and, on the ALSA ``file`` plugin, write its
  mirror without bound).
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Protocol

import numpy as np
import numpy.typing as npt
import zmq
from pydantic import TypeAdapter

from edge_daemon.capture import wire
from edge_daemon.config import FileSourceConfig, LiveSourceConfig, SourceConfig
from edge_daemon.errors import CaptureError
from fleet_protocol.features import SAMPLE_RATE

log = logging.getLogger("edge_daemon.capture.worker")
EXIT_CAPTURE = 4
FRAME_SAMPLES = SAMPLE_RATE // 10  # file and scene frames: 100 ms, like a live block


class FrameSource(Protocol):
    block_samples: int

    def blocks(self, start: int = 0) -> Iterator[npt.NDArray[np.float32]]: ...

    def captured_at_ms(self, sample_index: int) -> int: ...


class _Counters:
    def __init__(self) -> None:
        self.dropped = 0
        self.last_log = 0.0


def _open(
    cfg: SourceConfig, stop: threading.Event, restarted: bool = False
) -> tuple[FrameSource, bool]:
    """The source, and whether it runs against a clock (and so must never wait)."""
    from edge_daemon.capture.live import LiveSource
    from edge_daemon.capture.sources import FileSource

    if isinstance(cfg, LiveSourceConfig):
        return LiveSource(cfg, stop=stop, retry_missing=restarted), True
    assert isinstance(cfg, FileSourceConfig)
    return FileSource(cfg, FRAME_SAMPLES), cfg.realtime


def run(
    sock: zmq.Socket[bytes],
    source: FrameSource,
    clocked: bool,
    start: int,
    stop: threading.Event,
    c: _Counters,
) -> None:
    seq = start
    pos = start * source.block_samples  # sample index of the next block in the source
    for block in source.blocks(start):
        if stop.is_set():
            return
        captured_ns = source.captured_at_ms(pos) * 1_000_000
        pos += len(block)
        state = getattr(source, "state", "running")
        frame = wire.Frame(
            wire.AUDIO if len(block) else wire.STATUS,
            state if state in wire.STATES else "running",
            seq,
            captured_ns,
            c.dropped,
            int(getattr(source, "overruns", 0)),
            int(getattr(source, "reconnects", 0)),
            block,
        )
        if len(block):
            seq += 1
        data = wire.encode(frame)
        if not clocked:
            while not stop.is_set():
                try:
                    sock.send(data, zmq.NOBLOCK)
                    break
                except zmq.Again:
                    stop.wait(0.01)
            continue
        try:
            sock.send(data, zmq.NOBLOCK)
        except zmq.Again:
            if frame.kind == wire.AUDIO:
                c.dropped += 1
                now = time.monotonic()
                if c.dropped == 1 or now - c.last_log >= 10.0:
                    c.last_log = now
                    log.warning(
                        "consumer lags: dropped frame %d (%d dropped so far)", frame.seq, c.dropped
                    )


def _final(sock: zmq.Socket[bytes], kind: int, text: str, c: _Counters) -> None:
    frame = wire.Frame(
        kind, "stopped", 0, time.time_ns(), c.dropped, 0, 0, np.zeros(0, dtype=np.float32), text
    )
    try:
        sock.send(wire.encode(frame))
    except zmq.ZMQError:
        log.error("could not report to the daemon: %s", text)


PR_SET_PDEATHSIG = 1


def _die_with_parent(stop: threading.Event, parent: int | None) -> None:
    """SIGTERM from the kernel when the parent dies, and a watcher for re-parenting.

    ``parent`` is the pid the daemon passed: a daemon that died while this process was
    still importing (before the prctl below) leaves it re-parented already, and
    ``os.getppid()`` alone would then be taken for the parent (an orphan that captured
    for ever and filled a disk in a test, 2026-12-02)."""
    expected = os.getppid() if parent is None else parent
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the watcher alone
        log.debug("prctl(PR_SET_PDEATHSIG) unavailable")

    def gone() -> bool:
        if os.getppid() != expected:
            log.error("the daemon (pid %d) is gone: capture stops", expected)
            stop.set()
            return True
        return False

    if gone():  # died before the prctl: no signal will come
        return

    def watch() -> None:
        while not stop.wait(1.0):
            if gone():
                return

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="edge-daemon-capture")
    p.add_argument("--endpoint", required=True)
    p.add_argument("--source", required=True, help="source config as JSON")
    p.add_argument("--hwm", type=int, default=25)
    p.add_argument("--start", type=int, default=0, help="first block index")
    p.add_argument(
        "--restarted", action="store_true", help="an earlier capture process ran this source"
    )
    p.add_argument("--parent-pid", type=int, default=None, help="the daemon's pid")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    _die_with_parent(stop, args.parent_pid)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, args.hwm)
    sock.setsockopt(zmq.SNDBUF, 8 * 1024)
    sock.setsockopt(zmq.LINGER, 2000)
    sock.setsockopt(zmq.SNDTIMEO, 2000)
    sock.connect(args.endpoint)
    counters = _Counters()
    try:
        cfg: SourceConfig = TypeAdapter(SourceConfig).validate_json(args.source)
        source, clocked = _open(cfg, stop, args.restarted)
        run(sock, source, clocked, args.start, stop, counters)
    except CaptureError as e:
        log.error("capture: %s", e)
        _final(sock, wire.ERROR, str(e), counters)
        return EXIT_CAPTURE
    if not stop.is_set():
        _final(sock, wire.END, "end of source", counters)
    sock.close()
    ctx.term()
    return 0


if __name__ == "__main__":
    sys.exit(main())
