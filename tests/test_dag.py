"""Flows as DAGs: fan-out to several branches, fan-in to a stage named by several ``next``s."""

import threading

import pytest

import threadflow
from threadflow import ALL_OVER, EventStore, Flow, add_child_task, add_children_tasks, results, task

HANG_GUARD = 30

# --- task functions (module level, as the engine requires) -----------------------------------


def run_a(state):
    state["calls"].append("a")


def run_d(state):
    state["calls"].append("d")


def branch(name, state):
    """The slow branch adds a child that waits for the fast branch; the fast one just returns."""
    state["calls"].append(name)
    if state["slow"] == name:
        add_child_task(0, name, state)
    else:
        state["fast_done"].set()


def run_b(state):
    branch("b", state)


def record_b(state):
    state["calls"].append("b")


def run_c(state):
    branch("c", state)


def slow_child(child, state):
    if not state["fast_done"].wait(10):
        raise RuntimeError("the fast branch never ran")
    state["calls"].append(f"{child[1]} child")
    return child[1]


def meet_b(state):
    state["calls"].append("b")
    state["barrier"].wait(10)


def meet_c(state):
    state["calls"].append("c")
    state["barrier"].wait(10)


def add_one_child(state):
    add_child_task(0, "x", state)


def add_two_children(state):
    add_children_tasks([(0, "ok"), (1, "bad")], state)


def wait_for_cancel_child(child, state):
    state["b_running"].set()
    try:
        threadflow.current_token().wait(HANG_GUARD)
    except threadflow.CancelledError:
        state["cancelled"].append(child[0])
        raise
    finally:
        state["b_ended"].set()
    return "not cancelled"


def fail_once_b_runs(child, state):
    if not state["b_running"].wait(10):
        raise RuntimeError("branch b never started its child")
    raise ValueError("c child failed")


def fail_bad_child(child, state):
    child_id, payload = child
    state["calls"].append(f"c child {child_id}")
    if payload == "bad":
        raise ValueError(f"child {child_id} is bad")
    return payload


# --- flows ------------------------------------------------------------------------------------


class FanOut(Flow, server_name="dag-fan-out"):
    a = task(task_func=run_a, next=["b", "c"])
    b = task(task_func=meet_b, task_retry_limit=1, next=ALL_OVER)
    c = task(task_func=meet_c, task_retry_limit=1, next=ALL_OVER)


class FanIn(Flow, server_name="dag-fan-in"):
    a = task(task_func=run_a, next=["b", "c"])
    b = task(task_func=run_b, child_task_func=slow_child, next="d")
    c = task(task_func=run_c, child_task_func=slow_child, next="d")
    d = task(task_func=run_d, next=ALL_OVER)


class FailingBranch(Flow, server_name="dag-failing-branch"):
    a = task(task_func=run_a, next=["b", "c"])
    b = task(
        task_func=add_one_child,
        child_task_func=wait_for_cancel_child,
        task_retry_limit=1,
        next="d",
    )
    c = task(
        task_func=add_one_child,
        child_task_func=fail_once_b_runs,
        task_retry_limit=1,
        exit_on_failed=True,
        next="d",
    )
    d = task(task_func=run_d, next=ALL_OVER)


class TolerantBranch(Flow, server_name="dag-tolerant-branch"):
    a = task(task_func=run_a, next=["b", "c"])
    b = task(task_func=record_b, next="d")
    c = task(
        task_func=add_two_children,
        child_task_func=fail_bad_child,
        task_retry_limit=1,
        exit_on_failed=False,
        next="d",
    )
    d = task(task_func=run_d, next=ALL_OVER)


# --- helpers ----------------------------------------------------------------------------------


def sorted_events(store_path, run_id):
    return sorted(EventStore(store_path).events(run_id), key=lambda e: e.seq)


def seq_of(events, kind, task_name):
    """The seqs of the parent-level events of ``kind`` for ``task_name``."""
    return [e.seq for e in events if e.kind == kind and e.task == task_name and e.child_id is None]


def run_flow(flow, store_path, **extra_state):
    with flow.start_link(store=store_path, **extra_state) as server:
        return server.start_flow().result(timeout=HANG_GUARD)


# --- fan-out ----------------------------------------------------------------------------------


def test_fan_out_runs_every_branch_in_parallel(store_path):
    calls = []
    res = run_flow(FanOut, store_path, calls=calls, barrier=threading.Barrier(2))

    assert res.outcome == "all_over", res.error
    assert calls[0] == "a"
    assert sorted(calls[1:]) == ["b", "c"]
    events = sorted_events(store_path, res.run_id)
    (a_done,) = seq_of(events, "task_all_over", "a")
    for name in ("b", "c"):
        (started,) = seq_of(events, "task_started", name)
        assert started > a_done
    assert [e.kind for e in events][-1] == "all_over"


# --- fan-in -----------------------------------------------------------------------------------


@pytest.mark.parametrize("slow", ["b", "c"])
def test_fan_in_starts_once_after_every_predecessor_is_all_over(store_path, slow):
    calls = []
    res = run_flow(FanIn, store_path, calls=calls, slow=slow, fast_done=threading.Event())

    assert res.outcome == "all_over", res.error
    assert calls.count("d") == 1
    assert calls[-1] == "d"
    assert f"{slow} child" in calls
    assert list(results(res.state, slow)) == [(0, slow)]
    events = sorted_events(store_path, res.run_id)
    (b_done,) = seq_of(events, "task_all_over", "b")
    (c_done,) = seq_of(events, "task_all_over", "c")
    (d_started,) = seq_of(events, "task_started", "d")
    assert d_started > max(b_done, c_done)


# --- failures in a branch ---------------------------------------------------------------------


def test_failing_branch_stops_the_run_and_cancels_the_other_branch(store_path):
    calls, cancelled = [], []
    b_running, b_ended = threading.Event(), threading.Event()
    res = run_flow(
        FailingBranch,
        store_path,
        calls=calls,
        cancelled=cancelled,
        b_running=b_running,
        b_ended=b_ended,
    )

    assert res.outcome == "failed_over"
    assert res.task == ("c", 0)
    assert isinstance(res.error, ValueError)
    assert str(res.error) == "c child failed"
    assert res.as_tuple() == ("failed_over", ("can_not_retry", ("c", 0), res.state))
    assert b_ended.wait(10), "branch b's child was never cancelled"
    assert cancelled == [0]
    assert "d" not in calls
    events = sorted_events(store_path, res.run_id)
    assert seq_of(events, "task_started", "d") == []
    assert [e.kind for e in events if e.kind in ("all_over", "failed_over")] == ["failed_over"]


def test_tolerated_child_failure_lets_the_flow_continue_through_fan_in(store_path):
    calls = []
    res = run_flow(TolerantBranch, store_path, calls=calls)

    assert res.outcome == "all_over", res.error
    assert res.failed == [("c", 1)]
    assert list(results(res.state, "c")) == [(0, "ok")]
    assert calls.count("d") == 1
    assert calls[-1] == "d"
    events = sorted_events(store_path, res.run_id)
    (b_done,) = seq_of(events, "task_all_over", "b")
    (c_done,) = seq_of(events, "task_all_over", "c")
    (d_started,) = seq_of(events, "task_started", "d")
    assert d_started > max(b_done, c_done)
    failed = [e for e in events if e.kind == "task_failed"]
    assert [(e.task, e.child_id, e.data["tolerated"]) for e in failed] == [("c", 1, True)]
