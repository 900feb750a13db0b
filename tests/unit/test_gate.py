"""The evaluation gate's rules (cloud_sidecar.gate.judge) on metric dicts."""

from __future__ import annotations

from typing import Any

from cloud_sidecar.config import TrainConfig
from cloud_sidecar.gate import judge


def m(
    acc: float,
    f1: float,
    recall: dict[str, float],
    support: dict[str, int] | None = None,
    devices: dict[str, float] | None = None,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "n": 100,
        "accuracy": acc,
        "macro_f1": f1,
        "per_class_recall": recall,
        "class_support": support or dict.fromkeys(recall, 20),
    }
    if devices is not None:
        out["per_device_accuracy"] = devices
        out["device_support"] = dict.fromkeys(devices, 30)
    return out


GOLD = m(0.9, 0.9, {"siren": 0.9, "silence": 1.0})
CFG = TrainConfig()


def test_an_equal_or_better_candidate_passes() -> None:
    prod = m(0.7, 0.6, {"siren": 0.5, "silence": 1.0}, devices={"pi-00": 0.7})
    cand = m(0.8, 0.7, {"siren": 0.7, "silence": 1.0}, devices={"pi-00": 0.8})
    d = judge(prod, cand, GOLD, GOLD, (1.0, 1.02), CFG)
    assert d["passed"] and d["failures"] == []


def test_a_class_losing_its_recall_fails_even_when_accuracy_rises() -> None:
    prod = m(0.70, 0.60, {"siren": 0.40, "silence": 1.0})
    cand = m(0.85, 0.61, {"siren": 0.95, "silence": 0.0})  # the demo run of issue 12
    d = judge(prod, cand, GOLD, GOLD, (1.0, 1.0), CFG)
    assert not d["passed"]
    assert d["failures"] == ["val recall of silence: 1.000 -> 0.000"]


def test_a_class_with_too_few_samples_is_reported_but_not_gated() -> None:
    prod = m(0.7, 0.6, {"siren": 0.5, "horn": 1.0}, support={"siren": 40, "horn": 3})
    cand = m(0.8, 0.6, {"siren": 0.6, "horn": 0.67}, support={"siren": 40, "horn": 3})
    d = judge(prod, cand, GOLD, GOLD, (1.0, 1.0), CFG)
    assert d["passed"] and d["not_gated_low_support"]["val_classes"] == ["horn"]


def test_macro_f1_device_accuracy_golden_and_latency_regressions_each_fail() -> None:
    prod = m(0.8, 0.7, {"siren": 0.8}, devices={"pi-00": 0.9, "pi-01": 0.7})
    cand = m(0.8, 0.69, {"siren": 0.8}, devices={"pi-00": 0.85, "pi-01": 0.75})
    gold_c = m(0.85, 0.9, {"siren": 0.9, "silence": 1.0})
    d = judge(prod, cand, GOLD, gold_c, (1.0, 1.2), CFG)
    assert not d["passed"]
    text = "\n".join(d["failures"])
    for expected in ("val macro-F1", "device pi-00", "golden accuracy", "latency"):
        assert expected in text
    assert "pi-01" not in text


def test_a_model_that_gives_away_membership_fails() -> None:
    same = m(0.8, 0.7, {"siren": 0.8})
    assert judge(same, same, GOLD, GOLD, (1.0, 1.0), CFG, 0.6, 100)["passed"]
    d = judge(same, same, GOLD, GOLD, (1.0, 1.0), CFG, 0.71, 100)
    assert d["failures"] == ["membership-inference AUC 0.710 > 0.6"]
    assert judge(same, same, GOLD, GOLD, (1.0, 1.0), CFG, 0.71, 10)["passed"]  # too few


def test_one_window_is_below_the_sets_resolution_and_two_are_not() -> None:
    gold = m(0.9, 0.9, {"silence": 35 / 36}, support={"silence": 36})
    one = m(0.9, 0.9, {"silence": round(34 / 36, 4)}, support={"silence": 36})  # demo, 13:21
    two = m(0.9, 0.9, {"silence": 33 / 36}, support={"silence": 36})
    same = m(0.8, 0.7, {"siren": 0.8})
    assert judge(same, same, gold, one, (1.0, 1.0), CFG)["passed"]
    assert not judge(same, same, gold, two, (1.0, 1.0), CFG)["passed"]
    strict = TrainConfig(gate_tolerance_windows=0)
    assert not judge(same, same, gold, one, (1.0, 1.0), strict)["passed"]
