"""The broker-backed OTA rollout benchmark runs end to end at small N.

Real Mosquitto, SoftHSM and the sidecar (devstack), three simulated devices each with
its own certificate and connection: every device reports CONFIRMED and the keys
``benchmarks.run`` publishes are there. No timing goal is asserted beyond a generous
bound (the figure itself is for BENCHMARKS.md).
"""

from __future__ import annotations

import math

import pytest

pytest.importorskip("tuf")

from benchmarks.ota import run_ota_broker


def test_broker_rollout_confirms_every_device_and_reports_the_bench_keys() -> None:
    results = run_ota_broker(devices=3, timeout_s=120)
    assert results["ota.rollout_200_failures"] == 0
    assert results["ota.rollout_devices"] == 3
    assert 0 < results["ota.rollout_200_seconds"] < 120
    assert math.isfinite(results["ota.wire_overhead"])
    assert 1.0 < results["ota.wire_overhead"] <= 1.10
