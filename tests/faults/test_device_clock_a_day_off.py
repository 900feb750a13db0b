"""A device whose clock is a day off enrolls, keeps serving, and every batch it seals is
stored exactly once (docs/adr/0017, "Device clocks").

Before the policy, enrollment, renewal and re-enrollment refused a request more than
600 s off the sidecar's clock (``stale_request``): such a device never enrolled, or,
enrolled, could not renew and was locked out when its certificate expired. Now no
freshness decision rests on wall time; the skew is counted (``fleet_clock_skewed_total``)
and audited (``fleet.clock_skewed``). Uploads never used it: replay protection is the
batch id and the (epoch, sequence) window.

Real components: Mosquitto, one swtpm, SoftHSM, the sidecar in this process, and
``edge-daemon run`` as its own process replaying a street at real time, enrolled with
a claim. Its Python wall clock (``time.time``, ``time.time_ns``) runs a day ahead, set
by a ``sitecustomize`` module on its path: every timestamp it writes (requests,
envelopes, reports) is a day off. OpenSSL and ``datetime`` keep the host clock (no
libfaketime here), so certificate validity is checked on the real time; a clock a day
*behind* would also need certificates backdated by a day (see the ADR).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from devstack.stack import DevStack
from tests.integration.conftest import base_model  # noqa: F401 - the session fixture

from .daemon_run import (
    buffer_counts,
    daemon_config,
    report,
    serving_sidecar,
    start_daemon,
    stop_daemon,
    wait,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.soak]
DAY_S = 86_400

SKEW = """
import time as _t

_time, _time_ns = _t.time, _t.time_ns
_t.time = lambda: _time() + {skew_s}
_t.time_ns = lambda: _time_ns() + {skew_s} * 1_000_000_000
"""


def test_a_device_with_its_clock_a_day_ahead_enrolls_serves_and_loses_nothing(
    tmp_path: Path,
    base_model: Any,  # noqa: F811
) -> None:
    _a_day_off(tmp_path, base_model, DAY_S)


def test_a_device_with_its_clock_a_day_behind_enrolls_serves_and_loses_nothing(
    tmp_path: Path,
    base_model: Any,  # noqa: F811
) -> None:
    """As far as this host allows: the daemon's Python clock a day behind (timestamps,
    the renewer's and the OTA clock's view); TLS still checks validity on the host clock
    (no libfaketime), so what a day-behind OpenSSL needs (server certificates issued
    more than a day earlier, ADR 0017) is not exercised here."""
    _a_day_off(tmp_path, base_model, -DAY_S)


def _a_day_off(tmp_path: Path, base_model: Any, skew_s: int) -> None:  # noqa: F811
    skewed = tmp_path / "skewed-clock"
    skewed.mkdir()
    (skewed / "sitecustomize.py").write_text(SKEW.format(skew_s=skew_s))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(skewed), *filter(None, [os.environ.get("PYTHONPATH", "")])])}  # fmt: skip
    with (
        DevStack(tmp_path / "stack", n_devices=1) as stack,
        serving_sidecar(stack, tmp_path, base_model) as app,
    ):
        slot = stack.devices[0]
        path = daemon_config(stack, app, slot, tmp_path, base_model, 25, seed=31)
        state = Path(json.loads(path.read_text())["state_dir"])
        proc = start_daemon(path, tmp_path / "daemon.log", env)
        try:
            since: list[tuple[dict[str, int], float]] = []

            def done() -> bool:  # ended, all acked, unchanged over 4 s (the last seal is in)
                r = report(state)
                b = dict(r.get("buffer", {}))
                if r.get("state") != "ended" or not b or b["batches"] != b["batches_acked"]:
                    since.clear()
                    return False
                if not since or since[0][0] != b:
                    since[:] = [(b, time.monotonic())]
                return time.monotonic() - since[0][1] >= 4

            wait("the street replayed and every batch acknowledged", done, proc, 240)
            counts = buffer_counts(state)
            uplink = report(state)["uplink"]
        finally:
            stop_daemon(proc)
        (db_path,) = (tmp_path / "cloud").rglob("store.sqlite3")
        db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
        stored, distinct = db.execute(
            "SELECT COUNT(*), COUNT(DISTINCT batch_id) FROM batches"
        ).fetchone()
        db.close()
        skewed_requests = app.metrics.get("fleet_clock_skewed_total", op="enroll")
        refused = app.metrics.get("ingest_rejected_total", reason="replay")
    print(
        f"device clock {skew_s:+d} s: enrollment requests counted as skewed {skewed_requests};"
        f" batches sealed {counts['batches']}, stored {stored}: lost {counts['batches'] - stored},"
        f" stored twice {stored - distinct}; acks {uplink['acks']},"
        f" rejected {uplink['rejected']}, refused as replays {refused}"
    )
    assert skewed_requests >= 1
    assert (
        counts["batches"] > 0 and stored == distinct == counts["batches"] == counts["batches_acked"]
    )
    assert uplink["rejected"] == {} and refused == 0
