"""What reaches a coordinator's inbox, and what task code sees of its attempt.

Workers and callers never touch run state: they post one of the messages below and, where
they must wait, wait on a ``Reply``. Every message is a small slotted object, so that a
reader of the coordinator sees its fields by name (CPython's ``concurrent.futures`` work items
are the model: a worker never raises, it reports).

Task code reaches its attempt through ``AttemptContext`` (``current_token()``,
``add_children_tasks()``): a thread attempt, a subprocess attempt and a remote attempt each
implement it where the task runs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .cancel import CancelToken
    from .result import RunHandle


class Reply:
    """A wait for the coordinator's answer (a chunk of children committed, a replay claimed)."""

    __slots__ = ("error", "event")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.error: BaseException | None = None

    def set(self, error: BaseException | None = None) -> None:
        self.error = error
        self.event.set()


@dataclass(slots=True)
class Done:
    """An attempt ended: ``error`` is None for a success; ``data`` is its event's data.

    A worker that started the next waiting child of the stage in the same slot (hand-over)
    names it in ``next``, started at ``started`` (monotonic seconds).
    """

    uid: int
    error: BaseException | None
    data: str | None
    next: Any = None
    started: float = 0.0


@dataclass(slots=True)
class AddChildren:
    """A chunk of encoded children added by attempt ``uid``. ``reply`` is answered once the
    chunk is inserted, or, for the ``final`` chunk, once it is committed."""

    uid: int
    ids: list[str]
    datas: list[str]
    reply: Reply
    final: bool


@dataclass(slots=True)
class Carried:
    """A remote attempt succeeded with ``data``, bringing back the children it added."""

    uid: int
    data: str | None
    ids: list[str]
    datas: list[str]


@dataclass(slots=True)
class StartRun:
    """Start a run whose slot ``handle`` holds, at ``entrance``, with ``inputs`` (checked to
    encode; ``inputs_coded`` is their codec text when JSON could not hold them)."""

    handle: RunHandle
    entrance: str
    inputs: dict[str, Any]
    inputs_coded: str | None = None


@dataclass(slots=True)
class ReplayRun:
    """Continue run ``handle.run_id`` from ``history`` (its log, folded by the caller),
    running the stages ``rerun`` again from scratch (their code changed)."""

    handle: RunHandle
    history: Any
    reply: Reply
    rerun: frozenset[str] = frozenset()


@dataclass(slots=True)
class ResumeRuns:
    """Replay these interrupted runs, one after the other, before any new run; a run whose
    code changed follows ``on_change`` (see ``Flow.replay``)."""

    handles: list[RunHandle]
    on_change: str = "refuse"


@dataclass(slots=True)
class CancelRun:
    """End run ``run_id`` ``cancelled`` if it is this server's current run."""

    run_id: str
    reason: str


@dataclass(slots=True)
class Stop:
    """Stop the server, giving running attempts ``grace`` seconds."""

    grace: float


Message = Done | AddChildren | Carried | StartRun | ReplayRun | ResumeRuns | CancelRun | Stop


class Pool(Protocol):
    """Where the coordinator hands an attempt to be run: the server's threads, an executor's
    threads, or a remote executor (``executors.py``)."""

    def submit(self, fn: Callable[[Any], None], att: Any) -> None:
        """Run ``fn(att)`` soon; ``fn`` posts the attempt's ``Done`` itself."""


class AttemptContext(Protocol):
    """The running attempt, as task code in any thread or process reaches it."""

    @property
    def token(self) -> CancelToken:
        """The attempt's cancel token."""

    @property
    def task_name(self) -> str:
        """The task's name."""

    @property
    def run_id(self) -> str:
        """The run's id."""

    @property
    def child_json(self) -> str | None:
        """The child's id as stored (JSON), or None for the parent attempt."""

    @property
    def has_children(self) -> bool:
        """Whether the task has a ``child_task_func``, so that it may add children."""

    @property
    def codec(self) -> Any:
        """The flow's codec for values JSON cannot hold, or None."""

    def send_children(self, ids: list[str], datas: list[str], final: bool) -> Reply:
        """Send a chunk of encoded children toward the coordinator; answered on the reply."""

    def engine_alive(self) -> bool:
        """False once nothing will answer a reply any more (the server is gone)."""
