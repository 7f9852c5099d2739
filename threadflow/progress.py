"""Live progress of a run on the command line: one line per stage, counted from the run's log.

The counts are the fold's (:func:`threadflow.events.fold`), kept up to date by following the
store (:class:`threadflow.store.Follower`: each redraw folds only the events written since the
last one). So they are the numbers ``threadflow runs``, ``show --summary`` and the timeline
show, and a replayed run's lines include the work done before the replay. Nothing here runs on
the coordinator's thread: the progress only reads the store.
"""

from __future__ import annotations

import shutil
import sqlite3

import click

from ._clock import utcnow
from ._format import duration, plural, printable
from .errors import StoreError
from .events import RunHistory, TaskHistory
from .store import EventStore

#: Seconds between two redraws of the progress lines.
EVERY = 0.2

_BAR_WIDTH = 20


def stage_line(task: TaskHistory, took: float, name_width: int = 12) -> str:
    """One stage's progress: a bar of children finished / children, their rate, the stage's
    time, then its troubles. A stage without children shows its parent's state instead."""
    name = printable(task.name).ljust(name_width)
    finished = task.children_done + task.children_failed
    trouble = troubles(task)
    if task.children_added == 0 and finished == 0:
        if task.parent == "failed":
            state = f"failed after {plural(task.attempts, 'attempt', 'attempts')}"
        elif task.all_over or task.parent == "over":
            state = "over"
        else:
            state = f"running (attempt {task.attempts})"
        return f"{name} {state}  {duration(took)}  {trouble}".rstrip()
    total = max(task.children_added, finished)
    filled = int(_BAR_WIDTH * finished / total) if total else 0
    bar = "#" * filled + "-" * (_BAR_WIDTH - filled)
    width = len(str(total))
    text = f"{name} [{bar}] {finished:>{width}}/{total} children"
    if finished:
        text += f"  {finished / max(took, 1e-6):,.1f}/s"
    return f"{text}  {duration(took)}  {trouble}".rstrip()


def troubles(task: TaskHistory) -> str:
    """``1 failed, 4 exits, 2 timeouts, 5 retries``: only the counts that are not zero."""
    parts = [
        plural(count, one, many)
        for count, one, many in (
            (task.children_failed, "failed", "failed"),
            (task.exits, "exit", "exits"),
            (task.timeouts, "timeout", "timeouts"),
            (task.retries, "retry", "retries"),
        )
        if count
    ]
    return ", ".join(parts)


def stage_over(task: TaskHistory, history: RunHistory) -> bool:
    """Whether the stage's line is final: it is all over, its parent failed, or the run's
    segment ended."""
    return task.all_over or task.parent == "failed" or not history.segment_open


class Progress:
    """The progress of one run: its fold, followed in the store, and which stages were shown.

    Reading is best effort: if the store cannot be read for a moment, the last counts stay.

    :param after: the segments the run had before (a replay): until the log shows the next
        one, the run is still starting and no stage is over.
    """

    def __init__(self, store: EventStore, run_id: str, after: int = 0) -> None:
        self.follower = store.follow(run_id)
        self.after = after
        self.shown: set[str] = set()  # stages whose final line was printed

    @property
    def started(self) -> bool:
        """Whether the log shows the segment this progress follows."""
        return self.history.segments > self.after

    @property
    def history(self) -> RunHistory:
        return self.follower.history

    def update(self) -> RunHistory:
        try:
            return self.follower.update()
        except (sqlite3.Error, StoreError):
            return self.follower.history

    def close(self) -> None:
        self.follower.close()


class ProgressView:
    """Draws the stages on stderr: on a terminal, one live line per running stage, redrawn in
    place; a stage that ends leaves one final line. Elsewhere (a log, a pipe) only the final
    lines are written."""

    def __init__(self, progress: Progress, live: bool, enabled: bool = True) -> None:
        self.progress = progress
        self.live = live
        self.enabled = enabled
        self._drawn = 0  # live lines on screen

    def _width(self) -> int:
        return max(40, shutil.get_terminal_size((100, 24)).columns - 1)

    def draw(self, final: bool = False) -> None:
        if not self.enabled:
            return
        history = self.progress.update()
        now = utcnow().isoformat()
        tasks = list(history.tasks.values())
        name_width = max([12, *(len(printable(t.name)) for t in tasks)])
        width = self._width()
        out: list[str] = []
        if self.live and self._drawn:
            out.append(f"\x1b[{self._drawn}A\r\x1b[J")
        live_lines = []
        for task in tasks:
            if task.name in self.progress.shown:
                continue
            line = stage_line(task, history.task_seconds(task.name, now), name_width)
            if final or (self.progress.started and stage_over(task, history)):
                out.append(line + "\n")
                self.progress.shown.add(task.name)
            else:
                live_lines.append(line[:width])
        if self.live and not final:
            out.extend(f"{line}\n" for line in live_lines)
            self._drawn = len(live_lines)
        else:
            self._drawn = 0
        if out:
            # color=True keeps the cursor movements that click strips when it is not sure
            # of the terminal; without live lines there are none.
            click.echo("".join(out), nl=False, err=True, color=self.live or None)

    def clear(self) -> None:
        if self.enabled and self.live and self._drawn:
            click.echo(f"\x1b[{self._drawn}A\r\x1b[J", nl=False, err=True, color=True)
        self._drawn = 0
