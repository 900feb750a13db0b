"""A real ALSA capture device on a machine with no sound card: alsa-lib's ``file`` PCM.

``pcm.filemic`` is a ``file`` PCM over a ``null`` slave with an ``infile``: capturing from
it returns the infile's bytes. PortAudio lists it like any ALSA device, so the daemon's
real ``SoundDeviceBackend``, ``LiveSource`` and capture process run unchanged on it. No
kernel module, no alsa-plugins: ``file`` and ``null`` are built into libasound2, which
libportaudio2 (scripts/bootstrap.sh) depends on.

What alsa-lib 1.2.8 does, measured, and why this helper is built the way it is:

- PortAudio reads the ALSA configuration once, in ``Pa_Initialize`` (``import
  sounddevice``): the capture must run in a process started with ``env()``, which
  points ``HOME`` at a directory holding the ``.asoundrc``.
- The file plugin reads its infile in ``mmap_begin``. A ``plug`` above it (to convert
  S16_LE) asks for the whole contiguous slave buffer but commits only what fits in its
  own, so samples are skipped at every buffer wrap. With no plug PortAudio opens the
  device in the format it was asked for (float32), so the infile holds the int16
  samples as float32 (``x / 32768``, exact) and PortAudio passes them through unchanged.
- ``null`` has no clock: reads of a regular infile return at once, never overrun, and
  past the end of the file return stale buffer contents (no error, no zeros).
- A FIFO as infile (``PacedWriter``) gives the device a clock: reads block until the
  writer's next 100 ms block, and a writer that holds back makes reads hang as a wedged
  driver would. The infile is opened when the PCM is opened, including PortAudio's
  probe in ``Pa_Initialize``: a missing infile makes PortAudio list ``filemic`` without
  inputs, i.e. the device is absent.
- The ``file`` output mirrors what was captured; its name records the rate, channels and
  format ALSA was opened with (``%r``, ``%c``, ``%f``).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

RATE = 16_000
BLOCK = 1600  # LiveSource's 100 ms block
DEVICE = "filemic"

ASOUNDRC = """\
pcm.{name} {{
    type file
    slave.pcm {{ type null }}
    infile "{infile}"
    file "{mirror_dir}/mirror-%r-%c-%f.raw"
    format "raw"
}}
"""

LIST_INPUTS = r"""
import json, sounddevice as sd
print(json.dumps([[i, d["name"]] for i, d in enumerate(sd.query_devices())
                  if d["max_input_channels"] > 0]))
