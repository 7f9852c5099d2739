"""The ``threadflow`` command: list runs, show a run's events, replay a run, draw a flow.

Commands only: every number they print is the fold's (``threadflow.events``, read with
``EventStore``), every spelling ``threadflow._format``'s, the live progress is
``threadflow.progress``, the timeline ``threadflow.timeline``. Every command reads the store
(``--db``, default ``$THREADFLOW_DB`` or ``threadflow.db``) and never writes to it, except
``run`` and ``replay``, which run the flow. Library errors become one line on stderr with a
hint, and an exit code per kind of failure (see :data:`EXIT_CODES`).
"""

from __future__ import annotations

import contextlib
import difflib
import heapq
import importlib
import logging
import os
import shlex
import sqlite3
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict
from typing import Any, NoReturn

import click

from . import timeline as _timeline
from ._format import (
    compact,
    duration,
    error_text,
    event_summary,
    file_stem,
    json_text,
    line,
    plain,
    printable,
    table,
    task_text,
    timestamp,
)
from ._graph import dot, mermaid
from .definition import ON_CHANGE, FlowDefinition, check_same_flow, code_changes
from .errors import StoreError, ThreadflowError
from .events import KINDS, Event, RunHistory
from .flow import Flow
from .progress import EVERY, FollowedRun, ProgressView
from .result import RunHandle, RunResult
from .store import FILE_MODE, EventStore, RunInfo, RunNotFound, Tick, default_path

#: Exit codes of every command.
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_ERROR = 3
EXIT_INTERRUPTED = 4
EXIT_CANCELLED = 5

EXIT_CODES = (
    (0, "success; for run and replay: the run ended all_over"),
    (EXIT_FAILED, "run, replay: the run ended failed_over"),
    (EXIT_USAGE, "usage error, or a module:Class that cannot be imported or is not a Flow"),
    (EXIT_ERROR, "unknown or ambiguous run, unusable store, or replay refused"),
    (EXIT_INTERRUPTED, "run, replay: the run was interrupted (replay it to go on)"),
    (EXIT_CANCELLED, "run, replay: the run was cancelled (replay it to go on)"),
)

#: Event kinds the engine writes (``--kind`` accepts others, with a warning).
EVENT_KINDS = KINDS

#: Characters of an event's data summary shown by ``show`` (``--json`` gives all of it).
SUMMARY_WIDTH = 72


class CLIError(click.ClickException):
    """One line on stderr: what happened, then what to do.

    :ivar hint: the suggestion printed after the message.
    """

    exit_code = EXIT_ERROR

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint

    def format_message(self) -> str:
        # Messages quote run ids, paths and errors that came from the store or from user code.
        return printable(f"{self.message}; {self.hint}" if self.hint else self.message)


_DB_HINT = "pass --db with the path of a threadflow store, or set $THREADFLOW_DB"


# -- opening the store -------------------------------------------------------------------


def _store_error(exc: StoreError) -> CLIError:
    # The library's default advice names the Python argument; the CLI's names the option.
    hint = exc.hint if exc.hint == "upgrade threadflow" else _DB_HINT
    return CLIError(exc.reason, hint)


def _open(path: str) -> EventStore:
    """The store at ``path``, once checked (without changing a byte of it) to be one."""
    store = EventStore(path)
    try:
        store.check()
    except StoreError as exc:
        raise _store_error(exc) from None
    return store


def _resolve(store: EventStore, prefix: str) -> RunInfo:
    """The run named by ``prefix``, folded; unknown and ambiguous prefixes become a
    :class:`CLIError`."""
    try:
        return store.run(prefix)
    except RunNotFound as exc:
        if exc.count == 0:
            hint = f"list the runs with: threadflow runs --db {_quote(store.path)}"
        else:
            hint = "give more characters of the run id"
        raise CLIError(exc.message, hint) from None
    except StoreError as exc:
        raise _store_error(exc) from None


def _quote(path: str) -> str:
    return shlex.quote(path)


# -- output ------------------------------------------------------------------------------------


def _event_json(ev: Event) -> dict[str, Any]:
    record = asdict(ev)
    record["child_id"] = plain(ev.child_id)
    return record


def _say(line: str = "", err: bool = False) -> None:
    """Print one line of human-readable output (stdout, or stderr for messages).

    Every such line goes through here: whatever came from the store or from user code is shown
    as text (``\\x1b[2J``), never acted on by the terminal.
    """
    click.echo(printable(line), err=err)


class _PrintableFormatter(logging.Formatter):
    """Python's default record format, made printable; tracebacks keep their lines."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record), newlines=True)


class _CurrentStderr:
    """A stream that writes to whatever ``sys.stderr`` is at the time."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


@contextlib.contextmanager
def _printable_logs() -> Iterator[None]:
    """While ``run`` or ``replay`` runs a flow, what the engine logs reaches stderr printable.

    The engine logs what user code raised in a callback or a ``retry_on`` with its traceback.
    With no logging set up, Python would print those records raw (``logging.lastResort``);
    this handler prints the same records, at the same level, through :func:`printable`. A
    program that set up logging for ``threadflow`` (or the root logger) keeps its own handlers.
    """
    logger = logging.getLogger("threadflow")
    if logger.hasHandlers():
        yield
        return
    # sys.stderr as it is when a record is written: while the live progress is shown it is the
    # stream that writes above the live area (and CliRunner replaces it in tests).
    handler = logging.StreamHandler(_CurrentStderr())
    handler.setLevel(logging.WARNING)
    handler.setFormatter(_PrintableFormatter())
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def _echo_json(value: Any) -> None:
    click.echo(json_text(value, indent=2))


