"""The flow DSL: :class:`Flow`, :func:`task`, ``ALL_OVER`` and the definition checks.

A flow is a class; each :func:`task` attribute is a stage. The definition is checked when the
class is created, so a bad flow fails at import, not in the middle of a run. An instance of the
class is a *server*: it owns a coordinator thread and runs one flow at a time.
"""

from __future__ import annotations

import atexit
import datetime
import difflib
import functools
import graphlib
import inspect
import math
import os
import pickle
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar

from .cancel import current_context
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

#: ``next=ALL_OVER`` ends a branch; the run is over when every branch has reached it.
ALL_OVER = "all_over"

_ISOLATIONS = ("thread", "subprocess")


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING: Any = _Missing()


@dataclass(eq=False)
class TaskSpec:
    """One stage of a flow, as written with :func:`task`. Checked when the flow class is made."""

    task_func: Any
    child_task_func: Any
    max_concurrency: Any
    exit_on_failed: Any
    task_retry_limit: Any
    task_timeout: Any
    task_retry_delay: Any
    retry_on: Any
    isolation: Any
    next: Any
    executor: Any = None
    child_executor: Any = None
    name: str = ""
    #: Names of the next tasks; empty for ``ALL_OVER``. Set by the definition check.
    successors: tuple[str, ...] = field(default=())

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @property
    def attempts(self) -> int:
        """Attempts in total (``task_retry_limit`` with the seed's meaning: 0 and 1 are one)."""
        return max(1, int(self.task_retry_limit))

    def retry_delay(self, failed_attempt: int) -> float:
        """Seconds to wait before the attempt after ``failed_attempt``."""
        delay = self.task_retry_delay
        value = delay(failed_attempt) if callable(delay) else delay
        return max(0.0, float(value))

    def retries(self, error: BaseException) -> bool:
        """Whether ``retry_on`` lets ``error`` be retried."""
        rule = self.retry_on
        if rule is None:
            return True
        if isinstance(rule, tuple) or (isinstance(rule, type) and issubclass(rule, BaseException)):
            return isinstance(error, rule)
        return bool(rule(error))


def task(
    task_func: Callable[[Mapping[str, Any]], Any] = _MISSING,
    *,
    child_task_func: Callable[[tuple[Any, Any], Mapping[str, Any]], Any] | None = None,
    max_concurrency: int | None = None,
    exit_on_failed: bool = True,
    task_retry_limit: int = 3,
    task_timeout: float | None = None,
    task_retry_delay: float | Callable[[int], float] = 0.0,
    retry_on: type[BaseException]
    | tuple[type[BaseException], ...]
    | Callable[[BaseException], bool]
    | None = None,
    isolation: str = "thread",
    next: str | list[str] = _MISSING,
    executor: str | None = None,
    child_executor: str | None = None,
) -> TaskSpec:
    """Declare a task of a :class:`Flow`; the attribute name is the task name.

    :param task_func: ``f(state)``, the parent attempt (required).
    :param child_task_func: ``f(child, state)`` with ``child == (child_id, payload)``; required
        for a task that adds children.
    :param max_concurrency: children of this task running at once (default: CPU count).
    :param exit_on_failed: a child that uses up its attempts fails the whole run; with False it
        is recorded, listed in ``RunResult.failed``, and the flow goes on.
    :param task_retry_limit: attempts in total, the first included (0 and 1: one attempt).
    :param task_timeout: seconds per attempt, or None for no limit.
    :param task_retry_delay: seconds before the next attempt, or ``f(failed_attempt) -> seconds``.
    :param retry_on: exception types, or ``predicate(error) -> bool``, that may be retried
        (None: every failure, timeouts included). A rejected error uses up the attempts.
    :param isolation: ``"thread"`` (cooperative cancel) or ``"subprocess"``.
    :param next: the next task, a list of them (fan-out), or ``ALL_OVER``.
    :param executor: the name of one of the executors given as ``start_link(executors={...})``
        that runs this task's attempts: the parent's, and its children's unless
        ``child_executor`` names another (default: ``start_link(executor=...)``, else the
        server's own threads).
    :param child_executor: the name of the executor that runs the children only, so that the
        parent stays where ``executor`` puts it, e.g. in the server's threads, while its
        children go to a cluster (default: where the parent runs). See docs/scale-out.md.
    """
    return TaskSpec(
        task_func,
        child_task_func,
        max_concurrency,
        exit_on_failed,
        task_retry_limit,
        task_timeout,
        task_retry_delay,
        retry_on,
        isolation,
        next,
        executor=executor,
        child_executor=child_executor,
    )


