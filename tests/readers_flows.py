"""The flow whose run every reader is asked about (``tests/test_readers_agree.py``).

``split`` adds six children; its first attempt adds them and then fails (a retry adds them
again). Its children run one at a time. ``load`` adds two children, the second of which always
fails and is tolerated. What else happens is read from the state:

* ``parent_fails``: a list; while it is empty, ``split``'s attempt appends to it and raises;
* ``broken``: child ids of ``split`` that raise ``ValueError`` (two attempts: the run fails);
* ``crash``: ``{"at": child_id, "notify": f}``, set only in a child process: that child calls
  ``notify()`` (which tells the test) and then blocks until the process is killed.

It lives in a module so that a child process can import it by name.
"""

from __future__ import annotations

import threading
from typing import Any

from threadflow import ALL_OVER, Flow, add_children_tasks, task

CHILDREN = 6


def split(state: Any) -> None:
    add_children_tasks(((i, i) for i in range(CHILDREN)), state)
    calls = state.get("parent_fails")
    if calls is not None and not calls:
        calls.append(1)
        raise ValueError("split fails once, after adding its children")


def work(child: Any, state: Any) -> int:
    child_id, _ = child
    crash = state.get("crash")
    if crash is not None and child_id == crash["at"]:
        crash["notify"]()
        threading.Event().wait()  # until the process is killed
    if child_id in state.get("broken", ()):
        raise ValueError(f"child {child_id} is broken")
    return int(child_id)


def load(state: Any) -> None:
    add_children_tasks([(0, None), (1, None)], state)


def load_child(child: Any, state: Any) -> int:
    if child[0] == 1:
        raise ValueError("record 1 is malformed")
    return 1


class Agree(Flow, server_name="readers-agree"):
    split = task(
        task_func=split,
        child_task_func=work,
        max_concurrency=1,
        task_retry_limit=2,
        next="load",
    )
    load = task(
        task_func=load,
        child_task_func=load_child,
        max_concurrency=1,
        exit_on_failed=False,
        next=ALL_OVER,
    )
