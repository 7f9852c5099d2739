"""Asking a global server in another process to start a run, through the store they share.

The owner looks for requests every fraction of a second (see ``coordinator.POLL``); the asker
polls for the answer, then for the run's end. Polling is the price of needing nothing but the
SQLite file between the two processes.

The requests are rows of the store's ``requests`` table, which anyone who can write the file
can insert: the owner checks each one (:func:`check_request`) before it acts on it.
"""

from __future__ import annotations

import datetime
import json
import re
import reprlib
import threading
import uuid
from typing import Any

from ._clock import monotonic, wall
from .errors import FlowRunning, ThreadflowError
from .events import owner_alive
from .result import RunHandle, RunResult
from .store import EventStore, connect, ensure_schema

#: Seconds to wait for the owner to answer a request before giving up.
ANSWER_TIMEOUT = 10.0
_POLL = 0.05


#: What a run id asked of a global server must look like. The ids :func:`request_start` makes
#: (12 hex digits) match; so does any other short id that is safe to print in a terminal and to
#: paste into a shell command, as the command line does with run ids.
RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")

_short = reprlib.Repr()
_short.maxstring = _short.maxother = 40


def check_request(
    definition: Any, entrance: object, run_id: object, inputs: object = None
) -> tuple[str, str, dict[str, Any]]:
    """``(run_id, entrance, inputs)`` of a request read from the store, once checked; a null
    entrance is the flow's default one, null inputs are none.

    :raises ValueError: saying what is wrong, if ``run_id`` does not match :data:`RUN_ID`,
        ``entrance`` is neither null (the flow's default entrance) nor the name of a task, or
        ``inputs`` is not the JSON text of an object. Forged values appear in the message as a
        shortened repr, so that printing it is safe.
    """
    checked: dict[str, Any] = {}
    if inputs is not None:
        try:
            value = json.loads(inputs) if isinstance(inputs, str) else None
        except ValueError:
            value = None
        if not isinstance(value, dict):
            raise ValueError(f"the inputs must be a JSON object, not {_short.repr(inputs)}")
        checked = value
    if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id):
        raise ValueError(
            "the run id must be text of 1 to 64 ASCII letters, digits, '_' or '-', not "
            + _short.repr(run_id)
        )
    if entrance is None:
        return run_id, definition.default_entrance, checked
    if not isinstance(entrance, str):
        what = _short.repr(entrance)
        raise ValueError(f"the entrance must be a task name (text) or null, not {what}")
    if entrance not in definition.tasks:
        raise ValueError(f"flow {definition.name!r} has no task {_short.repr(entrance)}")
    return run_id, entrance, checked


def _wait(seconds: float) -> None:
    threading.Event().wait(seconds)


class RemoteRunHandle(RunHandle):
    """A run started by a global server in another process; its result is read from the store.

    The result's ``state`` holds only ``run_id`` and ``store`` (the owner's state stays in the
    owner's process), which is enough for :func:`threadflow.results`.
    """

    def __init__(self, run_id: str, start_time: datetime.datetime, store: EventStore) -> None:
        super().__init__(run_id, start_time, store, self._ask_cancel)

    def _ask_cancel(self, run_id: str, reason: str) -> None:
        request_cancel(self.store.path, run_id, reason)

    def _outcome(self) -> str | None:
        """The run's status once it is not running: the fold's outcome (``EventStore.status``
        reads the log's last segment end), or ``"interrupted"`` if its owner died before
        ending it; None while it runs."""
        status = self.store.status(self.run_id)
        return None if status in (None, "running") else status

    def done(self) -> bool:
        return self._outcome() is not None

    def result(self, timeout: float | None = None) -> RunResult:
        deadline = None if timeout is None else monotonic() + timeout
        while (outcome := self._outcome()) is None:
            if deadline is not None and monotonic() >= deadline:
                raise TimeoutError(f"run {self.run_id} has not ended after {timeout} s")
            _wait(_POLL)
        history = self.store.history(self.run_id)
        error = None
        if history.error:
            error = ThreadflowError(f"{history.error['type']}: {history.error['message']}")
        state = {"run_id": self.run_id, "store": self.store}
        return RunResult(
            history.outcome or outcome,
            self.run_id,
            state,
            history.task,
            error,
            history.failed,
        )


