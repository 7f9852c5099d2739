"""What happened in a run, folded from its events: the same fold serves replay and the CLI.

:func:`fold` is pure and streams: it keeps one small record per task, never one per child, so
folding a run with a million children takes constant memory. Which children still have to run
is not decided here but by the store, with the ``released`` ranges this fold collects: a child is
*live* when the attempt that added it succeeded (a ``children_released`` event after its
``task_over`` lists the seq ranges of the children it added), and *finished* when it has a
``task_over`` or a tolerated ``task_failed``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .events import FINAL_KINDS, Event, _to_tuple


@dataclass
class TaskHistory:
    """One task of a run: its parent attempts, its children, and what became of them."""

    name: str
    started: bool = False
    parent_over: bool = False
    all_over: bool = False
    attempts: int = 0
    children_added: int = 0
    children_started: int = 0
    children_done: int = 0
    #: Children whose last outcome is a failure (one that succeeded in a replay is not).
    children_failed: int = 0
    exits: int = 0
    timeouts: int = 0
    retries: int = 0
    abandoned: int = 0
    #: Seq ranges of ``child_added`` rows released by successful attempts, in release order.
    released: list[tuple[int, int]] = field(default_factory=list)
    # refs of children that failed and have not succeeded since (as many as failures)
    _failed_refs: set[int] = field(default_factory=set, repr=False)
    first_ts: str | None = None
    last_ts: str | None = None


@dataclass
class RunHistory:
    """A run as its log tells it. ``outcome`` is None while the last segment has not ended."""

    run_id: str
    flow: str | None = None
    server: str | None = None
    entrance: str | None = None
    definition: dict[str, list[str]] | None = None
    started: str | None = None
    ended: str | None = None
    outcome: str | None = None
    segments: int = 0
    tasks: dict[str, TaskHistory] = field(default_factory=dict)
    failed: list[tuple[Any, ...]] = field(default_factory=list)
    task: tuple[Any, ...] | None = None
    error: dict[str, Any] | None = None
    callback_errors: int = 0
    events: int = 0

    def task_history(self, name: str) -> TaskHistory:
        history = self.tasks.get(name)
        if history is None:
            history = self.tasks[name] = TaskHistory(name)
        return history


def _task_tuple(value: list[Any] | None) -> tuple[Any, ...] | None:
    if value is None:
        return None
    return (value[0], *(_to_tuple(v) for v in value[1:]))


def fold(events: Iterable[Event], run_id: str | None = None) -> RunHistory:
    """Fold a run's events, in seq order, into a :class:`RunHistory`."""
    run = RunHistory(run_id or "")
    for ev in events:
        run.events += 1
        run.run_id = ev.run_id
        kind, data = ev.kind, ev.data or {}
        if ev.task is not None:
            t = run.task_history(ev.task)
            t.first_ts = t.first_ts or ev.ts
            t.last_ts = ev.ts
            child = ev.child_id is not None
            if kind == "task_started":
                if child:
                    t.children_started += 1
                else:
                    t.started = True
                    t.attempts += 1
            elif kind == "child_added":
                t.children_added += 1
            elif kind == "task_over":
                if child:
                    t.children_done += 1
                    if ev.ref in t._failed_refs:
                        t._failed_refs.discard(ev.ref)
                        t.children_failed -= 1
                else:
                    t.parent_over = True
            elif kind == "children_released":
                t.released.extend((lo, hi) for lo, hi in data["ranges"])
            elif kind == "exit":
                t.exits += 1
            elif kind == "timeout":
                t.timeouts += 1
            elif kind == "retry":
                t.retries += 1
            elif kind == "abandoned":
                t.abandoned += 1
            elif kind == "task_failed":
                if child and ev.ref is not None and ev.ref not in t._failed_refs:
                    t._failed_refs.add(ev.ref)
                    t.children_failed += 1
                    if data.get("tolerated"):
                        run.failed.append((ev.task, ev.child_id))
            elif kind == "task_all_over":
                t.all_over = True
        if kind == "flow_started":
            run.flow = data.get("flow")
            run.server = data.get("server")
            run.entrance = data.get("entrance")
            run.definition = data.get("definition")
            run.started = ev.ts
            run.segments = 1
        elif kind == "replayed":
            run.segments += 1
            run.outcome = run.ended = run.task = run.error = None
        elif kind in FINAL_KINDS:
            run.outcome = kind
            run.ended = ev.ts
            run.task = _task_tuple(data.get("task"))
            run.error = data.get("error")
        elif kind == "callback_error":
            run.callback_errors += 1
    return run
