"""The timeline of a run: the model of a Gantt chart of its attempts, built from its log.

:func:`build` reads a run's events once, in seq order, and feeds each to the one fold
(:class:`threadflow.events.RunHistory`) and to the rows of the chart: one per task and one per
child, of bars (one per attempt, plus the waits before retries and the threads that outlived
their attempt). Every number the page shows (durations, attempts, children, failures) is the
fold's, the same as ``threadflow runs`` and ``show --summary`` show; the rows only say where
each attempt was in time. :func:`render` (``threadflow._timeline_html``) draws the model as
one self-contained HTML page.

Rows are streamed from the log: a run with a million children keeps at most ``2 * max_rows``
child rows in memory; the children that are not drawn one by one are drawn, per task, as one
row showing how many of their attempts ran at each moment.
"""

from __future__ import annotations

import dataclasses
from array import array
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ._format import compact, duration, error_text, shorten
from ._timeline_html import render
from .events import FINAL_KINDS, Event, RunHistory, TaskHistory, ts_seconds
from .store import EventStore

__all__ = ["MAX_ROWS", "Bar", "Marker", "Row", "Stage", "Timeline", "build", "render", "timeline"]

#: Child rows drawn one by one, at most (the rest are summed up in one row per task).
MAX_ROWS = 300

# -- the model ---------------------------------------------------------------------------------


@dataclass
class Bar:
    """One span of a row: an attempt, a wait before a retry, or an abandoned thread."""

    start: float  # seconds since the run began
    end: float
    kind: str  # over, exit, timeout, retry, abandoned, cancelled, running
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
    """A task of the run, placed on the time axis; its counts are the fold's (``history``)."""

    name: str
    history: TaskHistory | None = None  # None for a task that never started
    started: float | None = None  # seconds since the run began: its first event
    ended: float | None = None  # its task_all_over
    children_seen: int = 0  # distinct children that started
    hidden_starts: array[float] = field(default_factory=lambda: array("d"))
    hidden_ends: array[float] = field(default_factory=lambda: array("d"))
    hidden_kinds: Counter[str] = field(default_factory=Counter)
    hidden_children: int = 0  # children that ran and are not drawn one by one

    @property
    def added(self) -> int:
        """Its children (the fold's ``children_added``)."""
        return 0 if self.history is None else self.history.children_added


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
    end: float  # seconds from the first to the last event (or to now: see reaching)
    stages: list[Stage]
    rows: list[Row]
    spans: list[tuple[float, float]]  # the segments' spans (first run, replays): the time axis
    markers: list[Marker]
    counts: Counter[str]  # bars by kind (including those not drawn)
    max_rows: int
    failure_traceback: str = ""

    def reaching(self, until: str) -> Timeline:
        """This chart of a run still going on with its running attempts drawn up to ``until``
        (an event timestamp, such as ``utcnow().isoformat()``), as a live view wants while
        nothing new is logged; the log alone can only say they were running at its last event.
        An ended or interrupted run's chart is returned as it is."""
        if self.status != "running" or self.history.outcome is not None or self.begin is None:
            return self
        t = _seconds(until) - _seconds(self.begin)
        if t <= self.end:
            return self
        last = self.end
        rows = [
            dataclasses.replace(
                row,
                bars=[
                    dataclasses.replace(bar, end=t)
                    if bar.kind == "running" and bar.end >= last
                    else bar
                    for bar in row.bars
                ],
            )
            for row in self.rows
        ]
        spans = [*self.spans[:-1], (self.spans[-1][0], t)] if self.spans else [(0.0, t)]
        return dataclasses.replace(self, end=t, rows=rows, spans=spans)


# -- building ----------------------------------------------------------------------------------


def _seconds(ts: str) -> float:
    return ts_seconds(ts) or 0.0


def _traceback_tail(error: Any, lines: int = 8) -> str:
    if not isinstance(error, dict) or not error.get("traceback"):
        return ""
    tail = str(error["traceback"]).rstrip().splitlines()[-lines:]
    return "\n".join(tail)


