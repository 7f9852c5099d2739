"""A flow's definition: ``task``, ``ALL_OVER``, and the checks made when the class is made.

A flow is a class; each ``task`` attribute is a stage. ``check_flow`` turns the class's
tasks into a ``FlowDefinition`` or raises ``FlowDefinitionError`` naming the flow, the
task and the fix, so a bad flow fails at import, not in the middle of a run. Nothing here runs
anything: the engine reads the definition, the definition knows nothing of the engine.
"""

from __future__ import annotations

import difflib
import functools
import graphlib
import inspect
import math
import os
import pickle
import re
import shlex
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .errors import FlowDefinitionError, ReplayError
from .events import RunHistory, codec_ref

#: ``next=ALL_OVER`` ends a branch; the run is over when every branch has reached it.
ALL_OVER = "all_over"

_ISOLATIONS = ("thread", "subprocess")

#: ``rate_limit`` as written: a positive number, ``/``, a unit; spaces around each part.
_RATE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*/\s*([smh])\s*")
#: Seconds per unit of ``rate_limit``.
_RATE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


#: State entries threadflow sets in every run (start_link entries and inputs take other names).
RESERVED = frozenset({"start_time", "run_id", "store", "task_flow", "replayed"})


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING: Any = _Missing()


@dataclass(eq=False)
class TaskSpec:
    """One stage of a flow, as written with ``task``. Checked when the flow class is made."""

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
    rate_limit: Any = None
    name: str = ""
    #: Names of the next tasks; empty for ``ALL_OVER``. Set by the definition check.
    successors: tuple[str, ...] = field(default=())
    #: Seconds at least between two starts of this task's child attempts (``rate_limit``), or
    #: 0.0 for no limit. Set by the definition check.
    rate_interval: float = field(default=0.0)

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
    rate_limit: str | None = None,
) -> TaskSpec:
    """Declare a task of a ``Flow``; the attribute name is the task name.

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
    :param rate_limit: how often this task's child attempts may start, as ``"N/s"``, ``"N/m"``
        or ``"N/h"`` (N a positive number, e.g. ``"20/s"``, ``"0.5/s"``): evenly spaced, at
        least 1/N of the unit apart, never in a burst; retries count. The coordinator keeps
        the pace for the server, across its runs (None: no limit). See docs/rate-limits.md.
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
        rate_limit=rate_limit,
    )


@dataclass(frozen=True)
class FlowDefinition:
    """A checked flow: its tasks, the default entrance and the graph (``state["task_flow"]``)."""

    name: str
    tasks: Mapping[str, TaskSpec]
    default_entrance: str
    predecessors: Mapping[str, frozenset[str]]
    #: ``module:Class`` by which a fresh interpreter imports the flow (what ``threadflow replay``
    #: uses when no ``--flow`` is given), or None for a class it cannot import by name.
    import_path: str | None = None
    #: The flow's ``codec`` (None: plain JSON only).
    codec: Any = None
    #: Per task, the fingerprints of its functions (``task_func``, ``child_task_func``), taken
    #: when the class is made, while its module's source is the code that was imported: what
    #: ``flow_started`` and ``replayed`` record, and what a replay compares (see
    #: ``_fingerprint.py``). Plain dicts, as the events write them (never changed).
    fingerprints: dict[str, dict[str, str | None]] = field(default_factory=dict)

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
                f"{suggest(entrance, self.tasks)}; tasks are {sorted(self.tasks)}"
            )


def suggest(name: Any, names: Any) -> str:
    """``; did you mean 'x'?`` for the closest of ``names`` to a misspelt ``name``, or ''."""
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
    process runs it again under the name ``__mp_main__``, as ``multiprocessing`` does, so
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


def rate_interval(rate_limit: object) -> float | None:
    """Seconds between two starts that ``rate_limit`` (``"20/s"``, ``"0.5/m"``...) allows, or
    None if it is not written that way."""
    match = _RATE.fullmatch(rate_limit) if isinstance(rate_limit, str) else None
    if match is None:
        return None
    count = float(match.group(1))
    if not 0 < count < math.inf:  # "0/s" is no rate; 400 digits overflow to inf
        return None
    return _RATE_UNITS[match.group(2)] / count


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
            f"'subprocess'{suggest(spec.isolation, _ISOLATIONS)}"
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
    if spec.rate_limit is not None:
        interval = rate_interval(spec.rate_limit)
        if interval is None:
            raise fail(
                f"has rate_limit={spec.rate_limit!r}, which is not a rate; write how many child "
                "attempts may start per second, minute or hour as 'N/s', 'N/m' or 'N/h' with N "
                "a positive number, e.g. rate_limit='20/s', '0.5/s' or '120/m' (None: no limit)"
            )
        if spec.child_task_func is None:
            raise fail(
                f"has rate_limit={spec.rate_limit!r} but no child_task_func; the limit paces "
                "the starts of a task's children, so give it a child_task_func or leave "
                "rate_limit out"
            )
        spec.rate_interval = interval
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
            raise fail(f"names next={target!r}, which is not a task{suggest(target, names)}")
        if target == name:
            raise fail(f"names itself as next; tasks form a cycle: {name} -> {name}")
    spec.successors = tuple(targets)


def check_flow(cls: type) -> FlowDefinition | None:
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
            f"{suggest(entrance, tasks)}; tasks are {sorted(tasks)}"
        )
    codec = getattr(cls, "codec", None)
    if codec is not None and not (
        callable(getattr(codec, "dumps", None)) and callable(getattr(codec, "loads", None))
    ):
        raise FlowDefinitionError(
            f"flow {flow!r}: codec={codec!r} has no dumps() and loads(); give an object with "
            "dumps(value) -> str and loads(str) -> value, such as a module"
        )
    if codec is not None and any(t.isolation == "subprocess" for t in tasks.values()):
        try:
            pickle.dumps(codec_ref(codec))
        except Exception as exc:
            raise FlowDefinitionError(
                f"flow {flow!r}: codec={codec!r} cannot travel to a subprocess attempt ({exc}); "
                "use a module, or an object defined at the top level of a module"
            ) from None
    module = getattr(cls, "__module__", "") or ""
    importable = module not in ("", "__main__") and "<" not in cls.__qualname__
    # Here, not at the top: it brings ast, hashlib and dis, which a reader of the store (the
    # CLI, the dashboard) that defines no flow never needs.
    from ._fingerprint import task_fingerprints

    return FlowDefinition(
        flow,
        MappingProxyType(tasks),
        entrance,
        MappingProxyType({n: frozenset(p) for n, p in preds.items()}),
        f"{module}:{cls.__qualname__}" if importable else None,
        codec,
        task_fingerprints(tasks),
    )


def check_same_flow(definition: FlowDefinition, history: RunHistory) -> None:
    """:raises ReplayError: naming each difference between the flow and the one that wrote
    the log (other task options may change between runs: that is what a fix looks like)."""
    problems = []
    if history.entrance not in definition.tasks:
        problems.append(f"its log names no entrance of this flow ({history.entrance!r})")
    if history.flow is not None and history.flow != definition.name:
        problems.append(f"it was written by flow {history.flow!r}")
    recorded: Mapping[str, list[str] | None] = (
        history.definition
        if history.definition is not None
        else {name: None for name in history.tasks}
    )
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


#: What a replay does with stages whose code changed since the log was written.
ON_CHANGE = ("refuse", "rerun", "continue")


def check_on_change(on_change: object, run_id: str = "") -> None:
    """:raises ReplayError: (a ``ValueError``) unless ``on_change`` is one of :data:`ON_CHANGE`."""
    if on_change not in ON_CHANGE:
        raise ReplayError(
            run_id, f"on_change must be 'refuse', 'rerun' or 'continue', not {on_change!r}"
        )


@dataclass(frozen=True)
class CodeChanges:
    """The code of a flow now against the fingerprints a run's log recorded.

    :ivar verdict: per task, ``"unchanged"``, ``"changed"``, ``"added"`` (in the code, not in
        the log) or ``"removed"`` (in the log, not in the code); empty when the log recorded no
        fingerprints (written before they were): there is nothing to compare.
    :ivar functions: per changed task, which of its functions changed (``task_func``,
        ``child_task_func``).
    :ivar changed: the changed or added tasks a replay of this run can reach, sorted.
    :ivar rerun: those and every stage after them (by ``next``) that the run can reach: what
        ``on_change="rerun"`` runs again from scratch.
    """

    verdict: Mapping[str, str]
    functions: Mapping[str, list[str]]
    changed: list[str]
    rerun: frozenset[str]

    @property
    def compared(self) -> bool:
        """Whether the log recorded fingerprints to compare with."""
        return bool(self.verdict)


def code_changes(definition: FlowDefinition, history: RunHistory) -> CodeChanges:
    """Compare the task functions of ``definition`` with those that last ran ``history``'s run
    (recorded by its ``flow_started`` or latest ``replayed``)."""
    now = definition.fingerprints
    recorded = history.fingerprints
    from ._fingerprint import compare, differs

    verdict = compare(recorded, now)
    functions: dict[str, list[str]] = {}
    for name, state in verdict.items():
        if state == "changed" and recorded is not None:
            old = recorded.get(name) or {}
            functions[name] = [key for key, fp in now[name].items() if differs(old.get(key), fp)]
    entrance = history.entrance
    reachable = (
        definition.reachable(entrance)
        if entrance is not None and entrance in definition.tasks
        else frozenset()
    )
    changed = sorted(n for n in reachable if verdict.get(n) in ("changed", "added"))
    # The changed stages and every stage after them: each one's own reach (within the run's).
    rerun = frozenset().union(*(definition.reachable(n) for n in changed))
    return CodeChanges(verdict, functions, changed, rerun)


def check_code(
    definition: FlowDefinition,
    history: RunHistory,
    on_change: str,
    store: str | None = None,
) -> frozenset[str]:
    """The stages a replay of ``history``'s run must run again from scratch.

    :param on_change: ``"refuse"``, ``"rerun"`` or ``"continue"`` (see ``Flow.replay``).
    :param store: the store's path, for the message.
    :returns: the stages to rerun: empty unless ``on_change="rerun"`` and some changed.
    :raises ReplayError: for another ``on_change``, or with ``"refuse"`` if the code of a
        stage the run can reach changed, naming each and the ways to go on.
    """
    run_id = history.run_id
    check_on_change(on_change, run_id)
    changes = code_changes(definition, history)
    if not changes.changed or on_change == "continue":
        return frozenset()
    if not any(n in history.tasks and history.tasks[n].started for n in changes.rerun):
        # None of them has started: they run the new code whatever on_change says.
        return frozenset()
    if on_change == "rerun":
        return changes.rerun
    what = []
    for name in changes.changed:
        if changes.verdict[name] == "added":
            what.append(f"{name!r} (new)")
        else:
            what.append(f"{name!r} ({', '.join(changes.functions.get(name) or ['code'])})")
    at = f", store={store!r}" if store is not None else ""
    db = f" --db {shlex.quote(store)}" if store is not None else ""
    after = sorted(changes.rerun - set(changes.changed))
    rerun_too = f" and those after them ({', '.join(map(repr, after))})" if after else ""
    raise ReplayError(
        run_id,
        f"run {run_id}: the code of task{'s' if len(what) > 1 else ''} {', '.join(what)} "
        f"changed since the run last ran; to run the changed stages{rerun_too} again from "
        f"scratch, replay with on_change='rerun' ({definition.name}.replay({run_id!r}{at}, "
        f"on_change='rerun'), or threadflow replay {run_id}{db} --on-change rerun); to keep "
        "their finished work and run only what is unfinished with the new code, use "
        "on_change='continue' (--on-change continue); threadflow replay "
        f"{run_id}{db} --diff lists the changes",
        changes.changed,
    )
