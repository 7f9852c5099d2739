"""The event vocabulary: what the log records, which signal each moment fires, how user data
becomes the text of an event, and the one fold that reads a run back from its events.

Every row of the ``events`` table has a ``kind`` from :data:`KINDS`; the constants below are the
only spelling of them in the engine. :data:`SIGNAL_OF` says which blinker signal fires for a kind
once it is committed.

:func:`fold` (a :class:`RunHistory` fed event by event) is the only definition of what a log
means: a run's outcome, its segments and their durations, and per task its attempts and its
children added, done, failed, tolerated, recovered and running. Replay, the command line, the
timeline, the live progress and remote run handles all read it; ``EventStore.history`` is the
same function computed by SQLite (see ``tests/test_fold.py``). :func:`run_status` adds what the
log cannot know: whether the owner of an unfinished run is still alive.

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

import datetime
import heapq
import importlib
import json
import os
import re
import socket
import traceback
import types
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ._clock import wall
from .errors import EncodeError

# -- kinds -----------------------------------------------------------------------------------

#: a run starts: flow, import, entrance, inputs, server, pid, host, definition
FLOW_STARTED = "flow_started"
TASK_STARTED = "task_started"  #: an attempt starts
CHILD_ADDED = "child_added"  #: a child is added (attempt = the adder's): payload, by
TASK_OVER = "task_over"  #: an attempt returned: result
#: a child attempt that started and returned within one commit of the log (no task_started row
#: is written for it): result, started (its start's ts)
TASK_RAN = "task_ran"
CHILDREN_RELEASED = "children_released"  #: a success's children may run: ranges
EXIT = "exit"  #: an attempt raised: error
TIMEOUT = "timeout"  #: an attempt passed its deadline: timeout, error
RETRY = "retry"  #: another attempt is scheduled: delay, next_attempt
TASK_FAILED = "task_failed"  #: a task or child used up its attempts: error, tolerated
CHILDREN_DISCARDED = "children_discarded"  #: a failed attempt's children dropped: count
TASK_ALL_OVER = "task_all_over"  #: a stage and all its children are done: done, failed
ALL_OVER = "all_over"  #: the run ended, every branch over: failed
FAILED_OVER = "failed_over"  #: the run failed: task, error, failed
CANCELLED = "cancelled"  #: the run was cancelled (handle.cancel(), threadflow cancel): reason
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
    TASK_RAN,
    TIMEOUT,
    EXIT,
    RETRY,
    TASK_FAILED,
    CHILDREN_DISCARDED,
    CHILDREN_RELEASED,
    TASK_ALL_OVER,
    ALL_OVER,
    FAILED_OVER,
    CANCELLED,
    INTERRUPTED,
    REPLAYED,
    ABANDONED,
    STALE,
    CALLBACK_ERROR,
)
#: Kinds that end a run segment.
FINAL_KINDS = (ALL_OVER, FAILED_OVER, CANCELLED, INTERRUPTED)

#: The signal (by name, in :mod:`threadflow.signals`) sent once an event of this kind is
#: committed. Kinds not listed fire no signal.
SIGNAL_OF = {
    FLOW_STARTED: "start_flow",
    REPLAYED: "start_flow",
    TASK_STARTED: "task_start",
    TASK_OVER: "task_over",
    TASK_RAN: "task_over",  # (its task_start fired when it started)
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
    if text is None:
        return None
    # Most ids are ints, written as their decimal text: no JSON parser for them.
    digits = text[1:] if text[:1] == "-" else text
    if digits.isdigit() and digits.isascii():
        return int(text)
    return _to_tuple(json.loads(text))


#: A child's data when its payload is None (the common case), as children.py writes it.
_NULL_PAYLOAD = '{"payload":null,"by":'


def decode_payload(data: str | None, codec: Any) -> Any:
    """A child's payload from its ``child_added`` data (what ``children.py`` wrote)."""
    if data is None or (data.startswith(_NULL_PAYLOAD) and '"coded"' not in data):
        return None
    return decoded(json.loads(data), "payload", codec)


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


