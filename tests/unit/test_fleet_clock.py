"""Device clocks (docs/adr/0017, decision 8): a request a day off the sidecar clock is
served, counted and audited; freshness rests on claims, challenges and signatures, not
on wall time. Same pure-logic rig as tests/unit/test_fleet_insiders.py."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from fleet_protocol import enroll, topics

from .test_fleet_insiders import Device, Fleet

DAY_MS = 86_400_000


def _enroll_at(fleet: Fleet, dev: Device, claim: enroll.Claim, at_ms: int) -> enroll.CertResponse:
    req = enroll.EnrollRequest(
        device_id=dev.id, claim_id=claim.claim_id, token=claim.token,
        csr=enroll.make_csr(dev.tls, dev.id), identity_key=dev.identity_pem(),
        created_at_ms=at_ms, nonce=enroll.new_nonce(),
    )  # fmt: skip
    channel = enroll.session_channel(claim.claim_id, claim.token, req.nonce)
    reply = fleet.svc.handle(topics.enroll_request(channel), req.signed(dev.sign).to_bytes())
    assert reply is not None
    return enroll.CertResponse.from_bytes(reply[1])


def _renew_at(fleet: Fleet, dev: Device, at_ms: int) -> enroll.CertResponse:
    req = enroll.RenewRequest(
        device_id=dev.id, kid=enroll.key_id(dev.identity.public_key()),
        csr=enroll.make_csr(ec.generate_private_key(ec.SECP256R1()), dev.id),
        created_at_ms=at_ms, nonce=enroll.new_nonce(),
    )  # fmt: skip
    reply = fleet.svc.handle(topics.cert_request(dev.id), req.signed(dev.sign).to_bytes())
    assert reply is not None
    return enroll.CertResponse.from_bytes(reply[1])


@pytest.mark.parametrize("offset_ms", [DAY_MS, -DAY_MS])
def test_a_device_a_day_off_enrolls_and_renews_and_the_skew_is_counted_and_audited(
    tmp_path: Path, offset_ms: int
) -> None:
    """Before: both refused as ``stale_request`` (more than 600 s off)."""
    fleet, dev = Fleet(tmp_path), Device("pi-20")
    now = int(time.time() * 1000)
    assert _enroll_at(fleet, dev, fleet.svc.create_claim(dev.id), now + offset_ms).status == (
        "issued"
    )
    assert _renew_at(fleet, dev, now + offset_ms).status == "issued"
    assert fleet.metrics.get("fleet_clock_skewed_total", op="enroll") == 1
    assert fleet.metrics.get("fleet_clock_skewed_total", op="renew") == 1
    skews = [
        e["details"]["skew_s"]
        for e in map(json.loads, (tmp_path / "audit.jsonl").open())
        if e["kind"] == "fleet.clock_skewed"
    ]
    assert len(skews) == 2 and all(abs(s - offset_ms / 1000) < 60 for s in skews)


def test_a_request_within_the_tolerance_is_not_counted(tmp_path: Path) -> None:
    fleet, dev = Fleet(tmp_path), Device("pi-21")
    at = int(time.time() * 1000) - 300_000  # 5 minutes behind
    assert _enroll_at(fleet, dev, fleet.svc.create_claim(dev.id), at).status == "issued"
    assert fleet.metrics.get("fleet_clock_skewed_total", op="enroll") == 0


def test_a_used_claim_replayed_a_day_later_is_still_refused(tmp_path: Path) -> None:
    """Freshness without wall time: the claim is single-use."""
    fleet, dev = Fleet(tmp_path), Device("pi-22")
    claim = fleet.svc.create_claim(dev.id)
    now = int(time.time() * 1000)
    assert _enroll_at(fleet, dev, claim, now).status == "issued"
    again = _enroll_at(fleet, Device("pi-22"), claim, now + DAY_MS)
    assert again.status == "rejected" and again.reason == "claim_used"
