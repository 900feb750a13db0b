"""Which classified windows the device keeps for the cloud, within its byte budgets. Pure logic.

A window is a candidate when the model is unsure (``low_confidence``: the hard cases an
adapter learns from), or by a seeded random audit draw that keeps an unbiased,
representative sample of everything else (``audit``: what the cloud evaluates on, so
its figures reflect what the fleet hears). The device has no labels: they come from
outside, joined in the cloud by capture time. The returned reason travels with the
sample and ranks it: low_confidence > audit.

``Selector`` then bounds what is kept by bytes, two ways:

- the replay buffer's byte budget: a candidate is refused when the bytes the buffer
  could only free by dropping unsent data (``pending_bytes``) already fill more than
  its reason's share (``audit_max_fill``, ``low_confidence_max_fill``). During an
  uplink outage the buffer fills with the most useful samples first;
- optionally an uplink budget, ``uplink_bytes_per_day``: a token bucket over *stream*
  time (seconds of audio heard, the same as wall time for live capture) holding at most
  one hour of budget and starting full, so over any span T at most
  ``budget * (T / 1 day + 1 / 24)`` bytes of samples are kept. Audit keeps a reserve
  for low_confidence (it needs half the bucket left).

Invariant: a refused candidate never consumes budget; every decision is counted in
``Selector.stats``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from edge_daemon.buffer_schema import sample_charge
from edge_daemon.config import SelectionConfig
from fleet_protocol.batch import SelectionReason

log = logging.getLogger(__name__)

DAY_S = 86_400.0
BUCKET_HOURS = 1.0  # the uplink bucket holds this much of the daily budget
_RESERVE = {"low_confidence": 0.0, "audit": 0.5}  # of the bucket


def select(score: float, rng: np.random.Generator, cfg: SelectionConfig) -> SelectionReason | None:
    """The reason to keep this window, or None to let it go (no budget applied)."""
    if score < cfg.low_confidence:
        return "low_confidence"
    if rng.random() < cfg.audit_fraction:
        return "audit"
    return None


class Selector:
    """``select`` plus the byte bounds above; one per stream, not thread-safe."""

    def __init__(
        self, cfg: SelectionConfig, rng: np.random.Generator, sample_bytes: int = sample_charge()
    ) -> None:
        self.cfg = cfg
        self.rng = rng
        self.sample_bytes = sample_bytes
        self._fill_limit = {
            "low_confidence": cfg.low_confidence_max_fill,
            "audit": cfg.audit_max_fill,
        }
        per_day = cfg.uplink_bytes_per_day
        self._rate = per_day / DAY_S if per_day is not None else None
        self._capacity = per_day * BUCKET_HOURS / 24.0 if per_day is not None else 0.0
        self._tokens = self._capacity
        self._last_s: float | None = None
        self.stats: dict[str, int] = {
            "windows": 0,
            "kept_bytes": 0,
            "refused_buffer_full": 0,
            "refused_uplink_budget": 0,
        }

    def decide(
        self,
        score: float,
        *,
        stream_s: float,
        pending_bytes: Callable[[], int],
    ) -> SelectionReason | None:
        """The reason to keep this window within budget, or None.

        ``stream_s`` is the window's offset in the stream (non-decreasing);
        ``pending_bytes`` is asked only for candidates.
        """
        self.stats["windows"] += 1
        self._refill(stream_s)
        reason = select(score, self.rng, self.cfg)
        if reason is None:
            return None
        fill = pending_bytes() / self.cfg.max_buffer_bytes
        if fill >= self._fill_limit.get(reason, 0.0):
            self.stats["refused_buffer_full"] += 1
            log.debug("refused %s window: buffer %.0f%% full of unsent data", reason, 100 * fill)
            return None
        if self._rate is not None:
            reserve = _RESERVE.get(reason, 0.5) * self._capacity
            if self._tokens - self.sample_bytes < reserve:
                self.stats["refused_uplink_budget"] += 1
                return None
            self._tokens -= self.sample_bytes
        self.stats[reason] = self.stats.get(reason, 0) + 1
        self.stats["kept_bytes"] += self.sample_bytes
        return reason

    def _refill(self, stream_s: float) -> None:
        if self._rate is None:
            return
        if self._last_s is not None and stream_s > self._last_s:
            gained = (stream_s - self._last_s) * self._rate
            self._tokens = min(self._capacity, self._tokens + gained)
        if self._last_s is None or stream_s > self._last_s:
            self._last_s = stream_s
