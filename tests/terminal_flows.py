"""Flows that ``tests/test_terminal.py`` runs with ``threadflow run`` on a pseudo-terminal.

:class:`Printer` adds nine children, one running at a time. Child ``i`` waits until the test
creates the file ``go-i`` in the directory ``$TERMINAL_GATE`` (so the test decides when each
child ends, and can look at the screen meanwhile); then a receiver of ``task_over`` prints
``user line i``, on stdout for odd ``i`` and on stderr for even ones, as a flow's own output.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import threadflow
from threadflow import ALL_OVER, Flow, add_children_tasks, task

CHILDREN = 9


def nine_children(state: Any) -> None:
    add_children_tasks(((i, None) for i in range(1, CHILDREN + 1)), state)


def wait_for_gate(child: Any, state: Any) -> int:
    gate = Path(os.environ["TERMINAL_GATE"]) / f"go-{child[0]}"
    token = threadflow.current_token()
    for _ in range(6000):  # a hang guard of about a minute
        if gate.exists():
            return int(child[0])
        token.wait(0.01)  # raises CancelledError once the run is stopped (Ctrl-C)
    raise TimeoutError(f"the test never created {gate}")


class Printer(Flow):
    split = task(
        task_func=nine_children, child_task_func=wait_for_gate, max_concurrency=1, next=ALL_OVER
    )

    def handle_task_over(self, task: tuple[Any, ...], state: dict[str, Any]) -> None:
        if len(task) == 2:
            print(f"user line {task[1]}", file=sys.stdout if task[1] % 2 else sys.stderr)
