"""The ``threadflow`` command: list runs, show a run's events, replay a run, draw a flow.

Every command reads the store with :class:`~threadflow.EventStore` (``--db``, default
``$THREADFLOW_DB`` or ``threadflow.db``) and never writes to it, except ``replay``, which runs
the flow. Library errors become one line on stderr with a hint, and an exit code per kind of
failure (see :data:`EXIT_CODES`).
"""

from __future__ import annotations

import contextlib
import datetime
import difflib
import heapq
import importlib
import json
import logging
import os
import re
import shlex
import shutil
import sqlite3
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, NoReturn

import click

from . import timeline as _timeline
from ._text import file_stem, json_text, printable
from .definition import ALL_OVER, FlowDefinition
from .errors import StoreError, ThreadflowError
from .events import KINDS, Event
from .flow import Flow
from .store import FILE_MODE, SCHEMA_VERSION, EventStore, RunInfo, default_path

#: Exit codes of every command.
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_ERROR = 3
EXIT_INTERRUPTED = 4

EXIT_CODES = (
    (0, "success; for run and replay: the run ended all_over"),
    (EXIT_FAILED, "run, replay: the run ended failed_over"),
    (EXIT_USAGE, "usage error, or a module:Class that cannot be imported or is not a Flow"),
    (EXIT_ERROR, "unknown or ambiguous run, unusable store, or replay refused"),
    (EXIT_INTERRUPTED, "run, replay: the run was interrupted (replay it to go on)"),
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


def _check_store(path: str) -> None:
    """Refuse a file that is not a threadflow store without changing a byte of it.

    The store's own readers open in WAL mode, which would rewrite the header of a foreign
    SQLite file; a read-only probe first keeps other databases untouched.
    """
    if not os.path.exists(path):
        raise CLIError(f"no store at {path!r}", _DB_HINT)
    if os.path.isdir(path):
        raise CLIError(f"{path!r} is a directory, not a store file", _DB_HINT)
    uri = Path(path).absolute().as_uri() + "?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True)
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise CLIError(f"{path!r} is not a readable SQLite database ({exc})", _DB_HINT) from None
    if version > SCHEMA_VERSION:
        raise CLIError(
            f"the store {path!r} has schema version {version}, written by a newer threadflow "
            f"(this one reads up to {SCHEMA_VERSION})",
            "upgrade threadflow",
        )
    if version == 0 or not {"events", "runs"} <= tables:
        raise CLIError(f"{path!r} is not a threadflow store (no threadflow tables)", _DB_HINT)


def _store_error(exc: StoreError) -> CLIError:
    # The library's default advice names the Python argument; the CLI's names the option.
    hint = exc.hint if exc.hint == "upgrade threadflow" else _DB_HINT
    return CLIError(exc.reason, hint)


def _open(path: str) -> EventStore:
    _check_store(path)
    return EventStore(path)


def _resolve(store: EventStore, prefix: str) -> RunInfo:
    """The run named by ``prefix``; unknown and ambiguous prefixes become a :class:`CLIError`."""
    try:
        return store.run(prefix)
    except KeyError:
        pass
    except StoreError as exc:
        raise _store_error(exc) from None
    matches = [r.run_id for r in store.runs() if r.run_id.startswith(prefix)]
    if not matches:
        raise CLIError(
            f"no run in {store.path!r} matches {prefix!r}",
            f"list the runs with: threadflow runs --db {_quote(store.path)}",
        )
    shown = ", ".join(matches[:5]) + (", ..." if len(matches) > 5 else "")
    raise CLIError(
        f"{len(matches)} runs in {store.path!r} match {prefix!r} ({shown})",
        "give more characters of the run id",
    )


def _quote(path: str) -> str:
    return shlex.quote(path)


# -- formatting ----------------------------------------------------------------------------


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], right: str = "") -> list[str]:
    """Plain aligned columns; columns whose index is in ``right`` are right-aligned.

    Cells are made printable before they are measured, so the columns line up as shown.
    """
    rows = [[printable(cell) for cell in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    return [_line(headers, widths, right)] + [_line(row, widths, right) for row in rows]


def _line(cells: Sequence[str], widths: Sequence[int], right: str) -> str:
    parts = [
        cell.rjust(w) if str(i) in right else cell.ljust(w)
        for i, (cell, w) in enumerate(zip(cells, widths, strict=True))
    ]
    return "  ".join(parts).rstrip()


def _parse_ts(ts: str | None) -> datetime.datetime | None:
    if not ts:
        return None
    try:
        return datetime.datetime.fromisoformat(ts)
    except ValueError:
        return None


def _short_ts(ts: str | None, millis: bool = False) -> str:
    """``2024-05-01 12:00:00`` (UTC as stored), or with milliseconds; ``-`` for none."""
    parsed = _parse_ts(ts)
    if parsed is None:
        return ts or "-"
    text = parsed.strftime("%Y-%m-%d %H:%M:%S")
    return f"{text}.{parsed.microsecond // 1000:03d}" if millis else text


def _duration(started: str | None, ended: str | None) -> float | None:
    start, end = _parse_ts(started), _parse_ts(ended)
    if start is None or end is None:
        return None
    return (end - start).total_seconds()


def _human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.3f}s" if seconds < 10 else f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _shorten(text: str, width: int = SUMMARY_WIDTH) -> str:
    """One printable line of at most ``width`` characters (runs of white space become one)."""
    text = printable(" ".join(text.split()))
    return text if len(text) <= width else text[: width - 3] + "..."


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=repr)