def encode_result(value: Any, codec: Any = None) -> str | None:
    """A task's return value as the ``data`` of its ``task_over`` event.

    Plain data is stored as JSON (``{"result": ...}``). A value of another type goes through
    the flow's ``codec`` when it has one (``{"coded": "<codec.dumps(value)>"}``). Nothing is
    lost in silence: a value neither can hold (a ``pathlib.Path`` without a codec, ``nan``, an
    int too long to print, a cycle) fails the attempt, without retries.

    :raises EncodeError: for such a value, naming its type and what to return instead.
    """
    if value is None:
        return None
    try:
        text = _compact(value)
    except (TypeError, ValueError) as exc:
        if codec is not None:
            return json.dumps({"coded": coded(codec, value, "the task's return value")})
        raise EncodeError(
            f"the task returned a {_type_name(type(value))} that cannot be stored: "
            f"{_why(value, exc)}"
            + ("" if codec is not None else "; or give the flow a codec (see docs)")
        ) from None
    return '{"result":' + _utf8(text, value) + "}"


def coded(codec: Any, value: Any, what: str) -> str:
    """``codec.dumps(value)``, checked to be text.

    :raises EncodeError: if the codec raises or does not return a ``str``.
    """
    try:
        text = codec.dumps(value)
    except Exception as exc:
        raise EncodeError(
            f"{what} (a {_type_name(type(value))}) cannot be stored: the flow's codec raised "
            f"{describe(exc)['type']}: {describe(exc)['message']}"
        ) from None
    if not isinstance(text, str):
        raise EncodeError(
            f"the flow's codec returned a {_type_name(type(text))} for {what}; "
            "codec.dumps(value) must return a str"
        )
    return text


def decoded(data: dict[str, Any] | None, key: str, codec: Any) -> Any:
    """The value stored under ``key`` of event data, or the one the codec stored as
    ``"coded"``: decoded with ``codec``, or its text when no codec is given."""
    if not data:
        return None
    if "coded" in data:
        text = data["coded"]
        return codec.loads(text) if codec is not None else text
    return data.get(key)


def codec_ref(codec: Any) -> Any:
    """How a codec travels to another process: a module by its name, anything else as is
    (pickled by reference, as functions are)."""
    if isinstance(codec, types.ModuleType):
        return ("module", codec.__name__)
    return codec


def codec_of(ref: Any) -> Any:
    """The codec a :func:`codec_ref` names."""
    if isinstance(ref, tuple) and len(ref) == 2 and ref[0] == "module":
        return importlib.import_module(ref[1])
    return ref


# -- the fold --------------------------------------------------------------------------------


def ts_datetime(ts: object) -> datetime.datetime | None:
    """A stored time (an event's ``ts``, ISO 8601) as an aware datetime, UTC if it names no
    zone; None for none or for text that is not a time."""
    if not isinstance(ts, str):
        return None
    try:
        when = datetime.datetime.fromisoformat(ts)
    except ValueError:
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=datetime.timezone.utc)


def ts_seconds(ts: str | None) -> float | None:
    """An event's ``ts`` (ISO 8601) as seconds since the epoch; None for none or a bad one."""
    when = ts_datetime(ts)
    return None if when is None else when.timestamp()


@dataclass
class Span:
    """One segment of a run: its first run, or a replay.

    It begins at its ``flow_started`` or ``replayed`` event and ends at its final event
    (``all_over``, ``failed_over``, ``interrupted``); a segment without one (still running, or
    its process died) ends, so far, at its last event. Events after the final one (a late
    outcome, a callback error) do not lengthen it.
    """

    seq: int  #: seq of its flow_started or replayed event
    start: str  #: ts of that event
    end: str  #: ts of its final event, else of its last event
    outcome: str | None = None  #: its final kind; None while it has none

    @property
    def seconds(self) -> float | None:
        start, end = ts_seconds(self.start), ts_seconds(self.end)
        return None if start is None or end is None else max(0.0, end - start)


@dataclass(frozen=True)
class RunningAttempt:
    """An attempt that has started and has no outcome yet, in the run's open segment: what a
    run is waiting on. ``Progress.slowest`` lists the oldest ones; the live progress of
    ``threadflow run`` names them.

    :ivar task: the task's name.
    :ivar child_id: the child's id, or None for the parent attempt (see ``parent``: None is
        also a valid child id).
    :ivar attempt: the attempt's number (from 1 in each segment).
    :ivar since: when it started: the ``ts`` of its ``task_started`` event.
    :ivar seconds: how long it had been running when it was read; None if no time was given.
    :ivar parent: True for the task's parent attempt.
    :ivar seq: the seq of its ``task_started`` event.
    """

    task: str
    child_id: Any
    attempt: int | None
    since: str
    seconds: float | None = None
    parent: bool = False
    seq: int = 0


