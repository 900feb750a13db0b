"""TUF over the real broker: online roles signed in SoftHSM, metadata retained, chunks over MQTT 5.

The sidecar serving in this process (its ChunkServer answers ``ota/request``) holds a TUF
repository whose targets, snapshot and timestamp are signed by the HSM's OTA key
(``HsmSigner``: SHA-256 here, ``CKM_ECDSA`` in SoftHSM). A device with its own mTLS
session reads the retained timestamp, then verifies and downloads through MQTT 5
request/response; a stock python-tuf ``Updater`` verifies the exported repository.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
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
from tests.unit.tuf_world import STATE_KEY

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
            clock=TrustedClock(
                tmp_path / "device" / "ota" / "clock.json",
                state_key=STATE_KEY,
                timestamp_lifetime=repo._expiry.timestamp,
            ),
            state_key=STATE_KEY,
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


def test_each_online_role_has_its_own_hsm_key_and_rotating_the_timestamp_key_keeps_the_others(
    cloud: Cloud, tmp_path: Path
) -> None:
    from cloud_sidecar.errors import ConfigError, HsmError
    from cloud_sidecar.keys.hsm import TUF_ROLE_LABELS
    from cloud_sidecar.tuf_signer import HsmSigner

    cfg, hsm = cloud.app.cfg, cloud.app.hsm
    repo = ota_publish.open_repository(cfg, hsm)
    if not repo.target_files():
        repo.add_target("adapter-k1.bin", b"k1", AdapterCustom(BASE, FORMAT, 1))
    root = repo.root().signed
    keyids = {}
    for role, label in TUF_ROLE_LABELS.items():
        in_token = HsmSigner(hsm.public_key_pem(label), lambda d: b"").public_key.keyid
        assert root.roles[role].keyids == [in_token] and root.roles[role].threshold == 1
        keyids[role] = in_token
    assert len(set(keyids.values())) == 3
    old_ts_id = hsm._pair(TUF_ROLE_LABELS["timestamp"]).key_id
    # without the root keys (production: they are off-line) nothing is rotated
    root_keys = cfg.data_dir / "ota-root-keys"
    root_keys.rename(tmp_path / "away")
    try:
        with pytest.raises(ConfigError, match="off-line"):
            ota_publish.rotate_online_key(cfg, hsm, "timestamp")
    finally:
        (tmp_path / "away").rename(root_keys)
    assert hsm._pair(TUF_ROLE_LABELS["timestamp"]).key_id == old_ts_id
    run = subprocess.run(  # the operator's command, in its own process (own HSM session)
        [sys.executable, "-m", "cloud_sidecar", "ota", "--config", str(cloud.config),
         "rotate-key", "timestamp"],
        check=False, capture_output=True, timeout=120,
        env={**os.environ, **cloud.stack.token.env()},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr.decode()[-2000:]
    rotated = ota_publish.open_repository(cfg, hsm).root().signed
    assert f"root v{rotated.version}" in run.stdout.decode()
    assert rotated.version == root.version + 1
    last = json.loads((cfg.data_dir / "audit.jsonl").read_text().splitlines()[-1])
    assert last["kind"] == "ota.key_rotated" and last["subject"] == "timestamp"
    before = repo.timestamp().signed.version
    cloud.app.refresh_ota_timestamp()  # the serving sidecar signs with the new key at once
    assert ota_publish.open_repository(cfg, None).timestamp().signed.version == before + 1
    assert rotated.roles["timestamp"].keyids != [keyids["timestamp"]]
    assert rotated.roles["targets"].keyids == [keyids["targets"]]
    assert rotated.roles["snapshot"].keyids == [keyids["snapshot"]]
    with pytest.raises(HsmError):  # the retired key signs nothing more
        hsm.sign_digest_with(f"{TUF_ROLE_LABELS['timestamp']}.{old_ts_id}", b"\0" * 32)
    # a stock TUF client from root v1 walks the rotation and verifies the new timestamp
    export = tmp_path / "export"
    ota_publish.open_repository(cfg, None).export(export)
    stock = tmp_path / "stock"
    stock.mkdir()
    (stock / "root.json").write_bytes((export / "metadata" / "1.root.json").read_bytes())
    with http_server(export) as url:
        updater = Updater(str(stock), f"{url}/metadata/", str(tmp_path), f"{url}/targets/")
        updater.refresh()
        assert updater.get_targetinfo(sorted(repo.target_files())[0]) is not None
