"""The SQLite event store: schema, the coordinator's writer, and readers.

Layout (``PRAGMA user_version`` = :data:`SCHEMA_VERSION`):

* ``events``: the append-only log. ``seq`` is the rowid; ``child_id`` and ``data`` are JSON
  text; ``ref`` is, for a child's events, the ``seq`` of its ``child_added`` event.
* ``runs``: one row per run, for listing runs without scanning the log.
* ``children``: one row per live child key, which makes a repeated child id an error; rows of
  discarded children are deleted so that a retry can add the same ids again.
* ``servers`` and ``requests``: global server names and the runs other processes ask of them.
* ``cancels``: runs another process asked to cancel; their owner polls it (version 2).
* ``ticks``: what each schedule decided for each of its ticks, one row per schedule name and
  tick time, which is what keeps two processes from both firing a tick (version 3; see
  ``threadflow.schedule``).

A store of an older version is brought up to date by the first writer that opens it; readers
read every version up to :data:`SCHEMA_VERSION`.

Only JSON is stored: opening a store never unpickles anything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import functools
import json
import logging
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

from ._clock import monotonic, wall
from .errors import DuplicateChildError, StoreError
from .events import (
    ABANDONED,
    CHILD_ADDED,
    EXIT,
    FINAL_KINDS,
    FLOW_STARTED,
    FOLD_DATA_KINDS,
    KINDS,
    REPLAYED,
    TASK_OVER,
    TASK_RAN,
    TASK_STARTED,
    TIMEOUT,
    Event,
    RunHistory,
    decode_id,
    decoded,
    fold,
    owner_alive,
    run_status,
    safe_text,
    ts_datetime,
)

log = logging.getLogger("threadflow")

SCHEMA_VERSION = 3
#: The oldest schema this threadflow reads (a writer upgrades it).
OLDEST_VERSION = 1
BUSY_TIMEOUT_MS = 30_000

#: Permissions of a store file that threadflow creates. The log holds payloads, results and
#: tracebacks: only its owner may read it. SQLite gives the ``-wal`` and ``-shm`` files beside it
#: the same permissions.
FILE_MODE = 0o600

#: Column order of a row handed to :meth:`Writer.append`.
EVENT_COLUMNS = ("run_id", "ts", "kind", "task", "child_id", "attempt", "ref", "data")
_ROWS_PER_INSERT = 128


@functools.lru_cache(maxsize=_ROWS_PER_INSERT)
def _insert_many(n: int) -> str:
    return (
        "INSERT INTO events (run_id, ts, kind, task, child_id, attempt, ref, data) VALUES "
        + ",".join(["(?,?,?,?,?,?,?,?)"] * n)
    )


def default_path() -> str:
    """``$THREADFLOW_DB`` if set, else ``threadflow.db`` in the working directory."""
    return os.environ.get("THREADFLOW_DB") or "threadflow.db"


#: Seconds between two WAL checkpoints of a server's store.
CHECKPOINT_EVERY = 0.2


@dataclass(frozen=True)
class RunInfo:
    """One run as listed by :meth:`EventStore.runs`: its ``runs`` row (who owns it) and what its
    log says (:attr:`history`, the fold that every reader shows).

    ``outcome`` is the last segment's end (``all_over``, ``failed_over``, ``cancelled``,
    ``interrupted``), or
    None while unfinished; :attr:`status` tells an unfinished run whose owner died
    (``"interrupted"``) from one still running (``"running"``).
    """

    run_id: str
    flow: str
    server: str
    entrance: str
    started: str
    ended: str | None
    outcome: str | None
    pid: int | None
    host: str | None
    heartbeat: float | None = None
    #: The run folded from its log (``EventStore.history``).
    history: RunHistory | None = field(default=None, repr=False, compare=False)

    @property
    def status(self) -> str:
        return run_status(self.outcome, self.pid, self.host, self.heartbeat)

    def _count(self, name: str) -> int:
        return 0 if self.history is None else int(getattr(self.history, name))

    @property
    def children_added(self) -> int:
        """Children of the run's tasks (added by attempts that succeeded or still run)."""
        return self._count("children_added")

    @property
    def children_done(self) -> int:
        """Children that succeeded (a child that failed, then succeeded on replay, included)."""
        return self._count("children_done")

    @property
    def children_failed(self) -> int:
        """Children whose last outcome is a failure (tolerated ones included)."""
        return self._count("children_failed")

    @property
    def children_tolerated(self) -> int:
        return self._count("children_tolerated")

    @property
    def children_recovered(self) -> int:
        """Children that failed in one segment and succeeded in a later one."""
        return self._count("children_recovered")

    @property
    def segments(self) -> int:
        return self._count("segments")

    @property
    def active(self) -> float | None:
        """Seconds the run was running (pauses between segments not counted)."""
        return None if self.history is None else self.history.active

    @property
    def wall(self) -> float | None:
        """Seconds from its first event to its last."""
        return None if self.history is None else self.history.wall

    @property
    def duration(self) -> float | None:
        """:attr:`active`, once the run has ended; None before."""
        return None if self.outcome is None else self.active


#: What a schedule decided for a tick (``Tick.decision``). Final: ``fired`` (a run started at
#: its tick), ``caught_up`` (a run started for a tick missed while no scheduler looked),
#: ``skipped`` (no run: the schedule's run was still going, or one tick was queued already),
#: ``missed`` (no run: passed while no scheduler looked; one row sums up a stretch of them).
#: Waiting: ``queued`` (starts when the schedule's run ends) and ``catching_up`` (a missed tick
#: that ``catch_up="all"`` or ``"latest"`` runs once the runs before it have ended).
TICK_DECISIONS = ("fired", "caught_up", "skipped", "missed", "queued", "catching_up")


@dataclass(frozen=True)
class Tick:
    """One row of a schedule's history (:meth:`EventStore.ticks`): a tick and its decision.

    :ivar schedule: the schedule's name.
    :ivar tick: the tick's time (aware UTC datetime); for a ``missed`` row that sums up several
        ticks, the last of them.
    :ivar decision: one of :data:`TICK_DECISIONS`.
    :ivar run_id: the run the tick started (``fired``, ``caught_up``), else None.
    :ivar count: how many ticks the row stands for: 1, or for a ``missed`` row the ticks it
        sums up (from :attr:`first` to :attr:`tick`; for a cron stretch of more than 10,000
        ticks, 10,000, and :attr:`detail` says "more than").
    :ivar first: for a ``missed`` row, the first tick it sums up; else None.
    :ivar detail: why, in words (what was still running, what was queued, the downtime).
    :ivar decided: when the decision was last written (the wall clock; UTC).
    :ivar pid: the process that decided it.
    :ivar host: that process's host.
    """

    schedule: str
    tick: datetime.datetime
    decision: str
    run_id: str | None = None
    count: int = 1
    first: datetime.datetime | None = None
    detail: str | None = None
    decided: datetime.datetime | None = None
    pid: int | None = None
    host: str | None = None


def create_file(path: str, mode: int = FILE_MODE) -> None:
    """Create the store file ``path``, empty, with permissions ``mode``, unless it exists.

    SQLite would create it with the umask's permissions, 0o644 under the usual 022: readable
    by every local user. ``mode`` is applied as given (the umask does not take bits from it),
    so that a group may be given access with 0o640 or 0o660. An empty file is a new database
    to SQLite. A file that exists keeps its permissions, and must open for writing.

    :raises ValueError: if ``mode`` is not a permission mode (an int from 0 to 0o777).
    :raises StoreError: if the directory is missing, the file cannot be created there, or it
        exists and this process may not write it.
    """
    if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o777:
        raise ValueError(
            f"store_mode={mode!r} is not a file permission mode; use an octal number such as "
            f"0o{FILE_MODE:o} (the owner only) or 0o640 (the owner's group may read)"
        )
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise StoreError(
            path,
            f"cannot create the store {path!r}: the directory {folder!r} does not exist",
            "create the directory first, or point store= at an existing one",
        )
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:  # an existing store, or another process created it just now
        _check_writable(path)
        return
    except OSError as exc:
        raise StoreError(
            path,
            f"cannot create the store {path!r} in {folder!r}: {exc.strerror or exc}",
            "make the directory writable for this user, or point store= at a writable place",
        ) from exc
    try:
        if hasattr(os, "fchmod"):  # not on Windows before Python 3.13, where modes mean little
            os.fchmod(fd, mode)
    finally:
        os.close(fd)


