"""The coordinator: the one thread that owns a server's run state and decides what runs next.

Everything that changes run state happens here, on this thread: workers and callers talk to it
only through its inbox. One loop turn: take a batch of messages, fire due deadlines, start what
may start, then ``_flush``: commit the turn's events in one transaction, fire their signals in
order, submit the new attempts, answer the workers waiting on ``add_children_tasks``, deliver
finished runs. A signal therefore always sees its event in the store, and a task always sees
the state changes its ``task_start`` callbacks made.
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import math
import os
import queue
import socket
import sqlite3
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from types import MappingProxyType
from typing import Any

from blinker import NamedSignal

from . import signals
from ._clock import monotonic, utcnow, wall
from .cancel import CancelToken, current_context
from .definition import RESERVED, FlowDefinition, TaskSpec, check_code, check_same_flow
from .errors import (
    CancelledError,
    DuplicateChildError,
    FlowRunning,
    NoRetry,
    TaskTimeout,
    ThreadflowError,
)
from .events import HEARTBEAT, RunHistory, decode_id, describe, error_data, error_json, safe_repr
from .executors import batching_pools, make_pools
from .isolation import ThreadPool, run_attempt
from .messages import (
    AddChildren,
    CancelRun,
    Carried,
    Done,
    Message,
    Pool,
    ReplayRun,
    Reply,
    ResumeRuns,
    StartRun,
    Stop,
)
from .processes import ProcessPool
from .remote import check_request
from .result import RunHandle, RunResult, settle
from .server import ServerCore, Settings, replay_refusal
from .store import EventStore, Writer

log = logging.getLogger("threadflow")

#: Messages taken per loop turn at most, so that commits and deadlines stay regular under load.
BATCH = 10_000
#: Seconds a loop turn may spend taking messages (a chunk of children is one message).
TURN = 0.005
#: Waiting children read from the store per refill of a stage's window.
WINDOW = 512
#: Seconds between looks for runs that other processes asked of a global server.
POLL = 0.2
#: Seconds between looks for a cancel of the current run asked by another process.
CANCEL_LOOK = 0.25
#: Seconds during which successive turns share one event timestamp.
STAMP_REUSE = 0.001
#: Longest single wait of the loop (a deadline further away is waited for in several).
MAX_WAIT = 3600.0


class Run:
    """One run of the flow; lives from its ``start`` message to its final event."""

    __slots__ = ("run_id", "handle", "state", "view", "waiting", "stages", "open", "failed", "over")

    def __init__(self, handle: RunHandle, state: dict[str, Any], waiting: dict[str, set[str]]):
        self.run_id = handle.run_id
        self.handle = handle
        self.state = state
        self.view = MappingProxyType(state)  # what task functions get: read-only, live
        self.waiting = waiting  # task -> predecessors (reachable in this run) not yet all over
        self.stages: dict[str, Stage] = {}
        self.open = 0  # stages started and not yet all over
        self.failed: list[tuple[Any, ...]] = []
        self.over = False


class Stage:
    """A task of a run: its parent attempt, and the queue and running set of its children.

    Waiting children stay in the store: ``ranges`` holds seq ranges of released
    ``child_added`` rows, ``buffer`` a small window read from them. ``running`` is in the order
    the coordinator learnt of each start, and all attempts of a task have the same timeout, so
    its first entry holds the stage's next deadline -- except that a child a worker started by
    hand-over is learnt of up to one inbox delay late, so its deadline may come that much
    before an entry ahead of it: its timeout is then seen that much late (measured p99 18 ms
    under a 100k-child load, tools/bench.py --only timeout).
    """

    __slots__ = (
        "name",
        "spec",
        "run",
        "cap",
        "parent",
        "parent_done",
        "ranges",
        "buffer",
        "retry_ready",
        "running",
        "delayed",
        "done",
        "failed",
        "over",
        "replayed",
        "standby",
        "parent_pool",
        "pool",
        "handover",
        "interval",
    )

    def __init__(self, name: str, spec: TaskSpec, run: Run, pools: tuple[Pool, Pool]) -> None:
        self.name = name
        self.spec = spec
        self.run = run
        self.parent_pool, self.pool = pools  # where the parent's and the children's attempts run
        self.cap: int = spec.max_concurrency or os.cpu_count() or 1
        self.parent: Attempt | None = None
        self.parent_done = False
        self.ranges: deque[list[int]] = deque()
        self.buffer: deque[tuple[int, str, str]] = deque()
        self.retry_ready: deque[tuple[str | None, int | None, str | None, int]] = deque()
        self.running: OrderedDict[int, Attempt] = OrderedDict()
        self.delayed = 0  # retries waiting for their delay
        self.done = 0
        self.failed = 0
        self.over = False
        self.replayed = False  # its children window skips children that already finished
        # Children made ready to start, not started: a worker that finishes a child of this
        # stage takes the next one from here at once, handing its slot over without waiting
        # for a coordinator turn (the outcome message tells the coordinator). Filled only
        # while nobody listens to task_start, which must fire before an attempt starts, and
        # only for children run by the server's own threads (an executor gets one submission
        # per attempt), and never for a rate-limited stage (see handover below).
        self.standby: deque[Attempt] = deque()
        # Seconds at least between two starts of its children (rate_limit), 0.0 for none.
        self.interval = spec.rate_interval
        # A rate-limited stage never hands over: only the coordinator, which keeps the pace,
        # may start its children.
        self.handover = (
            isinstance(self.pool, ThreadPool) and spec.isolation == "thread" and not self.interval
        )


class Attempt:
    """One attempt, identified by ``uid``; also the worker thread's context while it runs."""

    __slots__ = (
        "uid",
        "run",
        "stage",
        "coord",
        "child_json",
        "ref",
        "data",
        "number",
        "token",
        "deadline",
        "held",
        "abandoned",
        "returned",
        "worker",
    )

    def __init__(
        self,
        uid: int,
        stage: Stage,
        coord: Coordinator,
        child_json: str | None,
        ref: int | None,
        data: str | None,
        number: int,
    ) -> None:
        self.uid = uid
        self.run = stage.run
        self.stage = stage
        self.coord = coord
        self.child_json = child_json  # None for the parent attempt
        self.ref = ref  # seq of the child's child_added event
        self.data = data  # the child_added data (payload)
        self.number = number
        self.token = CancelToken()
        self.deadline: float | None = None  # set when submitted
        self.held: list[list[int]] = []  # seq ranges of children this attempt added
        self.abandoned = False
        self.returned = False  # written once, by the worker, when user code has returned
        self.worker: str | None = None  # name of the thread that runs it (set by that thread)

    # -- AttemptContext: what task code reaches in the worker thread -------------------------

    @property
    def task_name(self) -> str:
        return self.stage.name

    @property
    def run_id(self) -> str:
        return self.run.run_id

    @property
    def has_children(self) -> bool:
        return self.stage.spec.child_task_func is not None

    @property
    def codec(self) -> Any:
        return self.coord.definition.codec

    def send_children(self, ids: list[str], datas: list[str], final: bool) -> Reply:
        reply = Reply()
        self.coord.post(AddChildren(self.uid, ids, datas, reply, final))
        return reply

    def engine_alive(self) -> bool:
        return self.coord.alive()

    def task(self) -> tuple[Any, ...]:
        if self.child_json is None:
            return (self.stage.name,)
        return (self.stage.name, decode_id(self.child_json))