class _Builder:
    """Consumes a run's events in seq order; one pass, memory bounded by the rows it keeps."""

    def __init__(self, history: RunHistory, max_rows: int) -> None:
        self.history = history
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
            label = (ev.task or "") if ev.ref is None else f"{ev.task}[{compact(ev.child_id)}]"
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
            name = f"{name}[{compact(ev.child_id)}]"
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
        return f"from +{duration(start)} to +{duration(end)} ({duration(end - start)})"

    # -- the events

    def add(self, ev: Event) -> None:
        """Draw one more event (the next in seq order), then fold it."""
        if ev.kind == "task_ran":  # a child that started and returned in one commit: one row
            started = (ev.data or {}).get("started")
            if isinstance(started, str):
                self._draw(dataclasses.replace(ev, kind="task_started", ts=started, data=None))
            self._draw(dataclasses.replace(ev, kind="task_over"))
        else:
            self._draw(ev)
        self.history.add(ev)

    def _draw(self, ev: Event) -> None:
        t = _seconds(ev.ts)
        if self.t0 is None:
            self.t0, self.begin = t, ev.ts
        self.now = t = t - self.t0
        kind, data = ev.kind, ev.data or {}
        key3 = (ev.task or "", ev.ref, ev.attempt)
        if kind == "flow_started":
            self.order = list((data.get("definition") or {}).keys())
            return
        if kind == "replayed":
            # The segment before ended at its final event, or (a crash) at its last event.
            spans = self.history.spans
            end = _seconds(spans[-1].end) - self.t0 if spans else t
            if self.open:  # attempts of the segment before that never reported
                self._close_open("no outcome in the log: its process ended", "running", end)
            if not self.markers or self.markers[-1].kind not in FINAL_KINDS:
                text = "the process ended without a final event (a crash or a kill)"
                self.markers.append(Marker(end, "interrupted", text))
            text = f"replay {data.get('segment', '')}"
            if isinstance(data.get("rerun"), list):  # their earlier bars are work it redid
                text += f", rerunning {', '.join(map(str, data['rerun']))} (code changed)"
            self.markers.append(Marker(t, "replayed", text))
            return
        if kind in FINAL_KINDS:
            why = {
                "failed_over": "the run failed",
                "interrupted": "the run was stopped",
                "cancelled": "the run was cancelled",
            }
            self._close_open(f"cancelled: {why.get(kind, 'the run ended')}", "cancelled", t)
            text = kind
            if kind == "failed_over" and data.get("task"):
                task = data["task"]
                name = task[0] if len(task) == 1 else f"{task[0]}[{compact(task[1])}]"
                text = f"failed_over: {name}: {error_text(data.get('error'))}"
            self.markers.append(Marker(t, kind, text))
            return
        if ev.task is None:
            return
        stage = self._stage(ev.task)
        if kind == "task_started":
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
                        f"{self._who(ev)}: waited {duration(t - waited[0])} to start "
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
                    text += f"\nresult: {shorten(compact(data['result']), 160)}"
            else:
                text += f"\n{error_text(error)}"
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
                        f"+{duration(t)}; its outcome ({outcome}) was ignored",
                        thread_only=True,
                    ),
                )
        elif kind == "task_failed":
            row = self._row(ev, create=ev.ref is None)
            error = error_text(data.get("error"))
            if row is not None:
                row.failed, row.tolerated, row.error = t, bool(data.get("tolerated")), error
            if not data.get("tolerated"):
                tb = _traceback_tail(self.last_error.get((ev.task, ev.ref)), 40)
                self.failure_traceback = tb

    def finish(self, status: str) -> Timeline:
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
        history = self.history
        names = list(dict.fromkeys([*self.stages, *self.order]))
        stages = [self._stage(name) for name in names]
        for stage in stages:
            drawn = sum(1 for r in rows if r.task == stage.name and not r.is_parent)
            stage.hidden_children = max(0, stage.children_seen - drawn)
            folded = history.tasks.get(stage.name)
            if folded is not None:
                stage.history = folded
                stage.started = self._at(folded.first_ts)
                stage.ended = self._at(folded.ended)
        rank = {name: i for i, name in enumerate(names)}
        rows.sort(key=lambda r: (rank.get(r.task, 0), -1 if r.ref is None else r.ref))
        # The time axis: the fold's segments; the last one reaches the log's last event (a
        # thread that returned after the run ended is drawn too).
        spans = [(self._at(s.start) or 0.0, self._at(s.end) or 0.0) for s in history.spans]
        if spans:
            spans[-1] = (spans[-1][0], max(spans[-1][1], self.now))
        return Timeline(
            history=history,
            status=status,
            begin=self.begin,
            end=self.now,
            stages=stages,
            rows=rows,
            spans=spans or [(0.0, self.now)],
            markers=self.markers,
            counts=self.counts,
            max_rows=self.max_rows,
            failure_traceback=self.failure_traceback,
        )

    def _at(self, ts: str | None) -> float | None:
        """Seconds since the run began."""
        t = ts_seconds(ts)
        return None if t is None or self.t0 is None else t - self.t0

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


def build(
    events: Iterable[Event],
    run_id: str | None = None,
    *,
    status: str | None = None,
    max_rows: int = MAX_ROWS,
) -> Timeline:
    """Fold a run's events (in seq order) into a :class:`Timeline`, in one pass: the fold
    (``Timeline.history``) and the rows of bars together.

    :param status: the run's status when the log has no end (``RunInfo.status``: ``"running"``
        or ``"interrupted"``); by default the log's outcome, else ``"running"``.
    :param max_rows: child rows drawn one by one, at most; children that failed, timed out or
        were retried are drawn first.
    """
    builder = _Builder(RunHistory(run_id or ""), max_rows)
    for ev in events:
        builder.add(ev)
    history = builder.history
    return builder.finish(history.outcome or status or "running")


def timeline(store: EventStore, run_id: str, *, max_rows: int = MAX_ROWS) -> str:
    """The HTML page of run ``run_id`` of ``store`` (an id, or a prefix that names one run).

    :param max_rows: children drawn one row each, at most (see :func:`build`).
    :raises KeyError: if no run, or several, match.
    """
    info = store.run(run_id)
    built = build(store.iter_rows(info.run_id), info.run_id, status=info.status, max_rows=max_rows)
    return render(built)
