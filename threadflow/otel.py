"""OpenTelemetry traces of a server's runs: one span per run, per task and per attempt.

:func:`instrument` makes a server's signals (:mod:`threadflow.signals`) into spans. It is a
reader of the engine, like the progress display and the timeline: it connects receivers with the
server as ``sender``, keeps the spans that are open, and dates every span by the ``ts`` its
signal carries, the time the event log records for that moment. Nothing else of the engine
changes; uninstrumented servers pay nothing.

The tree of a run::

    run <Flow>                  the run (a replay's new segment is a new trace)
      task <name>               a stage: its parent attempts and all its children
        attempt <name>          an attempt of the parent task_func
        child <name>            an attempt of a child (threadflow.child_id)

Receivers run on the coordinator thread, one at a time, and the run waits for them: each does a
dictionary look-up and starts or ends one span. A span processor that exports as spans end
(``SimpleSpanProcessor``) therefore slows the run by the export; use a ``BatchSpanProcessor``,
which exports from its own thread. Whatever the tracer, its processors or its exporter raise is
caught here: a broken exporter loses spans, never a run (:attr:`Instrumentation.errors`).

Needs the ``otel`` extra (``pip install 'threadflow[otel]'``: the OpenTelemetry API) and, to
record anything, an SDK and an exporter of the application's choice.
"""

from __future__ import annotations

import datetime
import json
import logging
import threading
import time
from types import TracebackType
from typing import Any

try:
    from opentelemetry import trace
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, Status, StatusCode, TracerProvider
except ImportError as _exc:  # pragma: no cover - the test extra installs it
    raise ImportError(
        "threadflow.otel needs the OpenTelemetry API, which is not installed: "
        "pip install 'threadflow[otel]' (and an SDK to record spans, e.g. opentelemetry-sdk)"
    ) from _exc

from . import __version__, signals
from .events import (
    ALL_OVER,
    CANCELLED,
    EXIT,
    FAILED_OVER,
    INTERRUPTED,
    TASK_ALL_OVER,
    TIMEOUT,
    describe,
    safe_repr,
    safe_text,
    ts_datetime,
)
from .flow import Flow

log = logging.getLogger("threadflow")

#: The flow's class name (``Flow.definition.name``).
FLOW = "threadflow.flow"
RUN_ID = "threadflow.run_id"
#: The server's name (``server.name``), on the run span.
SERVER = "threadflow.server"
#: 1 for a run's first segment, 2 for its first replay, and so on (on the run span).
SEGMENT = "threadflow.segment"
TASK = "threadflow.task"
#: A child's id as text: a string id as it is, any other id as its JSON (``42``, ``[1, "a"]``).
CHILD_ID = "threadflow.child_id"
ATTEMPT = "threadflow.attempt"
#: How the span's moment ended, in the words of the event log: an attempt ``over``, ``exit``,
#: ``timeout`` or ``cancelled`` (cut off by the end of its run); a task ``task_all_over`` or the
#: final kind of a run that ended before it; a run ``all_over``, ``failed_over``, ``cancelled``
#: or ``interrupted``.
OUTCOME = "threadflow.outcome"

#: Attempt outcomes, as the timeline names its bars.
OVER = "over"
#: Final kinds that fire no signal: such a run's spans are ended from the log (see instrument()).
_UNSIGNALLED = (CANCELLED, INTERRUPTED)
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
_MICROSECOND = datetime.timedelta(microseconds=1)


def _child_text(child: Any) -> str:
    """A child id as a span attribute: a string as it is, anything else as JSON text.

    Never raises: an id is what ``decode_id`` made of stored JSON, but a placeholder beats an
    exception on the coordinator thread.
    """
    if isinstance(child, str):
        return safe_text(child)
    if type(child) is int:  # the common id, and JSON's text of it (bool is not int here)
        return str(child)
    try:
        return safe_text(json.dumps(child, ensure_ascii=False))
    except (TypeError, ValueError):
        return safe_repr(child)


class _Stage:
    __slots__ = ("span", "context", "attempt_name", "child_name")

    def __init__(self, span: Span, name: str) -> None:
        self.span = span
        self.context = trace.set_span_in_context(span, Context())
        self.attempt_name = f"attempt {name}"
        self.child_name = f"child {name}"


