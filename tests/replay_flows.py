"""Flows shared by the replay, crash-recovery, global-name and store-file tests.

They live in a module (not in a test file) so that a child process can import them by name and
write a run that the test process then replays with the very same definition.

Task functions read their orders from the state, so a test can break a run with ``start_link``'s
extra entries and fix it by leaving them out of the replay:

* ``broken``: child ids (or, for a parent, task names) that raise ``ValueError``;
* ``broken_file``: a file whose lines name more broken child ids (fixed by deleting it);
* ``hold``: child ids that put their id in ``state["holding"]`` and then wait until their attempt
  is cancelled (``stop()``);
* ``gate``: a ``threading.Event`` that every child waits for;
* ``grandchildren``: ``{child_id: [ids]}``, children that a child adds before it holds;
* ``calls``: a list that every child appends its id to (what really ran, not what was logged);
* ``journal``: a file the crash flow appends ``task child_id`` to whenever an attempt starts;
* ``crash``: ``{"phase": ..., "notify": f}``, set only in a child process: at that phase the flow
  calls ``notify()`` (which tells the test) and then blocks until the process is killed.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from threadflow import ALL_OVER, Flow, add_children_tasks, current_token, task

#: Seconds a held task waits at most; only a guard, a test cancels or kills long before.
HANG = 30.0
#: Children of the crash flow's first stage, and the one that tells the test it runs.
CRASH_CHILDREN = 2000
CRASH_MARK = 500


def _broken(state: Any, name: Any) -> bool:
    if name in state.get("broken", ()):
        return True
    path = state.get("broken_file")
    if path and os.path.exists(path):
        with open(path) as f:
            return str(name) in f.read().split()
    return False


def work_child(child: Any, state: Any) -> Any:
    child_id, payload = child
    calls = state.get("calls")
    if calls is not None:
        calls.append(child_id)
    extra = state.get("grandchildren", {}).get(child_id)
    if extra:
        add_children_tasks(((gid, gid) for gid in extra), state)
    if child_id in state.get("hold", ()):
        state["holding"].put(child_id)
        current_token().wait(HANG)  # raises CancelledError when stop() cancels the attempt
    gate = state.get("gate")
    if gate is not None and not gate.wait(HANG):
        raise TimeoutError("the test never opened the gate")
    if _broken(state, child_id):
        raise ValueError(f"child {child_id} is broken")
    return payload * 10


def _parent(state: Any, name: str, ids: range) -> None:
    add_children_tasks(((i, i) for i in ids), state)
    if _broken(state, name):
        raise ValueError(f"parent {name} is broken")


# --- one stage with children ------------------------------------------------------------------


def add_five(state: Any) -> None:
    _parent(state, "square", range(5))


class Numbers(Flow, server_name="replay-numbers"):
    """Five children run one at a time, so which ones finished before a failure is fixed."""

    square = task(
        task_func=add_five,
        child_task_func=work_child,
        max_concurrency=1,
        task_retry_limit=1,
        next=ALL_OVER,
    )

    def handle_start_flow(self, state: dict[str, Any]) -> None:
        seen = state.get("seen_replayed")
        if seen is not None:
            seen.append(state["replayed"])


def add_many(state: Any) -> None:
    _parent(state, "many", range(state["children"]))


class ManyNumbers(Flow, server_name="replay-many-numbers"):
    """As many children as ``state["children"]``, four at a time: a long log to fold."""

    many = task(
        task_func=add_many,
        child_task_func=work_child,
        max_concurrency=4,
        task_retry_limit=1,
        next=ALL_OVER,
    )


def add_three(state: Any) -> None:
    _parent(state, "split", range(3))


class BrokenParent(Flow, server_name="replay-broken-parent"):
    """A parent that adds its children and then fails (two attempts)."""

    split = task(
        task_func=add_three,
        child_task_func=work_child,
        max_concurrency=2,
        task_retry_limit=2,
        next=ALL_OVER,
    )


def add_six(state: Any) -> None:
    _parent(state, "work", range(6))


class Interruptible(Flow, server_name="replay-interruptible"):
    """Six children, two at a time; a test holds some of them and stops the server."""

    work = task(
        task_func=add_six,
        child_task_func=work_child,
        max_concurrency=2,
        task_retry_limit=1,
        next=ALL_OVER,
    )


def add_four(state: Any) -> None:
    _parent(state, "tolerant", range(4))


class Tolerant(Flow, server_name="replay-tolerant"):
    """Failed children are tolerated; one at a time, two attempts each."""

    tolerant = task(
        task_func=add_four,
        child_task_func=work_child,
        max_concurrency=1,
        exit_on_failed=False,
        task_retry_limit=2,
        next=ALL_OVER,
    )


# --- stages -----------------------------------------------------------------------------------


def add_first(state: Any) -> None:
    _parent(state, "first", range(3))


def add_second(state: Any) -> None:
    _parent(state, "second", range(10, 13))


class TwoStages(Flow, server_name="replay-two-stages"):
    """first (children 0-2) -> second (children 10-12, one at a time)."""

    first = task(task_func=add_first, child_task_func=work_child, task_retry_limit=1, next="second")
    second = task(
        task_func=add_second,
        child_task_func=work_child,
        max_concurrency=1,
        task_retry_limit=1,
        next=ALL_OVER,
    )


def add_a(state: Any) -> None:
    _parent(state, "a", range(2))


def add_b(state: Any) -> None:
    _parent(state, "b", range(10, 13))


def add_c(state: Any) -> None:
    _parent(state, "c", range(20, 23))


def c_child(child: Any, state: Any) -> Any:
    # A broken c child fails only once b is all over, so that the failure cancels nothing of b.
    if _broken(state, child[0]):
        state["b_over"].wait(HANG)
    return work_child(child, state)


def finish(state: Any) -> str:
    return "done"


class FanIn(Flow, server_name="replay-fan-in"):
    """a (children 0-1) -> [b (children 10-12), c (children 20-22)] -> d."""

    a = task(task_func=add_a, child_task_func=work_child, task_retry_limit=1, next=["b", "c"])
    b = task(task_func=add_b, child_task_func=work_child, task_retry_limit=1, next="d")
    c = task(
        task_func=add_c,
        child_task_func=c_child,
        max_concurrency=1,
        task_retry_limit=1,
        next="d",
    )
    d = task(task_func=finish, task_retry_limit=1, next=ALL_OVER)

    def handle_task_all_over(self, task: tuple[Any, ...], state: dict[str, Any]) -> None:
        if task == ("b",) and "b_over" in state:
            state["b_over"].set()


# --- a flow that a child process runs and the test kills ---------------------------------------


def _crash_point(state: Any, phase: str) -> None:
    crash = state.get("crash")
    if crash is not None and crash["phase"] == phase:
        crash["notify"]()
        threading.Event().wait()  # until SIGKILL


def _journal(state: Any, task_name: str, child_id: Any = None) -> None:
    """Append ``task child_id`` to ``state["journal"]``: what really ran, whatever the log says."""
    line = f"{task_name} {'-' if child_id is None else child_id}\n".encode()
    fd = os.open(state["journal"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, line)  # one write with O_APPEND: lines from threads never interleave
    finally:
        os.close(fd)


def crash_split(state: Any) -> None:
    _journal(state, "split")
    add_children_tasks(((i, i) for i in range(state["children"])), state)
    _crash_point(state, "parent")


def crash_double(child: Any, state: Any) -> int:
    _journal(state, "split", child[0])
    if child[0] == CRASH_MARK:
        _crash_point(state, "children")
    return int(child[1]) * 2


def crash_merge(state: Any) -> None:
    _journal(state, "merge")
    _crash_point(state, "stage_parent")
    add_children_tasks(((i, i) for i in range(3)), state)


def crash_triple(child: Any, state: Any) -> int:
    _journal(state, "merge", child[0])
    return int(child[1]) * 3


class CrashFlow(Flow, server_name="crash-flow"):
    """split (many children, four at a time) -> merge (three children)."""

    split = task(
        task_func=crash_split,
        child_task_func=crash_double,
        max_concurrency=4,
        task_retry_limit=1,
        next="merge",
    )
    merge = task(
        task_func=crash_merge,
        child_task_func=crash_triple,
        task_retry_limit=1,
        next=ALL_OVER,
    )

    def handle_task_all_over(self, task: tuple[Any, ...], state: dict[str, Any]) -> None:
        if task == ("split",):
            _crash_point(state, "stage_callback")


# --- global server names ----------------------------------------------------------------------


def add_squares(state: Any) -> None:
    # A run's input ``count`` (default 5) says how many.
    add_children_tasks(((i, i) for i in range(state.get("count", 5))), state)


def square(child: Any, state: Any) -> int:
    return int(child[1]) ** 2


def wait_for_gate(state: Any) -> str:
    # The owning process opens the gate when the test tells it to.
    if not state["gate"].wait(HANG):
        raise TimeoutError("the test never opened the gate")
    return "released"


class GlobalWork(Flow, server_name=("global", "g")):
    """Entrance ``work`` squares five children; entrance ``slow`` waits for the gate."""

    default_entrance = "work"
    work = task(task_func=add_squares, child_task_func=square, task_retry_limit=1, next=ALL_OVER)
    slow = task(task_func=wait_for_gate, task_retry_limit=1, next=ALL_OVER)


def split_lines(state: Any) -> None:
    add_children_tasks(enumerate(state["text"].split("\n")), state)


def sum_line(child: Any, state: Any) -> int:
    return sum(int(number) for number in child[1].split(","))


def do_nothing(state: Any) -> None:
    return None


class GlobalTwoStages(Flow, server_name=("global", "seed-scenario-3")):
    """Seed scenario 3: flow1 -> flow2 under a global name."""

    default_entrance = "flow1"
    flow1 = task(task_func=do_nothing, task_retry_limit=3, task_timeout=5.0, next="flow2")
    flow2 = task(
        task_func=split_lines,
        child_task_func=sum_line,
        max_concurrency=10,
        exit_on_failed=True,
        task_retry_limit=3,
        task_timeout=5.0,
        next=ALL_OVER,
    )
