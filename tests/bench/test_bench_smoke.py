"""``make bench`` runs end to end: a quick run writes the edge, train and privacy keys as numbers.

No timing asserts: the figures themselves are for BENCHMARKS.md, not for CI.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

EDGE_KEYS = (
    "edge.rtf_one_core",
    "edge.rtf_audio_s",
    "edge.peak_rss_mb",
    "edge.int8_over_fp32_latency",
    "edge.int8_macro_f1_delta",
    "edge.uplink_over_raw",
    "edge.uplink_over_raw_unbudgeted",
    "train.base_scene_macro_f1",
    "train.adapter_over_base_bytes",
    "privacy.max_leakage",
    "privacy.yield_10db",
    "privacy.languages",
)


def test_quick_bench_writes_a_flat_object_of_numbers_with_the_edge_keys(tmp_path: Path) -> None:
    out = tmp_path / "latest.json"
    subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--no-doc", "--out", str(out)],
        cwd=Path(__file__).parents[2],
        check=True,
        timeout=600,
    )
    results = json.loads(out.read_text())
    assert isinstance(results, dict)
    missing = [k for k in EDGE_KEYS if k not in results]
    assert not missing
    for key, value in results.items():
        assert isinstance(value, (int, float)) and not isinstance(value, bool), key
        assert math.isfinite(value), key
    assert results["edge.rtf_audio_s"] == 60
    assert results["edge.peak_rss_mb"] > 0
    assert 0 < results["edge.uplink_over_raw"] < 1
    assert results["privacy.languages"] == 2  # --quick: two languages, all four SNRs
    assert 0 <= results["privacy.max_leakage"] <= 1 and 0 < results["privacy.yield_10db"] <= 1


def test_results_table_in_benchmarks_md_is_between_its_markers() -> None:
    from benchmarks.run import BEGIN, DOC, END, render_table

    text = DOC.read_text()
    assert text.index(BEGIN) < text.index(END)
    table = render_table({"edge.rtf_one_core": 0.5, "x.other": 3.0})
    assert "| `edge.rtf_one_core` | 0.5 | ≤ 0.01 | **no** |" in table
    assert "`x.other`" in table
