"""The adapter training loop's metrics, alerts and stops (cloud_sidecar.adapter_fit)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

from cloud_sidecar.adapter_fit import FitPlan, LogMonitor, fit
from cloud_sidecar.errors import TrainingError
from cloud_sidecar.model import ADAPTABLE_LAYERS, AudioCNN
from cloud_sidecar.store_api import FEATURE_SHAPE
from fleet_protocol.labels import CLASSES


def _model() -> AudioCNN:
    torch.manual_seed(0)
    model = AudioCNN(len(CLASSES))
    get_peft_model(model, LoraConfig(r=2, lora_alpha=2, target_modules=list(ADAPTABLE_LAYERS)))
    return model


def _data(n: int = 64) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, *FEATURE_SHAPE)).astype(np.float32)
    return x, rng.integers(0, len(CLASSES), size=n).astype(np.int64)


def test_metrics_come_every_n_steps_and_a_large_gradient_alerts_once() -> None:
    x, y = _data()
    mon = LogMonitor()
    fit(_model(), x, y, FitPlan(epochs=4, lr=5e-3, seed=0, batch=16, log_every=4,
                                max_grad_norm=0.0), val=(x[:8], y[:8]), monitor=mon)  # fmt: skip
    assert [s for s, _ in mon.history] == [4, 8, 12, 16]
    assert set(mon.history[0][1]) >= {"train_loss", "val_loss", "grad_norm", "lr", "step_seconds"}
    assert [k for k, _ in mon.alerts] == ["grad_norm"]


def test_a_run_projected_over_three_times_its_budget_stops() -> None:
    x, y = _data()
    mon = LogMonitor()
    plan = FitPlan(epochs=50, lr=5e-3, seed=0, batch=16, log_every=2,
                   price_per_hour=1e6, budget=0.01)  # fmt: skip
    with pytest.raises(TrainingError, match="3x the budget"):
        fit(_model(), x, y, plan, monitor=mon)
    assert mon.alerts[-1][0] == "cost_stop" and mon.history[0][0] == 2


def test_a_diverging_run_stops_with_a_clear_error() -> None:
    x, y = _data()
    x[3] = np.nan
    with pytest.raises(TrainingError, match="non-finite training loss"):
        fit(_model(), x, y, FitPlan(epochs=1, lr=5e-3, seed=0, batch=64))
