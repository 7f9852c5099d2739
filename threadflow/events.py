"""The event vocabulary: what the log records, which signal each moment fires, and how user
data becomes the text of an event.

Every row of the ``events`` table has a ``kind`` from :data:`KINDS`; the constants below are the
only spelling of them in the engine. :data:`SIGNAL_OF` says which blinker signal fires for a kind
once it is committed.

Encoding: everything a user hands the engine (child ids, payloads, return values, exceptions,
receivers) passes through here before it reaches the store, where hostile values are tamed:

* text with lone surrogates (what ``os.listdir`` returns for a name that is not UTF-8) is
  stored losslessly as ``\\udcXX`` escapes, which ``json.loads`` turns back into the same text;
* non-finite floats and ints too long to print are refused with :class:`EncodeError`, never
  written as the non-JSON ``NaN``;
* describing an exception or a receiver never raises, whatever its ``__str__`` or
  ``__repr__`` does.
"""

from __future__ import annotations

import json
import re
import traceback
from dataclasses import dataclass
from typing import Any

from .errors import EncodeError

# -- kinds -----------------------------------------------------------------------------------

FLOW_STARTED = "flow_started"  #: a run starts: flow, entrance, server, pid, host, definition
TASK_STARTED = "task_started"  #: an attempt starts
CHILD_ADDED = "child_added"  #: a child is added (attempt = the adder's): payload, by
TASK_OVER = "task_over"  #: an attempt returned: result
CHILDREN_RELEASED = "children_released"  #: a success's children may run: ranges
EXIT = "exit"  #: an attempt raised: error
TIMEOUT = "timeout"  #: an attempt passed its deadline: timeout, error
RETRY = "retry"  #: another attempt is scheduled: delay, next_attempt
TASK_FAILED = "task_failed"  #: a task or child used up its attempts: error, tolerated
CHILDREN_DISCARDED = "children_discarded"  #: a failed attempt's children dropped: count
TASK_ALL_OVER = "task_all_over"  #: a stage and all its children are done: done, failed
ALL_OVER = "all_over"  #: the run ended, every branch over: failed
FAILED_OVER = "failed_over"  #: the run failed: task, error, failed
INTERRUPTED = "interrupted"  #: stop() or a coordinator failure ended the run: reason, error
REPLAYED = "replayed"  #: a replay starts a new segment: segment, previous_outcome, server, pid
ABANDONED = "abandoned"  #: a cancelled attempt did not return in time
STALE = "stale"  #: an outcome of an attempt no longer current: outcome, error, process
CALLBACK_ERROR = "callback_error"  #: a receiver raised: signal, task, receiver, error

#: Every kind the engine writes, in the order of a run's life.
KINDS = (
    FLOW_STARTED,
    TASK_STARTED,
    CHILD_ADDED,
    TASK_OVER,
    TIMEOUT,
    EXIT,
    RETRY,
    TASK_FAILED,
    CHILDREN_DISCARDED,
    CHILDREN_RELEASED,
    TASK_ALL_OVER,
    ALL_OVER,
    FAILED_OVER,
    INTERRUPTED,
    REPLAYED,
    ABANDONED,
    STALE,
    CALLBACK_ERROR,
)
#: Kinds that end a run segment.
FINAL_KINDS = (ALL_OVER, FAILED_OVER, INTERRUPTED)

#: The signal (by name, in :mod:`threadflow.signals`) sent once an event of this kind is
#: committed. Kinds not listed fire no signal.
SIGNAL_OF = {
    FLOW_STARTED: "start_flow",
    REPLAYED: "start_flow",
    TASK_STARTED: "task_start",
    TASK_OVER: "task_over",
    TASK_ALL_OVER: "task_all_over",
    TASK_FAILED: "task_failed",
    TIMEOUT: "task_timeout",
    EXIT: "task_exit",
    RETRY: "task_retry",
    ALL_OVER: "all_over",
    FAILED_OVER: "failed_over",
}


@dataclass(frozen=True)
class Event:
    """One row of the event log, decoded."""

    seq: int
    run_id: str
    ts: str
    kind: str
    task: str | None
    child_id: Any
    attempt: int | None
    ref: int | None
    data: dict[str, Any] | None


def _to_tuple(value: Any) -> Any:
    return tuple(_to_tuple(v) for v in value) if isinstance(value, list) else value


def decode_id(text: str | None) -> Any:
    """A stored child id as Python: JSON lists become (hashable) tuples."""
    return None if text is None else _to_tuple(json.loads(text))


