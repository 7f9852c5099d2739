"""What the live dashboard (``threadflow ui``) shows of a store, read from its log.

Every number and state here is the one fold's: a run's progress is :meth:`Progress.of` a
:class:`~threadflow.store.Follower`'s history (what ``handle.progress()`` returns), the runs
list is :meth:`EventStore.runs` (what ``threadflow runs`` prints), the chart is
:func:`threadflow.timeline.build` (what ``threadflow timeline`` draws), and the failed attempts
are the run's ``exit`` and ``timeout`` events (what ``threadflow show --kind exit`` lists).
Nothing here reads a table of the store itself; nothing writes to it.

The pages poll this module's JSON every :data:`POLL` seconds. A poll that finds nothing new in
the log costs one small query: the follower folds only the events written since the last poll,
and the chart and the failures are rebuilt only when the log has grown. Rebuilding them reads
the run's whole log; for a run so big that this takes long, they are rebuilt at most once per
:data:`REBUILD_FACTOR` times what the last rebuild took (the counts stay live meanwhile), so
the dashboard never takes more than a fraction of a core from the flow it watches.

Any thread may call a :class:`Dashboard` (the web server calls it from a pool of threads).
"""

from __future__ import annotations

import heapq
import os
import shlex
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain
from typing import Any

from ._clock import monotonic, utcnow
from .events import EXIT, TIMEOUT, Event, RunHistory
from .result import Progress
from .store import EventStore, Follower
from .timeline import MAX_ROWS, Timeline, build

#: Seconds between two polls of a page.
POLL = 1.0
#: Runs the runs list shows, newest first.
RUNS_SHOWN = 50
#: Failed attempts a run page shows, newest first.
FAILURES_SHOWN = 20
#: A rebuild of what reads a whole log waits at least this many times what the last one took.
REBUILD_FACTOR = 4.0
#: Runs whose fold is kept between polls (each keeps one read-only connection).
FOLLOWED = 16
#: Statuses after which ``threadflow replay`` can take a run up again.
REPLAYABLE = ("failed_over", "interrupted", "cancelled")


def replay_command(run_id: str, path: str) -> str:
    """``threadflow replay RUN --db PATH``, quoted for a POSIX shell."""
    return f"threadflow replay {shlex.quote(run_id)} --db {shlex.quote(path)}"


@dataclass(frozen=True)
class RunLine:
    """One run of the runs list: its row's facts and its :class:`Progress`."""

    run_id: str
    flow: str
    started: str | None
    progress: Progress

    @property
    def status(self) -> str:
        return self.progress.status


@dataclass(frozen=True)
class Failure:
    """An attempt that raised (``exit``) or timed out (``timeout``), as its event tells it.

    :ivar child: whether it was a child's attempt (``child_id`` may be None for a child).
    :ivar error: the stored error: ``type``, ``message``, ``traceback``.
    """

    seq: int
    ts: str
    kind: str
    task: str
    child_id: Any
    child: bool
    attempt: int | None
    error: dict[str, Any]

    @classmethod
    def of(cls, ev: Event) -> Failure:
        error = (ev.data or {}).get("error")
        return cls(
            ev.seq,
            ev.ts,
            ev.kind,
            ev.task or "",
            ev.child_id,
            ev.ref is not None,
            ev.attempt,
            error if isinstance(error, dict) else {"message": "" if error is None else error},
        )


@dataclass(frozen=True)
class RunView:
    """Everything a run's page shows.

    :ivar progress: the counts, from the fold as of this poll.
    :ivar flow: the run's flow, and the rest as that fold tells: ``entrance``, ``started``,
        the task that failed the run (``("fetch",)`` or ``("fetch", child_id)``) and its
        ``error``.
    :ivar timeline: the chart's model, from the log as of its last rebuild.
    :ivar failures: the newest failed attempts (at most :data:`FAILURES_SHOWN`), newest first.
    :ivar failed_attempts: how many attempts failed in all (the fold's exits and timeouts).
    :ivar replay: the command that replays the run, once it can be replayed; else None.
    """

    run_id: str
    path: str
    progress: Progress
    flow: str | None
    entrance: str | None
    started: str | None
    failed_task: tuple[Any, ...] | None
    error: dict[str, Any] | None
    timeline: Timeline
    failures: tuple[Failure, ...]
    failed_attempts: int
    replay: str | None

    @property
    def status(self) -> str:
        return self.progress.status


