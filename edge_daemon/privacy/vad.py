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
- a single call accepts at most ``MAX_BLOCK_SAMPLES`` samples (untrusted-input cap).
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
STATE_SHAPE = (2, 1, 128)
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
    """Streaming Silero VAD. Not thread-safe; one instance per audio stream (``spawn``
    gives another stream over the same loaded model)."""

    def __init__(self, model_path: Path | None = None, threads: int = 1) -> None:
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
            self._session = ort.InferenceSession(
                str(path), sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise InferenceError(f"cannot load VAD model {path}: {exc}") from exc
        names = {i.name for i in self._session.get_inputs()}
        if names != {"input", "state", "sr"}:
            raise InferenceError(f"VAD model {path} has inputs {sorted(names)}, not input/state/sr")
        self.model_path = path
        self._sr = np.array(SAMPLE_RATE, dtype=np.int64)
        self.reset()
        log.debug("silero VAD loaded from %s (%d threads)", path, threads)

    def spawn(self) -> SileroVad:
        """A second stream on the same loaded model (shares the session, own state)."""
        twin = object.__new__(SileroVad)
        twin._session = self._session
        twin._sr = self._sr
        twin.model_path = self.model_path
        twin.reset()
        return twin

    def reset(self) -> None:
        """Start a new stream: zero recurrent state and context, drop buffered samples."""
        self._state: FloatArray = np.zeros(STATE_SHAPE, dtype=np.float32)
        self._context: FloatArray = np.zeros(CONTEXT_SAMPLES, dtype=np.float32)
        self._pending: FloatArray = np.zeros(0, dtype=np.float32)
        self.samples_seen = 0

    @property
    def pending_samples(self) -> int:
        """Samples received but not yet part of a complete chunk."""
        return int(self._pending.size)

    def chunk_probs(self, audio: npt.ArrayLike) -> FloatArray:
        """Speech probability for each chunk completed by ``audio`` (may be empty)."""
        x = np.asarray(audio, dtype=np.float32)
        if x.ndim != 1:
            raise ValueError(f"VAD wants mono 1-D audio, got shape {x.shape}")
        if x.size > MAX_BLOCK_SAMPLES:
            raise ValueError(f"block of {x.size} samples > cap {MAX_BLOCK_SAMPLES}")
        self.samples_seen += int(x.size)
        buf = np.concatenate((self._pending, x)) if self._pending.size else x
        n = buf.size // CHUNK_SAMPLES
        out = np.empty(n, dtype=np.float32)
        for i in range(n):
            out[i] = self._run(buf[i * CHUNK_SAMPLES : (i + 1) * CHUNK_SAMPLES])
        self._pending = np.array(buf[n * CHUNK_SAMPLES :], dtype=np.float32)
        return out

    def flush(self) -> FloatArray:
        """Zero-pad the last partial chunk (if any) and score it; the stream then continues."""
        if not self._pending.size:
            return np.zeros(0, dtype=np.float32)
        chunk = np.zeros(CHUNK_SAMPLES, dtype=np.float32)
        chunk[: self._pending.size] = self._pending
        self._pending = np.zeros(0, dtype=np.float32)
        return np.array([self._run(chunk)], dtype=np.float32)

    def _run(self, chunk: FloatArray) -> float:
        x = np.concatenate((self._context, chunk))[None, :]
        try:
            prob, state = self._session.run(
                None, {"input": x, "state": self._state, "sr": self._sr}
            )
        except Exception as exc:
            raise InferenceError(f"VAD inference failed: {exc}") from exc
        self._state = np.asarray(state, dtype=np.float32)
        self._context = chunk[-CONTEXT_SAMPLES:].copy()
        return float(np.asarray(prob).reshape(-1)[0])
