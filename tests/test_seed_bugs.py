"""One regression test per bug of the Elixir TaskFlow (SEED.md), named by what we guarantee."""

import contextlib
import importlib.util
import queue
import re
import threading
import time
from collections import Counter

import pytest
from helpers import recording

from threadflow import (
    ALL_OVER,
    DuplicateChildError,
    EventStore,
    Flow,
    FlowDefinitionError,
    FlowRunning,
    TaskTimeout,
    add_child_task,
    add_children_tasks,
    current_token,
    results,
    signals,
    task,
)

HANG_GUARD = 30.0


# --- task functions -------------------------------------------------------------------------


def do_nothing(state):
    return None


def add_planned_children(state):
    """Add the list of (child_id, payload) pairs the run's plan holds next."""
    add_children_tasks(state["plans"].get_nowait(), state)


def echo_payload(child, state):
    _, payload = child
    return payload


def child_fails_on_bad(child, state):
    child_id, payload = child
    if payload == "bad":
        raise ValueError(f"child {child_id} is bad")
    return payload


def hang_on_hang_payload(child, state):
    _, payload = child
    if payload == "hang":
        current_token().wait(HANG_GUARD)  # raises CancelledError once the timeout cancels us
    return payload


def stall_past_timeout_once(state):
    """On a 'stall' step ignore the token and return only when the test releases us."""
    if state["plan"].get_nowait() == "stall":
        state["release"].wait(HANG_GUARD)
        return "late"
    return "on time"


def late_or_failing_child(child, state):
    child_id, behaviour = child
    if behaviour in ("late", "fail"):
        state["all_inside"].wait(5)  # every child of the first run is inside user code
    if behaviour == "fail":
        raise ValueError(f"child {child_id} fails")
    if behaviour == "late":
        state["release"].wait(HANG_GUARD)  # ignores its token on purpose
    return behaviour


def add_children_and_duplicate(state):
    add_children_tasks(state["children"], state)
    try:
        add_child_task("dup-id", "second payload", state)
    except DuplicateChildError as error:
        state["errors"].put(error)


def spawn_or_meet(child, state):
    """A 'spawn' child adds grandchildren; each grandchild meets its siblings at a barrier."""
    child_id, payload = child
    if payload == "spawn":
        add_children_tasks(((f"grandchild-{n}", "meet") for n in range(3)), state)
        return "spawned"
    state["grandchildren"].wait(5)  # BrokenBarrierError unless all three run at once
    return "met"


def add_then_fail_on_first_attempt(state):
    label = state["plan"].get_nowait()
    count = 3 if label == "first" else 2
    add_children_tasks(((n, label) for n in range(count)), state)
    if label == "first":
        raise ValueError("first attempt fails after adding its children")


def meet_other_branch(state):
    barrier = state.get("branches")
    if barrier is not None:
        barrier.wait(5)  # BrokenBarrierError unless both branches run at once


def fail_as_planned(state):
    step = state["plan"].get_nowait()
    if step.startswith("fail"):
        raise ValueError(step)
    return step


def always_fail(state):
    raise ValueError("always fails")


def linear_backoff(failed_attempt):
    return 0.01 * failed_attempt


def wait_for_release(state):
    state["release"].wait(HANG_GUARD)


def add_child_without_child_func(state):
    add_child_task(0, "orphan", state)


def one_argument_child(child):
    return child


# --- flows ----------------------------------------------------------------------------------


class StaleAfterTimeout(Flow, server_name="bug1-stale-after-timeout"):
    flow1 = task(
        task_func=stall_past_timeout_once, task_timeout=0.3, task_retry_limit=2, next=ALL_OVER
    )


class LateSiblings(Flow, server_name="bug2-late-siblings"):
    flow1 = task(
        task_func=add_planned_children,
        child_task_func=late_or_failing_child,
        max_concurrency=3,
        exit_on_failed=True,
        task_retry_limit=1,
        next=ALL_OVER,
    )


