"""The seven test scenarios of the Elixir TaskFlow (SEED.md), in Python form."""

import queue
from collections import Counter
from datetime import datetime

import pytest
from helpers import recording

from threadflow import (
    ALL_OVER,
    EventStore,
    Flow,
    FlowRunning,
    TaskTimeout,
    add_children_tasks,
    current_token,
    results,
    signals,
    task,
)

GOOD_TEXT = "1,2,3\n4,5,6\n7,8,9"
BAD_TEXT = "1,2,3\n4,5,6\n7,8,b"
HANG_GUARD = 30.0


# --- task functions -------------------------------------------------------------------------


def split_lines(state):
    """Add one child per line of state['text']: child id = line number, payload = the line."""
    add_children_tasks(enumerate(state["text"].split("\n")), state)


def sum_line(child, state):
    _, line = child
    return sum(int(number) for number in line.split(","))


def add_no_children(state):
    return None


def do_nothing(state):
    return None


def hang_while_planned(state):
    """Hang until cancelled when the run's plan says so; finish otherwise."""
    if state["plan"].get_nowait() == "hang":
        current_token().wait(HANG_GUARD)  # raises CancelledError once the timeout cancels us
    return "done"


# --- flows ----------------------------------------------------------------------------------


class SumLines(Flow, server_name="seed-sum-lines"):
    flow1 = task(
        task_func=split_lines,
        child_task_func=sum_line,
        max_concurrency=10,
        exit_on_failed=True,
        task_retry_limit=3,
        task_timeout=5.0,
        next=ALL_OVER,
    )


class TolerantSumLines(Flow, server_name="seed-tolerant-sum-lines"):
    flow1 = task(
        task_func=split_lines,
        child_task_func=sum_line,
        max_concurrency=10,
        exit_on_failed=False,
        task_retry_limit=3,
        task_timeout=5.0,
        next=ALL_OVER,
    )


class TolerantThenReport(Flow, server_name="seed-tolerant-then-report"):
    flow1 = task(
        task_func=split_lines,
        child_task_func=sum_line,
        max_concurrency=10,
        exit_on_failed=False,
        task_retry_limit=3,
        task_timeout=5.0,
        next="flow2",
    )
    flow2 = task(task_func=do_nothing, task_retry_limit=3, task_timeout=5.0, next=ALL_OVER)


# Seed scenario 3 registers the server globally ({:global, name}); global names land later,
# so this uses a local name for now. Switch to server_name=("global", ...) when they exist.
class TwoStages(Flow, server_name="seed-scenario-3"):
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


class ChildlessWithChildFunc(Flow, server_name="seed-childless-with-child-func"):
    flow1 = task(task_func=add_no_children, child_task_func=sum_line, next=ALL_OVER)


class ChildlessWithoutChildFunc(Flow, server_name="seed-childless-without-child-func"):
    flow1 = task(task_func=add_no_children, next=ALL_OVER)


class HangTwice(Flow, server_name="seed-scenario-7"):
    flow1 = task(task_func=hang_while_planned, task_timeout=0.3, task_retry_limit=3, next=ALL_OVER)


# --- helpers --------------------------------------------------------------------------------


def attempts(store_path, run_id):
    """Count task_started events per (task, child_id) of one run."""
    events = EventStore(store_path).events(run_id)
    return Counter((e.task, e.child_id) for e in events if e.kind == "task_started")


def task_kinds(store_path, run_id, task_name):
    return [e.kind for e in EventStore(store_path).events(run_id) if e.task == task_name]


# --- scenarios ------------------------------------------------------------------------------


def test_scenario_1_children_sum_their_lines(store_path):
    res = SumLines.run(store=store_path, text=GOOD_TEXT)

    assert res.outcome == "all_over"
    assert res.as_tuple() == ("all_over", res.state)
    assert list(results(res.state, "flow1")) == [(0, 6), (1, 15), (2, 24)]
    assert attempts(store_path, res.run_id) == Counter(
        {("flow1", None): 1, ("flow1", 0): 1, ("flow1", 1): 1, ("flow1", 2): 1}
    )


