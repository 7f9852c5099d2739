"""A tiny flow, and the body of a process that creates stores at the same moment as others.

They live in a module so that a spawned process can import them by name.
"""

from __future__ import annotations

import traceback
from typing import Any

from threadflow import ALL_OVER, Flow, task

#: Seconds a process waits at most for the others at the barrier, or for its run; hang guards.
GUARD = 60.0


def nothing(state: Any) -> str:
    return "done"


class Tiny(Flow, server_name="store-tiny"):
    only = task(task_func=nothing, next=ALL_OVER)


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
