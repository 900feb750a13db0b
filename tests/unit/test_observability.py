"""The shipped Grafana dashboard and Prometheus alert rules load and name real metrics."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from cloud_sidecar import metrics as cloud_metrics
from edge_daemon import metrics as edge_metrics

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "observability" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "observability" / "grafana" / "fleet-dashboard.json"
SERIES = re.compile(r"\b((?:edge|sidecar)_[a-z0-9_]+)")
HIST_SUFFIXES = ("_bucket", "_count", "_sum")


def _known() -> set[str]:
    names = set()
    for prefix, specs in (
        (edge_metrics.PREFIX, edge_metrics.SPECS),
        (cloud_metrics.PREFIX, cloud_metrics.SPECS),
        (cloud_metrics.PREFIX, cloud_metrics.TRAIN_SPECS),
    ):
        for s in specs:
            full = f"{prefix}_{s.name}"
            names.add(full)
            if s.kind == "histogram":
                names.update(full + suffix for suffix in HIST_SUFFIXES)
    return names


def _series(expr: str) -> set[str]:
    return set(SERIES.findall(expr))


def _rules() -> list[dict[str, object]]:
    doc = yaml.safe_load(RULES.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def test_alert_rules_load_and_every_rule_is_complete() -> None:
    rules = _rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)) >= 10
    for r in rules:
        assert isinstance(r["expr"], str) and r["expr"].strip()
        assert r["labels"]["severity"] in {"critical", "warning", "info"}  # type: ignore[index]
        assert r["annotations"]["summary"]  # type: ignore[index]


def test_alert_rules_cover_what_the_services_detect_and_name_real_metrics() -> None:
    known = _known()
    exprs = " ".join(str(r["expr"]) for r in _rules())
    assert _series(exprs) <= known, _series(exprs) - known
    for needed in (
        "edge_up",  # the watchdog's view
        "edge_uploads_pending",  # upload backlog
        "sidecar_device_certificate_expiry_timestamp_seconds",
        "edge_gate_residual_speech_total",
        "sidecar_train_failed",
    ):
        assert needed in exprs


def test_every_alert_is_explained_in_the_operator_guide() -> None:
    guide = (ROOT / "docs" / "operator-guide.md").read_text()
    alerts = guide[guide.index("## Alerts") :]
    for r in _rules():
        assert f"`{r['alert']}`" in alerts, r["alert"]


def test_promtool_accepts_the_rules_when_installed() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed")
    subprocess.run([promtool, "check", "rules", str(RULES)], check=True, timeout=60)


def test_the_dashboard_loads_and_queries_only_documented_metrics() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "sovereign-edge-fleet"
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "device"} <= variables
    panels = dash["panels"]
    assert len({p["id"] for p in panels}) == len(panels) >= 10
    known = _known()
    for p in panels:
        assert p["datasource"]["uid"] == "${datasource}"
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert _series(t["expr"]) <= known, (p["title"], t["expr"])
        x, w = p["gridPos"]["x"], p["gridPos"]["w"]
        assert x >= 0 and x + w <= 24
    titles = " ".join(p["title"] for p in panels).lower()
    for topic in ("latency", "buffer", "rollout", "training", "speech", "certificate"):
        assert topic in titles
