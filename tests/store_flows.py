"""A tiny flow, and the body of a process that creates stores at the same moment as others.

They live in a module so that a spawned process can import them by name. Run as a script,
``python store_flows.py STORE`` starts :class:`Tiny` on STORE, runs it once and prints one line:
the outcome, or the type and message of the error.
"""

from __future__ import annotations

import sys
import traceback
from typing import Any

from threadflow import ALL_OVER, Flow, add_children_tasks, task

#: Seconds a process waits at most for the others at the barrier, or for its run; hang guards.
GUARD = 60.0


def nothing(state: Any) -> str:
    return "done"


class Tiny(Flow, server_name="store-tiny"):
    only = task(task_func=nothing, next=ALL_OVER)


def add_many(state: Any) -> None:
    add_children_tasks(((i, "payload " * 20) for i in range(state["children"])), state)


def echo(child: Any, state: Any) -> Any:
    return child[1]


class Filler(Flow, server_name="store-filler"):
    """Writes a log of ``children`` children (a start_link entry): a store of many pages."""

    fill = task(task_func=add_many, child_task_func=echo, next=ALL_OVER)


def create_and_run(paths: list[str], barrier: Any, answers: Any) -> None:
    """For each path: wait for every process at ``barrier``, then start a server on the path
    and run the flow once.

    Puts ``(path, "all_over")`` on ``answers``, or ``(path, error)`` with the error's type,
    message and traceback.
    """
    for path in paths:
        barrier.wait(GUARD)
        try:
            with Tiny.start_link(store=path) as server:
                outcome = server.start_flow().result(GUARD).outcome
        except Exception as exc:  # the test shows what went wrong, whatever it was
            outcome = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
        answers.put((path, outcome))


def start_once(path: str) -> str:
    try:
        with Tiny.start_link(store=path) as server:
            return server.start_flow().result(GUARD).outcome
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


if __name__ == "__main__":
    print(start_once(sys.argv[1]))
