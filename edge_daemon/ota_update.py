"""The TUF update worker: check → download in chunks → stage → switch, in its own thread.

Owns the update thread. It wakes when a retained ``timestamp.json`` arrives on
``fleet/v1/ota/<channel>/metadata/timestamp.json`` (``nudge``) or every
``poll_s``; each round runs ``TufUpdateClient.check`` (python-tuf refresh and device
policy), consults the ``FailureLedger`` (backoff, parking), downloads the chosen target
through the chunk fetcher, and hands the verified artifact to ``SlotManager.install``.
Every step is reported on ``fleet/v1/<device>/ota/status``.

``ObservedClassifier`` wraps the classifier the listener thread runs: it times each
``predict``, notes failures and the top probability, and feeds the slot manager's
health window, so the listener needs no knowledge of updates.

Invariants: the main loop and the listener never wait for a download (this thread
does); one round at a time; a refused or failing target is never retried before its
backoff, and never after it is parked; while the sealed OTA state on the card is
tampered (``ota_state``) no round fetches anything: each reports ``rejected`` with
reason ``ota_state_tampered`` and the active model keeps running.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_daemon.errors import OtaError, OtaRefusedError, OtaTransferError
from edge_daemon.ota_fetch import FailureLedger
from edge_daemon.ota_slots import GoldenClips, SlotManager
from edge_daemon.ota_state import TAMPERED
from edge_daemon.ota_tuf import AdapterTarget, TufUpdateClient
from fleet_protocol.messages import OtaState

log = logging.getLogger(__name__)


class ObservedClassifier:
    """A classifier that reports each window's outcome to the slot manager's health window."""

    def __init__(self, inner: Any, observe: Callable[[bool, float, float], None]) -> None:
        self.inner = inner
        self._observe = observe
        self.model_sha256: str = inner.model_sha256

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def predict(self, features: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        t0 = time.monotonic()
        try:
            out: npt.NDArray[np.float32] = self.inner.predict(features)
        except Exception:
            self._observe(False, time.monotonic() - t0, 0.0)
            raise
        top = float(np.max(out)) if out.size else 0.0
        self._observe(bool(np.all(np.isfinite(out))), time.monotonic() - t0, top)
        return out


class TufUpdateWorker:
    def __init__(
        self,
        client: TufUpdateClient,
        slots: SlotManager[Any],
        ledger: FailureLedger,
        report: Callable[[OtaState, int, str], None],
        *,
        baseline_confident: Callable[[], float] = lambda: 0.0,
        poll_s: float = 3600.0,
        on_start: Callable[[threading.Event], None] | None = None,
    ) -> None:
        self.client = client
        self.slots = slots
        self.ledger = ledger
        self._report = report
        self._baseline = baseline_confident
        self._poll_s = poll_s
        self._on_start = on_start
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.rounds = 0

    def nudge(self) -> None:
        """New metadata was announced (any thread)."""
        self._wake.set()

    def start(self, stop: threading.Event) -> None:
        self._thread = threading.Thread(
            target=self._loop, args=(stop,), name="ota-update", daemon=True
        )
        self._thread.start()

    def join(self, timeout: float) -> None:
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self, stop: threading.Event) -> None:
        if self._on_start is not None:
            try:
                self._on_start(stop)
            except Exception:
                log.exception("OTA start hook failed")
        while not stop.is_set():
            self._wake.wait(self._poll_s)
            self._wake.clear()
            if stop.is_set():
                return
            try:
                self.run_once()
            except Exception:  # one bad round must not end updates for good
                log.exception("OTA round failed")

    def run_once(self) -> str:
        """One round; returns what happened (for tests and logs)."""
        self.rounds += 1
        active = self.slots.record.active
        try:
            if self.ledger.tampered:  # parked targets must not come back: no round at all
                raise OtaRefusedError(
                    f"failure ledger not trusted: {self.ledger.tampered}", TAMPERED
                )
            result = self.client.check(active.adapter_version if active else 0)
        except OtaRefusedError as e:
            log.warning("OTA metadata refused: %s", e)
            self._report("rejected", 0, e.reason)
            return f"rejected:{e.reason}"
        except OtaTransferError as e:
            log.info("OTA metadata not reachable: %s", e)
            return "unreachable"
        target = result.chosen
        if target is None:
            return "up_to_date"
        if self.ledger.parked(target.sha256):
            return "parked"
        if not self.ledger.may_try(target.sha256):
            return "backing_off"
        return self._update(target)

    def _update(self, target: AdapterTarget) -> str:
        key = target.sha256
        self.slots.begin(target.adapter_version, "queued")
        self.slots.begin(target.adapter_version, "downloading")
        golden: Path | None = None
        try:
            path = self.client.download(target)
            golden = self.client.download_golden(target)
        except (OtaRefusedError, OtaTransferError) as e:
            reason = e.reason if isinstance(e, OtaRefusedError) else "transfer"
            parked = self.ledger.failed(key)
            self.slots.fail("parked" if parked else reason)
            log.warning("OTA download of v%d failed (%s)", target.adapter_version, reason)
            return "parked" if parked else f"failed:{reason}"
        self.ledger.succeeded(key)
        clips = GoldenClips(golden, target.golden_min_accuracy) if golden else None
        try:
            self.slots.install(path, target.adapter_version, target.sha256, self._baseline(), clips)
        except OtaError as e:
            self.ledger.failed(key)
            log.warning("OTA install of v%d failed: %s", target.adapter_version, e)
            return "failed:install"
        finally:
            path.unlink(missing_ok=True)  # merged into its slot, or refused: not kept
            if golden is not None:
                golden.unlink(missing_ok=True)
        return "active"
