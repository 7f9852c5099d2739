"""Asking a global server in another process to start a run, through the store they share.

The owner looks for requests every fraction of a second (see ``coordinator.POLL``); the asker
polls for the answer, then for the run's end. Polling is the price of needing nothing but the
SQLite file between the two processes.
"""

from __future__ import annotations

import datetime
import json
import threading
import uuid
from typing import Any

from ._clock import monotonic, wall
from .errors import FlowRunning, ThreadflowError
from .result import RunHandle, RunResult
from .store import EventStore, connect, owner_alive

#: Seconds to wait for the owner to answer a request before giving up.
ANSWER_TIMEOUT = 10.0
_POLL = 0.05


def _wait(seconds: float) -> None:
    threading.Event().wait(seconds)


class RemoteRunHandle(RunHandle):
    """A run started by a global server in another process; its result is read from the store.

    The result's ``state`` holds only ``run_id`` and ``store`` (the owner's state stays in the
    owner's process), which is enough for :func:`threadflow.results`.
    """

    def __init__(self, run_id: str, start_time: datetime.datetime, store: EventStore) -> None:
        super().__init__(run_id, start_time)
        self.store = store

    def _outcome(self) -> str | None:
        """The run's outcome; ``"interrupted"`` if its owner died before ending it."""
        conn = connect(self.store.path, write=False)
        try:
            row = conn.execute(
                "SELECT outcome, pid, host, heartbeat FROM runs WHERE run_id = ?", (self.run_id,)
            ).fetchone()
        finally:
            conn.close()
        if row is None:
            return None
        outcome, pid, host, heartbeat = row
        if outcome is None and not owner_alive(pid, host, heartbeat):
            return "interrupted"
        return outcome  # type: ignore[no-any-return]

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


def request_start(path: str, name: str, entrance: str | None) -> RemoteRunHandle:
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
        cur = conn.execute(
            "INSERT INTO requests (server, entrance, run_id, status, created) "
            "VALUES (?, ?, ?, 'pending', ?)",
            (name, entrance, run_id, wall()),
        )
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
                conn.execute("UPDATE requests SET status = 'expired' WHERE id = ?", (request_id,))
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
