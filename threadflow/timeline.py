"""The timeline of a run: a self-contained HTML page with an SVG Gantt chart of its attempts.

:func:`build` folds a run's events into rows (one per task, one per child) of bars (one per
attempt, plus the waits before retries and the threads that outlived their attempt);
:func:`render` turns that into one HTML page with inline CSS, no script and nothing fetched
from the network, so it can be mailed, archived or opened from a CI artifact. Hovering a bar
shows its attempt, times and error (SVG ``<title>`` tooltips).

Rows are streamed from the log: a run with a million children keeps at most ``2 * max_rows``
child rows in memory; the children that are not drawn one by one are drawn, per task, as one
row showing how many of their attempts ran at each moment.
"""

from __future__ import annotations

import datetime
import html
import json
import math
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ._text import printable
from .events import FINAL_KINDS, Event, RunHistory, fold
from .store import EventStore

#: Child rows drawn one by one, at most (the rest are summed up in one row per task).
MAX_ROWS = 300

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


# -- the model ---------------------------------------------------------------------------------


@dataclass
class Bar:
    """One span of a row: an attempt, a wait before a retry, or an abandoned thread."""

    start: float  # seconds since the run began
    end: float
    kind: str  # a key of COLORS
    text: str  # the hover text
    #: Only a thread that outlived its attempt (drawn thin, under the row's other bars).
    thread_only: bool = False
    attempt: int | None = None


@dataclass
class Row:
    """A task's parent attempts, or one child's attempts."""

    task: str
    label: str
    ref: int | None  # seq of the child's child_added event; None for the parent row
    bars: list[Bar] = field(default_factory=list)
    failed: float | None = None  # when it used up its attempts
    tolerated: bool = False
    error: str = ""
    interesting: bool = False  # anything but one attempt that returned
    recovered: bool = False  # succeeded in a replay after it had failed

    @property
    def is_parent(self) -> bool:
        return self.ref is None


@dataclass
class Stage:
    """A task of the run, with the figures its summary row and band need."""

    name: str
    started: float | None = None
    ended: float | None = None  # its task_all_over
    added: int = 0  # children added and not discarded
    children_seen: int = 0  # distinct children that started
    hidden_starts: array[float] = field(default_factory=lambda: array("d"))
    hidden_ends: array[float] = field(default_factory=lambda: array("d"))
    hidden_kinds: Counter[str] = field(default_factory=Counter)
    hidden_children: int = 0  # children that ran and are not drawn one by one


@dataclass
class Marker:
    """A moment drawn across the chart: the run's end, a replay."""

    at: float
    kind: str
    text: str


@dataclass
class Timeline:
    """Everything :func:`render` draws; made by :func:`build`."""

    history: RunHistory
    status: str
    begin: str | None  # ISO timestamp of the run's first event
    end: float  # seconds from the first to the last event
    stages: list[Stage]
    rows: list[Row]
    spans: list[tuple[float, float]]  # the segments' spans (first run, replays)
    markers: list[Marker]
    counts: Counter[str]  # bars by kind (including those not drawn)
    max_rows: int
    failure_traceback: str = ""


# -- building ----------------------------------------------------------------------------------


def _seconds(ts: str) -> float:
    return datetime.datetime.fromisoformat(ts).timestamp()


def _compact(value: Any) -> str:
    plain = list(value) if isinstance(value, tuple) else value
    return json.dumps(_plain(plain), separators=(",", ":"), ensure_ascii=False, default=repr)


