"""Starting, running, stopping and naming servers; what a run hands back."""

import datetime
import queue
import re
import threading
import types

import pytest
from helpers import wait_until

import threadflow
from threadflow import (
    ALL_OVER,
    AlreadyStarted,
    EventStore,
    Flow,
    FlowDefinitionError,
    FlowRunning,
    RunHandle,
    RunResult,
    add_children_tasks,
    signals,
    task,
)

HANG_GUARD = 30

# --- task functions (module level, as the engine requires) -----------------------------------


def record_run(state):
    state["seen"].append(state["run_id"])
    return "ok"


def wait_at_gate(state):
    """Signal that the run is in progress, then wait for the test (ignoring the token)."""
    state["entered"].set()
    if not state["gate"].wait(HANG_GUARD):
        raise RuntimeError("the test never opened the gate")
    return "passed"


def run_first(state):
    state["calls"].append("first")


def run_second(state):
    state["calls"].append("second")


def add_two_children(state):
    add_children_tasks([(0, "a"), (1, "b")], state)


def child_waits_for_cancel(child, state):
    child_id, _ = child
    state["running"].release()
    try:
        threadflow.current_token().wait(HANG_GUARD)
    except threadflow.CancelledError:
        state["cancelled"].append(child_id)
        raise
    finally:
        state["ended"].release()
    return "not cancelled"


def stuck_until_released(state):
    """Ignore the token: wait for the test to open the gate, then say so."""
    state["entered"].set()
    try:
        state["gate"].wait(HANG_GUARD)
    finally:
        state["left"].set()


def fail_at_once(state):
    raise ValueError("broken on purpose")


def inspect_state(state):
    seen = state["seen"]
    seen["is_proxy"] = isinstance(state, types.MappingProxyType)
    seen["keys"] = set(state)
    seen["color"] = state["color"]
    seen["run_id"] = state["run_id"]
    try:
        state["color"] = "red"
    except TypeError:
        seen["read_only"] = True
    return "ok"


# --- flows ------------------------------------------------------------------------------------


class Simple(Flow, server_name="running-simple"):
    work = task(task_func=record_run, next=ALL_OVER)


class Gate(Flow, server_name="running-gate"):
    work = task(task_func=wait_at_gate, next=ALL_OVER)

    def handle_start_flow(self, state):
        state["starts"].append(state["run_id"])


class TwoStages(Flow, server_name="running-two-stages"):
    default_entrance = "first"
    first = task(task_func=run_first, next="second")
    second = task(task_func=run_second, next=ALL_OVER)


class Interruptible(Flow, server_name="running-interruptible"):
    work = task(
        task_func=add_two_children,
        child_task_func=child_waits_for_cancel,
        max_concurrency=2,
        next=ALL_OVER,
    )


class Stuck(Flow, server_name="running-stuck"):
    work = task(task_func=stuck_until_released, next=ALL_OVER)


class Failing(Flow, server_name="running-failing"):
    work = task(task_func=fail_at_once, task_retry_limit=1, next=ALL_OVER)


class StateInspector(Flow, server_name="running-state-inspector"):
    work = task(task_func=inspect_state, next=ALL_OVER)


# --- helpers ----------------------------------------------------------------------------------


def sorted_events(store_path, run_id):
    return sorted(EventStore(store_path).events(run_id), key=lambda e: e.seq)


def kinds(store_path, run_id):
    return [e.kind for e in sorted_events(store_path, run_id)]


# --- start_link, start_flow, handles ----------------------------------------------------------


@pytest.mark.parametrize("how", ["by-name", "by-server-object", "server-method"])
def test_start_flow_returns_a_handle_to_the_run_result(store_path, how):
    seen = []
    with Simple.start_link(store=store_path, seen=seen) as server:
        if how == "by-name":
            handle = Simple.start_flow("running-simple")
        elif how == "by-server-object":
            handle = Simple.start_flow(server)
        else:
            handle = server.start_flow()
        res = handle.result(timeout=HANG_GUARD)
        assert handle.done()

    assert isinstance(handle, RunHandle)
    assert isinstance(res, RunResult)
    assert res.outcome == "all_over"
    assert res.run_id == handle.run_id
    assert res.task is None
    assert res.error is None
    assert res.failed == []
    assert seen == [handle.run_id]