def _error_text(error: Any) -> str:
    if isinstance(error, dict):
        kind, message = error.get("type"), error.get("message")
        return f"{kind}: {message}" if kind else str(message)
    if isinstance(error, BaseException):
        return f"{type(error).__name__}: {error}"
    return "" if error is None else str(error)


def _task_text(task: Any) -> str:
    """``split`` or ``split[2]`` for a task tuple or list (from a result or the log)."""
    if not task:
        return "-"
    name, *child = task
    return f"{name}[{_compact(_plain(child[0]))}]" if child else str(name)


def _plain(value: Any) -> Any:
    """Tuples (child ids) as JSON lists."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def _summarize(ev: Event) -> str:
    """A one-line digest of an event's data: the error, the result, the counts."""
    data = ev.data or {}
    kind = ev.kind
    if kind == "flow_started":
        text = f"flow={data.get('flow')} entrance={data.get('entrance')}"
    elif kind == "child_added":
        text = f"payload={_compact(data.get('payload'))}"
    elif kind == "task_over":
        text = f"result={_compact(data['result'])}" if "result" in data else ""
    elif kind in ("exit", "timeout", "task_failed"):
        text = _error_text(data.get("error"))
        if data.get("tolerated"):
            text += " (tolerated)"
    elif kind == "failed_over":
        text = f"{_task_text(data.get('task'))}: {_error_text(data.get('error'))}"
    elif kind == "all_over":
        failed = data.get("failed") or []
        text = f"tolerated failures: {len(failed)}" if failed else ""
    elif kind == "retry":
        text = f"next attempt {data.get('next_attempt')} in {data.get('delay', 0):g}s"
    elif kind == "task_all_over":
        text = f"done={data.get('done')} failed={data.get('failed')}"
    elif kind == "replayed":
        text = f"segment {data.get('segment')} (after {data.get('previous_outcome')})"
    elif kind == "callback_error":
        text = f"{data.get('signal')} {data.get('receiver')}: {_error_text(data.get('error'))}"
    elif data:
        text = " ".join(f"{k}={_compact(v)}" for k, v in data.items())
    else:
        text = ""
    return _shorten(text)