def _plain(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def _shorten(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "\u2026"


def _error_line(error: Any) -> str:
    if isinstance(error, dict):
        kind, message = error.get("type"), error.get("message")
        return f"{kind}: {message}" if kind else str(message)
    return "" if error is None else str(error)


def _traceback_tail(error: Any, lines: int = 8) -> str:
    if not isinstance(error, dict) or not error.get("traceback"):
        return ""
    tail = str(error["traceback"]).rstrip().splitlines()[-lines:]
    return "\n".join(tail)


def _secs(seconds: float) -> str:
    """A duration for people: ``0.250 s``, ``12.5 s``, ``3m07s``, ``2h05m``."""
    if seconds < 10:
        return f"{seconds:.3f} s"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class _Builder:
    """Consumes a run's events in seq order; one pass, memory bounded by the rows it keeps."""

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows
        self.t0: float | None = None
        self.begin: str | None = None
        self.now = 0.0
        self.stages: dict[str, Stage] = {}
        self.order: list[str] = []  # task names from the flow's definition
        self.rows: dict[tuple[str, int | None], Row] = {}
        self.child_rows = 0
        self.interesting_rows = 0
        # (task, ref, attempt) -> (start, child id): attempts without an outcome yet
        self.open: dict[tuple[str, int | None, int | None], tuple[float, Any]] = {}
        # (task, ref, attempt) -> [since, abandoned, child id]: cancelled attempts whose thread
        # may run on
        self.cancelled: dict[tuple[str, int | None, int | None], list[Any]] = {}
        self.retry_at: dict[tuple[str, int | None], tuple[float, float]] = {}
        self.seen = bytearray()  # bit per child_added seq: children that started
        self.spans: list[list[float]] = []
        self.markers: list[Marker] = []
        self.counts: Counter[str] = Counter()
        self.failure_traceback = ""
        self.last_error: dict[tuple[str, int | None], Any] = {}

    # -- helpers

    def _stage(self, name: str) -> Stage:
        stage = self.stages.get(name)
        if stage is None:
            stage = self.stages[name] = Stage(name)
        return stage

    def _row(self, ev: Event, create: bool) -> Row | None:
        key = (ev.task or "", ev.ref)
        row = self.rows.get(key)
        if row is None and create:
            label = (ev.task or "") if ev.ref is None else f"{ev.task}[{_compact(ev.child_id)}]"
            row = self.rows[key] = Row(ev.task or "", label, ev.ref)
            if ev.ref is not None:
                self.child_rows += 1
        return row

    def _mark_seen(self, ref: int) -> bool:
        """Set the bit of child ``ref``; return whether it was new."""
        index, bit = ref >> 3, 1 << (ref & 7)
        if index >= len(self.seen):
            self.seen.extend(bytes(index + 1 - len(self.seen) + 4096))
        new = not self.seen[index] & bit
        self.seen[index] |= bit
        return new

    def _add_bar(self, ev: Event, bar: Bar) -> None:
        """Draw ``bar`` on the event's row, making the row if there is room."""
        self.counts[bar.kind] += 1
        if bar.kind != "retry":
            bar.attempt = ev.attempt
        interesting = bar.kind != "over" or (ev.attempt or 1) > 1
        row = self._row(ev, create=False)
        if row is None and interesting and self.interesting_rows < self.max_rows:
            row = self._row(ev, create=True)
        if row is None:
            assert ev.ref is not None  # parent rows are always drawn
            stage = self._stage(ev.task or "")
            stage.hidden_starts.append(bar.start)
            stage.hidden_ends.append(bar.end)
            stage.hidden_kinds[bar.kind] += 1
            return
        if interesting and not row.interesting and not row.is_parent:
            row.interesting = True
            self.interesting_rows += 1
        row.bars.append(bar)

    def _who(self, ev: Event) -> str:
        name = ev.task or ""
        if ev.ref is not None:
            name = f"{name}[{_compact(ev.child_id)}]"
        return f"{name} attempt {ev.attempt}"

    def _close_open(self, reason: str, kind: str, at: float) -> None:
        """End every attempt still open at ``at``, as the run (or its segment) ended."""
        for (task, ref, attempt), (start, child) in list(self.open.items()):
            ev = Event(0, "", "", "", task, child, attempt, ref, None)
            text = f"{self._who(ev)}: {reason}\n{self._when(start, at)}"
            self._add_bar(ev, Bar(start, at, kind, text))
            if kind == "cancelled":
                self.cancelled[(task, ref, attempt)] = [at, False, child]
        self.open.clear()

    def _when(self, start: float, end: float) -> str:
        return f"from +{_secs(start)} to +{_secs(end)} ({_secs(end - start)})"

    # -- the events

    def add(self, ev: Event) -> None:
        t = _seconds(ev.ts)
        if self.t0 is None:
            self.t0, self.begin = t, ev.ts
        self.now = t = t - self.t0
        kind, data = ev.kind, ev.data or {}
        key3 = (ev.task or "", ev.ref, ev.attempt)
        if kind == "flow_started":
            self.spans.append([t, t])
            self.order = list((data.get("definition") or {}).keys())
            return
        if kind == "replayed":
            end = self.spans[-1][1] if self.spans else t
            if self.open:  # attempts of the segment before that never reported
                self._close_open("no outcome in the log: its process ended", "running", end)
            if not self.markers or self.markers[-1].kind not in FINAL_KINDS:
                text = "the process ended without a final event (a crash or a kill)"
                self.markers.append(Marker(end, "interrupted", text))
            self.spans.append([t, t])
            self.markers.append(Marker(t, "replayed", f"replay {data.get('segment', '')}"))
            return
        if self.spans:
            self.spans[-1][1] = t
        if kind in FINAL_KINDS:
            why = {"failed_over": "the run failed", "interrupted": "the run was stopped"}
            self._close_open(f"cancelled: {why.get(kind, 'the run ended')}", "cancelled", t)
            text = kind
            if kind == "failed_over" and data.get("task"):
                task = data["task"]
                name = task[0] if len(task) == 1 else f"{task[0]}[{_compact(task[1])}]"
                text = f"failed_over: {name}: {_error_line(data.get('error'))}"
            self.markers.append(Marker(t, kind, text))
            return
        if ev.task is None:
            return
        stage = self._stage(ev.task)
        if kind == "child_added":
            stage.added += 1
        elif kind == "children_discarded":
            stage.added -= int(data.get("count", 0))
        elif kind == "task_started":
            if stage.started is None:
                stage.started = t
            row_key = (ev.task, ev.ref)
            if ev.ref is None:
                self._row(ev, create=True)
            elif self._mark_seen(ev.ref):
                stage.children_seen += 1
                # The first children to start get rows, in the order they were added.
                if self.child_rows < self.max_rows:
                    self._row(ev, create=True)
            self.open[key3] = (t, ev.child_id)
            waited = self.retry_at.pop(row_key, None)
            if waited is not None and t > waited[0]:
                self._add_bar(
                    ev,
                    Bar(
                        waited[0],
                        t,
                        "retry",
                        f"{self._who(ev)}: waited {_secs(t - waited[0])} to start "
                        f"(task_retry_delay {waited[1]:g} s)",
                    ),
                )
        elif kind in ("task_over", "exit", "timeout"):
            opened = self.open.pop(key3, None)
            if opened is None:
                return  # an outcome recorded while stopping, for an attempt already ended
            start = opened[0]
            text = f"{self._who(ev)}: {kind}\n{self._when(start, t)}"
            error = data.get("error")
            if kind == "task_over":
                if "result" in data and data["result"] is not None:
                    text += f"\nresult: {_shorten(_compact(data['result']), 160)}"
            else:
                text += f"\n{_error_line(error)}"
                tail = _traceback_tail(error)
                if tail:
                    text += f"\n\n{tail}"
                self.last_error[(ev.task, ev.ref)] = error
            if kind == "timeout":
                self.cancelled[key3] = [t, False, ev.child_id]
            row = self.rows.get((ev.task, ev.ref))
            if kind == "task_over" and row is not None and row.failed is not None:
                row.recovered = True
            self._add_bar(ev, Bar(start, t, "over" if kind == "task_over" else kind, text))
        elif kind == "retry":
            self.retry_at[(ev.task, ev.ref)] = (t, float(data.get("delay", 0.0)))
        elif kind == "abandoned":
            opened = self.open.pop(key3, None)
            if opened is not None:  # running when stop() came, and did not return in time
                start = opened[0]
                self._add_bar(
                    ev,
                    Bar(
                        start,
                        t,
                        "abandoned",
                        f"{self._who(ev)}: abandoned when the server stopped\n"
                        f"{self._when(start, t)}",
                    ),
                )
                self.cancelled[key3] = [t, True, ev.child_id]
            elif key3 in self.cancelled:
                self.cancelled[key3][1] = True
        elif kind == "stale":
            since = self.cancelled.pop(key3, None)
            if since is not None and since[1]:
                outcome = data.get("outcome", "?")
                self._add_bar(
                    ev,
                    Bar(
                        since[0],
                        t,
                        "abandoned",
                        f"{self._who(ev)}: its thread ignored the cancel and returned at "
                        f"+{_secs(t)}; its outcome ({outcome}) was ignored",
                        thread_only=True,
                    ),
                )
        elif kind == "task_failed":
            row = self._row(ev, create=ev.ref is None)
            error = _error_line(data.get("error"))
            if row is not None:
                row.failed, row.tolerated, row.error = t, bool(data.get("tolerated")), error
            if not data.get("tolerated"):
                tb = _traceback_tail(self.last_error.get((ev.task, ev.ref)), 40)
                self.failure_traceback = tb
        elif kind == "task_all_over":
            stage.ended = t

    def finish(self, history: RunHistory, status: str) -> Timeline:
        if self.open:
            self._close_open(
                "no outcome in the log (still running, or its process died)", "running", self.now
            )
        for (task, ref, attempt), (since, abandoned, child) in self.cancelled.items():
            if abandoned:
                ev = Event(0, "", "", "", task, child, attempt, ref, None)
                text = (
                    f"{self._who(ev)}: its thread ignored the cancel and had not returned "
                    "when the log ends"
                )
                self._add_bar(ev, Bar(since, self.now, "abandoned", text, thread_only=True))
        rows = self._select_rows()
        names = list(dict.fromkeys([*self.stages, *self.order]))
        stages = [self._stage(name) for name in names]
        for stage in stages:
            drawn = sum(1 for r in rows if r.task == stage.name and not r.is_parent)
            stage.hidden_children = max(0, stage.children_seen - drawn)
        rank = {name: i for i, name in enumerate(names)}
        rows.sort(key=lambda r: (rank.get(r.task, 0), -1 if r.ref is None else r.ref))
        spans = [(a, b) for a, b in self.spans] or [(0.0, self.now)]
        return Timeline(
            history=history,
            status=status,
            begin=self.begin,
            end=self.now,
            stages=stages,
            rows=rows,
            spans=spans,
            markers=self.markers,
            counts=self.counts,
            max_rows=self.max_rows,
            failure_traceback=self.failure_traceback,
        )

    def _select_rows(self) -> list[Row]:
        """Parents, then children that did anything but succeed at once, then the others."""
        parents = [r for r in self.rows.values() if r.is_parent]
        loud = [r for r in self.rows.values() if not r.is_parent and r.interesting]
        quiet = [r for r in self.rows.values() if not r.is_parent and not r.interesting]
        keep = quiet[: max(0, self.max_rows - len(loud))]
        dropped = loud[self.max_rows :] + quiet[len(keep) :]
        loud = loud[: self.max_rows]
        for row in dropped:  # summed up in their task's last row instead
            stage = self._stage(row.task)
            for bar in row.bars:
                stage.hidden_starts.append(bar.start)
                stage.hidden_ends.append(bar.end)
                stage.hidden_kinds[bar.kind] += 1
        return parents + loud + keep


def _tap(events: Iterable[Event], builder: _Builder) -> Iterator[Event]:
    for ev in events:
        builder.add(ev)
        yield ev


def build(
    events: Iterable[Event],
    run_id: str | None = None,
    *,
    status: str | None = None,
    max_rows: int = MAX_ROWS,
) -> Timeline:
    """Fold a run's events (in seq order) into a :class:`Timeline`, in one pass.

    :param status: the run's status when the log has no end (``RunInfo.status``: ``"running"``
        or ``"interrupted"``); by default the log's outcome, else ``"running"``.
    :param max_rows: child rows drawn one by one, at most; children that failed, timed out or
        were retried are drawn first.
    """
    builder = _Builder(max_rows)
    history = fold(_tap(events, builder), run_id)
    return builder.finish(history, history.outcome or status or "running")


def timeline(store: EventStore, run_id: str, *, max_rows: int = MAX_ROWS) -> str:
    """The HTML page of run ``run_id`` of ``store`` (the run id must be exact).

    :raises KeyError: if no run matches.
    """
    info = store.run(run_id)
    built = build(store.iter_events(info.run_id), info.run_id, status=info.status)
    return render(built)


# -- drawing -----------------------------------------------------------------------------------


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


def _active(tl: Timeline, a: float, b: float) -> float:
    """Seconds between ``a`` and ``b`` during which the run was running (pauses between
    segments, before a replay, do not count)."""
    if len(tl.spans) < 2:
        return max(0.0, b - a)
    return sum(max(0.0, min(b, hi) - max(a, lo)) for lo, hi in tl.spans)


def _e(text: Any) -> str:
    """Text from the log as HTML text: control characters shown as escapes (and a lone
    surrogate, which cannot be written as UTF-8, as ``\\udcff``), lines kept."""
    return html.escape(printable(str(text), newlines=True), quote=True)


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
        ("duration", _secs(_active(tl, 0.0, tl.end))),
        ("entrance", h.entrance or "-"),
        ("segments", str(h.segments)),
        *([("first start to last event", _secs(tl.end))] if len(tl.spans) > 1 else []),
        ("attempts", str(attempts)),
        ("exits", str(tl.counts["exit"])),
        ("timeouts", str(tl.counts["timeout"])),
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
        name = h.task[0] if len(h.task) == 1 else f"{h.task[0]}[{_compact(h.task[1])}]"
        block = f"<div class=failure><b>failed task {_e(name)}</b>: {_e(_error_line(h.error))}"
        if tl.failure_traceback:
            block += (
                f"<details><summary>traceback</summary><pre>{_e(tl.failure_traceback)}</pre>"
                "</details>"
            )
        out.append(block + "</div>")
    if h.failed:
        shown = ", ".join(
            f"{t[0]}[{_compact(t[1])}]" if len(t) > 1 else str(t[0]) for t in h.failed[:8]
        )
        more = f" and {len(h.failed) - 8} more" if len(h.failed) > 8 else ""
        out.append(
            f"<p>tolerated failures ({len(h.failed)}): <span class=bad>{_e(shown)}</span>"
            f"{_e(more)}</p>"
        )
    out.extend(_task_table(tl))
    out.append(
        "<ul class=legend>"
        + "".join(f"<li>{_legend_swatch(k)}{_e(k)}: {_e(text)}</li>" for k, text in LEGEND)
        + "<li><b class=bad>\u2717</b> used up its attempts</li></ul>"
    )
    return out


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
    total = _active(tl, 0.0, tl.end) or 1e-9
    for stage in tl.stages:
        t = tl.history.tasks.get(stage.name)
        if t is None or stage.started is None:
            cells = [stage.name, "-", "-", "0", "-", "-", "-", "-", "-", "-", "not started"]
            out.append("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>")
            continue
        end = stage.ended if stage.ended is not None else tl.end
        took = _active(tl, stage.started, end)
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
            f"+{_e(_secs(stage.started))}",
            share + _e(_secs(took)),
            str(t.attempts),
            str(stage.added),
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
            f"<g><title>{_e(_secs(b - a))} without a run (between segments)</title>"
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
            f"<g><title>{_e(m.text)} at +{_e(_secs(m.at))}</title>"
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
            f"in this run</title>{_e(_shorten(stage.name, 22))} \u00b7 not started</text>"
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
        f"</title>{_e(_shorten(label.strip(), 27 if row.is_parent else 25))}</text>"
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
        f"stage {stage.name}: from +{_secs(started)} to +{_secs(end)} "
        f"({_secs(_active(tl, started, end))} running), {state}; {stage.added} children"
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
