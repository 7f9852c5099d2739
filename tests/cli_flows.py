"""Flows the command-line tests run and name as ``tests.cli_flows:Class``.

Task functions live at module level so that the CLI can import the flows by name. Which children
fail, and whether a run stops itself, is read from environment variables at call time, so a test
can make a run fail, "fix" it by clearing the variable, and replay it:

* ``CLI_FLOWS_FAIL``: comma-separated child ids (ints) whose ``child_task_func`` raises.
* ``CLI_FLOWS_CRASH``: comma-separated child ids whose ``child_task_func`` ends the whole
  process at once (``os._exit``), as a crash would: the run is left without an end.
* ``CLI_FLOWS_STOP``: when set, :class:`Stoppable` stops its own server after its first stage,
  so that the run (or its replay) ends ``interrupted``.

:class:`Gated` holds its only task until the test sets :data:`GATE`, so a test can look at a
run that is still going.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import threadflow
from threadflow import ALL_OVER, Flow, add_children_tasks, task

FAIL_ENV = "CLI_FLOWS_FAIL"
CRASH_ENV = "CLI_FLOWS_CRASH"
STOP_ENV = "CLI_FLOWS_STOP"
CHILDREN = 3


#: Set by the test to let :class:`Gated`'s task finish; ENTERED is set when its attempt starts.
GATE = threading.Event()
ENTERED = threading.Event()


def _ids(variable: str) -> set[int]:
    raw = os.environ.get(variable, "")
    return {int(part) for part in raw.split(",") if part.strip()}


def split(state: Any) -> None:
    add_children_tasks(((i, {"n": i}) for i in range(1, CHILDREN + 1)), state)


def double(child: Any, state: Any) -> int:
    child_id, payload = child
    if child_id in _ids(CRASH_ENV):
        os._exit(17)
    if child_id in _ids(FAIL_ENV):
        raise ValueError(f"child {child_id} is broken")
    return int(payload["n"]) * 2


def total(state: Any) -> int:
    return sum(result or 0 for _, result in threadflow.results(state, "split"))


def noop(state: Any) -> None:
    return None


def wait_at_gate(state: Any) -> None:
    if not GATE.wait(30):
        raise TimeoutError("the test never opened the gate")


class Stages(Flow):
    """Two stages; ``split`` adds three children. Ends ``all_over``."""

    split = task(task_func=split, child_task_func=double, max_concurrency=2, next="total")
    total = task(task_func=total, next=ALL_OVER)


class Fatal(Flow):
    """Like :class:`Stages`, but a failing child (``CLI_FLOWS_FAIL``) fails the run."""

    split = task(
        task_func=split,
        child_task_func=double,
        max_concurrency=1,  # one child at a time: child 3 never starts once child 2 fails
        exit_on_failed=True,
        task_retry_limit=2,
        next="total",
    )
    total = task(task_func=total, next=ALL_OVER)


class Tolerated(Flow):
    """A failing child is tolerated (``exit_on_failed=False``): the run still ends ``all_over``."""

    split = task(
        task_func=split,
        child_task_func=double,
        max_concurrency=1,
        exit_on_failed=False,
        task_retry_limit=1,
        next="total",
    )
    total = task(task_func=total, next=ALL_OVER)


class Stoppable(Flow):
    """Stops its own server once ``split`` is all over when ``CLI_FLOWS_STOP`` is set, so that
    the run, or a replay that finishes ``split``, ends ``interrupted``."""

    split = task(task_func=split, child_task_func=double, task_retry_limit=1, next="total")
    total = task(task_func=total, next=ALL_OVER)

    def handle_task_all_over(self, task: tuple[Any, ...], state: dict[str, Any]) -> None:
        if task == ("split",) and os.environ.get(STOP_ENV):
            self.stop()


class Diamond(Flow):
    """Fan-out and fan-in: ``start`` -> ``left`` (with children) and ``right`` -> ``join``."""

    default_entrance = "start"
    start = task(task_func=noop, next=["left", "right"])
    left = task(task_func=split, child_task_func=double, next="join")
    right = task(task_func=noop, next="join")
    join = task(task_func=noop, next=ALL_OVER)


class Gated(Flow):
    """One task that waits for :data:`GATE`."""

    hold = task(task_func=wait_at_gate, task_retry_limit=1, next=ALL_OVER)

    def handle_task_start(self, task: tuple[Any, ...], state: dict[str, Any]) -> None:
        # Callbacks run once their event is committed: the run is in the store from here on.
        ENTERED.set()


class NotAFlow:
    """A class that is not a Flow, for the CLI's error message."""