def _check_writable(path: str) -> None:
    """Refuse a file this process may not write, before SQLite opens it.

    SQLite would open it read-only without an error, and leave ``-wal`` and ``-shm`` files
    that it cannot remove beside it. ``access(2)`` asks the system itself, which knows about
    ACLs, read-only mounts and root. Other errors are left to SQLite to tell.

    Never by opening and closing the file: closing any descriptor of it drops every POSIX lock
    this process holds on it, SQLite's locks of its other connections to the store included
    (a second server, a schedule). Another process then takes the store for unused, and its
    reader deletes the WAL those connections go on writing into: their commits are seen by
    nobody else, and lost if this process dies.
    """
    effective = os.access in os.supports_effective_ids  # as open() decides: effective ids
    if os.access(path, os.W_OK, effective_ids=effective):
        return
    read_only_mount = hasattr(os, "statvfs") and bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    raise _not_writable(path, os.strerror(errno.EROFS if read_only_mount else errno.EACCES))


def check_readable(path: str) -> None:
    """Refuse, without changing a byte of it, a file that is not a threadflow store.

    The one check of every reader (``EventStore``, the command line): the file is probed
    read-only (an ``?mode=ro`` URI), so a missing file is not created and another application's
    database is not touched.

    :raises StoreError: if ``path`` is missing, a directory, not an SQLite database, an SQLite
        database without threadflow's tables, or a store of a newer threadflow.
    """
    if not os.path.exists(path):
        raise StoreError(path, f"no store at {path!r}")
    if os.path.isdir(path):
        raise StoreError(path, f"{path!r} is a directory, not a store file")
    uri = Path(path).absolute().as_uri() + "?mode=ro"
    try:
        probe = sqlite3.connect(uri, uri=True)
        try:
            version = probe.execute("PRAGMA user_version").fetchone()[0]
            tables = {row[0] for row in probe.execute("SELECT name FROM sqlite_master")}
        finally:
            probe.close()
    except sqlite3.Error as exc:
        raise StoreError(path, f"{path!r} is not a readable SQLite database ({exc})") from None
    if version > SCHEMA_VERSION:
        raise StoreError(
            path,
            f"the store {path!r} has schema version {version}, written by a newer threadflow "
            f"(this one reads up to {SCHEMA_VERSION})",
            "upgrade threadflow",
        )
    if version < OLDEST_VERSION or not {"events", "runs"} <= tables:
        raise StoreError(path, f"{path!r} is not a threadflow store (no threadflow tables)")


def connect(
    path: str,
    *,
    fsync: bool = False,
    write: bool = True,
    shared: bool = False,
    read_only: bool = False,
) -> sqlite3.Connection:
    """Open ``path`` with a busy timeout, in autocommit mode (explicit BEGINs).

    A writer (``write=True``) creates a missing file (see :func:`create_file`) and switches it
    to WAL. Otherwise the file must exist and be a threadflow store (see
    :func:`check_readable`): it never touches another application's database.

    :param shared: any thread may use the connection (one at a time: the caller's lock), as a
        :class:`Follower`'s is; otherwise only the thread that made it.
    :param read_only: open it read-only (``?mode=ro``), as every reader of
        :class:`EventStore` does. Not only a matter of intent: a read-write connection that
        is the last one to close a WAL database checkpoints the WAL into the file and deletes
        it, so a reader that is left alone with the WAL of a process that died (or ended
        without its checkpoint) would rewrite the store. Implies ``write=False``.
    :raises StoreError: if the file is not a SQLite database, was written by a newer
        threadflow, or (for a reader) is not a threadflow store; for a writer, if it cannot be
        created.
    """
    write = write and not read_only
    if write:
        create_file(path)
    else:
        check_readable(path)
    target, uri = path, False
    if read_only:
        target, uri = Path(path).absolute().as_uri() + "?mode=ro", True
    try:
        conn = sqlite3.connect(
            target,
            uri=uri,
            isolation_level=None,
            timeout=BUSY_TIMEOUT_MS / 1000,
            cached_statements=512,
            check_same_thread=not shared,
        )
    except sqlite3.Error as exc:
        raise StoreError(path, f"cannot open the store {path!r}: {exc}") from exc
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        if version > SCHEMA_VERSION:
            raise StoreError(
                path,
                f"the store {path!r} has schema version {version}, written by a newer "
                f"threadflow (this one reads up to {SCHEMA_VERSION})",
                "upgrade threadflow",
            )
        if not write and version < OLDEST_VERSION:
            raise StoreError(path, f"{path!r} is not a threadflow store (no threadflow tables)")
        if write:
            _use_wal(conn)
            conn.execute(f"PRAGMA synchronous = {'FULL' if fsync else 'NORMAL'}")
    except sqlite3.DatabaseError as exc:
        conn.close()
        if _read_only(exc):
            raise _not_writable(path, str(exc)) from exc
        raise StoreError(
            path, f"the store {path!r} is not a usable SQLite database ({exc})"
        ) from exc
    except BaseException:
        conn.close()
        raise
    return conn


def _read_only(exc: sqlite3.Error) -> bool:
    """Whether SQLite refused to write: the file, or its directory (for ``-wal``), is read-only."""
    code: int | None = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    if code is not None:
        return code & 0xFF == sqlite3.SQLITE_READONLY
    return "readonly database" in str(exc)


def _not_writable(path: str, why: str) -> StoreError:
    folder = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    return StoreError(
        path,
        f"this process cannot write the store {path!r} ({why})",
        f"give this user write access to the file and to its directory {folder!r} (SQLite "
        f"writes {name}-wal and {name}-shm there), or point store= at another file",
    )


#: Problems of a corrupt store that :func:`check_store` names at most (``quick_check(N)``: N
#: bounds the report, not the work, which is a read of the whole file).
_PROBLEMS_SHOWN = 3


def check_store(conn: sqlite3.Connection, path: str) -> None:
    """Refuse, at start, a store this process cannot write or whose pages are corrupt.

    Otherwise SQLite opens a file it may not write read-only, without an error (even
    ``BEGIN IMMEDIATE`` passes): ``start_link`` succeeded and the first write of the first run
    failed in the coordinator. :func:`create_file` refuses most such files before SQLite opens
    them; SQLite's own answer here covers the rest. And runs went on writing into a file with
    broken pages until a read stumbled on them, maybe in a replay.

    ``PRAGMA quick_check`` reads every page of the file once (it leaves out only the
    cross-check of indexes against their tables that ``integrity_check`` adds), so its cost
    grows with the store: with the file in the page cache, about 0.1 s for a log of 100,000
    children (48 MB) and 0.6 to 0.9 s for a million (490 MB); from disk, the time to read the
    file. It runs once per server start, not per run.

    :raises StoreError: if the file is corrupt or cannot be written.
    :raises sqlite3.OperationalError: if another writer held the lock for the busy timeout.
    """
    try:
        problems = [row[0] for row in conn.execute(f"PRAGMA quick_check({_PROBLEMS_SHOWN})")]
    except sqlite3.DatabaseError as exc:  # a page too broken to walk
        if isinstance(exc, sqlite3.OperationalError) and _busy(exc):
            raise
        problems = [str(exc)]
    if problems != ["ok"]:
        raise StoreError(
            path,
            f"the store {path!r} is corrupt; SQLite's quick_check found: " + "; ".join(problems),
            f"restore it from a backup, or save what is readable with `sqlite3 {path} .recover "
            "| sqlite3 recovered.db` and point store= at the recovered file",
        )
    # Rewriting the version with its own value is a real write of page 1, refused by SQLite if
    # the file is read-only; it is rolled back, so the file stays byte for byte as it was.
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(f"PRAGMA user_version = {version}")
    except sqlite3.OperationalError as exc:
        if _read_only(exc):
            raise _not_writable(path, str(exc)) from exc
        raise
    finally:
        if conn.in_transaction:  # SQLite ends it by itself after some errors
            conn.execute("ROLLBACK")


def _busy(exc: sqlite3.OperationalError) -> bool:
    """Whether SQLite refused because another connection holds the file (BUSY or LOCKED)."""
    code: int | None = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "is locked" in str(exc)


def _use_wal(conn: sqlite3.Connection) -> None:
    """Switch the file to WAL, retrying for up to the busy timeout while others hold it.

    Changing the journal mode needs the file to itself, and SQLite answers that request with
    SQLITE_BUSY at once, without the busy timeout: this happens whenever several processes
    open the same new store together. Once a file is in WAL it stays so, and this is a read.
    """
    deadline = monotonic() + BUSY_TIMEOUT_MS / 1000
    pause = 0.001
    while True:
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if not _busy(exc) or monotonic() + pause > deadline:
                raise
        # Not an Event to wait on: the other holder is another process. Backing off from 1 ms
        # to 50 ms keeps a crowd of starters from retrying in step.
        time.sleep(pause)
        pause = min(2 * pause, 0.05)