def _seconds_between(since: str, now: str | None) -> float | None:
    start, end = ts_seconds(since), ts_seconds(now)
    return None if start is None or end is None else max(0.0, end - start)


@dataclass
class TaskHistory:
    """One task of a run: its parent attempts, its children, and what became of them.

    Child counts cover every segment. A child is counted once whatever its attempts: it is
    *done* once it has a ``task_over``; *failed* while its last outcome is a failure (it used up
    its attempts, and has not succeeded since); *tolerated* if that failure was tolerated
    (``exit_on_failed=False``: the child is finished and never runs again); *recovered* if it
    failed in one segment and succeeded in a later one (it counts as done, not failed).
    """

    name: str
    #: A parent attempt started, returned; the parent's state: None (never started),
    #: ``"running"`` (or waiting to retry), ``"over"``, ``"failed"``.
    started: bool = False
    parent_over: bool = False
    parent: str | None = None
    #: Its ``task_all_over``: the stage and all its children are done (and when).
    all_over: bool = False
    ended: str | None = None
    attempts: int = 0  #: parent attempts started
    #: Children the task has: added by attempts that succeeded (released) or are still running;
    #: not those of attempts that failed (discarded) or were cut off by the end of a segment.
    children_added: int = 0
    children_started: int = 0  #: child attempts started (a retried child counts once per attempt)
    children_done: int = 0
    children_failed: int = 0
    children_tolerated: int = 0
    children_recovered: int = 0
    #: Child attempts started and not ended, while the last segment is open.
    children_running: int = 0
    exits: int = 0  #: parent and child attempts that raised
    timeouts: int = 0
    retries: int = 0
    abandoned: int = 0
    #: Seq ranges of ``child_added`` rows released by successful attempts, in release order:
    #: the children a replay may run.
    released: list[tuple[int, int]] = field(default_factory=list)
    first_ts: str | None = None  #: its first event
    last_ts: str | None = None  #: its last event
    # What the fold keeps to count; per child only for children that failed or are running.
    _released_rows: int = field(default=0, repr=False)
    _seg_added: int = field(default=0, repr=False)  # child_added rows in the last segment
    _seg_gone: int = field(default=0, repr=False)  # of those, released or discarded
    _failed: set[int] = field(default_factory=set, repr=False)
    _tolerated: set[int] = field(default_factory=set, repr=False)
    # Child attempts running in the open segment: (ref, attempt) -> (seq, ts, child id) of
    # their task_started. As many as run at once (max_concurrency), never one per child.
    _open: dict[tuple[int, int | None], tuple[int, str, Any]] = field(
        default_factory=dict, repr=False
    )
    # The parent attempt running in the open segment: (seq, ts, attempt) of its task_started.
    _parent_open: tuple[int, str, int | None] | None = field(default=None, repr=False)

    def _settle(self, segment_open: bool) -> None:
        """Derive the counts from what the fold keeps."""
        held = self._seg_added - self._seg_gone if segment_open else 0
        self.children_added = self._released_rows + held
        self.children_running = len(self._open) if segment_open else 0
        self.children_failed = len(self._failed)
        self.children_tolerated = len(self._tolerated)

    def _end_parent(self, attempt: int | None) -> None:
        if self._parent_open is not None and self._parent_open[2] == attempt:
            self._parent_open = None

    def _close_segment(self) -> None:
        """The segment ended (or a new one begins): nothing of it runs any more."""
        self._open.clear()
        self._parent_open = None

    def running_attempts(
        self, now: str | None = None, limit: int | None = None
    ) -> list[RunningAttempt]:
        """The task's attempts running in the open segment, its parent's and its children's,
        oldest first.

        :param now: the time (ISO 8601) to measure ``RunningAttempt.seconds`` to.
        :param limit: only the ``limit`` oldest.
        """
        # (seq, attempt, ts, child id, parent): seq orders them by start.
        found = [
            (seq, attempt, ts, cid, False) for (_, attempt), (seq, ts, cid) in self._open.items()
        ]
        if self._parent_open is not None:
            seq, ts, attempt = self._parent_open
            found.append((seq, attempt, ts, None, True))
        oldest = sorted(found) if limit is None else heapq.nsmallest(limit, found)
        return [
            RunningAttempt(self.name, cid, attempt, ts, _seconds_between(ts, now), parent, seq)
            for seq, attempt, ts, cid, parent in oldest
        ]


