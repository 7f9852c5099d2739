"""What a run gives back: ``RunResult``, ``RunHandle`` to wait for it, and ``Progress``, how far
it has got, read from its log."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._clock import utcnow
from .errors import ThreadflowError
from .events import RunHistory, RunningAttempt

if TYPE_CHECKING:
    from .store import Follower

#: How many of the oldest running attempts a :class:`Progress` names.
SLOWEST = 5


@dataclass
class RunResult:
    """The end of a run.

    :ivar outcome: ``"all_over"``, ``"failed_over"``, ``"cancelled"`` (``cancel()`` ended it)
        or ``"interrupted"`` (``stop()`` or a failure of the engine ended it); the last two can
        be replayed.
    :ivar run_id: the run's id in the store.
    :ivar state: the run's state, including every change the final callbacks made.
    :ivar task: the task that could not be retried (``("fetch",)`` or ``("fetch", child_id)``),
        or None.
    :ivar error: the last error of that task, or None.
    :ivar failed: tasks that used up their attempts but were tolerated (``exit_on_failed=False``).
    """

    outcome: str
    run_id: str
    state: dict[str, Any]
    task: tuple[Any, ...] | None = None
    error: BaseException | None = None
    failed: list[tuple[Any, ...]] = field(default_factory=list)

    def as_tuple(self) -> tuple[Any, ...]:
        """The seed's shape: ``("all_over", state)`` or
        ``("failed_over", ("can_not_retry", task, state))``; ``("interrupted", state)`` after
        ``stop()``."""
        if self.outcome == "failed_over":
            return ("failed_over", ("can_not_retry", self.task, self.state))
        return (self.outcome, self.state)

    def __repr__(self) -> str:
        extra = f", task={self.task!r}, error={self.error!r}" if self.task else ""
        return f"RunResult(outcome={self.outcome!r}, run_id={self.run_id!r}{extra})"


@dataclass(frozen=True)
class TaskProgress:
    """One task of a run, in a :class:`Progress`: its stage, and its children counted once each
    over every segment of the run (the numbers of ``threadflow runs`` and ``show --summary``).

    :ivar name: the task's name.
    :ivar state: ``"waiting"`` (not started), ``"running"``, ``"over"`` (the task and all its
        children are done), ``"failed"`` (it failed the run, or its parent used up its
        attempts) or ``"stopped"`` (unfinished in a run that is no longer running).
    :ivar total: the children it has so far (it grows while its parent adds them): those added
        by attempts that succeeded or still run.
    :ivar done: children that succeeded, in this segment or an earlier one.
    :ivar failed: children whose last outcome is a failure (tolerated ones included).
    :ivar running: child attempts running now.
    :ivar attempts: parent attempts started.
    :ivar seconds: how long the stage has been running, in every segment (the pauses between
        segments not counted).
    """

    name: str
    state: str
    total: int = 0
    done: int = 0
    failed: int = 0
    running: int = 0
    attempts: int = 0
    seconds: float = 0.0

    @property
    def finished(self) -> int:
        """Children that will not run again in this run: ``done + failed``."""
        return self.done + self.failed


@dataclass(frozen=True)
class Progress:
    """How far a run has got, read from its log: what ``RunHandle.progress()`` returns.

    Every number is the fold of the run's events, so it agrees with ``threadflow runs``, ``show
    --summary``, the timeline and the progress lines of ``threadflow run``; and it covers every
    segment: a replayed run counts the children that earlier segments finished (its counters
    do not restart at 0).

    :ivar run_id: the run.
    :ivar status: ``"running"``, or the run's outcome (``"all_over"``, ``"failed_over"``,
        ``"cancelled"``, ``"interrupted"``); ``"interrupted"`` also for a run whose process is
        gone.
    :ivar segments: the first run and each replay so far.
    :ivar total: children of all tasks (see :attr:`TaskProgress.total`).
    :ivar done: of those, succeeded.
    :ivar failed: of those, failed (tolerated included).
    :ivar running: child attempts running now.
    :ivar tasks: every task of the flow by name, in the order the flow declares them (those
        not started yet included, ``"waiting"``).
    :ivar slowest: the oldest attempts running now, parents' and children's, oldest first (at
        most :data:`SLOWEST`): what the run is waiting on.
    :ivar seconds: how long the run has been running so far, in every segment.
    :ivar at: when it was read (ISO 8601, UTC).
    """

    run_id: str
    status: str
    segments: int = 0
    total: int = 0
    done: int = 0
    failed: int = 0
    running: int = 0
    tasks: dict[str, TaskProgress] = field(default_factory=dict)
    slowest: tuple[RunningAttempt, ...] = ()
    seconds: float = 0.0
    at: str = ""

    @property
    def finished(self) -> int:
        """Children that will not run again in this run: ``done + failed``."""
        return self.done + self.failed

    @classmethod
    def of(cls, history: RunHistory, status: str, now: str | None = None) -> Progress:
        """The progress a fold tells, ``status`` being the run's (``EventStore.status``)."""
        now = now or utcnow().isoformat()
        live = status == "running"
        names = list(history.definition or {})
        names += [name for name in history.tasks if name not in names]
        tasks: dict[str, TaskProgress] = {}
        for name in names:
            t = history.tasks.get(name)
            if t is None:
                tasks[name] = TaskProgress(name, "waiting")
                continue
            failing = history.outcome == "failed_over" and (history.task or (None,))[0] == name
            if t.all_over:
                state = "over"
            elif t.parent == "failed" or failing:
                state = "failed"
            else:
                state = "running" if live else "stopped"
            tasks[name] = TaskProgress(
                name,
                state,
                t.children_added,
                t.children_done,
                t.children_failed,
                t.children_running if live else 0,
                t.attempts,
                history.task_seconds(name, now if live else None),
            )
        seconds = history.active_between(history.first_ts, now, live=True) if live else None
        return cls(
            history.run_id,
            status,
            history.segments,
            sum(t.total for t in tasks.values()),
            sum(t.done for t in tasks.values()),
            sum(t.failed for t in tasks.values()),
            sum(t.running for t in tasks.values()),
            tasks,
            tuple(history.running_attempts(now, SLOWEST)) if live else (),
            seconds if seconds is not None else history.active or 0.0,
            now,
        )