def _event_json(ev: Event) -> dict[str, Any]:
    record = asdict(ev)
    record["child_id"] = _plain(ev.child_id)
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
    handler = logging.StreamHandler()  # sys.stderr as it is now (CliRunner replaces it)
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
      threadflow replay 3f2a --flow myjobs:Nightly
      threadflow graph myjobs:Nightly
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
        "duration": _duration(info.started, info.ended),
        "children_done": info.children_done,
        "children_failed": info.children_failed,
    }


@cli.command()
@click.option("--flow", "flow", metavar="NAME", help="Only runs of this flow (class name).")
@click.option("--limit", type=click.IntRange(min=1), metavar="N", help="Only the newest N runs.")
@db_option
@json_option
def runs(flow: str | None, limit: int | None, db: str | None, as_json: bool) -> None:
    """List the runs in the store, oldest first.

    STATUS is the run's outcome (all_over, failed_over, interrupted), or running / interrupted
    for a run that has not ended (interrupted: its process is gone).

    \b
    Example:
      threadflow runs --db runs.db --flow Nightly --limit 5
    """
    path = _db_path(db)
    store = _open(path)
    try:
        infos = store.runs()
    except StoreError as exc:
        raise _store_error(exc) from None
    if flow is not None:
        infos = [r for r in infos if r.flow == flow]
    if limit is not None:
        infos = infos[-limit:]
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
            _short_ts(r["started"]),
            _human_duration(r["duration"]),
            str(r["children_done"]),
            str(r["children_failed"]),
        )
        for r in records
    ]
    headers = ("RUN", "FLOW", "STATUS", "STARTED (UTC)", "DURATION", "DONE", "FAILED")
    for line in _table(headers, rows, right="456"):
        _say(line)


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
        printable(_short_ts(ev.ts, millis=True)),
        printable(ev.kind),
        printable(ev.task or "-"),
        "-" if ev.child_id is None else printable(_compact(_plain(ev.child_id))),
        "-" if ev.attempt is None else str(ev.attempt),
        _summarize(ev),  # printable already: _shorten
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
    _say(_line(EVENT_HEADERS, widths, "05"))
    count = 0
    for ev in _events(store, run_id, kinds):
        if ev.seq > last:
            break
        _say(_line(_event_row(ev), widths, "05"))
        count += 1
    return count


def _summary_record(info: RunInfo, store: EventStore) -> dict[str, Any]:
    history = store.history(info.run_id)
    tasks = []
    for t in history.tasks.values():
        tasks.append(
            {
                "task": t.name,
                "attempts": t.attempts,
                "parent_over": t.parent_over,
                "children_added": t.children_added,
                "children_done": t.children_done,
                "children_failed": t.children_failed,
                "exits": t.exits,
                "timeouts": t.timeouts,
                "retries": t.retries,
                "abandoned": t.abandoned,
                "all_over": t.all_over,
                "first_ts": t.first_ts,
                "last_ts": t.last_ts,
            }
        )
    error = history.error
    return {
        "run_id": info.run_id,
        "flow": history.flow or info.flow,
        "server": history.server or info.server,
        "entrance": history.entrance or info.entrance,
        "status": history.outcome or info.status,
        "outcome": history.outcome,
        "segments": history.segments,
        "started": history.started or info.started,
        "ended": history.ended,
        "duration": _duration(history.started, history.ended),
        "task": _plain(history.task),
        "error": (
            {"type": error.get("type"), "message": error.get("message")}
            if isinstance(error, dict)
            else error
        ),
        "failed": [_plain(f) for f in history.failed],
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
        ("started", _short_ts(record["started"], millis=True)),
        ("ended", _short_ts(record["ended"], millis=True)),
        ("duration", _human_duration(record["duration"])),
    ]
    if record["task"]:
        fields.append(("failed task", _task_text(record["task"])))
        fields.append(("error", _error_text(record["error"])))
    if record["failed"]:
        tolerated = ", ".join(_task_text(f) for f in record["failed"][:5])
        more = f" (+{len(record['failed']) - 5} more)" if len(record["failed"]) > 5 else ""
        fields.append(("tolerated", f"{len(record['failed'])}: {tolerated}{more}"))
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
    for line in _table(headers, rows, right="1234567"):
        _say(line)


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
            record = _summary_record(info, store)
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


