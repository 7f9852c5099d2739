"""Flows for the tests of the live dashboard (``tests/test_ui.py``, ``tests/test_ui_browser.py``).

``Gated`` adds ``CHILDREN`` children to ``fetch``, four of which run at once; each child waits
for its own gate (``state["gates"][child_id]``, a ``threading.Event`` the test sets), so the
run stays visibly in progress until the test lets it go on. Child ``BROKEN`` raises on each of
its two attempts, with an error whose text is markup, and so fails the run once ``fetch``'s
other children are over. ``report`` runs last.

``Hostile`` has a task whose name is markup, and a child whose id and error are markup too.
"""

from __future__ import annotations

from typing import Any

from threadflow import ALL_OVER, Flow, add_children_tasks, task

CHILDREN = 6
BROKEN = 3
#: What child BROKEN raises: markup that would run a script if a page wrote it unescaped.
BROKEN_ERROR = "row 3 is malformed: <script>alert('error')</script> & <b>bold</b>"
HOSTILE_TASK = "<script>alert('task')</script>"
HOSTILE_CHILD = '<img src=x onerror="alert(1)">'
HOSTILE_ERROR = "</pre><script>alert('traceback')</script>"
GUARD = 30.0  # seconds a gated child waits at most: a hang guard only


def fetch(state: Any) -> None:
    add_children_tasks(((i, {"page": i}) for i in range(CHILDREN)), state)


def parse(child: Any, state: Any) -> int:
    child_id, _ = child
    if not state["gates"][child_id].wait(GUARD):
        raise TimeoutError(f"the test never opened the gate of child {child_id}")
    if child_id == BROKEN:
        raise ValueError(BROKEN_ERROR)
    return child_id * 10


def report(state: Any) -> None:
    return None


class Gated(Flow):
    fetch = task(
        task_func=fetch,
        child_task_func=parse,
        max_concurrency=4,
        task_retry_limit=2,
        next="report",
    )
    report = task(task_func=report, next=ALL_OVER)


def hostile_split(state: Any) -> None:
    add_children_tasks([(HOSTILE_CHILD, None)], state)


def hostile_fail(child: Any, state: Any) -> None:
    raise RuntimeError(HOSTILE_ERROR)


Hostile = type(
    "Hostile",
    (Flow,),
    {
        "__module__": __name__,
        "__qualname__": "Hostile",
        "__doc__": "One task whose name is markup; its only child fails with markup.",
        "default_entrance": HOSTILE_TASK,
        HOSTILE_TASK: task(task_func=hostile_split, child_task_func=hostile_fail, next=ALL_OVER),
    },
)