def ensure_schema(conn: sqlite3.Connection) -> None:
    """Create the tables and indexes if missing (idempotent, safe against concurrent creators).

    The schema is made in one ``BEGIN IMMEDIATE`` transaction: it takes the write lock up front,
    waiting on the busy timeout. Statements in autocommit mode (or a deferred transaction)
    read before they write, and SQLite refuses at once, without waiting, the write of a reader
    whose snapshot another process has changed meanwhile: several processes creating one new
    store used to fail with ``database is locked`` that way. The version is read again under
    the lock, so only the first of them creates the tables.
    """
    if conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        if conn.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
            _create_schema(conn)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _create_schema(conn: sqlite3.Connection) -> None:
    """The tables and indexes, in the caller's write transaction.

    sqlite-utils nests its own writes (its probe for STRICT support) in savepoints of that
    transaction; under our write lock that probe cannot be refused by another writer.
    """
    # Imported here: it is most of the cost of importing threadflow, which every subprocess
    # worker pays at start, and only creating a store needs it.
    import sqlite_utils

    db = sqlite_utils.Database(conn)
    db.table("events").create(
        {
            "seq": int,
            "run_id": str,
            "ts": str,
            "kind": str,
            "task": str,
            "child_id": str,
            "attempt": int,
            "ref": int,
            "data": str,
        },
        pk="seq",
        not_null=["run_id", "ts", "kind"],
        if_not_exists=True,
        strict=True,
    )
    # Serves results() (task_over of a task, in child order) and per-run scans.
    db.table("events").create_index(
        ["run_id", "kind", "task", "ref"], index_name="events_by_run", if_not_exists=True
    )
    db.table("runs").create(
        {
            "run_id": str,
            "flow": str,
            "server": str,
            "entrance": str,
            "started": str,
            "ended": str,
            "outcome": str,
            "pid": int,
            "host": str,
            "heartbeat": float,
        },
        pk="run_id",
        not_null=["flow", "server", "started"],
        if_not_exists=True,
        strict=True,
    )
    db.table("children").create(
        {"seq": int, "run_id": str, "task": str, "child_id": str},
        pk="seq",
        not_null=["run_id", "task", "child_id"],
        if_not_exists=True,
        strict=True,
    )
    db.table("children").create_index(
        ["run_id", "task", "child_id"], index_name="children_key", unique=True, if_not_exists=True
    )
    # Global server names: one live owner per name and store file (a lease kept by heartbeats).
    db.table("servers").create(
        {"name": str, "flow": str, "pid": int, "host": str, "started": str, "heartbeat": float},
        pk="name",
        not_null=["flow", "pid", "host", "started", "heartbeat"],
        if_not_exists=True,
        strict=True,
    )
    # Runs asked of a global server by other processes; its owner answers them.
    db.table("requests").create(
        {
            "id": int,
            "server": str,
            "entrance": str,
            "run_id": str,
            "status": str,
            "message": str,
            "created": float,
            "inputs": str,
        },
        pk="id",
        not_null=["server", "run_id", "status", "created"],
        if_not_exists=True,
        strict=True,
    )
    # Version 1 stores: requests had no inputs.
    if "inputs" not in {row[1] for row in conn.execute("PRAGMA table_info(requests)")}:
        conn.execute("ALTER TABLE requests ADD COLUMN inputs TEXT")
    # Runs another process asked to cancel (threadflow cancel, RemoteRunHandle.cancel()); the
    # owner of the run polls for its own run id and ends it "cancelled".
    db.table("cancels").create(
        {"run_id": str, "requested": float, "reason": str},
        pk="run_id",
        not_null=["requested"],
        if_not_exists=True,
        strict=True,
    )
    # Version 3: the decisions of schedules (Flow.schedule), one row per (schedule, tick). The
    # primary key is the arbiter between processes: the first to insert a tick's row decided it.
    db.table("ticks").create(
        {
            "schedule": str,
            "tick": str,
            "decision": str,
            "run_id": str,
            "count": int,
            "first": str,
            "detail": str,
            "decided": str,
            "pid": int,
            "host": str,
            "lease": float,
        },
        pk=("schedule", "tick"),
        not_null=["schedule", "tick", "decision", "count", "decided"],
        if_not_exists=True,
        strict=True,
    )