def test_handle_is_not_done_while_the_run_is_in_progress(store_path):
    gate, entered = threading.Event(), threading.Event()
    try:
        with Gate.start_link(store=store_path, gate=gate, entered=entered, starts=[]) as server:
            handle = server.start_flow()
            assert entered.wait(10)
            assert not handle.done()
            with pytest.raises(TimeoutError):
                handle.result(timeout=0.05)
            gate.set()
            res = handle.result(timeout=HANG_GUARD)
            assert handle.done()
    finally:
        gate.set()

    assert res.outcome == "all_over"


def test_run_starts_waits_and_stops_the_server(store_path):
    seen, returned = [], queue.Queue()
    res = Simple.run(store=store_path, return_to=returned, seen=seen)

    assert res.outcome == "all_over"
    assert seen == [res.run_id]
    assert returned.get(timeout=10).run_id == res.run_id
    assert Simple.whereis("running-simple") is None


def test_return_to_queue_receives_the_result_of_every_run(store_path):
    returned = queue.Queue()
    with Simple.start_link(store=store_path, return_to=returned, seen=[]) as server:
        first = server.start_flow().result(timeout=HANG_GUARD)
        second = server.start_flow().result(timeout=HANG_GUARD)

    got = [returned.get(timeout=10), returned.get(timeout=10)]
    assert [r.run_id for r in got] == [first.run_id, second.run_id]
    assert [r.outcome for r in got] == ["all_over", "all_over"]
    assert returned.empty()


def test_return_to_callable_receives_the_run_result(store_path):
    got, arrived = [], threading.Event()

    def receive(result):
        got.append(result)
        arrived.set()

    with Failing.start_link(store=store_path, return_to=receive) as server:
        res = server.start_flow().result(timeout=HANG_GUARD)
        assert arrived.wait(10)

    assert [(r.run_id, r.outcome) for r in got] == [(res.run_id, "failed_over")]
    assert got[0].task == ("work",)


# --- one run at a time, names -----------------------------------------------------------------


def test_start_flow_while_running_raises_flow_running_and_fires_no_callback(store_path):
    gate, entered = threading.Event(), threading.Event()
    signalled = []

    def on_start(sender, **kwargs):
        signalled.append(kwargs["run_id"])

    try:
        with Gate.start_link(store=store_path, gate=gate, entered=entered, starts=[]) as server:
            with signals.start_flow.connected_to(on_start, sender=server):
                handle = server.start_flow()
                assert entered.wait(10)
                with pytest.raises(FlowRunning, match=re.escape(handle.run_id)) as by_name:
                    Gate.start_flow("running-gate")
                with pytest.raises(FlowRunning, match=re.escape(handle.run_id)) as by_method:
                    server.start_flow()
                gate.set()
                res = handle.result(timeout=HANG_GUARD)
    finally:
        gate.set()

    assert res.outcome == "all_over"
    for refused in (by_name.value, by_method.value):
        assert isinstance(refused, threadflow.ThreadflowError)
        assert refused.run_id == handle.run_id
        assert refused.start_time == res.state["start_time"]
    assert res.state["starts"] == [handle.run_id]
    assert signalled == [handle.run_id]
    assert [r.run_id for r in EventStore(store_path).runs()] == [handle.run_id]


def test_second_start_link_with_the_same_name_raises_already_started(store_path, tmp_path):
    with Simple.start_link(store=store_path, seen=[]) as server:
        with pytest.raises(AlreadyStarted, match="running-simple"):
            Simple.start_link(store=str(tmp_path / "other.db"), seen=[])
        assert Simple.whereis("running-simple") is server
        res = server.start_flow().result(timeout=HANG_GUARD)

    assert res.outcome == "all_over"


def test_whereis_returns_the_server_until_it_stops(store_path):
    server = Simple.start_link(store=store_path, seen=[])
    try:
        assert Simple.whereis("running-simple") is server
        assert Simple.whereis("running-no-such-server") is None
    finally:
        server.stop()

    assert Simple.whereis("running-simple") is None


