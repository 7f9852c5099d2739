"""A flow whose task name, child id, payload and errors carry terminal control characters, for
the tests of what the command line prints (``tests/test_cli_safety.py``).

The class is built with ``type()`` because its task name is not a Python identifier, which is
as legal for a task as for any attribute set that way.
"""

from __future__ import annotations

from typing import Any

from threadflow import ALL_OVER, Flow, add_children_tasks, task

#: Clears the screen and turns the text red, rings the bell, goes back to the start of the line,
#: then DEL and a C1 CSI (one character that starts an escape sequence on some terminals).
HOSTILE = "\x1b[2J\x1b[31mpwned\x07\r\x7f\x9b31m"
#: The error adds a lone surrogate, as a file name decoded with ``surrogateescape`` holds: a
#: UTF-8 stream refuses to write it.
HOSTILE_ERROR = f"{HOSTILE} \udcff"
#: Ends a Mermaid label or statement if written raw: quotes, brackets, a line break; and an
#: escape sequence for the terminal that shows the progress lines.
HOSTILE_TASK = 'load "rows" [1]\n\x1b[2Jend'


def split(state: Any) -> None:
    add_children_tasks([(HOSTILE, {"note": HOSTILE})], state)


def fail(child: Any, state: Any) -> None:
    raise RuntimeError(HOSTILE_ERROR)


def on_task_failed(self: Flow, task: tuple[Any, ...], state: dict[str, Any]) -> None:
    # Logged by the engine with its traceback, and recorded as a callback_error event.
    raise RuntimeError(HOSTILE_ERROR)


Hostile = type(
    "Hostile",
    (Flow,),
    {
        "__module__": __name__,
        "__qualname__": "Hostile",
        "__doc__": "One task with a hostile name; its only child fails with a hostile error.",
        "default_entrance": HOSTILE_TASK,
        HOSTILE_TASK: task(
            task_func=split, child_task_func=fail, exit_on_failed=True, next=ALL_OVER
        ),
        "handle_task_failed": on_task_failed,
    },
)
