"""The ``Flow`` base class: what a user subclasses, starts, runs and stops.

A flow is a class whose ``task`` attributes are its stages; the
definition is checked when the class is made (``threadflow.definition``). An instance is a
*server*: it owns a coordinator thread and runs one flow at a time.
"""

from __future__ import annotations

import atexit
import datetime
import functools
import json
import logging
import os
import threading
import types
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from . import server, signals
from ._clock import utcnow
from .definition import (
    RESERVED,
    FlowDefinition,
    check_code,
    check_flow,
    check_on_change,
    check_same_flow,
)
from .errors import EncodeError, FlowDefinitionError, ReplayError, ThreadflowError
from .events import coded, dumps
from .messages import ReplayRun, Reply, ResumeRuns, StartRun
from .result import RunHandle, RunResult
from .server import ServerCore
from .store import EventStore, RunNotFound

log = logging.getLogger("threadflow")

_F = TypeVar("_F", bound="Flow")


def _checked_inputs(
    server: str, extra: Mapping[str, Any], inputs: dict[str, Any], codec: Any = None
) -> tuple[dict[str, Any], str | None]:
    """The run's inputs as a replay will see them: encoded now (so that a value JSON cannot
    hold fails here, in the caller), and decoded back; and their codec text when JSON cannot
    hold them and the flow has a codec.

    :raises TypeError: for a name threadflow or ``start_link`` already puts in the state.
    :raises EncodeError: for a value that cannot be stored.
    """
    clash = sorted(RESERVED & set(inputs))
    if clash:
        raise TypeError(
            f"start_flow(): {clash} are set by threadflow in every run's state; give your "
            "inputs other names"
        )
    clash = sorted(set(extra) & set(inputs))
    if clash:
        raise TypeError(
            f"start_flow(): {clash} are already start_link() entries of server {server!r}; "
            "give the run's inputs other names"
        )
    if not inputs:
        return {}, None
    try:
        text = dumps(inputs)
    except EncodeError as exc:
        if codec is not None:
            coded_text = coded(codec, inputs, "the run's inputs")
            return codec.loads(coded_text), coded_text
        raise EncodeError(
            f"start_flow(): the inputs cannot be stored in the run's log: {exc}; inputs are "
            "recorded so that a replay gets them back, so pass plain data (objects shared "
            "with the tasks go to start_link(**extra_state))"
        ) from None
    decoded: dict[str, Any] = json.loads(text)
    return decoded, None


if TYPE_CHECKING:
    from .coordinator import Coordinator
    from .schedule import Schedule


def _registry_servers() -> list[Flow]:
    """The servers registered in this process (for shutdown and test clean-up)."""
    return [core.flow for core in server.cores()]


@atexit.register
def _stop_all_at_exit() -> None:
    # Daemon threads die silently at exit; stop servers first so runs are recorded interrupted.
    for flow in _registry_servers():
        flow.stop(timeout=2.0)


def _is_global(name: Any) -> bool:
    return isinstance(name, tuple) and len(name) == 2 and name[0] == "global"


class _ServerOrClass:
    """A method with a server form and a class form, as the seed's API has them.

    ``server.start_flow(entrance=...)`` calls the decorated function; ``Example.start_flow(
    name_or_server, ...)`` calls the one given to ``on_class``. Either is a real method
    object with its own signature and docstring, for ``help()`` and the API pages.
    """

    def __init__(self, on_server: Callable[..., Any]) -> None:
        self._on_server = on_server
        self._on_class: Callable[..., Any] | None = None
        functools.update_wrapper(self, on_server)  # type: ignore[arg-type]

    def on_class(self, func: Callable[..., Any]) -> classmethod[Any, Any, Any]:
        # help(Example.replay) names it replay, not the private name it is defined under.
        func.__name__ = self._on_server.__name__
        func.__qualname__ = self._on_server.__qualname__
        self._on_class = func
        return classmethod(func)

    def __get__(self, obj: Any, objtype: Any = None) -> Callable[..., Any]:
        if obj is None:
            assert self._on_class is not None
            return types.MethodType(self._on_class, objtype)
        return types.MethodType(self._on_server, obj)


