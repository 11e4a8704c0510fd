"""SVG drawn on the server: a session's timeline and the usage charts (no script needed)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import UTC, datetime
from html import escape

from events.projections import TaskRecord
from orchestrator.ui.travel import Marker

# Colour-blind-safe palette (Okabe-Ito, then a few more); a model keeps its colour.
PALETTE = (
    "#0072B2",
    "#E69F00",
    "#009E73",
    "#CC79A7",
    "#56B4E9",
    "#D55E00",
    "#F0E442",
    "#7F7F7F",
    "#8C564B",
    "#17BECF",
)
MARKER_SHAPES = {
    "set": ("S", "#1b7f3b"),
    "reset": ("R", "#1b7f3b"),
    "fork": ("F", "#1b7f3b"),
    "spawn": ("+", "#0b4f8a"),
    "reuse": ("=", "#0b4f8a"),
    "rejected": ("x", "#b3261e"),
    "fallback": ("!", "#b36b00"),
    "cancel": ("C", "#6b6b6b"),
}
ROW, TOP, LEFT, WIDTH = 34, 26, 110, 1000
STATUS_DASH = {"failed": "4 2", "cancelled": "2 2", "running": "6 3"}
MAX_BARS = 2000  # a very long session draws its newest tasks


def colour(model: str | None) -> str:
    """A model's colour (grey while unknown)."""
    if not model:
        return "#bdbdbd"
    digest = hashlib.sha256(model.encode()).digest()
    return PALETTE[digest[0] % len(PALETTE)]


def _x(t: datetime, start: float, span: float) -> float:
    return LEFT + (t.timestamp() - start) / span * (WIDTH - LEFT - 10)


def timeline(
    tasks: Sequence[TaskRecord],
    markers: Sequence[Marker],
    now: datetime | None = None,
    link: str = "/tasks/",
) -> str:
    """Tasks as bars by worker over time, coloured by model, with decision markers."""
    tasks = list(tasks)[-MAX_BARS:]
    now = now or datetime.now(UTC)
    if not tasks and not markers:
        return '<p class="empty">No tasks in this session yet.</p>'
    times = [t.started_at for t in tasks] + [m.timestamp for m in markers]
    times += [t.finished_at or now for t in tasks]
    start = min(times).timestamp()
    span = max(max(times).timestamp() - start, 0.001)
    lanes: list[str] = []
    for t in tasks:
        lane = t.worker_id or "(op)"
        if lane not in lanes:
            lanes.append(lane)
    for m in markers:
        lane = m.worker_id or "(op)"
        if lane not in lanes:
            lanes.append(lane)
    height = TOP + ROW * len(lanes) + 24
    out = [
        f'<svg class="timeline" viewBox="0 0 {WIDTH} {height}" width="100%" '
        f'role="img" aria-label="timeline">'
    ]
    for i, lane in enumerate(lanes):
        y = TOP + i * ROW
        out.append(
            f'<text class="lane" x="4" y="{y + 20}">{escape(lane)}</text>'
            f'<line x1="{LEFT}" x2="{WIDTH - 10}" y1="{y + ROW - 2}" y2="{y + ROW - 2}" '
            'stroke="#eee"/>'
        )
    for t in tasks:
        y = TOP + lanes.index(t.worker_id or "(op)") * ROW + 6
        x0 = _x(t.started_at, start, span)
        x1 = max(_x(t.finished_at or now, start, span), x0 + 4)
        label = t.model or t.op or ""
        dash = STATUS_DASH.get(t.status, "")
        stroke = f' stroke="#333" stroke-dasharray="{dash}"' if dash else ""
        title = f"{t.task_id} {t.status} {label}"
        out.append(
            f'<a href="{escape(link + t.task_id)}" class="bar" data-task-id="{escape(t.task_id)}" '
            f'data-status="{t.status}"><rect x="{x0:.1f}" y="{y}" width="{x1 - x0:.1f}" '
            f'height="{ROW - 14}" rx="3" fill="{colour(t.model)}"{stroke}>'
            f"<title>{escape(title)}</title></rect></a>"
        )
    for m in markers:
        y = TOP + lanes.index(m.worker_id or "(op)") * ROW
        x = _x(m.timestamp, start, span)
        glyph, fill = MARKER_SHAPES.get(m.kind, ("?", "#000"))
        out.append(
            f'<g class="marker marker-{m.kind}" data-kind="{m.kind}" data-position="{m.position}">'
            f'<circle cx="{x:.1f}" cy="{y + 4}" r="7" fill="{fill}"/>'
            f'<text x="{x:.1f}" y="{y + 8}" text-anchor="middle" class="glyph">{escape(glyph)}'
            f"</text><title>{escape(f'{m.kind} @{m.position}: {m.label}')}</title></g>"
        )
    end = datetime.fromtimestamp(start + span, UTC)
    first = datetime.fromtimestamp(start, UTC)
    out.append(
        f'<text class="axis" x="{LEFT}" y="{height - 6}">{first:%H:%M:%S}</text>'
        f'<text class="axis" x="{WIDTH - 10}" y="{height - 6}" text-anchor="end">'
        f"{end:%H:%M:%S}</text></svg>"
    )
    return "".join(out)


