"""The exceptions threadflow raises, all but one sharing ``ThreadflowError``."""

from __future__ import annotations

import datetime
import signal
from typing import Any


def _rebuild(cls: type[BaseException], args: tuple[Any, ...], attrs: dict[str, Any]) -> Any:
    # Unpickling must not call __init__: its signature differs from ``args`` (the message).
    exc = cls.__new__(cls)
    exc.args = args
    exc.__dict__.update(attrs)
    return exc


class _Picklable:
    """Pickles an exception by its message and attributes, whatever its ``__init__`` takes.

    A subprocess attempt sends its exception back to the server pickled; the default pickling
    of an exception calls ``__init__(*args)`` again, which fails for our keyword-rich errors.
    """

    def __reduce__(self) -> tuple[Any, ...]:
        exc: Any = self
        return (_rebuild, (type(self), exc.args, dict(exc.__dict__)))


class ThreadflowError(_Picklable, Exception):
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


class NoRetry(ThreadflowError):
    """Raise it in task code to fail the attempt without any further attempt.

    For programming errors that another attempt cannot fix: ``raise NoRetry("bad input")``, or
    ``raise NoRetry("cannot parse the page") from exc`` to keep the cause in the traceback.
    The task fails at once, as if its retries were used up (a child with
    ``exit_on_failed=False`` is then tolerated as usual); ``retry_on`` is not asked.
    """


class EncodeError(NoRetry, TypeError):
    """A value cannot be stored in the event log as it is.

    Raised for a child id, payload or return value that JSON cannot hold faithfully: a float
    that is ``nan`` or infinite (not JSON), an int of more than 4,300 digits, a structure that
    contains itself, or a type that is not plain data. The message names what and says what
    to pass instead. It is a ``TypeError``, as documented for bad children, and a ``NoRetry``:
    the same value would fail the next attempt too.
    """


class TaskTimeout(ThreadflowError, TimeoutError):
    """An attempt ran past its ``task_timeout``; the error recorded for a timed-out attempt."""

    def __init__(self, task: tuple[Any, ...], attempt: int, timeout: float) -> None:
        super().__init__(f"task {task!r} attempt {attempt} timed out after {timeout:g} s")
        self.task = task
        self.attempt = attempt
        self.timeout = timeout


class ReplayError(ThreadflowError, ValueError):
    """A run cannot be replayed: unknown (no run, or several, match the id or prefix given),
    ended ``all_over``, still owned by a live server, or its flow changed.

    It is also a ``ValueError``: replaying a run that ended ``all_over`` raises a
    ``ValueError``, as it always has, and ``except ValueError`` still catches it.

    :ivar run_id: the run's id; the id or prefix given when no single run matches it.
    :ivar changed: when the code of tasks changed (``on_change="refuse"``), their names; else
        an empty list.
    """

    def __init__(self, run_id: str, message: str, changed: list[str] | None = None) -> None:
        super().__init__(message)
        self.run_id = run_id
        self.changed = list(changed or [])


class StoreError(ThreadflowError):
    """The event store cannot be opened or used (not SQLite, corrupt, read-only, newer schema).

    :ivar path: the store file.
    :ivar reason: what is wrong with it.
    :ivar hint: what to do about it, for a Python caller.
    """

    def __init__(self, path: str, reason: str, hint: str = "point store= at another file") -> None:
        super().__init__(f"{reason}; {hint}")
        self.path = path
        self.reason = reason
        self.hint = hint


class ProcessDiedError(ThreadflowError):
    """The process of a subprocess attempt ended before the attempt did.

    It exited (``os._exit``, a crash), was killed by a signal, or was killed by threadflow
    after the attempt was cancelled (timeout, a failed run, ``stop()``) and did not return
    within the server's ``kill_grace``. The ``exit`` event's data holds the same facts under
    ``"process"``.

    :ivar task: the task, ``("fetch",)`` or ``("fetch", child_id)``.
    :ivar attempt: the attempt number.
    :ivar pid: the process id.
    :ivar exitcode: the exit status; ``-N`` when a signal ``N`` ended it (as in
        ``subprocess.Popen.returncode``); None if it could not be reaped.
    :ivar signal: the name of that signal (``"SIGKILL"``, ``"SIGSEGV"``…), or None.
    :ivar killed: why threadflow killed it (``"timeout"``, ``"run_over"``, ``"stop"``), or None
        when it died by itself.
    """

    def __init__(
        self,
        task: tuple[Any, ...],
        attempt: int,
        pid: int,
        exitcode: int | None,
        killed: str | None = None,
    ) -> None:
        sig = signal_name(exitcode)
        if killed is not None:
            how = f"was killed with {sig or 'SIGKILL'} by threadflow after the attempt was " + (
                f"cancelled ({killed}) and did not return in time"
            )
        elif sig is not None:
            how = f"was killed by signal {sig}"
        elif exitcode is None:
            how = "died, and could not be reaped"
        else:
            how = f"exited with code {exitcode}"
        super().__init__(f"task {task!r} attempt {attempt}: its process {pid} {how}")
        self.task = task
        self.attempt = attempt
        self.pid = pid
        self.exitcode = exitcode
        self.signal = sig
        self.killed = killed


def signal_name(exitcode: int | None) -> str | None:
    if exitcode is None or exitcode >= 0:
        return None
    try:
        return signal.Signals(-exitcode).name
    except ValueError:
        return f"signal {-exitcode}"


class CancelledError(_Picklable, BaseException):
    """The current attempt was cancelled (timeout, a failed run, or ``stop()``).

    It derives from ``BaseException``, like ``asyncio.CancelledError``, so that
    ``except Exception:`` in task code does not swallow a cancellation by accident.

    :ivar reason: ``"timeout"``, ``"run_over"`` or ``"stop"``.
    """

    def __init__(self, reason: str = "cancelled") -> None:
        super().__init__(f"attempt cancelled ({reason})")
        self.reason = reason
