"""The trainer's Prometheus textfile (cloud_sidecar.train_metrics), fed by a real run of
the adapter training loop and read back with prometheus-client's text parser."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

from cloud_sidecar.adapter_fit import FitPlan, LogMonitor, fit
from cloud_sidecar.errors import GateRejectedError, TrainingError
from cloud_sidecar.model import ADAPTABLE_LAYERS, AudioCNN
from cloud_sidecar.store_api import FEATURE_SHAPE
from cloud_sidecar.train_metrics import ProgressMonitor, TrainProgress, tracked
from fleet_protocol.labels import CLASSES

parser = pytest.importorskip("prometheus_client.parser")

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _parse(path: Path) -> tuple[Samples, dict[str, str]]:
    families = list(parser.text_string_to_metric_families(path.read_text()))
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples
    }
    return samples, {f.name: f.type for f in families}


def _model() -> AudioCNN:
    torch.manual_seed(0)
    model = AudioCNN(len(CLASSES))
    get_peft_model(model, LoraConfig(r=2, lora_alpha=2, target_modules=list(ADAPTABLE_LAYERS)))
    return model


def _data(n: int = 48) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, *FEATURE_SHAPE)).astype(np.float32)
    return x, rng.integers(0, len(CLASSES), size=n).astype(np.int64)


def test_a_short_training_run_exports_progress_and_loss_that_the_client_parser_reads(
    tmp_path: Path,
) -> None:
    path = tmp_path / "textfile" / "train.prom"
    x, y = _data()
    seen: list[Samples] = []

    class Spy(LogMonitor):  # reads the file as a scrape would, after each metrics step
        def metrics(self, step: int, values: dict[str, float]) -> None:
            super().metrics(step, values)
            seen.append(_parse(path)[0])

    with tracked(path) as progress:
        assert _parse(path)[0][("sidecar_train_phase", (("phase", "dataset"),))] == 1
        plan = FitPlan(epochs=3, lr=5e-3, seed=0, batch=16, log_every=3, max_grad_norm=0.0,
                       price_per_hour=2.0)  # fmt: skip
        fit(_model(), x, y, plan, val=(x[:8], y[:8]), monitor=ProgressMonitor(progress, Spy()))
        progress.phase("gate")
    # 3 epochs x 3 batches = 9 steps, logged at 3, 6, 9: the ratio climbs to 1
    assert [s[("sidecar_train_steps_total", ())] for s in seen] == [3, 6, 9]
    assert [s[("sidecar_train_progress_ratio", ())] for s in seen] == pytest.approx(
        [1 / 3, 2 / 3, 1]
    )
    mid = seen[0]
    assert mid[("sidecar_train_phase", (("phase", "train"),))] == 1
    assert mid[("sidecar_train_steps_planned", ())] == 9
    for name in ("loss", "val_loss", "grad_norm", "learning_rate", "step_seconds"):
        assert mid[(f"sidecar_train_{name}", ())] > 0, name
    assert mid[("sidecar_train_projected_cost", ())] >= 0
    assert mid[("sidecar_train_alerts_total", (("kind", "grad_norm"),))] == 1  # once per run

    end, types = _parse(path)
    assert end[("sidecar_train_phase", (("phase", "registered"),))] == 1
    assert ("sidecar_train_phase", (("phase", "gate"),)) not in end
    assert end[("sidecar_train_gate_passed", ())] == 1
    assert end[("sidecar_train_failed", ())] == 0
    assert end[("sidecar_train_last_run_timestamp_seconds", ())] > 1.7e9
    assert types["sidecar_train_steps"] == "counter"
    assert types["sidecar_train_loss"] == "gauge"
    assert not [p.name for p in path.parent.iterdir() if p.name != "train.prom"]  # no temp left


def test_a_rejected_candidate_is_not_a_failure_and_an_error_is(tmp_path: Path) -> None:
    rejected, broken = tmp_path / "rejected.prom", tmp_path / "broken.prom"
    with pytest.raises(GateRejectedError), tracked(rejected) as progress:
        progress.phase("gate")
        raise GateRejectedError("worse than production")
    with pytest.raises(TrainingError), tracked(broken):
        raise TrainingError("too few samples")
    r, b = _parse(rejected)[0], _parse(broken)[0]
    assert r[("sidecar_train_gate_passed", ())] == 0 and r[("sidecar_train_failed", ())] == 0
    assert r[("sidecar_train_phase", (("phase", "gate"),))] == 1
    assert b[("sidecar_train_failed", ())] == 1
    assert b[("sidecar_train_phase", (("phase", "dataset"),))] == 1
    assert ("sidecar_train_gate_passed", ()) not in b


def test_unknown_loop_metrics_are_ignored_and_an_unwritable_file_never_fails_the_run(
    tmp_path: Path,
) -> None:
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("")
    progress = TrainProgress(blocked / "train.prom")  # its directory cannot be created
    progress.step(5, {"train_loss": 0.5, "a_future_metric": 1.0, "steps_planned": 10})
    assert progress.metrics.get("train_loss") == 0.5
    assert progress.metrics.get("train_progress_ratio") == 0.5
    with pytest.raises(KeyError):
        progress.phase("published")  # not a phase of a training run
