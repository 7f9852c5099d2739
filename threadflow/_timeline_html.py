"""The timeline's page: a :class:`threadflow.timeline.Timeline` drawn as one HTML page with
inline CSS and an SVG Gantt chart, no script and nothing fetched from the network, so it can be
mailed, archived or opened from a CI artifact. Hovering a bar shows its attempt, times and
error (SVG ``<title>`` tooltips).

It draws and formats only: every number comes from the model, and so from the fold.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from ._format import compact, duration, error_text, html_text, shorten

if TYPE_CHECKING:
    from .timeline import Row, Stage, Timeline

#: Fill colour of each kind of bar; the legend and the CSS use the same words.
COLORS = {
    "over": "#2f9e58",
    "exit": "#d8413c",
    "timeout": "#ee8a1f",
    "abandoned": "#8a63c6",
    "retry": "#5b8fd0",
    "cancelled": "#9aa1a9",
    "running": "#3b7dd8",
}

LEGEND = (
    ("over", "attempt returned"),
    ("exit", "attempt raised"),
    ("timeout", "attempt timed out"),
    ("retry", "waiting to retry"),
    ("abandoned", "thread kept running after it was cancelled"),
    ("cancelled", "cancelled when the run ended"),
    ("running", "no outcome in the log (still running, or its process died)"),
)

_OUTCOME_COLORS = {
    "all_over": "#2f9e58",
    "failed_over": "#d8413c",
    "interrupted": "#7d8590",
    "cancelled": "#b07d2b",
    "running": "#3b7dd8",
}

# Layout, in pixels.
_LABEL_W = 230
_CHART_W = 880
_RIGHT = 30
_ROW_H = 20
_BAR_H = 12
_AXIS_H = 30
_GAP_W = 26
_TICK_PX = 90


class _Scale:
    """Seconds to x pixels; long pauses between segments (a replay hours later) are cut out."""

    def __init__(self, spans: list[tuple[float, float]], width: float) -> None:
        spans = sorted(spans)
        active = sum(b - a for a, b in spans) or 1e-9
        merged: list[list[float]] = []
        for a, b in spans:
            if merged and a - merged[-1][1] <= max(1.0, 0.1 * active):
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        self.spans = [(a, b) for a, b in merged]
        self.cuts = len(self.spans) - 1
        total = sum(b - a for a, b in self.spans) or 1e-9
        self.pps = (width - self.cuts * _GAP_W) / total  # pixels per second
        self.offsets: list[float] = []
        x = 0.0
        for a, b in self.spans:
            self.offsets.append(x)
            x += (b - a) * self.pps + _GAP_W

    def x(self, t: float) -> float:
        for (a, b), off in zip(self.spans, self.offsets, strict=True):
            if t <= b:
                return off + max(0.0, t - a) * self.pps
        a, b = self.spans[-1]
        return self.offsets[-1] + (b - a) * self.pps

    def ticks(self) -> list[tuple[float, float, str]]:
        """``(x, seconds, label)`` at a round step, about every :data:`_TICK_PX` pixels."""
        step = _nice_step(_TICK_PX / self.pps)
        out = []
        for a, b in self.spans:
            first = math.ceil(a / step - 1e-9) * step
            n = 0
            while first + n * step <= b + 1e-9:
                t = first + n * step
                out.append((self.x(t), t, _tick_label(t, step)))
                n += 1
        return out


def _nice_step(seconds: float) -> float:
    for unit in (0.001, 0.01, 0.1, 1, 10, 60, 600, 3600, 36000, 86400):
        for m in (1, 2, 5):
            if m * unit >= seconds and not (unit == 10 and m == 5):
                return m * unit
    return 86400 * math.ceil(seconds / 86400)


def _tick_label(t: float, step: float) -> str:
    if step < 1:
        decimals = max(0, -math.floor(math.log10(step) + 1e-9))
        return f"{t:.{decimals}f}s"
    if t < 60:
        return f"{t:g}s"
    minutes, secs = divmod(int(round(t)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s" if secs else f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


#: Text from the log as HTML text.
_e = html_text


_CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1f2328;
margin:0;padding:16px 20px;background:#fff}
h1{font-size:20px;margin:0 0 6px;font-weight:600}
h1 .run{font-weight:400;color:#59636e;font-family:ui-monospace,Menlo,Consolas,monospace;
font-size:15px}
.status{display:inline-block;color:#fff;border-radius:10px;padding:1px 9px;font-size:13px;
vertical-align:2px}
.facts{display:flex;flex-wrap:wrap;gap:4px 18px;margin:0 0 8px;padding:0;color:#59636e}
.facts b{color:#1f2328;font-weight:600}
.failure{margin:6px 0;padding:6px 10px;border-left:4px solid #d8413c;background:#fdf0ef}
.failure summary{cursor:pointer;color:#59636e;font-size:13px}
.failure pre{margin:6px 0 0;font-size:12px;white-space:pre-wrap;max-height:16em;overflow:auto}
table.tasks{border-collapse:collapse;margin:6px 0 8px;font-size:13px}
.tasks th,.tasks td{padding:2px 10px 2px 0;text-align:right;white-space:nowrap}
.tasks th{color:#59636e;font-weight:500;border-bottom:1px solid #d1d9e0}
.tasks td:first-child,.tasks th:first-child{text-align:left;font-family:ui-monospace,Menlo,
Consolas,monospace}
.share{display:inline-block;height:8px;background:#8fb3e0;vertical-align:middle;margin-right:4px}
.bad{color:#c22d28;font-weight:600}
.legend{display:flex;flex-wrap:wrap;gap:2px 16px;margin:4px 0 10px;padding:0;list-style:none;
font-size:12.5px;color:#59636e}
.legend i{display:inline-block;width:14px;height:10px;border-radius:2px;margin-right:5px;
vertical-align:-1px}
svg{display:block;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px}
svg .bar:hover{stroke:#1f2328;stroke-width:1.5}
svg .row:hover{fill:#eef3fb}
footer{margin-top:10px;color:#818b98;font-size:12px}
"""