@dataclass(frozen=True)
class FlowDefinition:
    """A checked flow: its tasks, the default entrance and the graph (``state["task_flow"]``)."""

    name: str
    tasks: Mapping[str, TaskSpec]
    default_entrance: str
    predecessors: Mapping[str, frozenset[str]]

    def reachable(self, entrance: str) -> frozenset[str]:
        """The tasks a run started at ``entrance`` can reach."""
        seen = {entrance}
        todo = [entrance]
        while todo:
            for nxt in self.tasks[todo.pop()].successors:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return frozenset(seen)

    def check_entrance(self, entrance: str) -> None:
        """:raises FlowDefinitionError: if ``entrance`` is not a task of this flow."""
        if entrance not in self.tasks:
            raise FlowDefinitionError(
                f"flow {self.name!r}: entrance {entrance!r} is not a task"
                f"{_suggest(entrance, self.tasks)}; tasks are {sorted(self.tasks)}"
            )


def _suggest(name: Any, names: Any) -> str:
    close = difflib.get_close_matches(str(name), list(names), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _takes(func: Any, n: int) -> bool:
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):  # builtins without a signature: trust them
        return True
    try:
        sig.bind(*([None] * n))
    except TypeError:
        return False
    return True


def _main_reimportable() -> bool:
    """Whether a fresh interpreter can import this program's ``__main__`` again.

    It can for a script (``python app.py``) and a module (``python -m pkg.mod``): the worker
    process runs it again under the name ``__mp_main__``, as :mod:`multiprocessing` does, so
    its top-level code must be guarded by ``if __name__ == "__main__":``. It cannot for an
    interactive session, ``python -c``, a notebook, or a package's ``__main__.py``.
    """
    main = sys.modules.get("__main__")
    name = getattr(getattr(main, "__spec__", None), "name", None)
    if name is not None:
        return name != "__main__" and not name.endswith(".__main__")
    return getattr(main, "__file__", None) is not None


