"""The device's update client: verify, fetch, apply an adapter, remember what is trusted.

Flow: retained targets metadata arrives → ``verify_targets`` against the pinned OTA key
and the persisted trusted version → pick the newest adapter for this device's cohort
that is newer than the installed one and built for this device's base model → ask for
its artifact topic → check length and hash → merge it into a copy of the local fp32 base
and quantize (``apply_adapter``; the base is never downloaded again) → hand the model
to the daemon → persist the trusted state atomically → report the outcome.

Invariants: nothing unverified is applied; a failed update leaves the running model
and the trusted state untouched; the trusted metadata version never goes down. No
exception leaves ``handle`` for a verified artifact that cannot be installed (a Hailo
backend refuses adapter-merged models): it is reported ``failed`` and not fetched again
until the process restarts.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from fleet_model import ADAPTER_FORMAT
from fleet_protocol import ota, topics
from fleet_protocol.envelope import key_id_from_pem
from fleet_protocol.errors import ProtocolError
from fleet_protocol.io.files import write_atomic
from fleet_protocol.messages import OtaState, OtaStatus

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrustedState:
    metadata_version: int = 0
    adapter_version: int = 0
    adapter_name: str = ""
    model_path: str = ""


@dataclass(frozen=True)
class InstalledModel:
    path: Path
    adapter_version: int
    metadata_version: int


class OtaClient:
    def __init__(
        self,
        *,
        device_id: str,
        channel: str,
        state_dir: Path,
        trusted_key_pem: bytes,
        base_fp32: Path,
        base_sha256: str,
        limits: ota.OtaLimits,
        subscribe: Callable[[str], None],
        publish_status: Callable[[OtaStatus], None],
        install: Callable[[InstalledModel], None],
        apply_adapter: Callable[[Path, Path, Path], Path],
        cohort: str = "all",
    ) -> None:
        self.device_id = device_id
        self.channel = channel
        self.dir = state_dir / "ota"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._key = trusted_key_pem
        self._keyid = key_id_from_pem(trusted_key_pem)
        self._base_fp32 = base_fp32
        self._base_sha = base_sha256
        self._limits = limits
        self._subscribe = subscribe
        self._publish_status = publish_status
        self._install = install
        self._apply = apply_adapter
        self._cohort = cohort
        self._lock = threading.Lock()
        self._wanted: tuple[int, ota.TargetInfo] | None = None
        self._failed: set[tuple[str, str]] = set()  # verified but could not be installed
        self.state = self._load_state()

    @property
    def metadata_topic(self) -> str:
        return topics.ota_metadata(self.channel, "targets")

    def _load_state(self) -> TrustedState:
        path = self.dir / "trusted.json"
        if not path.exists():
            return TrustedState()
        return TrustedState(**json.loads(path.read_bytes()))

    def installed(self) -> InstalledModel | None:
        if not self.state.model_path or not Path(self.state.model_path).exists():
            return None
        return InstalledModel(
            Path(self.state.model_path), self.state.adapter_version, self.state.metadata_version
        )

    def handle(self, topic: str, payload: bytes) -> None:
        """Feed every message on the OTA tree here (any thread)."""
        with self._lock:
            if topic == self.metadata_topic:
                self._on_metadata(payload)
            elif self._wanted and topic == topics.ota_artifact(self.channel, self._wanted[1].name):
                self._on_artifact(payload)

    def _on_metadata(self, payload: bytes) -> None:
        try:
            verified = ota.verify_targets(
                payload,
                trusted_key_pem=self._key,
                trusted_keyid=self._keyid,
                current_version=self.state.metadata_version,
                now=datetime.now(UTC),
                limits=self._limits,
            )
        except ProtocolError as e:
            log.warning("rejected OTA metadata: %s", e)
            self._report(0, 0, "rejected", e.reason)
            return
        candidates = [
            t
            for t in verified.targets
            if t.cohort in (self._cohort, "all")
            and t.adapter_format == ADAPTER_FORMAT
            and t.base_model_sha256 == self._base_sha
            and t.adapter_version > self.state.adapter_version
            and (t.name, t.sha256) not in self._failed
        ]
        if not candidates:
            log.debug("metadata v%d has nothing new for this device", verified.version)
            return
        target = max(candidates, key=lambda t: t.adapter_version)
        self._wanted = (verified.version, target)
        log.info("update available: adapter v%d (%s)", target.adapter_version, target.name)
        self._subscribe(topics.ota_artifact(self.channel, target.name))

    def _on_artifact(self, payload: bytes) -> None:
        assert self._wanted is not None
        meta_version, target = self._wanted
        try:
            ota.verify_artifact(payload, target, self._limits)
            adapter = self.dir / "adapters" / target.name
            write_atomic(adapter, payload)
            model = self.dir / "models" / f"adapter-v{target.adapter_version}.int8.onnx"
            self._apply(self._base_fp32, adapter, model)
            installed = InstalledModel(model, target.adapter_version, meta_version)
            self._install(installed)
        except ProtocolError as e:
            log.warning("rejected artifact %s: %s", target.name, e)
            self._report(meta_version, target.adapter_version, "rejected", e.reason)
            return
        except Exception as e:  # OtaError, OSError, a backend's InferenceError (Hailo), ...
            log.error("could not apply %s: %s", target.name, e)
            self._failed.add((target.name, target.sha256))
            self._report(meta_version, target.adapter_version, "failed", _reason(e))
            return
        finally:
            self._wanted = None
        self.state = TrustedState(meta_version, target.adapter_version, target.name, str(model))
        write_atomic(self.dir / "trusted.json", json.dumps(asdict(self.state)).encode())
        self._report(meta_version, target.adapter_version, "applied", "")
        log.info("applied adapter v%d", target.adapter_version)

    def _report(
        self, meta_version: int, adapter_version: int, state: OtaState, reason: str
    ) -> None:
        self._publish_status(
            OtaStatus(
                device=self.device_id,
                metadata_version=meta_version,
                adapter_version=adapter_version,
                state=state,
                reason=reason,
                model_sha256="",
            )
        )


def _reason(e: Exception) -> str:
    """The error's type name as the status reason (``OtaStatus.reason``: [A-Za-z0-9_]{0,64})."""
    return "".join(c if c.isalnum() else "_" for c in type(e).__name__)[:64]
