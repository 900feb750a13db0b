"""Silero VAD run through onnxruntime: one speech probability per 32 ms chunk.

Owns: locating the ONNX file shipped by the ``silero-vad`` package (without importing
it: its ``__init__`` imports torch), the onnxruntime session and the streaming state.

Invariants:
- torch is never imported; only numpy and onnxruntime;
- input is mono float32 at 16 kHz; the stream is cut into ``CHUNK_SAMPLES`` (512)
  chunks aligned to the stream start (the last ``reset()``), whatever the sizes of
  the blocks handed to ``chunk_probs``, so the probabilities do not depend on them;
- each chunk is fed with the 64 samples before it prepended (``CONTEXT_SAMPLES``)
  and the recurrent state of the previous chunk, exactly as silero-vad 5+/6's own
  ``OnnxWrapper`` does (zeros at stream start);
- several streams (``streams``) are scored as one batch per chunk, each with its own
  state; one stream's samples never influence another's probabilities;
- a single call accepts at most ``MAX_BLOCK_SAMPLES`` samples per stream (input cap).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from edge_daemon.errors import InferenceError

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
        except OSError as exc:
            raise InferenceError(f"VAD model {path} unreadable: {exc}") from exc
        if size > MAX_MODEL_BYTES:
            raise InferenceError(f"VAD model {path} is {size} bytes > cap {MAX_MODEL_BYTES}")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3  # the shipped graph has unused initializers; not news
        try:
            session = ort.InferenceSession(
                str(path), sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise InferenceError(f"cannot load VAD model {path}: {exc}") from exc
        names = {i.name for i in session.get_inputs()}
        if names != {"input", "state", "sr"}:
            raise InferenceError(f"VAD model {path} has inputs {sorted(names)}, not input/state/sr")
        self._setup(session, path, streams)
        log.debug("silero VAD loaded from %s (%d threads, %d streams)", path, threads, streams)

    def _setup(self, session: ort.InferenceSession, path: Path, streams: int) -> None:
        if not 1 <= streams <= MAX_STREAMS:
            raise ValueError(f"streams must be 1..{MAX_STREAMS}, got {streams}")
        self._session = session
        self.model_path = path
        self.streams = streams
        self._sr = np.array(SAMPLE_RATE, dtype=np.int64)
        self.reset()

    def spawn(self, streams: int = 1) -> SileroVad:
        """Another VAD on the same loaded model (shares the session, own state)."""
        twin = object.__new__(SileroVad)
        twin._setup(self._session, self.model_path, streams)
        return twin

    def reset(self) -> None:
        """Start new streams: zero recurrent state and context, drop buffered samples."""
        self._state: FloatArray = np.zeros((2, self.streams, 128), dtype=np.float32)
        self._context: FloatArray = np.zeros((self.streams, CONTEXT_SAMPLES), dtype=np.float32)
        self._pending: FloatArray = np.zeros((self.streams, 0), dtype=np.float32)

    def reset_streams(self, streams: slice) -> None:
        """Zero the recurrent state of some streams (their context and buffer stay)."""
        self._state[:, streams] = 0.0

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
        out = np.empty((self.streams, n), dtype=np.float32)
        for i in range(n):
            out[:, i] = self._run(buf[:, i * CHUNK_SAMPLES : (i + 1) * CHUNK_SAMPLES])
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
            out[:, 0] = self._run(chunk)
        return out[0] if self.streams == 1 else out

    def _run(self, chunk: FloatArray) -> FloatArray:
        x = np.concatenate((self._context, chunk), axis=1)
        try:
            prob, state = self._session.run(
                None, {"input": x, "state": self._state, "sr": self._sr}
            )
        except Exception as exc:
            raise InferenceError(f"VAD inference failed: {exc}") from exc
        self._state = np.asarray(state, dtype=np.float32)
        self._context = np.array(chunk[:, -CONTEXT_SAMPLES:], dtype=np.float32)
        return np.asarray(prob, dtype=np.float32).reshape(self.streams)
