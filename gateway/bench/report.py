"""Per-model figures from the measurements: nearest-rank percentiles, TPOT ratios against the
base model and a LoRA twin, the text table and the JSON document.

Failed requests are counted but left out of every percentile: a 429 answered in 2 ms is not a
fast token.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from gateway.bench.load import BenchSettings, Measurement
from gateway.telemetry.latency import percentile


@dataclass(frozen=True)
class ModelSummary:
    model: str
    requests: int
    errors: int
    ttft_p50_ms: float | None
    ttft_p95_ms: float | None
    tpot_p50_ms: float | None
    tpot_p95_ms: float | None
    e2e_p50_ms: float | None
    completion_tokens: int
    tokens_per_s: float | None  # output tokens over the wall time of the phases it ran in
    tpot_vs_base: float | None  # TPOT p50 / the base model's TPOT p50
    twin: str | None
    tpot_vs_twin: float | None  # TPOT p50 / the LoRA twin's TPOT p50


def ratio(value: float | None, other: float | None) -> float | None:
    return value / other if value is not None and other else None


def summarize(settings: BenchSettings, measurements: Sequence[Measurement]) -> list[ModelSummary]:
    by_model = {model: [m for m in measurements if m.model == model] for model in settings.models}
    tpot_p50 = {model: _p_ms(runs, "tpot_s", 50) for model, runs in by_model.items()}
    spans = phase_spans(measurements)
    return [_summary(model, runs, spans, tpot_p50, settings) for model, runs in by_model.items()]


def phase_spans(measurements: Sequence[Measurement]) -> dict[int, float]:
    """Wall time of each phase, from its first request's start to its last one's end."""
    spans: dict[int, tuple[float, float]] = {}
    for m in measurements:
        first, last = spans.get(m.phase, (m.start_s, m.start_s + m.e2e_s))
        spans[m.phase] = (min(first, m.start_s), max(last, m.start_s + m.e2e_s))
    return {phase: last - first for phase, (first, last) in spans.items()}


def _summary(model: str, runs: list[Measurement], spans: dict[int, float],
             tpot_p50: dict[str, float | None], settings: BenchSettings) -> ModelSummary:
    ok = [m for m in runs if m.ok]
    tokens = sum(m.completion_tokens for m in ok)
    wall = sum(spans[phase] for phase in {m.phase for m in runs})
    twin = settings.lora_twins.get(model)
    return ModelSummary(
        model=model, requests=len(runs), errors=len(runs) - len(ok),
        ttft_p50_ms=_p_ms(runs, "ttft_s", 50), ttft_p95_ms=_p_ms(runs, "ttft_s", 95),
        tpot_p50_ms=tpot_p50[model], tpot_p95_ms=_p_ms(runs, "tpot_s", 95),
        e2e_p50_ms=_p_ms(runs, "e2e_s", 50), completion_tokens=tokens,
        tokens_per_s=tokens / wall if ok and wall > 0 else None,
        tpot_vs_base=ratio(tpot_p50[model], tpot_p50.get(settings.base_model)),
        twin=twin, tpot_vs_twin=ratio(tpot_p50[model], tpot_p50.get(twin)))


def _p_ms(runs: Sequence[Measurement], attribute: str, q: float) -> float | None:
    values = [getattr(m, attribute) for m in runs if m.ok and getattr(m, attribute) is not None]
    value = percentile(values, q)
    return None if value is None else value * 1000


COLUMNS = (  # header, attribute, format
    ("model", "model", "{}"), ("requests", "requests", "{}"), ("errors", "errors", "{}"),
    ("TTFT p50 ms", "ttft_p50_ms", "{:.1f}"), ("TTFT p95 ms", "ttft_p95_ms", "{:.1f}"),
    ("TPOT p50 ms", "tpot_p50_ms", "{:.1f}"), ("TPOT p95 ms", "tpot_p95_ms", "{:.1f}"),
    ("tokens/s", "tokens_per_s", "{:.1f}"), ("TPOT vs base", "tpot_vs_base", "{:.3f}"),
    ("LoRA twin", "twin", "{}"), ("TPOT vs twin", "tpot_vs_twin", "{:.3f}"),
)


def table(rows: Sequence[ModelSummary]) -> str:
    """Plain text, names left-aligned and numbers right-aligned; `-` where there is no figure."""
    cells = [[header for header, _, _ in COLUMNS]]
    cells += [["-" if getattr(row, attr) is None else fmt.format(getattr(row, attr))
               for _, attr, fmt in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(width) if i == 0 else cell.rjust(width)
                       for i, (cell, width) in enumerate(zip(line, widths, strict=True)))
             for line in cells]
    return "\n".join(line.rstrip() for line in lines)


def error_lines(measurements: Sequence[Measurement], limit: int = 5) -> list[str]:
    """The most frequent errors, so one look says why requests failed."""
    counts = Counter((m.model, m.error) for m in measurements if not m.ok)
    return [f"{count} x {model}: {error}" for (model, error), count in counts.most_common(limit)]


def document(settings: BenchSettings, measurements: Sequence[Measurement],
             rows: Sequence[ModelSummary], started_at: datetime) -> dict:
    """The JSON: enough to redo the run (settings, client machine, time) and every request."""
    return {
        "settings": dataclasses.asdict(settings),
        "machine": {"platform": platform.platform(), "architecture": platform.machine(),
                    "cpu_count": os.cpu_count(), "python": platform.python_version()},
        "started_at": started_at.isoformat(timespec="seconds"),
        "duration_s": max((m.start_s + m.e2e_s for m in measurements), default=0.0),
        "summary": [dataclasses.asdict(row) for row in rows],
        "requests": [dataclasses.asdict(m) for m in measurements],
    }


def write_json(path: Path, doc: dict) -> Path:
    """Written whole or not at all."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(doc, indent=2) + "\n")
    partial.replace(path)
    return path
