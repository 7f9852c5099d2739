"""The :class:`Flow` base class: what a user subclasses, starts, runs and stops.

A flow is a class whose :func:`~threadflow.definition.task` attributes are its stages; the
definition is checked when the class is made (:mod:`threadflow.definition`). An instance is a
*server*: it owns a coordinator thread and runs one flow at a time.
"""

from __future__ import annotations

import atexit
import datetime
import functools
import os
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from .cancel import current_context
from .definition import FlowDefinition, check_flow, check_same_flow
from .errors import (
    AlreadyStarted,
    FlowDefinitionError,
    FlowRunning,
    ReplayError,
    ThreadflowError,
)
from .result import RunHandle, RunResult

if TYPE_CHECKING:
    from .coordinator import Coordinator

# The server registry: the one piece of module-level mutable state (names are per process).
_registry: dict[str, Flow] = {}
_registry_lock = threading.Lock()


def _registry_servers() -> list[Flow]:
    """The servers registered in this process (for shutdown and test clean-up)."""
    with _registry_lock:
        return list(_registry.values())


@atexit.register
def _stop_all_at_exit() -> None:
    # Daemon threads die silently at exit; stop servers first so runs are recorded interrupted.
    for server in _registry_servers():
        server.stop(timeout=2.0)


def _is_global(name: Any) -> bool:
    return isinstance(name, tuple) and len(name) == 2 and name[0] == "global"


class _Hybrid:
    """``Example.start_flow(name_or_server)`` on the class, ``server.start_flow()`` on a server."""

    def __init__(self, on_class: Callable[..., Any], on_server: Callable[..., Any]) -> None:
        self.on_class, self.on_server = on_class, on_server
        functools.update_wrapper(self, on_server)  # type: ignore[arg-type]

    def __get__(self, obj: Any, objtype: Any = None) -> Callable[..., Any]:
        if obj is None:
            return functools.partial(self.on_class, objtype)
        return functools.partial(self.on_server, obj)


