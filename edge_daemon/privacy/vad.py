"""Silero VAD: one speech probability per 32 ms chunk, streaming.

Owns: locating the ONNX file shipped by the ``silero-vad`` package (without importing
it: its ``__init__`` imports torch), reading it under a byte cap, and the streaming
state (context and recurrent state per stream). The model itself runs split
(``edge_daemon.privacy.silero``): the chunks of one call go through the encoder as one
batch, then the recurrent decoder steps through them in order.

Invariants:
- torch is never imported; only numpy and onnxruntime;
- input is mono float32 at 16 kHz; the stream is cut into ``CHUNK_SAMPLES`` (512)
  chunks aligned to the stream start (the last ``reset()``), whatever the sizes of
  the blocks handed to ``chunk_probs``, so the probabilities do not depend on them;
- each chunk is fed with the 64 samples before it prepended (``CONTEXT_SAMPLES``)
  and the recurrent state of the previous chunk, exactly as silero-vad 5+/6's own
  ``OnnxWrapper`` does (zeros at stream start);
- several streams (``streams``) are scored together, each with its own state; one
  stream's samples never influence another's probabilities;
- a single call accepts at most ``MAX_BLOCK_SAMPLES`` samples per stream (input cap).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
from pathlib import Path

import numpy as np
import numpy.typing as npt

from edge_daemon.errors import InferenceError
from edge_daemon.privacy.silero import SileroModel

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
CHUNK_SAMPLES = 512  # 32 ms: the only chunk size the 16 kHz model accepts
CONTEXT_SAMPLES = 64
MAX_STREAMS = 16
MAX_BLOCK_SAMPLES = 60 * SAMPLE_RATE
MODEL_FILE = "silero_vad.onnx"  # opset 16, 8/16 kHz, v6 weights
MAX_MODEL_BYTES = 16 * 1024 * 1024

FloatArray = npt.NDArray[np.float32]


def default_model_path() -> Path:
    """``silero_vad/data/silero_vad.onnx`` of the installed package, found without importing it."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidate = Path(loc) / "data" / MODEL_FILE
            if candidate.is_file():
                return candidate
    try:
        for f in importlib.metadata.files("silero-vad") or ():
            if f.name == MODEL_FILE and f.parent.name == "data":
                return Path(str(f.locate()))
    except importlib.metadata.PackageNotFoundError:
        pass
    raise InferenceError(
        f"silero-vad model {MODEL_FILE} not found; install silero-vad (--no-deps is enough)"
    )


class SileroVad:
    """Streaming Silero VAD over ``streams`` parallel audio streams (default 1).

    With several streams, each chunk of all streams goes through the model as one
    batch (cheaper than one run per stream); each stream keeps its own recurrent
    state and context. Not thread-safe; ``spawn`` shares the loaded model.
    """

    def __init__(self, model_path: Path | None = None, threads: int = 1, streams: int = 1) -> None:
        path = model_path or default_model_path()
        try:
            size = path.stat().st_size
            if size > MAX_MODEL_BYTES:
                raise InferenceError(f"VAD model {path} is {size} bytes > cap {MAX_MODEL_BYTES}")
            data = path.read_bytes()
        except OSError as exc:
            raise InferenceError(f"VAD model {path} unreadable: {exc}") from exc
        self._setup(SileroModel(data, path, threads), path, streams)
        log.debug("silero VAD loaded from %s (%d threads, %d streams)", path, threads, streams)

    def _setup(self, model: SileroModel, path: Path, streams: int) -> None:
        if not 1 <= streams <= MAX_STREAMS:
            raise ValueError(f"streams must be 1..{MAX_STREAMS}, got {streams}")
        self.model = model
        self.model_path = path
        self.streams = streams
        self.reset()

    def spawn(self, streams: int = 1) -> SileroVad:
        """Another VAD on the same loaded model (own state)."""
        twin = object.__new__(SileroVad)
        twin._setup(self.model, self.model_path, streams)
        return twin

    def reset(self) -> None:
        """Start new streams: zero recurrent state and context, drop buffered samples."""
        self._state: FloatArray = np.zeros((2, self.streams, 128), dtype=np.float32)
        self._context: FloatArray = np.zeros((self.streams, CONTEXT_SAMPLES), dtype=np.float32)
        self._pending: FloatArray = np.zeros((self.streams, 0), dtype=np.float32)

    @property
    def pending_samples(self) -> int:
        """Samples (per stream) received but not yet part of a complete chunk."""
        return int(self._pending.shape[1])

    def chunk_probs(self, audio: npt.ArrayLike) -> FloatArray:
        """Speech probability for each chunk completed by ``audio`` (may be empty).

        ``audio`` is 1-D (one stream: returns shape (chunks,)) or (streams, n)
        (returns shape (streams, chunks)).
        """
        x = np.asarray(audio, dtype=np.float32)
        one_d = x.ndim == 1
        if one_d:
            x = x[None, :]
        if x.ndim != 2 or x.shape[0] != self.streams:
            raise ValueError(f"VAD wants ({self.streams}, n) or 1-D audio, got {x.shape}")
        if x.shape[1] > MAX_BLOCK_SAMPLES:
            raise ValueError(f"block of {x.shape[1]} samples > cap {MAX_BLOCK_SAMPLES}")
        buf = np.concatenate((self._pending, x), axis=1) if self._pending.size else x
        n = buf.shape[1] // CHUNK_SAMPLES
        chunks = buf[:, : n * CHUNK_SAMPLES].reshape(self.streams, n, CHUNK_SAMPLES)
        out = self._score(chunks.transpose(1, 0, 2)).T
        self._pending = np.array(buf[:, n * CHUNK_SAMPLES :], dtype=np.float32)
        return out[0] if one_d else out

    def flush(self) -> FloatArray:
        """Zero-pad the last partial chunk (if any) and score it; the streams continue.

        Shape as ``chunk_probs`` would return for one chunk or none.
        """
        n = self.pending_samples
        out = np.zeros((self.streams, 1 if n else 0), dtype=np.float32)
        if n:
            chunk = np.zeros((self.streams, CHUNK_SAMPLES), dtype=np.float32)
            chunk[:, :n] = self._pending
            self._pending = np.zeros((self.streams, 0), dtype=np.float32)
            out[:, 0] = self._score(chunk[None])[0]
        return out[0] if self.streams == 1 else out

    def _score(self, chunks: FloatArray) -> FloatArray:
        """Probabilities ``(n, streams)`` for chunks ``(n, streams, 512)`` in stream order."""
        n = chunks.shape[0]
        if not n:
            return np.zeros((0, self.streams), dtype=np.float32)
        inputs = context_inputs(self._context, chunks)
        self._context = np.array(chunks[-1, :, -CONTEXT_SAMPLES:], dtype=np.float32)
        gates = self.model.encode(inputs.reshape(n * self.streams, -1))
        gates = gates.reshape(n, self.streams, -1)
        out = np.empty((n, self.streams), dtype=np.float32)
        for i in range(n):
            out[i], self._state = self.model.step(gates[i], self._state)
        return out


def context_inputs(context: FloatArray, chunks: FloatArray) -> FloatArray:
    """``(n, s, 64 + 512)`` model inputs: each chunk with the 64 samples before it
    (``context`` ``(s, 64)`` before the first)."""
    tails = np.concatenate((context[None], chunks[:-1, :, -CONTEXT_SAMPLES:]), axis=0)
    return np.ascontiguousarray(np.concatenate((tails, chunks), axis=2), dtype=np.float32)
