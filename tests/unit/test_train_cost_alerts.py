"""Cost alerts of a training run (cloud_sidecar.adapter_fit, cloud_sidecar.train.RunMonitor):
the run's cost is extrapolated from the configured price per hour; 20 % over the budget
alerts (log, metrics.jsonl, audit), 3x the budget stops the run."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from cloud_sidecar.adapter_fit import FitPlan, LogMonitor, _check_budget, _cost, _Once
from cloud_sidecar.audit import AuditLog
from cloud_sidecar.errors import TrainingError
from cloud_sidecar.train import RunMonitor

PLAN = FitPlan(epochs=1, lr=1e-3, seed=0, price_per_hour=10.0, budget=1.0)


def test_cost_is_extrapolated_from_the_time_per_step_and_the_price_per_hour() -> None:
    values: dict[str, float] = {}
    # 36 s for 10 of 100 steps -> 360 s -> 0.1 h at 10 per hour
    assert _cost(PLAN, 36.0, 10, 100, values) == pytest.approx(1.0)
    assert values["projected_cost"] == 1.0
    assert _cost(FitPlan(epochs=1, lr=1e-3, seed=0), 36.0, 10, 100, {}) is None  # no price


def test_within_twenty_percent_of_the_budget_nothing_alerts() -> None:
    mon = LogMonitor()
    _check_budget(PLAN, 1.2, 5, mon)
    assert mon.alerts == []


def test_over_budget_by_more_than_twenty_percent_alerts_once_and_the_run_goes_on() -> None:
    mon = LogMonitor()
    once = _Once(mon)
    for step in (5, 10, 15):
        _check_budget(PLAN, 1.5, step, once)
    assert mon.alerts == [("cost_over_budget", {"step": 5, "projected_cost": 1.5, "budget": 1.0})]


def test_at_three_times_the_budget_the_run_stops_with_a_cost_stop_alert() -> None:
    mon = LogMonitor()
    with pytest.raises(TrainingError, match="3x the budget"):
        _check_budget(PLAN, 3.0, 7, mon)
    assert [k for k, _ in mon.alerts] == ["cost_stop"]


def test_a_cost_alert_reaches_the_log_the_run_metrics_and_the_audit_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    audit = AuditLog(tmp_path / "audit.jsonl", "eu-central-1")
    monitor = RunMonitor(audit, "run-x", tmp_path / "runs" / "run-x" / "metrics.jsonl")
    with caplog.at_level(logging.WARNING, logger="cloud_sidecar.train"):
        _check_budget(PLAN, 2.0, 9, monitor)
    assert "cost_over_budget" in caplog.text
    line = json.loads((tmp_path / "runs" / "run-x" / "metrics.jsonl").read_text())
    assert line == {"alert": "cost_over_budget", "step": 9, "projected_cost": 2.0, "budget": 1.0}
    entry = json.loads((tmp_path / "audit.jsonl").read_text().splitlines()[-1])
    assert entry["kind"] == "train.alert" and entry["details"]["alert"] == "cost_over_budget"