class Flow:
    """Base class of flows. Subclass it, declare tasks with ``task``, then ``start_link``.

    Class keyword ``server_name``: a string (registered in this process) or ``("global", name)``.
    Default: the class's qualified name. Class attributes: ``default_entrance`` (optional when
    the flow has exactly one first task), ``abandon_grace`` (seconds a cancelled thread gets
    before it is recorded as abandoned), ``stop_grace`` (seconds ``stop()`` waits for running
    attempts by default), ``kill_grace`` (seconds a cancelled subprocess attempt gets to return
    before its process group is killed; at most half of ``abandon_grace``), ``fsync`` (True:
    ``synchronous=FULL``, every commit survives a power loss), ``commit_every`` (seconds the log
    may group the commits of finished children; 0 commits every coordinator turn; see
    docs/replay.md for what a crash can then re-run), ``store_mode`` (permissions of a store
    file that ``start_link`` creates, 0o600 by default: the owner only).

    Callbacks (``handle_*``) run on the coordinator thread, one at a time, after their event is
    committed; they may change ``state`` in place and should not block.
    """

    definition: ClassVar[FlowDefinition | None] = None
    default_entrance: ClassVar[str | None] = None
    abandon_grace: ClassVar[float] = 1.0
    stop_grace: ClassVar[float] = 5.0
    kill_grace: ClassVar[float] = 0.2
    fsync: ClassVar[bool] = False
    commit_every: ClassVar[float] = 0.02
    store_mode: ClassVar[int] = 0o600
    #: Stores what JSON cannot hold (``Path``, ``datetime``, dataclasses): an object with
    #: ``dumps(value) -> str`` and ``loads(str) -> value``, used only for values JSON refuses.
    codec: ClassVar[Any] = None
    _server_name: ClassVar[Any] = None
    # Set on each server by start_link(): its name, slot and stopped flag (the core, shared
    # with the coordinator through its methods), and its coordinator.
    _core: ServerCore
    _coord: Coordinator
    _resumed: list[RunHandle]

    def __init_subclass__(cls, server_name: Any = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if server_name is not None and not (
            isinstance(server_name, str)
            or (
                isinstance(server_name, tuple)
                and len(server_name) == 2
                and server_name[0] == "global"
                and isinstance(server_name[1], str)
            )
        ):
            raise FlowDefinitionError(
                f"flow {cls.__qualname__!r}: server_name={server_name!r}; use a string or "
                "('global', name)"
            )
        cls._server_name = server_name if server_name is not None else cls.__qualname__
        cls.definition = check_flow(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(
            f"a {type(self).__name__} server is made by {type(self).__name__}.start_link(...), "
            "not by calling the class"
        )

    # -- life cycle ------------------------------------------------------------------------

    @classmethod
    def start_link(
        cls: type[_F],
        store: str | os.PathLike[str] | None = None,
        return_to: Any = None,
        executor: Any = None,
        executors: Mapping[str, Any] | None = None,
        resume: bool = False,
        on_change: str = "refuse",
        **extra_state: Any,
    ) -> _F:
        """Start a server: its coordinator thread opens the store and waits for runs.

        :param store: SQLite file (created if missing, with the class's ``store_mode``);
            default ``$THREADFLOW_DB`` or ``threadflow.db`` in the working directory.
        :param return_to: a queue (anything with ``.put``) or a callable that receives the
            ``RunResult`` of every run, on the coordinator thread.
        :param executor: a ``concurrent.futures.Executor`` to run attempts in (default: the
            server's own daemon threads, which never block interpreter exit). A
            ``ThreadPoolExecutor`` runs them in this process; any other executor (a
            ``ProcessPoolExecutor``, Dask's ``Client.get_executor()``) is remote: see
            docs/scale-out.md.
        :param executors: named executors, for tasks that pick one with
            ``task(executor="name")`` or ``task(child_executor="name")``.
        :param resume: replay this flow's interrupted runs in the store (stopped, or whose
            process died: ``threadflow runs`` shows them ``interrupted``), oldest first, before
            any new run: ``start_flow`` raises ``FlowRunning`` until the last of them has
            started. ``server.resumed`` holds their handles. For an app that must pick up
            where it crashed.
        :param on_change: with ``resume``, what a run whose task code changed since it last
            ran does, as for ``replay``: ``"refuse"`` (it is not resumed: its handle's
            ``result()`` raises the ``ReplayError`` that names the changes, and a WARNING is
            logged), ``"rerun"`` or ``"continue"``. An app that ships a fix and restarts
            usually wants ``"continue"``.
        :param extra_state: entries put into every run's state.
        :raises AlreadyStarted: if a server with this name is running.
        :raises StoreError: if the store cannot be created, written or opened, or is corrupt.
        :raises TypeError: for an executor without ``submit()``.
        :raises ValueError: for a task that names an executor not in ``executors``, a task
            with ``isolation="subprocess"`` in a remote executor, or a bad ``store_mode``; a
            ``ReplayError`` (a ``ValueError``) for an ``on_change`` that is none of the three.
        """
        from .coordinator import Coordinator
        from .executors import resolve
        from .store import create_file, default_path

        definition = cls.definition
        if definition is None:
            raise FlowDefinitionError(
                f"flow {cls.__qualname__!r} has no tasks; declare tasks with task(...)"
            )
        check_on_change(on_change)
        reserved = RESERVED & set(extra_state)
        if reserved:
            raise TypeError(
                f"start_link(): {sorted(reserved)} are set by threadflow in every run's state; "
                "pass your entries under other names"
            )
        if return_to is not None and not (hasattr(return_to, "put") or callable(return_to)):
            raise TypeError(
                f"start_link(): return_to={return_to!r} has no .put() and is not callable; pass "
                "a queue.Queue or a function(result)"
            )
        placed = resolve(definition, executor, executors)
        self = object.__new__(cls)
        self._core = core = server.ServerCore(cls._server_name, self)
        path = os.fspath(store) if store is not None else default_path()
        core.register()
        try:
            # Here, not in the coordinator's writer (which creates a missing file with the
            # default mode): the mode is the class's.
            create_file(path, cls.store_mode)
            self._coord = Coordinator(
                core,
                definition,
                path,
                server.Settings.of(cls),
                return_to,
                placed,
                extra_state,
                self._overridden_handlers(),
            )
            self._coord.start()
        except BaseException:
            core.unregister()
            raise
        self._resumed = []
        if resume:
            self._resume_interrupted(on_change)
        return self

    def _resume_interrupted(self, on_change: str) -> None:
        coord = self._coord
        assert coord.definition is not None
        pending = coord.store.runs(status="interrupted", flow=coord.definition.name)
        self._resumed = [
            RunHandle(
                info.run_id,
                datetime.datetime.fromisoformat(info.started),
                coord.store,
                coord.ask_cancel,
            )
            for info in pending
        ]
        if self._resumed:
            self._core.reserve_for_resume(self._resumed)
            coord.post(ResumeRuns(list(self._resumed), on_change))

    @property
    def resumed(self) -> list[RunHandle]:
        """Handles of the interrupted runs ``start_link(resume=True)`` replays, oldest first.

        ``result()`` of one that could not be replayed (its flow changed, another process
        took it) raises the reason.
        """
        return list(self._resumed)

    def _overridden_handlers(self) -> list[tuple[Any, Callable[..., Any]]]:
        """``(signal, bound method)`` of each ``handle_*`` this flow overrides; the others
        cost nothing per event."""
        cls = type(self)
        return [
            (sig, getattr(self, name))
            for name, sig in signals.HANDLERS.items()
            if getattr(cls, name) is not getattr(Flow, name)
        ]

    @_ServerOrClass
    def start_flow(self, entrance: str | None = None, **inputs: Any) -> RunHandle:
        """Start a run of this server's flow at ``entrance`` (default: ``default_entrance``).

        ``inputs`` are this run's own values (a folder to import, a date): they are put into
        its state, recorded in its log (as JSON) and given back to a replay, so one server can
        run the same flow on different inputs. On the class, ``Example.start_flow(
        name_or_server, entrance=None, store=None, **inputs)`` starts a run on the server of
        that name (a global name may be served by another process sharing ``store``).

        :returns: a ``RunHandle``: ``.run_id``, ``.done()``, ``.result(timeout)``.
        :raises FlowRunning: if a run is in progress (no callback fires).
        :raises FlowDefinitionError: for an unknown entrance.
        :raises TypeError: for an input named like a state entry threadflow or ``start_link``
            sets.
        :raises EncodeError: for an input that cannot be stored as JSON.
        :raises ThreadflowError: if the server is stopped.
        """
        definition = self._coord.definition
        entrance = definition.default_entrance if entrance is None else entrance
        definition.check_entrance(entrance)
        recorded, coded_text = _checked_inputs(
            str(self._core.name), self._coord.extra, inputs, definition.codec
        )
        handle = self._core.take_slot(
            uuid.uuid4().hex[:12], utcnow(), self._coord.store, self._coord.ask_cancel
        )
        self._coord.post(StartRun(handle, entrance, recorded, coded_text))
        return handle

    def cancel(self, run_id: str, reason: str = "cancelled") -> None:
        """Cancel run ``run_id`` without stopping the server; returns at once.

        The run may be this server's or one another process runs on the same store (the
        request then goes through the store, and its owner sees it within a quarter second).
        See ``RunHandle.cancel``.

        :raises ThreadflowError: if no server runs ``run_id``.
        """
        if self._core.running == run_id:
            self._coord.ask_cancel(run_id, reason)
            return
        from .remote import request_cancel

        request_cancel(self._coord.store.path, run_id, reason)

    @start_flow.on_class
    def _start_flow_on_class(
        cls: type[Flow],
        name_or_server: Any,
        entrance: str | None = None,
        store: str | os.PathLike[str] | None = None,
        **inputs: Any,
    ) -> RunHandle:
        """Start a run on the server ``name_or_server`` (a server, or the name it runs under).

        :param name_or_server: a server, a name registered in this process, or
            ``("global", name)``, which may be served by another process sharing ``store``.
        :param entrance: the task to start at (default: the flow's ``default_entrance``).
        :param store: for a global name served elsewhere: the store file they share.
        :param inputs: the run's inputs (see the server form).
        :returns: a ``RunHandle``.
        :raises ThreadflowError: if no server of that name runs.
        :raises FlowRunning: if it runs a run already.
        """
        target = name_or_server
        if not isinstance(target, Flow):
            core = server.lookup(name_or_server)
            if core is None:
                if _is_global(name_or_server):
                    from .remote import request_start
                    from .store import default_path

                    if cls.definition is not None and entrance is not None:
                        cls.definition.check_entrance(entrance)
                    path = os.fspath(store) if store is not None else default_path()
                    recorded, _ = _checked_inputs(str(name_or_server), {}, inputs)
                    return request_start(path, name_or_server[1], entrance, recorded)
                raise ThreadflowError(
                    f"no server named {name_or_server!r} is running; start it with "
                    f"{cls.__name__}.start_link()"
                )
            target = core.flow
        handle: RunHandle = target.start_flow(entrance, **inputs)
        return handle

    @_ServerOrClass
    def replay(self, run_id: str, *, on_change: str = "refuse") -> RunHandle:
        """Continue run ``run_id`` of this server's store from its event log.

        Finished stages, parents and children are not run again; the rest runs with fresh
        attempts; the run keeps its id and a ``replayed`` event marks the new segment. On the
        class, ``Example.replay(run_id, store=..., **start_link_args)`` starts a server,
        replays the run, waits for its ``RunResult`` and stops.

        The log records a fingerprint of each task's functions; what a replay does when the
        code of a stage the run can reach is not the code that last ran it is ``on_change``:

        * ``"refuse"`` (the default): raise ``ReplayError`` naming the changed tasks;
        * ``"rerun"``: run the changed stages, and every stage after them, again from scratch
          (their earlier parents and children are forgotten); other stages keep their work;
        * ``"continue"``: keep all finished work; what is unfinished runs the new code.

        :param run_id: the run's id, or a prefix of it that only this run's id starts with
            (as the command line takes it).
        :param on_change: ``"refuse"``, ``"rerun"`` or ``"continue"``.
        :returns: a ``RunHandle`` (its ``progress()`` counts earlier segments too).
        :raises ReplayError: (also a ``ValueError``) if the run ended ``all_over``, if no run
            or several runs match ``run_id``, if it is still owned by a live server, if it
            was written by a flow whose tasks or edges have changed since, or if the code of
            its tasks changed and ``on_change`` is ``"refuse"``.
        :raises FlowRunning: if this server is running a run.
        """
        coord, core = self._coord, self._core
        if threading.current_thread() is coord.thread:
            raise RuntimeError("replay() cannot be called from a callback; call it elsewhere")
        store = coord.store
        try:
            info = store.run(run_id)
        except RunNotFound as exc:  # no run, or several runs, match
            if exc.count > 1:
                raise ReplayError(run_id, f"{exc}; give more characters of the run id") from None
            info = None
        row = None if info is None else (info.outcome, info.pid, info.host, info.heartbeat)
        # Asked early for a quick answer; the coordinator asks again under the write lock.
        refusal = server.replay_refusal(run_id if info is None else info.run_id, store.path, row)
        if refusal is not None:
            raise refusal
        assert info is not None
        run_id = info.run_id
        history = info.history if info.history is not None else store.history(run_id)
        check_same_flow(coord.definition, history)
        rerun = check_code(coord.definition, history, on_change, store.path)
        handle = core.take_slot(
            run_id, datetime.datetime.fromisoformat(info.started), store, coord.ask_cancel
        )
        handle.segments_before = history.segments
        reply = Reply()
        coord.post(ReplayRun(handle, history, reply, rerun))
        while not reply.event.wait(0.5):
            if not coord.alive():
                raise ThreadflowError(f"server {core.name!r} stopped before the replay began")
        if reply.error is not None:
            raise reply.error
        return handle

    @replay.on_class
    def _replay_on_class(
        cls: type[Flow],
        run_id: str,
        store: str | os.PathLike[str] | None = None,
        return_to: Any = None,
        executor: Any = None,
        executors: Mapping[str, Any] | None = None,
        *,
        on_change: str = "refuse",
        **extra_state: Any,
    ) -> RunResult:
        """Start a server on ``store``, replay run ``run_id``, wait for its result, stop.

        The arguments after ``run_id`` are those of ``start_link``, and ``on_change``: what to
        do if the code of its tasks changed (``"refuse"``, ``"rerun"``, ``"continue"``: see
        ``server.replay``).

        :returns: the replayed run's ``RunResult``.
        :raises ReplayError: (also a ``ValueError``) if the run cannot be replayed (see
            ``server.replay``): it ended ``all_over``, no run or several match ``run_id``, it
            is still owned by a live server, its flow changed, or the code of its tasks
            changed and ``on_change`` is ``"refuse"``.
        """
        with cls.start_link(store, return_to, executor, executors, **extra_state) as srv:
            result: RunResult = srv.replay(run_id, on_change=on_change).result()
        return result

    def stop(self, timeout: float | None = None) -> None:
        """Stop the server: no new runs, running attempts cancelled, the run recorded interrupted.

        Waits up to ``stop_grace`` seconds (or half of ``timeout``) for running attempts to
        return, records those that do not as abandoned (and logs a WARNING naming each),
        closes the store and returns within ``timeout``. Idempotent. From a callback or from
        inside a task of this server it returns at once and the stop goes on without it (a
        task that calls it should then return: its token is cancelled).
        """
        grace = self.stop_grace if timeout is None else min(self.stop_grace, timeout / 2)
        self._coord.stop(grace, timeout)

    @classmethod
    def schedule(
        cls,
        store: str | os.PathLike[str] | None = None,
        *,
        cron: str | None = None,
        every: float | datetime.timedelta | None = None,
        inputs: Mapping[str, Any] | None = None,
        name: str | None = None,
        overlap: str = "skip",
        catch_up: str = "none",
        catch_up_limit: int = 100,
        tz: str | datetime.tzinfo | None = None,
        entrance: str | None = None,
        server: Flow | None = None,
        tick_input: str | None = "scheduled_at",
        grace: float = 60.0,
        clock_check: float = 1.0,
    ) -> Schedule:
        """Start a run of this flow at each tick of ``cron`` or of ``every``; see
        docs/schedule.md.

        Every tick's decision (fired, skipped, queued, missed, caught up) is recorded in the
        store (``EventStore.ticks(name)``, ``threadflow ticks``). Processes that share the store
        and the schedule's name fire each tick once between them.

        :param store: the store file, as ``start_link`` takes it (leave it out with ``server``).
        :param cron: a cron expression (``"*/5 * * * *"``; 6 fields: seconds first), read in
            ``tz``. Exactly one of ``cron`` and ``every``.
        :param every: seconds between ticks (or a ``timedelta``); ticks fall on the multiples
            of it since 1970-01-01 00:00 UTC, so that every process agrees on them.
        :param inputs: the inputs of each run, as ``start_flow(**inputs)`` takes them.
        :param name: the schedule's name in the store (default: the flow's name); two schedules
            of one flow need two names.
        :param overlap: what a tick does while the schedule's previous run still runs:
            ``"skip"`` (recorded skipped) or ``"queue"`` (runs when that run ends; one tick
            waits at most, later ones are skipped while it waits).
        :param catch_up: what the ticks missed while no scheduler ran become: ``"none"``
            (recorded missed), ``"latest"`` (the latest runs) or ``"all"`` (each runs, one
            after another, at most ``catch_up_limit`` of them, the latest ones).
        :param tz: the zone ``cron`` is read in (an IANA name or a ``tzinfo``; default UTC).
        :param entrance: the task runs start at (default: the flow's ``default_entrance``).
        :param server: a running server of this flow to start the runs on (default: the
            schedule starts its own on ``store``, and ``stop()`` stops it).
        :param tick_input: the name of the input that gets the tick's time (ISO 8601 text,
            UTC), or None for none.
        :param grace: seconds a tick may be late (the machine slept, the process was paused)
            and still run as a tick; a later one counts as missed and goes by ``catch_up``.
        :param clock_check: the longest the scheduler waits without looking at the wall clock
            (a clock that is set, or a machine that slept, is noticed within it).
        :returns: the running :class:`~threadflow.Schedule`: ``.next_fire``, ``.stop()``.
        :raises TypeError: for both or neither of ``cron`` and ``every``, or a mistyped value.
        :raises ValueError: for a bad cron expression (naming its bad field), a non-positive
            ``every``, an unknown ``overlap``, ``catch_up`` or ``tz``.
        :raises ThreadflowError: if a schedule of that name already runs in this process on
            that store, or if a server of this flow already runs (pass it as ``server``).
        """
        from . import schedule as _schedule
        from .store import default_path

        definition = cls.definition
        if definition is None:
            raise FlowDefinitionError(
                f"flow {cls.__qualname__!r} has no tasks; declare tasks with task(...)"
            )
        opts = _schedule.check_options(
            definition.name,
            cron=cron,
            every=every,
            tz=tz,
            name=name,
            overlap=overlap,
            catch_up=catch_up,
            catch_up_limit=catch_up_limit,
            grace=grace,
            clock_check=clock_check,
            entrance=entrance,
            inputs=inputs,
            tick_input=tick_input,
        )
        if entrance is not None:
            definition.check_entrance(entrance)
        if server is not None:
            if not isinstance(server, cls):
                raise TypeError(
                    f"schedule(server={server!r}): pass a server of {cls.__name__} (what "
                    f"{cls.__name__}.start_link() returned)"
                )
            if server._core.stopped:
                raise ThreadflowError(
                    f"schedule(): server {server.name!r} is stopped; start one with start_link()"
                )
            path = server.store.path
            if store is not None and os.path.abspath(os.fspath(store)) != os.path.abspath(path):
                raise ValueError(
                    f"schedule(store={os.fspath(store)!r}, server=...): the server writes to "
                    f"{path!r}; a schedule records its ticks in its server's store, so leave out "
                    "store="
                )
        else:
            path = os.fspath(store) if store is not None else default_path()
            if cls.whereis(cls._server_name) is not None:
                raise ThreadflowError(
                    f"schedule(): a server named {cls._server_name!r} is already running in this "
                    f"process; pass it: {cls.__name__}.schedule(server=that_server, ...)"
                )
        key = _schedule.claim_name(path, opts.name)
        try:
            srv = server if server is not None else cls.start_link(store=path)
            try:
                # Checked now, not at the first tick: the check start_flow makes, of the
                # inputs every tick passes (the tick's own input included).
                inputs = dict(opts.inputs)
                if opts.tick_input is not None:
                    inputs[opts.tick_input] = ""
                _checked_inputs(str(srv.name), srv._coord.extra, inputs, definition.codec)
                return _schedule.start(srv, server is None, opts, key)
            except BaseException:
                if server is None:
                    srv.stop()
                raise
        except BaseException:
            _schedule.release_name(key)
            raise

    @classmethod
    def whereis(cls, name: Any) -> Flow | None:
        """The running server registered under ``name`` in this process, or None."""
        core = server.lookup(name)
        return None if core is None else core.flow

    @classmethod
    def run(
        cls,
        store: str | os.PathLike[str] | None = None,
        entrance: str | None = None,
        return_to: Any = None,
        executor: Any = None,
        executors: Mapping[str, Any] | None = None,
        inputs: Mapping[str, Any] | None = None,
        **extra_state: Any,
    ) -> RunResult:
        """``start_link`` + ``start_flow`` + wait for the result + ``stop``, in one call.

        :param inputs: the run's inputs, as ``start_flow(**inputs)`` takes them: recorded in
            the log and given back to a replay. (The other keyword arguments are
            ``start_link``'s: entries of every run's state, objects included, not recorded.)
        :returns: the run's ``RunResult``. Ctrl-C (``KeyboardInterrupt``) stops the server
            first, so that the run is recorded interrupted and can be replayed; the warning
            logged then says how.
        """
        with cls.start_link(store, return_to, executor, executors, **extra_state) as srv:
            handle = srv.start_flow(entrance, **dict(inputs or {}))
            try:
                result: RunResult = handle.result()
            except KeyboardInterrupt:
                log.warning(
                    "threadflow: interrupted; stopping server %r (up to %g s for running "
                    "attempts). Run %s is recorded interrupted: continue it with %s.replay(%r, "
                    "store=%r) or threadflow replay %s --db %s",
                    srv.name,
                    srv.stop_grace,
                    handle.run_id,
                    cls.__name__,
                    handle.run_id,
                    srv.store.path,
                    handle.run_id,
                    srv.store.path,
                )
                raise
        return result

    def __enter__(self: _F) -> _F:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def name(self) -> Any:
        """The server name."""
        return self._core.name

    @property
    def store(self) -> EventStore:
        """The ``EventStore`` of this server's store file."""
        return self._coord.store

    @property
    def abandoned(self) -> int:
        """Abandoned attempts (cancelled, not returned in time) whose thread is still alive."""
        return self._coord.abandoned

    def __repr__(self) -> str:
        state = "stopped" if self._core.stopped else "running"
        return f"<{type(self).__name__} server {self._core.name!r} {state}>"

    # -- callbacks: override any of these ---------------------------------------------------

    def handle_start_flow(self, state: dict[str, Any]) -> None:
        """A run started (before its first task starts)."""

    def handle_all_over(self, state: dict[str, Any]) -> None:
        """The run ended with every branch over."""

    def handle_task_start(self, task: tuple[Any, ...], state: dict[str, Any]) -> None:
        """An attempt of ``task`` is about to start (every attempt)."""

    def handle_task_over(self, task: tuple[Any, ...], state: dict[str, Any]) -> None:
        """An attempt of ``task`` returned normally."""

    def handle_task_all_over(self, task: tuple[Any, ...], state: dict[str, Any]) -> None:
        """The parent task ``task`` and all its children are done."""

    def handle_task_failed(self, task: tuple[Any, ...], state: dict[str, Any]) -> None:
        """``task`` used up its attempts (fatal, or tolerated with ``exit_on_failed=False``)."""

    def handle_task_timeout(self, task: tuple[Any, ...], state: dict[str, Any]) -> None:
        """An attempt of ``task`` passed its ``task_timeout``."""

    def handle_task_exit(self, task: tuple[Any, ...], state: dict[str, Any]) -> None:
        """An attempt of ``task`` raised (or its process died)."""
