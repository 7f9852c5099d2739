"""Timeouts, cooperative cancellation and abandoned threads."""

import datetime
import threading

import freezegun
import pytest
from helpers import wait_until

import threadflow
from threadflow import (
    ALL_OVER,
    CancelledError,
    EventStore,
    Flow,
    TaskTimeout,
    add_children_tasks,
    results,
    signals,
    task,
)

HANG_GUARD = 30

# --- task functions (module level, as the engine requires) -----------------------------------


def hang_then_return(state):
    """Wait on the attempt's token in the first ``state["hangs"]`` attempts, then return."""
    calls = state["calls"]
    calls.append("work")
    if len(calls) <= state["hangs"]:
        threadflow.current_token().wait(HANG_GUARD)
        return "not cancelled"
    return "done"


def add_two_children(state):
    add_children_tasks([(0, "a"), (1, "b")], state)


def child_hangs_by_plan(child, state):
    """Child ``i`` waits on its token in its first ``state["hangs"][i]`` attempts."""
    child_id, payload = child
    calls = state["child_calls"][child_id]
    calls.append(payload)
    if len(calls) <= state["hangs"][child_id]:
        threadflow.current_token().wait(HANG_GUARD)
        return "not cancelled"
    return payload


def stuck_first_then_return(state):
    """The first attempt ignores its token and waits for the test to release it."""
    calls = state["calls"]
    calls.append("work")
    if len(calls) == 1:
        state["release"].wait(HANG_GUARD)
        state["late_returned"].set()
        return "late"
    return "fresh"


def child_stuck_first(child, state):
    """Child 0's first attempt ignores its token and waits for the test to release it."""
    child_id, payload = child
    calls = state["child_calls"][child_id]
    calls.append(payload)
    if child_id == 0 and len(calls) == 1:
        state["release"].wait(HANG_GUARD)
        state["late_returned"].set()
        return "late"
    return f"{payload} fresh"


def hold_until_told(state):
    """Second stage: keeps the run alive until the test says so."""
    state["holding"].set()
    if not state["proceed"].wait(HANG_GUARD):
        raise RuntimeError("the test never let the run proceed")


def wait_for_cancel(state):
    """First attempt: wait the way ``state["how"]`` says and report what cancellation did."""
    calls = state["calls"]
    calls.append("work")
    if len(calls) > 1:
        return "done"
    report = state["report"]
    token = threadflow.current_token()
    report["cancelled_before"] = token.cancelled
    try:
        if state["how"] == "sleep":
            threadflow.sleep(HANG_GUARD)
        else:
            token.wait(HANG_GUARD)
    except CancelledError as exc:
        report["error"] = exc
        report["cancelled_after"] = token.cancelled
        try:
            token.raise_if_cancelled()
        except CancelledError:
            report["raise_if_cancelled"] = True
        raise
    finally:
        state["finished"].set()
    return "not cancelled"


def sleep_inside_except_exception(state):
    """First attempt: a careless ``except Exception`` around a cancellable sleep."""
    calls = state["calls"]
    calls.append("work")
    if len(calls) > 1:
        return "done"
    try:
        try:
            threadflow.sleep(HANG_GUARD)
        except Exception as exc:  # the careless catch under test
            state["report"]["swallowed"] = exc
    finally:
        state["finished"].set()
    return "swallowed"


# --- flows ------------------------------------------------------------------------------------


class SlowParent(Flow, server_name="timeouts-slow-parent"):
    work = task(task_func=hang_then_return, task_timeout=0.2, task_retry_limit=3, next=ALL_OVER)


class SlowChild(Flow, server_name="timeouts-slow-child"):
    work = task(
        task_func=add_two_children,
        child_task_func=child_hangs_by_plan,
        task_timeout=0.2,
        task_retry_limit=2,
        next=ALL_OVER,
    )


