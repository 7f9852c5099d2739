"""start_link(resume=True): an app that crashed or was stopped picks up its interrupted runs
at start-up, oldest first, before any new run."""

import queue

import pytest
from crash_child import Child
from replay_flows import CRASH_MARK, CrashFlow

import threadflow
from threadflow import ALL_OVER, EventStore, Flow, FlowRunning, add_children_tasks, task

GUARD = 30.0


def add_three(state):
    add_children_tasks([(0, None), (1, None), (2, None)], state)


def child(child, state):
    """In a first segment, child 1 waits until the test stops the server."""
    if child[0] == 1 and not state["replayed"] and state.get("hold"):
        state["held"].put(state["run_id"])
        threadflow.current_token().wait(GUARD)
        threadflow.current_token().raise_if_cancelled()
    if child[0] == 2 and state.get("fail"):
        raise ValueError("child 2 fails")
    return child[0]


class Photos(Flow):
    stop_grace = 2.0
    scan = task(
        task_func=add_three,
        child_task_func=child,
        max_concurrency=1,
        task_retry_limit=1,
        next=ALL_OVER,
    )


class Other(Flow):
    scan = task(task_func=add_three, child_task_func=child, next=ALL_OVER)


def interrupted_run(store_path):
    held = queue.SimpleQueue()
    server = Photos.start_link(store=store_path, held=held)
    handle = server.start_flow(hold=True)
    held.get(timeout=GUARD)
    server.stop()
    assert handle.result(timeout=GUARD).outcome == "interrupted"
    return handle.run_id


def test_resume_replays_the_interrupted_runs_oldest_first_before_new_ones(store_path):
    first, second = interrupted_run(store_path), interrupted_run(store_path)
    failed = Photos.run(store=store_path, inputs={"fail": True}, held=queue.SimpleQueue())
    done = Photos.run(store=store_path, held=queue.SimpleQueue())
    assert (failed.outcome, done.outcome) == ("failed_over", "all_over")

    with Photos.start_link(store=store_path, resume=True, held=queue.SimpleQueue()) as server:
        assert [h.run_id for h in server.resumed] == [first, second]
        with pytest.raises(FlowRunning):  # the interrupted runs go first
            server.start_flow()
        results = [h.result(timeout=GUARD) for h in server.resumed]
        new = server.start_flow().result(timeout=GUARD)

    assert [r.outcome for r in results] == ["all_over", "all_over"]
    assert new.outcome == "all_over"
    for run_id in (first, second):
        info = EventStore(store_path).run(run_id)
        assert (info.status, info.history.segments) == ("all_over", 2)
    # A failed run waits for a fix and a deliberate replay; it is not resumed.
    assert EventStore(store_path).run(failed.run_id).status == "failed_over"


def test_resume_takes_the_run_of_a_crashed_process(tmp_path, store_path):
    children = str(CRASH_MARK + 100)
    with Child(tmp_path, "crash", store_path, "children", children, str(tmp_path / "j"), "0") as c:
        c.expect("marker")
        c.kill()
    [info] = EventStore(store_path).runs()
    assert info.status == "interrupted"
    journal = str(tmp_path / "j")
    with CrashFlow.start_link(
        store=store_path, resume=True, children=int(children), journal=journal
    ) as server:
        [handle] = server.resumed
        assert handle.run_id == info.run_id
        assert handle.result(timeout=GUARD).outcome == "all_over"


def test_resume_only_takes_its_own_flows_runs(store_path):
    interrupted_run(store_path)
    with Other.start_link(store=store_path, resume=True, held=queue.SimpleQueue()) as server:
        assert server.resumed == []
        assert server.start_flow().result(timeout=GUARD).outcome == "all_over"


def test_without_resume_nothing_is_replayed(store_path):
    run_id = interrupted_run(store_path)
    with Photos.start_link(store=store_path, held=queue.SimpleQueue()) as server:
        assert server.resumed == []
        server.start_flow().result(timeout=GUARD)
    assert EventStore(store_path).run(run_id).status == "interrupted"