def _echo_json_stream(items: Iterable[Any]) -> None:
    """A JSON array written item by item, so a long log is never held whole."""
    first = True
    for item in items:
        click.echo(("[\n  " if first else ",\n  ") + json_text(item), nl=False)
        first = False
    click.echo("[]" if first else "\n]")


# -- the command group ---------------------------------------------------------------------


def _exit_codes_epilog() -> str:
    lines = ["\b", "Exit codes:"]
    lines += [f"  {code}  {meaning}" for code, meaning in EXIT_CODES]
    lines += [
        "",
        "\b",
        "The store is --db PATH (on every command), else $THREADFLOW_DB,",
        "else threadflow.db in the working directory. Times are UTC.",
    ]
    return "\n".join(lines)


db_option = click.option(
    "--db",
    "db",
    metavar="PATH",
    default=None,
    help="The store file (default: $THREADFLOW_DB, else threadflow.db).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


def _db_path(db: str | None) -> str:
    """The command's ``--db``, else the group's (``threadflow --db PATH CMD``), else the default."""
    if db is not None:
        return db
    root = click.get_current_context().find_root()
    group_db = (root.obj or {}).get("db")
    return group_db if group_db is not None else default_path()


class _Group(click.Group):
    """Turns an unexpected SQLite error (a damaged or foreign store) into one clear line, and
    makes every error message printable before click shows it."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.ClickException as exc:
            # A usage error can quote what a flow module raised on import, or an argument as
            # given. click types the attribute Final; it is a plain one, set once here before
            # the error is shown (CLIError makes its own message printable as well).
            exc.message = printable(exc.message)  # type: ignore[misc]
            raise
        except sqlite3.Error as exc:
            raise CLIError(
                f"the store could not be read ({exc})",
                "check it with: sqlite3 FILE 'PRAGMA integrity_check', or use another --db",
            ) from None


@click.group(
    cls=_Group,
    name="threadflow",
    epilog=_exit_codes_epilog(),
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.version_option(package_name="threadflow")
@db_option
@click.pass_context
def cli(ctx: click.Context, db: str | None) -> None:
    """Inspect and replay threadflow runs recorded in an SQLite store.

    \b
    Examples:
      threadflow runs --db runs.db
      threadflow show 3f2a --summary
      threadflow replay 3f2a
      threadflow graph myjobs:Nightly
      threadflow ticks Nightly
    """
    ctx.obj = {"db": db}


# -- runs ------------------------------------------------------------------------------------


def _run_record(info: RunInfo) -> dict[str, Any]:
    return {
        "run_id": info.run_id,
        "flow": info.flow,
        "server": info.server,
        "entrance": info.entrance,
        "status": info.status,
        "outcome": info.outcome,
        "started": info.started,
        "ended": info.ended,
        "duration": info.duration,
        "active": info.active,
        "wall": info.wall,
        "segments": info.segments,
        "children_added": info.children_added,
        "children_done": info.children_done,
        "children_failed": info.children_failed,
        "children_tolerated": info.children_tolerated,
        "children_recovered": info.children_recovered,
    }


@cli.command()
@click.option("--flow", "flow", metavar="NAME", help="Only runs of this flow (class name).")
@click.option("--limit", type=click.IntRange(min=1), metavar="N", help="Only the newest N runs.")
@db_option
@json_option
def runs(flow: str | None, limit: int | None, db: str | None, as_json: bool) -> None:
    """List the runs in the store, oldest first.

    STATUS is the run's outcome (all_over, failed_over, cancelled, interrupted), or running /
    interrupted
    for a run that has not ended (interrupted: its process is gone). DURATION is the time the
    run was running, in all its segments (the pause before a replay does not count).

    \b
    Example:
      threadflow runs --db runs.db --flow Nightly --limit 5
    """
    path = _db_path(db)
    store = _open(path)
    try:
        infos = store.runs(flow=flow, limit=limit)
    except StoreError as exc:
        raise _store_error(exc) from None
    records = [_run_record(r) for r in infos]
    if as_json:
        _echo_json(records)
        return
    if not records:
        what = f" of flow {flow!r}" if flow else ""
        _say(f"no runs{what} in {path!r}", err=True)
        return
    rows = [
        (
            r["run_id"],
            r["flow"],
            r["status"],
            timestamp(r["started"]),
            duration(r["duration"]),
            str(r["children_done"]),
            str(r["children_failed"]),
        )
        for r in records
    ]
    headers = ("RUN", "FLOW", "STATUS", "STARTED (UTC)", "DURATION", "DONE", "FAILED")
    for text in table(headers, rows, right="456"):
        _say(text)


# -- show ------------------------------------------------------------------------------------


def _events(store: EventStore, run_id: str, kinds: Sequence[str]) -> Iterator[Event]:
    """The run's events in seq order, of ``kinds`` only if given (one indexed query per kind)."""
    if not kinds:
        return store.iter_events(run_id)
    streams = [store.iter_events(run_id, kind) for kind in dict.fromkeys(kinds)]
    return heapq.merge(*streams, key=lambda ev: ev.seq)


def _event_row(ev: Event) -> tuple[str, ...]:
    """The cells of one event, printable (measured and printed as they are)."""
    return (
        str(ev.seq),
        printable(timestamp(ev.ts, millis=True)),
        printable(ev.kind),
        printable(ev.task or "-"),
        "-" if ev.child_id is None else printable(compact(ev.child_id)),
        "-" if ev.attempt is None else str(ev.attempt),
        event_summary(ev.kind, ev.data, SUMMARY_WIDTH),  # printable already
    )


EVENT_HEADERS = ("SEQ", "TS (UTC)", "KIND", "TASK", "CHILD", "ATTEMPT", "DATA")


def _print_events(store: EventStore, run_id: str, kinds: Sequence[str]) -> int:
    """Print the events as an aligned table in two streamed passes (constant memory).

    The first pass measures the columns and notes the last seq, so that events a running run
    appends meanwhile do not break the alignment of the second.
    """
    widths = [len(h) for h in EVENT_HEADERS]
    last = 0
    for ev in _events(store, run_id, kinds):
        widths = [max(w, len(cell)) for w, cell in zip(widths, _event_row(ev), strict=True)]
        last = ev.seq
    if not last:
        return 0
    _say(line(EVENT_HEADERS, widths, "05"))
    count = 0
    for ev in _events(store, run_id, kinds):
        if ev.seq > last:
            break
        _say(line(_event_row(ev), widths, "05"))
        count += 1
    return count


def _summary_record(info: RunInfo) -> dict[str, Any]:
    history = info.history if info.history is not None else RunHistory(info.run_id)
    tasks = [
        {
            "task": t.name,
            "attempts": t.attempts,
            "parent_over": t.parent_over,
            "children_added": t.children_added,
            "children_done": t.children_done,
            "children_failed": t.children_failed,
            "children_tolerated": t.children_tolerated,
            "children_recovered": t.children_recovered,
            "children_running": t.children_running,
            "exits": t.exits,
            "timeouts": t.timeouts,
            "retries": t.retries,
            "abandoned": t.abandoned,
            "all_over": t.all_over,
            "first_ts": t.first_ts,
            "last_ts": t.last_ts,
        }
        for t in history.tasks.values()
    ]
    error = history.error
    return {
        "run_id": info.run_id,
        "flow": history.flow or info.flow,
        "server": history.server or info.server,
        "entrance": history.entrance or info.entrance,
        "status": info.status,
        "outcome": history.outcome,
        "segments": history.segments,
        "started": history.started or info.started,
        "ended": history.ended,
        "duration": info.duration,
        "active": history.active,
        "wall": history.wall,
        "task": plain(history.task),
        "error": (
            {"type": error.get("type"), "message": error.get("message")}
            if isinstance(error, dict)
            else error
        ),
        "failed": [plain(f) for f in history.failed],
        "callback_errors": history.callback_errors,
        "events": history.events,
        "tasks": tasks,
    }


def _print_summary(record: dict[str, Any]) -> None:
    fields = [
        ("run", record["run_id"]),
        ("flow", record["flow"]),
        ("status", record["status"]),
        ("entrance", record["entrance"]),
        ("segments", str(record["segments"])),
        ("started", timestamp(record["started"], millis=True)),
        ("ended", timestamp(record["ended"], millis=True)),
        ("duration", duration(record["duration"])),
    ]
    if record["segments"] > 1:
        fields.append(("first start to last event", duration(record["wall"])))
    if record["task"]:
        fields.append(("failed task", task_text(record["task"])))
        fields.append(("error", error_text(record["error"])))
    if record["failed"]:
        tolerated = ", ".join(task_text(f) for f in record["failed"][:5])
        more = f" (+{len(record['failed']) - 5} more)" if len(record["failed"]) > 5 else ""
        fields.append(("tolerated", f"{len(record['failed'])}: {tolerated}{more}"))
    recovered = sum(t["children_recovered"] for t in record["tasks"])
    if recovered:
        fields.append(("recovered", f"{recovered} (failed, then done in a later segment)"))
    if record["callback_errors"]:
        fields.append(("callback errors", str(record["callback_errors"])))
    width = max(len(name) for name, _ in fields)
    for name, value in fields:
        _say(f"{name + ':':<{width + 1}} {value}")
    _say()
    headers = (
        "TASK",
        "ATTEMPTS",
        "ADDED",
        "DONE",
        "FAILED",
        "EXITS",
        "TIMEOUTS",
        "RETRIES",
        "ALL_OVER",
    )
    rows = [
        (
            t["task"],
            str(t["attempts"]),
            str(t["children_added"]),
            str(t["children_done"]),
            str(t["children_failed"]),
            str(t["exits"]),
            str(t["timeouts"]),
            str(t["retries"]),
            "yes" if t["all_over"] else "no",
        )
        for t in record["tasks"]
    ]
    for text in table(headers, rows, right="1234567"):
        _say(text)


@cli.command()
@click.argument("run")
@click.option(
    "--kind",
    "kinds",
    multiple=True,
    metavar="KIND",
    help="Only events of this kind (repeat for several), e.g. --kind exit --kind timeout.",
)
@click.option("--summary", is_flag=True, help="Per-task counts and the run's outcome instead.")
@db_option
@json_option
def show(run: str, kinds: tuple[str, ...], summary: bool, db: str | None, as_json: bool) -> None:
    """Show the events of RUN (a run id, or a unique prefix of one).

    DATA is a digest of each event's data (the error, the result, the counts); --json gives
    every field in full.

    \b
    Examples:
      threadflow show 3f2a --db runs.db
      threadflow show 3f2a --kind exit --kind task_failed
      threadflow show 3f2a --summary
    """
    path = _db_path(db)
    store = _open(path)
    info = _resolve(store, run)
    unknown = [k for k in kinds if k not in EVENT_KINDS]
    if unknown:
        _say(
            f"warning: {', '.join(map(repr, unknown))} is not an event kind threadflow writes; "
            f"kinds are {', '.join(EVENT_KINDS)}",
            err=True,
        )
    try:
        if summary:
            record = _summary_record(info)
            if as_json:
                _echo_json(record)
            else:
                _print_summary(record)
        elif as_json:
            _echo_json_stream(_event_json(ev) for ev in _events(store, info.run_id, kinds))
        elif not _print_events(store, info.run_id, kinds):
            what = f" of kind {', '.join(kinds)}" if kinds else ""
            _say(f"run {info.run_id} has no events{what}", err=True)
    except StoreError as exc:
        raise _store_error(exc) from None


# -- loading a flow class ----------------------------------------------------------------------


def _flow_classes(module: Any) -> list[str]:
    return sorted(
        name
        for name, value in vars(module).items()
        if isinstance(value, type) and issubclass(value, Flow) and value is not Flow
    )


class FlowClass(click.ParamType):  # type: ignore[type-arg]  # generic in click >= 8.2 only
    """``module:Class``: a :class:`~threadflow.Flow` subclass, importable from the working
    directory too, which is searched after the installed packages."""

    name = "module:Class"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, type):
            return value
        module_name, sep, qualname = str(value).partition(":")
        if not sep or not module_name or not qualname:
            self.fail(f"{value!r} is not module:Class, e.g. myjobs:Nightly", param, ctx)
        cwd = os.getcwd()
        if cwd not in sys.path and "" not in sys.path:
            # Last, after the installed packages: a json.py or sqlite_utils.py lying in the
            # working directory must not replace the library of that name, in this process or
            # in the worker processes that inherit its path.
            sys.path.append(cwd)
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:
            missing = isinstance(exc, ModuleNotFoundError) and exc.name == module_name
            hint = (
                "run from the directory that holds it, or add that directory to PYTHONPATH"
                if missing
                else "fix the error in that module"
            )
            self.fail(
                f"cannot import module {module_name!r} ({type(exc).__name__}: {exc}); {hint}",
                param,
                ctx,
            )
        obj: Any = module
        for part in qualname.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                classes = _flow_classes(module)
                close = difflib.get_close_matches(qualname, classes, n=1)
                suggestion = f"did you mean {close[0]!r}? " if close else ""
                self.fail(
                    f"module {module_name!r} has no {qualname!r}; {suggestion}"
                    f"its flows are {classes or 'none'}",
                    param,
                    ctx,
                )
        if not (isinstance(obj, type) and issubclass(obj, Flow)):
            what = "a class" if isinstance(obj, type) else f"a {type(obj).__name__}"
            self.fail(
                f"{value!r} is {what}, not a threadflow Flow subclass; "
                "name a class that subclasses threadflow.Flow",
                param,
                ctx,
            )
        if obj.definition is None:
            self.fail(f"{value!r} has no tasks; name a flow that declares tasks", param, ctx)
        return obj