class TolerantSlowChild(Flow, server_name="timeouts-tolerant-slow-child"):
    work = task(
        task_func=add_two_children,
        child_task_func=child_hangs_by_plan,
        task_timeout=0.2,
        task_retry_limit=2,
        exit_on_failed=False,
        next=ALL_OVER,
    )


class StuckParent(Flow, server_name="timeouts-stuck-parent"):
    abandon_grace = 0.1
    work = task(
        task_func=stuck_first_then_return, task_timeout=0.2, task_retry_limit=2, next=ALL_OVER
    )


class StuckChild(Flow, server_name="timeouts-stuck-child"):
    abandon_grace = 0.1
    work = task(
        task_func=add_two_children,
        child_task_func=child_stuck_first,
        max_concurrency=1,
        task_timeout=0.2,
        task_retry_limit=2,
        next="hold",
    )
    hold = task(task_func=hold_until_told, next=ALL_OVER)


class Cancelling(Flow, server_name="timeouts-cancelling"):
    work = task(task_func=wait_for_cancel, task_timeout=0.2, task_retry_limit=2, next=ALL_OVER)


class Careless(Flow, server_name="timeouts-careless"):
    work = task(
        task_func=sleep_inside_except_exception,
        task_timeout=0.2,
        task_retry_limit=2,
        next=ALL_OVER,
    )


# --- helpers ----------------------------------------------------------------------------------


def sorted_events(store_path, run_id):
    return sorted(EventStore(store_path).events(run_id), key=lambda e: e.seq)


def attempts(store_path, run_id, kind="task_started", child_id=None):
    return [
        e.attempt
        for e in sorted_events(store_path, run_id)
        if e.kind == kind and e.task == "work" and e.child_id == child_id
    ]


def where(store_path, run_id, kind):
    """``(task, child_id, attempt)`` of every event of ``kind``."""
    return [
        (e.task, e.child_id, e.attempt) for e in sorted_events(store_path, run_id) if e.kind == kind
    ]


# --- timeouts and retries ---------------------------------------------------------------------


def test_parent_timing_out_twice_then_succeeding_ends_all_over(store_path):
    timeouts = []

    def on_timeout(sender, **kwargs):
        error = kwargs["error"]
        timeouts.append((kwargs["task"], kwargs["attempt"], type(error).__name__))

    calls = []
    with SlowParent.start_link(store=store_path, calls=calls, hangs=2) as server:
        with signals.task_timeout.connected_to(on_timeout, sender=server):
            res = server.start_flow().result(timeout=HANG_GUARD)

    assert res.outcome == "all_over"
    assert calls == ["work", "work", "work"]
    assert timeouts == [(("work",), 1, "TaskTimeout"), (("work",), 2, "TaskTimeout")]
    assert attempts(store_path, res.run_id) == [1, 2, 3]
    assert attempts(store_path, res.run_id, "timeout") == [1, 2]
    assert attempts(store_path, res.run_id, "task_over") == [3]
    timeout_events = [e for e in sorted_events(store_path, res.run_id) if e.kind == "timeout"]
    assert [e.data["timeout"] for e in timeout_events] == [0.2, 0.2]


def test_child_timeout_is_retried(store_path):
    child_calls = {0: [], 1: []}
    with SlowChild.start_link(
        store=store_path, child_calls=child_calls, hangs={0: 0, 1: 1}
    ) as server:
        res = server.start_flow().result(timeout=HANG_GUARD)

    assert res.outcome == "all_over"
    assert list(results(res.state, "work")) == [(0, "a"), (1, "b")]
    assert child_calls == {0: ["a"], 1: ["b", "b"]}
    assert where(store_path, res.run_id, "timeout") == [("work", 1, 1)]
    assert attempts(store_path, res.run_id, child_id=0) == [1]
    assert attempts(store_path, res.run_id, child_id=1) == [1, 2]


