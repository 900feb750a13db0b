"""Live capture from a sound card through PortAudio (``sounddevice``), behind a small seam.

Owns: resolving the configured input device (index or part of its name), checking that it
does 16 kHz mono, reading blocks, counting overruns PortAudio reports, and retrying a
device that goes away with exponential backoff.

Invariants:
- the PortAudio stream sits behind ``StreamBackend``/``InputStream``; ``SoundDeviceBackend``
  is the only code that imports ``sounddevice`` (unit tests use a fake backend; the
  integration tests drive the real one through ALSA's ``file`` plugin);
- a device that is missing or cannot do 16 kHz mono *at start* is one ``CaptureError``
  naming the device, the input devices PortAudio sees, and what to do;
- a device lost while running is never fatal: ``state`` becomes ``"lost"``, it is
  reopened after ``retry_initial_s``, doubling up to ``retry_max_s``; while lost,
  ``blocks()`` yields an empty block about once a second so the consumer knows the
  capture side is alive (a heartbeat, not audio); a source built with
  ``retry_missing`` (a restarted capture process: the device was there before) treats
  a device missing at start the same way;
- PortAudio lists devices once, when it initialises; after a failure the backend
  re-initialises it before the next resolve or open, so a device that came back (under
  the same name, possibly another index or ALSA card number) is found;
- every overrun flag is counted in ``overruns`` and logged (rate-limited), never silent.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from edge_daemon.capture.sources import Timeline
from edge_daemon.config import LiveSourceConfig
from edge_daemon.errors import CaptureError
from fleet_protocol.features import SAMPLE_RATE

log = logging.getLogger(__name__)
EMPTY = np.zeros(0, dtype=np.float32)
DEVICE_HINT = (
    "set source.device to one of them (an index, or part of the name), check that the "
    "microphone is connected (arecord -l), or that the I2S overlay is enabled in config.txt"
)


class DeviceLostError(Exception):
    """The stream failed after it was opened (unplugged, driver reset). Retried."""


class InputStream(Protocol):
    def read(self, frames: int) -> tuple[npt.NDArray[np.float32], bool]:
        """Block until ``frames`` mono samples are read; the flag is PortAudio's overflow."""
        ...

    def close(self) -> None: ...


class StreamBackend(Protocol):
    def resolve(self, device: str | int | None) -> str:
        """The device's full name; ``CaptureError`` naming it and the alternatives if absent."""
        ...

    def open(self, device: str | int | None, blocksize: int, latency: str) -> InputStream:
        """Open a started 16 kHz mono float32 input stream; ``DeviceLostError`` on failure."""
        ...


class SoundDeviceBackend:
    """PortAudio through ``sounddevice``."""

    def __init__(self) -> None:
        try:
            import sounddevice
        except OSError as e:  # libportaudio missing
            raise CaptureError(
                f"PortAudio is not installed ({e}); install it: apt-get install libportaudio2"
            ) from e
        self.sd: Any = sounddevice
        self._stale = False  # the device list may be out of date (a device failed)

    def _refresh(self) -> None:
        """Re-list devices after a failure: PortAudio enumerates only in ``Pa_Initialize``.

        ``sd._terminate()``/``sd._initialize()`` is sounddevice's documented way to do it
        (python-sounddevice issue #125); no stream of ours is open at this point.
        """
        if not self._stale:
            return
        self._stale = False
        try:
            self.sd._terminate()
            self.sd._initialize()
        except self.sd.PortAudioError as e:
            self._stale = True
            raise DeviceLostError(f"PortAudio could not re-list devices: {e}") from e
        log.debug("PortAudio re-initialised; %d input device(s)", len(self._inputs()))

    def _lost(self, e: Exception) -> DeviceLostError:
        self._stale = True
        return DeviceLostError(str(e))

    def _inputs(self) -> list[str]:
        return [
            f"{i}: {d['name']}"
            for i, d in enumerate(self.sd.query_devices())
            if d["max_input_channels"] > 0
        ]

    def resolve(self, device: str | int | None) -> str:
        try:
            self._refresh()
        except DeviceLostError as e:
            raise CaptureError(str(e)) from e
        try:
            info = self.sd.query_devices(device, "input")
        except (ValueError, self.sd.PortAudioError) as e:
            self._stale = True
            seen = "; ".join(self._inputs()) or "none: PortAudio sees no input device"
            want = "the default input device" if device is None else f"input device {device!r}"
            raise CaptureError(
                f"{want} not found ({e}); input devices: {seen}; {DEVICE_HINT}"
            ) from e
        try:
            self.sd.check_input_settings(
                device=device, channels=1, samplerate=SAMPLE_RATE, dtype="float32"
            )
        except (ValueError, self.sd.PortAudioError) as e:
            self._stale = True
            raise CaptureError(
                f"input device {info['name']!r} cannot capture {SAMPLE_RATE} Hz mono ({e}); "
                "use an ALSA device that resamples (e.g. 'default' or a plughw: device) or "
                "another microphone"
            ) from e
        return str(info["name"])

    def open(self, device: str | int | None, blocksize: int, latency: str) -> InputStream:
        self._refresh()
        try:
            stream = self.sd.InputStream(
                device=device,
                channels=1,
                samplerate=SAMPLE_RATE,
                dtype="float32",
                blocksize=blocksize,
                latency=latency,
            )
        except (ValueError, self.sd.PortAudioError) as e:
            raise self._lost(e) from e
        try:
            stream.start()
        except self.sd.PortAudioError as e:
            stream.close(ignore_errors=True)
            raise self._lost(e) from e
        return _SdStream(stream, self)