def _receiver_name(receiver: Any) -> str:
    name = getattr(receiver, "__qualname__", None)
    return name if isinstance(name, str) else safe_repr(receiver, 200)


def _state_receiver(method: Callable[..., Any]) -> Callable[..., None]:
    def receive(sender: Any, **kw: Any) -> None:
        method(kw["state"])

    return receive


def _task_receiver(method: Callable[..., Any]) -> Callable[..., None]:
    def receive(sender: Any, **kw: Any) -> None:
        method(kw["task"], kw["state"])

    return receive


class Coordinator:
    """A server's coordinator thread and everything it owns."""

    def __init__(
        self,
        core: ServerCore,
        definition: FlowDefinition,
        path: str,
        settings: Settings,
        return_to: Any,
        placed: dict[str, Any],
        extra_state: dict[str, Any],
        handlers: list[tuple[NamedSignal, Callable[..., Any]]],
    ) -> None:
        """
        :param core: the server's name, run slot and stopped flag (the coordinator takes and
            frees the slot for runs other processes ask for, and closes it at the end).
        :param handlers: ``(signal, method)`` of the flow's overridden ``handle_*`` callbacks.
        """
        self.core = core
        self.sender = core.flow  # the sender of every signal of this server
        self.definition = definition
        self.path = path
        self.settings = settings
        self.store = EventStore(path)
        self.return_to = return_to
        self.extra = dict(extra_state)
        self.grace = settings.abandon_grace
        self.fsync = settings.fsync
        self.commit_every = settings.commit_every
        self._flow_handlers = handlers
        self.inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self.post = self.inbox.put
        name = str(core.name)
        self.threads = ThreadPool(name)  # starts no thread until it is given work
        # Task name -> (parent pool, child pool): where its attempts run (placed by start_link).
        self._pools = make_pools(placed, self.threads)
        # Pools that send a turn's attempts together (Dask): flushed at the end of each turn.
        self._batching = batching_pools(self._pools)
        self.procs = ProcessPool(self)  # subprocess attempts; starts processes only when needed
        self.thread = threading.Thread(
            target=self._main, name=f"threadflow-coordinator-{name}", daemon=True
        )
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        # Abandoned attempts, republished as a new tuple on change so that any thread can read
        # it without a lock; an entry's thread is alive until the worker sets ``returned``.
        self._abandoned: tuple[Attempt, ...] = ()
        self._uids = itertools.count(1)
        self.attempts: dict[int, Attempt] = {}  # current attempts: their outcome counts
        self.cancelled: dict[int, Attempt] = {}  # cancelled, thread not returned yet
        # Retry delays and abandon graces: (when, tie-breaker, "retry", (stage, retry item)) or
        # (when, tie-breaker, "grace", attempt uid).
        self._heap: list[tuple[float, int, str, Any]] = []
        self._hseq = itertools.count()
        # Rate limits: task name -> the monotonic time from which the next child of that task
        # may start. Charged in _flush when a child is submitted, read in _dispatch and
        # _wait_time; kept from run to run, so that a run or replay right after another does
        # not start with a burst.
        self._next_start: dict[str, float] = {}
        self._rated = any(spec.rate_interval for spec in definition.tasks.values())
        self.run: Run | None = None
        self.now = 0.0
        self._ts: str | None = None
        self._last_ts: str | None = None  # the latest stamp, and when (monotonic) it was made
        self._ts_at = 0.0
        self._stop_at: float | None = None
        self._exit = False
        # Work of the current turn, done in _flush after the commit.
        self._rows: list[tuple[Any, ...]] = []
        # task_started rows of child attempts, written only at the next commit, for those still
        # running then: a child that starts and succeeds between two commits gets one row,
        # task_ran, instead of two (half the log's rows for short children). Invariant: an
        # entry is an attempt in self.attempts; _detach writes its row if it ends otherwise.
        self._starts: dict[int, tuple[Any, ...]] = {}
        self._starts_since = 0.0  # when the oldest entry of _starts was made (monotonic)
        self._sigs: list[tuple[NamedSignal, dict[str, Any]]] = []
        self._submit: list[Attempt] = []
        self._replies: list[Reply] = []
        # Results decided this turn, delivered once their final event is committed.
        self._after: list[tuple[RunHandle, RunResult]] = []
        # Results whose final event is committed, being delivered (what _crash must not lose).
        self._delivering: list[tuple[RunHandle, RunResult]] = []
        self._handlers: list[tuple[NamedSignal, Callable[..., None]]] = []
        self._host = socket.gethostname()
        name_ = core.name
        #: The global name this server owns in its store, or None for a local name.
        self._global: str | None = name_[1] if isinstance(name_, tuple) else None
        self._next_beat = 0.0  # when to renew the run's (and global name's) lease
        self._next_poll = 0.0  # when to look for runs other processes asked of a global name
        self._commit_now = False
        self._requests_broken = False  # warned once that the requests table cannot be read
        self._next_cancel_look = 0.0  # when to look for a cancel of the run asked elsewhere
        self._resume: deque[RunHandle] = deque()  # interrupted runs to replay, oldest first
        self._resume_on_change = "refuse"  # what those whose code changed do (ResumeRuns)

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._connect_handlers()
        self.thread.start()
        self._ready.wait()
        if self._start_error is not None:
            self._disconnect_handlers()
            raise self._start_error

    @property
    def abandoned(self) -> int:
        """Abandoned attempts whose thread is still running user code (any thread may ask)."""
        return sum(1 for att in self._abandoned if not att.returned)

    def _abandon(self, att: Attempt) -> None:
        att.abandoned = True
        self._abandoned = (*self._abandoned, att)
        log.warning(
            "threadflow: abandoned task %r attempt %d of run %s: cancelled (%s) and still "
            "running in thread %s; its outcome will be ignored",
            att.task(),
            att.number,
            att.run.run_id,
            att.token.reason,
            att.worker or "(not started, or in a remote executor)",
        )
        self._event(
            att.run.run_id, "abandoned", att.stage.name, att.child_json, att.number, att.ref
        )

    def alive(self) -> bool:
        return self.thread.is_alive()

    def ask_cancel(self, run_id: str, reason: str) -> None:
        """Cancel run ``run_id`` if it is this server's current run (any thread)."""
        self.post(CancelRun(run_id, reason))

    def stop(self, grace: float, timeout: float | None) -> None:
        """Stop the server (any thread): no new runs, attempts cancelled, then wait.

        Waits up to ``timeout`` for this thread to end, except when called from this very
        thread (a callback) or from inside one of the server's attempts: either would wait
        for itself, so the stop goes on without the caller.
        """
        if self.core.request_stop():
            self.post(Stop(grace))
        ctx = current_context()
        inside = isinstance(ctx, Attempt) and ctx.coord is self
        if threading.current_thread() is self.thread or inside:
            return
        self.thread.join(timeout)

    def _connect_handlers(self) -> None:
        for sig, method in self._flow_handlers:
            make = (
                _state_receiver if sig in (signals.start_flow, signals.all_over) else _task_receiver
            )
            receiver = make(method)
            # Held strongly: a weakly held closure would vanish at once.
            sig.connect(receiver, sender=self.sender, weak=False)
            self._handlers.append((sig, receiver))

    def _disconnect_handlers(self) -> None:
        for sig, receiver in self._handlers:
            # From every sender: blinker keeps a receiver disconnected from one sender only in
            # NamedSignal.receivers, which would keep this server alive for ever.
            sig.disconnect(receiver)
        self._handlers.clear()

    def _main(self) -> None:
        try:
            self.writer = Writer(self.path, fsync=self.fsync)
        except BaseException as exc:
            self._start_error = exc
            self._ready.set()
            return
        if self._global is not None:
            try:
                self.writer.acquire_server(
                    self._global,
                    self.definition.name,
                    os.getpid(),
                    self._host,
                    utcnow().isoformat(),
                )
            except BaseException as exc:
                self.writer.close()
                self._start_error = exc
                self._ready.set()
                return
        self._next_beat = monotonic() + HEARTBEAT
        self._ready.set()
        try:
            self._loop()
        except BaseException as exc:
            log.critical("threadflow: coordinator of %r failed", self.core.name, exc_info=True)
            self._crash(exc)
        finally:
            self.threads.shutdown()  # the user's executors are the user's to shut down
            self.procs.shutdown()
            try:
                if self._global is not None:
                    self.writer.release_server(self._global, os.getpid())
                    self.writer.commit()
                self.writer.close()
            except Exception:  # pragma: no cover - closing a broken connection
                log.exception("threadflow: closing the store failed")
            self._disconnect_handlers()
            for handle in self._resume:  # runs start_link(resume=True) did not get to
                settle(
                    handle,
                    None,
                    ThreadflowError(
                        f"server {self.core.name!r} stopped before it resumed run "
                        f"{handle.run_id}; it stays interrupted, replay it later"
                    ),
                )
            self._resume.clear()
            orphan = self.core.close()
            if orphan is not None:
                # A start or replay taken just before the server stopped (after a crash):
                # nobody else will answer it.
                self._deliver(
                    orphan,
                    RunResult(
                        "interrupted",
                        orphan.run_id,
                        {},
                        error=ThreadflowError(
                            f"server {self.core.name!r} stopped before run {orphan.run_id} "
                            "began; start it again on a new server"
                        ),
                    ),
                )

    def _loop(self) -> None:
        get, get_nowait = self.inbox.get, self.inbox.get_nowait
        handle = self._handle
        while not self._exit:
            wait = self._wait_time()
            try:
                msg = get(timeout=wait) if wait is None or wait > 0 else get_nowait()
            except queue.Empty:
                msg = None
            self.now = monotonic()
            self._ts = None
            taken = 0
            # A turn ends after BATCH messages or TURN seconds, whichever first, so that
            # deadlines are looked at often even while workers keep the inbox full.
            until = self.now + TURN
            while msg is not None:
                handle(msg)
                taken += 1
                if taken >= BATCH or monotonic() >= until:
                    break
                try:
                    msg = get_nowait()
                except queue.Empty:
                    msg = None
            # Not in the turn the run before ended: its slot is free once its result is out.
            if self._resume and self.run is None and not self._after and self._stop_at is None:
                self._resume_next()
            self._fire_due()
            self._dispatch()
            self._tick()
            self._flush()
            if self._stop_at is not None:
                self._maybe_finish_stop()

    def _wait_time(self) -> float | None:
        if self._resume and self.run is None and not self._after and self._stop_at is None:
            return 0.0  # the next run to resume starts at once
        when: float | None = self._heap[0][0] if self._heap else None
        run = self.run
        if run is not None:
            for stage in run.stages.values():
                for att in (stage.parent, next(iter(stage.running.values()), None)):
                    if att is not None and att.deadline is not None:
                        when = att.deadline if when is None else min(when, att.deadline)
        if self._rated and run is not None and self._stop_at is None:
            at = self._rate_wake(run)
            if at is not None:
                when = at if when is None else min(when, at)
        if self._stop_at is not None:
            when = self._stop_at if when is None else min(when, self._stop_at)
        if run is not None or self._global is not None:
            when = self._next_beat if when is None else min(when, self._next_beat)
        if self._global is not None:
            when = min(when, self._next_poll)  # type: ignore[type-var]
        if run is not None:
            when = self._next_cancel_look if when is None else min(when, self._next_cancel_look)
        if self.writer.in_transaction:
            commit_at = self.writer.opened + self.commit_every
            when = commit_at if when is None else min(when, commit_at)
        if self._starts:
            commit_at = self._starts_since + self.commit_every
            when = commit_at if when is None else min(when, commit_at)
        # Capped: a far deadline (a timeout of 1e10 s) would overflow the platform's wait.
        return None if when is None else max(0.0, min(when - monotonic(), MAX_WAIT))

    def _tick(self) -> None:
        """Renew leases; look for a cancel of the run asked by another process; answer runs
        that other processes asked of a global server."""
        now = self.now
        run = self.run
        if run is not None and now >= self._next_cancel_look and self._stop_at is None:
            self._next_cancel_look = now + CANCEL_LOOK
            reason = self.writer.cancel_requested(run.run_id)
            if reason is not None:
                self._on_cancel_run(run.run_id, reason)
        if now >= self._next_beat and (self.run is not None or self._global is not None):
            run_id = self.run.run_id if self.run is not None else None
            self.writer.heartbeat(run_id, self._global, os.getpid())
            self._next_beat = now + HEARTBEAT
        if self._global is not None and now >= self._next_poll and self._stop_at is None:
            self._next_poll = now + POLL
            try:
                pending = self.writer.pending_requests(self._global)
            except sqlite3.Error:  # the table was dropped or mangled by someone who may write
                if not self._requests_broken:
                    log.warning(
                        "threadflow: cannot read the requests of %r in %r; runs asked by "
                        "other processes are not served until the table is readable",
                        self.core.name,
                        self.path,
                        exc_info=True,
                    )
                self._requests_broken = True
                return
            self._requests_broken = False
            for request_id, entrance, run_id, inputs in pending:
                self._on_request(request_id, entrance, run_id, inputs)

    def _on_request(
        self, request_id: int, entrance: object, run_id: object, inputs: object = None
    ) -> None:
        """Start the run another process asked for, or refuse it with a reason.

        The row comes from a table anyone who can write the store may fill: it is checked
        before anything acts on it, and a request that cannot be started (bad values, the store
        refusing the run's writes) is refused and logged, never fatal to this coordinator.
        """
        try:
            run_id, entrance, checked = check_request(self.definition, entrance, run_id, inputs)
            if self.writer.run_exists(run_id):
                raise ValueError(f"the run id {run_id!r} is already used by a run in this store")
            clash = sorted((RESERVED | set(self.extra)) & set(checked))
            if clash:
                raise ValueError(f"the inputs {clash} name entries the server sets in the state")
        except ValueError as bad:
            self._refuse_request(request_id, str(bad))
            return
        try:
            handle = self.core.take_slot(run_id, utcnow(), self.store, self.ask_cancel)
        except FlowRunning as busy:
            message = json.dumps({"run_id": busy.run_id, "start_time": busy.start_time.isoformat()})
            self._answer_refused(request_id, message)
            return
        except ThreadflowError as exc:  # stopped
            self._answer_refused(request_id, str(exc))
            return
        marks = len(self._rows), len(self._sigs), len(self._submit)
        try:
            with self.writer.undo_on_error("request"):
                self._on_start(handle, entrance, checked)
                if not self.writer.answer_request(request_id, "started", None):
                    # Its asker gave up waiting (expired) meanwhile: nobody would wait for it.
                    raise ThreadflowError("the request expired before it could start")
        except Exception as exc:
            # Forget the half-started run: its writes are undone, and nothing of it ran
            # (attempts reach workers, and signals receivers, only in _flush).
            run, self.run = self.run, None  # the slot was free: no other run is going
            for uid in [uid for uid, att in self.attempts.items() if att.run is run]:
                del self.attempts[uid]
            del self._rows[marks[0] :], self._sigs[marks[1] :], self._submit[marks[2] :]
            self.core.release_slot(handle)
            what = "the store" if isinstance(exc, sqlite3.Error) else "threadflow"
            self._refuse_request(request_id, f"{what} failed to start the run: {exc!r}", exc)

    def _refuse_request(
        self, request_id: int, reason: str, error: BaseException | None = None
    ) -> None:
        log.warning(
            "threadflow: refused request %s for %r: %s",
            request_id,
            self.core.name,
            reason,
            exc_info=error,
        )
        self._answer_refused(request_id, reason)

    def _answer_refused(self, request_id: int, message: str) -> None:
        """Write a refusal; if the store refuses even that, the request stays pending (and is
        seen again at the next look) rather than fail this coordinator."""
        try:
            with self.writer.undo_on_error("answer"):
                self.writer.answer_request(request_id, "refused", message)
        except sqlite3.Error:
            log.warning(
                "threadflow: could not answer request %s for %r; it stays pending",
                request_id,
                self.core.name,
                exc_info=True,
            )

    def _crash(self, exc: BaseException) -> None:
        """The loop failed (a store fault, a bug): end every run it owed a result, in the store
        when it can (``interrupted``, so that it can be replayed at once), and to its caller.

        Results whose final event was committed are delivered as decided; any other run is
        delivered ``interrupted`` with the failure as its error: its log ends where the last
        commit left it, which is what a replay continues from.
        """
        what = describe(exc)
        error = ThreadflowError(
            f"the coordinator of server {self.core.name!r} failed ({what['type']}: "
            f"{what['message']}); the run is recorded interrupted: replay it once the cause is "
            "fixed"
        )
        error.__cause__ = exc
        for att in (*self.attempts.values(), *self.cancelled.values()):
            att.token.cancel("stop")
        if self.run is not None:
            self._drain_standby(self.run)
        for reply in self._replies:
            reply.set(CancelledError("stop"))
        self._replies = []
        durable, self._delivering = self._delivering, []
        lost = [(handle, result.state, result.failed) for handle, result in self._after]
        self._after = []
        run, self.run = self.run, None
        if run is not None and not any(handle is run.handle for handle, _, _ in lost):
            lost.append((run.handle, run.state, run.failed))
        self._record_crash([handle.run_id for handle, _, _ in lost], what)
        for handle, result in durable:
            self._deliver(handle, result)
        for handle, state, failed in lost:
            result = RunResult(
                "interrupted", handle.run_id, state, error=error, failed=list(failed)
            )
            self._deliver(handle, result)

    def _record_crash(self, run_ids: list[str], what: dict[str, str]) -> None:
        """Best effort: roll back the failed transaction and mark the runs ``interrupted``.

        If the store refuses even that (a full disk), the runs stay unfinished; their owner is
        then taken for dead once this process exits or its lease (``LEASE``) runs out.
        """
        writer = self.writer
        try:
            writer.rollback()
            data = json.dumps({"reason": "crash", "error": what})
            ts = utcnow().isoformat()
            for run_id in run_ids:
                writer.interrupt_unfinished(run_id, ts, data)
            writer.commit()
        except BaseException:
            log.error(
                "threadflow: could not record runs %s as interrupted after the coordinator "
                "failed; they can be replayed once this process has exited",
                run_ids,
                exc_info=True,
            )
            try:
                writer.rollback()
            except BaseException:  # pragma: no cover - a connection that is gone
                pass

    # -- messages ---------------------------------------------------------------------------

    def _handle(self, msg: Message) -> None:
        if isinstance(msg, Done):  # the most frequent first: one per attempt
            self._on_done(msg.uid, msg.error, msg.data, msg.next, msg.started)
        elif isinstance(msg, AddChildren):
            self._on_add(msg.uid, msg.ids, msg.datas, msg.reply, msg.final)
        elif isinstance(msg, Carried):
            self._on_carried(msg.uid, msg.data, msg.ids, msg.datas)
        elif isinstance(msg, StartRun):
            self._on_start(msg.handle, msg.entrance, msg.inputs, msg.inputs_coded)
        elif isinstance(msg, ReplayRun):
            self._on_replay(msg.handle, msg.history, msg.reply, msg.rerun)
        elif isinstance(msg, ResumeRuns):
            self._resume.extend(msg.handles)
            self._resume_on_change = msg.on_change
        elif isinstance(msg, CancelRun):
            self._on_cancel_run(msg.run_id, msg.reason)
        elif isinstance(msg, Stop):
            self._on_stop(msg.grace)
        else:  # pragma: no cover
            raise AssertionError(f"unknown message {msg!r}")

    def _stamp(self) -> str:
        # One stamp per turn, and turns within a millisecond share it: formatting the wall
        # clock is a visible share of a turn when turns follow each other closely.
        if self._ts is None:
            if self.now - self._ts_at >= STAMP_REUSE or self._last_ts is None:
                self._last_ts = utcnow().isoformat()
                self._ts_at = self.now
            self._ts = self._last_ts
        return self._ts

    def _event(
        self,
        run_id: str,
        kind: str,
        task: str | None = None,
        child: str | None = None,
        attempt: int | None = None,
        ref: int | None = None,
        data: str | None = None,
    ) -> None:
        self._rows.append((run_id, self._stamp(), kind, task, child, attempt, ref, data))

    def _signal(
        self,
        sig: NamedSignal,
        run: Run,
        task: Any,
        attempt: int | None,
        **error: BaseException | None,
    ) -> None:
        # Nobody listening: nothing is built (no per-child cost).
        if sig.receivers and sig.has_receivers_for(self.sender):
            if isinstance(task, Attempt):
                task = task.task()
            self._sigs.append(
                (
                    sig,
                    {
                        "task": task,
                        "state": run.state,
                        "run_id": run.run_id,
                        "attempt": attempt,
                        "ts": self._stamp(),  # the time of the event it announces, as stored
                        **error,
                    },
                )
            )

    def _new_state(
        self, handle: RunHandle, replayed: int, inputs: dict[str, Any]
    ) -> dict[str, Any]:
        state = dict(self.extra)
        state.update(inputs)
        state.update(
            start_time=handle.start_time,
            run_id=handle.run_id,
            store=self.store,
            task_flow=self.definition,
            replayed=replayed,
        )
        return state

    def _refuse_if_stopping(self, handle: RunHandle, state: dict[str, Any]) -> bool:
        if self._stop_at is None:
            return False
        # stop() came right behind this start: nothing ran, nothing is recorded.
        result = RunResult("interrupted", handle.run_id, state)
        self._after.append((handle, result))
        return True

    def _on_start(
        self,
        handle: RunHandle,
        entrance: str,
        inputs: dict[str, Any],
        inputs_coded: str | None = None,
    ) -> None:
        d = self.definition
        state = self._new_state(handle, 0, inputs)
        if self._refuse_if_stopping(handle, state):
            return
        reachable = d.reachable(entrance)
        waiting = {n: set(d.predecessors[n] & reachable) for n in reachable}
        run = Run(handle, state, waiting)
        self.run = run
        self.core.running = run.run_id
        ts = self._stamp()
        self.writer.run_started(
            {
                "run_id": run.run_id,
                "flow": d.name,
                "server": str(self.core.name),
                "entrance": entrance,
                "started": ts,
                "pid": os.getpid(),
                "host": self._host,
                "heartbeat": wall(),
            }
        )
        definition = {name: list(spec.successors) for name, spec in d.tasks.items()}
        self._event(
            run.run_id,
            "flow_started",
            data=json.dumps(
                {
                    "flow": d.name,
                    "import": d.import_path,
                    "server": str(self.core.name),
                    "entrance": entrance,
                    **({"inputs_coded": inputs_coded} if inputs_coded else {"inputs": inputs}),
                    "pid": os.getpid(),
                    "host": self._host,
                    "definition": definition,
                    "fingerprints": d.fingerprints,
                }
            ),
        )
        self._signal(signals.start_flow, run, None, None)
        self._start_stage(run, entrance)

    def _resume_next(self) -> None:
        """Replay the next interrupted run of ``start_link(resume=True)``; one that cannot be
        replayed now gets the reason as its handle's error, and the next one goes on."""
        handle = self._resume.popleft()
        try:
            history = self.store.history(handle.run_id)
            check_same_flow(self.definition, history)
            rerun = check_code(self.definition, history, self._resume_on_change, self.path)
            self.core.take_slot_to_resume(handle)
            handle.segments_before = history.segments  # see RunHandle.progress()
        except Exception as exc:
            log.warning("threadflow: cannot resume run %s: %s", handle.run_id, describe(exc))
            self.core.release_slot(handle)
            settle(handle, None, exc)
            return
        reply = Reply()
        self._on_replay(handle, history, reply, rerun)
        if reply.error is not None:
            log.warning(
                "threadflow: cannot resume run %s: %s", handle.run_id, describe(reply.error)
            )
            settle(handle, None, reply.error)

    def _on_replay(
        self,
        handle: RunHandle,
        history: RunHistory,
        reply: Reply,
        rerun: frozenset[str] = frozenset(),
    ) -> None:
        """Continue a run from its log: finished work stays finished, the rest runs again.

        ``history`` was folded by the caller (off this thread); the claim on the run is taken
        here, in this turn's transaction, so that two replays of one run cannot both win.
        Stages in ``rerun`` (their code changed, ``on_change="rerun"``) start over as if they
        had never run: the ``replayed`` event lists them, and the fold forgets their work
        from there on, as this replay does now.
        """
        d = self.definition
        inputs = history.inputs
        if history.inputs_coded is not None and d.codec is not None:
            inputs = d.codec.loads(history.inputs_coded)
        state = self._new_state(handle, history.segments, inputs)
        if self._refuse_if_stopping(handle, state):
            reply.set()
            return
        # Admission is decided here, once we hold the write lock, which orders the claims:
        # a server of this process that claimed the run earlier has set core.running first.
        self.writer.begin()
        refusal = replay_refusal(
            handle.run_id, self.path, self.writer.run_owner(handle.run_id), self.core
        )
        if refusal is not None:
            self.core.release_slot(handle)
            reply.set(refusal)
            return
        self.writer.claim_run(handle.run_id, os.getpid(), self._host)
        self.core.running = handle.run_id
        reply.set()
        entrance = history.entrance
        assert entrance is not None  # check_same_flow refused a log without a known entrance
        reachable = d.reachable(entrance)
        # What the replayed event below makes the fold do: the same method, so that this
        # replay and every later reader of the log agree on what the rerun stages did.
        history.forget(rerun, history.last_seq + 1)
        tasks = history.tasks
        finished = {n for n in reachable if n in tasks and tasks[n].all_over}
        waiting = {n: set(d.predecessors[n] & reachable) - finished for n in reachable}
        run = Run(handle, state, waiting)
        run.failed = list(history.failed)
        self.run = run
        # Rerun stages have released nothing now: the keys of all their children go too, so
        # that their parents may add the same ids again.
        released = [r for t in tasks.values() for r in t.released]
        self.writer.drop_unreleased_children(run.run_id, released)
        self._event(
            run.run_id,
            "replayed",
            data=json.dumps(
                {
                    "segment": history.segments + 1,
                    "previous_outcome": history.outcome,
                    "server": str(self.core.name),
                    "pid": os.getpid(),
                    "host": self._host,
                    # The code this segment runs: what the next replay compares with.
                    "fingerprints": d.fingerprints,
                    **({"rerun": sorted(rerun)} if rerun else {}),
                }
            ),
        )
        self._signal(signals.start_flow, run, None, None)
        for name in reachable - finished:
            past = tasks.get(name)
            if past is not None and past.parent_over:
                # Its parent succeeded: run the children that have not finished.
                stage = Stage(name, d.tasks[name], run, self._pools[name])
                stage.parent_done = True
                stage.replayed = True
                stage.ranges.extend([lo, hi] for lo, hi in past.released)
                stage.done, stage.failed = past.children_done, past.children_tolerated
                run.stages[name] = stage
                run.open += 1
            elif (past is not None and past.started) or not waiting[name]:
                self._start_stage(run, name)
        if run.open == 0:  # every stage had finished: only the final event was missing
            self._end_run(run, "all_over", None, None)

    def _start_stage(self, run: Run, name: str) -> None:
        stage = Stage(name, self.definition.tasks[name], run, self._pools[name])
        run.stages[name] = stage
        run.open += 1
        self._start_attempt(stage, None, None, None, 1)

    def _start_attempt(
        self, stage: Stage, child: str | None, ref: int | None, data: str | None, number: int
    ) -> None:
        self._launch(Attempt(next(self._uids), stage, self, child, ref, data, number))

    def _launch(self, att: Attempt) -> None:
        """Make ``att`` current, record its start, and hand it to a worker after the flush."""
        stage, child, number = att.stage, att.child_json, att.number
        self.attempts[att.uid] = att
        if child is None:
            stage.parent = att
            self._commit_now = True  # a parent may read what came before it: results()
            self._event(stage.run.run_id, "task_started", stage.name, child, number, att.ref)
        else:
            stage.running[att.uid] = att
            self._pending_start(att)
        self._signal(signals.task_start, stage.run, att, number)
        self._submit.append(att)

    def _pending_start(self, att: Attempt) -> None:
        if not self._starts:
            self._starts_since = self.now
        self._starts[att.uid] = (
            att.run.run_id,
            self._ts or self._stamp(),
            "task_started",
            att.stage.name,
            att.child_json,
            att.number,
            att.ref,
            None,
        )

    def _detach(self, att: Attempt) -> None:
        """Remove a current attempt from its stage and from the current set (writing its
        task_started row first, if it was still pending: it ends in some other way than a
        plain success)."""
        start = self._starts.pop(att.uid, None)
        if start is not None:
            self._rows.append(start)
        del self.attempts[att.uid]
        if att.child_json is None:
            att.stage.parent = None
        else:
            del att.stage.running[att.uid]

    def _on_done(
        self,
        uid: int,
        error: BaseException | None,
        data: str | None,
        nxt: Attempt | None = None,
        started: float = 0.0,
    ) -> None:
        att = self.attempts.get(uid)
        if nxt is not None:
            self._handed_over(nxt, started)
        if att is None:
            self._late(uid, error, data)
            return
        stage, run = att.stage, att.run
        if error is None and att.child_json is not None and not att.held and not self._stop_at:
            # The common case, kept short: a child succeeded and released nothing.
            del self.attempts[uid], stage.running[uid]
            start = self._starts.pop(uid, None)
            if start is None:
                kind = "task_over"
            else:  # started since the last commit: one row for both
                kind = "task_ran"
                head = '{"started":"' + start[1] + '"'
                data = head + "}" if data is None else head + "," + data[1:]
            self._rows.append(
                (run.run_id, self._ts or self._stamp(), kind, stage.name)
                + (att.child_json, att.number, att.ref, data)
            )
            if signals.task_over.receivers:
                self._signal(signals.task_over, run, att, att.number)
            stage.done += 1
            self._maybe_stage_over(stage)
            return
        self._detach(att)
        if self._stop_at is not None:
            # Stopping: record what really happened, decide nothing more.
            kind = "task_over" if error is None else "exit"
            self._event(run.run_id, kind, stage.name, att.child_json, att.number, att.ref, data)
            if error is None and att.held:
                self._released(att)
            return
        if error is not None:
            self._failed(att, "exit", error, data)
            return
        self._event(run.run_id, "task_over", stage.name, att.child_json, att.number, att.ref, data)
        if att.held:
            self._released(att)
        self._signal(signals.task_over, run, att, att.number)
        if att.held or att.child_json is None:
            # What this success releases must be on disk before any of it runs: a crash must
            # not undo a parent whose children already ran.
            self._commit_now = True
        stage.ranges.extend(att.held)  # its children are released, in the order added
        if att.child_json is None:
            stage.parent_done = True
        else:
            stage.done += 1
        self._maybe_stage_over(stage)

    def _released(self, att: Attempt) -> None:
        """Record which children a successful attempt made live: what a replay will run."""
        self._event(
            att.run.run_id,
            "children_released",
            att.stage.name,
            att.child_json,
            att.number,
            att.ref,
            json.dumps({"ranges": att.held}, separators=(",", ":")),
        )

    def _handed_over(self, att: Attempt, started: float) -> None:
        """A worker started ``att`` from its stage's standby, in the slot of the attempt it
        just finished: from now on it is a current attempt like any other."""
        run, stage = att.run, att.stage
        if run.over or self._stop_at is not None:
            # Taken just as the run ended or the server began to stop: stop it, log it late.
            att.token.cancel("stop" if self._stop_at is not None else "run_over")
            self.cancelled[att.uid] = att
            heapq.heappush(self._heap, (self.now + self.grace, next(self._hseq), "grace", att.uid))
            return
        self.attempts[att.uid] = att
        stage.running[att.uid] = att
        timeout = stage.spec.task_timeout
        if timeout:
            att.deadline = started + timeout
        self._pending_start(att)

    def _drain_standby(self, run: Run) -> None:
        for stage in run.stages.values():
            standby = stage.standby
            while standby:
                try:
                    standby.popleft()
                except IndexError:  # a worker took the last one meanwhile
                    break

    def _late(self, uid: int, error: BaseException | None, data: str | None = None) -> None:
        """An outcome of an attempt that is no longer current: logged, never acted on."""
        att = self.cancelled.pop(uid, None)
        if att is None:  # pragma: no cover - every submitted attempt is current or cancelled
            return
        if att.abandoned:
            self._abandoned = tuple(a for a in self._abandoned if a is not att)
        outcome: dict[str, Any] = {"outcome": "over" if error is None else "exit"}
        if error is not None:
            outcome["error"] = describe(error)
        process = json.loads(data).get("process") if data else None
        if process is not None:  # a subprocess attempt: how its process ended (the kill)
            outcome["process"] = process
        self._event(
            att.run.run_id,
            "stale",
            att.stage.name,
            att.child_json,
            att.number,
            att.ref,
            json.dumps(outcome),
        )
        log.debug("threadflow: ignored the late outcome of %r attempt %d", att.task(), att.number)

    def _on_add(
        self, uid: int, ids: list[str], datas: list[str], reply: Reply, final: bool = True
    ) -> None:
        """Insert a chunk of children of a current attempt, held until it succeeds.

        A ``final`` chunk is answered after the commit (the caller returns: its children must
        be on disk); an earlier one as soon as it is inserted (only errors matter to it).
        """
        att = self.attempts.get(uid)
        if att is None or self._stop_at is not None:
            reply.set(CancelledError((att.token.reason if att else None) or "cancelled"))
            return
        if not ids:  # an empty last chunk: answer once what came before is committed
            self._replies.append(reply)
            return
        try:
            self._insert_children(att, ids, datas)
        except DuplicateChildError as exc:
            reply.set(exc)
            return
        if final:
            self._replies.append(reply)
        else:
            reply.set()

    def _on_carried(self, uid: int, data: str | None, ids: list[str], datas: list[str]) -> None:
        """A remote attempt succeeded and brought back the children it added.

        They are added now, right before its success is recorded, so that they are held and
        released exactly like children added live. An id already added fails the attempt. A
        late outcome's children are dropped with it (never added).
        """
        att = self.attempts.get(uid)
        if att is not None:
            try:
                self._insert_children(att, ids, datas)
            except DuplicateChildError as exc:
                self._on_done(uid, exc, error_json(exc))
                return
        self._on_done(uid, None, data)

    def _insert_children(self, att: Attempt, ids: list[str], datas: list[str]) -> None:
        """Write ``child_added`` events held by ``att``.

        :raises DuplicateChildError: (nothing is written) for an id already added.
        """
        if not ids:
            return
        run, stage = att.run, att.stage
        if self._rows:  # keep seq order: earlier events of this turn go first
            self.writer.append(self._rows)
            self._rows = []
        ts = self._stamp()
        rows = [
            (run.run_id, ts, "child_added", stage.name, cid, att.number, None, data)
            for cid, data in zip(ids, datas, strict=True)
        ]
        first = self.writer.add_children(run.run_id, stage.name, rows, ids)
        att.held.append([first, first + len(rows) - 1])

    def _discard(self, att: Attempt) -> None:
        """Drop the children of a failed attempt; a retry may add the same ids again."""
        held, att.held = att.held, []
        self.writer.discard_children([(lo, hi) for lo, hi in held])
        count = sum(hi - lo + 1 for lo, hi in held)
        self._event(
            att.run.run_id,
            "children_discarded",
            att.stage.name,
            att.child_json,
            att.number,
            att.ref,
            json.dumps({"count": count}),
        )

    def _retries(self, att: Attempt, error: BaseException) -> bool:
        if att.number >= att.stage.spec.attempts or isinstance(error, NoRetry):
            return False
        try:
            return bool(att.stage.spec.retries(error))
        except BaseException:  # the user's predicate: it never ends the engine
            log.exception("threadflow: retry_on of task %r raised; not retrying", att.stage.name)
            return False

    def _delay(self, att: Attempt) -> float:
        try:
            delay = float(att.stage.spec.retry_delay(att.number))
        except BaseException:  # the user's function: it never ends the engine
            log.error(
                "threadflow: task_retry_delay of %r raised; retrying at once",
                att.stage.name,
                exc_info=True,
            )
            return 0.0
        if not math.isfinite(delay):  # an infinite delay would leave the run waiting for ever
            log.error(
                "threadflow: task_retry_delay of %r returned %r; retrying at once",
                att.stage.name,
                delay,
            )
            return 0.0
        return delay

    def _failed(self, att: Attempt, kind: str, error: BaseException, data: str | None) -> None:
        """An attempt ended by ``exit`` or ``timeout``: retry it, tolerate it, or fail the run."""
        run, stage = att.run, att.stage
        self._event(run.run_id, kind, stage.name, att.child_json, att.number, att.ref, data)
        sig = signals.task_exit if kind == "exit" else signals.task_timeout
        self._signal(sig, run, att, att.number, error=error)
        if att.held:
            self._discard(att)
        nxt = att.number + 1
        if self._retries(att, error):
            delay = self._delay(att)
            self._event(
                run.run_id,
                "retry",
                stage.name,
                att.child_json,
                att.number,
                att.ref,
                json.dumps({"delay": delay, "next_attempt": nxt}),
            )
            self._signal(signals.task_retry, run, att, att.number, error=error)
            item = (att.child_json, att.ref, att.data, nxt)
            if delay > 0:
                stage.delayed += 1
                heapq.heappush(
                    self._heap, (self.now + delay, next(self._hseq), "retry", (stage, item))
                )
            elif att.child_json is None:
                self._start_attempt(stage, None, None, None, nxt)
            else:
                stage.retry_ready.append(item)  # ahead of children not yet started
            return
        tolerated = att.child_json is not None and not stage.spec.exit_on_failed
        self._event(
            run.run_id,
            "task_failed",
            stage.name,
            att.child_json,
            att.number,
            att.ref,
            json.dumps({"error": describe(error), "tolerated": tolerated}),
        )
        self._signal(signals.task_failed, run, att, att.number, error=error)
        if not tolerated:
            self._end_run(run, "failed_over", att.task(), error)
            return
        run.failed.append(att.task())
        stage.failed += 1
        self._maybe_stage_over(stage)

    def _maybe_stage_over(self, stage: Stage) -> None:
        if (
            stage.over
            or not stage.parent_done
            or stage.running
            or stage.standby
            or stage.delayed
            or stage.retry_ready
            or stage.buffer
            or stage.ranges
        ):
            return
        stage.over = True
        run = stage.run
        run.open -= 1
        self._event(
            run.run_id,
            "task_all_over",
            stage.name,
            data=json.dumps({"done": stage.done, "failed": stage.failed}),
        )
        self._signal(signals.task_all_over, run, (stage.name,), None)
        for nxt in stage.spec.successors:
            waiting = run.waiting[nxt]
            waiting.discard(stage.name)
            if not waiting and nxt not in run.stages:
                self._start_stage(run, nxt)
        if run.open == 0:
            self._end_run(run, "all_over", None, None)

    def _on_cancel_run(self, run_id: str, reason: str) -> None:
        """Cancel the current run if it is ``run_id`` (a request for any other run is late:
        that run has ended, and its result stands)."""
        run = self.run
        if run is None or run.run_id != run_id or run.over or self._stop_at is not None:
            return
        self._end_run(run, "cancelled", None, None, reason=reason)

    def _end_run(
        self,
        run: Run,
        outcome: str,
        task: tuple[Any, ...] | None,
        error: BaseException | None,
        reason: str | None = None,
    ) -> None:
        run.over = True  # set first: a worker never takes a standby attempt of an over run
        self._drain_standby(run)
        for att in list(self.attempts.values()):  # every current attempt is of this run
            self._detach(att)
            self._cancel(att, "cancelled" if outcome == "cancelled" else "run_over")
        data: dict[str, Any] = {"failed": [list(t) for t in run.failed]}
        if task is not None:
            data["task"] = list(task)
            data["error"] = describe(error) if error is not None else None
        if reason is not None:
            data["reason"] = reason
        self._event(run.run_id, outcome, data=json.dumps(data))
        self.writer.run_ended(run.run_id, self._stamp(), outcome)
        if outcome == "all_over":
            self._signal(signals.all_over, run, None, None)
        elif outcome == "failed_over":
            self._signal(signals.failed_over, run, task, None, error=error)
        result = RunResult(outcome, run.run_id, run.state, task, error, list(run.failed))
        self._after.append((run.handle, result))
        self.run = None

    def _cancel(self, att: Attempt, reason: str) -> None:
        att.token.cancel(reason)
        self.cancelled[att.uid] = att
        heapq.heappush(self._heap, (self.now + self.grace, next(self._hseq), "grace", att.uid))

    def _on_stop(self, grace: float) -> None:
        if self._stop_at is not None:
            return
        self._stop_at = self.now + grace
        if self.run is not None:
            self._drain_standby(self.run)
        for att in self.attempts.values():
            att.token.cancel("stop")

    def _maybe_finish_stop(self) -> None:
        assert self._stop_at is not None
        # Wait (up to the stop's deadline) for current attempts, and for subprocess attempts
        # cancelled earlier whose kill is under way: their stale record tells how the process
        # ended, and they end within kill_grace.
        if monotonic() < self._stop_at and (
            self.attempts
            or any(
                att.stage.spec.isolation == "subprocess" and not att.abandoned
                for att in self.cancelled.values()
            )
        ):
            return
        run = self.run
        if run is not None:
            self.now = monotonic()
            for att in list(self.attempts.values()):
                self._detach(att)
                self.cancelled[att.uid] = att
                self._abandon(att)
            self._event(run.run_id, "interrupted", data=json.dumps({"reason": "stop"}))
            self.writer.run_ended(run.run_id, self._stamp(), "interrupted")
            result = RunResult("interrupted", run.run_id, run.state, None, None, list(run.failed))
            self._after.append((run.handle, result))
            self.run = None
            self._flush()
        self._exit = True

    # -- deadlines --------------------------------------------------------------------------

    def _fire_due(self) -> None:
        now = self.now
        run = self.run
        if run is not None and self._stop_at is None:
            for stage in list(run.stages.values()):
                att = stage.parent
                if att is not None and att.deadline is not None and att.deadline <= now:
                    self._timeout(att)
                while not run.over and stage.running:
                    att = next(iter(stage.running.values()))
                    if att.deadline is None or att.deadline > now:
                        break
                    self._timeout(att)
                if run.over:
                    break
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, _, kind, item = heapq.heappop(heap)
            if kind == "grace":
                att = self.cancelled.get(item)
                if att is not None and not att.abandoned:
                    self._abandon(att)
            else:  # a retry whose delay has passed
                stage, (child, ref, data, number) = item
                if stage.run is not self.run or self._stop_at is not None:
                    continue
                stage.delayed -= 1
                if child is None:
                    self._start_attempt(stage, None, None, None, number)
                else:
                    stage.retry_ready.append((child, ref, data, number))

    def _timeout(self, att: Attempt) -> None:
        self._detach(att)
        self._cancel(att, "timeout")
        timeout = att.stage.spec.task_timeout
        error = TaskTimeout(att.task(), att.number, timeout)
        self._failed(
            att, "timeout", error, json.dumps({"timeout": timeout, "error": describe(error)})
        )

    # -- starting children ------------------------------------------------------------------

    def _dispatch(self) -> None:
        run = self.run
        if run is None or self._stop_at is not None:
            return
        # Hand-over is only for children nobody needs to hear about before they start, run by
        # the server's own threads (stage.handover).
        handover = not signals.task_start.has_receivers_for(self.sender)
        for stage in list(run.stages.values()):
            if stage.over or not stage.parent_done:
                continue
            free = stage.cap - len(stage.running)
            if stage.interval and free > 0:
                # At most one child per turn, and only once its time has come: the submission
                # in this turn's _flush charges the next one (see _rate_wake).
                free = 1 if self._next_start.get(stage.name, 0.0) <= self.now else 0
            standby = stage.standby
            while free > 0:
                if stage.retry_ready:
                    self._start_attempt(stage, *stage.retry_ready.popleft())
                    free -= 1
                    continue
                try:  # older than anything in the buffer: keep the order children were added
                    self._launch(standby.popleft())
                    free -= 1
                    continue
                except IndexError:
                    pass
                if stage.buffer or self._refill(stage):
                    seq, child, data = stage.buffer.popleft()
                    self._start_attempt(stage, child, seq, data, 1)
                else:
                    # Nothing left to start: a replayed stage may turn out to be finished.
                    self._maybe_stage_over(stage)
                    break
                free -= 1
            if run.over:
                break
            if handover and stage.handover and stage.running:
                # Enough for the workers until the next turn: a worker that finds none goes idle,
                # and its slot then costs a submission (measured: 4 x cap 12.7 us per no-op
                # child, 16 x cap 9.2 us).
                depth = min(16 * stage.cap, WINDOW)
                while len(standby) < depth and (stage.buffer or self._refill(stage)):
                    seq, child, data = stage.buffer.popleft()
                    standby.append(Attempt(next(self._uids), stage, self, child, seq, data, 1))

    def _rate_wake(self, run: Run) -> float | None:
        """When the coordinator must look again at the rate-limited stages of ``run``: the
        earliest next start of a stage that has a child to start and a free slot, or None.

        Invariant (no busy loop): a time already past means ``_dispatch`` starts a child of
        that stage in the next turn, or finds it has none left (an empty ``ranges`` after a
        refill), so the same past time is never returned twice in a row.
        """
        when: float | None = None
        for stage in run.stages.values():
            if (
                stage.interval
                and not stage.over
                and stage.parent_done
                and len(stage.running) < stage.cap
                and (stage.retry_ready or stage.buffer or stage.ranges)
            ):
                at = self._next_start.get(stage.name, 0.0)
                when = at if when is None else min(when, at)
        return when

    def _refill(self, stage: Stage) -> bool:
        ranges = stage.ranges
        while ranges:
            span = ranges[0]
            if stage.replayed:
                rows = self.writer.read_unfinished_children(
                    stage.run.run_id, stage.name, span[0], span[1], WINDOW
                )
            else:
                rows = self.writer.read_children(span[0], span[1], WINDOW)
            if rows:
                last = rows[-1][0]
                if last >= span[1] or len(rows) < WINDOW:
                    ranges.popleft()
                else:
                    span[0] = last + 1
                stage.buffer.extend(rows)
                return True
            ranges.popleft()
        return False

    # -- end of turn ------------------------------------------------------------------------

    def _flush(self) -> None:
        writer = self.writer
        # Group commit: a turn that owes nobody anything (no receiver to call, no worker or
        # caller waiting for durability, no parent task about to start or released children,
        # no run ending) leaves the transaction open, for at most ``commit_every`` seconds.
        # Children may then start, even end, before their events are on disk; after a crash
        # they simply run again, as a replay does for all unfinished work.
        oldest = writer.opened if writer.in_transaction else math.inf
        if self._starts:
            oldest = min(oldest, self._starts_since)
        commit = bool(
            self._commit_now
            or self._sigs
            or self._replies
            or self._after
            or self._stop_at is not None
            or self.commit_every <= 0
            or self.now >= oldest + self.commit_every
        )
        if commit and self._starts:  # attempts still running at the commit: on disk now
            self._rows.extend(self._starts.values())
            self._starts.clear()
        if self._rows:
            writer.append(self._rows)
            self._rows = []
        if commit:
            writer.commit()
            self._commit_now = False
            if self._after:  # their final events are on disk: a crash from here delivers them
                self._delivering, self._after = self._after, []
        if self._sigs:
            sigs, self._sigs = self._sigs, []
            for sig, kwargs in sigs:
                self._send(sig, kwargs)
            if self._rows:  # callback errors: on disk before anything below acts on them
                writer.append(self._rows)
                self._rows = []
                writer.commit()
        if self._submit:
            subs, self._submit = self._submit, []
            start = monotonic()
            paced: list[Stage] = []  # rate-limited stages that start a child in this turn
            for att in subs:
                if att.token.cancelled:
                    # Cancelled in this very turn (run over, stop): it never runs, but it still
                    # ends through the inbox like any attempt, so nothing waits for it.
                    error = CancelledError(att.token.reason or "cancelled")
                    self.post(Done(att.uid, error, None))
                    continue
                timeout = att.stage.spec.task_timeout
                if timeout:
                    att.deadline = start + timeout
                stage = att.stage
                pool = stage.pool if att.child_json is not None else stage.parent_pool
                try:
                    pool.submit(run_attempt, att)
                except BaseException as exc:  # e.g. a user executor that was shut down
                    self.post(Done(att.uid, exc, error_json(exc)))
                if stage.interval and att.child_json is not None:
                    paced.append(stage)
            for batching in self._batching:  # send what the submits above kept back
                batching.flush()
            if paced:
                # The starts a rate limit paces. Charged once the submissions have returned
                # (batches sent included), never from an earlier reading: the next child of
                # the stage is decided in a later turn, at least ``interval`` after any moment
                # of this hand-off, however long the turn took or the thread was preempted.
                sent = monotonic()
                for stage in paced:
                    self._next_start[stage.name] = sent + stage.interval
        if self._replies:
            replies, self._replies = self._replies, []
            for reply in replies:
                reply.set()
        while self._delivering:
            self._deliver(*self._delivering.pop(0))

    def _send(self, sig: NamedSignal, kwargs: dict[str, Any]) -> None:
        """Call each receiver; one that raises is logged and recorded, the others still run."""
        for receiver in sig.receivers_for(self.sender):
            try:
                receiver(self.sender, **kwargs)
            except BaseException as exc:  # SystemExit included: a receiver never ends the engine
                log.error("threadflow: a %s receiver raised", sig.name, exc_info=True)
                task = kwargs.get("task")
                self._event(
                    kwargs["run_id"],
                    "callback_error",
                    task[0] if task else None,
                    data=json.dumps(
                        {
                            "signal": sig.name,
                            "task": list(task) if task else None,
                            "receiver": _receiver_name(receiver),
                            "error": error_data(exc),
                        },
                        default=safe_repr,
                    ),
                )

    def _deliver(self, handle: RunHandle, result: RunResult) -> None:
        if self.core.running == handle.run_id:
            self.core.running = None
        self.core.release_slot(handle)
        settle(handle, result)
        target = self.return_to
        if target is None:
            return
        try:
            if hasattr(target, "put"):
                target.put(result)
            else:
                target(result)
        except BaseException:  # the user's code: it never ends the engine
            log.error("threadflow: return_to raised for run %s", result.run_id, exc_info=True)
