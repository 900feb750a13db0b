"""Chunked OTA transfer: bounded, resumable, paced, retried with backoff, parked when it keeps failing.

The device's fetcher and requester are paired in memory with the sidecar's ChunkServer
over the real request/response codec (the broker path is in
tests/integration/test_ota_tuf_live.py).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from cloud_sidecar.ota_serve import ChunkServer
from edge_daemon.errors import OtaTransferError
from edge_daemon.ota_link import MqttRequester
from fleet_protocol import topics
from fleet_protocol.ota_transfer import (
    STATUS_BAD_REQUEST,
    STATUS_NOT_FOUND,
    STATUS_OK,
    ChunkRequest,
    ChunkResponse,
    TransferLimits,
    answer,
)

DEVICE = "dev-01"
SMALL = TransferLimits(max_chunk=256, rate_bytes_per_s=10**9, backoff_base_s=0.5)


def _repo(tmp_path: Path, data: bytes) -> tuple[Path, str]:
    sha = hashlib.sha256(data).hexdigest()
    (tmp_path / "repo" / "targets").mkdir(parents=True)
    (tmp_path / "repo" / "metadata").mkdir()
    (tmp_path / "repo" / "targets" / f"{sha}.a.bin").write_bytes(data)
    (tmp_path / "repo" / "metadata" / "timestamp.json").write_bytes(b"{}")
    (tmp_path / "secret").write_bytes(b"do not serve")
    return tmp_path / "repo", f"targets/{sha}.a.bin"


def _pair(server: ChunkServer) -> MqttRequester:
    """Device requester → broker (in memory) → sidecar server → back, with MQTT 5 properties."""
    requester: MqttRequester

    def device_publish(topic: str, payload: bytes, response_topic: str, corr: bytes) -> bool:
        server.handle(topic, payload, response_topic, corr)
        return True

    def server_publish(topic: str, payload: bytes, corr: bytes | None) -> bool:
        requester.deliver(topic, payload, None, corr)
        return True

    server._publish = server_publish
    requester = MqttRequester(DEVICE, device_publish, timeout_s=1)
    return requester


def test_the_server_answers_only_paths_inside_the_repository(tmp_path: Path) -> None:
    repo, path = _repo(tmp_path, b"x" * 1000)
    server = ChunkServer(repo, lambda *_: True, SMALL)
    ok = answer(ChunkRequest(path=path, offset=0, length=10_000).to_bytes(), server.read, SMALL)
    assert ok.status == STATUS_OK and ok.total == 1000 and len(ok.data) == 256  # capped chunk
    for bad in ("../secret", "targets/../../secret", "/etc/passwd", "metadata/x.json", "keys/a"):
        raw = b'{"length":10,"offset":0,"path":"' + bad.encode() + b'"}'
        assert answer(raw, server.read, SMALL).status == STATUS_BAD_REQUEST
    missing = ChunkRequest(path="metadata/7.root.json", offset=0, length=10).to_bytes()
    assert answer(missing, server.read, SMALL).status == STATUS_NOT_FOUND


def test_a_request_naming_another_response_topic_gets_no_answer(tmp_path: Path) -> None:
    repo, path = _repo(tmp_path, b"x" * 10)
    sent: list[str] = []
    server = ChunkServer(repo, lambda t, p, c: sent.append(t) or True, SMALL)
    raw = ChunkRequest(path=path, offset=0, length=10).to_bytes()
    server.handle(topics.ota_request(DEVICE), raw, topics.ota_response("dev-02"), b"c" * 16)
    server.handle(topics.ota_request(DEVICE), raw, topics.ota_response(DEVICE), None)
    assert sent == []
    server.handle(topics.ota_request(DEVICE), raw, topics.ota_response(DEVICE), b"c" * 16)
    assert sent == [topics.ota_response(DEVICE)]


def test_an_answer_with_unknown_correlation_data_is_dropped() -> None:
    requester = MqttRequester(DEVICE, lambda *_: True, timeout_s=0.05)
    requester.deliver(topics.ota_response(DEVICE), b"forged", None, b"x" * 16)
    with pytest.raises(OtaTransferError):
        requester(ChunkRequest(path="metadata/timestamp.json", offset=0, length=10))


def test_response_parser_caps_bytes_and_rejects_garbage() -> None:
    good = ChunkResponse(STATUS_OK, 0, 3, b"abc").to_bytes()
    assert ChunkResponse.from_bytes(good, 3).data == b"abc"
    from fleet_protocol.errors import ProtocolError

    for bad in (good[:-1] + b"cd", b"OTA1\xff\xff", b"nope", b"OTA1\x00\x02{}"):
        with pytest.raises(ProtocolError):
            ChunkResponse.from_bytes(bad, 3)