FLOW_CLASS = FlowClass()


# -- run and replay ----------------------------------------------------------------------------


def _result_record(result: RunResult) -> dict[str, Any]:
    error = result.error
    return {
        "run_id": result.run_id,
        "outcome": result.outcome,
        "task": plain(result.task),
        "error": None if error is None else {"type": type(error).__name__, "message": str(error)},
        "failed": [plain(f) for f in result.failed],
    }


def _refused(message: str, hint: str | None = None) -> NoReturn:
    raise CLIError(f"replay refused: {message}", hint)


def _wait(handle: RunHandle, view: ProgressView) -> RunResult:
    """The run's result, redrawing the progress every :data:`threadflow.progress.EVERY` s."""
    while True:
        try:
            return handle.result(timeout=EVERY)
        except TimeoutError:
            view.draw()


def _check_run_store(path: str) -> None:
    """``run`` creates a missing store, but never adopts a file that is not one."""
    if os.path.exists(path) and not (os.path.isfile(path) and os.path.getsize(path) == 0):
        _open(path)


def _stop(server: Flow) -> None:
    """Stop the server; a second Ctrl-C does not cut the stop short (it records the run)."""
    while True:
        try:
            server.stop()
            return
        except KeyboardInterrupt:
            _say("still stopping: waiting for running attempts to end", err=True)


