"""The sidecar's side of the chunked OTA transfer: answer byte-range requests from the repository.

Owns nothing on disk: it reads ``<repo_dir>/metadata/<file>`` and ``<repo_dir>/targets/<file>``
(the TUF repository, ``cloud_sidecar.tuf_repo``), one bounded range per request, and
publishes the answer to the request's MQTT 5 response topic with its correlation data.

Invariants: the device is taken from the request topic (authenticated by the broker);
the response topic must be that device's ``ota/response`` (a request cannot make the
sidecar publish anywhere else); a path is resolved only through
``fleet_protocol.ota_transfer.parse_path`` and must stay inside its directory; at most
``TransferLimits.max_chunk`` bytes are read per request.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from fleet_protocol import topics
from fleet_protocol.errors import ProtocolError
from fleet_protocol.ota_transfer import DEFAULT_LIMITS, TransferLimits, answer

log = logging.getLogger(__name__)

Publish = Callable[[str, bytes, bytes | None], bool]


class ChunkServer:
    def __init__(
        self, repo_dir: Path, publish: Publish, limits: TransferLimits = DEFAULT_LIMITS
    ) -> None:
        self.dir = repo_dir
        self._publish = publish
        self._limits = limits
        self.requests = 0
        self.bytes_out = 0

    def read(self, directory: str, name: str, offset: int, length: int) -> tuple[bytes, int] | None:
        base = (self.dir / directory).resolve()
        path = (base / name).resolve()
        if path.parent != base or not path.is_file():
            return None
        with open(path, "rb") as f:
            total = f.seek(0, 2)
            f.seek(min(offset, total))
            return f.read(min(length, self._limits.max_chunk)), total

    def handle(
        self, topic: str, payload: bytes, response_topic: str | None, correlation: bytes | None
    ) -> None:
        try:
            device = topics.device_of(topic, topics.OTA_REQUEST)
        except ProtocolError as e:
            log.debug("ignored a chunk request on %s: %s", topic[:120], e)
            return
        if response_topic != topics.ota_response(device) or not correlation:
            log.warning("chunk request from %s without its own response topic", device)
            return
        resp = answer(payload, self.read, self._limits)
        data = resp.to_bytes()
        self.requests += 1
        self.bytes_out += len(data)
        if not self._publish(response_topic, data, correlation[:64]):
            log.warning("could not answer %s's chunk request", device)