def _task_tuple(value: Any) -> tuple[Any, ...] | None:
    if not isinstance(value, list) or not value:
        return None
    return (value[0], *(_to_tuple(v) for v in value[1:]))


@dataclass
class RunHistory:
    """A run as its log tells it, fed one event at a time (:meth:`add`) in seq order.

    ``outcome`` is None while the last segment has not ended. Durations have two names:
    :attr:`active` (seconds the run was running: the sum of its segments' spans, the time
    between a crash and its replay not counted) and :attr:`wall` (from its first event to its
    last).
    """

    run_id: str
    flow: str | None = None
    server: str | None = None
    entrance: str | None = None
    definition: dict[str, list[str]] | None = None
    #: The run's inputs (``start_flow(**inputs)``), as recorded: a replay gets them back.
    inputs: dict[str, Any] = field(default_factory=dict)
    #: ``module:Class`` of the flow that started it, when importable: what replays it.
    flow_import: str | None = None
    #: The inputs as the flow's codec wrote them, when JSON could not hold them.
    inputs_coded: str | None = None
    #: Fingerprints of the task functions of the code that ran last (its ``flow_started`` or
    #: latest ``replayed``: ``{task: {"task_func": fp, "child_task_func": fp}}``); None for a
    #: log written before they were recorded.
    fingerprints: dict[str, Any] | None = None
    #: Stages a replay ran again from scratch (``on_change="rerun"``), with the seq of that
    #: replay's ``replayed`` event: their work before it is forgotten.
    reruns: dict[str, int] = field(default_factory=dict)
    started: str | None = None  #: ts of its flow_started
    ended: str | None = None  #: ts of the final event of its last segment; None while open
    outcome: str | None = None
    segments: int = 0
    spans: list[Span] = field(default_factory=list)
    tasks: dict[str, TaskHistory] = field(default_factory=dict)
    #: Children whose failure was tolerated, in the order they failed.
    failed: list[tuple[Any, ...]] = field(default_factory=list)
    #: The task that failed the run (``("fetch",)`` or ``("fetch", child_id)``) and its error.
    task: tuple[Any, ...] | None = None
    error: dict[str, Any] | None = None
    callback_errors: int = 0
    events: int = 0
    first_ts: str | None = None  #: its first event
    last_ts: str | None = None  #: its last event
    #: The seq of its last event: a fold goes on from there with the events written since.
    last_seq: int = 0

    def task_history(self, name: str) -> TaskHistory:
        history = self.tasks.get(name)
        if history is None:
            history = self.tasks[name] = TaskHistory(name)
        return history

    def forget(self, names: Iterable[str], seq: int) -> None:
        """Forget the work of stages ``names`` before seq ``seq``: a replay runs them again
        from scratch (``on_change="rerun"``). Each starts over as a task that never ran, and
        its tolerated failures leave :attr:`failed`; the run's own counts (events, callback
        errors, segments) keep them."""
        names = set(names)
        for name in names:
            self.reruns[name] = seq
            if name in self.tasks:  # keeps its place: the order tasks first appeared in
                self.tasks[name] = TaskHistory(name)
        self.failed = [f for f in self.failed if f[0] not in names]

    @property
    def segment_open(self) -> bool:
        """Whether the last segment has no final event (it runs, or its process died)."""
        return bool(self.spans) and self.spans[-1].outcome is None

    def running_attempts(
        self, now: str | None = None, limit: int | None = None
    ) -> list[RunningAttempt]:
        """The attempts of every task running in the open segment, oldest first (what the run
        waits on): see :meth:`TaskHistory.running_attempts`."""
        found = [a for t in self.tasks.values() for a in t.running_attempts(now, limit)]
        found.sort(key=lambda a: a.seq)
        return found[:limit]

    def add(self, ev: Event) -> None:
        """Fold one more event (the next in seq order)."""
        self.events += 1
        self.run_id = ev.run_id
        self.first_ts = self.first_ts or ev.ts
        self.last_ts = ev.ts
        self.last_seq = ev.seq
        kind = ev.kind
        data = ev.data if isinstance(ev.data, dict) else {}
        if kind in (FLOW_STARTED, REPLAYED):
            if kind == FLOW_STARTED:
                self.flow = data.get("flow")
                self.server = data.get("server")
                self.entrance = data.get("entrance")
                self.definition = data.get("definition")
                inputs = data.get("inputs")
                self.inputs = inputs if isinstance(inputs, dict) else {}
                coded_inputs = data.get("inputs_coded")
                self.inputs_coded = coded_inputs if isinstance(coded_inputs, str) else None
                flow_import = data.get("import")
                self.flow_import = flow_import if isinstance(flow_import, str) else None
                self.started = ev.ts
            fingerprints = data.get("fingerprints")
            if isinstance(fingerprints, dict):
                self.fingerprints = fingerprints
            rerun = data.get("rerun")
            if kind == REPLAYED and isinstance(rerun, list):
                self.forget([name for name in rerun if isinstance(name, str)], ev.seq)
            self.outcome = self.ended = self.task = self.error = None
            self.spans.append(Span(ev.seq, ev.ts, ev.ts))
            self.segments = len(self.spans)
            for t in self.tasks.values():
                t._seg_added = t._seg_gone = 0
                t._close_segment()
                t._settle(True)
            return
        span = self.spans[-1] if self.spans else None
        if span is not None and span.outcome is None:
            span.end = ev.ts
        if kind in FINAL_KINDS:
            self.outcome = kind
            self.ended = ev.ts
            self.task = _task_tuple(data.get("task"))
            self.error = data.get("error")
            if span is not None:
                span.outcome, span.end = kind, ev.ts
            for t in self.tasks.values():
                t._close_segment()
                t._settle(False)
            return
        if kind == CALLBACK_ERROR:
            self.callback_errors += 1
        if ev.task is None:
            return
        t = self.task_history(ev.task)
        t.first_ts = t.first_ts or ev.ts
        t.last_ts = ev.ts
        ref = ev.ref
        if kind == TASK_STARTED:
            if ref is not None:
                t.children_started += 1
                t._open[(ref, ev.attempt)] = (ev.seq, ev.ts, ev.child_id)
            else:
                t.started = True
                t.attempts += 1
                t.parent = "running"
                t._parent_open = (ev.seq, ev.ts, ev.attempt)
        elif kind == CHILD_ADDED:
            t._seg_added += 1
        elif kind == TASK_OVER or kind == TASK_RAN:
            if kind == TASK_RAN:  # started and over in one row
                t.children_started += 1
            if ref is not None:
                t.children_done += 1
                t._open.pop((ref, ev.attempt), None)
                if ref in t._failed:
                    t._failed.discard(ref)
                    t._tolerated.discard(ref)
                    t.children_recovered += 1
            else:
                t.parent_over = True
                t.parent = "over"
                t._end_parent(ev.attempt)
        elif kind == CHILDREN_RELEASED:
            ranges = [(int(lo), int(hi)) for lo, hi in data.get("ranges", ())]
            t.released.extend(ranges)
            rows = sum(hi - lo + 1 for lo, hi in ranges)
            t._released_rows += rows
            t._seg_gone += rows
        elif kind == CHILDREN_DISCARDED:
            t._seg_gone += int(data.get("count", 0))
        elif kind in (EXIT, TIMEOUT, ABANDONED):
            if kind == EXIT:
                t.exits += 1
            elif kind == TIMEOUT:
                t.timeouts += 1
            else:
                t.abandoned += 1
            if ref is not None:  # an attempt abandoned after its timeout has ended already
                t._open.pop((ref, ev.attempt), None)
            else:
                t._end_parent(ev.attempt)
        elif kind == RETRY:
            t.retries += 1
        elif kind == TASK_FAILED:
            if ref is not None:
                new = ref not in t._failed
                t._failed.add(ref)
                if data.get("tolerated"):
                    t._tolerated.add(ref)
                    if new:
                        self.failed.append((ev.task, ev.child_id))
            else:
                t.parent = "failed"
        elif kind == TASK_ALL_OVER:
            t.all_over = True
            t.ended = ev.ts
        t._settle(self.segment_open)

    # -- totals and durations

    def _total(self, name: str) -> int:
        return sum(getattr(t, name) for t in self.tasks.values())

    @property
    def children_added(self) -> int:
        return self._total("children_added")

    @property
    def children_done(self) -> int:
        return self._total("children_done")

    @property
    def children_failed(self) -> int:
        return self._total("children_failed")

    @property
    def children_tolerated(self) -> int:
        return self._total("children_tolerated")

    @property
    def children_recovered(self) -> int:
        return self._total("children_recovered")

    @property
    def children_running(self) -> int:
        return self._total("children_running")

    @property
    def active(self) -> float | None:
        """Seconds the run was running: the sum of its segments' spans (None without events)."""
        total = 0.0
        for span in self.spans:
            seconds = span.seconds
            if seconds is None:
                return None
            total += seconds
        return total if self.spans else None

    @property
    def wall(self) -> float | None:
        """Seconds from its first event to its last, pauses between segments included."""
        first, last = ts_seconds(self.first_ts), ts_seconds(self.last_ts)
        return None if first is None or last is None else max(0.0, last - first)

    def active_between(self, start: str | None, end: str | None, live: bool = False) -> float:
        """Seconds of the run's segments between the times ``start`` and ``end``.

        :param live: the last segment is still running: it lasts until ``end``, not only
            until its last event so far.
        """
        a, b = ts_seconds(start), ts_seconds(end)
        if a is None or b is None:
            return 0.0
        total = 0.0
        for i, span in enumerate(self.spans):
            lo, hi = ts_seconds(span.start), ts_seconds(span.end)
            if lo is None or hi is None:
                continue
            if live and i == len(self.spans) - 1 and span.outcome is None:
                hi = max(hi, b)
            total += max(0.0, min(b, hi) - max(a, lo))
        return total

    def task_seconds(self, name: str, now: str | None = None) -> float:
        """Seconds task ``name`` has been running, in every segment (pauses not counted): from
        its first event to its ``task_all_over``; else, while the run runs, to ``now`` (if
        given); else to the end of the run's last segment."""
        task = self.tasks.get(name)
        if task is None:
            return 0.0
        if task.all_over:
            return self.active_between(task.first_ts, task.ended)
        if now is not None and self.segment_open:
            return self.active_between(task.first_ts, now, live=True)
        return self.active_between(task.first_ts, self.spans[-1].end if self.spans else None)