def test_scenario_2_child_out_of_attempts_fails_the_run(store_path):
    res = SumLines.run(store=store_path, text=BAD_TEXT)

    assert res.outcome == "failed_over"
    assert res.task == ("flow1", 2)
    assert res.as_tuple() == ("failed_over", ("can_not_retry", ("flow1", 2), res.state))
    assert isinstance(res.error, ValueError)
    assert "'b'" in str(res.error)
    assert attempts(store_path, res.run_id) == Counter(
        {("flow1", None): 1, ("flow1", 0): 1, ("flow1", 1): 1, ("flow1", 2): 3}
    )


def test_scenario_3_entrance_skips_earlier_stages(store_path):
    returned = queue.SimpleQueue()
    with TwoStages.start_link(store=store_path, return_to=returned, text=BAD_TEXT) as server:
        assert TwoStages.whereis("seed-scenario-3") is server
        handle = TwoStages.start_flow("seed-scenario-3", entrance="flow2")
        res = handle.result(timeout=HANG_GUARD)

    assert returned.get(timeout=HANG_GUARD) is res
    assert res.outcome == "failed_over"
    assert res.as_tuple() == ("failed_over", ("can_not_retry", ("flow2", 2), res.state))
    assert attempts(store_path, res.run_id) == Counter(
        {("flow2", None): 1, ("flow2", 0): 1, ("flow2", 1): 1, ("flow2", 2): 3}
    )
    assert task_kinds(store_path, res.run_id, "flow1") == []


def test_scenario_4_tolerated_child_failure_ends_all_over(store_path):
    res = TolerantSumLines.run(store=store_path, text=BAD_TEXT)

    assert res.outcome == "all_over"
    assert res.as_tuple() == ("all_over", res.state)
    assert list(results(res.state, "flow1")) == [(0, 6), (1, 15)]
    assert attempts(store_path, res.run_id) == Counter(
        {("flow1", None): 1, ("flow1", 0): 1, ("flow1", 1): 1, ("flow1", 2): 3}
    )


def test_scenario_5_next_stage_runs_after_tolerated_failure(store_path):
    res = TolerantThenReport.run(store=store_path, text=BAD_TEXT)

    assert res.outcome == "all_over"
    assert list(results(res.state, "flow1")) == [(0, 6), (1, 15)]
    assert attempts(store_path, res.run_id) == Counter(
        {
            ("flow1", None): 1,
            ("flow1", 0): 1,
            ("flow1", 1): 1,
            ("flow1", 2): 3,
            ("flow2", None): 1,
        }
    )
    assert task_kinds(store_path, res.run_id, "flow2") == [
        "task_started",
        "task_over",
        "task_all_over",
    ]


@pytest.mark.parametrize("flow", [ChildlessWithChildFunc, ChildlessWithoutChildFunc])
def test_scenario_6_parent_without_children_ends_all_over(store_path, flow):
    with flow.start_link(store=store_path) as server, recording(server) as log:
        res = server.start_flow().result(timeout=HANG_GUARD)

    assert res.outcome == "all_over"
    assert list(results(res.state, "flow1")) == []
    assert log == [
        "start_flow",
        "task_start flow1",
        "task_over flow1",
        "task_all_over flow1",
        "all_over",
    ]


def test_scenario_7_timeouts_retry_the_parent_and_a_second_start_is_refused(store_path):
    plan = queue.SimpleQueue()
    for step in ("hang", "hang", "finish"):
        plan.put(step)
    timeout_errors = []

    def on_timeout(sender, **kwargs):
        timeout_errors.append(kwargs["error"])

    with (
        HangTwice.start_link(store=store_path, plan=plan) as server,
        recording(server) as log,
        signals.task_timeout.connected_to(on_timeout, sender=server),
    ):
        handle = HangTwice.start_flow("seed-scenario-7")
        with pytest.raises(FlowRunning) as refused:
            HangTwice.start_flow("seed-scenario-7")
        res = handle.result(timeout=HANG_GUARD)

    assert refused.value.run_id == handle.run_id
    assert isinstance(refused.value.start_time, datetime)
    assert refused.value.start_time == res.state["start_time"]
    assert res.outcome == "all_over"
    assert attempts(store_path, res.run_id) == Counter({("flow1", None): 3})
    assert [type(error) for error in timeout_errors] == [TaskTimeout, TaskTimeout]
    assert log == [
        "start_flow",
        "task_start flow1",
        "task_timeout flow1",
        "task_retry flow1",
        "task_start flow1",
        "task_timeout flow1",
        "task_retry flow1",
        "task_start flow1",
        "task_over flow1",
        "task_all_over flow1",
        "all_over",
    ]