def _not_importable(func: Any) -> str | None:
    """Why a fresh interpreter cannot find ``func`` again by module and qualified name, or None."""
    inner = func
    while isinstance(inner, functools.partial):
        inner = inner.func
    module_name = getattr(inner, "__module__", None) or ""
    module = sys.modules.get(module_name)
    qualname = getattr(inner, "__qualname__", "")
    if module is None or not qualname:
        return "it has no module and name to be imported by"
    if "<" in qualname:
        return "lambdas and nested functions cannot be imported by name"
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    if obj is not inner:
        return f"{module_name}.{qualname} is not this function (a method or a replaced name?)"
    if module_name == "__main__" and not _main_reimportable():
        return (
            "it is defined in __main__ of an interactive session (or python -c, a notebook, a "
            "package's __main__.py), which a fresh interpreter cannot import"
        )
    try:
        pickle.dumps(func)
    except Exception as exc:
        return f"it cannot be pickled ({exc})"
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_task(flow: str, spec: TaskSpec, names: Mapping[str, TaskSpec]) -> None:
    name = spec.name

    def fail(message: str) -> FlowDefinitionError:
        return FlowDefinitionError(f"flow {flow!r}: task {name!r} {message}")

    if name == ALL_OVER:
        raise fail("uses the reserved name 'all_over' (it is ALL_OVER); rename the task")
    if spec.task_func is _MISSING or spec.task_func is None:
        raise fail("has no task_func; pass task_func=<function(state)>")
    for label, func, n, shape in (
        ("task_func", spec.task_func, 1, "(state)"),
        ("child_task_func", spec.child_task_func, 2, "(child, state)"),
    ):
        if func is None:
            continue
        if not callable(func):
            raise fail(f"has {label}={func!r}, which is not callable; pass a function{shape}")
        if not _takes(func, n):
            fname = getattr(func, "__name__", repr(func))
            raise fail(
                f"has {label}={fname}, which cannot be called with {n} argument"
                f"{'s' if n > 1 else ''} {shape}; define it as def {fname}{shape}"
            )
    mc = spec.max_concurrency
    if mc is not None and (not isinstance(mc, int) or isinstance(mc, bool) or mc < 1):
        raise fail(
            f"has max_concurrency={mc!r}; it must be a positive integer, e.g. max_concurrency=10"
        )
    if not isinstance(spec.exit_on_failed, bool):
        raise fail(f"has exit_on_failed={spec.exit_on_failed!r}; use True or False")
    limit = spec.task_retry_limit
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
        raise fail(
            f"has task_retry_limit={limit!r}; it must be an integer >= 0 (attempts in total)"
        )
    timeout = spec.task_timeout
    if timeout is not None and (not _is_number(timeout) or not timeout > 0):
        raise fail(
            f"has task_timeout={timeout!r}; it must be a positive number of seconds, "
            "or None for no limit"
        )
    delay = spec.task_retry_delay
    if not callable(delay) and (not _is_number(delay) or not 0 <= delay < math.inf):
        raise fail(
            f"has task_retry_delay={delay!r}; use finite seconds >= 0 or a function(failed_attempt)"
        )
    rule = spec.retry_on
    is_exc = isinstance(rule, type) and issubclass(rule, BaseException)
    is_excs = isinstance(rule, tuple) and all(
        isinstance(r, type) and issubclass(r, BaseException) for r in rule
    )
    if rule is not None and not (
        is_exc or is_excs or (callable(rule) and not isinstance(rule, type))
    ):
        raise fail(
            f"has retry_on={rule!r}; use an exception type, a tuple of them, or a "
            "predicate(error) -> bool"
        )
    if spec.isolation not in _ISOLATIONS:
        raise fail(
            f"has isolation={spec.isolation!r}, which is unknown; use 'thread' or "
            f"'subprocess'{_suggest(spec.isolation, _ISOLATIONS)}"
        )
    if spec.isolation == "subprocess":
        if not hasattr(os, "killpg"):
            raise fail(
                "has isolation='subprocess', which needs process groups (Linux, macOS, other "
                "POSIX systems); use isolation='thread' here"
            )
        for label in ("task_func", "child_task_func"):
            func = getattr(spec, label)
            why = None if func is None else _not_importable(func)
            if why is not None:
                fname = getattr(func, "__qualname__", None) or repr(func)
                raise fail(
                    f"has {label}={fname}, which a fresh interpreter cannot import by name: "
                    f"{why}. isolation='subprocess' runs it in another process, which needs a "
                    "function defined at the top level of a module; move it to a module and "
                    "import it from there"
                )
    for label in ("executor", "child_executor"):
        value = getattr(spec, label)
        if value is not None and (not isinstance(value, str) or not value):
            raise fail(
                f"has {label}={value!r}; name one of the executors given to "
                f"start_link(executors={{...}}) with a string, e.g. {label}='dask', or leave "
                "it out to use start_link(executor=...)"
            )
    if spec.child_executor is not None and spec.child_task_func is None:
        raise fail(
            f"has child_executor={spec.child_executor!r} but no child_task_func, so it has no "
            "children to run there; use executor= for the task itself"
        )
    nxt = spec.next
    if nxt is _MISSING or nxt is None:
        raise fail("has no next; add next='<task>', next=['a', 'b'] or next=ALL_OVER")
    if isinstance(nxt, str):
        targets = [] if nxt == ALL_OVER else [nxt]
    elif isinstance(nxt, (list, tuple)) and nxt and all(isinstance(n, str) for n in nxt):
        if ALL_OVER in nxt:
            raise fail(f"has next={list(nxt)!r}; ALL_OVER cannot be part of a list")
        if len(set(nxt)) != len(nxt):
            raise fail(f"has next={list(nxt)!r}, which names a task twice")
        targets = list(nxt)
    else:
        raise fail(
            f"has next={nxt!r}; use a task name, a non-empty list of task names, or ALL_OVER"
        )
    for target in targets:
        if target not in names:
            raise fail(f"names next={target!r}, which is not a task{_suggest(target, names)}")
        if target == name:
            raise fail(f"names itself as next; tasks form a cycle: {name} -> {name}")
    spec.successors = tuple(targets)


