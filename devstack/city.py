"""The simulated city: scene audio for devices, and the ground truth it knows.

Simulation reaches production code only through the doors the real world uses:

- audio: ``SceneSource`` is an ``edge_daemon.capture.AudioSource`` (finite or endless),
  handed to an in-process ``EdgeApp`` exactly where a microphone would be; or a scene
  is written to a WAV file (``write_stream``) that a device's ``file`` source replays
  with its real capture start time;
- labels: ``city_labels`` turns the ground truth into ``LabelRecord``s, which the demo
  sends over the label channel (MQTT, with a label source's own certificate) like any
  downstream system; the daemon never sees them;
- scoring: ``devstack.evaluate`` scores what the device's gate and model do against
  the truth held here.

Invariants: ground truth never leaves devstack except as labels on the label channel;
the same seeds give the same audio and truth; an endless source renders one scene
chunk at a time (bounded memory) and never ends on its own.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt

from devstack.scene.stream import Scene, SceneSpec, render_scene
from edge_daemon.capture import Timeline
from fleet_protocol.features import SAMPLE_RATE
from fleet_protocol.labels import WINDOW_MS, LabelRecord

log = logging.getLogger(__name__)

BLOCK_SAMPLES = SAMPLE_RATE // 10  # 100 ms, like a microphone
CHUNK_S = 60  # an endless source renders this much scene at a time


@dataclass(frozen=True)
class Truth:
    """What the simulation knows about a stream: per-window labels and speech frames."""

    start_ms: int
    window_labels: tuple[str, ...]
    speech_frames: npt.NDArray[np.bool_]

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "start_ms": self.start_ms,
                "window_labels": list(self.window_labels),
                "speech_frames": np.flatnonzero(self.speech_frames).tolist(),
                "n_frames": len(self.speech_frames),
            }
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Truth:
        obj = json.loads(data)
        frames = np.zeros(int(obj["n_frames"]), dtype=bool)
        frames[np.asarray(obj["speech_frames"], dtype=np.int64)] = True
        return cls(int(obj["start_ms"]), tuple(obj["window_labels"]), frames)


class SceneSource:
    """Scene audio as an ``AudioSource``: one scene, or scenes back to back for ever.

    With ``endless=True`` chunks of ``CHUNK_S`` seconds are rendered with seeds
    ``spec.seed, spec.seed + 1, ...``; ``truth`` grows as chunks are rendered.
    ``realtime`` paces blocks like a sound card (the daemon then never runs ahead).
    """

    def __init__(
        self,
        spec: SceneSpec,
        *,
        endless: bool = False,
        realtime: bool = False,
        start_ms: int | None = None,
        block_samples: int = BLOCK_SAMPLES,
    ) -> None:
        self.spec = spec
        self.endless = endless
        self.realtime = realtime
        self.block_samples = block_samples
        self.duration_s = float("inf") if endless else float(spec.duration_s)
        self.start_ms = int(time.time() * 1000) if start_ms is None else start_ms
        self._timeline = Timeline(self.start_ms)
        self._labels: list[str] = []
        self._speech: list[npt.NDArray[np.bool_]] = []
        self.samples_delivered = 0

    def _scenes(self) -> Iterator[Scene]:
        if not self.endless:
            yield render_scene(self.spec)
            return
        i = 0
        while True:
            yield render_scene(replace(self.spec, seed=self.spec.seed + i, duration_s=CHUNK_S))
            i += 1

    def blocks(self) -> Iterator[npt.NDArray[np.float32]]:
        t0 = time.monotonic()
        for scene in self._scenes():
            self._labels += scene.window_labels
            self._speech.append(scene.speech_frames)
            for i in range(0, len(scene.audio), self.block_samples):
                block = scene.audio[i : i + self.block_samples]
                self.samples_delivered += len(block)
                if self.realtime:
                    delay = t0 + self.samples_delivered / SAMPLE_RATE - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                yield block

    def captured_at_ms(self, sample_index: int) -> int:
        return self._timeline.at(sample_index)

    @property
    def truth(self) -> Truth:
        frames = np.concatenate(self._speech) if self._speech else np.zeros(0, bool)
        return Truth(self.start_ms, tuple(self._labels), frames)


def write_stream(spec: SceneSpec, wav: Path, start_ms: int) -> Truth:
    """Render ``spec`` to a 16-bit WAV a device replays as a ``file`` source; its truth
    (windows from ``start_ms``) goes beside it as ``<wav>.truth.json``."""
    import soundfile as sf

    scene = render_scene(spec)
    wav.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(wav), scene.audio, SAMPLE_RATE, subtype="PCM_16")
    truth = Truth(start_ms, scene.window_labels, scene.speech_frames)
    wav.with_suffix(".truth.json").write_bytes(truth.to_json())
    return truth


def city_labels(device: str, truth: Truth, *, coverage: float, seed: int) -> list[LabelRecord]:
    """What the city's downstream systems would report about a device's stream.

    Runs of equal window labels become one time range; each run is reported with
    probability ``coverage`` (a city does not label everything). Times are the
    windows' capture times, as the device stamps them.
    """
    rng = np.random.default_rng(seed)
    records: list[LabelRecord] = []
    labels = truth.window_labels
    i = 0
    while i < len(labels):
        j = i
        while j + 1 < len(labels) and labels[j + 1] == labels[i]:
            j += 1
        if rng.random() < coverage:
            records.append(
                LabelRecord(
                    device=device,
                    label=labels[i],
                    start_ms=truth.start_ms + i * WINDOW_MS,
                    end_ms=truth.start_ms + (j + 1) * WINDOW_MS,
                )
            )
        i = j + 1
    return records