# -- replay ------------------------------------------------------------------------------------


def _result_record(result: Any) -> dict[str, Any]:
    error = result.error
    return {
        "run_id": result.run_id,
        "outcome": result.outcome,
        "task": _plain(result.task),
        "error": None if error is None else {"type": type(error).__name__, "message": str(error)},
        "failed": [_plain(f) for f in result.failed],
    }


def _refused(message: str, hint: str | None = None) -> NoReturn:
    raise CLIError(f"replay refused: {message}", hint)


@cli.command()
@click.argument("run")
@click.option(
    "--flow",
    "flow_cls",
    type=FLOW_CLASS,
    required=True,
    help="The flow that made the run, as module:Class (importable from here).",
)
@db_option
@json_option
@_printable_logs()
def replay(run: str, flow_cls: type[Flow], db: str | None, as_json: bool) -> None:
    """Continue RUN (an id or unique prefix) from its log, with the flow --flow names.

    Finished stages, parents and children are not run again; the rest runs with fresh
    attempts, under the same run id. The exit code tells the outcome: 0 all_over,
    1 failed_over (the failing task and error are printed), 4 interrupted.

    \b
    Example:
      threadflow replay 3f2a --db runs.db --flow myjobs:Nightly
    """
    path = _db_path(db)
    store = _open(path)
    info = _resolve(store, run)
    definition: FlowDefinition | None = flow_cls.definition
    if definition is not None and info.flow != definition.name:
        _refused(
            f"run {info.run_id} is a run of flow {info.flow!r}, not {definition.name!r}",
            f"pass --flow with the module:Class of {info.flow!r}",
        )
    try:
        result = flow_cls.replay(info.run_id, store=path)
    except ValueError as exc:
        _refused(str(exc), "start a new run to do the work again")
    except StoreError as exc:
        raise _store_error(exc) from None
    except ThreadflowError as exc:
        _refused(str(exc))  # ReplayError messages say what to do
    except KeyboardInterrupt:
        # Flow.replay stops its server on the way out, which records the run interrupted.
        _say(f"run {info.run_id}: interrupted; replay it again to go on", err=True)
        sys.exit(EXIT_INTERRUPTED)
    # No duration: a replayed run keeps its first start time.
    _report_result(result, path, as_json, flow_cls, took=None)


def _flow_arg(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


# -- graph -------------------------------------------------------------------------------------

#: Words Mermaid reads as syntax when used as a node id.
_MERMAID_WORDS = frozenset(
    "end graph flowchart subgraph direction class classdef click style linkstyle call "
    "default".split()
)


def _node_ids(definition: FlowDefinition, mermaid: bool) -> tuple[dict[str, str], str, str]:
    """Node ids of the tasks, the entrance marker and the end node, all distinct.

    DOT quotes its ids, so a task's id is its name. Mermaid's ids are bare words: a name that
    is not one becomes letters, digits and ``_`` (its label keeps the name), and a name Mermaid
    reads as a keyword gets a trailing ``_``.
    """
    taken: set[str] = set()

    def unique(name: str) -> str:
        candidate = (_MERMAID_ID_UNSAFE.sub("_", name) or "task") if mermaid else name
        while candidate in taken or (mermaid and candidate.lower() in _MERMAID_WORDS):
            candidate += "_"
        taken.add(candidate)
        return candidate

    ids = {name: unique(name) for name in definition.tasks}
    return ids, unique("entrance"), unique(ALL_OVER)


_MERMAID_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_]")
#: Characters a Mermaid label shows as they are; every other one is written as an entity code.
_MERMAID_LABEL_SAFE = frozenset(" _-.,:/+=@!?'()")


