"""Audio capture: where the daemon's 16 kHz mono float32 blocks come from.

Sources are plugins chosen by the config's ``type``: ``file`` (WAV/FLAC via libsndfile)
and ``live`` (a sound card via PortAudio). Any other ``AudioSource`` (devstack's
simulated city, a test's endless generator) is handed to the daemon in code, through
the same protocol. ``open_capture`` decides where a configured source runs: live
sources run in their own capture process (``process.py``, ``worker.py``;
docs/adr/0009-capture-process.md) so inference can never make the sound card overrun;
files run inline unless the config says otherwise.
"""

from __future__ import annotations

import threading

from edge_daemon.capture.process import CaptureProcess, CaptureStats
from edge_daemon.capture.sources import BLOCK_SAMPLES, AudioSource, FileSource, Timeline
from edge_daemon.config import CaptureConfig, FileSourceConfig, LiveSourceConfig, SourceConfig

__all__ = [
    "BLOCK_SAMPLES",
    "AudioSource",
    "CaptureProcess",
    "CaptureStats",
    "FileSource",
    "Timeline",
    "open_capture",
    "open_source",
]


def open_source(cfg: SourceConfig, stop: threading.Event | None = None) -> AudioSource:
    """The source itself, in this process."""
    if isinstance(cfg, FileSourceConfig):
        return FileSource(cfg)
    from edge_daemon.capture.live import LiveSource

    return LiveSource(cfg, stop=stop)


def open_capture(
    cfg: SourceConfig, capture: CaptureConfig, stop: threading.Event | None = None
) -> AudioSource:
    """The source in a capture process (live, or when ``isolation`` is ``process``) or inline.

    A file is checked here first either way, so a bad file fails before anything starts.
    """
    isolate = capture.isolation == "process" or (
        capture.isolation == "auto" and isinstance(cfg, LiveSourceConfig)
    )
    if not isolate:
        return open_source(cfg, stop)
    duration = FileSource(cfg).duration_s if isinstance(cfg, FileSourceConfig) else float("inf")
    return CaptureProcess(cfg, capture, stop, duration)
