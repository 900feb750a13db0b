"""The device's python-tuf fetcher over chunks: bounded, resumable, paced, retried, parked.

Paired in memory with the sidecar's ChunkServer through the device's MqttRequester and
the real codec (tests/unit/test_ota_transfer.py covers the codec and the server).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cloud_sidecar.ota_serve import ChunkServer
from edge_daemon.errors import OtaTransferError
from fleet_protocol.ota_transfer import STATUS_OK, ChunkRequest, ChunkResponse, TransferLimits
from tests.unit.test_ota_transfer import SMALL, _pair, _repo

STATE_KEY = bytes(range(32))

pytest.importorskip("tuf")

tuf = pytest.importorskip("tuf")

from tuf.api.exceptions import DownloadError, DownloadLengthMismatchError  # noqa: E402

from edge_daemon.ota_fetch import ChunkFetcher, FailureLedger  # noqa: E402
from edge_daemon.ota_tuf import TARGETS_URL  # noqa: E402


def _url(path: str) -> str:
    return TARGETS_URL + path.split("/", 1)[1]


def test_a_file_arrives_in_bounded_chunks_and_no_request_asks_past_its_signed_length(
    tmp_path: Path,
) -> None:
    data = bytes(range(256)) * 10
    repo, path = _repo(tmp_path, data)
    asked: list[ChunkRequest] = []
    requester = _pair(ChunkServer(repo, lambda *_: True, SMALL))

    def spy(req: ChunkRequest) -> bytes:
        asked.append(req)
        return requester(req)

    fetcher = ChunkFetcher(spy, tmp_path / "dev", SMALL, sleep=lambda s: None)
    assert fetcher.download_bytes(_url(path), len(data)) == data
    assert all(r.length <= SMALL.max_chunk for r in asked)
    assert max(r.offset + r.length for r in asked) <= len(data)
    assert fetcher.stats.payload_bytes == len(data)
    header = (fetcher.stats.response_bytes - len(data)) / fetcher.stats.requests
    assert header <= 64  # bytes of framing per chunk: 0.1 % of a 64 KiB chunk


def test_a_file_longer_than_its_bound_is_refused_after_the_first_answer(tmp_path: Path) -> None:
    repo, path = _repo(tmp_path, b"x" * 5000)
    asked: list[ChunkRequest] = []
    requester = _pair(ChunkServer(repo, lambda *_: True, SMALL))

    def spy(req: ChunkRequest) -> bytes:
        asked.append(req)
        return requester(req)

    fetcher = ChunkFetcher(spy, tmp_path / "dev", SMALL, sleep=lambda s: None)
    with pytest.raises(DownloadLengthMismatchError):
        fetcher.download_bytes(_url(path), 1000)
    assert len(asked) == 1


def test_an_endless_server_cannot_push_more_than_the_bound(tmp_path: Path) -> None:
    asked: list[ChunkRequest] = []

    def endless(req: ChunkRequest) -> bytes:  # each answer claims there is one chunk more
        asked.append(req)
        total = req.offset + req.length + 1
        return ChunkResponse(STATUS_OK, req.offset, total, b"z" * req.length).to_bytes()

    fetcher = ChunkFetcher(endless, tmp_path / "dev", SMALL, sleep=lambda s: None)
    with pytest.raises(DownloadError):
        fetcher.download_bytes(TARGETS_URL + f"{'0' * 64}.a.bin", 2000)
    assert sum(r.length for r in asked) <= 2000


def test_a_download_resumes_from_the_last_kept_chunk_after_a_reboot(tmp_path: Path) -> None:
    data = bytes(range(256)) * 20
    repo, path = _repo(tmp_path, data)
    requester = _pair(ChunkServer(repo, lambda *_: True, SMALL))
    calls = {"n": 0}

    def dies_after_8(req: ChunkRequest) -> bytes:
        calls["n"] += 1
        if calls["n"] > 8:
            raise OtaTransferError("link down")
        return requester(req)

    first = ChunkFetcher(dies_after_8, tmp_path / "dev", SMALL, sleep=lambda s: None)
    with pytest.raises(DownloadError):
        first.download_bytes(_url(path), len(data))
    asked: list[ChunkRequest] = []

    def spy(req: ChunkRequest) -> bytes:
        asked.append(req)
        return requester(req)

    rebooted = ChunkFetcher(spy, tmp_path / "dev", SMALL, sleep=lambda s: None)
    assert rebooted.download_bytes(_url(path), len(data)) == data
    assert rebooted.stats.resumed_bytes == 8 * SMALL.max_chunk
    assert asked[0].offset == 8 * SMALL.max_chunk
    assert list((tmp_path / "dev" / "ota" / "partial").iterdir()) == []


def test_lost_answers_are_retried_with_growing_backoff(tmp_path: Path) -> None:
    data = b"q" * 1000
    repo, path = _repo(tmp_path, data)
    requester = _pair(ChunkServer(repo, lambda *_: True, SMALL))
    calls = {"n": 0}
    sleeps: list[float] = []

    def flaky(req: ChunkRequest) -> bytes:
        calls["n"] += 1
        if calls["n"] in (1, 2, 3):
            raise OtaTransferError("timeout")
        return requester(req)

    fetcher = ChunkFetcher(flaky, tmp_path / "dev", SMALL, sleep=sleeps.append)
    assert fetcher.download_bytes(_url(path), len(data)) == data
    assert fetcher.stats.retries == 3
    assert sleeps == sorted(sleeps) and sleeps[0] >= SMALL.backoff_base_s


def test_requests_are_paced_to_the_rate_limit(tmp_path: Path) -> None:
    data = b"r" * 2048
    repo, path = _repo(tmp_path, data)
    requester = _pair(ChunkServer(repo, lambda *_: True, SMALL))
    slow = TransferLimits(max_chunk=256, rate_bytes_per_s=1024)
    now = [0.0]
    sleeps: list[float] = []

    def sleep(s: float) -> None:
        sleeps.append(s)
        now[0] += s

    fetcher = ChunkFetcher(requester, tmp_path / "dev", slow, sleep=sleep, monotonic=lambda: now[0])
    fetcher.download_bytes(_url(path), len(data))
    assert sum(sleeps) == pytest.approx((len(data) - 256) / 1024, rel=0.01)


def test_a_target_that_keeps_failing_is_parked_not_fetched_forever(tmp_path: Path) -> None:
    now = [1000.0]
    ledger = FailureLedger(
        tmp_path / "failures.json", SMALL, state_key=STATE_KEY, now=lambda: now[0]
    )
    key = "a" * 64
    assert ledger.may_try(key)
    for _ in range(SMALL.park_after_failures - 1):
        assert ledger.failed(key) is False
        assert not ledger.may_try(key)  # backing off
        now[0] += 3600
        assert ledger.may_try(key)
    assert ledger.failed(key) is True
    now[0] += 10**6
    assert not ledger.may_try(key)
    assert FailureLedger(tmp_path / "failures.json", SMALL, state_key=STATE_KEY).parked(
        key
    )  # survives a restart


def test_the_tuf_client_updates_over_chunks_and_the_wire_carries_little_more_than_the_adapter(
    tmp_path: Path,
) -> None:
    from tests.unit.tuf_world import make_world

    w = make_world(tmp_path)
    adapter = bytes(range(256)) * 1024  # 256 KiB, about the edge adapter's size
    name = w.add(adapter, 1)
    limits = TransferLimits(rate_bytes_per_s=10**9)
    requester = _pair(ChunkServer(w.repo.dir, lambda *_: True, limits))
    fetcher = ChunkFetcher(requester, tmp_path / "device", limits, sleep=lambda s: None)
    w.fetcher = fetcher  # type: ignore[assignment]
    client = w.client()
    client._fetcher = fetcher
    target = client.check(0).chosen
    assert target is not None and target.name == name
    assert client.download(target).read_bytes() == adapter
    ratio = fetcher.stats.response_bytes / len(adapter)
    print(f"ota.wire_overhead={ratio:.4f}")
    assert ratio <= 1.10, ratio  # metadata (root check, timestamp, snapshot, targets) + framing
