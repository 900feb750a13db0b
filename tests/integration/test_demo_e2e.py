"""The whole loop, as `make demo` runs it (shorter streams): every stage through real parts.

Asserts the demo's done-when: accuracy on the shifted class rises by at least 5 points,
every device applies the update, speech leakage stays at or below 0.1 %, and nothing
the demo started is left running.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cloud_sidecar.store_api import FEATURE_SHAPE
from fleet_protocol.labels import CLASSES

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _running(pattern: str) -> list[str]:
    out = subprocess.run(["pgrep", "-fa", pattern], capture_output=True, text=True, check=False)
    return [line for line in out.stdout.splitlines() if "pgrep" not in line]


def test_demo_loop_improves_shifted_accuracy_updates_every_device_and_leaks_no_speech(
    tmp_path: Path,
) -> None:
    out = tmp_path / "demo-out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "devstack",
            "demo",
            "--out",
            str(out),
            "--stream-seconds",
            "200",
            "--eval-seconds",
            "90",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["accuracy_after"] >= s["accuracy_before"] + 0.05
    assert s["devices_updated"] == 3
    assert s["speech_frames_in"] > 0
    assert s["speech_frames_leaked"] <= 0.001 * s["speech_frames_in"]
    assert 0 < s["uplink_bytes"] < s["raw_audio_bytes"]
    assert 0 < s["adapter_bytes"] < s["base_model_fp32_bytes"]
    assert (Path(s["adapter_dir"]) / "adapter_config.json").is_file()
    assert (Path(s["adapter_dir"]) / "adapter_model.safetensors").is_file()
    # the demo's bundle: its adapter loads with stock PEFT onto the demo's base, and it
    # carries the training environment's SBOM, listed in the signed bundle.json
    import torch
    from peft import PeftModel

    from cloud_sidecar.lora import _load_base_module
    from cloud_sidecar.pretrain import load_base_model

    module = _load_base_module(load_base_model(Path(s["base_model_dir"])))
    peft_model = PeftModel.from_pretrained(module, s["adapter_dir"]).eval()
    probs = peft_model(torch.zeros((2, *FEATURE_SHAPE)))
    assert probs.shape == (2, len(CLASSES))
    bundle = Path(s["adapter_dir"]).parent
    assert "sbom.cdx.json" in json.loads((bundle / "bundle.json").read_text())["files"]
    meta = Path(s["ota_repo_dir"]) / "metadata"  # the exported TUF repository (ADR 0016)
    assert (meta / "1.root.json").is_file() and (meta / "timestamp.json").is_file()
    assert any(meta.glob("*.targets.json")) and any((meta.parent / "targets").iterdir())
    verify = subprocess.run(
        [sys.executable, "-m", "cloud_sidecar", "audit", "verify", s["audit_log"]],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verify.returncode == 0, verify.stderr
    assert not _running(str(out))
