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


def test_root_v1_needs_two_of_three_root_keys(tmp_path: Path) -> None:
    w = make_world(tmp_path)
    root = w.repo.root()
    assert root.signed.roles["root"].threshold == 2
    assert len(root.signed.roles["root"].keyids) == 3
    assert root.signed.consistent_snapshot is True
    online = {root.signed.roles[r].keyids[0] for r in ("targets", "snapshot", "timestamp")}
    assert online == {w.online.public_key.keyid}
    assert w.online.public_key.keyid not in root.signed.roles["root"].keyids