def _start_server(flow_cls: type[Flow], path: str, replaying: bool = False) -> Flow:
    try:
        return flow_cls.start_link(store=path)
    except StoreError as exc:
        raise _store_error(exc) from None
    except ThreadflowError as exc:  # AlreadyStarted: the server name is taken
        if replaying:
            _refused(str(exc))
        raise CLIError(str(exc)) from None


@cli.command()
@click.argument("run")
@click.option(
    "--flow",
    "flow_cls",
    type=FLOW_CLASS,
    default=None,
    help="The flow that made the run, as module:Class (importable from here); default: the "
    "one the run's log names.",
)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Progress lines per stage on stderr, counting the work of every segment (default: "
    "live lines when stderr is a terminal, else none).",
)
@click.option(
    "--on-change",
    type=click.Choice(ON_CHANGE),
    default="refuse",
    show_default=True,
    help="When the code of a task the run reaches changed since it last ran: refuse to "
    "replay; rerun the changed stages and every stage after them from scratch; or continue "
    "(keep finished work, run the rest with the new code).",
)
@click.option(
    "--diff",
    is_flag=True,
    help="Print, per task, whether its code is unchanged, changed, added or removed since the "
    "run last ran; run nothing.",
)
@db_option
@json_option
@_printable_logs()
def replay(
    run: str,
    flow_cls: type[Flow] | None,
    progress: bool | None,
    on_change: str,
    diff: bool,
    db: str | None,
    as_json: bool,
) -> None:
    """Continue RUN (an id or unique prefix) from its log.

    The flow is the one that made the run, imported by the module:Class its log records (or
    the one --flow names). Finished stages, parents and children are not run again; the rest
    runs with fresh attempts, under the same run id. If the code of a task changed since the
    run last ran, the replay is refused unless --on-change says what to do (--diff shows the
    changes). The exit code tells the outcome: 0 all_over, 1 failed_over (the failing task
    and error are printed), 4 interrupted, 5 cancelled.

    \b
    Examples:
      threadflow replay 3f2a --db runs.db
      threadflow replay 3f2a --db runs.db --flow myjobs:Nightly
      threadflow replay 3f2a --db runs.db --diff
      threadflow replay 3f2a --db runs.db --on-change rerun
    """
    path = _db_path(db)
    store = _open(path)
    info = _resolve(store, run)
    if flow_cls is None:
        flow_cls = _recorded_flow(info)
    definition: FlowDefinition | None = flow_cls.definition
    if definition is not None and info.flow != definition.name:
        _refused(
            f"run {info.run_id} is a run of flow {info.flow!r}, not {definition.name!r}",
            f"pass --flow with the module:Class of {info.flow!r}",
        )
    if diff:
        assert definition is not None  # FLOW_CLASS and _recorded_flow refuse a flow without
        _print_diff(store, info, definition, as_json)
        return
    live = sys.stderr.isatty() if progress is None else progress
    counts = FollowedRun(store, info.run_id, after=info.segments)
    view = ProgressView(counts, live=live, enabled=progress is True or (progress is None and live))
    server = _start_server(flow_cls, path, replaying=True)
    try:
        try:
            handle = server.replay(info.run_id, on_change=on_change)
        except StoreError as exc:
            raise _store_error(exc) from None
        except (ThreadflowError, ValueError) as exc:
            _refused(str(exc))  # ReplayError messages say what to do
        with view.shown():
            result = _wait(handle, view)
        view.draw(final=True)
    except KeyboardInterrupt:
        # view.shown() has taken the live area away; stopping the server (below) records the
        # run interrupted.
        _say(f"run {info.run_id}: interrupted; replay it again to go on", err=True)
        sys.exit(EXIT_INTERRUPTED)
    finally:
        counts.close()
        _stop(server)
    # No duration: a replay's line says how it ended; `threadflow runs` says how long the run ran.
    _report_result(result, path, as_json, flow_cls, took=None)


