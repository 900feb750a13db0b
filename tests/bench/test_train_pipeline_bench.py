"""The ``train.*`` bench section (benchmarks/train_pipeline.py) at small sizes: every key
is written as a finite number, with a real SoftHSM-signed bundle behind the loop time.

No goal asserts: the figures are for BENCHMARKS.md, not for CI.
"""

from __future__ import annotations

import math
from pathlib import Path

from benchmarks.run import GOALS
from benchmarks.train_pipeline import goals, run_train_pipeline


def test_quick_train_pipeline_section_writes_every_train_key_as_a_finite_number(
    tmp_path: Path,
) -> None:
    from devstack.dataset import pretrain_synthetic

    base = pretrain_synthetic(tmp_path / "base", seed=0, per_class=3, epochs=1)
    results = run_train_pipeline(base.dir, quick=True)
    assert set(results) == set(goals())
    assert all(k in GOALS for k in results)  # registered with run.py's table
    for key, value in results.items():
        assert isinstance(value, float) and math.isfinite(value), key
    assert results["train.lora_peak_increment_mib"] > 0
    assert results["train.full_peak_increment_mib"] > 0
    assert 0 < results["train.lora_over_full_state_bytes"] < 1  # LoRA trains fewer weights
    assert results["train.loop_seconds"] > 0 and results["train.loop_windows"] == 80
    assert 0 <= results["train.membership_auc"] <= 1
    assert 0 <= results["train.residual_scan_recall"] <= 1
    assert 0 <= results["train.residual_scan_false_flag"] <= 1