def _mermaid_label(text: str) -> str:
    """``text`` as a quoted Mermaid label: quotes, brackets, ``#``, ``<``, line breaks and
    control characters become entity codes (``#34;``), which Mermaid draws as the character,
    so no task name can end the label or the statement."""
    body = "".join(
        c if (c.isalnum() and c.isprintable()) or c in _MERMAID_LABEL_SAFE else f"#{ord(c)};"
        for c in text
    )
    return f'"{body}"'


def _mermaid(definition: FlowDefinition) -> list[str]:
    ids, entrance, end = _node_ids(definition, mermaid=True)
    lines = ["flowchart TD", f"    {entrance}((entrance))"]
    for name, spec in definition.tasks.items():
        if spec.child_task_func is not None:
            lines.append(f"    {ids[name]}[[{_mermaid_label(f'{name} (children)')}]]")
        else:
            lines.append(f"    {ids[name]}[{_mermaid_label(name)}]")
    lines.append(f"    {end}([{ALL_OVER}])")
    lines.append(f"    {entrance} --> {ids[definition.default_entrance]}")
    for name, spec in definition.tasks.items():
        for target in spec.successors or (ALL_OVER,):
            lines.append(f"    {ids[name]} --> {end if target == ALL_OVER else ids[target]}")
    return lines


def _dot_id(name: str) -> str:
    return json.dumps(name)


def _dot(definition: FlowDefinition) -> list[str]:
    ids, entrance, end = _node_ids(definition, mermaid=False)
    lines = [
        f"digraph {_dot_id(definition.name)} {{",
        "    rankdir=TB;",
        "    node [shape=box];",
        f'    {_dot_id(entrance)} [shape=circle, label="entrance"];',
    ]
    for name, spec in definition.tasks.items():
        if spec.child_task_func is not None:
            label = _dot_id(f"{name} (children)")
            lines.append(f"    {_dot_id(ids[name])} [peripheries=2, label={label}];")
        else:
            lines.append(f"    {_dot_id(ids[name])};")
    lines.append(f'    {_dot_id(end)} [shape=doublecircle, label="{ALL_OVER}"];')
    lines.append(f"    {_dot_id(entrance)} -> {_dot_id(ids[definition.default_entrance])};")
    for name, spec in definition.tasks.items():
        for target in spec.successors or (ALL_OVER,):
            dest = end if target == ALL_OVER else ids[target]
            lines.append(f"    {_dot_id(ids[name])} -> {_dot_id(dest)};")
    lines.append("}")
    return lines


@cli.command()
@click.argument("flow_cls", metavar="MODULE:CLASS", type=FLOW_CLASS)
@click.option("--dot", is_flag=True, help="Graphviz DOT instead of Mermaid.")
@click.option(
    "--db", "db", metavar="PATH", hidden=True, help="Accepted, unused: graph reads no store."
)
def graph(flow_cls: type[Flow], dot: bool, db: str | None) -> None:
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
    for line in _dot(definition) if dot else _mermaid(definition):
        _say(line)


# -- run ---------------------------------------------------------------------------------------

#: Seconds between two redraws of the progress lines.
PROGRESS_EVERY = 0.2

_PROGRESS_SIGNALS = (
    "task_start",
    "task_over",
    "task_exit",
    "task_timeout",
    "task_retry",
    "task_failed",
    "task_all_over",
)


class _StageCount:
    """What the progress line of one stage shows."""

    __slots__ = (
        "name",
        "started",
        "ended",
        "parent",
        "attempts",
        "total",
        "running",
        "done",
        "failed",
        "exits",
        "timeouts",
        "retries",
        "first_child",
        "shown",
    )

    def __init__(self, name: str, now: float) -> None:
        self.name = name
        self.started = now
        self.ended: float | None = None
        self.parent = "running"  # running, over, failed
        self.attempts = 0
        self.total = 0  # children added (and not discarded), read from the store
        self.running = 0
        self.done = 0
        self.failed = 0
        self.exits = 0
        self.timeouts = 0
        self.retries = 0
        self.first_child: float | None = None
        self.shown = False  # its final line has been printed