"""

HINT = (
    "The live-capture tests need PortAudio (libportaudio2) and alsa-lib (libasound2, "
    "libasound2-data), which scripts/bootstrap.sh installs; the 'file' and 'null' PCM "
    "plugins are built into alsa-lib, and 'null' reads /dev/full."
)


def ramp(n_blocks: int) -> npt.NDArray[np.int16]:
    """Distinct int16 samples, -32768 upwards: every block is identifiable by content."""
    n = n_blocks * BLOCK
    assert n <= 65_536, "a ramp longer than 65536 samples would repeat"
    return (np.arange(n) - 32_768).astype(np.int16)


def as_float(samples: npt.NDArray[np.int16]) -> npt.NDArray[np.float32]:
    """What a 16-bit microphone's samples are in float32 (PortAudio's scaling)."""
    return (samples.astype(np.float32) / 32_768).astype(np.float32)


def block_positions(
    blocks: list[npt.NDArray[np.float32]], samples: npt.NDArray[np.int16]
) -> list[int]:
    """Index in ``samples`` where each block starts; AssertionError if one is not a run of it."""
    ref = as_float(samples)
    out = []
    for b in blocks:
        assert len(b) == BLOCK, f"a block of {len(b)} samples, expected {BLOCK}"
        p = round(float(b[0]) * 32_768) + 32_768
        assert 0 <= p <= len(ref) - BLOCK, f"block starts with {b[0]}, not a sample of the file"
        np.testing.assert_array_equal(b, ref[p : p + BLOCK], err_msg=f"block at sample {p}")
        out.append(p)
    return out


@dataclass
class AlsaMic:
    """An ``.asoundrc`` in ``home`` defining ``filemic``, reading ``infile``."""

    home: Path
    infile: Path
    mirror_dir: Path = field(init=False)

    def __post_init__(self) -> None:
        self.mirror_dir = self.home / "mirror"
        self.mirror_dir.mkdir(parents=True, exist_ok=True)
        (self.home / ".asoundrc").write_text(
            ASOUNDRC.format(name=DEVICE, infile=self.infile, mirror_dir=self.mirror_dir)
        )

    def env(self) -> dict[str, str]:
        """The environment of a process that should see ``filemic`` (and the host's ALSA)."""
        env = dict(os.environ, HOME=str(self.home))
        env.pop("XDG_CONFIG_HOME", None)  # alsa.conf reads $XDG_CONFIG_HOME/alsa/asoundrc too
        return env

    def write(self, samples: npt.NDArray[np.int16]) -> None:
        """A regular infile: the device delivers these samples as fast as it is read."""
        as_float(samples).astype("<f4").tofile(self.infile)

    def inputs(self) -> list[tuple[int, str]]:
        """The input devices PortAudio lists in a fresh process with this configuration."""
        r = subprocess.run(
            [sys.executable, "-c", LIST_INPUTS],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if r.returncode != 0:
            pytest.fail(
                f"PortAudio did not start (exit {r.returncode}): {r.stderr[-2000:]}\n{HINT}"
            )
        return [(int(i), str(n)) for i, n in json.loads(r.stdout)]

    def require_listed(self) -> int:
        """``filemic``'s PortAudio index; fails the test, with what to install, if absent."""
        seen = self.inputs()
        for i, name in seen:
            if name == DEVICE:
                return i
        pytest.fail(
            f"PortAudio does not list the ALSA file-plugin device {DEVICE!r} as an input "
            f"(it lists {seen or 'no input device'}; config {self.home / '.asoundrc'}). {HINT}"
        )

    def mirrors(self) -> list[str]:
        return sorted(p.name for p in self.mirror_dir.iterdir())


class PacedWriter(threading.Thread):
    """Feeds a FIFO infile one 100 ms block every 100 ms: a device with a clock.

    ``hold()`` (or ``hold_at``) stops writing but keeps the FIFO open, so the reader's next
    read hangs (a wedged driver); ``held`` is set while it holds; ``release()`` resumes. The writer keeps its end open across readers
    (PortAudio's probe, a killed and restarted capture process), so nothing it wrote is
    discarded; when the FIFO path is replaced it reconnects to the new one. After the last
    block it keeps the FIFO open (reads hang rather than return stale audio) until
    ``stop()``.
    """

    def __init__(
        self,
        fifo: Path,
        samples: npt.NDArray[np.int16],
        hold_at: int | None = None,
        period_s: float = 0.1,
    ) -> None:
        """``hold_at``: hold by itself once that many blocks are written."""
        super().__init__(daemon=True, name="paced-fifo-writer")
        self.fifo, self.period_s, self.hold_at = fifo, period_s, hold_at
        data = as_float(samples).astype("<f4")
        self.blocks = [data[i : i + BLOCK].tobytes() for i in range(0, len(data), BLOCK)]
        self.written = 0
        self.connects = 0
        self._halt = threading.Event()
        self._go = threading.Event()
        self._go.set()
        self.held = threading.Event()
        self.error: BaseException | None = None
        os.mkfifo(fifo)

    def hold(self) -> None:
        self._go.clear()

    def release(self) -> None:
        self._go.set()

    def stop(self) -> None:
        self._halt.set()
        self._go.set()
        self.join(5)

    def run(self) -> None:
        try:
            self._run()
        except BaseException as e:  # surfaced by the test through .error
            self.error = e

    def _connect(self) -> int | None:
        while not self._halt.is_set():
            try:
                fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as e:
                if e.errno not in (errno.ENXIO, errno.ENOENT):  # no reader yet / path gone
                    raise
                self._halt.wait(0.005)
                continue
            self.connects += 1
            return fd
        return None

    def _replaced(self, fd: int) -> bool:
        try:
            return os.stat(self.fifo).st_ino != os.fstat(fd).st_ino
        except FileNotFoundError:
            return True

    def _write(self, fd: int, data: bytes) -> bool:
        """Write all of ``data``; False if the FIFO was replaced (reconnect)."""
        view = memoryview(data)
        while view and not self._halt.is_set():
            try:
                view = view[os.write(fd, view) :]
            except BlockingIOError:  # pipe full: the reader is slow or not reading yet
                self._halt.wait(0.005)
            except BrokenPipeError:  # no reader right now (probe closed, reader killed)
                if self._replaced(fd):
                    return False
                self._halt.wait(0.005)
        return True

    def _run(self) -> None:
        fd = self._connect()
        while fd is not None and not self._halt.is_set():
            due = time.monotonic()
            while self.written < len(self.blocks) and not self._halt.is_set():
                if self.written == self.hold_at:
                    self.hold_at = None
                    self._go.clear()
                if not self._go.is_set():
                    self.held.set()
                    self._go.wait()
                    self.held.clear()
                    due = time.monotonic()
                self._halt.wait(max(0.0, due - time.monotonic()))
                if not self._write(fd, self.blocks[self.written]):
                    break
                self.written += 1
                due += self.period_s
            else:
                self._halt.wait()  # all written: keep the FIFO open until stopped
                break
            os.close(fd)  # the FIFO was replaced: the device is another one now
            fd = self._connect()
        if fd is not None:
            os.close(fd)
