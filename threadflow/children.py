"""Adding children from inside a task, and reading their results."""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from .cancel import current_context
from .errors import CancelledError, EncodeError
from .events import coded, dumps, safe_repr
from .messages import AttemptContext, Reply

#: Children are sent to the coordinator this many at a time.
CHUNK = 250
#: Chunks a worker may send ahead before waiting for the coordinator to take them.
IN_FLIGHT = 4

_SCALARS = (str, int, float, bool, type(None))


def _valid_id(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_valid_id(v) for v in value)
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, _SCALARS)


def encode_id(task: str, child_id: Any) -> str:
    """The canonical JSON text of a child id (``1``, ``1.0`` and ``True`` stay distinct).

    :raises TypeError: naming the child, if the id is not a JSON scalar or a list of them
        (``EncodeError`` if it is one JSON cannot hold: nan, an int too long to print).
    """
    if not _valid_id(child_id):
        raise TypeError(
            f"task {task!r}: child id {safe_repr(child_id, 200)} is not a JSON scalar or a list "
            "of them; use str, int, float, bool, None or a list/tuple of those"
        )
    try:
        return dumps(child_id)
    except EncodeError as exc:
        raise EncodeError(f"task {task!r}: child id {safe_repr(child_id, 200)}: {exc}") from None


def _encode_child(task: str, item: Any, by: str, codec: Any = None) -> tuple[str, str]:
    try:
        child_id, payload = item
    except (TypeError, ValueError):
        raise TypeError(
            f"task {task!r}: each child must be a (child_id, payload) pair, got "
            f"{safe_repr(item, 200)}"
        ) from None
    # Plain ints are most ids: their JSON is their decimal text (bool is not an int here).
    cid = None
    if type(child_id) is int:
        try:
            cid = str(child_id)
        except ValueError:  # more than 4,300 digits: encode_id says so
            pass
    if cid is None:
        cid = encode_id(task, child_id)
    if payload is None:
        return cid, '{"payload":null,"by":' + by + "}"
    try:
        payload_json = dumps(payload)
    except EncodeError as exc:
        if codec is not None:  # what JSON cannot hold goes through the flow's codec
            what = f"task {task!r}: the payload of child {safe_repr(child_id, 200)}"
            text = json.dumps(coded(codec, payload, what))
            return cid, '{"payload":null,"coded":' + text + ',"by":' + by + "}"
        raise EncodeError(
            f"task {task!r}: the payload of child {safe_repr(child_id, 200)} cannot be stored: "
            f"{exc}"
        ) from None
    return cid, '{"payload":' + payload_json + ',"by":' + by + "}"


def _attempt_for(state: Mapping[str, Any], where: str) -> AttemptContext:
    ctx = current_context()
    if ctx is None:
        raise RuntimeError(
            f"threadflow.{where}() was called outside a task; call it from inside a task_func "
            "or child_task_func"
        )
    if not ctx.has_children:
        raise RuntimeError(
            f"threadflow.{where}(): task {ctx.task_name!r} has no child_task_func, so it cannot "
            "have children; add child_task_func=<function(child, state)> to its task()"
        )
    if state.get("run_id") != ctx.run_id:
        raise RuntimeError(
            f"threadflow.{where}(): the state passed belongs to another run; pass the state "
            "your task received"
        )
    return ctx


