"""``demo-out/report.html``: the demo's figures as one self-contained page of charts.

Owns rendering only: the numbers come from the demo's summary, each device's before
and after scores, the gate's decision (``gate.json``) and the training run's
``metrics.jsonl``. Invariants: one file, no external resources (inline SVG, inline
CSS, no scripts), every text value HTML-escaped.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fleet_protocol.io.files import write_atomic

COLORS = ("#8c96a6", "#1f77b4", "#d95f02", "#2ca02c")
W, H, PAD = 640, 240, 40


def _bars(title: str, categories: Sequence[str], series: dict[str, Sequence[float]]) -> str:
    """Grouped bars in [0, 1] (or scaled to the largest value when above 1)."""
    top = max([1.0, *(v for vals in series.values() for v in vals)])
    n_cat, n_ser = max(1, len(categories)), max(1, len(series))
    slot = (W - 2 * PAD) / n_cat
    bw = slot * 0.8 / n_ser
    parts = [f'<svg width="{W}" height="{H + 40}" role="img"><title>{html.escape(title)}</title>']
    parts.append(f'<line x1="{PAD}" y1="{H}" x2="{W - PAD}" y2="{H}" stroke="#444"/>')
    for j, (name, vals) in enumerate(series.items()):
        for i, v in enumerate(vals):
            h = (H - PAD) * v / top
            x = PAD + i * slot + slot * 0.1 + j * bw
            parts.append(
                f'<rect x="{x:.1f}" y="{H - h:.1f}" width="{bw:.1f}" height="{h:.1f}"'
                f' fill="{COLORS[j % len(COLORS)]}"><title>{html.escape(name)}'
                f" {html.escape(categories[i])}: {v:.3f}</title></rect>"
            )
        parts.append(
            f'<text x="{PAD + 140 * j}" y="{H + 36}" fill="{COLORS[j % len(COLORS)]}"'
            f' font-size="12">■ {html.escape(name)}</text>'
        )
    for i, c in enumerate(categories):
        x = PAD + i * slot + slot / 2
        parts.append(
            f'<text x="{x:.1f}" y="{H + 16}" font-size="11" text-anchor="middle">'
            f"{html.escape(c)}</text>"
        )
    parts.append(f'<text x="{PAD}" y="14" font-size="11">max {top:g}</text></svg>')
    return "".join(parts)


def _lines(title: str, xs: Sequence[float], series: dict[str, Sequence[float]]) -> str:
    if not xs:
        return f"<p>{html.escape(title)}: no data</p>"
    values = [v for vals in series.values() for v in vals] or [1.0]
    lo, hi = min(values), max(values)
    span, xspan = (hi - lo) or 1.0, (max(xs) - min(xs)) or 1.0

    def pt(x: float, y: float) -> str:
        px = PAD + (x - min(xs)) / xspan * (W - 2 * PAD)
        py = H - (y - lo) / span * (H - PAD)
        return f"{px:.1f},{py:.1f}"

    parts = [f'<svg width="{W}" height="{H + 40}" role="img"><title>{html.escape(title)}</title>']
    for j, (name, vals) in enumerate(series.items()):
        pts = " ".join(pt(x, y) for x, y in zip(xs, vals, strict=False))
        color = COLORS[(j + 1) % len(COLORS)]
        parts.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="2"/>')
        parts.append(
            f'<text x="{PAD + 140 * j}" y="{H + 36}" fill="{color}" font-size="12">'
            f"— {html.escape(name)}</text>"
        )
    parts.append(
        f'<text x="{PAD}" y="14" font-size="11">{lo:.3g} … {hi:.3g} over steps'
        f" {min(xs):g} to {max(xs):g}</text></svg>"
    )
    return "".join(parts)


def render(
    summary: dict[str, Any],
    devices: Sequence[dict[str, Any]],
    gate: dict[str, Any],
    metrics: Sequence[dict[str, Any]],
) -> str:
    """The page. ``devices``: rows with device, shifted_before/after, overall_before/after."""
    names = [str(d["device"]) for d in devices]
    sections = [
        ("Accuracy per device, shifted class", _bars(
            "shifted", names, {
                "before": [d["shifted_before"] for d in devices],
                "after": [d["shifted_after"] for d in devices],
            })),
        ("Accuracy per device, all classes", _bars(
            "overall", names, {
                "before": [d["overall_before"] for d in devices],
                "after": [d["overall_after"] for d in devices],
            })),
    ]  # fmt: skip
    for split in ("golden", "val"):
        prod = gate.get(f"{split}_production", {}).get("per_class_recall", {})
        cand = gate.get(f"{split}_candidate", {}).get("per_class_recall", {})
        classes = sorted(set(prod) & set(cand))
        sections.append(
            (
                f"Recall per class on the {split} set: production vs candidate",
                _bars(split, classes, {
                    "production": [prod[c] for c in classes],
                    "candidate": [cand[c] for c in classes],
                }),
            )
        )  # fmt: skip
    steps = [float(m["step"]) for m in metrics if "step" in m and "train_loss" in m]
    curves = {
        k: [float(m[k]) for m in metrics if "step" in m and "train_loss" in m and k in m]
        for k in ("train_loss", "val_loss")
    }
    sections.append(
        (
            "Training and validation loss",
            _lines("loss", steps, {k: v for k, v in curves.items() if v}),
        )
    )
    raw, up = float(summary.get("raw_audio_bytes", 0)), float(summary.get("uplink_bytes", 0))
    sections.append(
        ("Uplink vs raw audio (bytes)", _bars("bytes", ["raw 16-bit audio", "uploaded"],
                                              {"bytes": [raw, up]}))
    )  # fmt: skip
    facts = [
        ("speech frames in the streets", summary.get("speech_frames_in")),
        ("speech frames in released windows", summary.get("speech_frames_leaked")),
        ("speech frames in uploaded windows", summary.get("speech_frames_uploaded")),
        ("gate passed", gate.get("passed")),
        ("gate failures", "; ".join(gate.get("failures", [])) or "none"),
        ("membership-inference AUC", gate.get("membership_auc")),
        ("devices updated", f"{summary.get('devices_updated')} / {summary.get('devices')}"),
        ("adapter bytes / int8 base bytes",
         f"{summary.get('adapter_bytes')} / {summary.get('base_model_bytes')}"),
    ]  # fmt: skip
    rows = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts
    )
    body = "".join(f"<h2>{html.escape(t)}</h2>{svg}" for t, svg in sections)
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>sovereign-edge demo</title>"
        "<style>body{font-family:sans-serif;max-width:720px;margin:2em auto}"
        "th{text-align:left;padding-right:1em}</style></head><body>"
        "<h1>sovereign-edge: what the city's sensors learned</h1>"
        f"<table>{rows}</table>{body}"
        "<p>Privacy figures per language and SNR: BENCHMARKS.md (make bench).</p>"
        "</body></html>"
    )


def write_report(path: Path, *args: Any) -> Path:
    write_atomic(path, render(*args).encode(), 0o644)
    return path
