"""MQTT 5 request/response for the OTA chunk transfer, device side.

Owns the pending requests: each ``ChunkRequest`` goes to ``fleet/v1/<device>/ota/request``
with the response topic ``fleet/v1/<device>/ota/response`` and 16 fresh random bytes of
correlation data; ``deliver`` (fed from the MQTT network thread) hands an answer to the
waiting caller only when topic and correlation data both match.

Invariants: an answer without a pending correlation is dropped (late, duplicate or
forged); a caller waits at most ``timeout_s`` and then gets ``OtaTransferError``, so
the fetcher's retry and backoff decide what happens next.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

from edge_daemon.errors import OtaTransferError
from fleet_protocol import topics
from fleet_protocol.ota_transfer import ChunkRequest

log = logging.getLogger(__name__)

PublishRequest = Callable[[str, bytes, str, bytes], bool]  # topic, payload, response topic, corr


class _Pending:
    __slots__ = ("done", "payload")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.payload = b""


class MqttRequester:
    def __init__(self, device_id: str, publish: PublishRequest, timeout_s: float = 10.0) -> None:
        self.request_topic = topics.ota_request(device_id)
        self.response_topic = topics.ota_response(device_id)
        self._publish = publish
        self._timeout = timeout_s
        self._pending: dict[bytes, _Pending] = {}
        self._lock = threading.Lock()

    def __call__(self, req: ChunkRequest) -> bytes:
        corr = os.urandom(16)
        slot = _Pending()
        with self._lock:
            self._pending[corr] = slot
        try:
            if not self._publish(self.request_topic, req.to_bytes(), self.response_topic, corr):
                raise OtaTransferError("chunk request not accepted by the broker")
            if not slot.done.wait(self._timeout):
                raise OtaTransferError(f"no answer to a chunk request in {self._timeout:.0f} s")
            return slot.payload
        finally:
            with self._lock:
                self._pending.pop(corr, None)

    def deliver(
        self, topic: str, payload: bytes, _response_topic: str | None, correlation: bytes | None
    ) -> None:
        if topic != self.response_topic or correlation is None:
            return
        with self._lock:
            slot = self._pending.get(correlation)
        if slot is None:
            log.debug("dropped an OTA answer with no pending request")
            return
        slot.payload = payload
        slot.done.set()