class LastChildOver(Flow, server_name="bug3-last-child-over"):
    flow1 = task(
        task_func=add_planned_children,
        child_task_func=echo_payload,
        max_concurrency=1,
        next=ALL_OVER,
    )

    def handle_start_flow(self, state):
        state["seen"] = []

    def handle_task_over(self, task, state):
        if len(task) == 2:
            state["seen"].append(task[1])

    def handle_task_all_over(self, task, state):
        state["seen_at_all_over"] = list(state["seen"])


class FinalCallbacks(Flow, server_name="bug4-final-callbacks"):
    flow1 = task(
        task_func=add_planned_children,
        child_task_func=child_fails_on_bad,
        task_retry_limit=1,
        next=ALL_OVER,
    )

    def handle_all_over(self, state):
        state["final"] = "handle_all_over ran"

    def handle_task_failed(self, task, state):
        state["final"] = f"handle_task_failed ran for {task}"


class TimeoutTolerated(Flow, server_name="bug5-timeout-tolerated"):
    flow1 = task(
        task_func=add_planned_children,
        child_task_func=hang_on_hang_payload,
        exit_on_failed=False,
        task_retry_limit=2,
        task_timeout=0.3,
        next=ALL_OVER,
    )


class FailuresTolerated(Flow, server_name="bug6-failures-tolerated"):
    flow1 = task(
        task_func=add_planned_children,
        child_task_func=child_fails_on_bad,
        max_concurrency=1,
        exit_on_failed=False,
        task_retry_limit=2,
        next=ALL_OVER,
    )


class OrderedChildren(Flow, server_name="bug7-ordered-children"):
    flow1 = task(
        task_func=add_children_and_duplicate,
        child_task_func=echo_payload,
        max_concurrency=1,
        next=ALL_OVER,
    )


class Grandchildren(Flow, server_name="bug8-grandchildren"):
    flow1 = task(
        task_func=add_planned_children,
        child_task_func=spawn_or_meet,
        max_concurrency=4,
        task_retry_limit=1,
        next=ALL_OVER,
    )


class DiscardOnRetry(Flow, server_name="bug9-discard-on-retry"):
    flow1 = task(
        task_func=add_then_fail_on_first_attempt,
        child_task_func=echo_payload,
        task_retry_limit=2,
        next=ALL_OVER,
    )


class Diamond(Flow, server_name="bug11-diamond"):
    default_entrance = "split"
    split = task(task_func=do_nothing, next=["left", "right"])
    left = task(task_func=meet_other_branch, task_retry_limit=1, next="join")
    right = task(task_func=meet_other_branch, task_retry_limit=1, next="join")
    join = task(task_func=do_nothing, next=ALL_OVER)


class RetryWithBackoff(Flow, server_name="bug12-retry-with-backoff"):
    flow1 = task(
        task_func=fail_as_planned,
        task_retry_limit=3,
        task_retry_delay=linear_backoff,
        next=ALL_OVER,
    )


class AlwaysFails(Flow, server_name="bug12-always-fails"):
    flow1 = task(task_func=always_fail, task_retry_limit=2, task_retry_delay=0.05, next=ALL_OVER)


class SlowStart(Flow, server_name="bug13-slow-start"):
    flow1 = task(task_func=wait_for_release, next=ALL_OVER)


class NoLimitsGiven(Flow, server_name="bug10-no-limits-given"):
    flow1 = task(task_func=do_nothing, next=ALL_OVER)


class ChildrenWithoutChildFunc(Flow, server_name="bug10-children-without-child-func"):
    flow1 = task(task_func=add_child_without_child_func, task_retry_limit=1, next=ALL_OVER)


# --- helpers --------------------------------------------------------------------------------


def events_of(store_path, run_id, kind=None):
    events = EventStore(store_path).events(run_id)
    return [e for e in events if kind is None or e.kind == kind]


def attempts(store_path, run_id):
    """Count task_started events per (task, child_id) of one run."""
    return Counter((e.task, e.child_id) for e in events_of(store_path, run_id, "task_started"))