def test_timeout_on_last_attempt_is_tolerated_without_exit_on_failed(store_path):
    child_calls = {0: [], 1: []}
    with TolerantSlowChild.start_link(
        store=store_path, child_calls=child_calls, hangs={0: 0, 1: 99}
    ) as server:
        res = server.start_flow().result(timeout=HANG_GUARD)

    assert res.outcome == "all_over"
    assert res.failed == [("work", 1)]
    assert list(results(res.state, "work")) == [(0, "a")]
    assert child_calls == {0: ["a"], 1: ["b", "b"]}
    failed = [e for e in sorted_events(store_path, res.run_id) if e.kind == "task_failed"]
    assert [(e.child_id, e.data["tolerated"]) for e in failed] == [(1, True)]
    assert failed[0].data["error"]["type"].endswith("TaskTimeout")
    assert res.as_tuple() == ("all_over", res.state)


def test_timeout_on_last_attempt_fails_the_run_with_exit_on_failed(store_path):
    child_calls = {0: [], 1: []}
    with SlowChild.start_link(
        store=store_path, child_calls=child_calls, hangs={0: 0, 1: 99}
    ) as server:
        res = server.start_flow().result(timeout=HANG_GUARD)

    assert res.outcome == "failed_over"
    assert res.task == ("work", 1)
    assert isinstance(res.error, TaskTimeout)
    assert isinstance(res.error, TimeoutError)
    assert res.as_tuple() == ("failed_over", ("can_not_retry", ("work", 1), res.state))
    assert child_calls[1] == ["b", "b"]
    assert where(store_path, res.run_id, "timeout") == [("work", 1, 1), ("work", 1, 2)]


# --- abandoned threads ------------------------------------------------------------------------


def test_next_attempt_starts_without_waiting_for_a_thread_that_ignores_its_token(store_path):
    release = threading.Event()
    late_returned = threading.Event()
    calls = []
    try:
        with StuckParent.start_link(
            store=store_path, calls=calls, release=release, late_returned=late_returned
        ) as server:
            res = server.start_flow().result(timeout=10)
            # The run ended while the first attempt's thread is still stuck.
            assert not late_returned.is_set()
            assert res.outcome == "all_over"
            assert calls == ["work", "work"]
            assert attempts(store_path, res.run_id, "timeout") == [1]
            assert attempts(store_path, res.run_id, "task_over") == [2]
            release.set()
            assert late_returned.wait(10)
            assert wait_until(lambda: server.abandoned == 0)
    finally:
        release.set()


def test_abandoned_thread_is_counted_and_recorded_while_alive(store_path):
    release, late_returned = threading.Event(), threading.Event()
    holding, proceed = threading.Event(), threading.Event()
    try:
        with StuckChild.start_link(
            store=store_path,
            child_calls={0: [], 1: []},
            release=release,
            late_returned=late_returned,
            holding=holding,
            proceed=proceed,
        ) as server:
            handle = server.start_flow()
            assert wait_until(
                lambda: (
                    server.abandoned == 1 and where(store_path, handle.run_id, "abandoned") != []
                )
            ), "the stuck attempt was never counted and recorded as abandoned"
            assert where(store_path, handle.run_id, "abandoned") == [("work", 0, 1)]
            assert server.abandoned == 1
            assert not late_returned.is_set()

            release.set()
            assert late_returned.wait(10)
            assert wait_until(lambda: server.abandoned == 0)
            proceed.set()
            res = handle.result(timeout=10)
    finally:
        release.set()
        proceed.set()

    assert res.outcome == "all_over"


def test_abandoned_thread_does_not_take_a_concurrency_slot(store_path):
    release, late_returned = threading.Event(), threading.Event()
    holding, proceed = threading.Event(), threading.Event()
    child_calls = {0: [], 1: []}
    try:
        with StuckChild.start_link(
            store=store_path,
            child_calls=child_calls,
            release=release,
            late_returned=late_returned,
            holding=holding,
            proceed=proceed,
        ) as server:
            handle = server.start_flow()
            # max_concurrency=1, yet child 0's retry and child 1 both ran and the run reached
            # the next stage while child 0's first thread is still stuck.
            assert holding.wait(10), "the stuck thread kept the other children from running"
            assert not late_returned.is_set()
            assert child_calls == {0: ["a", "a"], 1: ["b"]}
            proceed.set()
            res = handle.result(timeout=10)
            assert not late_returned.is_set()
            release.set()
            assert wait_until(lambda: server.abandoned == 0)
    finally:
        release.set()
        proceed.set()

    assert res.outcome == "all_over"
    assert list(results(res.state, "work")) == [(0, "a fresh"), (1, "b fresh")]