def _legend_swatch(kind: str) -> str:
    color = COLORS[kind]
    if kind in ("retry", "abandoned"):
        style = (
            f"background:repeating-linear-gradient(135deg,{color} 0 3px,#fff 3px 5px);"
            f"box-shadow:inset 0 0 0 1px {color}"
        )
    else:
        style = f"background:{color}"
    return f'<i style="{style}"></i>'


def _header(tl: Timeline) -> list[str]:
    h = tl.history
    color = _OUTCOME_COLORS.get(tl.status, "#7d8590")
    out = [
        f"<h1>{_e(h.flow or '?')} <span class=run>run {_e(h.run_id)}</span> "
        f'<span class=status style="background:{color}">{_e(tl.status)}</span></h1>'
    ]
    attempts = sum(t.attempts + t.children_started for t in h.tasks.values())
    facts = [
        ("started", (tl.begin or "-").replace("T", " ")[:23] + " UTC"),
        ("duration", duration(h.active)),
        ("entrance", h.entrance or "-"),
        ("segments", str(h.segments)),
        *([("first start to last event", duration(h.wall))] if h.segments > 1 else []),
        ("attempts", str(attempts)),
        ("exits", str(sum(t.exits for t in h.tasks.values()))),
        ("timeouts", str(sum(t.timeouts for t in h.tasks.values()))),
        ("retries", str(sum(t.retries for t in h.tasks.values()))),
        ("abandoned", str(sum(t.abandoned for t in h.tasks.values()))),
    ]
    if h.callback_errors:
        facts.append(("callback errors", str(h.callback_errors)))
    out.append(
        "<p class=facts>"
        + "".join(f"<span>{_e(k)} <b>{_e(v)}</b></span>" for k, v in facts)
        + "</p>"
    )
    if h.task is not None:
        name = h.task[0] if len(h.task) == 1 else f"{h.task[0]}[{compact(h.task[1])}]"
        block = f"<div class=failure><b>failed task {_e(name)}</b>: {_e(error_text(h.error))}"
        if tl.failure_traceback:
            block += (
                f"<details><summary>traceback</summary><pre>{_e(tl.failure_traceback)}</pre>"
                "</details>"
            )
        out.append(block + "</div>")
    if h.failed:
        shown = ", ".join(
            f"{t[0]}[{compact(t[1])}]" if len(t) > 1 else str(t[0]) for t in h.failed[:8]
        )
        more = f" and {len(h.failed) - 8} more" if len(h.failed) > 8 else ""
        out.append(
            f"<p>tolerated failures ({len(h.failed)}): <span class=bad>{_e(shown)}</span>"
            f"{_e(more)}</p>"
        )
    out.extend(_task_table(tl))
    out.append(legend())
    return out