def wait_for_events(store_path, run_id, kind, count, timeout=10.0):
    """Poll the store for events that no signal announces; the timeout is only a hang guard."""
    pause = threading.Event()
    deadline = time.monotonic() + timeout
    while True:
        found = events_of(store_path, run_id, kind)
        if len(found) >= count or time.monotonic() >= deadline:
            return found
        pause.wait(0.02)


def plan_of(*steps):
    plan = queue.SimpleQueue()
    for step in steps:
        plan.put(step)
    return plan


# --- bug 1 ----------------------------------------------------------------------------------


def test_stale_outcome_after_timeout_is_ignored(store_path):
    release = threading.Event()
    timed_out = threading.Event()
    returned = queue.SimpleQueue()

    def on_timeout(sender, **kwargs):
        timed_out.set()

    try:
        with (
            StaleAfterTimeout.start_link(
                store=store_path,
                return_to=returned,
                plan=plan_of("stall", "finish", "finish"),
                release=release,
            ) as server,
            signals.task_timeout.connected_to(on_timeout, sender=server),
        ):
            first = server.start_flow()
            assert timed_out.wait(HANG_GUARD)
            release.set()  # the timed-out attempt now returns a result nobody may use
            first_res = first.result(timeout=HANG_GUARD)
            stale = wait_for_events(store_path, first.run_id, "stale", 1)
            second_res = server.start_flow().result(timeout=HANG_GUARD)
    finally:
        release.set()

    assert first_res.outcome == "all_over"
    assert [(e.task, e.attempt) for e in stale] == [("flow1", 1)]
    assert attempts(store_path, first.run_id) == Counter({("flow1", None): 2})
    over = events_of(store_path, first.run_id, "task_over")
    assert [(e.task, e.attempt) for e in over] == [("flow1", 2)]
    kinds = [e.kind for e in events_of(store_path, first.run_id)]
    assert set(kinds[kinds.index("all_over") + 1 :]) <= {"stale", "abandoned"}
    assert second_res.outcome == "all_over"
    assert second_res.run_id != first.run_id
    assert attempts(store_path, second_res.run_id) == Counter({("flow1", None): 1})
    assert [returned.get_nowait().run_id for _ in range(2)] == [first.run_id, second_res.run_id]
    assert returned.empty()


# --- bug 2 ----------------------------------------------------------------------------------


def test_late_sibling_outcomes_after_failure_are_ignored(store_path):
    release = threading.Event()
    plans = plan_of([(0, "late"), (1, "late"), (2, "fail")], [(0, "ok")])
    try:
        with LateSiblings.start_link(
            store=store_path,
            plans=plans,
            release=release,
            all_inside=threading.Barrier(3),
        ) as server:
            failed = server.start_flow().result(timeout=HANG_GUARD)
            release.set()  # the cancelled siblings now return, after their run is over
            stale = wait_for_events(store_path, failed.run_id, "stale", 2)
            again = server.start_flow().result(timeout=HANG_GUARD)
    finally:
        release.set()

    assert failed.outcome == "failed_over"
    assert failed.task == ("flow1", 2)
    assert sorted((e.task, e.child_id) for e in stale) == [("flow1", 0), ("flow1", 1)]
    over = events_of(store_path, failed.run_id, "task_over")
    assert [(e.task, e.child_id) for e in over] == [("flow1", None)]  # no sibling finished
    assert again.outcome == "all_over"
    assert list(results(again.state, "flow1")) == [(0, "ok")]


# --- bug 3 ----------------------------------------------------------------------------------


def test_last_child_task_over_state_change_is_kept(store_path):
    children = [(0, "a"), (1, "b"), (2, "c")]
    res = LastChildOver.run(store=store_path, plans=plan_of(children))

    assert res.outcome == "all_over"
    assert res.state["seen"] == [0, 1, 2]
    assert res.state["seen_at_all_over"] == [0, 1, 2]