def test_late_return_of_an_abandoned_attempt_is_ignored(store_path):
    release, late_returned = threading.Event(), threading.Event()
    holding, proceed = threading.Event(), threading.Event()
    proceed.set()
    try:
        with StuckChild.start_link(
            store=store_path,
            child_calls={0: [], 1: []},
            release=release,
            late_returned=late_returned,
            holding=holding,
            proceed=proceed,
        ) as server:
            res = server.start_flow().result(timeout=10)
            assert res.outcome == "all_over"
            release.set()
            assert late_returned.wait(10)
            assert wait_until(lambda: where(store_path, res.run_id, "stale") != []), (
                "the late outcome was never recorded as stale"
            )
            assert wait_until(lambda: server.abandoned == 0)
            assert where(store_path, res.run_id, "stale") == [("work", 0, 1)]
    finally:
        release.set()

    over = [
        (e.child_id, e.attempt, e.data["result"])
        for e in sorted_events(store_path, res.run_id)
        if e.kind == "task_over" and e.task == "work" and e.child_id is not None
    ]
    assert sorted(over) == [(0, 2, "a fresh"), (1, 1, "b fresh")]
    assert list(results(res.state, "work")) == [(0, "a fresh"), (1, "b fresh")]
    assert attempts(store_path, res.run_id, "task_started", child_id=0) == [1, 2]


# --- cancellation -----------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["token_wait", "sleep"])
def test_cancelled_wait_and_sleep_raise_cancelled_error(store_path, how):
    report, finished = {}, threading.Event()
    with Cancelling.start_link(
        store=store_path, calls=[], how=how, report=report, finished=finished
    ) as server:
        res = server.start_flow().result(timeout=HANG_GUARD)
        assert finished.wait(10)

    assert res.outcome == "all_over"
    assert report["cancelled_before"] is False
    assert isinstance(report["error"], CancelledError)
    assert report["cancelled_after"] is True
    assert report["raise_if_cancelled"] is True
    assert attempts(store_path, res.run_id, "timeout") == [1]


def test_cancelled_error_is_not_caught_by_except_exception(store_path):
    assert issubclass(CancelledError, BaseException)
    assert not issubclass(CancelledError, Exception)

    report, finished = {}, threading.Event()
    with Careless.start_link(
        store=store_path, calls=[], report=report, finished=finished
    ) as server:
        res = server.start_flow().result(timeout=HANG_GUARD)
        assert finished.wait(10)

    assert report == {}
    assert res.outcome == "all_over"
    assert attempts(store_path, res.run_id, "timeout") == [1]


def test_task_timeout_is_a_timeout_error():
    assert issubclass(TaskTimeout, TimeoutError)


# --- frozen clock -----------------------------------------------------------------------------


def test_timeouts_fire_under_a_frozen_clock_and_events_carry_its_time(store_path):
    calls = []
    with freezegun.freeze_time("2020-01-01"):
        with SlowParent.start_link(store=store_path, calls=calls, hangs=1) as server:
            res = server.start_flow().result(timeout=HANG_GUARD)

    assert res.outcome == "all_over"
    assert calls == ["work", "work"]
    assert attempts(store_path, res.run_id, "timeout") == [1]
    stamps = [e.ts for e in sorted_events(store_path, res.run_id)]
    assert stamps
    assert all(ts.startswith("2020-01-01") for ts in stamps), stamps
    assert res.state["start_time"] == datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)