class _SdStream:
    def __init__(self, stream: Any, backend: SoundDeviceBackend) -> None:
        self._s, self._backend = stream, backend
        self._error: type[Exception] = backend.sd.PortAudioError

    def read(self, frames: int) -> tuple[npt.NDArray[np.float32], bool]:
        try:
            data, overflowed = self._s.read(frames)
        except self._error as e:
            raise self._backend._lost(e) from e
        return np.ascontiguousarray(data[:, 0], dtype=np.float32), bool(overflowed)

    def close(self) -> None:
        self._s.abort(ignore_errors=True)  # a lost device fails both: ignore, still close
        self._s.close(ignore_errors=True)


class LiveSource:
    """An endless ``AudioSource`` over a sound card, surviving device loss."""

    duration_s = float("inf")

    def __init__(
        self,
        cfg: LiveSourceConfig,
        backend: StreamBackend | None = None,
        stop: threading.Event | None = None,
        retry_missing: bool = False,
    ) -> None:
        """``retry_missing``: a device missing now is lost, not a mistake (it was seen before)."""
        self.cfg = cfg
        self.backend = backend if backend is not None else SoundDeviceBackend()
        self.block_samples = SAMPLE_RATE * cfg.block_ms // 1000
        self.stop = stop if stop is not None else threading.Event()
        self.state = "starting"
        self.overruns = 0
        self.reconnects = 0
        self._last_overrun_log = 0.0
        self.device_name = "default" if cfg.device is None else str(cfg.device)
        self._resolved = False
        self._timeline = Timeline()
        try:
            self.device_name = self.backend.resolve(cfg.device)  # fails fast, clearly
            self._resolved = True
        except CaptureError as e:
            if not retry_missing:
                raise
            self.state = "lost"
            log.error("input device %r is gone (%s); will retry", self.device_name, e)

    def blocks(self, start: int = 0) -> Iterator[npt.NDArray[np.float32]]:
        delivered = start * self.block_samples  # sample index of the next block
        delay = self.cfg.retry_initial_s
        while not self.stop.is_set():
            try:
                if not self._resolved:
                    self.device_name = self.backend.resolve(self.cfg.device)
                    self._resolved = True
                stream = self.backend.open(self.cfg.device, self.block_samples, self.cfg.latency)
            except (DeviceLostError, CaptureError) as e:
                yield from self._wait_lost(delay, str(e))
                delay = min(delay * 2, self.cfg.retry_max_s)
                continue
            if self.state == "lost":
                self.reconnects += 1
                log.warning(
                    "input device %r is back (reconnect %d)", self.device_name, self.reconnects
                )
            self.state = "running"
            delay = self.cfg.retry_initial_s
            try:
                while not self.stop.is_set():
                    block, overflowed = stream.read(self.block_samples)
                    if overflowed:
                        self._overrun()
                    # read returns when the block's last sample is in: it began a block ago
                    now_ms = time.time_ns() // 1_000_000
                    self._timeline.mark(delivered, now_ms - len(block) * 1000 // SAMPLE_RATE)
                    delivered += len(block)
                    yield block
            except DeviceLostError as e:
                log.error("input device %r lost: %s", self.device_name, e)
                self.state = "lost"
            finally:
                stream.close()
        self.state = "stopped"

    def _wait_lost(self, delay: float, why: str) -> Iterator[npt.NDArray[np.float32]]:
        self.state = "lost"
        log.error(
            "input device %r unavailable (%s); retrying in %.1f s", self.device_name, why, delay
        )
        end = time.monotonic() + delay
        while not self.stop.is_set() and (left := end - time.monotonic()) > 0:
            self.stop.wait(min(1.0, left))
            yield EMPTY  # heartbeat: alive, no audio

    def _overrun(self) -> None:
        self.overruns += 1
        now = time.monotonic()
        if now - self._last_overrun_log >= 10.0:
            self._last_overrun_log = now
            log.warning("input overrun on %r (%d so far)", self.device_name, self.overruns)

    def captured_at_ms(self, sample_index: int) -> int:
        return self._timeline.at(sample_index)