# --- bug 4 ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("children", "outcome", "final"),
    [
        ([(0, "ok"), (1, "ok")], "all_over", "handle_all_over ran"),
        ([(0, "ok"), (1, "bad")], "failed_over", "handle_task_failed ran for ('flow1', 1)"),
    ],
)
def test_return_to_state_includes_final_callback_changes(store_path, children, outcome, final):
    returned = queue.SimpleQueue()
    with FinalCallbacks.start_link(
        store=store_path, return_to=returned, plans=plan_of(children)
    ) as server:
        handle = server.start_flow()
        res = returned.get(timeout=HANG_GUARD)

    assert res.run_id == handle.run_id
    assert res.outcome == outcome
    assert res.state["final"] == final
    assert res.as_tuple()[0] == outcome
    state_in_tuple = res.as_tuple()[1] if outcome == "all_over" else res.as_tuple()[1][2]
    assert state_in_tuple["final"] == final


# --- bug 5 ----------------------------------------------------------------------------------


def test_timeout_on_last_attempt_respects_exit_on_failed(store_path):
    children = [(0, "a"), (1, "hang"), (2, "c")]
    res = TimeoutTolerated.run(store=store_path, plans=plan_of(children))

    assert res.outcome == "all_over"
    assert res.failed == [("flow1", 1)]
    assert list(results(res.state, "flow1")) == [(0, "a"), (2, "c")]
    assert [e.child_id for e in events_of(store_path, res.run_id, "timeout")] == [1, 1]
    failed = events_of(store_path, res.run_id, "task_failed")
    assert [(e.child_id, e.data["tolerated"]) for e in failed] == [(1, True)]
    assert TaskTimeout.__name__ in failed[0].data["error"]["type"]


# --- bug 6 ----------------------------------------------------------------------------------


def test_tolerated_failures_are_listed_and_recorded(store_path):
    children = [(0, "a"), (1, "bad"), (2, "c"), (3, "bad"), (4, "e")]
    failed_signals = []

    def on_failed(sender, **kwargs):
        failed_signals.append((kwargs["task"], repr(kwargs["error"])))

    with (
        FailuresTolerated.start_link(store=store_path, plans=plan_of(children)) as server,
        signals.task_failed.connected_to(on_failed, sender=server),
    ):
        res = server.start_flow().result(timeout=HANG_GUARD)

    assert res.outcome == "all_over"
    assert res.failed == [("flow1", 1), ("flow1", 3)]
    assert list(results(res.state, "flow1")) == [(0, "a"), (2, "c"), (4, "e")]
    assert failed_signals == [
        (("flow1", 1), "ValueError('child 1 is bad')"),
        (("flow1", 3), "ValueError('child 3 is bad')"),
    ]
    failed = events_of(store_path, res.run_id, "task_failed")
    assert [(e.child_id, e.data["tolerated"]) for e in failed] == [(1, True), (3, True)]
    assert [e.data["error"]["message"] for e in failed] == ["child 1 is bad", "child 3 is bad"]
    assert all("ValueError" in e.data["error"]["type"] for e in failed)


# --- bug 7 ----------------------------------------------------------------------------------


def test_children_run_in_insertion_order_and_duplicates_are_rejected(store_path):
    ids = [5, "b", 3, "a", 1, ["x", 2], 4.5, "dup-id", 0]
    children = [(child_id, f"payload {n}") for n, child_id in enumerate(ids)]
    errors = queue.SimpleQueue()
    started = []

    def on_start(sender, **kwargs):
        started.append(kwargs["task"])

    with (
        OrderedChildren.start_link(store=store_path, children=children, errors=errors) as server,
        signals.task_start.connected_to(on_start, sender=server),
    ):
        res = server.start_flow().result(timeout=HANG_GUARD)

    returned_ids = [tuple(i) if isinstance(i, list) else i for i in ids]
    assert res.outcome == "all_over"
    assert started == [("flow1",)] + [("flow1", i) for i in returned_ids]
    assert list(results(res.state, "flow1")) == [
        (i, f"payload {n}") for n, i in enumerate(returned_ids)
    ]
    with pytest.raises(DuplicateChildError, match="dup-id"):
        raise errors.get_nowait()
    assert errors.empty()