def request_cancel(path: str, run_id: str, reason: str = "cancelled") -> None:
    """Ask the process that runs ``run_id`` (this one or another sharing the store) to cancel it.

    The request is a row of the store's ``cancels`` table; the run's owner looks for it four
    times a second and ends the run ``cancelled``.

    :raises ThreadflowError: if the run is not running (unknown, ended, or its owner is gone).
    """
    conn = connect(path)
    try:
        ensure_schema(conn)  # a store of an older threadflow gets the cancels table
        row = conn.execute(
            "SELECT outcome, pid, host, heartbeat FROM runs WHERE run_id = ?", (run_id,)
        ).fetchone()
        if row is None:
            raise ThreadflowError(f"there is no run {run_id!r} in {path!r}")
        if row[0] is not None or not owner_alive(*row[1:]):
            status = row[0] or "interrupted (its process is gone)"
            raise ThreadflowError(f"run {run_id} is not running ({status}); nothing to cancel")
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "INSERT OR REPLACE INTO cancels (run_id, requested, reason) VALUES (?, ?, ?)",
            (run_id, wall(), reason),
        )
        conn.execute("COMMIT")
    finally:
        conn.close()


def request_start(
    path: str, name: str, entrance: str | None, inputs: dict[str, Any] | None = None
) -> RemoteRunHandle:
    """Ask the owner of the global server ``name`` in ``path`` to start a run.

    :raises ThreadflowError: if no live process owns ``name`` there, or it does not answer.
    :raises FlowRunning: if it is running a run already.
    """
    conn = connect(path, write=False)
    try:
        row = conn.execute(
            "SELECT pid, host, heartbeat FROM servers WHERE name = ?", (name,)
        ).fetchone()
        if row is None or not owner_alive(*row):
            raise ThreadflowError(
                f"no live server named ('global', {name!r}) in {path!r}; start one with "
                "start_link() in some process first"
            )
        run_id = uuid.uuid4().hex[:12]
        conn.execute("BEGIN IMMEDIATE")
        # The inputs column only when there are inputs: a run without them can be asked of any
        # store, one made by an older threadflow included.
        columns, values = "server, entrance, run_id, status, created", "?, ?, ?, 'pending', ?"
        params: tuple[Any, ...] = (name, entrance, run_id, wall())
        if inputs:
            columns, values = columns + ", inputs", values + ", ?"
            params += (json.dumps(inputs),)
        cur = conn.execute(f"INSERT INTO requests ({columns}) VALUES ({values})", params)
        request_id = cur.lastrowid
        conn.execute("COMMIT")
        deadline = monotonic() + ANSWER_TIMEOUT
        while True:
            status, message = conn.execute(
                "SELECT status, message FROM requests WHERE id = ?", (request_id,)
            ).fetchone()
            if status != "pending":
                break
            if monotonic() >= deadline:
                # Only a request still pending expires: one the owner answered just now keeps
                # its answer (the loop reads it), so no run starts that nobody waits for.
                expired = conn.execute(
                    "UPDATE requests SET status = 'expired' WHERE id = ? AND status = 'pending'",
                    (request_id,),
                ).rowcount
                if not expired:
                    continue
                raise ThreadflowError(
                    f"the owner of ('global', {name!r}) did not answer within {ANSWER_TIMEOUT:g} s"
                )
            _wait(_POLL)
    finally:
        conn.close()
    if status == "started":
        return RemoteRunHandle(
            run_id, datetime.datetime.now(datetime.timezone.utc), EventStore(path)
        )
    if message and message.startswith("{"):
        running: Any = json.loads(message)
        raise FlowRunning(
            str(("global", name)),
            running["run_id"],
            datetime.datetime.fromisoformat(running["start_time"]),
        )
    raise ThreadflowError(f"the owner of ('global', {name!r}) refused the run: {message}")
