"""An unwrap-key rotation while batches sealed for the old key are in flight: every batch,
old key or new, is stored exactly once, and none is refused or deferred (ADR 0002, 0017).

Real components as in test_two_ingest_workers.py. The device seals 12 batches for the
current unwrap key while offline; ``serve`` runs; half of them are delivered, then the
operator runs ``cloud-sidecar keys rotate-unwrap`` from a second process while the rest
arrive (and while the first half's acks may still be going out). The device then learns
the new public key and seals 6 more batches for it; the outbox resends whatever was not
acknowledged, sealed for whichever key it was sealed for.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from devstack.stack import DevStack
from fleet_protocol.envelope import key_id_from_pem

from .uplink_rig import Rig

pytestmark = [pytest.mark.integration, pytest.mark.slow]
OLD, NEW = 12, 6


def test_batches_in_flight_for_the_old_unwrap_key_are_stored_once_after_a_rotation(
    tmp_path: Path,
) -> None:
    with DevStack(tmp_path / "stack", n_devices=1) as stack:
        rig = Rig(stack, tmp_path)
        try:
            rig.start_worker()
            old_kid = key_id_from_pem(rig.unwrap.read_bytes())
            held = list(rig.seal(OLD))
            rig.connect()
            for payload in held[: OLD // 2]:
                rig.send(payload)
            rotated = subprocess.run(
                [sys.executable, "-m", "cloud_sidecar", "keys", "rotate-unwrap",
                 "--config", str(rig.cfg), "--out", str(tmp_path / "unwrap-new.pem")],
                capture_output=True, text=True, timeout=120, check=False,
                env={**os.environ, **stack.token.env()},
            )  # fmt: skip
            assert rotated.returncode == 0, rotated.stderr
            assert json.loads(rotated.stdout)["old"] == old_kid
            for payload in held[OLD // 2 :]:
                rig.send(payload)  # sealed for the old key, arriving after the rotation
            new_kid = rig.outbox.set_unwrap_key((tmp_path / "unwrap-new.pem").read_bytes())
            assert new_kid == json.loads(rotated.stdout)["new"] != old_kid
            assert rig.outbox.seal() == 0  # nothing left unbatched yet
            rig.seal(NEW, first=2 * OLD)  # online now: sent as sealed
            rig.until_all_acked()
            stored, distinct, samples = rig.stored()
            kinds = rig.kinds()
            by_key = Counter(
                e["details"]["unwrap_key"]
                for e in map(json.loads, (rig.data_dir / "audit.jsonl").open())
                if e["kind"] == "ingest.stored"
            )
        finally:
            rig.close()
    s = rig.outbox.stats
    print(
        f"batches sealed {s.batches_sealed} ({OLD} for the old unwrap key, {NEW} for the new),"
        f" stored {stored} (old key {by_key[old_kid]}, new key {by_key[new_kid]}): lost"
        f" {s.batches_sealed - stored}, stored twice {stored - distinct}; acks {s.acks},"
        f" resends {s.resends}, deferred {s.deferred}"
    )
    assert stored == distinct == OLD + NEW and samples == 2 * (OLD + NEW)
    assert by_key == {old_kid: OLD, new_kid: NEW}
    assert s.rejected == {} and s.deferred == {} and s.acks == OLD + NEW
    assert "hsm.unwrap_rotated" in kinds and "ingest.rejected" not in kinds