# --- bug 8 ----------------------------------------------------------------------------------


def test_children_added_by_children_run_in_parallel(store_path):
    res = Grandchildren.run(
        store=store_path,
        plans=plan_of([("spawner", "spawn")]),
        grandchildren=threading.Barrier(3),
    )

    assert res.outcome == "all_over", res.error
    assert list(results(res.state, "flow1")) == [
        ("spawner", "spawned"),
        ("grandchild-0", "met"),
        ("grandchild-1", "met"),
        ("grandchild-2", "met"),
    ]


# --- bug 9 ----------------------------------------------------------------------------------


def test_failed_parent_attempt_children_are_discarded(store_path):
    res = DiscardOnRetry.run(store=store_path, plan=plan_of("first", "second"))

    assert res.outcome == "all_over", res.error
    assert list(results(res.state, "flow1")) == [(0, "second"), (1, "second")]
    assert attempts(store_path, res.run_id) == Counter(
        {("flow1", None): 2, ("flow1", 0): 1, ("flow1", 1): 1}
    )
    discarded = events_of(store_path, res.run_id, "children_discarded")
    assert [(e.task, e.data["count"]) for e in discarded] == [("flow1", 3)]


# --- bug 10 ---------------------------------------------------------------------------------


def define_unknown_next():
    class BadNext(Flow):
        fetch = task(task_func=do_nothing, next="stor")
        store = task(task_func=do_nothing, next=ALL_OVER)


def define_missing_next():
    class MissingNext(Flow):
        fetch = task(task_func=do_nothing)


def define_unknown_name_in_next_list():
    class BadNextList(Flow):
        fetch = task(task_func=do_nothing, next=["store", "missing"])
        store = task(task_func=do_nothing, next=ALL_OVER)


def define_cycle():
    class Cycle(Flow):
        default_entrance = "a"
        a = task(task_func=do_nothing, next="b")
        b = task(task_func=do_nothing, next="a")


def define_unknown_entrance():
    class BadEntrance(Flow):
        default_entrance = "nope"
        fetch = task(task_func=do_nothing, next=ALL_OVER)


def define_task_named_all_over():
    class NamedAllOver(Flow):
        all_over = task(task_func=do_nothing, next=ALL_OVER)


def define_missing_task_func():
    class MissingTaskFunc(Flow):
        fetch = task(next=ALL_OVER)


def define_non_callable_task_func():
    class NonCallable(Flow):
        fetch = task(task_func="do_nothing", next=ALL_OVER)


def define_one_argument_child_func():
    class OneArgChild(Flow):
        fetch = task(task_func=do_nothing, child_task_func=one_argument_child, next=ALL_OVER)


def define_zero_concurrency():
    class ZeroConcurrency(Flow):
        fetch = task(
            task_func=do_nothing, child_task_func=echo_payload, max_concurrency=0, next=ALL_OVER
        )


def define_zero_timeout():
    class ZeroTimeout(Flow):
        fetch = task(task_func=do_nothing, task_timeout=0, next=ALL_OVER)


def define_negative_timeout():
    class NegativeTimeout(Flow):
        fetch = task(task_func=do_nothing, task_timeout=-1.0, next=ALL_OVER)


def define_unknown_isolation():
    class BadIsolation(Flow):
        fetch = task(task_func=do_nothing, isolation="process", next=ALL_OVER)


def define_nested_function_in_subprocess():
    def nested(state):
        return None

    class NestedSubprocess(Flow):
        fetch = task(task_func=nested, isolation="subprocess", next=ALL_OVER)