def settle(handle: RunHandle, result: RunResult | None, exc: BaseException | None = None) -> None:
    """Give ``handle`` its result (the engine's side of ``RunHandle.result``)."""
    handle._set(result, exc)


class RunHandle:
    """A run that was started: its id, and its ``RunResult`` once it ends.

    :ivar run_id: the run's id in the store.
    :ivar start_time: when it started (aware UTC datetime).
    :ivar store: the ``EventStore`` of its log (None for a handle made by hand).
    """

    def __init__(
        self,
        run_id: str,
        start_time: Any,
        store: Any = None,
        canceller: Callable[[str, str], None] | None = None,
    ) -> None:
        self.run_id = run_id
        self.start_time = start_time
        self.store = store
        self._canceller = canceller
        self._done = threading.Event()
        self._result: RunResult | None = None
        self._exc: BaseException | None = None
        #: Segments the run had before this handle's (a replay's handle: the earlier ones).
        self.segments_before = 0
        self._follower: Follower | None = None
        self._follow_lock = threading.Lock()  # one progress() reads the follower at a time
        # Called once the run has ended (a schedule waking up to start the next run): guarded
        # by _done_lock so that a callback added as the run ends is called exactly once.
        self._done_lock = threading.Lock()
        self._when_done: list[Callable[[RunHandle], None]] = []

    def progress(self) -> Progress:
        """How far the run has got: children done, failed, running and in all, overall and per
        task, and the oldest attempts running, read from the store (see :class:`Progress`).

        Cheap enough for a GUI timer: the first call folds the log (SQLite counts its bulk),
        each later one only the events written since. Any thread may call it; it never touches
        the server's threads. A replayed run's counts include what earlier segments did.

        :raises ThreadflowError: for a handle without a store (one made by hand).
        """
        if self.store is None:
            raise ThreadflowError(
                f"run {self.run_id}: this RunHandle has no store to read its progress from; "
                "use the handle start_flow() or replay() returned"
            )
        with self._follow_lock:
            if self._follower is None:
                self._follower = self.store.follow(self.run_id)
            follower = self._follower
            history = follower.update()
            # A handle of this process knows its end; a remote one asks the run's owner row.
            ended = self._result.outcome if self._done.is_set() and self._result else None
            if history.segments <= self.segments_before:
                # This handle's segment is not in the log yet: the run is starting.
                status = ended or "running"
            else:
                status = history.outcome or ended or follower.status() or "running"
            if ended is not None and history.outcome is not None:
                follower.close()  # the log is final: no connection kept open for it
            return Progress.of(history, status)

    def cancel(self, reason: str = "cancelled") -> None:
        """Cancel this run, without stopping its server; returns at once.

        Every running attempt is cancelled (its token; a subprocess attempt's process is
        killed; a remote attempt's future cancelled), the run ends ``"cancelled"`` (a
        ``cancelled`` event; it can be replayed) and ``result()`` returns that outcome. A run
        that has already ended keeps its result.
        """
        if self._canceller is not None and not self.done():
            self._canceller(self.run_id, reason)

    def done(self) -> bool:
        """True once the run has ended."""
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> RunResult:
        """Wait for the run's result.

        :raises TimeoutError: if the run has not ended within ``timeout`` seconds.
        :raises ThreadflowError: if the engine itself failed and could not finish the run.
        """
        if not self._done.wait(timeout):
            raise TimeoutError(f"run {self.run_id} has not ended after {timeout} s")
        if self._exc is not None:
            raise self._exc
        assert self._result is not None
        return self._result

    def _set(self, result: RunResult | None, exc: BaseException | None = None) -> None:
        self._result, self._exc = result, exc
        with self._done_lock:
            self._done.set()
            callbacks, self._when_done = self._when_done, []
        for callback in callbacks:
            callback(self)

    def _call_when_done(self, callback: Callable[[RunHandle], None]) -> None:
        """Call ``callback(self)`` once the run has ended: at once if it has, else on the
        thread that ends it (the coordinator's: the callback must be quick and must not
        raise, as setting an ``Event`` is)."""
        with self._done_lock:
            if not self._done.is_set():
                self._when_done.append(callback)
                return
        callback(self)

    def __repr__(self) -> str:
        return f"<RunHandle {self.run_id} {'done' if self.done() else 'running'}>"
