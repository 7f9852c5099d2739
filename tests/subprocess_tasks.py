"""Task functions for test_subprocess.py: a worker process imports them by name.

They run in other processes, so they report through files in ``state["dir"]`` (a path, which
pickles) rather than through Python objects shared with the test.
"""

import ctypes
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import threadflow
from threadflow import CancelledError, DuplicateChildError, add_child_task, add_children_tasks

LONG = 60  # seconds a hanging task would sleep; the engine must kill it long before


def attempt(state, key):
    """This attempt's number for ``key``, counted with files (attempts run in other processes)."""
    n = 1
    while True:
        try:
            os.close(os.open(Path(state["dir"], f"{key}.attempt-{n}"), os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            n += 1
        else:
            return n


def write(state, name, text):
    """Write a file atomically, so that a reader never sees it half written."""
    path = Path(state["dir"], name)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(str(text))
    tmp.rename(path)


def pid_and_state(state):
    return {
        "pid": os.getpid(),
        "keys": sorted(state),
        "extra": state.get("extra"),
        "cancelled": threadflow.current_token().cancelled,
    }


def pid(state):
    return os.getpid()


def add_five(state):
    add_children_tasks(((i, None) for i in range(5)), state)


def child_pid(child, state):
    return os.getpid()


def hang_first(state):
    """The first attempt ignores its token and sleeps in C; later ones return their number."""
    n = attempt(state, "hang")
    write(state, f"hang-{n}.pid", os.getpid())
    if n == 1:
        time.sleep(LONG)
    return n


def hang_with_grandchild_first(state):
    """The first attempt starts a process of its own, then hangs."""
    n = attempt(state, "hang")
    write(state, f"hang-{n}.pid", os.getpid())
    if n == 1:
        child = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({LONG})"])
        write(state, "grandchild.pid", child.pid)
        time.sleep(LONG)
    return n


def die_first(state):
    """The first attempt's process dies as ``state["how"]`` says; later ones return."""
    n = attempt(state, "die")
    if n == 1:
        if state["how"] == "exit":
            os._exit(3)
        ctypes.string_at(0)  # SIGSEGV
    return n


def die_leaving_a_forked_process_first(state):
    """The first attempt forks a process with multiprocessing, then dies; it must not hold the
    worker's pipe open (the server would never learn of the death) nor outlive the worker."""
    n = attempt(state, "die")
    if n == 1:
        child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(LONG,))
        child.start()
        write(state, "grandchild.pid", child.pid)
        os._exit(3)
    return n


def return_unpicklable(state):
    return threading.Lock()


class TwoArgumentError(Exception):
    """Pickles, but does not unpickle: __init__ takes two arguments, args holds one."""

    def __init__(self, row, reason):
        super().__init__(f"row {row}: {reason}")


def raise_unpicklable(state):
    raise TwoArgumentError(7, "bad value")


def raise_value_error_first(state):
    n = attempt(state, "raise")
    if n == 1:
        raise ValueError("bad row 7")
    return n


def sleep_cooperatively_first(state):
    """The first attempt sleeps with threadflow.sleep and notes that it was cancelled."""
    n = attempt(state, "sleep")
    if n == 1:
        write(state, "sleep-1.pid", os.getpid())
        try:
            threadflow.sleep(LONG)
        except CancelledError as exc:
            write(state, "cancelled", exc.reason)
            raise
    return n


def add_three(state):
    add_children_tasks(((i, i * 10) for i in range(3)), state)
    return os.getpid()


def double(child, state):
    child_id, payload = child
    return payload * 2


def add_two(state):
    add_children_tasks([(0, 1), (1, 2)], state)


def child_adds_children(child, state):
    """Children with int ids add two children each; those (str ids) return their payload."""
    child_id, payload = child
    if isinstance(child_id, int):
        add_children_tasks([(f"{child_id}.{j}", payload * 10 + j) for j in range(2)], state)
    return payload


def add_duplicate_and_bad(state):
    """Errors of add_child_task come back from the server with their type and attributes."""
    add_child_task(1, "x", state)
    try:
        add_child_task(1, "y", state)
    except DuplicateChildError as exc:
        duplicate = [type(exc).__name__, exc.task, exc.child_id]
    try:
        add_child_task(2, object(), state)
    except TypeError as exc:
        bad = str(exc)
    return {"duplicate": duplicate, "bad": bad}


def hang_child_with_grandchild(child, state):
    """Each child starts a process of its own, notes both pids, then hangs."""
    child_id, _ = child
    grandchild = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({LONG})"])
    write(state, f"grandchild-{child_id}.pid", grandchild.pid)
    write(state, f"child-{child_id}.pid", os.getpid())
    time.sleep(LONG)


def results_of(state):
    """Reads the store from the worker process (the state's store and task_flow are copies)."""
    return {
        "flow": state["task_flow"].name,
        "results": [[cid, r] for cid, r in threadflow.results(state, "split")],
    }


def add_many_then_count(state):
    """Adds more children than fit in one chunk; returns how many the store holds right after."""
    add_children_tasks(((i, i) for i in range(1100)), state)
    return len(state["store"].events(state["run_id"], "child_added"))