class _Progress:
    """Counts per stage, kept by signal receivers connected with ``sender=server``.

    Receivers run on the coordinator thread and only add to counters under a lock (they must
    not block); the main thread reads a copy to draw. The number of children added is not a
    signal: the main thread counts ``child_added`` rows in the store, from the last seq it saw.
    """

    def __init__(self, server: Flow, path: str) -> None:
        from . import signals

        self._server = server
        self._path = path
        self._lock = threading.Lock()
        self.stages: dict[str, _StageCount] = {}
        self._seq = 0
        self._conn: sqlite3.Connection | None = None
        self._receivers: list[tuple[Any, Any]] = []
        for name in _PROGRESS_SIGNALS:
            sig = getattr(signals, name)
            receiver = getattr(self, f"_on_{name}")
            sig.connect(receiver, sender=server, weak=False)
            self._receivers.append((sig, receiver))

    def close(self) -> None:
        for sig, receiver in self._receivers:
            sig.disconnect(receiver, sender=self._server)
        self._receivers.clear()
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _stage(self, task: tuple[Any, ...]) -> _StageCount:
        stage = self.stages.get(task[0])
        if stage is None:
            stage = self.stages[task[0]] = _StageCount(task[0], time.monotonic())
        return stage

    # Receivers: on the coordinator thread, one at a time, quick.

    def _on_task_start(self, sender: Any, task: tuple[Any, ...], **kw: Any) -> None:
        with self._lock:
            stage = self._stage(task)
            if len(task) == 1:
                stage.attempts += 1
                stage.parent = "running"
            else:
                stage.running += 1
                if stage.first_child is None:
                    stage.first_child = time.monotonic()

    def _ended(self, task: tuple[Any, ...]) -> _StageCount:
        stage = self._stage(task)
        if len(task) > 1:
            stage.running = max(0, stage.running - 1)
        return stage

    def _on_task_over(self, sender: Any, task: tuple[Any, ...], **kw: Any) -> None:
        with self._lock:
            stage = self._ended(task)
            if len(task) == 1:
                stage.parent = "over"
            else:
                stage.done += 1

    def _on_task_exit(self, sender: Any, task: tuple[Any, ...], **kw: Any) -> None:
        with self._lock:
            self._ended(task).exits += 1

    def _on_task_timeout(self, sender: Any, task: tuple[Any, ...], **kw: Any) -> None:
        with self._lock:
            self._ended(task).timeouts += 1

    def _on_task_retry(self, sender: Any, task: tuple[Any, ...], **kw: Any) -> None:
        with self._lock:
            self._stage(task).retries += 1

    def _on_task_failed(self, sender: Any, task: tuple[Any, ...], **kw: Any) -> None:
        with self._lock:
            stage = self._stage(task)
            if len(task) == 1:
                stage.parent = "failed"
                stage.ended = time.monotonic()
            else:
                stage.failed += 1

    def _on_task_all_over(self, sender: Any, task: tuple[Any, ...], **kw: Any) -> None:
        with self._lock:
            self._stage(task).ended = time.monotonic()

    # The main thread.

    def count_children(self, run_id: str) -> None:
        """Add the children committed since the last call to each stage's total."""
        from .store import connect

        try:
            if self._conn is None:
                self._conn = connect(self._path, write=False)
            conn = self._conn
            last = conn.execute("SELECT max(seq) FROM events").fetchone()[0] or 0
            # A rowid range: reads only the rows written since the last call.
            rows = conn.execute(
                "SELECT task, kind, count(*), sum(json_extract(data, '$.count')) FROM events "
                "WHERE seq > ? AND seq <= ? AND +run_id = ? "
                "AND +kind IN ('child_added', 'children_discarded') GROUP BY task, kind",
                (self._seq, last, run_id),
            ).fetchall()
        except (sqlite3.Error, StoreError):
            return  # progress is best effort; the run itself reports real errors
        self._seq = last
        with self._lock:
            for task, kind, count, discarded in rows:
                stage = self._stage((task,))
                stage.total += count if kind == "child_added" else -int(discarded or 0)

    def snapshot(self) -> list[_StageCount]:
        with self._lock:
            copies = []
            for stage in self.stages.values():
                copy = _StageCount(stage.name, stage.started)
                for slot in _StageCount.__slots__:
                    setattr(copy, slot, getattr(stage, slot))
                copies.append(copy)
            return copies

    def mark_shown(self, name: str) -> None:
        with self._lock:
            self.stages[name].shown = True