def add_children_tasks(children: Iterable[tuple[Any, Any]], state: Mapping[str, Any]) -> None:
    """Add children ``(child_id, payload)`` to the running task; they are durable on return.

    ``children`` may be any iterable, a generator included: it is consumed in chunks of
    ``CHUNK``, at most ``IN_FLIGHT`` of them sent ahead to the coordinator; the call
    returns once the last chunk is committed. The children start once the calling attempt
    succeeds, and are discarded if it fails.

    :raises RuntimeError: outside a task, or in a task without ``child_task_func``.
    :raises TypeError: naming the child, for an id or payload that is not JSON.
    :raises DuplicateChildError: for an id already added to this task in this run.
    :raises CancelledError: if the attempt was cancelled meanwhile.
    """
    ctx = _attempt_for(state, "add_children_tasks")
    task, by, codec = ctx.task_name, ctx.child_json or "null", ctx.codec
    ctx.token.raise_if_cancelled()
    ids: list[str] = []
    datas: list[str] = []
    sent: deque[Reply] = deque()  # chunks not yet answered, oldest first
    for item in children:
        cid, data = _encode_child(task, item, by, codec)
        ids.append(cid)
        datas.append(data)
        if len(ids) >= CHUNK:
            # Not the last chunk: no need to wait for it to be on disk, only for room.
            sent.append(ctx.send_children(ids, datas, final=False))
            if len(sent) >= IN_FLIGHT:
                _wait(ctx, sent.popleft())
            ids, datas = [], []
    # The last chunk (maybe empty) is answered only once committed, and after every earlier
    # one: when it returns, all of them are in the store.
    last = ctx.send_children(ids, datas, final=True)
    while sent:
        _wait(ctx, sent.popleft())
    _wait(ctx, last)


def add_child_task(child_id: Any, payload: Any, state: Mapping[str, Any]) -> None:
    """Add one child; see ``add_children_tasks``."""
    ctx = _attempt_for(state, "add_child_task")
    ctx.token.raise_if_cancelled()
    cid, data = _encode_child(
        ctx.task_name, (child_id, payload), ctx.child_json or "null", ctx.codec
    )
    _wait(ctx, ctx.send_children([cid], [data], final=True))


def _wait(ctx: AttemptContext, reply: Reply) -> None:
    wait_reply(ctx, reply)


def wait_reply(ctx: AttemptContext, reply: Reply) -> None:
    """Wait for the answer to a chunk of children; raise the error it carries.

    The coordinator answers every chunk it takes, also when it stops; if it died instead, stop
    waiting rather than hang the worker forever.
    """
    while not reply.event.wait(0.5):
        if not ctx.engine_alive():
            raise CancelledError("stop")
    if reply.error is not None:
        raise reply.error


def results(state: Mapping[str, Any], task: str) -> Iterator[tuple[Any, Any]]:
    """``(child_id, result)`` pairs of ``task``'s finished children in the run of ``state``.

    In the order the children were added; streamed from the store. Works during the run (from a
    task or callback) and after it (from ``RunResult.state``).

    :raises ValueError: if ``task`` is not a task of the flow.
    """
    flow = _check_task(state, task)
    codec = None if flow is None else flow.codec
    return state["store"].results(state["run_id"], task, codec)  # type: ignore[no-any-return]


def output(state: Mapping[str, Any], task: str) -> Any:
    """The value ``task``'s ``task_func`` returned in the run of ``state``.

    Read from the log, so it survives a replay: a later stage reads what an earlier one
    returned even when that stage ran in a segment before a crash. (Children's values are
    :func:`results`.)

    :raises ValueError: if ``task`` is not a task of the flow, or has not returned in this
        run (yet): call it from a stage that comes after ``task``, or from its children.
    """
    flow = _check_task(state, task)
    run_id = state["run_id"]
    found, value = state["store"].output(run_id, task, None if flow is None else flow.codec)
    if not found:
        raise ValueError(
            f"task {task!r} has not returned in run {run_id} (yet), so it has no output; read "
            "it from a stage that runs after it (next=...) or from its children"
        )
    return value


def _check_task(state: Mapping[str, Any], task: str) -> Any:
    """The run's flow definition (None in a state without one), once ``task`` is found in it."""
    flow = state.get("task_flow")
    if flow is not None and task not in flow.tasks:
        raise ValueError(
            f"flow {flow.name!r} has no task {task!r}; its tasks are {sorted(flow.tasks)}"
        )
    return flow
