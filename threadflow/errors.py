"""The exceptions threadflow raises, all but one sharing :class:`ThreadflowError`."""

from __future__ import annotations

import datetime
from typing import Any


class ThreadflowError(Exception):
    """Base class of threadflow's errors."""


class FlowDefinitionError(ThreadflowError):
    """A flow definition is invalid; raised when the class is created (or for a bad entrance)."""


class AlreadyStarted(ThreadflowError):
    """A server with this name is already running.

    :ivar name: the server name.
    :ivar server: the running server, when it runs in this process (else None).
    :ivar owner: for a global name owned by another process, ``"process PID on HOST"``.
    """

    def __init__(self, name: Any, server: Any, owner: str | None = None) -> None:
        if owner is not None:
            where = f"by {owner}; stop it there, or wait until its lease runs out if it died"
        else:
            where = (
                f"in this process; stop it first ({type(server).__name__}.whereis({name!r})"
                ".stop()) or pick another server_name"
            )
        super().__init__(f"a server named {name!r} is already running {where}")
        self.name = name
        self.server = server
        self.owner = owner


class FlowRunning(ThreadflowError):
    """The server already runs a flow; one run at a time per server.

    :ivar run_id: the id of the run in progress.
    :ivar start_time: when it started (aware UTC datetime).
    """

    def __init__(self, server_name: str, run_id: str, start_time: datetime.datetime) -> None:
        super().__init__(
            f"server {server_name!r} is already running run {run_id} (started "
            f"{start_time.isoformat()}); wait for its result or stop() the server"
        )
        self.run_id = run_id
        self.start_time = start_time


class DuplicateChildError(ThreadflowError):
    """A child id was added twice to the same task in the same run.

    :ivar task: the task name.
    :ivar child_id: the repeated id.
    """

    def __init__(self, task: str, child_id: Any) -> None:
        super().__init__(
            f"task {task!r}: child id {child_id!r} was already added in this run; "
            "child ids must be unique per task and run"
        )
        self.task = task
        self.child_id = child_id


class TaskTimeout(ThreadflowError, TimeoutError):
    """An attempt ran past its ``task_timeout``; the error recorded for a timed-out attempt."""

    def __init__(self, task: tuple[Any, ...], attempt: int, timeout: float) -> None:
        super().__init__(f"task {task!r} attempt {attempt} timed out after {timeout:g} s")
        self.task = task
        self.attempt = attempt
        self.timeout = timeout


class ReplayError(ThreadflowError):
    """A run cannot be replayed: unknown, still owned by a live server, or its flow changed.

    :ivar run_id: the run.
    """

    def __init__(self, run_id: str, message: str) -> None:
        super().__init__(message)
        self.run_id = run_id


class StoreError(ThreadflowError):
    """The event store cannot be opened or used (not SQLite, corrupt, newer schema).

    :ivar path: the store file.
    :ivar reason: what is wrong with it.
    :ivar hint: what to do about it, for a Python caller.
    """

    def __init__(self, path: str, reason: str, hint: str = "point store= at another file") -> None:
        super().__init__(f"{reason}; {hint}")
        self.path = path
        self.reason = reason
        self.hint = hint


class CancelledError(BaseException):
    """The current attempt was cancelled (timeout, a failed run, or ``stop()``).

    It derives from :class:`BaseException`, like :class:`asyncio.CancelledError`, so that
    ``except Exception:`` in task code does not swallow a cancellation by accident.

    :ivar reason: ``"timeout"``, ``"run_over"`` or ``"stop"``.
    """

    def __init__(self, reason: str = "cancelled") -> None:
        super().__init__(f"attempt cancelled ({reason})")
        self.reason = reason