class _Run:
    """The open spans of one run segment."""

    __slots__ = ("run_id", "span", "context", "start", "attributes", "stages", "attempts")

    def __init__(self, run_id: str, span: Span, start: int, attributes: dict[str, Any]) -> None:
        self.run_id = run_id
        self.span = span
        self.context = trace.set_span_in_context(span, Context())
        self.start = start  # ns
        self.attributes = attributes  # what every span of the run carries
        self.stages: dict[str, _Stage] = {}
        # (task, repr(child id), attempt) -> its span. repr, not the id: ids may be unhashable
        # (a JSON object), and 1, 1.0 and True are equal keys but different children.
        self.attempts: dict[tuple[Any, ...], Span] = {}


def _key(task: tuple[Any, ...], attempt: Any) -> tuple[Any, ...]:
    if len(task) < 2:
        return (task[0], attempt)
    return (task[0], repr(task[1]), attempt)


class Instrumentation:
    """The receivers :func:`instrument` connected to one server, and the spans they hold open.

    Use it as a context manager, or call :meth:`uninstrument` when done.
    """

    def __init__(self, server: Flow, tracer_provider: TracerProvider | None) -> None:
        self._tracer = trace.get_tracer("threadflow", __version__, tracer_provider)
        definition = type(server).definition
        self._flow = definition.name if definition is not None else type(server).__name__
        self._server = safe_text(str(server.name))
        self._run_name = f"run {self._flow}"
        self._store = server.store
        # Receivers run on the coordinator thread, uninstrument() on any: the lock orders them.
        # Everything below is touched with it held.
        self._lock = threading.Lock()
        self._runs: dict[str, _Run] = {}
        self._closed = False
        self._errors = 0
        self._last_ts: str | None = None
        self._last_ns = 0
        self._receivers = [
            (signals.start_flow, self._receiver(self._on_start_flow)),
            (signals.task_start, self._receiver(self._on_task_start)),
            (signals.task_over, self._receiver(self._on_task_over)),
            (signals.task_exit, self._receiver(self._on_task_exit)),
            (signals.task_timeout, self._receiver(self._on_task_timeout)),
            (signals.task_all_over, self._receiver(self._on_task_all_over)),
            (signals.all_over, self._receiver(self._on_all_over)),
            (signals.failed_over, self._receiver(self._on_failed_over)),
        ]
        for sig, receiver in self._receivers:
            # sender=server: this server's signals only. Held strongly until uninstrument().
            sig.connect(receiver, sender=server, weak=False)

    @property
    def errors(self) -> int:
        """How many times the tracer, a span processor or an exporter raised while a span was
        started or ended (the first is logged as a WARNING, the others at DEBUG); the runs went
        on, those spans were lost."""
        return self._errors

    def uninstrument(self) -> None:
        """Disconnect from the server, and end the spans still open (idempotent).

        A run that ended with no signal (cancelled, or interrupted by ``stop()``) has its spans
        ended here, at the time and with the outcome its log records; a run still going has
        them ended now, with no outcome. Call it after ``server.stop()`` to have every span of
        the server's last run.
        """
        for sig, receiver in self._receivers:
            # From every sender: blinker forgets a receiver disconnected from one sender only.
            sig.disconnect(receiver)
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for run in list(self._runs.values()):
                self._end_from_log(run)

    def __enter__(self) -> Instrumentation:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.uninstrument()

    # -- receivers --------------------------------------------------------------------------

    def _receiver(self, handle: Any) -> Any:
        def receive(sender: Any, **kw: Any) -> None:
            try:
                with self._lock:
                    if not self._closed:
                        handle(kw)
            # BaseException: it runs on the coordinator thread (never the main thread, so no
            # Ctrl-C lands here), and a tracer's failure must never reach the engine.
            except BaseException:
                self._failed()

        return receive

    def _failed(self) -> None:
        self._errors += 1
        if self._errors == 1:
            log.warning(
                "threadflow: a span of server %r could not be recorded (the tracer, a span "
                "processor or an exporter raised); the run goes on without it. Further "
                "failures are logged at DEBUG and counted in Instrumentation.errors",
                self._server,
                exc_info=True,
            )
        else:
            log.debug("threadflow: a span of server %r was lost", self._server, exc_info=True)

    def _ns(self, ts: Any) -> int:
        """An event's ts as nanoseconds since the epoch, exactly (its microseconds); the
        events of one coordinator turn share their ts, so the last one is kept."""
        if ts is not None and ts == self._last_ts:
            return self._last_ns
        when = ts_datetime(ts)
        if when is None:  # no ts: a receiver of an older engine
            return time.time_ns()
        self._last_ts, self._last_ns = ts, (when - _EPOCH) // _MICROSECOND * 1000
        return self._last_ns

    def _on_start_flow(self, kw: dict[str, Any]) -> None:
        # A server runs one run at a time: a run still open here ended with no signal.
        for run in list(self._runs.values()):
            self._end_from_log(run)
        run_id = kw["run_id"]
        start = self._ns(kw.get("ts"))
        attributes = {FLOW: self._flow, RUN_ID: run_id}
        replayed = kw["state"].get("replayed")
        segment = replayed + 1 if isinstance(replayed, int) else 1
        span = self._tracer.start_span(
            self._run_name,
            context=Context(),  # a root: no span of the coordinator thread is its parent
            attributes={**attributes, SERVER: self._server, SEGMENT: segment},
            start_time=start,
        )
        self._runs[run_id] = _Run(run_id, span, start, attributes)

    def _on_task_start(self, kw: dict[str, Any]) -> None:
        run = self._runs.get(kw["run_id"])
        if run is None:  # started before instrument(): not traced
            return
        task, attempt = kw["task"], kw["attempt"]
        name = task[0]
        start = self._ns(kw.get("ts"))
        stage = run.stages.get(name)
        if stage is None:  # its first attempt, or a replayed stage's first child
            span = self._tracer.start_span(
                f"task {name}",
                context=run.context,
                attributes={**run.attributes, TASK: name},
                start_time=start,
            )
            stage = run.stages[name] = _Stage(span, name)
        attributes = {**run.attributes, TASK: name, ATTEMPT: attempt}
        if len(task) > 1:
            attributes[CHILD_ID] = _child_text(task[1])
        span = self._tracer.start_span(
            stage.child_name if len(task) > 1 else stage.attempt_name,
            context=stage.context,
            attributes=attributes,
            start_time=start,
        )
        run.attempts[_key(task, attempt)] = span

    def _attempt_over(self, kw: dict[str, Any], outcome: str) -> None:
        run = self._runs.get(kw["run_id"])
        if run is None:
            return
        span = run.attempts.pop(_key(kw["task"], kw["attempt"]), None)
        if span is None:
            return
        end = self._ns(kw.get("ts"))
        span.set_attribute(OUTCOME, outcome)
        error = kw.get("error")
        if error is not None:
            _record_error(span, error, end)
        span.end(end_time=end)

    def _on_task_over(self, kw: dict[str, Any]) -> None:
        self._attempt_over(kw, OVER)

    def _on_task_exit(self, kw: dict[str, Any]) -> None:
        self._attempt_over(kw, EXIT)

    def _on_task_timeout(self, kw: dict[str, Any]) -> None:
        self._attempt_over(kw, TIMEOUT)

    def _on_task_all_over(self, kw: dict[str, Any]) -> None:
        run = self._runs.get(kw["run_id"])
        if run is None:
            return
        stage = run.stages.pop(kw["task"][0], None)
        if stage is not None:
            stage.span.set_attribute(OUTCOME, TASK_ALL_OVER)
            stage.span.end(end_time=self._ns(kw.get("ts")))

    def _on_all_over(self, kw: dict[str, Any]) -> None:
        run = self._runs.get(kw["run_id"])
        if run is not None:
            self._end_run(run, ALL_OVER, self._ns(kw.get("ts")))

    def _on_failed_over(self, kw: dict[str, Any]) -> None:
        run = self._runs.get(kw["run_id"])
        if run is None:
            return
        end = self._ns(kw.get("ts"))
        task, error = kw.get("task"), kw.get("error")
        if task:
            run.span.set_attribute(TASK, task[0])
            if len(task) > 1:
                run.span.set_attribute(CHILD_ID, _child_text(task[1]))
            stage = run.stages.get(task[0])
            if stage is not None and error is not None:
                stage.span.set_status(Status(StatusCode.ERROR, _error_text(error)))
        if error is not None:
            _record_error(run.span, error, end)
        else:
            run.span.set_status(Status(StatusCode.ERROR, "the run failed"))
        self._end_run(run, FAILED_OVER, end)

    # -- ending a run -----------------------------------------------------------------------

    def _end_run(self, run: _Run, outcome: str | None, end: int) -> None:
        """End every open span of ``run``: attempts still running were cut off by its end
        (``outcome`` None: an end the log does not tell; nothing is said of any span)."""
        # Forgotten first, and each span ended on its own: an exporter that raises loses that
        # span, not the others nor the bookkeeping.
        del self._runs[run.run_id]
        for span in run.attempts.values():
            self._end(span, None if outcome is None else "cancelled", end)
        for stage in run.stages.values():
            self._end(stage.span, outcome, end)
        self._end(run.span, outcome, end)

    def _end(self, span: Span, outcome: str | None, end: int) -> None:
        try:
            if outcome is not None:
                span.set_attribute(OUTCOME, outcome)
            span.end(end_time=end)
        except BaseException:  # see _receiver
            self._failed()

    def _end_from_log(self, run: _Run) -> None:
        """End a run that fired no final signal, at its final event in the log (cancelled,
        interrupted), or now if the log has none (it is still going, or its process failed
        before it could write one)."""
        final = None
        try:
            for kind in _UNSIGNALLED:
                for ev in self._store.iter_events(run.run_id, kind):
                    if self._ns(ev.ts) >= run.start and (final is None or ev.seq > final.seq):
                        final = ev
        except BaseException:  # the store is gone (a deleted file): end them now
            log.debug("threadflow: could not read run %s's end", run.run_id, exc_info=True)
        if final is None:
            self._end_run(run, None, time.time_ns())
        else:
            self._end_run(run, final.kind, self._ns(final.ts))


