"""The TUF repository: a stock python-tuf client verifies its export; one writer, rising versions."""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.unit.tuf_world import BASE, FORMAT, make_world

pytest.importorskip("tuf")

from tuf.api.metadata import Metadata, Root
from tuf.ngclient import Updater

from cloud_sidecar.errors import ConfigError
from cloud_sidecar.tuf_repo import AdapterCustom


@contextmanager
def http_server(directory: Path) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1:0 serving ``directory`` (what any TUF client reads)."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            return None

    srv = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(directory))
    )
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        thread.join()


def test_a_stock_updater_given_only_root_v1_verifies_the_export_and_downloads_every_target(
    tmp_path: Path,
) -> None:
    w = make_world(tmp_path)
    payloads = {w.add(bytes([i]) * (1000 + i), i): bytes([i]) * (1000 + i) for i in (1, 2, 3)}
    w.repo.rotate_root(old_signers=w.roots[:2], new_signers=w.roots, threshold=2)
    w.repo.refresh_timestamp()
    export = tmp_path / "export"
    files = w.repo.export(export)
    assert {p.relative_to(export).parts[0] for p in files} == {"metadata", "targets"}
    assert (export / "metadata" / "1.root.json").exists()
    assert (export / "metadata" / "2.root.json").exists()
    client = tmp_path / "stock-client"
    client.mkdir()
    (client / "root.json").write_bytes((export / "metadata" / "1.root.json").read_bytes())
    with http_server(export) as url:
        updater = Updater(str(client), f"{url}/metadata/", str(tmp_path / "dl"), f"{url}/targets/")
        (tmp_path / "dl").mkdir()
        updater.refresh()
        for name, data in payloads.items():
            info = updater.get_targetinfo(name)
            assert info is not None
            assert info.custom["base_model_sha256"] == BASE
            assert info.custom["adapter_format"] == FORMAT
            assert Path(updater.download_target(info)).read_bytes() == data
    assert Metadata[Root].from_file(str(client / "root.json")).signed.version == 2


def test_concurrent_writers_get_distinct_strictly_increasing_versions(tmp_path: Path) -> None:
    w = make_world(tmp_path)
    errors: list[Exception] = []
    published: list[int] = []

    def add(i: int) -> None:
        try:
            pub = w.repo.add_target(
                f"adapter-{i}.safetensors", bytes([i]) * 10, AdapterCustom(BASE, FORMAT, 100 + i)
            )
            published.append(pub.targets_version)
        except ConfigError as e:  # a lower adapter version than one already signed
            errors.append(e)

    threads = [threading.Thread(target=add, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(published) == len(set(published))  # never two documents with one version
    assert len(published) + len(errors) == 6
    ts = w.repo.timestamp().signed
    assert ts.version == 1 + len(published)
    assert w.repo.targets().signed.version == 1 + len(published)


def test_the_repository_refuses_names_that_are_not_one_safe_path_component(
    tmp_path: Path,
) -> None:
    w = make_world(tmp_path)
    for bad in ("..", "../x", "a/b", ".hidden", "x" * 200, ""):
        with pytest.raises(ConfigError):
            w.repo.add_target(bad, b"x", AdapterCustom(BASE, FORMAT, 1))


def test_an_adapter_version_not_above_the_signed_ones_is_refused(tmp_path: Path) -> None:
    w = make_world(tmp_path)
    w.add(b"two", 2)
    with pytest.raises(ConfigError, match="not above"):
        w.add(b"one", 1)


def test_refresh_timestamp_raises_its_version_and_keeps_the_snapshot(tmp_path: Path) -> None:
    w = make_world(tmp_path)
    w.add(b"one", 1)
    before = w.repo.timestamp().signed
    assert w.repo.refresh_timestamp() == before.version + 1
    after = w.repo.timestamp().signed
    assert after.snapshot_meta.version == before.snapshot_meta.version
    assert after.expires >= before.expires


def test_root_v1_needs_two_of_three_root_keys_and_lists_one_key_per_online_role(
    tmp_path: Path,
) -> None:
    w = make_world(tmp_path)
    root = w.repo.root()
    assert root.signed.roles["root"].threshold == 2
    assert len(root.signed.roles["root"].keyids) == 3
    assert root.signed.consistent_snapshot is True
    for role in ("targets", "snapshot", "timestamp"):
        assert root.signed.roles[role].keyids == [w.online[role].public_key.keyid]
        assert root.signed.roles[role].threshold == 1
    online = {w.online[r].public_key.keyid for r in ("targets", "snapshot", "timestamp")}
    assert len(online) == 3  # three distinct keys
    assert not online & set(root.signed.roles["root"].keyids)


def test_one_key_for_two_online_roles_is_refused(tmp_path: Path) -> None:
    from cloud_sidecar.errors import ConfigError
    from cloud_sidecar.tuf_repo import TufRepository
    from cloud_sidecar.tuf_signer import FileRootKeys
    from tests.unit.tuf_world import software_online_signer, software_online_signers

    shared = software_online_signer()
    online = {**software_online_signers(), "snapshot": shared, "timestamp": shared}
    roots = FileRootKeys(tmp_path / "root-keys").ensure()
    with pytest.raises(ConfigError, match="own key"):
        TufRepository.create(tmp_path / "repo", root_signers=roots, root_threshold=2, online=online)
    assert not TufRepository.exists(tmp_path / "repo")


def test_a_role_key_the_root_does_not_list_signs_nothing(tmp_path: Path) -> None:
    from cloud_sidecar.errors import ConfigError
    from cloud_sidecar.tuf_repo import TufRepository
    from tests.unit.tuf_world import software_online_signer

    w = make_world(tmp_path)
    before = w.repo.timestamp().signed.version
    stray = TufRepository(w.repo.dir, {**w.online, "timestamp": software_online_signer()})
    with pytest.raises(ConfigError, match="rotate root"):
        stray.refresh_timestamp()
    assert w.repo.timestamp().signed.version == before


def test_rotating_only_the_timestamp_key_keeps_targets_and_snapshot_keys_and_devices_follow(
    tmp_path: Path,
) -> None:
    from tests.unit.tuf_world import software_online_signer

    w = make_world(tmp_path)
    w.add(b"one", 1)
    c = w.client()
    assert c.check(0).chosen is not None
    new_ts = software_online_signer()
    version = w.repo.rotate_root(
        old_signers=w.roots[:2], new_signers=w.roots, threshold=2, new_online={"timestamp": new_ts}
    )
    root = w.repo.root().signed
    assert version == 2 and root.roles["timestamp"].keyids == [new_ts.public_key.keyid]
    assert root.roles["targets"].keyids == [w.online["targets"].public_key.keyid]
    assert root.roles["snapshot"].keyids == [w.online["snapshot"].public_key.keyid]
    assert w.online["timestamp"].public_key.keyid not in root.keys  # the old key is gone
    name = w.add(b"two", 2)
    result = w.client().check(0)
    assert result.chosen is not None and result.chosen.name == name