def _print_diff(
    store: EventStore, info: RunInfo, definition: FlowDefinition, as_json: bool
) -> None:
    """``replay --diff``: the code now against the fingerprints the run's log recorded."""
    history = info.history if info.history is not None else store.history(info.run_id)
    changes = code_changes(definition, history)
    try:
        check_same_flow(definition, history)
        refusal = None
    except ThreadflowError as exc:
        refusal = str(exc)
    if as_json:
        _echo_json(
            {
                "run_id": info.run_id,
                "compared": changes.compared,
                "tasks": dict(changes.verdict),
                "functions": dict(changes.functions),
                "rerun": sorted(changes.rerun),
                "refused": refusal,
            }
        )
        return
    if not changes.compared:
        _say(
            f"run {info.run_id} recorded no fingerprints of its code (its log was written by an "
            "older threadflow): nothing to compare; a replay continues it as before"
        )
    else:
        _say(f"run {info.run_id}: the code of flow {definition.name!r} now, against the last run")
        width = max(len(name) for name in changes.verdict)
        for name, verdict in sorted(changes.verdict.items()):
            functions = changes.functions.get(name)
            detail = f" ({', '.join(functions)})" if functions else ""
            _say(f"  {name:<{width}}  {verdict}{detail}")
        if changes.rerun:
            _say(
                "--on-change rerun would run again from scratch: "
                + ", ".join(sorted(changes.rerun))
            )
        else:
            _say("nothing the run reaches changed: a replay continues it as before")
    if refusal is not None:
        _say(f"a replay would be refused: {refusal}")


