"""The second line of defence: a speech detector on the very features that get uploaded.

Owns: loading the project's own small speech/no-speech model
(``edge_daemon/privacy/data/speech_check.onnx``, trained by
``benchmarks/speech_check_train.py`` on espeak-ng voices, the *tuning* split of the
real recordings, the same voices through simulated rooms and cut by window edges
(``benchmarks/speech_check_data.py``) and scene non-speech; never on the held-out
voices; ADR 0005 revision 5) and scoring
1 s windows of upload features with it in onnxruntime (no torch on the device).

Invariants:
- the model's input is exactly what the uploaded sample holds for a window
  (``fleet_protocol.features.features_batch``: ``(B, 20, 8)`` float32), and the
  model card (``speech_check.json``) names the ``FEATURE_VERSION`` it was trained
  on; a mismatch is refused (``InferenceError``), never scored;
- ``scores`` returns one probability per window in ``[0, 1]``; ``passes`` is True
  only for windows scored strictly below the card's threshold (or the caller's);
- reads are capped (``MAX_MODEL_BYTES``); the model runs on one thread, batches of
  any size, and a window's score does not depend on its batch-mates beyond float
  rounding.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from edge_daemon.errors import InferenceError
from fleet_protocol.features import FEATURE_VERSION, N_BANDS, N_FRAMES

log = logging.getLogger(__name__)

DATA = Path(__file__).resolve().parent / "data"
MODEL_FILE = DATA / "speech_check.onnx"
CARD_FILE = DATA / "speech_check.json"
MAX_MODEL_BYTES = 2 * 1024 * 1024
MAX_CARD_BYTES = 64 * 1024

F32 = npt.NDArray[np.float32]


class SpeechCheck:
    """Scores feature windows: probability that the window holds speech."""

    def __init__(self, model: Path = MODEL_FILE, card: Path = CARD_FILE) -> None:
        try:
            if model.stat().st_size > MAX_MODEL_BYTES or card.stat().st_size > MAX_CARD_BYTES:
                raise InferenceError(f"speech check {model} or its card is over its byte cap")
            data = model.read_bytes()
            meta = json.loads(card.read_text())
        except (OSError, ValueError) as exc:
            raise InferenceError(f"speech check {model} unreadable: {exc}") from exc
        if meta.get("feature_version") != FEATURE_VERSION:
            raise InferenceError(
                f"speech check trained on {meta.get('feature_version')!r} features, "
                f"the device uploads {FEATURE_VERSION!r}"
            )
        self.threshold = float(meta["threshold"])
        self.card = meta
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(
                data, sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise InferenceError(f"cannot load speech check {model}: {exc}") from exc
        self._input = self._session.get_inputs()[0].name
        log.debug("speech check loaded (threshold %.3f)", self.threshold)

    def scores(self, features: F32) -> F32:
        """``(B, 20, 8)`` upload features -> ``(B,)`` speech probabilities."""
        x = np.ascontiguousarray(features, dtype=np.float32)
        if x.ndim != 3 or x.shape[1:] != (N_BANDS, N_FRAMES):
            raise ValueError(f"speech check wants (B, {N_BANDS}, {N_FRAMES}), got {x.shape}")
        if not x.shape[0]:
            return np.zeros(0, dtype=np.float32)
        try:
            (out,) = self._session.run(None, {self._input: x[:, None]})
        except Exception as exc:
            raise InferenceError(f"speech check failed: {exc}") from exc
        return np.asarray(out, dtype=np.float32).reshape(-1)

    def passes(self, features: F32, threshold: float | None = None) -> npt.NDArray[np.bool_]:
        """True for windows the check lets through (no speech found)."""
        t = self.threshold if threshold is None else threshold
        return np.asarray(self.scores(features) < t, dtype=np.bool_)