def _error_text(error: BaseException) -> str:
    what = describe(error)
    return f"{what['type']}: {what['message']}"


def _record_error(span: Span, error: BaseException, when: int) -> None:
    """Status ERROR, and the error as an ``exception`` event (with its traceback where the
    SDK can format it; its type and message whatever it is)."""
    text = _error_text(error)
    span.set_status(Status(StatusCode.ERROR, text))
    try:
        span.record_exception(error, timestamp=when)
    except Exception:  # a hostile __str__: the event from what describe() could read
        what = describe(error)
        span.add_event(
            "exception",
            {"exception.type": what["type"], "exception.message": what["message"]},
            timestamp=when,
        )


def instrument(server: Flow, tracer_provider: TracerProvider | None = None) -> Instrumentation:
    """Trace the runs of ``server`` with OpenTelemetry: a span per run, task and attempt.

    Spans are dated by the event log's times and carry the attributes ``threadflow.flow``,
    ``threadflow.run_id``, ``threadflow.task``, ``threadflow.child_id`` (child attempts),
    ``threadflow.attempt`` and ``threadflow.outcome``. Failed attempts, timeouts and failed runs
    have status ERROR and their error as an ``exception`` event. Runs that start (or are
    replayed) after this call are traced.

    A run that ends with no signal -- cancelled, or interrupted by ``stop()`` -- has its spans
    ended when the server's next run starts, or by :meth:`Instrumentation.uninstrument`, at
    the time and with the outcome its log records.

    Only this server's signals are received: two servers instrumented separately never share
    a span. ``Flow.run()`` makes its server inside; to trace such a run, write what it does:
    ``with Flow.start_link(...) as server, instrument(server):
    server.start_flow().result()``.

    While a server is instrumented its children are started by the coordinator, each after its
    ``task_start`` signal, rather than taken by a worker from the stage's standby queue: a
    no-op child costs more (docs/otel.md gives the figures).

    :param server: a running server, as ``Flow.start_link(...)`` returns it.
    :param tracer_provider: the provider to take the tracer from (default: the global one,
        ``opentelemetry.trace.get_tracer_provider()``).
    :returns: an :class:`Instrumentation`; its ``uninstrument()`` disconnects (a context
        manager does it on exit).
    :raises TypeError: for anything but a server (a Flow class included).
    """
    if not isinstance(server, Flow):
        if isinstance(server, type) and issubclass(server, Flow):
            raise TypeError(
                f"instrument({server.__name__}): pass a server, not the flow class: "
                f"server = {server.__name__}.start_link(...); instrument(server)"
            )
        raise TypeError(
            f"instrument({safe_repr(server, 100)}): pass a server, as Flow.start_link(...) "
            "returns it"
        )
    return Instrumentation(server, tracer_provider)


__all__ = ["Instrumentation", "instrument"]