def legend() -> str:
    """The key to the colours of the bars, as an HTML list (class ``legend``)."""
    return (
        "<ul class=legend>"
        + "".join(f"<li>{_legend_swatch(k)}{_e(k)}: {_e(text)}</li>" for k, text in LEGEND)
        + "<li><b class=bad>\u2717</b> used up its attempts</li></ul>"
    )


def chart(tl: Timeline) -> str:
    """The Gantt chart alone, as inline SVG: what the live dashboard redraws as a run goes on.

    Every string from the log in it is escaped; it holds no script.
    """
    return "\n".join(_svg(tl))


def _task_table(tl: Timeline) -> list[str]:
    heads = (
        "task",
        "start",
        "time",
        "attempts",
        "children",
        "done",
        "failed",
        "exits",
        "timeouts",
        "retries",
        "state",
    )
    out = ["<table class=tasks><tr>" + "".join(f"<th>{h}</th>" for h in heads) + "</tr>"]
    total = tl.history.active or 1e-9
    for stage in tl.stages:
        t = tl.history.tasks.get(stage.name)
        if t is None or stage.started is None:
            cells = [stage.name, "-", "-", "0", "-", "-", "-", "-", "-", "-", "not started"]
            out.append("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>")
            continue
        took = tl.history.task_seconds(stage.name)
        share = f'<span class=share style="width:{max(1, round(60 * took / total))}px"></span>'
        if t.all_over:
            state = "all over"
        elif tl.history.task is not None and tl.history.task[0] == stage.name:
            state = '<span class="bad">failed</span>'
        elif tl.status in ("running",):
            state = "running"
        else:
            state = "unfinished"
        failed = str(t.children_failed)
        if t.children_failed:
            failed = f"<span class=bad>{failed}</span>"
        cells = [
            _e(stage.name),
            f"+{_e(duration(stage.started))}",
            share + _e(duration(took)),
            str(t.attempts),
            str(t.children_added),
            str(t.children_done),
            failed,
            str(t.exits),
            str(t.timeouts),
            str(t.retries),
            state,
        ]
        out.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    out.append("</table>")
    return out


def _svg(tl: Timeline) -> list[str]:
    scale = _Scale(tl.spans, _CHART_W)
    x0 = _LABEL_W
    rows: list[tuple[str, Any]] = []  # ("row", Row) | ("hidden", Stage) | ("idle", Stage)
    by_task: dict[str, list[Row]] = {}
    for row in tl.rows:
        by_task.setdefault(row.task, []).append(row)
    for stage in tl.stages:
        task_rows = by_task.get(stage.name, [])
        if not task_rows:
            rows.append(("idle", stage))
            continue
        rows.extend(("row", r) for r in task_rows)
        if stage.hidden_children or stage.hidden_starts:
            rows.append(("hidden", stage))
    height = _AXIS_H + len(rows) * _ROW_H + 8
    width = _LABEL_W + _CHART_W + _RIGHT
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="timeline of run '
        f'{_e(tl.history.run_id)}">',
        "<defs>",
    ]
    for kind in ("retry", "abandoned"):
        c = COLORS[kind]
        out.append(
            f'<pattern id="hatch-{kind}" width="6" height="6" patternUnits="userSpaceOnUse" '
            f'patternTransform="rotate(45)"><rect width="6" height="6" fill="#fff"/>'
            f'<rect width="3" height="6" fill="{c}"/></pattern>'
        )
    out.append("</defs>")
    # time axis and grid
    grid_bottom = height - 4
    for x, _t, label in scale.ticks():
        gx = x0 + x
        out.append(
            f'<line x1="{gx:.1f}" y1="{_AXIS_H - 6}" x2="{gx:.1f}" y2="{grid_bottom}" '
            'stroke="#e3e8ee"/>'
        )
        out.append(
            f'<text x="{gx:.1f}" y="{_AXIS_H - 10}" text-anchor="middle" fill="#59636e">'
            f"{_e(label)}</text>"
        )
    for i in range(scale.cuts):
        a, b = scale.spans[i][1], scale.spans[i + 1][0]
        gx = x0 + scale.offsets[i + 1] - _GAP_W / 2
        out.append(
            f"<g><title>{_e(duration(b - a))} without a run (between segments)</title>"
            f'<rect x="{gx - _GAP_W / 2 + 3:.1f}" y="{_AXIS_H - 6}" width="{_GAP_W - 6}" '
            f'height="{grid_bottom - _AXIS_H + 6}" fill="#f3f5f7"/>'
            f'<text x="{gx:.1f}" y="{_AXIS_H - 10}" text-anchor="middle" fill="#818b98">'
            "\u2026</text></g>"
        )
    for i, (what, item) in enumerate(rows):
        y = _AXIS_H + i * _ROW_H
        out.extend(_draw_row(what, item, y, x0, scale, tl, i))
    # markers on top
    for m in tl.markers:
        gx = x0 + scale.x(m.at)
        color = _OUTCOME_COLORS.get(m.kind, "#3b7dd8")
        out.append(
            f"<g><title>{_e(m.text)} at +{_e(duration(m.at))}</title>"
            f'<line x1="{gx:.1f}" y1="{_AXIS_H - 4}" x2="{gx:.1f}" y2="{grid_bottom}" '
            f'stroke="{color}" stroke-width="1.5" stroke-dasharray="4 3"/>'
            f'<rect x="{gx - 5:.1f}" y="{_AXIS_H - 8}" width="10" height="6" fill="{color}"/></g>'
        )
    out.append("</svg>")
    return out