class Writer:
    """The coordinator's connection: the only writer of a server. Not thread-safe by design.

    Writes of one coordinator turn share one ``BEGIN IMMEDIATE`` transaction (taking the write
    lock up front, so the busy timeout applies and no deferred upgrade can deadlock).
    """

    def __init__(self, path: str, *, fsync: bool = False) -> None:
        self.path = path
        self.conn = connect(path, fsync=fsync)
        try:
            check_store(self.conn, path)
            ensure_schema(self.conn)
        except BaseException as exc:
            self.conn.close()
            if isinstance(exc, sqlite3.DatabaseError):
                raise StoreError(path, f"cannot set up the store {path!r}: {exc}") from exc
            raise
        self._in_tx = False
        #: When the open transaction began (real monotonic seconds).
        self.opened = 0.0
        # Checkpoints (copying the WAL back into the database, with an fsync) are the
        # Checkpointer thread's work, so that a commit never stalls the coordinator on one.
        self.conn.execute("PRAGMA wal_autocheckpoint = 0")
        self.checkpointer = Checkpointer(path)

    @property
    def in_transaction(self) -> bool:
        return self._in_tx

    def begin(self) -> None:
        if not self._in_tx:
            self.conn.execute("BEGIN IMMEDIATE")
            self._in_tx = True
            self.opened = monotonic()

    def commit(self) -> None:
        if self._in_tx:
            self._in_tx = False
            self.conn.execute("COMMIT")
            self.checkpointer.poke()

    @contextlib.contextmanager
    def undo_on_error(self, name: str) -> Iterator[None]:
        """Run a block's writes under the savepoint ``name``: if the block raises, they are
        undone and the rest of the transaction stays.

        If SQLite itself rolled back the whole transaction (a ``RAISE(ROLLBACK)`` trigger, some
        I/O errors), there is no savepoint left to go back to: the transaction is over, and
        writes made earlier in it are lost too.
        """
        self.begin()
        self.conn.execute(f"SAVEPOINT {name}")
        try:
            yield
        except BaseException:
            if self.conn.in_transaction:
                self.conn.execute(f"ROLLBACK TO {name}")
                self.conn.execute(f"RELEASE {name}")
            else:
                self._in_tx = False
            raise
        self.conn.execute(f"RELEASE {name}")

    def run_exists(self, run_id: str) -> bool:
        """Whether the store has a run ``run_id`` (this transaction's new runs included)."""
        row = self.conn.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return row is not None

    def append(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """Insert event rows (see :data:`EVENT_COLUMNS`), in order.

        Rows go in multi-row INSERTs of up to :data:`_ROWS_PER_INSERT`: one statement step (and
        one release of the GIL) per group instead of per row, which matters when worker threads
        compete for the GIL with this writer.
        """
        self.begin()
        execute = self.conn.execute
        step = _ROWS_PER_INSERT
        for start in range(0, len(rows), step):
            group = rows[start : start + step]
            values = list(chain.from_iterable(group))
            try:
                execute(_insert_many(len(group)), values)
            except UnicodeEncodeError:
                # Text that is not UTF-8 (lone surrogates) got past the encoders: store it
                # escaped rather than fail the whole turn. Nothing was inserted by the failed
                # statement (it failed while binding).
                values = [safe_text(v) if isinstance(v, str) else v for v in values]
                execute(_insert_many(len(group)), values)

    def _append_numbered(self, rows: Sequence[tuple[Any, ...]]) -> int:
        """As :meth:`append`; return the seq of the first row.

        Rows of one call get consecutive seqs: we hold the write lock, and a rowid table
        without AUTOINCREMENT hands out ``max(rowid) + 1``.
        """
        self.append(rows)
        last: int = self.conn.execute("SELECT last_insert_rowid()").fetchone()[0]
        return last - len(rows) + 1

    def add_children(
        self, run_id: str, task: str, rows: Sequence[tuple[Any, ...]], ids: Sequence[str]
    ) -> int:
        """Append ``child_added`` rows and their keys; return the first seq.

        :raises DuplicateChildError: (nothing of this chunk is kept) if an id is already live.
        """
        self.begin()
        self.conn.execute("SAVEPOINT add_children")
        try:
            first = self._append_numbered(rows)
            # The keys are copied from the rows just written, by SQLite: no Python per child.
            self.conn.execute(
                "INSERT INTO children (seq, run_id, task, child_id) "
                "SELECT seq, run_id, task, child_id FROM events WHERE seq BETWEEN ? AND ?",
                (first, first + len(rows) - 1),
            )
        except sqlite3.IntegrityError:
            self.conn.execute("ROLLBACK TO add_children")
            self.conn.execute("RELEASE add_children")
            duplicate = decode_id(self._first_duplicate(run_id, task, ids))
            raise DuplicateChildError(task, duplicate) from None
        self.conn.execute("RELEASE add_children")
        return first

    def _first_duplicate(self, run_id: str, task: str, ids: Sequence[str]) -> str:
        seen: set[str] = set()
        for cid in ids:
            row = self.conn.execute(
                "SELECT 1 FROM children WHERE run_id = ? AND task = ? AND child_id = ?",
                (run_id, task, cid),
            ).fetchone()
            if row or cid in seen:
                return cid
            seen.add(cid)
        raise AssertionError("integrity error without a duplicate child id")  # pragma: no cover

    def discard_children(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Forget the keys of discarded children so that a retry may add the same ids."""
        self.begin()
        self.conn.executemany("DELETE FROM children WHERE seq BETWEEN ? AND ?", ranges)

    def read_children(self, lo: int, hi: int, limit: int) -> list[tuple[int, str, str]]:
        """``(seq, child_id, data)`` of ``child_added`` rows with ``lo <= seq <= hi``, in order."""
        return self.conn.execute(
            "SELECT seq, child_id, data FROM events WHERE seq BETWEEN ? AND ? "
            "AND kind = 'child_added' ORDER BY seq LIMIT ?",
            (lo, hi, limit),
        ).fetchall()

    def read_unfinished_children(
        self, run_id: str, task: str, lo: int, hi: int, limit: int
    ) -> list[tuple[int, str, str]]:
        """As :meth:`read_children`, skipping children that already finished (for replay):
        those with a ``task_over`` (or ``task_ran``), or a ``task_failed`` that was tolerated.
        This is the SQL of the fold's *finished* (``children_done`` and ``children_tolerated``);
        ``tests/test_fold.py`` checks that the two agree."""
        return self.conn.execute(
            "SELECT a.seq, a.child_id, a.data FROM events a WHERE a.seq BETWEEN ? AND ? "
            "AND a.kind = 'child_added' AND NOT EXISTS (SELECT 1 FROM events o "
            "WHERE o.run_id = ? AND o.kind IN ('task_over', 'task_ran') AND o.task = ? "
            "AND o.ref = a.seq) AND NOT EXISTS (SELECT 1 FROM events f WHERE f.run_id = ? "
            "AND f.kind = 'task_failed' "
            "AND f.task = ? AND f.ref = a.seq AND json_extract(f.data, '$.tolerated')) "
            "ORDER BY a.seq LIMIT ?",
            (lo, hi, run_id, task, run_id, task, limit),
        ).fetchall()

    def drop_unreleased_children(self, run_id: str, released: Sequence[tuple[int, int]]) -> None:
        """Forget the keys of children whose adding attempt never succeeded (replay)."""
        self.begin()
        gaps, start = [], 0
        for lo, hi in sorted(released):
            if lo > start:
                gaps.append((run_id, start, lo - 1))
            start = max(start, hi + 1)
        gaps.append((run_id, start, 2**62))
        self.conn.executemany("DELETE FROM children WHERE run_id = ? AND seq BETWEEN ? AND ?", gaps)

    def run_started(self, row: dict[str, Any]) -> None:
        self.begin()
        self.conn.execute(
            "INSERT INTO runs (run_id, flow, server, entrance, started, pid, host, heartbeat) "
            "VALUES (:run_id, :flow, :server, :entrance, :started, :pid, :host, :heartbeat)",
            row,
        )

    def run_owner(self, run_id: str) -> tuple[Any, ...] | None:
        """``(outcome, pid, host, heartbeat)`` of run ``run_id``, or None if there is none."""
        row: tuple[Any, ...] | None = self.conn.execute(
            "SELECT outcome, pid, host, heartbeat FROM runs WHERE run_id = ?", (run_id,)
        ).fetchone()
        return row

    def claim_run(self, run_id: str, pid: int, host: str) -> None:
        """Make this process the owner of run ``run_id`` again, for a replay, in the current
        transaction (the caller has decided it may: see ``server.replay_refusal``)."""
        self.begin()
        self.conn.execute(
            "UPDATE runs SET outcome = NULL, ended = NULL, pid = ?, host = ?, heartbeat = ? "
            "WHERE run_id = ?",
            (pid, host, wall(), run_id),
        )
        # A cancel asked of an earlier segment that nobody took is not for this one.
        with contextlib.suppress(sqlite3.Error):
            self.conn.execute("DELETE FROM cancels WHERE run_id = ?", (run_id,))

    def heartbeat(self, run_id: str | None, server: str | None, pid: int) -> None:
        """Renew the leases of the running run and of a global server name."""
        self.begin()
        now = wall()
        if run_id is not None:
            self.conn.execute("UPDATE runs SET heartbeat = ? WHERE run_id = ?", (now, run_id))
        if server is not None:
            self.conn.execute(
                "UPDATE servers SET heartbeat = ? WHERE name = ? AND pid = ?", (now, server, pid)
            )

    def acquire_server(self, name: str, flow: str, pid: int, host: str, started: str) -> None:
        """Own the global server ``name`` in this store, taking it over from a dead owner.

        :raises AlreadyStarted: if a live process owns it.
        """
        from .errors import AlreadyStarted

        self.begin()
        try:
            row = self.conn.execute(
                "SELECT pid, host, heartbeat FROM servers WHERE name = ?", (name,)
            ).fetchone()
            if row is not None and owner_alive(*row):
                raise AlreadyStarted(("global", name), None, owner=f"process {row[0]} on {row[1]}")
            self.conn.execute(
                "INSERT OR REPLACE INTO servers (name, flow, pid, host, started, heartbeat) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (name, flow, pid, host, started, wall()),
            )
        except BaseException:
            self.conn.execute("ROLLBACK")
            self._in_tx = False
            raise
        self.commit()

    def release_server(self, name: str, pid: int) -> None:
        self.begin()
        self.conn.execute("DELETE FROM servers WHERE name = ? AND pid = ?", (name, pid))

    def pending_requests(self, name: str) -> list[tuple[int, Any, Any, Any]]:
        """``(id, entrance, run_id, inputs)`` of the runs other processes asked of ``name``.

        As stored, unchecked: anyone who can write the file can insert a row, and a table not
        made by threadflow may hold any type (see ``remote.check_request``), or lack the
        ``inputs`` column (then no request has inputs).

        :raises sqlite3.Error: if the table cannot be read at all.
        """
        where = "FROM requests WHERE server = ? AND status = 'pending' ORDER BY id"
        try:
            rows = self.conn.execute(f"SELECT id, entrance, run_id, inputs {where}", (name,))
        except sqlite3.OperationalError:  # a table replaced by one without inputs
            rows = self.conn.execute(f"SELECT id, entrance, run_id, NULL {where}", (name,))
        return rows.fetchall()

    def answer_request(self, request_id: int, status: str, message: str | None) -> bool:
        """Answer a request that is still pending; False if it is not (its asker gave up)."""
        self.begin()
        cur = self.conn.execute(
            "UPDATE requests SET status = ?, message = ? WHERE id = ? AND status = 'pending'",
            (status, message, request_id),
        )
        return cur.rowcount == 1

    def rollback(self) -> None:
        """Drop the open transaction, if any (after a failed write or commit)."""
        self._in_tx = False
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")

    def interrupt_unfinished(self, run_id: str, ended: str, data: str) -> bool:
        """End run ``run_id`` ``interrupted`` if the store holds it unfinished; say if it did."""
        self.begin()
        cur = self.conn.execute(
            "UPDATE runs SET ended = ?, outcome = 'interrupted' "
            "WHERE run_id = ? AND outcome IS NULL",
            (ended, run_id),
        )
        if cur.rowcount != 1:
            return False
        self.append([(run_id, ended, "interrupted", None, None, None, None, data)])
        return True

    def cancel_requested(self, run_id: str) -> str | None:
        """The reason of a cancel of ``run_id`` another process asked for (and take the
        request: it is answered by the run's end), or None."""
        try:
            row = self.conn.execute(
                "SELECT reason FROM cancels WHERE run_id = ?", (run_id,)
            ).fetchone()
        except sqlite3.Error:  # the table was dropped by someone who may write: no cancels
            return None
        if row is None:
            return None
        self.begin()
        self.conn.execute("DELETE FROM cancels WHERE run_id = ?", (run_id,))
        return str(row[0] or "cancelled")

    def run_ended(self, run_id: str, ended: str, outcome: str) -> None:
        self.begin()
        self.conn.execute(
            "UPDATE runs SET ended = ?, outcome = ? WHERE run_id = ?", (ended, outcome, run_id)
        )

    def close(self) -> None:
        try:
            if self._in_tx:
                self.conn.execute("ROLLBACK")
        finally:
            self._in_tx = False
            self.checkpointer.stop()
            self.conn.close()


class Checkpointer:
    """A thread that checkpoints the WAL every :data:`CHECKPOINT_EVERY` seconds.

    ``PASSIVE`` checkpoints never block the writer or readers; if one cannot finish (a reader
    holds an old snapshot), the next one goes on. Started lazily by the first :meth:`poke`.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poke(self) -> None:
        """Make sure the thread runs (called by the writer after a commit)."""
        if self._thread is None:
            name = f"threadflow-checkpoint-{os.path.basename(self.path)}"
            self._thread = threading.Thread(target=self._run, name=name, daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=0)
        except sqlite3.Error:  # pragma: no cover - the writer opened the same file
            log.exception("threadflow: the checkpoint thread cannot open %r", self.path)
            return
        try:
            while not self._stop.wait(CHECKPOINT_EVERY):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error:  # busy or locked: the next round will do it
                    pass
        finally:
            conn.close()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


_EVENT_SELECT = "seq, run_id, ts, kind, task, child_id, attempt, ref, data"
# The columns the fold reads: the data only of the kinds it looks into (not payloads, results or
# tracebacks).
_FOLD_SELECT = (
    "seq, run_id, ts, kind, task, child_id, attempt, ref, CASE WHEN kind IN ("
    + ",".join(f"'{kind}'" for kind in FOLD_DATA_KINDS)
    + ") THEN data END"
)
#: Kinds counted by SQLite in :func:`fold_run` rather than decoded: a child's own events (and the
#: ``child_added`` rows), which make up nearly all of a big log.
_COUNTED = (CHILD_ADDED, TASK_STARTED, TASK_OVER, TASK_RAN)
#: Kinds of a child's success (``task_ran``: started and over in one row).
_SUCCESSES = (TASK_OVER, TASK_RAN)


def _decoded(cur: sqlite3.Cursor) -> Iterator[Event]:
    while rows := cur.fetchmany(1000):
        for s, r, ts, k, t, c, a, ref, d in rows:
            yield Event(s, r, ts, k, t, decode_id(c), a, ref, json.loads(d) if d else None)


def fold_run(conn: sqlite3.Connection, run_id: str) -> RunHistory:
    """``events.fold`` of every event of ``run_id``, computed mostly by SQLite.

    The fold reads the few events that carry decisions (run and stage ends, releases,
    failures, parent attempts) one by one; a child's ``child_added``, ``task_started`` and
    ``task_over``, nearly all of a big log, are counted from the index instead of decoded. The
    result equals the plain fold field by field, what it keeps to go on counting included
    (``tests/test_fold.py`` checks it on random logs): this is that same function, faster, not
    a second definition. So it may be fed the events written after ``last_seq`` one by one, as
    :class:`Follower` does.

    Its queries read one snapshot of the store (a read transaction), so a run that is being
    written is folded as it stood at one moment.
    """
    own = not conn.in_transaction
    if own:
        conn.execute("BEGIN")
    try:
        return _fold_run(conn, run_id)
    finally:
        if own and conn.in_transaction:
            conn.execute("COMMIT")


def _fold_run(conn: sqlite3.Connection, run_id: str) -> RunHistory:
    decoded = ",".join(f"'{kind}'" for kind in KINDS if kind not in _COUNTED)
    cur = conn.execute(
        f"SELECT {_FOLD_SELECT} FROM events WHERE run_id = ? AND kind IN ({decoded}) "
        f"UNION ALL SELECT {_FOLD_SELECT} FROM events WHERE run_id = ? "
        f"AND kind IN ('{TASK_STARTED}', '{TASK_OVER}') AND ref IS NULL ORDER BY seq",
        (run_id, run_id),
    )
    history = fold(_decoded(cur), run_id)
    # In index order (run_id, kind, task): no sorting. count(ref) counts a child's events.
    rows = conn.execute(
        "SELECT kind, task, count(*), count(ref), min(seq), max(seq) FROM events "
        "WHERE run_id = ? GROUP BY kind, task",
        (run_id,),
    ).fetchall()
    if not rows:
        return history
    spans, seg_open = history.spans, history.segment_open
    last = rows
    if seg_open and len(spans) > 1:  # the counts of the open segment, from its first seq
        last = conn.execute(
            "SELECT kind, task, count(*), count(ref) FROM events WHERE run_id = ? AND seq >= ? "
            "GROUP BY kind, task",
            (run_id, spans[-1].seq),
        ).fetchall()
    first_seq, last_seq = min(row[4] for row in rows), max(row[5] for row in rows)
    history.events = sum(row[2] for row in rows)
    # Stages a replay ran again from scratch: their counts start after that replay's event.
    counted = [row for row in rows if row[1] not in history.reruns]
    for name, since in history.reruns.items():
        counted.extend(
            (kind, name, n, children, lo, hi)
            for kind, n, children, lo, hi in conn.execute(
                "SELECT kind, count(*), count(ref), min(seq), max(seq) FROM events "
                "WHERE run_id = ? AND task = ? AND seq > ? GROUP BY kind",
                (run_id, name, since),
            )
        )
    tasks: dict[str, list[int]] = {}  # first seq, last seq, child attempts started, done
    for kind, task, _, children, lo, hi in counted:
        if task is not None:
            t = tasks.setdefault(task, [lo, hi, 0, 0])
            t[0], t[1] = min(t[0], lo), max(t[1], hi)
            if kind in (TASK_STARTED, TASK_RAN):
                t[2] += children
            if kind in _SUCCESSES:
                t[3] += children
    added: dict[str, int] = {}  # child_added rows of the open segment
    running: dict[str, dict[tuple[int, int | None], tuple[int, str, Any]]] = {}
    if seg_open:
        for kind, task, n, *_ in last:
            if kind == CHILD_ADDED:
                added[task] = n
        if any(kind == TASK_STARTED and children for kind, _, _, children, *_ in last):
            running = _running_children(conn, run_id, spans[-1].seq)
    # A segment without a final event ends at its last event: for the last one, the run's
    # last; for an earlier one (a crash, then a replay), the last before the next segment.
    ends = {len(spans) - 1: last_seq} if seg_open else {}
    for i, span in enumerate(spans[:-1]):
        if span.outcome is None:
            row = conn.execute(
                "SELECT seq FROM events WHERE seq < ? AND +run_id = ? ORDER BY seq DESC LIMIT 1",
                (spans[i + 1].seq, run_id),
            ).fetchone()
            ends[i] = row[0]
    wanted = {first_seq, last_seq, *ends.values(), *(v for t in tasks.values() for v in t[:2])}
    ts_of = _timestamps(conn, sorted(wanted))
    history.first_ts, history.last_ts = ts_of[first_seq], ts_of[last_seq]
    history.last_seq = last_seq
    for i, seq in ends.items():
        spans[i].end = ts_of[seq]
    failures = _child_failures(conn, run_id, history.reruns)
    for name, (lo, hi, started, done) in tasks.items():
        task = history.task_history(name)
        task.first_ts, task.last_ts = ts_of[lo], ts_of[hi]
        task.children_started, task.children_done = started, done
        task._seg_added = added.get(name, 0)
        task._failed, task._tolerated, task.children_recovered = failures.get(
            name, (set(), set(), 0)
        )
        task._open = running.get(name, {})
        task._settle(seg_open)
    return history


#: Kinds after which the fold starts a new segment: a range that holds one is folded afresh.
_SEGMENT_STARTS = (FLOW_STARTED, REPLAYED)
#: Kinds that end a child attempt (the fold's running attempts lose it).
_ATTEMPT_ENDS = (TASK_OVER, TASK_RAN, EXIT, TIMEOUT, ABANDONED)


def fold_since(conn: sqlite3.Connection, history: RunHistory) -> RunHistory:
    """``history`` with the events of its run written after ``history.last_seq`` folded in,
    computed mostly by SQLite, as :func:`fold_run` is (the same function: ``tests/test_fold.py``
    checks that going on this way from any point gives the plain fold).

    Only the new rows are read: a child's ``child_added``, ``task_started`` and ``task_over``
    are counted, the running attempts found by their index, the few other events decoded one
    by one. So following a run costs SQLite work in proportion to what it writes, and almost no
    Python work (the GIL stays with the run's own threads). A range that starts a new segment
    (a ``replayed`` event) is folded afresh with :func:`fold_run`: a replay happens once.

    :returns: the fold: ``history`` itself, changed, or a new one.
    """
    own = not conn.in_transaction
    if own:
        conn.execute("BEGIN")
    try:
        return _fold_since(conn, history)
    finally:
        if own and conn.in_transaction:
            conn.execute("COMMIT")


def _fold_since(conn: sqlite3.Connection, history: RunHistory) -> RunHistory:
    run_id, since = history.run_id, history.last_seq
    # A rowid range (seq > since), filtered to the run: only the rows written since are read.
    new = f"FROM events WHERE seq > {int(since)} AND +run_id = ?"
    rows = conn.execute(
        f"SELECT kind, task, count(*), count(ref), min(seq), max(seq) {new} GROUP BY kind, task",
        (run_id,),
    ).fetchall()
    if not rows:
        return history
    if any(kind in _SEGMENT_STARTS for kind, *_ in rows):
        return fold_run(conn, run_id)
    # Tasks are made in the order of their first event, as the plain fold makes them.
    firsts: dict[str, int] = {}
    lasts: dict[str, int] = {}
    for _, task, _, _, lo, hi in rows:
        if task is not None:
            firsts[task] = min(firsts.get(task, lo), lo)
            lasts[task] = max(lasts.get(task, hi), hi)
    for task in sorted(firsts, key=firsts.__getitem__):
        history.task_history(task)
    last_seq = max(row[5] for row in rows)
    total = sum(row[2] for row in rows)
    # The bulk, counted: children added, child attempts started and over.
    over = False
    for kind, task, n, children, *_ in rows:
        if task is None:
            continue
        t = history.tasks[task]
        if kind == CHILD_ADDED:
            t._seg_added += n
        elif kind == TASK_STARTED:
            t.children_started += children
        elif kind in _SUCCESSES:
            if kind == TASK_RAN:
                t.children_started += children
            t.children_done += children
            over = over or children > 0
    # Running attempts: those that ended since leave, those that started since and have not
    # ended join. Ends are looked up by the index, for the few attempts that were running.
    for name, t in history.tasks.items():
        if t._open:
            for ref, attempt in _ended(conn, run_id, name, since, list(t._open)):
                t._open.pop((ref, attempt), None)
    for task, ref, attempt, seq, ts, child_id in conn.execute(
        f"SELECT s.task, s.ref, s.attempt, s.seq, s.ts, s.child_id FROM events s "
        f"WHERE s.seq > {int(since)} AND +s.run_id = ? AND s.kind = '{TASK_STARTED}' "
        "AND s.ref IS NOT NULL AND NOT EXISTS (SELECT 1 FROM events e WHERE "
        f"e.run_id = s.run_id AND e.kind IN {_ATTEMPT_ENDS!r} AND e.task = s.task "
        "AND e.ref = s.ref AND e.attempt IS s.attempt AND e.seq > s.seq)",
        (run_id,),
    ):
        history.tasks[task]._open[(ref, attempt)] = (seq, ts, decode_id(child_id))
    # Children that failed before and are over now (a replay's segment): recovered.
    if over and any(t._failed for t in history.tasks.values()):
        for task, ref in conn.execute(
            f"SELECT o.task, o.ref {new.replace('FROM events', 'FROM events o')} "
            f"AND o.kind IN {_SUCCESSES!r} AND o.ref IS NOT NULL",
            (run_id,),
        ):
            t = history.tasks[task]
            if ref in t._failed:
                t._failed.discard(ref)
                t._tolerated.discard(ref)
                t.children_recovered += 1
    # The rest, decoded one by one in order: parents, failures, releases, ends.
    decoded = ",".join(f"'{kind}'" for kind in KINDS if kind not in _COUNTED)
    events, first_ts = history.events, history.first_ts
    cur = conn.execute(
        f"SELECT {_FOLD_SELECT} {new} AND (kind IN ({decoded}) OR (kind IN "
        f"('{TASK_STARTED}', '{TASK_OVER}') AND ref IS NULL)) ORDER BY seq",
        (run_id,),
    )
    ts_of = _timestamps(conn, sorted({last_seq, *firsts.values(), *lasts.values()}))
    for name, seq in firsts.items():
        t = history.tasks[name]
        t.first_ts = t.first_ts or ts_of[seq]
    for ev in _decoded(cur):
        history.add(ev)
    history.events, history.first_ts = events + total, first_ts
    history.last_seq, history.last_ts = last_seq, ts_of[last_seq]
    span = history.spans[-1] if history.spans else None
    if span is not None and span.outcome is None:
        span.end = history.last_ts
    for name, seq in lasts.items():
        history.tasks[name].last_ts = ts_of[seq]
    for t in history.tasks.values():
        t._settle(history.segment_open)
    return history


def _ended(
    conn: sqlite3.Connection, run_id: str, task: str, since: int, attempts: list[tuple[int, Any]]
) -> list[tuple[int, Any]]:
    """Of ``attempts`` (``(ref, attempt)`` of ``task``), those with an end after seq ``since``."""
    found: list[tuple[int, Any]] = []
    for start in range(0, len(attempts), 400):
        group = attempts[start : start + 400]
        refs = ",".join(str(int(ref)) for ref, _ in group)
        wanted = set(group)
        found.extend(
            (ref, attempt)
            for ref, attempt in conn.execute(
                f"SELECT ref, attempt FROM events WHERE run_id = ? AND kind IN {_ATTEMPT_ENDS!r} "
                f"AND task = ? AND ref IN ({refs}) AND seq > {int(since)}",
                (run_id, task),
            )
            if (ref, attempt) in wanted
        )
    return found


def _timestamps(conn: sqlite3.Connection, seqs: list[int]) -> dict[int, str]:
    found: dict[int, str] = {}
    for start in range(0, len(seqs), 500):
        group = seqs[start : start + 500]
        marks = ",".join("?" * len(group))
        found.update(conn.execute(f"SELECT seq, ts FROM events WHERE seq IN ({marks})", group))
    return found


def _child_failures(
    conn: sqlite3.Connection, run_id: str, reruns: dict[str, int]
) -> dict[str, tuple[set[int], set[int], int]]:
    """Per task: the refs of children failed (no ``task_over``) and of those tolerated, and how
    many recovered (failed, then over). For a stage rerun from scratch (``reruns``: task ->
    seq of that replay's event), only its children added since count: the earlier ones, and
    all their events, are forgotten."""
    rows = conn.execute(
        "SELECT f.task, f.ref, json_extract(f.data, '$.tolerated'), EXISTS (SELECT 1 FROM events o "
        f"WHERE o.run_id = f.run_id AND o.kind IN {_SUCCESSES!r} AND o.task = f.task "
        "AND o.ref = f.ref) FROM events f WHERE f.run_id = ? AND f.kind = 'task_failed' "
        "AND f.ref IS NOT NULL",
        (run_id,),
    )
    children: dict[tuple[str, int], list[bool]] = {}
    for task, ref, tolerated, over in rows:
        if ref <= reruns.get(task, 0):  # a child of the stage's forgotten work
            continue
        seen = children.setdefault((task, ref), [False, bool(over)])
        seen[0] = seen[0] or bool(tolerated)
    found: dict[str, tuple[set[int], set[int], int]] = {}
    for (task, ref), (tolerated, over) in children.items():
        failed, kept, recovered = found.get(task, (set(), set(), 0))
        if over:
            recovered += 1
        else:
            failed.add(ref)
            if tolerated:
                kept.add(ref)
        found[task] = (failed, kept, recovered)
    return found


def _running_children(
    conn: sqlite3.Connection, run_id: str, since: int
) -> dict[str, dict[tuple[int, int | None], tuple[int, str, Any]]]:
    """Per task: the child attempts of the segment from seq ``since`` that started and have no
    outcome (``task_over``, ``exit``, ``timeout``, or ``abandoned`` by a stop that did not wait
    for them), as the fold keeps them: ``(ref, attempt) -> (seq, ts, child id)``."""
    rows = conn.execute(
        f"SELECT s.task, s.ref, s.attempt, s.seq, s.ts, s.child_id FROM events s "
        f"WHERE s.run_id = ? AND s.kind = '{TASK_STARTED}' AND s.ref IS NOT NULL "
        f"AND s.seq >= ? AND NOT EXISTS (SELECT 1 FROM events e WHERE e.run_id = s.run_id "
        f"AND e.kind IN {_ATTEMPT_ENDS!r} "
        "AND e.task = s.task AND e.ref = s.ref AND e.attempt IS s.attempt AND e.seq > s.seq)",
        (run_id, since),
    )
    found: dict[str, dict[tuple[int, int | None], tuple[int, str, Any]]] = {}
    for task, ref, attempt, seq, ts, child_id in rows:
        found.setdefault(task, {})[(ref, attempt)] = (seq, ts, decode_id(child_id))
    return found


def _rerun_since(conn: sqlite3.Connection, run_id: str, task: str) -> int:
    """The seq of the last ``replayed`` event of ``run_id`` that ran stage ``task`` again from
    scratch (its ``rerun`` list names it), or 0: the fold's ``RunHistory.reruns``, in SQL, for
    the readers of results."""
    row = conn.execute(
        f"SELECT max(seq) FROM events WHERE run_id = ? AND kind = '{REPLAYED}' AND EXISTS "
        "(SELECT 1 FROM json_each(data, '$.rerun') WHERE value = ?)",
        (run_id, task),
    ).fetchone()
    return int(row[0] or 0)


def _row_status(row: tuple[Any, ...]) -> str:
    """A run's status from its ``runs`` row and its last end (see ``_LAST_END``)."""
    pid, host, heartbeat, last = row[7:11]
    return run_status(None if last in (None, REPLAYED) else last, pid, host, heartbeat)


def _run_info(row: tuple[Any, ...], history: RunHistory) -> RunInfo:
    """A ``runs`` row and its fold: the row says who owns the run, the log how it went."""
    run_id, flow, server, entrance, started, ended, outcome, pid, host, heartbeat = row
    if history.events:
        ended, outcome = history.ended, history.outcome
    return RunInfo(
        run_id, flow, server, entrance, started, ended, outcome, pid, host, heartbeat, history
    )


class Follower:
    """The fold of one run, kept up to date as its log grows (``RunHandle.progress()`` and the
    live progress of the command line read it).

    The first :meth:`update` folds the run with :func:`fold_run` (SQLite counts its bulk, so a
    run of a million events is read in a fraction of a second); each later one folds only the
    events written since, with :func:`fold_since` (SQLite again), so following a run costs what
    it writes, and next to no Python work.

    Any thread may call it: its one connection is used under its lock, by one thread at a
    time, and is closed by :meth:`close` or, at the latest, when the follower is collected.
    """

    def __init__(self, store: EventStore, run_id: str) -> None:
        self.store = store
        self.run_id = run_id
        self.history = RunHistory(run_id)
        self._lock = threading.Lock()  # guards _conn and history
        self._conn: sqlite3.Connection | None = None
        self._closer: weakref.finalize[Any, Any] | None = None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = conn = connect(self.store.path, read_only=True, shared=True)
            self._closer = weakref.finalize(self, conn.close)
        return self._conn

    def update(self) -> RunHistory:
        """Fold the events committed since the last call; return the fold."""
        with self._lock:
            conn = self._connection()
            if not self.history.events:
                self.history = fold_run(conn, self.run_id)
            else:
                # Rows are numbered in commit order (one writer at a time): none can appear
                # below the last one seen.
                self.history = fold_since(conn, self.history)
            return self.history

    def status(self) -> str | None:
        """The run's status as of the last :meth:`update` (:func:`threadflow.events.run_status`):
        the fold's outcome, or for an open segment ``running`` or ``interrupted`` by its owner
        in the ``runs`` row; None while the store has no such run."""
        with self._lock:
            if self.history.outcome is not None:
                return self.history.outcome
            row = (
                self._connection()
                .execute("SELECT pid, host, heartbeat FROM runs WHERE run_id = ?", (self.run_id,))
                .fetchone()
            )
        return None if row is None else run_status(None, *row)

    def close(self) -> None:
        """Close its connection (the next :meth:`update` opens another)."""
        with self._lock:
            closer, self._closer, self._conn = self._closer, None, None
        if closer is not None:
            closer()


class RunNotFound(KeyError):
    """No run, or several runs, match a run id or prefix (:meth:`EventStore.run`).

    :ivar prefix: the id or prefix given.
    :ivar matches: the ids of the runs that match, oldest first (at most
        :data:`RunNotFound.SHOWN`; empty for an unknown run).
    :ivar count: how many runs match: 0 (unknown) or more than one (ambiguous).
    """

    SHOWN = 5

    def __init__(self, path: str, prefix: str, matches: list[str], count: int) -> None:
        if count == 0:
            message = f"no run in {path!r} matches {prefix!r}"
        else:
            shown = ", ".join(matches[: self.SHOWN]) + (", …" if count > self.SHOWN else "")
            message = f"{count} runs in {path!r} match {prefix!r} ({shown})"
        super().__init__(message)
        self.message = message
        self.prefix = prefix
        self.matches = matches[: self.SHOWN]
        self.count = count

    def __str__(self) -> str:  # KeyError would show the message as a repr, quoted
        return self.message


#: Run statuses :meth:`EventStore.runs` filters on.
STATUSES = ("running", "interrupted", "cancelled", "failed_over", "all_over")
#: Of those, the ones the log alone tells (the others depend on the owner's being alive).
_LOGGED = ("cancelled", "failed_over", "all_over")
#: The last kind that sets a run's outcome: its last final or ``replayed`` event (as the fold
#: reads it), for a ``runs`` row.
_LAST_END = (
    "(SELECT e.kind FROM events e WHERE e.run_id = runs.run_id AND e.kind IN ("
    + ",".join(f"'{kind}'" for kind in (*FINAL_KINDS, REPLAYED))
    + ") ORDER BY e.seq DESC LIMIT 1)"
)


class EventStore:
    """Read access to a store file: runs, events and child results.

    Each call opens its own short-lived connection, so an ``EventStore`` may be shared between
    threads and pickled (it is only its path). It never writes.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = os.fspath(path) if path is not None else default_path()

    def __reduce__(self) -> tuple[Any, ...]:
        return (EventStore, (self.path,))

    def __repr__(self) -> str:
        return f"EventStore({self.path!r})"

    def _connect(self) -> sqlite3.Connection:
        return connect(self.path, read_only=True)

    def check(self) -> None:
        """Refuse a file that is not a readable threadflow store (see :func:`check_readable`).

        :raises StoreError: saying what the file is instead.
        """
        check_readable(self.path)

    def _runs(
        self,
        where: str = "",
        params: tuple[Any, ...] = (),
        limit: int | None = None,
        status: str | None = None,
    ) -> list[RunInfo]:
        conn = self._connect()
        try:
            sql = (
                "SELECT run_id, flow, server, entrance, started, ended, outcome, pid, host, "
                f"heartbeat, {_LAST_END} FROM runs {where} ORDER BY started DESC, rowid DESC"
            )
            if limit is not None and status in (None, *_LOGGED):
                sql += f" LIMIT {int(limit)}"  # exact in SQL: no owner to look at
            rows = conn.execute(sql, params).fetchall()
            if status is not None:
                # The fold's outcome is the last end; an open segment is the owner's to tell.
                rows = [r for r in rows if _row_status(r) == status][:limit]
            infos = [_run_info(row[:10], fold_run(conn, row[0])) for row in reversed(rows)]
        finally:
            conn.close()
        # The fold has the last word (a run may have ended since its row was read).
        return infos if status is None else [i for i in infos if i.status == status]

    def runs(
        self, *, flow: str | None = None, status: str | None = None, limit: int | None = None
    ) -> list[RunInfo]:
        """Every run in the store, oldest first, each with its folded log (``RunInfo.history``).

        The filters are applied before anything is folded: only the runs listed are.

        :param flow: only the runs of this flow (its class name).
        :param status: only the runs of this :attr:`RunInfo.status`: ``"running"``,
            ``"interrupted"`` (stopped, or unfinished with its owner gone: the runs a replay
            can pick up), ``"cancelled"``, ``"failed_over"`` or ``"all_over"``.
        :param limit: only the newest ``limit`` runs (still oldest first).
        :raises ValueError: for another status.
        """
        if status is not None and status not in STATUSES:
            raise ValueError(
                f"runs(status={status!r}): a run's status is one of {', '.join(STATUSES)}"
            )
        where = ""
        params: tuple[str, ...] = ()
        if flow is not None:
            where, params = "WHERE flow = ?", (flow,)
        if status in _LOGGED:
            where += (" AND " if where else "WHERE ") + f"{_LAST_END} = ?"
            params += (status,)
        elif status is not None:  # running or interrupted: an open segment, or interrupted
            where += (" AND " if where else "WHERE ") + (
                f"coalesce({_LAST_END}, 'replayed') IN ('replayed', 'interrupted')"
            )
        return self._runs(where, params, limit, status)

    def run(self, run_id: str) -> RunInfo:
        """The run whose id is ``run_id`` or starts with it.

        Only that run is read (and folded), not the whole store.

        :raises RunNotFound: (a ``KeyError``) if no run, or several runs, match; an empty
            prefix matches none.
        """
        return self._runs("WHERE run_id = ?", (self.run_id(run_id),))[0]

    def run_id(self, prefix: str) -> str:
        """The id of the run whose id is ``prefix`` or starts with it (a cheap look-up: nothing
        is folded).

        :raises RunNotFound: (a ``KeyError``) if no run, or several runs, match; an empty
            prefix matches none.
        """
        conn = self._connect()
        try:
            if conn.execute("SELECT 1 FROM runs WHERE run_id = ?", (prefix,)).fetchone():
                return prefix
            if not prefix:
                raise RunNotFound(self.path, prefix, [], 0)
            matching = "FROM runs WHERE substr(run_id, 1, ?) = ?"
            params = (len(prefix), prefix)
            found: list[str] = [
                str(row[0])
                for row in conn.execute(
                    f"SELECT run_id {matching} ORDER BY started, rowid LIMIT ?",
                    (*params, RunNotFound.SHOWN + 1),
                )
            ]
            if len(found) == 1:
                return found[0]
            count = len(found)
            if count > RunNotFound.SHOWN:
                count = conn.execute(f"SELECT count(*) {matching}", params).fetchone()[0]
            raise RunNotFound(self.path, prefix, found, count)
        finally:
            conn.close()

    def status(self, run_id: str) -> str | None:
        """The run's status (:func:`threadflow.events.run_status`), or None if there is no
        such run. Cheap enough to poll: it reads the run's last final or ``replayed`` event
        (the fold's outcome) and its owner, not the whole log."""
        conn = self._connect()
        try:
            row = conn.execute(
                "SELECT pid, host, heartbeat FROM runs WHERE run_id = ?", (run_id,)
            ).fetchone()
            if row is None:
                return None
            ends = (*FINAL_KINDS, REPLAYED)
            last = conn.execute(
                f"SELECT kind FROM events WHERE run_id = ? AND kind IN "
                f"({','.join('?' * len(ends))}) ORDER BY seq DESC LIMIT 1",
                (run_id, *ends),
            ).fetchone()
        finally:
            conn.close()
        outcome = None if last is None or last[0] == "replayed" else str(last[0])
        return run_status(outcome, *row)

    def iter_events(self, run_id: str, kind: str | None = None) -> Iterator[Event]:
        """The events of ``run_id`` in order, streamed (only those of ``kind`` if given).

        A ``task_ran`` row (a child attempt that started and returned between two commits,
        stored as one row) is read as the two events it stands for: its ``task_started``, at
        the time it started, and its ``task_over``, both with the row's seq.
        """
        kinds: tuple[str, ...] = ()
        if kind is not None:
            kinds = (kind, TASK_RAN) if kind in (TASK_STARTED, TASK_OVER) else (kind,)
        sql = f"SELECT {_EVENT_SELECT} FROM events WHERE run_id = ?"
        if kinds:
            sql += f" AND kind IN ({','.join('?' * len(kinds))})"
        conn = self._connect()
        try:
            rows = _decoded(conn.execute(sql + " ORDER BY seq", (run_id, *kinds)))
            for ev in rows:
                if ev.kind != TASK_RAN:
                    yield ev
                    continue
                data = dict(ev.data or {})
                started = data.pop("started", ev.ts)
                if kind in (None, TASK_STARTED):
                    yield dataclasses.replace(ev, kind=TASK_STARTED, ts=started, data=None)
                if kind in (None, TASK_OVER):
                    yield dataclasses.replace(ev, kind=TASK_OVER, data=data or None)
        finally:
            conn.close()

    def iter_rows(self, run_id: str) -> Iterator[Event]:
        """The rows of ``run_id`` as stored, in order (``task_ran`` rows as they are): what the
        fold reads."""
        conn = self._connect()
        try:
            yield from _decoded(
                conn.execute(
                    f"SELECT {_EVENT_SELECT} FROM events WHERE run_id = ? ORDER BY seq", (run_id,)
                )
            )
        finally:
            conn.close()

    def events(self, run_id: str, kind: str | None = None) -> list[Event]:
        """The events of ``run_id`` in order (only those of ``kind`` if given)."""
        return list(self.iter_events(run_id, kind))

    def history(self, run_id: str) -> RunHistory:
        """The run folded from its events: ``events.fold(self.iter_rows(run_id))``, computed
        quickly on a big log (see :func:`fold_run`)."""
        conn = self._connect()
        try:
            return fold_run(conn, run_id)
        finally:
            conn.close()

    def follow(self, run_id: str) -> Follower:
        """A :class:`Follower`: the fold of ``run_id``, updated as its log grows."""
        return Follower(self, run_id)

    def ticks(self, schedule: str | None = None, *, limit: int | None = None) -> list[Tick]:
        """The ticks schedules decided (:class:`Tick`), oldest first.

        :param schedule: only this schedule's (its name: the flow's class name by default).
        :param limit: only the newest ``limit`` rows (still oldest first).
        :returns: an empty list for a store that no schedule has written to (one made by a
            threadflow older than schedules, too).
        """
        conn = self._connect()
        try:
            if not conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'ticks'"
            ).fetchone():
                return []
            sql = (
                "SELECT schedule, tick, decision, run_id, count, first, detail, decided, pid, "
                "host FROM ticks"
            )
            params: tuple[Any, ...] = ()
            if schedule is not None:
                sql, params = sql + " WHERE schedule = ?", (schedule,)
            sql += " ORDER BY tick DESC, schedule DESC"
            if limit is not None:
                sql += f" LIMIT {int(limit)}"
            rows = conn.execute(sql, params).fetchall()
        finally:
            conn.close()
        ticks = []
        for name, tick, decision, run_id, count, first, detail, decided, pid, host in reversed(
            rows
        ):
            when = ts_datetime(tick)
            if when is None:  # not written by threadflow: shown as nothing rather than a crash
                continue
            ticks.append(
                Tick(
                    str(name),
                    when,
                    str(decision),
                    run_id if isinstance(run_id, str) else None,
                    count if isinstance(count, int) else 1,
                    ts_datetime(first),
                    detail if isinstance(detail, str) else None,
                    ts_datetime(decided),
                    pid if isinstance(pid, int) else None,
                    host if isinstance(host, str) else None,
                )
            )
        return ticks

    def output(self, run_id: str, task: str, codec: Any = None) -> tuple[bool, Any]:
        """``(True, value)``: what ``task``'s parent attempt returned in run ``run_id`` (its
        last success, whatever the segment, since a replay that ran the stage again from
        scratch); ``(False, None)`` if it has not returned."""
        conn = self._connect()
        try:
            row = conn.execute(
                "SELECT data FROM events WHERE run_id = ? AND kind = 'task_over' AND task = ? "
                "AND ref IS NULL AND seq > ? ORDER BY seq DESC LIMIT 1",
                (run_id, task, _rerun_since(conn, run_id, task)),
            ).fetchone()
        finally:
            conn.close()
        if row is None:
            return False, None
        return True, decoded(json.loads(row[0]) if row[0] else None, "result", codec)

    def results(self, run_id: str, task: str, codec: Any = None) -> Iterator[tuple[Any, Any]]:
        """``(child_id, result)`` of the finished children of ``task``, in the order added.

        Children of work a replay forgot (``on_change="rerun"`` ran the stage again from
        scratch) are not among them: the fold does not count them either.

        Streams: rows are read in batches, never all at once. A result the flow's codec stored
        is decoded with ``codec`` (without one, it comes as the codec's text).
        """
        conn = self._connect()
        try:
            cur = conn.execute(
                "SELECT a.child_id, o.data FROM events o JOIN events a ON a.seq = o.ref "
                "WHERE o.run_id = ? AND o.kind IN ('task_over', 'task_ran') AND o.task = ? "
                "AND o.ref > ? ORDER BY o.ref",
                (run_id, task, _rerun_since(conn, run_id, task)),
            )
            while batch := cur.fetchmany(1000):
                for cid, data in batch:
                    yield (
                        decode_id(cid),
                        decoded(json.loads(data) if data else None, "result", codec),
                    )
        finally:
            conn.close()
