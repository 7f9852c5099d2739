"""The SQLite event store: schema, the coordinator's writer, and readers.

Layout (``PRAGMA user_version`` = :data:`SCHEMA_VERSION`):

* ``events``: the append-only log. ``seq`` is the rowid; ``child_id`` and ``data`` are JSON
  text; ``ref`` is, for a child's events, the ``seq`` of its ``child_added`` event.
* ``runs``: one row per run, for listing runs without scanning the log.
* ``children``: one row per live child key, which makes a repeated child id an error; rows of
  discarded children are deleted so that a retry can add the same ids again.

Only JSON is stored: opening a store never unpickles anything.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import DuplicateChildError, StoreError

SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 30_000

#: Column order of a row handed to :meth:`Writer.append`.
EVENT_COLUMNS = ("run_id", "ts", "kind", "task", "child_id", "attempt", "ref", "data")
_INSERT_EVENT = (
    "INSERT INTO events (run_id, ts, kind, task, child_id, attempt, ref, data) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)


def default_path() -> str:
    """``$THREADFLOW_DB`` if set, else ``threadflow.db`` in the working directory."""
    return os.environ.get("THREADFLOW_DB") or "threadflow.db"


def _to_tuple(value: Any) -> Any:
    return tuple(_to_tuple(v) for v in value) if isinstance(value, list) else value


def decode_id(text: str | None) -> Any:
    """A stored child id as Python: JSON lists become (hashable) tuples."""
    return None if text is None else _to_tuple(json.loads(text))


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


@dataclass(frozen=True)
class RunInfo:
    """One run as listed by :meth:`EventStore.runs`; ``outcome`` is None while unfinished."""

    run_id: str
    flow: str
    server: str
    entrance: str
    started: str
    ended: str | None
    outcome: str | None
    pid: int
    host: str


def connect(path: str, *, fsync: bool = False) -> sqlite3.Connection:
    """Open ``path`` in WAL mode with a busy timeout, in autocommit mode (explicit BEGINs).

    :raises StoreError: if the file is not a SQLite database or was written by a newer
        threadflow.
    """
    try:
        conn = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open the store {path!r}: {exc}") from exc
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"the store {path!r} has schema version {version}, written by a newer "
                f"threadflow (this one reads up to {SCHEMA_VERSION}); upgrade threadflow"
            )
        if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {'FULL' if fsync else 'NORMAL'}")
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise StoreError(
            f"the store {path!r} is not a usable SQLite database ({exc}); "
            "point store= at another file"
        ) from exc
    except BaseException:
        conn.close()
        raise
    return conn


def ensure_schema(conn: sqlite3.Connection) -> None:
    """Create the tables and indexes if missing (idempotent, safe against a concurrent creator)."""
    if conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
        return
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
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


class Writer:
    """The coordinator's connection: the only writer of a server. Not thread-safe by design.

    Writes of one coordinator turn share one ``BEGIN IMMEDIATE`` transaction (taking the write
    lock up front, so the busy timeout applies and no deferred upgrade can deadlock).
    """

    def __init__(self, path: str, *, fsync: bool = False) -> None:
        self.path = path
        self.conn = connect(path, fsync=fsync)
        try:
            ensure_schema(self.conn)
        except sqlite3.DatabaseError as exc:
            self.conn.close()
            raise StoreError(f"cannot set up the store {path!r}: {exc}") from exc
        self._in_tx = False

    def begin(self) -> None:
        if not self._in_tx:
            self.conn.execute("BEGIN IMMEDIATE")
            self._in_tx = True

    def commit(self) -> None:
        if self._in_tx:
            self._in_tx = False
            self.conn.execute("COMMIT")

    def append(self, rows: Sequence[tuple[Any, ...]]) -> int:
        """Insert event rows (see :data:`EVENT_COLUMNS`); return the seq of the first one.

        Rows of one call get consecutive seqs: we hold the write lock, and a rowid table
        without AUTOINCREMENT hands out ``max(rowid) + 1``.
        """
        self.begin()
        self.conn.executemany(_INSERT_EVENT, rows)
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
            first = self.append(rows)
            self.conn.executemany(
                "INSERT INTO children (seq, run_id, task, child_id) VALUES (?, ?, ?, ?)",
                [(first + i, run_id, task, cid) for i, cid in enumerate(ids)],
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

    def run_started(self, row: dict[str, Any]) -> None:
        self.begin()
        self.conn.execute(
            "INSERT INTO runs (run_id, flow, server, entrance, started, pid, host) "
            "VALUES (:run_id, :flow, :server, :entrance, :started, :pid, :host)",
            row,
        )

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
            self.conn.close()


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
        if not os.path.exists(self.path):
            raise StoreError(f"no store at {self.path!r}")
        conn = connect(self.path)
        if conn.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
            conn.close()
            raise StoreError(f"{self.path!r} is not a threadflow store (no threadflow tables)")
        return conn

    def runs(self) -> list[RunInfo]:
        """Every run in the store, oldest first."""
        conn = self._connect()
        try:
            rows = conn.execute(
                "SELECT run_id, flow, server, entrance, started, ended, outcome, pid, host "
                "FROM runs ORDER BY started, rowid"
            ).fetchall()
        finally:
            conn.close()
        return [RunInfo(*row) for row in rows]

    def events(self, run_id: str, kind: str | None = None) -> list[Event]:
        """The events of ``run_id`` in order (only those of ``kind`` if given)."""
        sql = "SELECT seq, run_id, ts, kind, task, child_id, attempt, ref, data FROM events "
        sql += "WHERE run_id = ?" + (" AND kind = ?" if kind else "") + " ORDER BY seq"
        conn = self._connect()
        try:
            rows = conn.execute(sql, (run_id, kind) if kind else (run_id,)).fetchall()
        finally:
            conn.close()
        return [
            Event(s, r, ts, k, t, decode_id(c), a, ref, json.loads(d) if d else None)
            for s, r, ts, k, t, c, a, ref, d in rows
        ]

    def results(self, run_id: str, task: str) -> Iterator[tuple[Any, Any]]:
        """``(child_id, result)`` of the finished children of ``task``, in the order added.

        Streams: rows are read in batches, never all at once.
        """
        conn = self._connect()
        try:
            cur = conn.execute(
                "SELECT a.child_id, o.data FROM events o JOIN events a ON a.seq = o.ref "
                "WHERE o.run_id = ? AND o.kind = 'task_over' AND o.task = ? "
                "AND o.ref IS NOT NULL ORDER BY o.ref",
                (run_id, task),
            )
            while batch := cur.fetchmany(1000):
                for cid, data in batch:
                    yield decode_id(cid), json.loads(data).get("result") if data else None
        finally:
            conn.close()
