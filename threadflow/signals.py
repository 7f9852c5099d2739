"""The moments of a run as blinker signals.

Every signal is sent on the server's coordinator thread, after its event is committed, with the
server as sender and the keyword arguments ``task``, ``state``, ``run_id``, ``attempt``, ``ts``
(the time of its event as stored: ISO 8601 UTC text) and, where there is one, ``error``.
Receivers run one at a time and should not block: the coordinator waits for them. A receiver
that raises is logged (logger ``threadflow``) and recorded as a ``callback_error`` event; the
other receivers and the run go on.

Signals live in a private ``blinker.Namespace``, not blinker's global one.
"""

from __future__ import annotations

from blinker import Namespace

_ns = Namespace()

start_flow = _ns.signal("start_flow", doc="A run started (task=None).")
all_over = _ns.signal("all_over", doc="The run ended with every branch over (task=None).")
failed_over = _ns.signal(
    "failed_over", doc="The run failed; task is the task that could not be retried."
)
task_start = _ns.signal("task_start", doc="An attempt is about to start (every attempt).")
task_over = _ns.signal("task_over", doc="An attempt returned normally.")
task_all_over = _ns.signal("task_all_over", doc="A parent task and all its children are done.")
task_failed = _ns.signal(
    "task_failed", doc="A task or child used up its attempts (fatal or tolerated)."
)
task_timeout = _ns.signal("task_timeout", doc="An attempt passed its task_timeout.")
task_exit = _ns.signal("task_exit", doc="An attempt raised.")
task_retry = _ns.signal("task_retry", doc="Another attempt of the task is scheduled.")

#: Signal per callback method name: the engine connects overridden ``handle_*`` methods here.
HANDLERS = {
    "handle_start_flow": start_flow,
    "handle_all_over": all_over,
    "handle_task_start": task_start,
    "handle_task_over": task_over,
    "handle_task_all_over": task_all_over,
    "handle_task_failed": task_failed,
    "handle_task_timeout": task_timeout,
    "handle_task_exit": task_exit,
}

__all__ = [
    "start_flow",
    "all_over",
    "failed_over",
    "task_start",
    "task_over",
    "task_all_over",
    "task_failed",
    "task_timeout",
    "task_exit",
    "task_retry",
]