def test_context_manager_stops_the_server(store_path):
    with Simple.start_link(store=store_path, seen=[]) as server:
        assert isinstance(server, Simple)
        assert Simple.whereis("running-simple") is server

    assert Simple.whereis("running-simple") is None
    # The name is free again.
    with Simple.start_link(store=store_path, seen=[]) as again:
        assert Simple.whereis("running-simple") is again


def test_server_runs_again_after_a_run_ends(store_path):
    seen = []
    with Simple.start_link(store=store_path, seen=seen) as server:
        first = server.start_flow().result(timeout=HANG_GUARD)
        second = server.start_flow().result(timeout=HANG_GUARD)

    assert (first.outcome, second.outcome) == ("all_over", "all_over")
    assert first.run_id != second.run_id
    assert seen == [first.run_id, second.run_id]
    assert first.state is not second.state
    assert {r.run_id for r in EventStore(store_path).runs()} == {first.run_id, second.run_id}


# --- entrance ---------------------------------------------------------------------------------


def test_default_entrance_runs_every_stage(store_path):
    calls = []
    with TwoStages.start_link(store=store_path, calls=calls) as server:
        res = server.start_flow().result(timeout=HANG_GUARD)

    assert res.outcome == "all_over"
    assert calls == ["first", "second"]


@pytest.mark.parametrize("how", ["class-method", "server-method"])
def test_entrance_override_runs_only_the_later_stage(store_path, how):
    calls = []
    with TwoStages.start_link(store=store_path, calls=calls) as server:
        if how == "class-method":
            handle = TwoStages.start_flow("running-two-stages", entrance="second")
        else:
            handle = server.start_flow(entrance="second")
        res = handle.result(timeout=HANG_GUARD)

    assert res.outcome == "all_over"
    assert calls == ["second"]
    events = sorted_events(store_path, res.run_id)
    assert [e.task for e in events if e.kind == "task_started"] == ["second"]
    (started,) = [e for e in events if e.kind == "flow_started"]
    assert started.data["entrance"] == "second"


def test_run_accepts_an_entrance(store_path):
    calls = []
    res = TwoStages.run(store=store_path, entrance="second", calls=calls)

    assert res.outcome == "all_over"
    assert calls == ["second"]


def test_unknown_entrance_raises_and_starts_nothing(store_path):
    calls = []
    with TwoStages.start_link(store=store_path, calls=calls) as server:
        with pytest.raises(FlowDefinitionError, match="nosuch"):
            server.start_flow(entrance="nosuch")
        assert EventStore(store_path).runs() == []
        res = server.start_flow().result(timeout=HANG_GUARD)

    assert res.outcome == "all_over"
    assert calls == ["first", "second"]


# --- stop -------------------------------------------------------------------------------------


def test_stop_during_a_run_cancels_its_attempts_and_interrupts_it(store_path):
    running, ended = threading.Semaphore(0), threading.Semaphore(0)
    cancelled, returned = [], queue.Queue()
    server = Interruptible.start_link(
        store=store_path,
        return_to=returned,
        running=running,
        ended=ended,
        cancelled=cancelled,
    )
    try:
        handle = server.start_flow()
        assert running.acquire(timeout=10) and running.acquire(timeout=10)
    finally:
        server.stop()

    res = handle.result(timeout=10)
    assert res.outcome == "interrupted"
    assert res.run_id == handle.run_id
    assert res.as_tuple() == ("interrupted", res.state)
    assert returned.get(timeout=10).outcome == "interrupted"
    assert ended.acquire(timeout=10) and ended.acquire(timeout=10)
    assert sorted(cancelled) == [0, 1]
    recorded = kinds(store_path, res.run_id)
    assert recorded.count("interrupted") == 1
    assert "failed_over" not in recorded
    assert "all_over" not in recorded
    (info,) = EventStore(store_path).runs()
    assert (info.run_id, info.outcome) == (res.run_id, "interrupted")


def test_stop_is_idempotent(store_path):
    with Simple.start_link(store=store_path, seen=[]) as server:
        res = server.start_flow().result(timeout=HANG_GUARD)
        server.stop()
        server.stop(timeout=1)
    server.stop()

    assert res.outcome == "all_over"
    assert Simple.whereis("running-simple") is None