_BAR_WIDTH = 20


def _progress_line(stage: _StageCount, now: float, name_width: int = 12) -> str:
    """One stage's progress: a bar of children finished / added, rate, time, then troubles."""
    end = stage.ended if stage.ended is not None else now
    took = _human_duration(max(0.0, end - stage.started))
    name = printable(stage.name).ljust(name_width)
    finished = stage.done + stage.failed
    troubles = _troubles(stage)
    if stage.total == 0 and finished == 0:
        if stage.parent == "failed":
            state = f"failed after {stage.attempts} attempt{'s' if stage.attempts != 1 else ''}"
        elif stage.ended is not None or stage.parent == "over":
            state = "over"
        else:
            state = f"running (attempt {stage.attempts})"
        return f"{name} {state}  {took}  {troubles}".rstrip()
    total = max(stage.total, finished)
    filled = int(_BAR_WIDTH * finished / total) if total else 0
    bar = "#" * filled + "-" * (_BAR_WIDTH - filled)
    width = len(str(total))
    text = f"{name} [{bar}] {finished:>{width}}/{total} children"
    started = stage.first_child
    if started is not None and finished:
        text += f"  {finished / max(end - started, 1e-6):,.1f}/s"
    return f"{text}  {took}  {troubles}".rstrip()


def _troubles(stage: _StageCount) -> str:
    """``1 failed, 4 exits, 2 timeouts, 5 retries``: only the counts that are not zero."""
    parts = []
    for count, one, many in (
        (stage.failed, "failed", "failed"),
        (stage.exits, "exit", "exits"),
        (stage.timeouts, "timeout", "timeouts"),
        (stage.retries, "retry", "retries"),
    ):
        if count:
            parts.append(f"{count} {one if count == 1 else many}")
    return ", ".join(parts)