def _draw_row(
    what: str, item: Any, y: float, x0: float, scale: _Scale, tl: Timeline, i: int
) -> list[str]:
    out = []
    width = _LABEL_W + _CHART_W + _RIGHT
    stripe = "#f7f9fb" if i % 2 else "#ffffff"
    mid = y + _ROW_H / 2
    if what == "idle":
        stage: Stage = item
        out.append(
            f'<rect class="row" x="0" y="{y}" width="{width}" height="{_ROW_H}" fill="{stripe}"/>'
        )
        out.append(
            f'<text x="6" y="{mid + 4}" fill="#818b98"><title>{_e(stage.name)}: never started '
            f"in this run</title>{_e(shorten(stage.name, 22))} \u00b7 not started</text>"
        )
        return out
    if what == "hidden":
        stage = item
        return _draw_hidden(stage, y, x0, scale, stripe, width)
    row: Row = item
    out.append(
        f'<rect class="row" x="0" y="{y}" width="{width}" height="{_ROW_H}" fill="{stripe}"/>'
    )
    if row.is_parent:
        stage = next(s for s in tl.stages if s.name == row.task)
        if stage.started is not None:
            end = stage.ended if stage.ended is not None else tl.end
            bx, bw = x0 + scale.x(stage.started), scale.x(end) - scale.x(stage.started)
            out.append(
                f'<rect x="{bx:.1f}" y="{y + 2}" width="{max(bw, 1):.1f}" '
                f'height="{_ROW_H - 4}" fill="#dde6f1" rx="3"><title>{_e(_stage_text(stage, tl))}'
                "</title></rect>"
            )
    label = row.label if row.is_parent else "  " + row.label
    color = "#1f2328" if row.is_parent else "#444c56"
    weight = ' font-weight="600"' if row.is_parent else ""
    indent = 6 if row.is_parent else 18
    if row.failed is not None:
        mark = "#e07b00" if row.tolerated else "#c22d28"
        if not row.recovered:
            color = mark
    out.append(
        f'<text x="{indent}" y="{mid + 4}" fill="{color}"{weight}><title>{_e(label.strip())}'
        f"</title>{_e(shorten(label.strip(), 27 if row.is_parent else 25))}</text>"
    )
    # Number the attempts of a row that has several.
    numbered = sum(1 for b in row.bars if b.kind != "retry" and not b.thread_only) > 1
    for bar in row.bars:
        bx = x0 + scale.x(bar.start)
        bw = max(scale.x(bar.end) - scale.x(bar.start), 2.0)
        if bar.kind == "retry":
            h, by = 6, mid - 3
        elif bar.thread_only:
            h, by = 4, mid + _BAR_H / 2 - 1
        else:
            h, by = _BAR_H, mid - _BAR_H / 2
        fill = f"url(#hatch-{bar.kind})" if bar.kind in ("retry", "abandoned") else COLORS[bar.kind]
        if bw > 4 and bar.kind not in ("retry",) and not bar.thread_only:
            bw -= 1  # a hair of space between back-to-back attempts
        out.append(
            f'<rect class="bar" x="{bx:.1f}" y="{by:.1f}" width="{bw:.1f}" height="{h}" '
            f'rx="2" fill="{fill}" stroke="{COLORS[bar.kind]}" stroke-width="0.8">'
            f"<title>{_e(bar.text)}</title></rect>"
        )
        if numbered and bar.attempt and bw >= 16 and h == _BAR_H and bar.kind != "abandoned":
            out.append(
                f'<text x="{bx + 4:.1f}" y="{mid + 4}" fill="#fff" font-size="10" '
                f'pointer-events="none">{bar.attempt}</text>'
            )
    if row.failed is not None:
        fx = x0 + scale.x(row.failed) + 4
        what_ = "tolerated" if row.tolerated else "fatal"
        out.append(
            f'<text x="{fx:.1f}" y="{mid + 5}" fill="{mark}" font-weight="700" '
            f'font-size="14"><title>{_e(row.label)} used up its attempts ({what_}): '
            f"{_e(row.error)}</title>\u2717</text>"
        )
    return out


