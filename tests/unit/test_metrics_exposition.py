"""Metric families of both services: declared, documented, and parsed by prometheus-client.

The endpoints of running services are scraped in
tests/integration/test_appliance_services.py; the trainer's textfile is read in
tests/unit/test_train_metrics.py.
"""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import pytest

from cloud_sidecar import metrics as cloud_metrics
from edge_daemon import metrics as edge_metrics
from fleet_protocol.io import metrics as m

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = [
    *(f"{edge_metrics.PREFIX}_{s.name}" for s in edge_metrics.SPECS),
    *(f"{cloud_metrics.PREFIX}_{s.name}" for s in cloud_metrics.SPECS),
    *(f"{cloud_metrics.PREFIX}_{s.name}" for s in cloud_metrics.TRAIN_SPECS),
]


def _sample() -> m.Metrics:
    mm = m.Metrics(
        "t",
        [
            m.Spec("rejected_total", "counter", "Refused, by reason.", ("reason",)),
            m.Spec("buffer_bytes", "gauge", "Bytes.", ("device",)),
            m.Spec("latency_seconds", "histogram", "Latency.", ("device",)),
        ],
    )
    mm.inc("rejected_total", reason='bad "sig"\n')
    mm.inc("rejected_total", 2, reason="replay")
    mm.set("buffer_bytes", 4096, device="pi-1")
    for v in (0.003, 0.02, 0.02, 7.0):
        mm.observe("latency_seconds", v, device="pi-1")
    return mm


def _parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    parser = pytest.importorskip("prometheus_client.parser")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in parser.text_string_to_metric_families(text)
        for s in fam.samples
        if not s.name.endswith("_created")
    }


def test_every_family_is_documented_with_its_full_name() -> None:
    doc = (ROOT / "docs" / "metrics.md").read_text()
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", doc, re.MULTILINE))
    assert documented == set(FAMILIES)


def test_names_carry_units_and_counters_end_in_total() -> None:
    for spec in (*edge_metrics.SPECS, *cloud_metrics.SPECS, *cloud_metrics.TRAIN_SPECS):
        assert re.fullmatch(r"[a-z][a-z0-9_]*", spec.name)
        assert spec.name.endswith("_total") == (spec.kind == "counter"), spec.name
        if spec.kind == "histogram":
            assert spec.name.endswith("_seconds"), spec.name


def test_exposition_parses_with_the_client_library_parser() -> None:
    samples = _parse(_sample().render())
    assert samples[("t_rejected_total", (("reason", 'bad "sig"\n'),))] == 1
    assert samples[("t_rejected_total", (("reason", "replay"),))] == 2
    assert samples[("t_buffer_bytes", (("device", "pi-1"),))] == 4096
    assert samples[("t_latency_seconds_bucket", (("device", "pi-1"), ("le", "0.005")))] == 1
    assert samples[("t_latency_seconds_bucket", (("device", "pi-1"), ("le", "0.025")))] == 3
    assert samples[("t_latency_seconds_bucket", (("device", "pi-1"), ("le", "+Inf")))] == 4
    assert samples[("t_latency_seconds_count", (("device", "pi-1"),))] == 4


def test_the_built_in_writer_says_the_same_as_the_client_library() -> None:
    pytest.importorskip("prometheus_client")
    mm = _sample()
    assert _parse(mm._render_builtin()) == _parse(mm.render())


def test_undeclared_names_labels_and_falling_counters_are_refused() -> None:
    mm = _sample()
    with pytest.raises(KeyError):
        mm.inc("rejectd_total", reason="x")
    with pytest.raises(KeyError):
        mm.inc("rejected_total", why="x")
    with pytest.raises(ValueError):
        mm.inc("rejected_total", -1, reason="x")
    with pytest.raises(ValueError):
        mm.set_total("rejected_total", 1, reason="replay")  # was 2
    with pytest.raises(TypeError):
        mm.set("rejected_total", 5, reason="x")


def test_the_endpoint_serves_the_families_over_http() -> None:
    server = m.MetricsServer(_sample(), "127.0.0.1", 0).start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as r:
            assert r.status == 200
            text = r.read().decode()
    finally:
        server.close()
    assert "t_buffer_bytes" in text
    assert _parse(text)[("t_buffer_bytes", (("device", "pi-1"),))] == 4096
