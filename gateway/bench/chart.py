"""The benchmark's PNG: per model, p50 TTFT and TPOT as bars with p95 as a marker, so what
each adapter costs against the base model shows at a glance.

It draws on an Agg canvas of its own rather than through pyplot, so it needs no display and
leaves matplotlib's global backend alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from gateway.bench.load import BenchSettings
from gateway.bench.report import ModelSummary


def write_chart(path: Path, settings: BenchSettings, rows: Sequence[ModelSummary]) -> Path:
    """Written whole or not at all."""
    figure = Figure(figsize=(max(9.0, 4.0 + 1.4 * len(rows)), 5.0), layout="constrained")
    FigureCanvasAgg(figure)
    ttft, tpot = figure.subplots(1, 2)
    _panel(ttft, rows, "ttft", "time to first token", settings.base_model)
    _panel(tpot, rows, "tpot", "time per output token", settings.base_model)
    figure.suptitle(title(settings))
    partial = path.with_name(path.name + ".partial")
    figure.savefig(partial, format="png", dpi=110)
    partial.replace(path)
    return path


def title(settings: BenchSettings) -> str:
    rounds = f"{settings.rounds} round{'s' if settings.rounds > 1 else ''}"
    mode = f"phases ({rounds})" if settings.mode == "phases" else "mixed"
    return (f"dora-gateway bench: {settings.endpoint}, {mode}, concurrency "
            f"{settings.concurrency}, {settings.requests} requests/model\n"
            f"prompt ~{settings.prompt_tokens} tokens, {settings.max_tokens} output tokens, "
            f"{settings.url}")


def _panel(axes: Axes, rows: Sequence[ModelSummary], metric: str, name: str,
           base_model: str) -> None:
    positions = list(range(len(rows)))
    p50 = [_value(getattr(row, f"{metric}_p50_ms")) for row in rows]
    p95 = [_value(getattr(row, f"{metric}_p95_ms")) for row in rows]
    bars = axes.bar(positions, p50, color=[f"C{i % 10}" for i in positions], alpha=0.85)
    axes.scatter(positions, p95, marker="_", s=900, linewidths=2.5, color="black", zorder=3)
    axes.bar_label(bars, labels=[_label(row, value, metric, base_model) for row, value in zip(
        rows, p50, strict=True)], label_type="center", fontsize=8)
    for position, value in zip(positions, p50, strict=True):
        if math.isnan(value):
            axes.text(position, 0, "no data", ha="center", va="bottom", fontsize=8)
    axes.set_xticks(positions, [row.model for row in rows], rotation=30 if len(rows) > 4 else 0)
    axes.set_xlim(-0.6, len(rows) - 0.4)  # a model with no data keeps its place
    axes.set_xlabel("model")
    axes.set_ylabel(f"{name} (ms)")
    axes.set_title(f"{name}: p50 (bar), p95 (marker)")
    top = max((v for v in p50 + p95 if not math.isnan(v)), default=1.0)
    axes.set_ylim(0, top * 1.15)
    axes.grid(axis="y", alpha=0.3)
    axes.set_axisbelow(True)


def _label(row: ModelSummary, value: float, metric: str, base_model: str) -> str:
    """The p50 in ms; TPOT bars also carry their ratios to the base model and the twin."""
    lines = [] if math.isnan(value) else [f"{value:.1f}"]
    if metric == "tpot" and lines:
        if row.tpot_vs_base is not None and row.model != base_model:
            lines.append(f"{row.tpot_vs_base:.3f}x {base_model}")
        if row.tpot_vs_twin is not None:
            lines.append(f"{row.tpot_vs_twin:.3f}x {row.twin}")
    return "\n".join(lines)


def _value(ms: float | None) -> float:
    """NaN draws no bar, for a model with no successful request."""
    return math.nan if ms is None else ms