class Flow:
    """Base class of flows. Subclass it, declare tasks with :func:`task`, then ``start_link``.

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
    _server_name: ClassVar[Any] = None
    # Set on each server by start_link().
    _name: Any
    _lock: threading.Lock
    _active: RunHandle | None
    _stopped: bool
    _coord: Coordinator

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
        cls,
        store: str | os.PathLike[str] | None = None,
        return_to: Any = None,
        executor: Any = None,
        executors: Mapping[str, Any] | None = None,
        **extra_state: Any,
    ) -> Flow:
        """Start a server: its coordinator thread opens the store and waits for runs.

        :param store: SQLite file (created if missing, with the class's ``store_mode``);
            default ``$THREADFLOW_DB`` or ``threadflow.db`` in the working directory.
        :param return_to: a queue (anything with ``.put``) or a callable that receives the
            :class:`RunResult` of every run, on the coordinator thread.
        :param executor: a :class:`concurrent.futures.Executor` to run attempts in (default: the
            server's own daemon threads, which never block interpreter exit). A
            ``ThreadPoolExecutor`` runs them in this process; any other executor (a
            ``ProcessPoolExecutor``, Dask's ``Client.get_executor()``) is remote: see
            docs/scale-out.md.
        :param executors: named executors, for tasks that pick one with
            ``task(executor="name")`` or ``task(child_executor="name")``.
        :param extra_state: entries put into every run's state.
        :raises AlreadyStarted: if a server with this name is running.
        :raises StoreError: if the store cannot be created, written or opened, or is corrupt.
        :raises TypeError: for an executor without ``submit()``.
        :raises ValueError: for a task that names an executor not in ``executors``, a task
            with ``isolation="subprocess"`` in a remote executor, or a bad ``store_mode``.
        """
        from .coordinator import Coordinator
        from .executors import resolve
        from .store import create_file, default_path

        definition = cls.definition
        if definition is None:
            raise FlowDefinitionError(
                f"flow {cls.__qualname__!r} has no tasks; declare tasks with task(...)"
            )
        name = cls._server_name
        reserved = {"start_time", "run_id", "store", "task_flow", "replayed"} & set(extra_state)
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
        self._name = name
        self._lock = threading.Lock()  # guards _active and _stopped, never held across user code
        self._active = None
        self._stopped = False
        path = os.fspath(store) if store is not None else default_path()
        with _registry_lock:
            running = _registry.get(name)
            if running is not None:
                raise AlreadyStarted(name, running)
            _registry[name] = self
        try:
            # Here, not in the coordinator's writer (which creates a missing file with the
            # default mode): the mode is the class's.
            create_file(path, cls.store_mode)
            self._coord = Coordinator(self, definition, path, return_to, placed, extra_state)
            self._coord.start()
        except BaseException:
            self._unregister()
            raise
        return self

    def _unregister(self) -> None:
        with _registry_lock:
            if _registry.get(self._name) is self:
                del _registry[self._name]

    def _start_flow_server(self, entrance: str | None = None) -> RunHandle:
        """Start a run of this server's flow at ``entrance`` (default: ``default_entrance``).

        :raises FlowRunning: if a run is in progress (no callback fires).
        :raises FlowDefinitionError: for an unknown entrance.
        """
        import uuid

        from ._clock import utcnow

        definition = self._coord.definition
        entrance = definition.default_entrance if entrance is None else entrance
        definition.check_entrance(entrance)
        handle = self._take_slot(uuid.uuid4().hex[:12], utcnow())
        self._coord.post(("start", handle, entrance))
        return handle

    def _take_slot(self, run_id: str, start_time: datetime.datetime) -> RunHandle:
        """Make run ``run_id`` this server's one run; any thread may call it.

        :raises ThreadflowError: if the server is stopped.
        :raises FlowRunning: if it runs a run already.
        """
        with self._lock:
            if self._stopped:
                raise ThreadflowError(
                    f"server {self._name!r} is stopped; start a new one with start_link()"
                )
            if self._active is not None:
                raise FlowRunning(self._name, self._active.run_id, self._active.start_time)
            handle = RunHandle(run_id, start_time)
            self._active = handle
        return handle

    @classmethod
    def _start_flow_class(
        cls,
        name_or_server: Any,
        entrance: str | None = None,
        store: str | os.PathLike[str] | None = None,
    ) -> RunHandle:
        server = name_or_server
        if not isinstance(server, Flow):
            server = cls.whereis(name_or_server)
            if server is None:
                if _is_global(name_or_server):
                    from .remote import request_start
                    from .store import default_path

                    if cls.definition is not None and entrance is not None:
                        cls.definition.check_entrance(entrance)
                    path = os.fspath(store) if store is not None else default_path()
                    return request_start(path, name_or_server[1], entrance)
                raise ThreadflowError(
                    f"no server named {name_or_server!r} is running; start it with "
                    f"{cls.__name__}.start_link()"
                )
        return server._start_flow_server(entrance)

    start_flow = _Hybrid(_start_flow_class.__func__, _start_flow_server)  # type: ignore[attr-defined]

    def _replay_server(self, run_id: str) -> RunHandle:
        """Continue run ``run_id`` of this server's store from its event log.

        Finished stages, parents and children are not run again; the rest runs with fresh
        attempts; the run keeps its id and a ``replayed`` event marks the new segment.

        :raises ValueError: if the run ended ``all_over``.
        :raises ReplayError: if the run is unknown, still owned by a live server, or was
            written by a flow whose tasks or edges have changed since.
        :raises FlowRunning: if this server is running a run.
        """
        from .children import Reply

        coord = self._coord
        if threading.current_thread() is coord.thread:
            raise RuntimeError("replay() cannot be called from a callback; call it elsewhere")
        store = coord.store
        try:
            info = store.run(run_id)
        except KeyError:
            info = None
        if info is None or info.run_id != run_id:
            raise ReplayError(run_id, f"there is no run {run_id!r} in {store.path!r}")
        if info.outcome == "all_over":
            raise ValueError(f"run {run_id} ended all_over; there is nothing to replay")
        for server in _registry_servers():
            active = server._active
            if active is not None and active.run_id == run_id:
                raise ReplayError(
                    run_id,
                    f"run {run_id} is still running in server {server._name!r} of this "
                    "process; wait for it to end or stop that server, then replay",
                )
        history = store.history(run_id)
        check_same_flow(coord.definition, history)
        handle = self._take_slot(run_id, datetime.datetime.fromisoformat(info.started))
        reply = Reply()
        coord.post(("replay", handle, history, reply))
        while not reply.event.wait(0.5):
            if not coord.alive():
                raise ThreadflowError(f"server {self._name!r} stopped before the replay began")
        if reply.error is not None:
            raise reply.error
        return handle

    @classmethod
    def _replay_class(
        cls,
        run_id: str,
        store: str | os.PathLike[str] | None = None,
        return_to: Any = None,
        executor: Any = None,
        executors: Mapping[str, Any] | None = None,
        **extra_state: Any,
    ) -> RunResult:
        with cls.start_link(store, return_to, executor, executors, **extra_state) as server:
            result: RunResult = server.replay(run_id).result()
        return result

    #: ``Example.replay(run_id, store=...)`` starts a server, replays the run, waits for its
    #: :class:`RunResult` and stops; ``server.replay(run_id)`` returns a :class:`RunHandle`.
    replay = _Hybrid(_replay_class.__func__, _replay_server)  # type: ignore[attr-defined]

    def _run_ended(self, handle: RunHandle) -> None:
        # Called by the coordinator before it delivers a result, so that a caller who gets the
        # result can start the next run at once.
        with self._lock:
            if self._active is handle:
                self._active = None

    def stop(self, timeout: float | None = None) -> None:
        """Stop the server: no new runs, running attempts cancelled, the run recorded interrupted.

        Waits up to ``stop_grace`` seconds (or half of ``timeout``) for running attempts to
        return, records those that do not as abandoned (and logs a WARNING naming each),
        closes the store and returns within ``timeout``. Idempotent. From a callback or from
        inside a task of this server it returns at once and the stop goes on without it (a
        task that calls it should then return: its token is cancelled).
        """
        with self._lock:
            first = not self._stopped
            self._stopped = True
        coord = self._coord
        if first:
            grace = self.stop_grace if timeout is None else min(self.stop_grace, timeout / 2)
            coord.post(("stop", grace))
        ctx = current_context()
        if getattr(ctx, "coord", None) is coord:
            # From inside one of this server's attempts: waiting would wait for this very
            # attempt. Return at once; the stop goes on (this attempt's token is cancelled).
            return
        if threading.current_thread() is not coord.thread:
            coord.thread.join(timeout)
            if not coord.thread.is_alive():
                self._unregister()

    @classmethod
    def whereis(cls, name: Any) -> Flow | None:
        """The running server registered under ``name`` in this process, or None."""
        with _registry_lock:
            return _registry.get(name)

    @classmethod
    def run(
        cls,
        store: str | os.PathLike[str] | None = None,
        entrance: str | None = None,
        return_to: Any = None,
        executor: Any = None,
        executors: Mapping[str, Any] | None = None,
        **extra_state: Any,
    ) -> RunResult:
        """``start_link`` + ``start_flow`` + wait for the result + ``stop``, in one call."""
        with cls.start_link(store, return_to, executor, executors, **extra_state) as server:
            result: RunResult = server.start_flow(entrance=entrance).result()
        return result

    def __enter__(self) -> Flow:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def name(self) -> Any:
        """The server name."""
        return self._name

    @property
    def store(self) -> Any:
        """The :class:`~threadflow.EventStore` of this server's store file."""
        return self._coord.store

    @property
    def abandoned(self) -> int:
        """Abandoned attempts (cancelled, not returned in time) whose thread is still alive."""
        return self._coord.abandoned

    def __repr__(self) -> str:
        state = "stopped" if self._stopped else "running"
        return f"<{type(self).__name__} server {self._name!r} {state}>"

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
