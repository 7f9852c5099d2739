"""Values between stages: threadflow.output(state, "stage") is what that stage's task_func
returned, read from the log, so a replay sees it too."""

import pytest

import threadflow
from threadflow import ALL_OVER, Flow, add_children_tasks, task


def plan(state):
    add_children_tasks([(0, None), (1, None)], state)
    return {"batch": "2026-12-02", "pages": 2}


def fetch(child, state):
    # A child reads its own stage's output: its parent has returned before children run.
    return f"{threadflow.output(state, 'plan')['batch']}/{child[0]}"


def report(state):
    if state["fail_report"] and not state["replayed"]:
        raise ValueError("report broken on purpose")
    summary = threadflow.output(state, "plan")
    return {"pages": summary["pages"], "done": [r for _, r in threadflow.results(state, "plan")]}


def read_too_early(state):
    return threadflow.output(state, "report")


class Batch(Flow):
    plan = task(task_func=plan, child_task_func=fetch, next="report")
    report = task(task_func=report, task_retry_limit=1, next=ALL_OVER)


class TooEarly(Flow):
    first = task(task_func=read_too_early, task_retry_limit=1, next="report")
    report = task(task_func=report, next=ALL_OVER)


def test_a_later_stage_reads_what_an_earlier_one_returned(store_path):
    res = Batch.run(store=store_path, fail_report=False)
    assert res.outcome == "all_over"
    assert threadflow.output(res.state, "report") == {
        "pages": 2,
        "done": ["2026-12-02/0", "2026-12-02/1"],
    }


def test_output_survives_a_replay(store_path):
    failed = Batch.run(store=store_path, fail_report=True)
    assert (failed.outcome, failed.task) == ("failed_over", ("report",))
    # The replay does not run plan again: report reads plan's output from the log.
    res = Batch.replay(failed.run_id, store=store_path, fail_report=True)
    assert res.outcome == "all_over"
    assert threadflow.output(res.state, "report")["pages"] == 2
    overs = threadflow.EventStore(store_path).events(res.run_id, "task_over")
    assert [e.task for e in overs if e.child_id is None].count("plan") == 1


def test_output_of_a_stage_that_has_not_returned_is_a_clear_error(store_path):
    res = TooEarly.run(store=store_path, fail_report=False)
    assert res.outcome == "failed_over"
    assert isinstance(res.error, ValueError)
    assert "task 'report' has not returned in run" in str(res.error)


def test_output_of_an_unknown_task_names_the_tasks(store_path):
    res = Batch.run(store=store_path, fail_report=False)
    names = r"has no task 'plann'; its tasks are \['plan', 'report'\]"
    with pytest.raises(ValueError, match=names):
        threadflow.output(res.state, "plann")