def fold(events: Iterable[Event], run_id: str | None = None) -> RunHistory:
    """Fold a run's events, in seq order, into a :class:`RunHistory`.

    It streams: it keeps one small record per task, and per child only the refs of children
    that failed (until they succeed) and of attempts running, so folding a run with a million
    children takes little memory.
    """
    history = RunHistory(run_id or "")
    for ev in events:
        history.add(ev)
    return history


#: Kinds whose ``data`` the fold reads; for the others it needs only the columns.
FOLD_DATA_KINDS = (
    FLOW_STARTED,
    REPLAYED,
    *FINAL_KINDS,
    CHILDREN_RELEASED,
    CHILDREN_DISCARDED,
    TASK_FAILED,
)


# -- who owns a run ----------------------------------------------------------------------------

#: Seconds between an owner's heartbeats, and after which a silent owner is taken for dead.
HEARTBEAT = 5.0
LEASE = 60.0


def owner_alive(pid: int | None, host: str | None, heartbeat: float | None) -> bool:
    """Whether the process that wrote this heartbeat still owns what it claimed.

    Its heartbeat must be recent; on this host its pid must also exist (a crash is seen at once).
    """
    if heartbeat is None or wall() - heartbeat > LEASE:
        return False
    return pid_alive(pid, host)


def pid_alive(pid: object, host: object) -> bool:
    """Whether process ``pid`` of ``host`` exists: asked of the system on this host; taken as
    alive on another (what has no heartbeat can tell no better)."""
    if not isinstance(pid, int):
        return False
    if host == socket.gethostname():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # someone else's process: it exists
            return True
    return True


def run_status(
    outcome: str | None, pid: int | None, host: str | None, heartbeat: float | None
) -> str:
    """A run's status: its outcome (the fold's) once its last segment ended; before that,
    ``"running"`` while its owner (the ``runs`` row's ``pid``, ``host``, ``heartbeat``) is
    alive, and ``"interrupted"`` once it is gone (a crash: the run can be replayed)."""
    if outcome is not None:
        return outcome
    return "running" if owner_alive(pid, host, heartbeat) else "interrupted"
