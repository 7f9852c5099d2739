"""Task functions for test_scale_out.py: the workers of a Dask cluster or a process pool import
them by name.

They run in other processes, so they report through their results and through files in
``state["dir"]`` (a path, which pickles), never through objects shared with the test.
"""

import os
import signal
import time

from subprocess_tasks import attempt, write

import threadflow
from threadflow import CancelledError, DuplicateChildError, add_child_task, add_children_tasks

LONG = 30  # seconds a hanging attempt would sleep; its deadline ends it long before


def add_numbers(state):
    """The parent: children 0..n-1 with their number as payload; returns where it ran."""
    add_children_tasks(((i, {"n": i}) for i in range(state["n"])), state)
    return os.getpid()


def square(child, state):
    child_id, payload = child
    return {"pid": os.getpid(), "square": payload["n"] ** 2}


def add_a_grandchild(child, state):
    """Children with an int id add one grandchild each; grandchildren only report."""
    child_id, payload = child
    if isinstance(child_id, int):
        add_child_task(f"{child_id}.1", {"n": child_id * 10}, state)
    return os.getpid()


def add_duplicates(child, state):
    """Child 0 adds an id its parent added already; child 1 adds an id twice itself."""
    child_id, _ = child
    if child_id == 0:
        add_child_task(1, None, state)  # child 1 exists: the coordinator refuses it
    elif child_id == 1:
        add_child_task("x", None, state)
        try:
            add_child_task("x", None, state)
        except DuplicateChildError as exc:
            return f"caught {exc.child_id}"
    return "ran"


def sleep_on_first_attempt(child, state):
    """Attempt 1 sleeps through its deadline; later attempts return their number."""
    child_id, _ = child
    n = attempt(state, f"sleep-{child_id}")
    if n == 1:
        try:
            threadflow.sleep(LONG)
        except CancelledError as exc:
            write(state, f"woke-{child_id}", exc.reason)
            raise
    return n


def die_on_first_attempt(child, state):
    """Attempt 1 kills its own worker process; later attempts return where they ran."""
    child_id, _ = child
    if attempt(state, f"die-{child_id}") == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return os.getpid()


def interval(child, state):
    """Busy for a while; returns when, on the machine's monotonic clock (shared by processes)."""
    start = time.monotonic()
    time.sleep(state["busy"])
    return [start, time.monotonic()]


def value_error(child, state):
    raise ValueError(f"child {child[0]} is bad")


def started_then_hang(child, state):
    write(state, f"started-{child[0]}", os.getpid())
    threadflow.sleep(LONG)


def square_unless_told(child, state):
    """Fails child 2 while ``state["fail"]`` is set (a replay can clear it)."""
    child_id, payload = child
    if state["fail"] and child_id == 2:
        raise ValueError("told to fail")
    return payload["n"] ** 2


def state_keys(child, state):
    return sorted(state)


class BoundToThisProcess:
    """A callable that refuses to be sent elsewhere, in its own words (as a client object
    holding a connection may): its TypeError does not mention pickling."""

    def __call__(self, child, state):
        return child[0]

    def __reduce__(self):
        raise TypeError("a BoundToThisProcess stays in the process that made it")


class BoundParent(BoundToThisProcess):
    """The same, as a parent's task function."""

    def __call__(self, state):
        return "ran"


def where(state):
    """A parent that reports where it ran."""
    return os.getpid()


def hang_child_zero_once(child, state):
    """Child 0's first attempt waits on its token until its deadline; the others return their
    id at once, as child 0's later attempts do."""
    child_id, _ = child
    if child_id == 0 and attempt(state, "hang-0") == 1:
        try:
            threadflow.sleep(LONG)
        except CancelledError as exc:
            write(state, "woke-0", exc.reason)
            raise
    return child_id
