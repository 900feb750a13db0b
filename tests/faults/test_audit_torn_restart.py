"""A torn last audit line does not keep the sidecar down (docs/adr/0017).

Real components: Mosquitto (mTLS) and a SoftHSM2 token from devstack, the sidecar's own
``SidecarApp``. The sidecar serves, stops; a crash mid-append is played by leaving half
an entry and a zero-filled block at the end of its audit log (SIGKILL cannot tear one
``write``, a power cut or a full disk can). The sidecar starts again: the torn bytes are
cut and kept aside, the cut is audited, and the whole log, checkpoints included,
verifies against the token's signing key.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from cloud_sidecar.app import SidecarApp
from cloud_sidecar.audit import verify_log
from cloud_sidecar.config import load_config
from devstack.provision import cloud_config, export_cloud_keys
from devstack.stack import DevStack

pytestmark = pytest.mark.integration


def _serve_once(cfg_path: Path) -> SidecarApp:
    app = SidecarApp(load_config(cfg_path))
    stop, started = threading.Event(), threading.Event()
    thread = threading.Thread(target=app.run, args=(stop, started), daemon=True)
    thread.start()
    assert started.wait(30), "sidecar did not start"
    stop.set()
    thread.join(15)
    assert not thread.is_alive()
    return app


def test_sidecar_starts_after_a_torn_audit_write_and_audits_the_recovery(tmp_path: Path) -> None:
    with DevStack(tmp_path, n_devices=1) as stack:
        _, signing_pem = export_cloud_keys(stack, tmp_path / "cloud-keys")
        cfg_path = cloud_config(stack, tmp_path / "cloud" / "data", tmp_path / "no-base-model")
        first = _serve_once(cfg_path)
        log = first.audit.path
        whole = log.read_bytes()
        last = whole.rstrip(b"\n").rsplit(b"\n", 1)[-1]
        torn = last[: len(last) // 2] + b"\n" + b"\0" * 512  # half an entry, then zeros
        with open(log, "ab") as f:
            f.write(torn)

        second = _serve_once(cfg_path)  # before the fix: JSONDecodeError at start

        report = verify_log(log, signing_pem.read_bytes(), second.audit.checkpoint_path)
        entries = [json.loads(x) for x in log.read_bytes().splitlines()]
        kinds = [e["kind"] for e in entries]
        recovered = entries[kinds.index("audit.recovered")]
        assert recovered["details"]["cut_bytes"] == len(torn)
        assert log.with_name(recovered["details"]["kept_in"]).read_bytes() == torn
        assert kinds[kinds.index("audit.recovered") + 1] == "sidecar.started"
        assert report.signatures_checked and report.checkpoints >= 3
        print(f"audit entries {report.entries}, cut {len(torn)} torn bytes, chain verified")