def stop_in_a_thread(server, timeout):
    """Call ``server.stop(timeout)`` in a test thread; True if it returned within a hang guard."""
    errors = []

    def stop_server():
        try:
            server.stop(timeout=timeout)
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    stopper = threading.Thread(target=stop_server, name="test-stopper", daemon=True)
    stopper.start()
    stopper.join(10)
    assert errors == []
    return not stopper.is_alive()


def test_stop_returns_within_its_timeout_when_a_task_ignores_its_token(store_path):
    gate, entered, left = threading.Event(), threading.Event(), threading.Event()
    server = Stuck.start_link(store=store_path, gate=gate, entered=entered, left=left)
    try:
        handle = server.start_flow()
        assert entered.wait(10)
        assert stop_in_a_thread(server, 0.3), "stop(timeout=0.3) waited for the stuck thread"
        res = handle.result(timeout=10)
        assert not left.is_set()
    finally:
        gate.set()
        server.stop()

    assert res.outcome == "interrupted"
    events = sorted_events(store_path, res.run_id)
    assert [(e.task, e.child_id, e.attempt) for e in events if e.kind == "abandoned"] == [
        ("work", None, 1)
    ]
    assert left.wait(10)


def test_abandoned_count_drops_once_a_thread_left_by_stop_returns(store_path):
    gate, entered, left = threading.Event(), threading.Event(), threading.Event()
    server = Stuck.start_link(store=store_path, gate=gate, entered=entered, left=left)
    try:
        server.start_flow()
        assert entered.wait(10)
        assert stop_in_a_thread(server, 0.3)
        assert server.abandoned == 1
        gate.set()
        assert left.wait(10)
        assert wait_until(lambda: server.abandoned == 0), (
            f"server.abandoned is still {server.abandoned} after the abandoned thread returned"
        )
    finally:
        gate.set()
        server.stop()


# --- state and results ------------------------------------------------------------------------


def test_extra_state_entries_appear_in_state(store_path):
    seen = {}
    with StateInspector.start_link(store=store_path, seen=seen, color="blue") as server:
        res = server.start_flow().result(timeout=HANG_GUARD)

    assert res.outcome == "all_over"
    assert seen["color"] == "blue"
    assert seen["run_id"] == res.run_id
    assert seen["is_proxy"] is True
    assert seen["read_only"] is True
    assert {"start_time", "run_id", "store", "task_flow", "color", "seen"} <= seen["keys"]
    assert res.state["color"] == "blue"
    assert res.state["run_id"] == res.run_id
    assert isinstance(res.state["store"], EventStore)
    start_time = res.state["start_time"]
    assert isinstance(start_time, datetime.datetime)
    assert start_time.utcoffset() == datetime.timedelta(0)


def test_run_result_as_tuple_has_the_seed_shapes(store_path):
    with Simple.start_link(store=store_path, seen=[]) as server:
        ok = server.start_flow().result(timeout=HANG_GUARD)
    with Failing.start_link(store=store_path) as server:
        failed = server.start_flow().result(timeout=HANG_GUARD)

    assert ok.as_tuple() == ("all_over", ok.state)
    assert ok.as_tuple()[1] is ok.state
    assert failed.outcome == "failed_over"
    assert failed.as_tuple() == ("failed_over", ("can_not_retry", ("work",), failed.state))
    assert isinstance(failed.error, ValueError)
    assert str(failed.error) == "broken on purpose"


def test_event_store_runs_lists_the_runs_with_their_outcomes(store_path):
    with Simple.start_link(store=store_path, seen=[]) as server:
        ok = server.start_flow().result(timeout=HANG_GUARD)
    with Failing.start_link(store=store_path) as server:
        failed = server.start_flow().result(timeout=HANG_GUARD)

    runs = {r.run_id: r for r in EventStore(store_path).runs()}
    assert {run_id: (r.server, r.outcome) for run_id, r in runs.items()} == {
        ok.run_id: ("running-simple", "all_over"),
        failed.run_id: ("running-failing", "failed_over"),
    }
    for info in runs.values():
        assert info.started is not None
        assert info.ended is not None