# -- encoding --------------------------------------------------------------------------------

_compact = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode
# Escapes every non-ASCII character, lone surrogates included: valid UTF-8 whatever the text.
_ascii = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode
_SURROGATE = re.compile("[\ud800-\udfff]")


def dumps(value: Any) -> str:
    """Compact JSON text of plain data that SQLite can store (valid UTF-8, no ``NaN``).

    Non-ASCII text is kept readable; only text that does not encode as UTF-8 (lone
    surrogates) falls back to ``\\u`` escapes.

    :raises EncodeError: for a value JSON cannot hold (``nan``/``inf``, an int of more than
        4,300 digits, a cycle, a non-JSON type), saying which and what to pass instead.
    """
    try:
        text = _compact(value)
    except (TypeError, ValueError) as exc:
        raise EncodeError(_why(value, exc)) from None
    return _utf8(text, value)


def _utf8(text: str, value: Any) -> str:
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = _ascii(value)
    return text


def _why(value: Any, exc: BaseException) -> str:
    reason = describe(exc)["message"]
    if "Out of range float" in reason:
        return (
            "it holds a float that is nan or infinite, which JSON cannot store; use None, "
            "a finite number or a string"
        )
    if "integer string conversion" in reason:
        return "it holds an int of more than 4,300 digits; store it as a string"
    if "Circular reference" in reason:
        return "it contains itself (a circular reference); pass a tree of plain data"
    return f"{reason}; pass plain data (dict, list, str, finite numbers, bool, None)"


def safe_text(text: str) -> str:
    """``text`` with each lone surrogate replaced by its ``\\udcXX`` escape: encodable UTF-8.

    Lossless inside a JSON string (the escape decodes to the same character); elsewhere it is
    the readable last resort.
    """
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def safe_repr(obj: Any, limit: int = 1000) -> str:
    """``repr(obj)`` cut to ``limit`` characters, or a placeholder if ``repr`` raises."""
    try:
        text = repr(obj)
    except BaseException:  # a hostile __repr__ must not end the engine
        return f"<{_type_name(type(obj))} object (repr() failed)>"
    if not isinstance(text, str):  # pragma: no cover - repr() enforces str
        return f"<{_type_name(type(obj))} object>"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _type_name(kind: type) -> str:
    try:
        module, name = kind.__module__, kind.__qualname__
        return name if module == "builtins" else f"{module}.{name}"
    except BaseException:  # pragma: no cover - a metaclass that breaks attribute access
        return "<unknown type>"


def describe(exc: BaseException) -> dict[str, str]:
    """An exception's type and message, as stored in events; never raises.

    An exception whose ``__str__`` raises is described by a placeholder rather than ending the
    thread that describes it (a worker, or the coordinator).
    """
    name = _type_name(type(exc))
    try:
        message = str(exc)
    except BaseException as inner:
        message = f"<str() of this {name} raised {_type_name(type(inner))}>"
    return {"type": name, "message": message}


def error_data(exc: BaseException) -> dict[str, str]:
    """An exception as stored data: type, message and traceback text (never pickled)."""
    data = describe(exc)
    try:
        data["traceback"] = "".join(traceback.format_exception(exc))
    except BaseException:  # pragma: no cover - the traceback module guards str() itself
        data["traceback"] = f"{data['type']}: {data['message']}\n(traceback unavailable)\n"
    return data


def error_json(exc: BaseException, **extra: Any) -> str:
    """The ``data`` of an ``exit`` event: ``{"error": error_data(exc), **extra}``."""
    return json.dumps({"error": error_data(exc), **extra})


def encode_result(value: Any) -> str | None:
    """A task's return value as the ``data`` of its ``task_over`` event.

    A value of a type JSON cannot hold is stored as its ``repr`` (``results()`` yields None
    for it); a value JSON could hold but must not (``nan``, an int too long to print, a cycle)
    fails the attempt rather than being stored wrong.

    :raises EncodeError: for such a value.
    """
    if value is None:
        return None
    try:
        text = _compact(value)
    except TypeError:
        return json.dumps({"result": None, "result_repr": safe_repr(value)})
    except ValueError as exc:
        raise EncodeError(
            f"the task returned a {_type_name(type(value))} that cannot be stored: "
            f"{_why(value, exc)}"
        ) from None
    return '{"result":' + _utf8(text, value) + "}"