def newest_failures(store: EventStore, run_id: str, limit: int) -> list[Failure]:
    """The run's newest ``limit`` failed attempts, newest first, streamed from its ``exit``
    and ``timeout`` events (memory bounded by ``limit``)."""
    events: Iterator[Event] = chain(
        store.iter_events(run_id, EXIT), store.iter_events(run_id, TIMEOUT)
    )
    return [Failure.of(ev) for ev in heapq.nlargest(limit, events, key=lambda ev: ev.seq)]


class _Followed:
    """One run between polls: its follower, and the parts that read its whole log."""

    def __init__(self, follower: Follower) -> None:
        self.follower = follower
        self.lock = threading.Lock()  # one poll of this run at a time
        self.key: tuple[int, str] | None = None  # (last seq, status) the parts were built at
        self.timeline: Timeline | None = None
        self.failures: tuple[Failure, ...] = ()
        self.built_at = 0.0
        self.took = 0.0


class Dashboard:
    """The dashboard of one store file: the runs list and the run pages' contents.

    :param path: the store file (checked to be one by its first reader).
    """

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.store = EventStore(self.path)
        self._lock = threading.Lock()  # guards _runs
        self._runs: OrderedDict[str, _Followed] = OrderedDict()
        # Held while the runs list is folded (which may take a while): guards its cache, and
        # makes polls of the list that come meanwhile wait for that fold and take it.
        self._list_lock = threading.Lock()
        self._list: list[RunLine] | None = None
        self._list_at = 0.0
        self._list_took = 0.0

    # -- the runs list

    def runs(self, limit: int = RUNS_SHOWN) -> list[RunLine]:
        """The newest ``limit`` runs, newest first, with their progress.

        While folding them takes long (many big runs), a poll may get the list of a moment ago.
        """
        with self._list_lock:
            now = monotonic()
            cached = self._list
            if cached is not None and now - self._list_at < REBUILD_FACTOR * self._list_took:
                return cached
            at = utcnow().isoformat()
            infos = self.store.runs(limit=limit)
            lines = [
                RunLine(
                    i.run_id,
                    i.flow,
                    i.started,
                    Progress.of(i.history or RunHistory(i.run_id), i.status, at),
                )
                for i in reversed(infos)
            ]
            self._list, self._list_at, self._list_took = lines, now, monotonic() - now
            return lines

    # -- a run

    def run_id(self, prefix: str) -> str:
        """The id of the run that ``prefix`` names.

        :raises RunNotFound: if none, or several, do.
        """
        return self.store.run_id(prefix)

    def run(self, run_id: str, max_rows: int = MAX_ROWS) -> RunView:
        """What the page of run ``run_id`` (a full id) shows now."""
        followed = self._followed(run_id)
        with followed.lock:
            history = followed.follower.update()
            status = followed.follower.status() or "running"
            key = (history.last_seq, status)
            now = monotonic()
            stale = followed.timeline is None or (
                key != followed.key and now - followed.built_at >= REBUILD_FACTOR * followed.took
            )
            if stale:
                rows = self.store.iter_rows(run_id)
                followed.timeline = build(rows, run_id, status=status, max_rows=max_rows)
                followed.failures = tuple(newest_failures(self.store, run_id, FAILURES_SHOWN))
                followed.key, followed.built_at = key, now
                followed.took = monotonic() - now
            assert followed.timeline is not None
            progress = Progress.of(history, status)
            failed = sum(t.exits + t.timeouts for t in history.tasks.values())
            return RunView(
                run_id,
                self.path,
                progress,
                history.flow,
                history.entrance,
                history.started,
                history.task,
                history.error,
                # Running attempts are drawn up to now, not only to the last event: a child
                # stuck for minutes logs nothing, and its bar must still grow.
                followed.timeline.reaching(utcnow().isoformat()),
                followed.failures,
                failed,
                replay_command(run_id, self.path) if status in REPLAYABLE else None,
            )

    def _followed(self, run_id: str) -> _Followed:
        """The run's :class:`_Followed`, made if needed; the least recently polled of more than
        :data:`FOLLOWED` runs is let go (its connection closed)."""
        with self._lock:
            followed = self._runs.get(run_id)
            if followed is None:
                followed = self._runs[run_id] = _Followed(self.store.follow(run_id))
            self._runs.move_to_end(run_id)
            gone = []
            while len(self._runs) > FOLLOWED:
                gone.append(self._runs.popitem(last=False)[1])
        for old in gone:
            old.follower.close()
        return followed

    def close(self) -> None:
        """Close the followers' connections."""
        with self._lock:
            runs, self._runs = list(self._runs.values()), OrderedDict()
        for followed in runs:
            followed.follower.close()
