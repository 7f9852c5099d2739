"""Cancelling one run without stopping its server: from its handle, from the server, from
another process through the store (``threadflow cancel``)."""

import queue

import pytest
import subprocess_tasks as sub_tasks
from click.testing import CliRunner
from crash_child import Child
from helpers import wait_until
from replay_flows import GlobalWork

import threadflow
from threadflow import ALL_OVER, EventStore, Flow, add_children_tasks, task
from threadflow.cli import EXIT_ERROR, cli

GUARD = 30.0


def add_children(state):
    add_children_tasks(((i, None) for i in range(state["children"])), state)


def wait_for_cancel(child, state):
    """Say it runs, then wait on the token (a cooperative task); a replay finishes at once."""
    if state["replayed"]:
        return child[0]
    state["running"].put(child[0])
    try:
        threadflow.current_token().wait(GUARD)
    except threadflow.CancelledError as exc:
        state["cancelled"].put((child[0], exc.reason))
        raise
    return "not cancelled"


class Waits(Flow):
    split = task(
        task_func=add_children,
        child_task_func=wait_for_cancel,
        max_concurrency=3,
        task_retry_limit=1,
        next=ALL_OVER,
    )


def entries():
    return {"running": queue.SimpleQueue(), "cancelled": queue.SimpleQueue()}


def test_handle_cancel_ends_the_run_cancelled_and_the_server_goes_on(store_path):
    state = entries()
    with Waits.start_link(store=store_path, **state) as server:
        handle = server.start_flow(children=10)
        for _ in range(3):
            state["running"].get(timeout=GUARD)
        handle.cancel("the user closed the window")
        res = handle.result(timeout=GUARD)
        # The same server runs the next run: cancelling did not stop it.
        after = server.start_flow(children=0).result(timeout=GUARD)

    assert res.outcome == "cancelled"
    assert after.outcome == "all_over"
    cancelled = sorted(state["cancelled"].get(timeout=GUARD) for _ in range(3))
    assert [reason for _, reason in cancelled] == ["cancelled"] * 3
    [end] = EventStore(store_path).events(res.run_id, "cancelled")
    assert end.data["reason"] == "the user closed the window"
    info = EventStore(store_path).run(res.run_id)
    assert (info.outcome, info.status) == ("cancelled", "cancelled")
    assert not EventStore(store_path).events(res.run_id, "task_over")[1:]  # no child finished


def test_a_cancelled_run_can_be_replayed_to_its_end(store_path):
    state = entries()
    with Waits.start_link(store=store_path, **state) as server:
        handle = server.start_flow(children=5)
        state["running"].get(timeout=GUARD)
        server.cancel(handle.run_id)
        assert handle.result(timeout=GUARD).outcome == "cancelled"
    res = Waits.replay(handle.run_id, store=store_path, **entries())
    assert res.outcome == "all_over"
    assert sorted(dict(threadflow.results(res.state, "split"))) == list(range(5))


def test_cancel_after_the_end_keeps_the_result(store_path):
    with Waits.start_link(store=store_path, **entries()) as server:
        handle = server.start_flow(children=0)
        assert handle.result(timeout=GUARD).outcome == "all_over"
        handle.cancel()
        assert handle.result(timeout=GUARD).outcome == "all_over"
    assert not EventStore(store_path).events(handle.run_id, "cancelled")


class HangsInAProcess(Flow):
    work = task(task_func=sub_tasks.hang_first, isolation="subprocess", next=ALL_OVER)


def test_cancel_kills_the_process_of_a_subprocess_attempt(store_path, tmp_path):
    with HangsInAProcess.start_link(store=store_path, dir=str(tmp_path)) as server:
        handle = server.start_flow()
        assert wait_until(lambda: (tmp_path / "hang-1.pid").exists(), GUARD)
        handle.cancel()
        assert handle.result(timeout=GUARD).outcome == "cancelled"
        # The kill is recorded once the process is gone (stale, with how it ended).
        assert wait_until(lambda: EventStore(store_path).events(handle.run_id, "stale"), GUARD)
    [stale] = EventStore(store_path).events(handle.run_id, "stale")
    assert stale.data["process"]["killed"] == "cancelled"


def test_threadflow_cancel_ends_a_run_of_another_process(tmp_path, store_path):
    with Child(tmp_path, "own", store_path, "GlobalWork") as other:
        other.expect("ready")
        handle = GlobalWork.start_flow(("global", "g"), store=store_path, entrance="slow")
        assert wait_until(lambda: EventStore(store_path).status(handle.run_id) == "running")
        assert wait_until(
            lambda: EventStore(store_path).events(handle.run_id, "task_started"), GUARD
        )
        result = CliRunner().invoke(cli, ["cancel", handle.run_id[:6], "--db", store_path])
        assert result.exit_code == 0, result.output
        assert result.output.strip() == f"run {handle.run_id}: cancelled"
        assert handle.result(timeout=GUARD).outcome == "cancelled"


def test_a_remote_handle_cancels_through_the_store(tmp_path, store_path):
    with Child(tmp_path, "own", store_path, "GlobalWork") as other:
        other.expect("ready")
        handle = GlobalWork.start_flow(("global", "g"), store=store_path, entrance="slow")
        assert wait_until(
            lambda: EventStore(store_path).events(handle.run_id, "task_started"), GUARD
        )
        handle.cancel()
        assert handle.result(timeout=GUARD).outcome == "cancelled"


def test_threadflow_cancel_of_a_run_that_is_not_running_says_so(store_path):
    res = Waits.run(store=store_path, inputs={"children": 0}, **entries())
    result = CliRunner().invoke(cli, ["cancel", res.run_id, "--db", store_path])
    assert result.exit_code == EXIT_ERROR
    assert f"run {res.run_id} is not running (all_over)" in result.output


def test_server_cancel_of_an_unknown_run_raises(store_path):
    with Waits.start_link(store=store_path, **entries()) as server:
        with pytest.raises(threadflow.ThreadflowError, match="there is no run 'nope'"):
            server.cancel("nope")
