"""The listening thread: capture → privacy gate → classifier → events and kept samples.

Owns ``Listener`` (one thread that pulls the audio source through
``pipeline.run_stream`` for as long as the source lasts: for a microphone, forever),
``ModelSlot`` (the model the listener runs, swapped atomically by an update) and
``Keeper`` (what happens to each classified window: an event when the score clears the
threshold, and the selection policy's decision to keep it in the replay buffer).

Invariants:
- the listener never waits on the network, the TPM or an update: it publishes events
  without waiting (QoS 0) and writes kept samples to the thread-safe buffer; sealing,
  sending, acks and updates run on the daemon's main loop;
- it stops at the next block once ``stop`` is set, whatever the source;
- a model swap takes effect at the next block: no block is skipped or processed twice;
- an exception ends the thread but is kept (``error``) for the main loop, which turns
  it into the daemon's exit code; a finite source ending is ``ended``, not an error;
- a buffer write that fails (a full disk: SQLite ``SQLITE_FULL`` / ``ENOSPC``) refuses
  that one sample, counted in ``Keeper.refused_write``, and the listener goes on:
  nothing already buffered is touched, and writes succeed again when space returns
  (tests/faults/test_device_disk_full.py);
- a kept sample carries the capture time of its window's first sample
  (``AudioSource.captured_at_ms``), never a label: the device has none.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import numpy.typing as npt

from edge_daemon.buffer import ReplayBuffer
from edge_daemon.capture import AudioSource
from edge_daemon.errors import BufferError_
from edge_daemon.pipeline import Classified, Classifier, StreamStats, run_stream
from edge_daemon.privacy.gate import PrivacyGate
from edge_daemon.selection import Selector
from fleet_protocol import batch, topics
from fleet_protocol.features import SAMPLE_RATE
from fleet_protocol.labels import CLASSES
from fleet_protocol.messages import Event

log = logging.getLogger(__name__)

Blocks = Iterator[npt.NDArray[np.float32]]


class _Timed:
    """A classifier whose ``predict`` reports its duration (the latency metric)."""

    def __init__(self, inner: Classifier, observe: Callable[[float], None]) -> None:
        self._inner = inner
        self._observe = observe
        self.model_sha256 = inner.model_sha256

    def predict(self, features: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        t0 = time.perf_counter()
        try:
            return self._inner.predict(features)
        finally:
            self._observe(time.perf_counter() - t0)


class ModelSlot:
    """The classifier in use; ``swap`` replaces it between two blocks.

    With ``observe``, every ``predict`` call's duration in seconds is reported to it.
    """

    def __init__(
        self, classifier: Classifier, observe: Callable[[float], None] | None = None
    ) -> None:
        self._lock = threading.Lock()
        self._observe = observe
        self._classifier = self._wrap(classifier)

    def _wrap(self, classifier: Classifier) -> Classifier:
        return classifier if self._observe is None else _Timed(classifier, self._observe)

    def get(self) -> Classifier:
        with self._lock:
            return self._classifier

    def swap(self, classifier: Classifier) -> None:
        with self._lock:
            self._classifier = self._wrap(classifier)


class Keeper:
    """Decides, for each classified window, what leaves the listener: events and samples."""

    def __init__(
        self,
        *,
        device: str,
        source: AudioSource,
        selector: Selector,
        buffer: ReplayBuffer,
        event_threshold: float,
        publish: Callable[[str, bytes], bool],
    ) -> None:
        self.device = device
        self._source = source
        self._selector = selector
        self._buffer = buffer
        self._threshold = event_threshold
        self._publish = publish
        self.events = 0
        self.samples = 0
        # windows classified, by predicted label; every class present from the start, so
        # the dict never changes size while another thread copies it
        self.by_label: dict[str, int] = dict.fromkeys(CLASSES, 0)
        self.refused_write = 0  # samples the buffer could not store (a full disk)

    def __call__(self, c: Classified) -> None:
        self.by_label[c.label] = self.by_label.get(c.label, 0) + 1
        captured_ms = self._source.captured_at_ms(round(c.start_s * SAMPLE_RATE))
        if c.score >= self._threshold:
            event = Event(
                device=self.device,
                time_ms=captured_ms,
                label=c.label,
                score=round(c.score, 4),
                model_sha256=c.model_sha256,
            )
            self._publish(topics.events(self.device), event.to_bytes())
            self.events += 1
        reason = self._selector.decide(
            c.score, stream_s=c.start_s, pending_bytes=self._buffer.pending_bytes
        )
        if reason is None:
            return
        meta = batch.SampleMeta(
            sample_id=os.urandom(16).hex(),
            captured_at_ms=captured_ms,
            stream_offset_s=c.start_s,
            predicted=c.label,
            score=min(1.0, max(0.0, c.score)),
            model_sha256=c.model_sha256,
            reason=reason,
        )
        try:
            kept = self._buffer.add(meta, c.features.astype(np.float16))
        except BufferError_ as e:  # a full disk refuses this sample; the listener goes on
            self.refused_write += 1
            if self.refused_write in (1, 10, 100) or self.refused_write % 1000 == 0:
                log.error("buffer write refused (%d so far): %s", self.refused_write, e)
            return
        if kept:
            self.samples += 1


class Listener:
    """Runs the audio source through gate and classifier in its own thread."""

    def __init__(
        self,
        *,
        source: AudioSource,
        gate: PrivacyGate,
        model: ModelSlot,
        on_window: Callable[[Classified], None],
        stop: threading.Event,
        tap: Callable[[Blocks], Blocks] = lambda blocks: blocks,
    ) -> None:
        self._source = source
        self._stop = stop
        self._gate = gate
        self._model = model
        self._on_window = on_window
        self._tap = tap
        self.stats = StreamStats()
        self.error: BaseException | None = None
        self.ended = False
        self.started_at = 0.0
        self._thread = threading.Thread(target=self._run, name="listener", daemon=True)

    def start(self) -> None:
        self.started_at = time.monotonic()
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _until_stopped(self, blocks: Blocks) -> Blocks:
        for block in blocks:
            if self._stop.is_set():
                return
            yield block

    def _run(self) -> None:
        try:
            run_stream(
                self._tap(self._until_stopped(self._source.blocks())),
                self._gate,
                self._model.get,
                self._on_window,
                self.stats,
            )
            self.ended = True
            log.info(
                "audio source ended after %d windows (%d kept)",
                self.stats.windows_in,
                self.stats.windows_kept,
            )
        except BaseException as e:  # kept for the main loop, which decides the exit code
            self.error = e
            log.exception("listener stopped: %s", e)