@pytest.mark.parametrize(
    ("define", "fragments"),
    [
        (define_unknown_next, ["BadNext", "fetch", "'stor'"]),
        (define_missing_next, ["MissingNext", "fetch", "next"]),
        (define_unknown_name_in_next_list, ["BadNextList", "fetch", "'missing'"]),
        (define_unknown_entrance, ["BadEntrance", "'nope'"]),
        (define_task_named_all_over, ["NamedAllOver", "all_over"]),
        (define_missing_task_func, ["MissingTaskFunc", "fetch", "task_func"]),
        (define_non_callable_task_func, ["NonCallable", "fetch", "task_func"]),
        (define_one_argument_child_func, ["OneArgChild", "fetch", "child_task_func"]),
        (define_zero_concurrency, ["ZeroConcurrency", "fetch", "max_concurrency"]),
        (define_zero_timeout, ["ZeroTimeout", "fetch", "task_timeout"]),
        (define_negative_timeout, ["NegativeTimeout", "fetch", "task_timeout"]),
        (define_unknown_isolation, ["BadIsolation", "fetch", "isolation", "'process'"]),
        (define_nested_function_in_subprocess, ["NestedSubprocess", "fetch", "nested"]),
    ],
    ids=lambda value: value.__name__.removeprefix("define_") if callable(value) else None,
)
def test_bad_definition_is_rejected_when_the_class_is_created(define, fragments):
    with pytest.raises(FlowDefinitionError, match=re.escape(fragments[0])) as info:
        define()

    message = str(info.value)
    assert [f for f in fragments if f not in message] == [], message


def test_cycle_is_rejected_with_its_path():
    with pytest.raises(FlowDefinitionError, match=r"Cycle") as info:
        define_cycle()

    assert re.search(r"\ba -> b -> a\b|\bb -> a -> b\b", str(info.value)), str(info.value)


def test_task_without_timeout_or_retry_limit_uses_the_defaults(store_path):
    res = NoLimitsGiven.run(store=store_path)

    assert res.outcome == "all_over"
    assert attempts(store_path, res.run_id) == Counter({("flow1", None): 1})


def test_unknown_entrance_at_start_is_rejected_before_any_run(store_path):
    with NoLimitsGiven.start_link(store=store_path) as server:
        with pytest.raises(FlowDefinitionError, match="'nope'"):
            server.start_flow(entrance="nope")
        res = server.start_flow().result(timeout=HANG_GUARD)

    assert res.outcome == "all_over"
    assert [run.run_id for run in EventStore(store_path).runs()] == [res.run_id]


def test_adding_children_without_child_task_func_fails_the_attempt_not_the_server(store_path):
    with ChildrenWithoutChildFunc.start_link(store=store_path) as server:
        first = server.start_flow().result(timeout=HANG_GUARD)
        second = server.start_flow().result(timeout=HANG_GUARD)

    for res in (first, second):
        assert res.outcome == "failed_over"
        assert res.task == ("flow1",)
        assert isinstance(res.error, RuntimeError)
        assert "child_task_func" in str(res.error)


# --- bug 11 ---------------------------------------------------------------------------------


def test_fan_out_runs_branches_in_parallel_and_fan_in_waits_for_both(store_path):
    with (
        Diamond.start_link(store=store_path, branches=threading.Barrier(2)) as server,
        recording(server) as log,
    ):
        res = server.start_flow().result(timeout=HANG_GUARD)

    assert res.outcome == "all_over", res.error
    assert log[:4] == ["start_flow", "task_start split", "task_over split", "task_all_over split"]
    assert sorted(log[4:10]) == sorted(
        f"{signal} {branch}"
        for signal in ("task_start", "task_over", "task_all_over")
        for branch in ("left", "right")
    )
    assert log[10:] == ["task_start join", "task_over join", "task_all_over join", "all_over"]


def test_fan_in_waits_only_for_branches_reachable_from_the_entrance(store_path):
    with Diamond.start_link(store=store_path) as server, recording(server) as log:
        res = server.start_flow(entrance="right").result(timeout=HANG_GUARD)

    assert res.outcome == "all_over", res.error
    assert log == [
        "start_flow",
        "task_start right",
        "task_over right",
        "task_all_over right",
        "task_start join",
        "task_over join",
        "task_all_over join",
        "all_over",
    ]


