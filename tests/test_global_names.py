"""Global server names: one owner among the processes that share a store (API.md sections 1, 3).

The other process is a real one (``crash_child.py own``): it owns the name, answers the runs
this process asks of it, and is killed with SIGKILL to show that a dead owner's name is free.
"""

import socket
import threading
from collections import Counter

import pytest
from crash_child import Child
from replay_flows import GlobalTwoStages, GlobalWork

from threadflow import AlreadyStarted, EventStore, FlowDefinitionError, FlowRunning, results

GUARD = 30.0  # seconds; a hang guard for result(), never a synchronisation
NAME = ("global", "g")
BAD_TEXT = "1,2,3\n4,5,6\n7,8,b"
#: Seconds a handle gets to notice that its run's owner died; the owner's pid is checked at
#: once on this host, so one poll of the store is enough.
DEAD_OWNER_GUARD = 3.0


def owner(tmp_path, store_path, flow="GlobalWork", *entries):
    """A child process that owns the global name of ``flow`` on ``store_path``."""
    child = Child(tmp_path, "own", store_path, flow, *entries)
    try:
        child.expect("ready")
    except BaseException:
        child.kill()
        raise
    return child


def test_start_link_of_a_name_another_process_owns_raises_already_started(tmp_path, store_path):
    with owner(tmp_path, store_path) as other:
        refusal = rf"\('global', 'g'\) is already running by process {other.pid} on "
        with pytest.raises(AlreadyStarted, match=refusal) as caught:
            GlobalWork.start_link(store=store_path)

        assert caught.value.owner == f"process {other.pid} on {socket.gethostname()}"
        assert caught.value.server is None
        assert GlobalWork.whereis(NAME) is None


def test_start_flow_of_a_global_name_runs_in_the_owning_process(tmp_path, store_path):
    with owner(tmp_path, store_path) as other:
        handle = GlobalWork.start_flow(NAME, store=store_path)
        res = handle.result(timeout=GUARD)

        assert res.outcome == "all_over"
        assert res.run_id == handle.run_id
        assert set(res.state) == {"run_id", "store"}
        assert list(results(res.state, "work")) == [(i, i * i) for i in range(5)]
        [started] = EventStore(store_path).events(res.run_id, "flow_started")
        assert started.data["pid"] == other.pid
        assert EventStore(store_path).run(res.run_id).pid == other.pid


def test_start_flow_of_a_global_name_raises_flow_running_while_its_owner_is_busy(
    tmp_path, store_path
):
    with owner(tmp_path, store_path) as other:
        busy = GlobalWork.start_flow(NAME, entrance="slow", store=store_path)

        with pytest.raises(FlowRunning) as caught:
            GlobalWork.start_flow(NAME, store=store_path)
        assert caught.value.run_id == busy.run_id

        other.send("release")
        assert busy.result(timeout=GUARD).outcome == "all_over"
        again = GlobalWork.start_flow(NAME, store=store_path).result(timeout=GUARD)
        assert again.outcome == "all_over"
    assert [run.run_id for run in EventStore(store_path).runs()] == [busy.run_id, again.run_id]


def test_start_flow_of_a_global_name_with_an_unknown_entrance_raises_definition_error(
    tmp_path, store_path
):
    with owner(tmp_path, store_path):
        with pytest.raises(FlowDefinitionError, match="'GlobalWork'.*'nope'"):
            GlobalWork.start_flow(NAME, entrance="nope", store=store_path)

    assert EventStore(store_path).runs() == []


def test_a_remote_handle_ends_interrupted_when_the_owner_dies(tmp_path, store_path):
    with owner(tmp_path, store_path) as other:
        orphan = GlobalWork.start_flow(NAME, entrance="slow", store=store_path)
        other.kill()
    assert EventStore(store_path).run(orphan.run_id).status == "interrupted"

    res = orphan.result(timeout=DEAD_OWNER_GUARD)

    assert (res.outcome, res.run_id) == ("interrupted", orphan.run_id)
    assert orphan.done()


def test_the_name_of_a_killed_owner_is_taken_over_and_its_run_replayed(tmp_path, store_path):
    with owner(tmp_path, store_path) as other:
        orphan = GlobalWork.start_flow(NAME, entrance="slow", store=store_path)
        with pytest.raises(AlreadyStarted, match=f"by process {other.pid} ") as caught:
            GlobalWork.start_link(store=store_path)
        assert caught.value.owner == f"process {other.pid} on {socket.gethostname()}"
        other.kill()
    assert EventStore(store_path).run(orphan.run_id).status == "interrupted"

    opened = threading.Event()
    opened.set()
    with GlobalWork.start_link(store=store_path, gate=opened) as server:
        assert GlobalWork.whereis(NAME) is server
        replayed = server.replay(orphan.run_id).result(timeout=GUARD)
        fresh = GlobalWork.start_flow(NAME).result(timeout=GUARD)

    assert replayed.outcome == "all_over"
    assert orphan.result(timeout=GUARD).outcome == "all_over"
    assert fresh.outcome == "all_over"


def test_a_name_released_by_a_stopped_owner_can_be_started_here(tmp_path, store_path):
    with owner(tmp_path, store_path) as other:
        other.close_stdin()  # the owner stops its server and exits
        assert other.wait() == 0

    with GlobalWork.start_link(store=store_path) as server:
        assert GlobalWork.whereis(NAME) is server


def test_a_global_name_twice_in_one_process_raises_already_started(store_path):
    with GlobalWork.start_link(store=store_path) as server:
        with pytest.raises(AlreadyStarted, match="already running in this process") as caught:
            GlobalWork.start_link(store=store_path)
        assert caught.value.server is server
        assert GlobalWork.whereis(NAME) is server


@pytest.mark.parametrize("where", ["this process", "another process"])
def test_seed_scenario_3_global_name_entrance_flow2_never_runs_flow1(tmp_path, store_path, where):
    name = ("global", "seed-scenario-3")
    if where == "this process":
        with GlobalTwoStages.start_link(store=store_path, text=BAD_TEXT) as server:
            assert GlobalTwoStages.whereis(name) is server
            res = GlobalTwoStages.start_flow(name, entrance="flow2").result(timeout=GUARD)
    else:
        with owner(tmp_path, store_path, "GlobalTwoStages", f"text={BAD_TEXT}"):
            handle = GlobalTwoStages.start_flow(name, entrance="flow2", store=store_path)
            res = handle.result(timeout=GUARD)

    assert res.outcome == "failed_over"
    assert res.as_tuple() == ("failed_over", ("can_not_retry", ("flow2", 2), res.state))
    assert "'b'" in str(res.error)
    events = EventStore(store_path).events(res.run_id)
    attempts = Counter((e.task, e.child_id) for e in events if e.kind == "task_started")
    assert attempts == Counter(
        {("flow2", None): 1, ("flow2", 0): 1, ("flow2", 1): 1, ("flow2", 2): 3}
    )
    assert [e for e in events if e.task == "flow1"] == []
