"""What an attempt takes to another process, and what it brings back.

Shared by the two ways an attempt leaves the server's process: a subprocess attempt
(``threadflow.processes``) and an attempt in a remote executor (``threadflow.executors``).
Both send a copy of the run's state (its entries that pickle), run the task function there with
a stand-in attempt context, and bring back the result as event data and an exception that
pickles if it can.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import threading
import warnings
from types import MappingProxyType
from typing import Any, Protocol

from .cancel import CancelToken, enter_attempt
from .errors import ThreadflowError
from .events import decode_id, decode_payload, encode_result, error_data
from .messages import Reply

PICKLE = pickle.HIGHEST_PROTOCOL
#: Fields of a task that may hold functions; ``state["task_flow"]`` copies keep them if they
#: pickle.
_FUNCTION_FIELDS = ("task_func", "child_task_func", "task_retry_delay", "retry_on")


# -- the server's side -------------------------------------------------------------------------


class StateCopier:
    """Copies of a run's state for attempts that run elsewhere, one pickle per entry.

    One per pool: it remembers the pickled definition, and which entries it already warned
    about in the current run. Any thread may use it.

    :param where: how the warning says where the task runs (``"runs in a subprocess"``).
    :param hint: how the warning ends: where to read values that do not pickle.
    """

    def __init__(self, where: str, hint: str) -> None:
        self._where = where
        self._hint = hint
        self._lock = threading.Lock()  # guards the warnings below
        self._warned_run: str | None = None
        self._warned: set[str] = set()
        self._flow_blob: tuple[Any, bytes] | None = None

    def blobs(self, att: Any) -> dict[str, bytes]:
        """The run's state as pickles, one per entry; entries that do not pickle are left out
        (a ``RuntimeWarning`` names them once per run)."""
        run_id = att.run.run_id
        entries = dict(att.run.state)  # a snapshot: callbacks may change the state meanwhile
        blobs: dict[str, bytes] = {}
        left: dict[str, str] = {}
        for name, value in entries.items():
            if name == "task_flow":
                blobs[name] = self._flow(value)
                continue
            try:
                blobs[name] = pickle.dumps(value, PICKLE)
            except Exception as exc:
                left[name] = f"{type(value).__name__}: {exc}"
        if left:
            with self._lock:
                if self._warned_run != run_id:
                    self._warned_run, self._warned = run_id, set()
                new = sorted(set(left) - self._warned)
                self._warned.update(new)
            if new:
                listed = "; ".join(f"{name!r} ({left[name]})" for name in new)
                warnings.warn(
                    f"threadflow: task {att.stage.name!r} {self._where}, which gets a copy of "
                    f"the state without the entries that cannot be pickled: {listed}. Put "
                    f"picklable values there (paths, settings, plain data), or {self._hint}",
                    RuntimeWarning,
                    stacklevel=3,
                )
        return blobs

    def _flow(self, definition: Any) -> bytes:
        cached = self._flow_blob
        if cached is None or cached[0] is not definition:
            cached = self._flow_blob = (definition, pickle.dumps(portable(definition), PICKLE))
        return cached[1]


def _picklable(value: Any) -> bool:
    try:
        pickle.dumps(value, PICKLE)
    except Exception:
        return False
    return True


def portable(definition: Any) -> Any:
    """A picklable copy of a flow definition, for ``state["task_flow"]`` in another process.

    Names, graph and options are kept; a function that does not pickle (a thread task's lambda)
    is None in the copy.
    """
    tasks = {}
    for name, spec in definition.tasks.items():
        fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
        for key in _FUNCTION_FIELDS:
            if fields[key] is not None and not _picklable(fields[key]):
                fields[key] = None
        tasks[name] = type(spec)(**fields)
    return dataclasses.replace(
        definition,
        tasks=tasks,
        predecessors=dict(definition.predecessors),
    )


def load_error(blob: bytes | None, att: Any, data: str, where: str) -> BaseException:
    """The exception a task raised elsewhere, or a stand-in if it does not unpickle here.

    :param where: where it ran, for the message (``"its process"``).
    """
    if blob is not None:
        try:
            error = pickle.loads(blob)
        except Exception as exc:
            reason = f"it does not unpickle here: {exc!r}"
        else:
            if isinstance(error, BaseException):
                return error
            reason = "it is not an exception"
    else:
        reason = "it cannot be pickled"
    info = json.loads(data)["error"]
    return ThreadflowError(
        f"task {att.task()!r} attempt {att.number} raised {info['type']}: {info['message']} in "
        f"{where}, and the exception cannot be brought back ({reason}); the exit event "
        "holds its traceback. Make the exception picklable (pass every argument of its "
        "__init__ on to super().__init__) so that retry_on and callbacks see it"
    )


def portable_error(exc: BaseException) -> BaseException:
    """``exc`` if it survives a pickle round trip, else a ``ThreadflowError`` saying it."""
    try:
        pickle.loads(pickle.dumps(exc, PICKLE))
    except Exception:
        return ThreadflowError(f"{type(exc).__name__}: {exc}")
    return exc


# -- the other side ----------------------------------------------------------------------------


class ChildSink(Protocol):
    """Where a remote attempt's ``add_children_tasks`` chunks go: a pipe to the server (a
    subprocess attempt), or a buffer carried back with the outcome (an executor's attempt)."""

    def add(self, ids: list[str], datas: list[str], final: bool) -> Reply:
        """Take a chunk; the reply is answered as the coordinator would answer it."""

    def alive(self) -> bool:
        """False once nothing will answer a reply any more."""


class RemoteAttempt:
    """The attempt context in another process (a ``AttemptContext``),
    what ``current_token()`` and ``add_children_tasks()`` reach there."""

    __slots__ = ("token", "sink", "task_name", "child_json", "has_children", "run_id", "codec")

    def __init__(
        self,
        token: CancelToken,
        sink: ChildSink,
        task: str,
        child_json: str | None,
        has_children: bool,
        run_id: str,
        codec: Any = None,
    ) -> None:
        self.codec = codec
        self.token = token
        self.sink = sink
        self.task_name = task
        self.child_json = child_json
        self.has_children = has_children
        self.run_id = run_id

    def send_children(self, ids: list[str], datas: list[str], final: bool) -> Reply:
        return self.sink.add(ids, datas, final)

    def engine_alive(self) -> bool:
        return self.sink.alive()


def run_job(
    ctx: RemoteAttempt,
    data_json: str | None,
    func: Any,
    blobs: dict[str, bytes],
    where: str,
) -> tuple[Any, ...]:
    """Run one attempt here; never raises.

    :param func: the task function, or its pickle (it travels by import name when it can).
    :param where: where this runs, for messages (``"its worker process"``).
    :returns: ``("over", data)``, or ``("exit", exc_blob, data)`` with ``exc_blob`` None if the
        exception does not survive a pickle round trip; ``data`` is the event's data.
    """
    task = ctx.task_name
    try:
        if isinstance(func, bytes):
            try:
                func = pickle.loads(func)
            except Exception as exc:
                raise ThreadflowError(
                    f"task {task!r}: {where} cannot import the task function ({exc!r}); it "
                    "must be importable by name there, with the server's sys.path (and, on "
                    "another machine, the same code installed)"
                ) from exc
        state: dict[str, Any] = {}
        for name, pickled in blobs.items():
            try:
                state[name] = pickle.loads(pickled)
            except Exception as exc:
                raise ThreadflowError(
                    f"task {task!r}: the state entry {name!r} pickled in the server but does "
                    f"not unpickle in {where} ({exc!r}); put plain data there"
                ) from exc
        view = MappingProxyType(state)
        enter_attempt(ctx)
        if ctx.child_json is None:
            value = func(view)
        else:
            assert data_json is not None
            value = func((decode_id(ctx.child_json), decode_payload(data_json, ctx.codec)), view)
        return ("over", encode_result(value, ctx.codec))
    except BaseException as exc:
        blob: bytes | None
        try:
            blob = pickle.dumps(exc, PICKLE)
            pickle.loads(blob)  # the classic failure is on this side: __init__ arguments
        except Exception:
            blob = None
        return ("exit", blob, json.dumps({"error": error_data(exc)}))
    finally:
        enter_attempt(None)