# --- bug 12 ---------------------------------------------------------------------------------


def test_callbacks_see_the_error(store_path):
    seen = []

    def receiver_for(name):
        def receive(sender, **kwargs):
            seen.append((name, repr(kwargs["error"])))

        return receive

    with contextlib.ExitStack() as stack:
        server = stack.enter_context(AlwaysFails.start_link(store=store_path))
        for name in ("task_exit", "task_retry", "task_failed", "failed_over"):
            receiver = receiver_for(name)
            stack.enter_context(getattr(signals, name).connected_to(receiver, sender=server))
        res = server.start_flow().result(timeout=HANG_GUARD)

    error = "ValueError('always fails')"
    assert seen == [
        ("task_exit", error),
        ("task_retry", error),
        ("task_exit", error),
        ("task_failed", error),
        ("failed_over", error),
    ]
    assert res.outcome == "failed_over"
    assert repr(res.error) == error
    exits = events_of(store_path, res.run_id, "exit")
    assert [e.data["error"]["message"] for e in exits] == ["always fails", "always fails"]
    assert all("raise ValueError" in e.data["error"]["traceback"] for e in exits)


def test_task_retry_delay_is_respected(store_path):
    res = RetryWithBackoff.run(store=store_path, plan=plan_of("fail 1", "fail 2", "ok"))

    assert res.outcome == "all_over"
    retries = events_of(store_path, res.run_id, "retry")
    assert [(e.data["delay"], e.data["next_attempt"]) for e in retries] == [
        (pytest.approx(0.01), 2),
        (pytest.approx(0.02), 3),
    ]
    constant = AlwaysFails.run(store=store_path)
    delays = [e.data["delay"] for e in events_of(store_path, constant.run_id, "retry")]
    assert delays == [pytest.approx(0.05)]


# --- bug 13 ---------------------------------------------------------------------------------


def test_refused_start_fires_no_start_flow_callback(store_path):
    release = threading.Event()
    started = []

    def on_start_flow(sender, **kwargs):
        started.append(kwargs["run_id"])

    try:
        with (
            SlowStart.start_link(store=store_path, release=release) as server,
            signals.start_flow.connected_to(on_start_flow, sender=server),
        ):
            handle = server.start_flow()
            with pytest.raises(FlowRunning) as refused:
                server.start_flow()
            release.set()
            res = handle.result(timeout=HANG_GUARD)
    finally:
        release.set()

    assert refused.value.run_id == handle.run_id
    assert refused.value.start_time == res.state["start_time"]
    assert started == [handle.run_id]
    assert [run.run_id for run in EventStore(store_path).runs()] == [handle.run_id]
    assert len(events_of(store_path, handle.run_id, "flow_started")) == 1


# --- bug 14 ---------------------------------------------------------------------------------

INVALID_FLOW_MODULE = """
from threadflow import Flow, task


def step(state):
    return None


class Looping(Flow):
    default_entrance = "first"
    first = task(task_func=step, next="second")
    second = task(task_func=step, next="first")
"""


def test_invalid_flow_is_rejected_at_import_time_not_at_run_time(tmp_path):
    path = tmp_path / "invalid_flow_module.py"
    path.write_text(INVALID_FLOW_MODULE)
    spec = importlib.util.spec_from_file_location("invalid_flow_module", path)
    module = importlib.util.module_from_spec(spec)
    threads_before = {t.ident for t in threading.enumerate()}

    with pytest.raises(FlowDefinitionError, match="Looping"):
        spec.loader.exec_module(module)

    assert not hasattr(module, "Looping")
    assert {t.ident for t in threading.enumerate()} <= threads_before  # nothing was started
    assert list(tmp_path.iterdir()) == [path]  # and no store was opened
