"""The demo's report.html: one self-contained page with the charts a city's team reads."""

from __future__ import annotations

import re
from pathlib import Path

from devstack.report import write_report


def test_the_report_is_one_self_contained_page_with_every_chart(tmp_path: Path) -> None:
    summary = {"raw_audio_bytes": 19_200_000, "uplink_bytes": 46_264, "speech_frames_in": 10,
               "speech_frames_leaked": 0, "speech_frames_uploaded": 0, "devices_updated": 3,
               "devices": 3, "adapter_bytes": 54_416, "base_model_bytes": 154_608}  # fmt: skip
    devices = [
        {"device": f"pi-0{i}", "shifted_before": 0.0, "shifted_after": 0.9,
         "overall_before": 0.5, "overall_after": 0.9}
        for i in range(3)
    ]  # fmt: skip
    gate = {
        "passed": True, "failures": [], "membership_auc": 0.47,
        "golden_production": {"per_class_recall": {"siren": 0.9, "silence": 1.0}},
        "golden_candidate": {"per_class_recall": {"siren": 1.0, "silence": 1.0}},
        "val_production": {"per_class_recall": {"siren": 0.5}},
        "val_candidate": {"per_class_recall": {"siren": 0.9}},
    }  # fmt: skip
    metrics = [{"step": s, "train_loss": 1 / s, "val_loss": 2 / s} for s in (10, 20, 30)]
    metrics.append({"alert": "grad_norm", "step": 5})
    page = write_report(tmp_path / "report.html", summary, devices, gate, metrics).read_text()
    assert page.count("<svg") == 6
    assert "pi-02" in page and "<polyline" in page and "silence" in page
    assert not re.search(r"(src|href)=|https?://|<script", page)
    names = [{"device": "<b>x</b>", "shifted_before": 0, "shifted_after": 0,
              "overall_before": 0, "overall_after": 0}]  # fmt: skip
    assert "<b>x</b>" not in write_report(tmp_path / "r2.html", {}, names, {}, []).read_text()
