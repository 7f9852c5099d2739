"""A server's own state, and the registry of this process's servers.

One owner for each piece: a ``ServerCore`` owns its name's entry in the registry, its one
run slot and its stopped flag, under one lock that is never held across user code or a wait.
The ``Flow`` object (the user's handle) and the coordinator (which runs the
runs) both go through its methods; neither touches the other's fields.

Replay admission lives here too, in one function (``replay_refusal``): the caller asks it
early for a quick, clear refusal, and the coordinator asks it again, authoritatively, while it
holds the store's write lock.
"""

from __future__ import annotations

import datetime
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import AlreadyStarted, FlowRunning, ReplayError, ThreadflowError
from .events import owner_alive
from .result import RunHandle

# The registry: the one piece of module-level mutable state (server names are per process).
_registry: dict[Any, ServerCore] = {}
_registry_lock = threading.Lock()


def lookup(name: Any) -> ServerCore | None:
    """The running server registered under ``name`` in this process, or None."""
    with _registry_lock:
        return _registry.get(name)


def cores() -> list[ServerCore]:
    """The servers registered in this process."""
    with _registry_lock:
        return list(_registry.values())


def holder_of(run_id: str, besides: ServerCore | None = None) -> ServerCore | None:
    """A server of this process (other than ``besides``) whose coordinator runs ``run_id``."""
    for core in cores():
        if core is not besides and core.running == run_id:
            return core
    return None


@dataclass(frozen=True)
class Settings:
    """A server's tunables, read once from its flow class's attributes (see ``Flow``)."""

    abandon_grace: float
    stop_grace: float
    kill_grace: float
    fsync: bool
    commit_every: float

    @classmethod
    def of(cls, flow_cls: Any) -> Settings:
        return cls(
            abandon_grace=float(flow_cls.abandon_grace),
            stop_grace=float(flow_cls.stop_grace),
            kill_grace=float(flow_cls.kill_grace),
            fsync=bool(flow_cls.fsync),
            commit_every=max(0.0, float(flow_cls.commit_every)),
        )


class ServerCore:
    """What a running server is, apart from its coordinator: name, run slot, stopped flag.

    :ivar name: the server name (a string, or ``("global", name)``).
    :ivar flow: the ``Flow`` object: the sender of the server's signals.
    """

    def __init__(self, name: Any, flow: Any) -> None:
        self.name = name
        self.flow = flow
        self._lock = threading.Lock()  # guards _active and _stopped
        self._active: RunHandle | None = None  # the run this server runs, from start to result
        self._stopped = False
        # Interrupted runs start_link(resume=True) replays before any new run, oldest first.
        self._resuming: list[RunHandle] = []
        #: The run id the coordinator has taken on (claimed in the store, for a replay), until
        #: it ends. Written only by the coordinator, while it holds the store's write lock for
        #: a claim: two servers replaying one run are thus ordered by the store.
        self.running: str | None = None

    # -- registry ----------------------------------------------------------------------------

    def register(self) -> None:
        """Take this server's name in the registry.

        :raises AlreadyStarted: if a running server of this process has it.
        """
        with _registry_lock:
            running = _registry.get(self.name)
            if running is not None:
                raise AlreadyStarted(self.name, running.flow)
            _registry[self.name] = self

    def unregister(self) -> None:
        with _registry_lock:
            if _registry.get(self.name) is self:
                del _registry[self.name]

    # -- the run slot ------------------------------------------------------------------------

    def take_slot(
        self,
        run_id: str,
        start_time: datetime.datetime,
        store: Any = None,
        canceller: Callable[[str, str], None] | None = None,
    ) -> RunHandle:
        """Make run ``run_id`` this server's one run; any thread may call it.

        :raises ThreadflowError: if the server is stopped.
        :raises FlowRunning: if it runs a run already, or has interrupted runs to resume.
        """
        with self._lock:
            self._check_free()
            if self._resuming:
                waiting = self._resuming[0]
                raise FlowRunning(self.name, waiting.run_id, waiting.start_time)
            handle = RunHandle(run_id, start_time, store, canceller)
            self._active = handle
        return handle

    def _check_free(self) -> None:
        if self._stopped:
            raise ThreadflowError(
                f"server {self.name!r} is stopped; start a new one with start_link()"
            )
        if self._active is not None:
            raise FlowRunning(self.name, self._active.run_id, self._active.start_time)

    def busy_with(self) -> RunHandle | None:
        """The run that holds the slot (or the first interrupted run waiting to be resumed), or
        None while a run could start: for a schedule, to know what it waits for."""
        with self._lock:
            if self._active is not None:
                return self._active
            return self._resuming[0] if self._resuming else None

    def reserve_for_resume(self, handles: list[RunHandle]) -> None:
        """Keep the slot for these runs' replays, in order: no new run starts before them."""
        with self._lock:
            self._resuming.extend(handles)

    def take_slot_to_resume(self, handle: RunHandle) -> None:
        """Make the next run to resume, ``handle``, this server's run.

        :raises ThreadflowError: if the server is stopped.
        """
        with self._lock:
            if handle in self._resuming:
                self._resuming.remove(handle)
            self._check_free()
            self._active = handle

    def release_slot(self, handle: RunHandle) -> None:
        """Free the slot ``handle`` holds (before its result is delivered, so that whoever
        gets the result can start the next run at once)."""
        with self._lock:
            if self._active is handle:
                self._active = None

    # -- stopping ----------------------------------------------------------------------------

    @property
    def stopped(self) -> bool:
        return self._stopped

    def request_stop(self) -> bool:
        """Refuse new runs from now on; True for the first request only."""
        with self._lock:
            first = not self._stopped
            self._stopped = True
        return first

    def close(self) -> RunHandle | None:
        """The server is gone: stopped, unregistered. Returns the handle of a run that was
        given a slot and never an answer (started just before a failure), for the caller to
        answer; no slot can be taken after this."""
        with self._lock:
            self._stopped = True
            orphan = self._active
            self._active = None
        self.unregister()
        return orphan if orphan is not None and not orphan.done() else None


def replay_refusal(
    run_id: str,
    path: str,
    row: tuple[Any, ...] | None,
    here: ServerCore | None = None,
) -> Exception | None:
    """Why run ``run_id`` cannot be replayed by server ``here`` now, or None if it can.

    :param row: the run's ``(outcome, pid, host, heartbeat)`` in the store, or None if the
        store has no such run.
    :returns: a ``ReplayError`` (unknown run, ended ``all_over``, still running here or
        elsewhere), to raise.
    """
    if row is None:
        return ReplayError(run_id, f"there is no run {run_id!r} in {path!r}")
    outcome, pid, host, heartbeat = row
    if outcome == "all_over":
        return ReplayError(
            run_id,
            f"run {run_id} ended all_over; there is nothing to replay; start a new run to do "
            "the work again",
        )
    holder = holder_of(run_id, besides=here)
    if holder is not None:
        return ReplayError(
            run_id,
            f"run {run_id} is still running in server {holder.name!r} of this process; wait "
            "for it to end or stop that server, then replay",
        )
    if outcome is None:
        # This process's own run whose server is gone (its coordinator failed) is free: only
        # a live server in the registry, checked above, holds a run here.
        mine = pid == os.getpid() and host == socket.gethostname()
        if not mine and owner_alive(pid, host, heartbeat):
            return ReplayError(
                run_id,
                f"run {run_id} is still running in process {pid} on {host}; wait for it to "
                "end, or stop that server, then replay",
            )
    return None