def legend(models: Sequence[str]) -> str:
    """The colours of the models and the marker glyphs."""
    swatch = '<svg class="swatch" viewBox="0 0 14 14" width="14" height="14">{}</svg>'
    parts = [
        '<span class="key">'
        + swatch.format(f'<rect width="14" height="14" rx="2" fill="{colour(m)}"/>')
        + f"{escape(m)}</span>"
        for m in models
    ]
    parts += [
        '<span class="key">'
        + swatch.format(
            f'<circle cx="7" cy="7" r="7" fill="{fill}"/><text x="7" y="11" '
            f'text-anchor="middle" class="glyph">{escape(g)}</text>'
        )
        + f"{kind}</span>"
        for kind, (g, fill) in MARKER_SHAPES.items()
    ]
    return " ".join(parts)


def bars(title: str, series: dict[str, list[float]], labels: Sequence[str], unit: str = "") -> str:
    """Stacked bars over time bins, one colour per series (worker/model)."""
    if not labels or not series:
        return f'<p class="empty">{escape(title)}: nothing recorded yet.</p>'
    n = len(labels)
    height, left, bottom = 220, 70, 30
    totals = [sum(values[i] for values in series.values()) for i in range(n)]
    peak = max(totals) or 1.0
    step = (WIDTH - left - 10) / n
    out = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {height}" width="100%" role="img" '
        f'aria-label="{escape(title)}"><text x="{left}" y="14" class="title">{escape(title)}'
        "</text>"
        f'<text x="{left - 6}" y="{26}" text-anchor="end" class="axis">{_num(peak)}{unit}</text>'
        f'<text x="{left - 6}" y="{height - bottom}" text-anchor="end" class="axis">0</text>'
    ]
    usable = height - bottom - 24
    for i in range(n):
        y = float(height - bottom)
        for name, values in series.items():
            h = values[i] / peak * usable
            if h <= 0:
                continue
            y -= h
            out.append(
                f'<rect x="{left + i * step + 1:.1f}" y="{y:.1f}" width="{max(step - 2, 1):.1f}" '
                f'height="{h:.1f}" fill="{colour(name.split(" ", 1)[-1])}">'
                f"<title>{escape(f'{labels[i]} {name}: {_num(values[i])}{unit}')}</title></rect>"
            )
    for i in (0, n - 1):
        anchor = "start" if i == 0 else "end"
        x = left + i * step + (0 if i == 0 else step)
        out.append(
            f'<text x="{x:.1f}" y="{height - 10}" text-anchor="{anchor}" class="axis">'
            f"{escape(labels[i])}</text>"
        )
    out.append("</svg>")
    return "".join(out)


def _num(value: float) -> str:
    if value >= 100 or value == int(value):
        return f"{value:,.0f}"
    return f"{value:.4g}"
