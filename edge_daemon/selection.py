"""Which classified windows the device keeps for the cloud. Pure logic.

A window is kept when downstream feedback disagrees with the prediction (the model
was wrong), when the model is unsure, or by a seeded random audit draw that keeps an
unbiased sample of everything else. The returned reason travels with the sample.
"""

from __future__ import annotations

import numpy as np

from edge_daemon.config import SelectionConfig


def select(
    predicted: str,
    score: float,
    feedback: str | None,
    rng: np.random.Generator,
    cfg: SelectionConfig,
) -> str | None:
    """The reason to keep this window, or None to let it go."""
    if feedback is not None and feedback != predicted:
        return "disagreement"
    if score < cfg.low_confidence:
        return "low_confidence"
    if rng.random() < cfg.audit_fraction:
        return "audit"
    return None
