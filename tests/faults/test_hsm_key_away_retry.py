"""The HSM fails transiently during ingest, two ways. (1) The unwrap key's object goes away
from a token that still answers, and comes back. The upload that meets the dead key handle is acked
``retry`` (signed: the ack key is still there), every batch stays on the device, and
after the key is back every batch is stored exactly once (docs/adr/0017).

Real components as in test_two_ingest_workers.py. The failure is made by moving the
RSA unwrap key's object file out of the SoftHSM token directory and back, what a token
replica that does not hold the key yet, or a key store briefly away, looks like: the
serving session's cached key handle becomes invalid (``CKR_OBJECT_HANDLE_INVALID``) while
the token and its ack key answer. Before the fix that was "unavailable": no ack, and the
reopened session never saw the key again (SoftHSM keeps the vanished object invalid
until the library is re-initialised), so the device resent for ever.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from devstack.stack import DevStack

from .uplink_rig import Rig, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]
N_BATCHES, BEFORE = 8, 3


def _unwrap_key_object(tokens: Path) -> Path:
    """The RSA-3072 private key's object file: the largest object in the token."""
    objects = [p for p in tokens.glob("*/*.object") if p.name != "token.object"]
    return max(objects, key=lambda p: p.stat().st_size)


def _metric(rig: Rig, name: str) -> int:
    path = rig.data_dir / "metrics.prom"
    text = path.read_text() if path.exists() else ""
    pattern = rf"^sidecar_{name}(?:{{[^}}]*}})? (\d+)(?:\.0)?$"  # the exposition's names
    return sum(int(v) for v in re.findall(pattern, text, re.M))


def test_a_key_away_from_the_hsm_mid_ingest_is_acked_retry_and_every_batch_stored_once(
    tmp_path: Path,
) -> None:
    with DevStack(tmp_path / "stack", n_devices=1) as stack:
        rig = Rig(stack, tmp_path)
        key = _unwrap_key_object(stack.workdir / "hsm" / "tokens")
        away = key.with_name(key.name + ".away")
        try:
            rig.start_worker()
            held = list(rig.seal(N_BATCHES))
            rig.connect()
            for payload in held[:BEFORE]:
                rig.send(payload)
            wait_for("the first batches stored", lambda: rig.stored()[0] == BEFORE, 60,
                     rig.outbox.resend_due)  # fmt: skip
            os.rename(key, away)
            try:
                for payload in held[BEFORE:]:
                    rig.send(payload)
                wait_for("a retry ack", lambda: sum(rig.outbox.stats.deferred.values()) >= 1,
                         60, rig.outbox.resend_due)  # fmt: skip
                deadline = time.monotonic() + 8
                while time.monotonic() < deadline:  # the device keeps resending; nothing lands
                    rig.outbox.resend_due()
                    time.sleep(0.5)
                during = rig.stored()[0]
                kept = len(rig.buffer.unacked())
            finally:
                os.rename(away, key)
            rig.until_all_acked()
            stored, distinct, samples = rig.stored()
            kinds = rig.kinds()
        finally:
            rig.close()
    s = rig.outbox.stats
    print(
        f"batches sealed {N_BATCHES}, stored before the key went away {BEFORE}, while away"
        f" {during - BEFORE} (kept on the device {kept}); stored {stored}: lost"
        f" {N_BATCHES - stored}, stored twice {stored - distinct}; retry acks {s.deferred},"
        f" acks {s.acks}, resends {s.resends}"
    )
    assert during == BEFORE and kept == N_BATCHES - BEFORE
    assert stored == distinct == N_BATCHES and samples == 2 * N_BATCHES
    assert s.deferred.get("hsm_error", 0) >= 1 and s.rejected == {}
    assert "ingest.deferred" in kinds and "ingest.rejected" not in kinds
    assert _metric(rig, "hsm_reopened_total") >= 1  # the session re-read the token


def test_the_whole_token_away_mid_ingest_sends_no_ack_and_every_batch_is_stored_once(
    tmp_path: Path,
) -> None:
    with DevStack(tmp_path / "stack", n_devices=1) as stack:
        rig = Rig(stack, tmp_path)
        tokens = stack.workdir / "hsm" / "tokens"
        away = tokens.with_name("tokens.away")
        try:
            rig.start_worker()
            held = list(rig.seal(N_BATCHES))
            rig.connect()
            for payload in held[:BEFORE]:
                rig.send(payload)
            wait_for("the first batches stored", lambda: rig.stored()[0] == BEFORE, 60,
                     rig.outbox.resend_due)  # fmt: skip
            acks_before = rig.outbox.stats.acks
            os.rename(tokens, away)
            try:
                for payload in held[BEFORE:]:
                    rig.send(payload)
                deadline = time.monotonic() + 8
                while time.monotonic() < deadline:  # the device keeps resending; nothing lands
                    rig.outbox.resend_due()
                    time.sleep(0.5)
                during = rig.stored()[0]
                kept = len(rig.buffer.unacked())
                acks_during = rig.outbox.stats.acks - acks_before
            finally:
                os.rename(away, tokens)
            rig.until_all_acked()
            stored, distinct, samples = rig.stored()
        finally:
            rig.close()
    s = rig.outbox.stats
    print(
        f"batches sealed {N_BATCHES}, stored before the token went away {BEFORE}, while away"
        f" {during - BEFORE}, acks while away {acks_during} (kept on the device {kept});"
        f" stored {stored}: lost {N_BATCHES - stored}, stored twice {stored - distinct};"
        f" acks {s.acks}, resends {s.resends}, deferred {s.deferred}"
    )
    assert during == BEFORE and acks_during == 0 and kept == N_BATCHES - BEFORE
    assert stored == distinct == N_BATCHES and samples == 2 * N_BATCHES
    assert s.rejected == {} and _metric(rig, "hsm_reopened_total") >= 1
