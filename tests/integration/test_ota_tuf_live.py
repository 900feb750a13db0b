"""TUF over the real broker: online roles signed in SoftHSM, metadata retained, chunks over MQTT 5.

The sidecar serving in this process (its ChunkServer answers ``ota/request``) holds a TUF
repository whose targets, snapshot and timestamp are signed by the HSM's OTA key
(``HsmSigner``: SHA-256 here, ``CKM_ECDSA`` in SoftHSM). A device with its own mTLS
session reads the retained timestamp, then verifies and downloads through MQTT 5
request/response; a stock python-tuf ``Updater`` verifies the exported repository.
"""

from __future__ import annotations

import queue
from pathlib import Path

import pytest

from cloud_sidecar import ota_publish
from edge_daemon.ota_link import MqttRequester
from fleet_protocol import topics
from fleet_protocol.io.mqtt import MqttLink
from fleet_protocol.ota_transfer import TransferLimits

from .conftest import Cloud

pytest.importorskip("tuf")

from tuf.ngclient import Updater

from cloud_sidecar.tuf_repo import AdapterCustom
from edge_daemon.ota_clock import TrustedClock
from edge_daemon.ota_fetch import ChunkFetcher
from edge_daemon.ota_tuf import TufUpdateClient
from tests.unit.test_tuf_repository import http_server

pytestmark = pytest.mark.integration

BASE = "b" * 64
FORMAT = "lora-edge-v1"


def test_a_device_updates_over_mqtt_chunks_from_an_hsm_signed_tuf_repository(
    cloud: Cloud, tmp_path: Path
) -> None:
    cfg = cloud.app.cfg
    repo = ota_publish.open_repository(cfg, cloud.app.hsm)
    adapter = bytes(range(256)) * 700  # 175 KiB: several 64 KiB chunks
    repo.add_target("adapter-v1.bin", adapter, AdapterCustom(BASE, FORMAT, 1))
    channel = cfg.ota.channel
    assert repo.publish_metadata(
        channel, lambda t, p, r: cloud.publisher.publish(t, p, qos=1, retain=r)
    )
    slot = cloud.stack.devices[0]
    timestamps: queue.Queue[bytes] = queue.Queue()
    holder: list[MqttRequester] = []
    link = MqttLink(
        cloud.stack.endpoint(slot.cert),
        client_id=slot.device_id,
        on_message=lambda t, p: timestamps.put(p),
        on_request=lambda t, p, rt, c: holder[0].deliver(t, p, rt, c),  # noqa: PLW0108 - late binding
    )
    requester = MqttRequester(
        slot.device_id,
        lambda t, p, rt, c: link.publish(
            t, p, qos=1, timeout_s=5, response_topic=rt, correlation=c
        ),
        timeout_s=10,
    )
    holder.append(requester)
    link.subscribe(topics.ota_tuf_metadata(channel, "timestamp.json"), 1)
    link.subscribe(requester.response_topic, 1)
    link.start(wait_s=10)
    try:
        announced = timestamps.get(timeout=15)  # retained, readable under the device ACL
        assert announced == (repo.metadata_dir / "timestamp.json").read_bytes()
        fetcher = ChunkFetcher(requester, tmp_path / "device", TransferLimits())
        client = TufUpdateClient(
            tmp_path / "device",
            fetcher,
            device_id=slot.device_id,
            base_sha256=BASE,
            adapter_format=FORMAT,
            clock=TrustedClock(tmp_path / "clock.json", timestamp_lifetime=repo._expiry.timestamp),
        )
        client.bootstrap((repo.metadata_dir / "1.root.json").read_bytes())
        target = client.check(0).chosen
        assert target is not None and target.adapter_version == 1
        assert client.download(target).read_bytes() == adapter
        ratio = fetcher.stats.response_bytes / len(adapter)
        print(f"ota.wire_overhead (live, one device) = {ratio:.4f}")
        assert ratio <= 1.10
    finally:
        link.stop()
    # any TUF client verifies the HSM signatures of the export
    export = tmp_path / "export"
    repo.export(export)
    stock = tmp_path / "stock"
    stock.mkdir()
    (stock / "root.json").write_bytes((export / "metadata" / "1.root.json").read_bytes())
    with http_server(export) as url:
        updater = Updater(str(stock), f"{url}/metadata/", str(tmp_path), f"{url}/targets/")
        updater.refresh()
        info = updater.get_targetinfo("adapter-v1.bin")
        assert info is not None
        assert (
            Path(updater.download_target(info, str(tmp_path / "stock.bin"))).read_bytes() == adapter
        )


def test_serve_refreshes_and_republishes_the_timestamp(cloud: Cloud) -> None:
    repo = ota_publish.open_repository(cloud.app.cfg, cloud.app.hsm)
    before = repo.timestamp().signed.version
    cloud.app.refresh_ota_timestamp()
    after = repo.timestamp().signed
    assert after.version == before + 1
    entries = (cloud.app.cfg.data_dir / "audit.jsonl").read_text()
    assert f'"subject":"timestamp-v{after.version}"' in entries


def test_rollout_commands_sign_with_the_hsm_and_are_audited(cloud: Cloud, tmp_path: Path) -> None:
    cfg = cloud.app.cfg
    repo = ota_publish.open_repository(cfg, cloud.app.hsm)
    good_v = repo.next_adapter_version()
    repo.add_target(f"good-v{good_v}.bin", b"good", AdapterCustom(BASE, FORMAT, good_v))
    bad = f"bad-v{good_v + 1}.bin"
    repo.add_target(bad, b"bad", AdapterCustom(BASE, FORMAT, good_v + 1, "all", 0))
    out = ota_publish.rollout_command(cfg, "start", bad, "10,50,100")
    assert "10 %" in out and repo.target_files()[bad].custom["rollout_percent"] == 10
    assert "paused" in ota_publish.rollout_command(cfg, "pause", None, None)
    assert "hold" in ota_publish.rollout_command(cfg, "step", None, None)
    ota_publish.rollout_command(cfg, "resume", None, None)
    assert "hold" in cloud.app.step_rollout()  # serve's timer: no device has reported yet
    assert "aborted" in ota_publish.rollout_command(cfg, "abort", None, None)
    assert cloud.app.step_rollout() == ""  # an aborted rollout is left alone
    files = repo.target_files()
    assert files[bad].custom["rollout_percent"] == 0
    forward = [n for n, t in files.items() if "rollforward" in n]
    assert forward and repo.artifact(forward[-1]) == b"good"
    groups = tmp_path / "groups.json"
    groups.write_text('{"groups": {"north": ["pi-01"]}, "pins": {"north": 1}}')
    assert "north" in ota_publish.rollout_command(cfg, "groups", str(groups), None)
    audit = (cfg.data_dir / "audit.jsonl").read_text()
    for kind in ("start", "pause", "resume", "abort", "groups"):
        assert f'"kind":"ota.rollout.{kind}"' in audit