def _stage_text(stage: Stage, tl: Timeline) -> str:
    end = stage.ended if stage.ended is not None else tl.end
    state = "all over" if stage.ended is not None else "not all over"
    started = stage.started or 0.0
    return (
        f"stage {stage.name}: from +{duration(started)} to +{duration(end)} "
        f"({duration(tl.history.task_seconds(stage.name))} running), {state}; "
        f"{stage.added} children"
    )


def _draw_hidden(
    stage: Stage, y: float, x0: float, scale: _Scale, stripe: str, width: float
) -> list[str]:
    mid = y + _ROW_H / 2
    n = stage.hidden_children
    kinds = ", ".join(f"{v} {k}" for k, v in sorted(stage.hidden_kinds.items())) or "no attempts"
    out = [
        f'<rect class="row" x="0" y="{y}" width="{width}" height="{_ROW_H}" fill="{stripe}"/>',
        f'<text x="18" y="{mid + 4}" fill="#59636e" font-style="italic"><title>{n} more '
        f"children of {_e(stage.name)} are not drawn one by one ({kinds}); the bars show how "
        f"many of their attempts ran at each moment</title>+{n} more "
        f"{'child' if n == 1 else 'children'}</text>",
    ]
    starts, ends = stage.hidden_starts, stage.hidden_ends
    if not starts:
        return out
    buckets = int(_CHART_W // 3)
    diff = [0] * (buckets + 2)
    for a, b in zip(starts, ends, strict=True):
        i = min(buckets, int(scale.x(a) / 3))
        j = min(buckets, int(scale.x(b) / 3))
        diff[i] += 1
        diff[j + 1] -= 1
    level, peak, counts = 0, 0, []
    for i in range(buckets + 1):
        level += diff[i]
        counts.append(level)
        peak = max(peak, level)
    if peak == 0:
        return out
    color = "#7a9cc6"
    for i, c in enumerate(counts):
        if c:
            h = max(1.5, (_ROW_H - 4) * c / peak)
            out.append(
                f'<rect x="{x0 + 3 * i:.1f}" y="{y + _ROW_H - 2 - h:.1f}" width="3" '
                f'height="{h:.1f}" fill="{color}" opacity="0.75"/>'
            )
    out.append(
        f'<rect class="bar" x="{x0}" y="{y}" width="{_CHART_W}" height="{_ROW_H}" '
        f'fill="transparent"><title>{_e(stage.name)}: {len(starts)} attempts of {n} children '
        f"not drawn one by one ({kinds}); at most {peak} running at once</title></rect>"
    )
    return out


def render(tl: Timeline) -> str:
    """The whole HTML page of a :class:`Timeline`: inline CSS, inline SVG, no script."""
    from . import __version__

    h = tl.history
    title = f"{h.flow or 'threadflow'} run {h.run_id}: {tl.status}"
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<header>",
        *_header(tl),
        "</header><main>",
        *_svg(tl),
        "</main>",
        f"<footer>threadflow {_e(__version__)} \u00b7 times are seconds since the run began "
        f"({_e((tl.begin or '-').replace('T', ' ')[:23])} UTC) \u00b7 hover a bar for its "
        "attempt, times and error</footer>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"