class _UsageError(CLIError):
    """A usage error told in one line, as a :class:`CLIError` is (exit code 2)."""

    exit_code = EXIT_USAGE


def _recorded_flow(info: RunInfo) -> type[Flow]:
    """The flow class a run's log names (``flow_started``'s ``import``), imported.

    :raises _UsageError: if the log names none (the class was not importable by name when the
        run started, e.g. defined in ``__main__``), or it cannot be imported here.
    """
    recorded = info.history.flow_import if info.history is not None else None
    if recorded is None:
        raise _UsageError(
            f"run {info.run_id} does not record where its flow {info.flow!r} can be imported "
            "from (its class was not importable by name when the run started, e.g. it was "
            "defined in __main__)",
            "pass --flow module:Class",
        )
    try:
        flow_cls: type[Flow] = FLOW_CLASS.convert(recorded, None, None)
    except click.BadParameter as exc:
        raise _UsageError(
            f"the flow recorded for run {info.run_id}, {recorded}, cannot be used here: "
            f"{exc.message}",
            "or pass --flow module:Class",
        ) from None
    return flow_cls


def _flow_arg(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


@cli.command(name="run")
@click.argument("flow_cls", metavar="MODULE:CLASS", type=FLOW_CLASS)
@click.option(
    "--entrance",
    metavar="TASK",
    default=None,
    help="Start at this task instead of the flow's default_entrance.",
)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Live progress lines on stderr (default: when stderr is a terminal; else one line "
    "per stage as it ends).",
)
@db_option
@json_option
@_printable_logs()
def run_command(
    flow_cls: type[Flow],
    entrance: str | None,
    progress: bool | None,
    db: str | None,
    as_json: bool,
) -> None:
    """Run a flow (MODULE:CLASS) once, with a progress line per stage on stderr.

    Each stage shows its children finished / added, failures, exits, timeouts, retries and
    children per second. Ctrl-C stops the run cleanly: running attempts are cancelled, the run
    is recorded as interrupted, and the command to replay it is printed. The exit code tells
    the outcome: 0 all_over, 1 failed_over, 4 interrupted, 5 cancelled.

    \b
    Examples:
      threadflow run myjobs:Nightly --db runs.db
      threadflow run myjobs:Nightly --entrance store --no-progress
    """
    path = _db_path(db)
    definition = flow_cls.definition
    assert definition is not None  # FlowClass refuses flows without tasks
    if entrance is not None and entrance not in definition.tasks:
        close = difflib.get_close_matches(entrance, list(definition.tasks), n=1)
        suggestion = f"did you mean {close[0]!r}? " if close else ""
        raise click.BadParameter(
            f"{entrance!r} is not a task of {definition.name!r}; {suggestion}"
            f"its tasks are {sorted(definition.tasks)}",
            param_hint="'--entrance'",
        )
    _check_run_store(path)
    server = _start_server(flow_cls, path)
    live = sys.stderr.isatty() if progress is None else progress
    counts: FollowedRun | None = None
    view: ProgressView | None = None
    handle: RunHandle | None = None
    try:
        try:
            handle = server.start_flow(entrance=entrance)
            _say(
                f"run {handle.run_id}: {definition.name} started at "
                f"{entrance or definition.default_entrance} (store {path})",
                err=True,
            )
            counts = FollowedRun(EventStore(path), handle.run_id)
            view = ProgressView(counts, live=live, enabled=progress is not False)
            with view.shown():
                result = _wait(handle, view)
        except KeyboardInterrupt:
            # view.shown() has taken the live area away: the messages below stay on screen.
            _say("interrupted: stopping the run (running attempts are cancelled)", err=True)
            _stop(server)
            if handle is None:  # Ctrl-C before the run was started: nothing to replay
                sys.exit(EXIT_INTERRUPTED)
            try:
                result = handle.result(timeout=5)
            except TimeoutError:
                raise CLIError(
                    f"run {handle.run_id} did not report its end after the stop",
                    f"see its state with: threadflow show {_quote(handle.run_id)} "
                    f"--db {_quote(path)}",
                ) from None
        if view is not None:
            view.draw(final=True)
    finally:
        if counts is not None:
            counts.close()
        _stop(server)
    # The fold's active time: what `threadflow runs` and the timeline say the run took.
    took = EventStore(path).history(result.run_id).active
    _report_result(result, path, as_json, flow_cls, took)


def _report_result(
    result: RunResult, path: str, as_json: bool, flow_cls: type, took: float | None
) -> None:
    """Print the outcome of ``run`` or ``replay`` (and on stderr what to do next), then exit
    with its code."""
    record = _result_record(result)
    if as_json:
        _echo_json(record)
    else:
        ended = f"run {result.run_id}: {result.outcome}"
        _say(ended if took is None else f"{ended} in {duration(took)}")
        if result.task is not None:
            _say(f"failed task: {task_text(record['task'])}")
            _say(f"error: {error_text(result.error)}")
        if result.failed:
            _say(f"tolerated failures: {', '.join(task_text(f) for f in record['failed'])}")
    replay_cmd = (
        f"threadflow replay {_quote(result.run_id)} --db {_quote(path)} "
        f"--flow {_flow_arg(flow_cls)}"
    )
    if result.outcome == "failed_over":
        # A fix changes the code, and a replay refuses changed code unless told what to do.
        _say(f"fix the cause, then replay: {replay_cmd} --on-change continue", err=True)
        _say(
            "(--on-change rerun instead runs the changed stages, and those after them, again "
            "from scratch; --diff lists the changes)",
            err=True,
        )
        _say(
            f"see where time went: threadflow timeline {_quote(result.run_id)} "
            f"--db {_quote(path)} -o {_quote(_timeline_file(result.run_id))}",
            err=True,
        )
        sys.exit(EXIT_FAILED)
    if result.outcome in ("interrupted", "cancelled"):
        _say(f"replay it to go on: {replay_cmd}", err=True)
        sys.exit(EXIT_INTERRUPTED if result.outcome == "interrupted" else EXIT_CANCELLED)


def _timeline_file(run_id: str) -> str:
    """``timeline``'s default output: ``RUN_ID.html`` in the working directory, whatever the
    run id in the store says (a hand-written ``../../x`` is not a path)."""
    return f"{file_stem(run_id)}.html"


# -- cancel ------------------------------------------------------------------------------------

#: Seconds ``cancel`` waits for the run's owner to end it (it looks four times a second).
CANCEL_WAIT = 10.0


@cli.command()
@click.argument("run")
@click.option("--reason", default="cancelled", show_default=True, help="Recorded with the end.")
@db_option
def cancel(run: str, reason: str, db: str | None) -> None:
    """Cancel RUN (an id or a unique prefix), running in any process on the store, without
    stopping its server.

    Its running attempts are cancelled and it ends "cancelled", within about a second; it can
    be replayed later. Waits for the end and prints it.

    \b
    Example:
      threadflow cancel 3f2a --db runs.db
    """
    from .remote import request_cancel

    path = _db_path(db)
    store = _open(path)
    info = _resolve(store, run)
    try:
        request_cancel(path, info.run_id, reason)
    except ThreadflowError as exc:
        raise CLIError(str(exc), "threadflow runs lists what is running") from None
    deadline = time.monotonic() + CANCEL_WAIT
    status = "running"
    while status == "running" and time.monotonic() < deadline:
        threading.Event().wait(0.05)
        status = store.status(info.run_id) or "running"
    if status == "running":
        raise CLIError(
            f"run {info.run_id} was asked to cancel but is still running after {CANCEL_WAIT:g} s",
            "its owner may be busy in a long coordinator turn; look again with threadflow runs",
        )
    _say(f"run {info.run_id}: {status}")


# -- ticks -------------------------------------------------------------------------------------


def _tick_record(tick: Tick) -> dict[str, Any]:
    record = asdict(tick)
    for key in ("tick", "first", "decided"):
        value = record[key]
        record[key] = None if value is None else value.isoformat()
    return record


@cli.command()
@click.argument("schedule", required=False)
@click.option("--limit", type=click.IntRange(min=1), metavar="N", help="Only the newest N ticks.")
@db_option
@json_option
def ticks(schedule: str | None, limit: int | None, db: str | None, as_json: bool) -> None:
    """List what schedules (Flow.schedule) decided for each tick, oldest first; only those of
    SCHEDULE (a schedule's name: its flow's name unless given name=) if given.

    DECISION is fired (RUN started at the tick), caught_up (RUN started for a tick missed while
    no scheduler ran), skipped (the schedule's run was still going), missed (no scheduler looked:
    one row sums up a stretch, its first tick and count in DETAIL), queued or catching_up (to run
    once the schedule's run ends).

    \b
    Example:
      threadflow ticks Nightly --db runs.db --limit 20
    """
    path = _db_path(db)
    store = _open(path)
    try:
        rows = store.ticks(schedule, limit=limit)
    except StoreError as exc:
        raise _store_error(exc) from None
    if as_json:
        _echo_json([_tick_record(t) for t in rows])
        return
    if not rows:
        what = f" of schedule {schedule!r}" if schedule else ""
        _say(f"no ticks{what} in {path!r}", err=True)
        return
    millis = any(t.tick.microsecond for t in rows)  # sub-second ticks (every=0.5): one width
    cells = [
        (
            t.schedule,
            timestamp(t.tick.isoformat(), millis=millis),
            t.decision,
            t.run_id or "-",
            t.detail or "",
        )
        for t in rows
    ]
    for text in table(("SCHEDULE", "TICK (UTC)", "DECISION", "RUN", "DETAIL"), cells):
        _say(text)


# -- graph -------------------------------------------------------------------------------------


@cli.command()
@click.argument("flow_cls", metavar="MODULE:CLASS", type=FLOW_CLASS)
@click.option("--dot", "as_dot", is_flag=True, help="Graphviz DOT instead of Mermaid.")
@click.option(
    "--db", "db", metavar="PATH", hidden=True, help="Accepted, unused: graph reads no store."
)
def graph(flow_cls: type[Flow], as_dot: bool, db: str | None) -> None:
    """Draw the tasks of a flow and their next= edges, as Mermaid (default) or Graphviz DOT.

    The default entrance is pointed at by an "entrance" node, every branch ends in an all_over
    node, and a task with children is drawn as a double box labelled "(children)".

    \b
    Examples:
      threadflow graph myjobs:Nightly > nightly.mmd
      threadflow graph myjobs:Nightly --dot | dot -Tsvg > nightly.svg
    """
    definition = flow_cls.definition
    assert definition is not None  # FlowClass refuses flows without tasks
    for text in dot(definition) if as_dot else mermaid(definition):
        _say(text)


# -- timeline ----------------------------------------------------------------------------------


@cli.command(name="timeline")
@click.argument("run")
@click.option(
    "-o",
    "--output",
    metavar="FILE",
    default=None,
    help="The HTML file to write (default: RUN_ID.html here; - for stdout).",
)
@click.option(
    "--max-rows",
    type=click.IntRange(min=1),
    default=_timeline.MAX_ROWS,
    show_default=True,
    metavar="N",
    help="Children drawn one row each, at most; the rest get one summary row per task.",
)
@db_option
def timeline_command(run: str, output: str | None, max_rows: int, db: str | None) -> None:
    """Draw RUN (an id or unique prefix) as a self-contained HTML page.

    The page has a summary of the run and a Gantt chart: one row per task and per child, one
    bar per attempt coloured by outcome (over, exit, timeout, abandoned, the wait before a
    retry), the error on hover. It loads nothing from the network: mail it, or keep it as a CI
    artifact.

    \b
    Examples:
      threadflow timeline 3f2a --db runs.db -o run.html
      threadflow timeline 3f2a --max-rows 50 -o - > run.html
    """
    path = _db_path(db)
    store = _open(path)
    info = _resolve(store, run)
    try:
        built = _timeline.build(
            store.iter_rows(info.run_id), info.run_id, status=info.status, max_rows=max_rows
        )
    except StoreError as exc:
        raise _store_error(exc) from None
    page = _timeline.render(built)
    if output == "-":
        click.echo(page, nl=False)
        return
    target = output or _timeline_file(info.run_id)
    try:
        # Created owner-only like the store: the page holds payloads and tracebacks. An existing
        # file keeps its permissions.
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        with open(fd, "w", encoding="utf-8") as out:
            out.write(page)
    except OSError as exc:
        raise CLIError(
            f"cannot write {target!r} ({exc.strerror or exc})", "pass -o with a writable path"
        ) from None
    children = sum(1 for r in built.rows if not r.is_parent)
    hidden = sum(s.hidden_children for s in built.stages)
    more = f", {hidden} more summed up" if hidden else ""
    _say(
        f"wrote {target}: run {info.run_id} ({built.status}), {len(built.stages)} tasks, "
        f"{children} children drawn{more}",
        err=True,
    )


# -- ui ----------------------------------------------------------------------------------------


@cli.command(name="ui")
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="The address to listen on. Anything but a loopback address lets other machines read "
    "the runs, their payloads, results and tracebacks: there is no login.",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8001,
    show_default=True,
    help="The port to listen on (0: any free one; the address is printed).",
)
@db_option
def ui_command(host: str, port: int, db: str | None) -> None:
    """Serve a live dashboard of the store's runs, in the browser, until Ctrl-C.

    The runs list shows each run's status and progress; a run's page shows its progress per
    task, its timeline, its failed attempts with their tracebacks, and the command that
    replays it. The pages update every second while runs go on. It is Datasette with a
    threadflow plugin (pip install 'threadflow[ui]'), so the store's tables can be browsed
    too. It only reads the store: flows can write to it meanwhile.

    \b
    Examples:
      threadflow ui --db runs.db
      threadflow ui --db runs.db --port 0
    """
    path = _db_path(db)
    _open(path)
    try:
        from . import ui
    except ImportError as exc:
        raise CLIError(
            f"threadflow ui needs Datasette, which cannot be imported here ({exc})",
            "install it with: pip install 'threadflow[ui]'",
        ) from None
    try:
        sock = ui.bind(host, port)
    except OSError as exc:
        raise CLIError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc})",
            "pass --port with another port, or --port 0 for any free one",
        ) from None
    if not ui.loopback(host):
        _say(
            f"warning: listening on {host}: anyone who can reach this machine on port "
            f"{sock.getsockname()[1]} can read every run in {path}, with its payloads, results "
            "and tracebacks (there is no login)",
            err=True,
        )
    _say(f"dashboard of {path} at {ui.url(sock)} (Ctrl-C stops it)", err=True)
    try:
        ui.serve(path, sock)
    except KeyboardInterrupt:
        # The server has stopped cleanly; it raises the Ctrl-C again once done.
        pass
    except StoreError as exc:
        raise _store_error(exc) from None
    finally:
        sock.close()
    _say("dashboard stopped", err=True)


def main(argv: Sequence[str] | None = None) -> Any:
    """The ``threadflow`` console script."""
    return cli.main(args=list(argv) if argv is not None else None, prog_name="threadflow")