class _ProgressView:
    """Draws the stages on stderr: on a terminal, one live line per running stage, redrawn in
    place; a stage that ends leaves one final line. Elsewhere (a log, a pipe) only the final
    lines are written."""

    def __init__(self, progress: _Progress, live: bool, enabled: bool = True) -> None:
        self.progress = progress
        self.live = live
        self.enabled = enabled
        self._drawn = 0  # live lines on screen

    def _width(self) -> int:
        return max(40, shutil.get_terminal_size((100, 24)).columns - 1)

    def draw(self, final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        stages = self.progress.snapshot()
        name_width = max([12, *(len(printable(s.name)) for s in stages)])
        width = self._width()
        out: list[str] = []
        if self.live and self._drawn:
            out.append(f"\x1b[{self._drawn}A\r\x1b[J")
        live_lines = []
        for stage in stages:
            if stage.shown:
                continue
            line = _progress_line(stage, now, name_width)
            if stage.ended is not None or final:
                out.append(line + "\n")
                self.progress.mark_shown(stage.name)
            else:
                live_lines.append(line[:width])
        if self.live and not final:
            out.extend(f"{line}\n" for line in live_lines)
            self._drawn = len(live_lines)
        else:
            self._drawn = 0
        if out:
            # color=True keeps the cursor movements that click strips when it is not sure
            # of the terminal; without live lines there are none.
            click.echo("".join(out), nl=False, err=True, color=self.live or None)

    def clear(self) -> None:
        if self.enabled and self.live and self._drawn:
            click.echo(f"\x1b[{self._drawn}A\r\x1b[J", nl=False, err=True, color=True)
        self._drawn = 0


def _check_run_store(path: str) -> None:
    """``run`` creates a missing store, but never adopts a file that is not one."""
    if os.path.exists(path) and not (os.path.isfile(path) and os.path.getsize(path) == 0):
        _check_store(path)


def _stop(server: Flow) -> None:
    """Stop the server; a second Ctrl-C does not cut the stop short (it records the run)."""
    while True:
        try:
            server.stop()
            return
        except KeyboardInterrupt:
            _say("still stopping: waiting for running attempts to end", err=True)


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
    the outcome: 0 all_over, 1 failed_over, 4 interrupted.

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
    try:
        server = flow_cls.start_link(store=path)
    except StoreError as exc:
        raise _store_error(exc) from None
    except ThreadflowError as exc:  # AlreadyStarted: a global name another process owns
        raise CLIError(str(exc)) from None
    counts = _Progress(server, path)
    live = sys.stderr.isatty() if progress is None else progress
    view = _ProgressView(counts, live=live, enabled=progress is not False)
    handle: Any = None
    try:
        try:
            handle = server.start_flow(entrance=entrance)
            _say(
                f"run {handle.run_id}: {definition.name} started at "
                f"{entrance or definition.default_entrance} (store {path})",
                err=True,
            )
            while True:
                try:
                    result = handle.result(timeout=PROGRESS_EVERY)
                    break
                except TimeoutError:
                    counts.count_children(handle.run_id)
                    view.draw()
        except KeyboardInterrupt:
            view.clear()
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
        counts.count_children(result.run_id)
        view.draw(final=True)
    finally:
        counts.close()
        _stop(server)
    took = _duration(result.state["start_time"].isoformat(), _utcnow_iso())
    _report_result(result, path, as_json, flow_cls, took)


def _report_result(
    result: Any, path: str, as_json: bool, flow_cls: type, took: float | None
) -> None:
    """Print the outcome of ``run`` or ``replay`` (and on stderr what to do next), then exit
    with its code."""
    record = _result_record(result)
    if as_json:
        _echo_json(record)
    else:
        ended = f"run {result.run_id}: {result.outcome}"
        _say(ended if took is None else f"{ended} in {_human_duration(took)}")
        if result.task is not None:
            _say(f"failed task: {_task_text(record['task'])}")
            _say(f"error: {_error_text(result.error)}")
        if result.failed:
            _say(f"tolerated failures: {', '.join(_task_text(f) for f in record['failed'])}")
    replay_cmd = (
        f"threadflow replay {_quote(result.run_id)} --db {_quote(path)} "
        f"--flow {_flow_arg(flow_cls)}"
    )
    if result.outcome == "failed_over":
        _say(f"fix the cause, then replay: {replay_cmd}", err=True)
        _say(
            f"see where time went: threadflow timeline {_quote(result.run_id)} "
            f"--db {_quote(path)} -o {_quote(_timeline_file(result.run_id))}",
            err=True,
        )
        sys.exit(EXIT_FAILED)
    if result.outcome == "interrupted":
        _say(f"replay it to go on: {replay_cmd}", err=True)
        sys.exit(EXIT_INTERRUPTED)


def _timeline_file(run_id: str) -> str:
    """``timeline``'s default output: ``RUN_ID.html`` in the working directory, whatever the
    run id in the store says (a hand-written ``../../x`` is not a path)."""
    return f"{file_stem(run_id)}.html"


def _utcnow_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat()


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
            store.iter_events(info.run_id), info.run_id, status=info.status, max_rows=max_rows
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


def main(argv: Sequence[str] | None = None) -> Any:
    """The ``threadflow`` console script."""
    return cli.main(args=list(argv) if argv is not None else None, prog_name="threadflow")
