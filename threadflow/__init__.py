"""threadflow: run jobs as a DAG of tasks with parallel children, retries and timeouts,
every step logged to SQLite.

The public names are re-exported here; see ``docs/`` and ``API.md`` for the contract.
"""

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
from .schedule import Schedule
from .store import EventStore, Tick

__version__ = "0.1.0"

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