def _check_flow(cls: type) -> FlowDefinition | None:
    tasks: dict[str, TaskSpec] = {}
    for klass in reversed(cls.__mro__):
        for name, value in vars(klass).items():
            if isinstance(value, TaskSpec):
                tasks[name] = value
            elif name in tasks:  # overridden by a non-task attribute
                del tasks[name]
    if not tasks:
        return None  # an abstract flow: a base class with callbacks, no tasks
    flow = cls.__qualname__
    for spec in tasks.values():
        _check_task(flow, spec, tasks)
    preds: dict[str, set[str]] = {name: set() for name in tasks}
    for spec in tasks.values():
        for target in spec.successors:
            preds[target].add(spec.name)
    try:
        graphlib.TopologicalSorter(preds).prepare()
    except graphlib.CycleError as exc:
        cycle = list(reversed(exc.args[1]))
        raise FlowDefinitionError(
            f"flow {flow!r}: task {cycle[0]!r} is part of a cycle: {' -> '.join(cycle)}; "
            "a flow must be a DAG, so point one of these next= at another task or ALL_OVER"
        ) from None
    entrance = getattr(cls, "default_entrance", None)
    if entrance is None:
        roots = sorted(name for name, p in preds.items() if not p)
        if len(roots) != 1:
            raise FlowDefinitionError(
                f"flow {flow!r}: no default_entrance, and the flow has {len(roots)} first tasks "
                f"{roots}; set default_entrance = '<task>' in the class"
            )
        entrance = roots[0]
    elif not isinstance(entrance, str) or entrance not in tasks:
        raise FlowDefinitionError(
            f"flow {flow!r}: default_entrance={entrance!r} is not a task"
            f"{_suggest(entrance, tasks)}; tasks are {sorted(tasks)}"
        )
    return FlowDefinition(
        flow,
        MappingProxyType(tasks),
        entrance,
        MappingProxyType({n: frozenset(p) for n, p in preds.items()}),
    )


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


def _check_same_flow(definition: FlowDefinition, history: Any) -> None:
    """:raises ReplayError: naming each difference between the flow and the one that wrote
    the log (other task options may change between runs: that is what a fix looks like)."""
    problems = []
    if history.flow is not None and history.flow != definition.name:
        problems.append(f"it was written by flow {history.flow!r}")
    recorded = history.definition
    if recorded is None:
        recorded = {name: None for name in history.tasks}
    for name, nexts in recorded.items():
        spec = definition.tasks.get(name)
        if spec is None:
            problems.append(f"task {name!r} is no longer in the flow (renamed or removed?)")
        elif nexts is not None and sorted(spec.successors) != sorted(nexts):
            now = sorted(spec.successors) or ALL_OVER
            problems.append(f"task {name!r} had next={sorted(nexts) or ALL_OVER!r}, now {now!r}")
    if problems:
        raise ReplayError(
            history.run_id,
            f"run {history.run_id} cannot be replayed with flow {definition.name!r}: "
            + "; ".join(problems)
            + "; replay it with the definition that wrote it",
        )


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
        cls.definition = _check_flow(cls)

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
        _check_same_flow(coord.definition, history)
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
