"""threadflow: run jobs as a DAG of tasks with parallel children, retries and timeouts,
every step logged to SQLite.

The public names are re-exported here; see ``docs/`` and ``API.md`` for the contract.
"""

from typing import TYPE_CHECKING, Any

from . import signals
from .cancel import CancelToken, current_token, sleep
from .children import add_child_task, add_children_tasks, output, results
from .definition import ALL_OVER, task
from .errors import (
    AlreadyStarted,
    CancelledError,
    DuplicateChildError,
    EncodeError,
    FlowDefinitionError,
    FlowRunning,
    NoRetry,
    ProcessDiedError,
    ReplayError,
    StoreError,
    TaskTimeout,
    ThreadflowError,
)
from .events import RunningAttempt
from .flow import Flow, _registry_servers  # noqa: F401
from .result import Progress, RunHandle, RunResult, TaskProgress
from .store import EventStore, Tick

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .schedule import Schedule


def __getattr__(name: str) -> Any:
    # Schedule is imported when first asked for: its module brings socket and difflib, which
    # an app without schedules (and a reader of the store) never needs.
    if name == "Schedule":
        from .schedule import Schedule

        return Schedule
    raise AttributeError(f"module 'threadflow' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "ALL_OVER",
    "AlreadyStarted",
    "CancelToken",
    "CancelledError",
    "DuplicateChildError",
    "EncodeError",
    "EventStore",
    "Flow",
    "FlowDefinitionError",
    "FlowRunning",
    "NoRetry",
    "ProcessDiedError",
    "Progress",
    "ReplayError",
    "RunHandle",
    "RunResult",
    "RunningAttempt",
    "Schedule",
    "StoreError",
    "TaskProgress",
    "TaskTimeout",
    "ThreadflowError",
    "Tick",
    "add_child_task",
    "add_children_tasks",
    "current_token",
    "output",
    "results",
    "signals",
    "sleep",
    "task",
]
