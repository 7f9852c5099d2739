"""Live progress of a run on the command line: one line per stage, counted from the run's log.

The counts are the fold's (:func:`threadflow.events.fold`), kept up to date by following the
store (:class:`threadflow.store.Follower`: each redraw folds only the events written since the
last one). So they are the numbers ``threadflow runs``, ``show --summary`` and the timeline
show, and a replayed run's lines include the work done before the replay. Nothing here runs on
the coordinator's thread: the progress only reads the store.

``threadflow run`` and ``threadflow replay`` draw it with the same :class:`ProgressView`. On a
terminal it is a live area at the bottom of the screen, drawn by ``rich`` (its ``Live``
display): what the flow itself prints, on ``sys.stdout`` or ``sys.stderr`` (a ``print()`` in a
task or a receiver, a log record), is written above that area, never drawn over; the area ends
with the attempts that have been running longest, so that a child that hangs is named. Off a
terminal (a log file, a pipe, CI) there is no live area: each stage writes one plain line as it
ends, and nothing else.
"""

from __future__ import annotations

import contextlib
import sqlite3
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from ._clock import utcnow
from ._format import compact, duration, plural, printable
from .errors import StoreError
from .events import RunHistory, RunningAttempt, TaskHistory
from .store import EventStore

#: Seconds between two redraws of the progress lines.
EVERY = 0.2
#: Seconds an attempt must have been running before the live area names it.
SLOW = 1.0
#: Running attempts named at most, oldest first.
SLOWEST = 3

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


def attempt_text(attempt: RunningAttempt) -> str:
    """``split[3] 12.5 s``, ``split[3] (attempt 2) 12.5 s``, ``fetch (parent) 3.000 s``."""
    if attempt.parent:
        name = f"{attempt.task} (parent"
        name += f", attempt {attempt.attempt})" if (attempt.attempt or 1) > 1 else ")"
    else:
        name = f"{attempt.task}[{compact(attempt.child_id)}]"
        if (attempt.attempt or 1) > 1:
            name += f" (attempt {attempt.attempt})"
    return printable(f"{name} {duration(attempt.seconds)}")


def slowest_line(history: RunHistory, now: str, slow: float = SLOW) -> str | None:
    """``running longest: split[3] 12.5 s, split[7] 4.021 s``: the attempts of the open
    segment that have been running for ``slow`` seconds or more, oldest first; None if
    there are none."""
    if not history.segment_open:
        return None
    attempts = [a for a in history.running_attempts(now, SLOWEST) if (a.seconds or 0.0) >= slow]
    if not attempts:
        return None
    return "running longest: " + ", ".join(attempt_text(a) for a in attempts)


class FollowedRun:
    """One run's fold, followed in the store, and which stages' final lines were written.

    Reading is best effort: if the store cannot be read for a moment, the last counts stay.

    :param after: the segments the run had before (a replay): until the log shows the next
        one, the run is still starting and no stage is over.
    """

    def __init__(self, store: EventStore, run_id: str, after: int = 0) -> None:
        self.follower = store.follow(run_id)
        self.after = after
        self.shown: set[str] = set()  # stages whose final line was written

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
    """Draws a run's stages on stderr, for ``threadflow run`` and ``threadflow replay``.

    Live (on a terminal, or when asked): a ``rich`` live area of one line per running stage and
    a line naming the attempts running longest, redrawn by :meth:`draw`; while it is shown
    (between :meth:`start` and :meth:`stop`) what the flow writes to ``sys.stdout`` (when that
    is the terminal too) and ``sys.stderr`` is printed above it. A stage that ends leaves its
    final line above the area. Not live: only the final lines, as plain text.

    :param live: draw the live area.
    :param enabled: draw anything at all.
    """

    def __init__(self, run: FollowedRun, live: bool, enabled: bool = True) -> None:
        self.run = run
        self.live = live and enabled
        self.enabled = enabled
        self._display: Any = None  # the rich Live, while it is shown

    # -- life

    def start(self) -> None:
        """Show the live area (nothing to do when not live)."""
        if not self.live or self._display is not None:
            return
        # Imported here: only a live display on a terminal needs rich.
        from rich.console import Console
        from rich.live import Live

        console = Console(
            file=sys.stderr,
            force_terminal=True,  # live was decided (isatty, or --progress): draw it
            highlight=False,
            markup=False,
            emoji=False,
            soft_wrap=True,  # a printed line is the flow's: the terminal wraps it, not rich
        )
        if not console.is_interactive:  # TERM=dumb, TTY_INTERACTIVE=0: no cursor movement
            self.live = False
            return
        self._display = Live(
            console=console,
            auto_refresh=False,  # redrawn by draw(), on the thread that reads the store
            transient=True,  # stop() takes the area away; final lines are written plainly
            # The flow's output goes above the area; stdout only when it is this terminal too
            # (`threadflow run X > out.txt` keeps the flow's stdout in the file).
            redirect_stdout=_same_terminal(sys.stdout, sys.stderr),
            redirect_stderr=True,
        )
        self._display.start()

    def stop(self) -> None:
        """Take the live area away and give ``sys.stdout`` and ``sys.stderr`` back."""
        display, self._display = self._display, None
        if display is not None:
            # A line the flow has begun and not ended is written now, not lost with the proxy.
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):  # a stream the flow closed or replaced
                    stream.flush()
            display.stop()

    @contextmanager
    def shown(self) -> Iterator[ProgressView]:
        """:meth:`start`, then :meth:`stop` however the block ends (Ctrl-C included)."""
        self.start()
        try:
            yield self
        finally:
            self.stop()

    # -- drawing

    def draw(self, final: bool = False) -> None:
        """Read what the log gained, write the lines of stages that ended, redraw the live area.

        :param final: the run is over: write every stage's final line (after the live area is
            taken away).
        """
        if not self.enabled:
            return
        if final:
            self.stop()
        run = self.run
        history = run.update()
        now = utcnow().isoformat()
        tasks = list(history.tasks.values())
        name_width = max([12, *(len(printable(t.name)) for t in tasks)])
        ended: list[str] = []
        live_lines: list[str] = []
        for task in tasks:
            if task.name in run.shown:
                continue
            line = stage_line(task, history.task_seconds(task.name, now), name_width)
            if final or (run.started and stage_over(task, history)):
                ended.append(line)
                run.shown.add(task.name)
            else:
                live_lines.append(line)
        display = self._display
        if display is None:
            if ended:
                click.echo("".join(f"{line}\n" for line in ended), nl=False, err=True)
            return
        from rich.console import Group
        from rich.text import Text

        for line in ended:  # above the live area, for good
            display.console.print(Text(line))
        slowest = slowest_line(history, now) if run.started else None
        if slowest is not None:
            live_lines.append(f"  {slowest}")
        display.update(
            Group(*(Text(line, no_wrap=True, overflow="ellipsis") for line in live_lines)),
            refresh=True,
        )


def _same_terminal(out: Any, err: Any) -> bool:
    """Whether ``out`` is a terminal as ``err`` is (then the flow's stdout may go above the
    live area without leaving the screen it was meant for)."""
    try:
        return bool(out.isatty() and err.isatty())
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False
