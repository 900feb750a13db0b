"""The ``train`` bench section: a quick run gives every ``train.*`` key as a finite number.

Small sizes (one minute of scene, the tiny base, a one-minute device street): the
scores are meaningless here, the code path and the adapter's size are not; the size
of the edge adapter depends only on the configured rank and targets, so its ratio to
the int8 base is asserted against the goal.
"""

from __future__ import annotations

import math

from benchmarks.run import GOALS, SECTIONS
from benchmarks.train_bench import run_train
from fleet_protocol.labels import CLASSES

KEYS = (
    "train.base_scene_macro_f1",
    "train.base_scene_fp32_macro_f1",
    "train.adapter_over_base_bytes",
    "train.adapter_scene_macro_f1",
    "train.adapter_scene_macro_f1_gain",
    "train.scene_windows",
    "train.adapter_bytes",
    "train.base_int8_bytes",
)


def test_quick_train_section_gives_every_key_and_a_small_adapter() -> None:
    keys, table = run_train(1, True, adapter_scene_s=60)
    assert set(KEYS) <= set(keys)
    for k, v in keys.items():
        assert isinstance(v, float) and math.isfinite(v), k
    for k in ("train.base_scene_macro_f1", "train.adapter_scene_macro_f1"):
        assert 0.0 <= keys[k] <= 1.0
    assert 0 < keys["train.scene_windows"] <= 60
    assert (
        keys["train.adapter_bytes"] / keys["train.base_int8_bytes"]
        == (keys["train.adapter_over_base_bytes"])
    )
    assert keys["train.adapter_over_base_bytes"] <= GOALS["train.adapter_over_base_bytes"].bound
    assert all(f"| {c} |" in table for c in CLASSES)


def test_train_section_is_registered_with_its_goals() -> None:
    assert "train" in dict(SECTIONS)
    assert GOALS["train.base_scene_macro_f1"].bound == 0.75
    assert GOALS["train.base_scene_macro_f1"].lower_is_better is False
    assert GOALS["train.adapter_over_base_bytes"].bound == 0.05
    assert GOALS["train.adapter_over_base_bytes"].lower_is_better is True
