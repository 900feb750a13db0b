"""The daemon's side of the capture process: spawn it, receive its frames, restart it.

``CaptureProcess`` is an ``AudioSource``: ``blocks()`` starts ``edge_daemon.capture.worker``
in its own process, binds a ZeroMQ PULL socket on an IPC path in a private (0700)
directory, and yields the audio of each frame (docs/adr/0009-capture-process.md).

Invariants:
- frames arrive in ``seq`` order; a gap is counted in ``frames_lost`` and logged;
  the worker's own count of frames it dropped for a lagging consumer arrives in every
  header and is summed over restarts into ``frames_dropped``; overruns and device
  reconnects likewise; none of these is ever silent;
- a capture process that exits without END, or stays silent for ``stall_timeout_s``
  (``STARTUP_S`` at least before its first frame: starting an interpreter on a busy
  CPU is not a stall), is killed and restarted after an exponential backoff (``restart_initial_s`` doubling to
  ``restart_max_s``, reset once an incarnation has lived 30 s); a restarted worker
  resumes at the next expected block, so a file is not replayed from its start;
- a worker that reports a ``CaptureError`` (missing device, bad file) is not restarted:
  the same error is raised here, message intact;
- ``close()`` terminates the worker and removes the socket directory.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import zmq
from pydantic import TypeAdapter

from edge_daemon.capture import wire
from edge_daemon.capture.sources import Timeline
from edge_daemon.config import CaptureConfig, SourceConfig
from edge_daemon.errors import CaptureError

log = logging.getLogger(__name__)
HEALTHY_AFTER_S = 30.0
STARTUP_S = 20.0  # a capture process's first frame may take this long (interpreter start)
EXIT_CAPTURE = 4


@dataclass(frozen=True)
class CaptureStats:
    """Counters of the capture path; also rendered as metrics (``metrics()``)."""

    state: str  # starting | running | lost | restarting | ended | failed | stopped
    frames: int
    frames_dropped: int  # dropped by the capture process for a lagging consumer
    frames_lost: int  # gaps in seq seen here: dropped frames plus those lost in a crash
    overruns: int  # PortAudio input overflows
    device_reconnects: int
    restarts: int  # capture processes restarted after a crash or stall
    pid: int

    def metrics(self) -> dict[str, int]:
        d = asdict(self)
        return {
            f"edge_capture_{k}_total": int(d[k])
            for k in (
                "frames",
                "frames_dropped",
                "frames_lost",
                "overruns",
                "device_reconnects",
                "restarts",
            )
        }


class CaptureProcess:
    duration_s = float("inf")

    def __init__(
        self,
        source: SourceConfig,
        cfg: CaptureConfig,
        stop: threading.Event | None = None,
        duration_s: float = float("inf"),
    ) -> None:
        self.source_json = TypeAdapter(SourceConfig).dump_json(source).decode()
        self.cfg = cfg
        self.duration_s = duration_s
        self._stop = stop if stop is not None else threading.Event()
        self._dir = Path(tempfile.mkdtemp(prefix="edge-capture-"))
        self.endpoint = f"ipc://{self._dir}/frames.sock"
        self._ctx = zmq.Context()
        self._sock: zmq.Socket[bytes] = self._ctx.socket(zmq.PULL)
        self._sock.setsockopt(zmq.RCVHWM, max(1, cfg.max_lag_frames // 2))
        self._sock.setsockopt(zmq.RCVBUF, 8 * 1024)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(self.endpoint)
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._state = "starting"
        self._next_seq = 0
        self._frames = self._lost = self._restarts = 0
        self._base = [0, 0, 0]  # dropped, overruns, reconnects of earlier incarnations
        self._cur = [0, 0, 0]
        self._backoff = cfg.restart_initial_s
        self._spawned_at = 0.0
        self._last_rx = 0.0
        self._heard = False
        self._timeline = Timeline()
        self._samples = 0  # samples delivered by blocks(): the daemon's stream index

    # -- AudioSource --------------------------------------------------------

    def blocks(self) -> Iterator[npt.NDArray[np.float32]]:
        self._spawn()
        try:
            while not self._stop.is_set():
                if self._sock.poll(200):
                    out = self._receive(self._sock.recv())
                    if out is None:
                        continue
                    if isinstance(out, str):
                        return
                    yield out
                    continue
                self._check_alive()
        finally:
            self.close()

    def captured_at_ms(self, sample_index: int) -> int:
        return self._timeline.at(sample_index)

    # -- supervision --------------------------------------------------------

    def stats(self) -> CaptureStats:
        with self._lock:
            tot = [b + c for b, c in zip(self._base, self._cur, strict=True)]
            return CaptureStats(
                self._state,
                self._frames,
                tot[0],
                self._lost,
                tot[1],
                tot[2],
                self._restarts,
                self._proc.pid if self._proc is not None else 0,
            )

    def _spawn(self) -> None:
        cmd = [
            sys.executable,
            "-m",
            "edge_daemon.capture.worker",
            "--endpoint",
            self.endpoint,
            "--source",
            self.source_json,
            "--hwm",
            str(max(1, self.cfg.max_lag_frames // 2)),
            "--start",
            str(self._next_seq),
            "--parent-pid",
            str(os.getpid()),
        ]
        if self._restarts:
            cmd.append("--restarted")  # a live device missing now is lost, not misconfigured
        self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        self._spawned_at = self._last_rx = time.monotonic()
        self._heard = False  # this incarnation has not sent a frame yet
        log.info("capture process %d started at block %d", self._proc.pid, self._next_seq)

    def _receive(self, data: bytes) -> npt.NDArray[np.float32] | str | None:
        try:
            f = wire.decode(data)
        except ValueError as e:
            log.warning("ignored a malformed capture frame: %s", e)
            return None
        self._last_rx = time.monotonic()
        self._heard = True
        if f.kind == wire.ERROR:
            with self._lock:
                self._state = "failed"
            raise CaptureError(f.text)
        if f.kind == wire.END:
            with self._lock:
                self._cur[0] = max(self._cur[0], f.dropped)
                self._state = "ended"
            return "end"
        with self._lock:
            prev_dropped = self._cur[0]
            self._cur = [f.dropped, f.overruns, f.reconnects]
            self._state = f.state
        if f.dropped > prev_dropped:
            log.warning(
                "capture dropped %d frame(s) for a lagging consumer", f.dropped - prev_dropped
            )
        if f.kind != wire.AUDIO or f.seq < self._next_seq:
            return None
        if f.seq > self._next_seq:
            gap = f.seq - self._next_seq
            log.warning("capture gap: %d frame(s) before block %d never arrived", gap, f.seq)
            with self._lock:
                self._lost += gap
        with self._lock:
            self._frames += 1
        self._next_seq = f.seq + 1
        self._timeline.mark(self._samples, f.captured_ns // 1_000_000)
        self._samples += len(f.audio)
        return f.audio

    def _check_alive(self) -> None:
        assert self._proc is not None
        code = self._proc.poll()
        # a worker still starting (imports on a loaded CPU) is not a stalled one
        limit = (
            self.cfg.stall_timeout_s if self._heard else max(self.cfg.stall_timeout_s, STARTUP_S)
        )
        if code is None and time.monotonic() - self._last_rx < limit:
            return
        if code == EXIT_CAPTURE:
            with self._lock:
                self._state = "failed"
            raise CaptureError(
                f"capture process exited with code {code} without a message; see its log"
            )
        if code is None:
            log.error(
                "capture process %d silent for %.1f s; killing it",
                self._proc.pid,
                self.cfg.stall_timeout_s,
            )
            self._proc.kill()
            self._proc.wait()
            code = self._proc.returncode
        self._restart(code)

    def _restart(self, code: int) -> None:
        if time.monotonic() - self._spawned_at >= HEALTHY_AFTER_S:
            self._backoff = self.cfg.restart_initial_s
        with self._lock:
            self._restarts += 1
            self._state = "restarting"
            self._base = [b + c for b, c in zip(self._base, self._cur, strict=True)]
            self._cur = [0, 0, 0]
        log.error(
            "capture process exited (code %s); restart %d in %.1f s",
            code,
            self._restarts,
            self._backoff,
        )
        if self._stop.wait(self._backoff):
            return
        self._backoff = min(self._backoff * 2, self.cfg.restart_max_s)
        self._spawn()

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with self._lock:
            if self._state not in ("ended", "failed"):
                self._state = "stopped"
        if not self._sock.closed:
            self._sock.close()
            self._ctx.term()
        shutil.rmtree(self._dir, ignore_errors=True)
