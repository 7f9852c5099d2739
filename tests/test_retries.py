"""Retries: how many attempts a task gets, which errors are retried, and the delay between them."""

import pytest

import threadflow
from threadflow import (
    ALL_OVER,
    EventStore,
    Flow,
    TaskTimeout,
    add_children_tasks,
    results,
    signals,
    task,
)

# --- task functions (module level, as the engine requires) -----------------------------------


def fail_always(state):
    """Raise a ValueError numbered by the attempt."""
    calls = state["calls"]
    calls.append("work")
    raise ValueError(f"boom {len(calls)}")


def fail_by_plan(state):
    """Raise the planned ``(type, message)`` errors, one per attempt, then return "done".

    A planned error of ``None`` means: wait on the attempt's token (a timeout).
    """
    calls = state["calls"]
    calls.append("work")
    plan = state["plan"]
    if len(calls) <= len(plan):
        planned = plan[len(calls) - 1]
        if planned is None:
            threadflow.current_token().wait(30)
            return "not cancelled"
        kind, message = planned
        raise kind(message)
    return "done"


def add_three_children(state):
    add_children_tasks([(0, "a"), (1, "b"), (2, "c")], state)


def child_fails_by_plan(child, state):
    """Child ``i`` fails ``state["fail_times"][i]`` times, then returns its payload upper-cased."""
    child_id, payload = child
    calls = state["child_calls"][child_id]
    calls.append(payload)
    if len(calls) <= state["fail_times"][child_id]:
        raise ValueError(f"child {child_id} attempt {len(calls)}")
    return payload.upper()


def is_transient(error):
    return "transient" in str(error)


def linear_backoff(failed_attempt):
    return failed_attempt / 100


# --- helpers ----------------------------------------------------------------------------------


def make_flow(name, **options):
    """A one-stage flow named ``name`` whose only task ``work`` has ``options``."""

    class Retrying(Flow, server_name=name):
        work = task(next=ALL_OVER, **options)

    return Retrying


def run_flow(flow, store_path, **extra_state):
    with flow.start_link(store=store_path, **extra_state) as server:
        return server.start_flow().result(timeout=30)


def events(store_path, run_id, kind, child_id=None):
    found = [
        e
        for e in EventStore(store_path).events(run_id)
        if e.kind == kind and e.task == "work" and e.child_id == child_id
    ]
    return sorted(found, key=lambda e: e.seq)


def attempts(store_path, run_id, kind="task_started", child_id=None):
    return [e.attempt for e in events(store_path, run_id, kind, child_id)]


def kinds(store_path, run_id):
    return [e.kind for e in sorted(EventStore(store_path).events(run_id), key=lambda e: e.seq)]


# --- task_retry_limit -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limit", "expected"),
    [(0, [1]), (1, [1]), (2, [1, 2]), (3, [1, 2, 3])],
)
def test_task_retry_limit_counts_attempts_in_total(store_path, limit, expected):
    flow = make_flow(f"retries-limit-{limit}", task_func=fail_always, task_retry_limit=limit)
    calls = []
    res = run_flow(flow, store_path, calls=calls)

    assert res.outcome == "failed_over"
    assert res.task == ("work",)
    assert isinstance(res.error, ValueError)
    assert str(res.error) == f"boom {len(expected)}"
    assert calls == ["work"] * len(expected)
    assert attempts(store_path, res.run_id) == expected
    assert attempts(store_path, res.run_id, "exit") == expected


def test_default_task_retry_limit_is_three_attempts(store_path):
    flow = make_flow("retries-limit-default", task_func=fail_always)
    res = run_flow(flow, store_path, calls=[])

    assert res.outcome == "failed_over"
    assert attempts(store_path, res.run_id) == [1, 2, 3]


def test_task_succeeding_on_its_last_attempt_ends_all_over(store_path):
    flow = make_flow("retries-last-attempt", task_func=fail_by_plan, task_retry_limit=3)
    plan = [(ValueError, "first"), (ValueError, "second")]
    res = run_flow(flow, store_path, calls=[], plan=plan)

    assert res.outcome == "all_over"
    assert res.task is None
    assert res.error is None
    assert attempts(store_path, res.run_id) == [1, 2, 3]
    assert attempts(store_path, res.run_id, "exit") == [1, 2]
    assert attempts(store_path, res.run_id, "task_over") == [3]


@pytest.mark.parametrize(("limit", "outcome"), [(3, "all_over"), (2, "failed_over")])
def test_exceptions_and_timeouts_share_the_attempt_count(store_path, limit, outcome):
    flow = make_flow(
        f"retries-shared-count-{limit}",
        task_func=fail_by_plan,
        task_retry_limit=limit,
        task_timeout=0.2,
    )
    plan = [None, (ValueError, "after the timeout")]
    res = run_flow(flow, store_path, calls=[], plan=plan)

    assert res.outcome == outcome
    assert attempts(store_path, res.run_id) == [1, 2, 3][:limit]
    assert attempts(store_path, res.run_id, "timeout") == [1]
    assert attempts(store_path, res.run_id, "exit") == [2]
    if outcome == "failed_over":
        assert isinstance(res.error, ValueError)
        assert str(res.error) == "after the timeout"


# --- retry_on ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("retry_on", "error_type"),
    [
        (ValueError, ValueError),
        ((ValueError,), ValueError),
        ((KeyError, ValueError), ValueError),
        ((LookupError,), KeyError),
    ],
    ids=["single-type", "one-type-tuple", "two-type-tuple", "base-class"],
)
def test_retry_on_types_retries_matching_errors(store_path, retry_on, error_type):
    flow = make_flow(
        "retries-retry-on-match", task_func=fail_by_plan, task_retry_limit=5, retry_on=retry_on
    )
    plan = [(error_type, "one"), (error_type, "two")]
    res = run_flow(flow, store_path, calls=[], plan=plan)

    assert res.outcome == "all_over"
    assert attempts(store_path, res.run_id) == [1, 2, 3]


@pytest.mark.parametrize(
    "retry_on", [ValueError, (ValueError,)], ids=["single-type", "one-type-tuple"]
)
def test_error_rejected_by_retry_on_uses_up_the_attempts_at_once(store_path, retry_on):
    flow = make_flow(
        "retries-retry-on-reject", task_func=fail_by_plan, task_retry_limit=5, retry_on=retry_on
    )
    calls = []
    res = run_flow(flow, store_path, calls=calls, plan=[(KeyError, "not retried")])

    assert res.outcome == "failed_over"
    assert res.task == ("work",)
    assert isinstance(res.error, KeyError)
    assert calls == ["work"]
    assert attempts(store_path, res.run_id) == [1]
    assert "retry" not in kinds(store_path, res.run_id)


def test_rejected_error_after_retried_ones_stops_the_retries(store_path):
    flow = make_flow(
        "retries-retry-on-late-reject",
        task_func=fail_by_plan,
        task_retry_limit=10,
        retry_on=(ValueError,),
    )
    plan = [(ValueError, "one"), (ValueError, "two"), (KeyError, "three"), (ValueError, "four")]
    res = run_flow(flow, store_path, calls=[], plan=plan)

    assert res.outcome == "failed_over"
    assert isinstance(res.error, KeyError)
    assert attempts(store_path, res.run_id) == [1, 2, 3]
    assert [e.data["next_attempt"] for e in events(store_path, res.run_id, "retry")] == [2, 3]


def test_retry_on_predicate_receives_the_error(store_path):
    flow = make_flow(
        "retries-predicate-retried",
        task_func=fail_by_plan,
        task_retry_limit=5,
        retry_on=is_transient,
    )
    plan = [(RuntimeError, "transient 1"), (RuntimeError, "transient 2")]
    res = run_flow(flow, store_path, calls=[], plan=plan)

    assert res.outcome == "all_over"
    assert attempts(store_path, res.run_id) == [1, 2, 3]


def test_error_rejected_by_retry_on_predicate_fails_at_once(store_path):
    flow = make_flow(
        "retries-predicate-rejected",
        task_func=fail_by_plan,
        task_retry_limit=5,
        retry_on=is_transient,
    )
    plan = [(RuntimeError, "transient 1"), (RuntimeError, "permanent"), (RuntimeError, "never")]
    res = run_flow(flow, store_path, calls=[], plan=plan)

    assert res.outcome == "failed_over"
    assert isinstance(res.error, RuntimeError)
    assert str(res.error) == "permanent"
    assert attempts(store_path, res.run_id) == [1, 2]


@pytest.mark.parametrize(
    ("retry_on", "expected"),
    [((ValueError,), [1]), ((TimeoutError,), [1, 2]), ((TaskTimeout,), [1, 2])],
    ids=["rejected", "timeout-error", "task-timeout"],
)
def test_retry_on_is_asked_about_timeouts(store_path, retry_on, expected):
    flow = make_flow(
        "retries-retry-on-timeout",
        task_func=fail_by_plan,
        task_retry_limit=3,
        task_timeout=0.2,
        retry_on=retry_on,
    )
    res = run_flow(flow, store_path, calls=[], plan=[None])

    assert attempts(store_path, res.run_id) == expected
    if expected == [1]:
        assert res.outcome == "failed_over"
        assert isinstance(res.error, TaskTimeout)
    else:
        assert res.outcome == "all_over"


# --- task_retry_delay -------------------------------------------------------------------------


def test_default_retry_delay_is_zero(store_path):
    flow = make_flow("retries-delay-default", task_func=fail_always, task_retry_limit=3)
    res = run_flow(flow, store_path, calls=[])

    retries = events(store_path, res.run_id, "retry")
    assert [(e.data["delay"], e.data["next_attempt"]) for e in retries] == [(0, 2), (0, 3)]


def test_retry_delay_number_is_used_before_every_retry(store_path):
    flow = make_flow(
        "retries-delay-number",
        task_func=fail_by_plan,
        task_retry_limit=3,
        task_retry_delay=0.05,
    )
    plan = [(ValueError, "one"), (ValueError, "two")]
    res = run_flow(flow, store_path, calls=[], plan=plan)

    assert res.outcome == "all_over"
    retries = events(store_path, res.run_id, "retry")
    assert [(e.data["delay"], e.data["next_attempt"]) for e in retries] == [(0.05, 2), (0.05, 3)]
    assert attempts(store_path, res.run_id) == [1, 2, 3]


def test_retry_delay_callable_gets_the_failed_attempt_number(store_path):
    flow = make_flow(
        "retries-delay-callable",
        task_func=fail_by_plan,
        task_retry_limit=4,
        task_retry_delay=linear_backoff,
    )
    plan = [(ValueError, "one"), (ValueError, "two"), (ValueError, "three")]
    res = run_flow(flow, store_path, calls=[], plan=plan)

    assert res.outcome == "all_over"
    retries = events(store_path, res.run_id, "retry")
    assert [e.data["delay"] for e in retries] == pytest.approx([0.01, 0.02, 0.03])
    assert [e.data["next_attempt"] for e in retries] == [2, 3, 4]
    assert attempts(store_path, res.run_id) == [1, 2, 3, 4]


def test_no_retry_is_scheduled_after_the_last_attempt(store_path):
    flow = make_flow(
        "retries-delay-last",
        task_func=fail_always,
        task_retry_limit=2,
        task_retry_delay=linear_backoff,
    )
    res = run_flow(flow, store_path, calls=[])

    assert res.outcome == "failed_over"
    retries = events(store_path, res.run_id, "retry")
    assert [e.data["next_attempt"] for e in retries] == [2]
    assert kinds(store_path, res.run_id)[-3:] == ["exit", "task_failed", "failed_over"]


# --- children ---------------------------------------------------------------------------------


class ChildRetries(Flow, server_name="retries-children"):
    work = task(
        task_func=add_three_children,
        child_task_func=child_fails_by_plan,
        task_retry_limit=3,
        # One at a time, so the calls are deterministic: a failed child's retry runs before
        # the next child starts, and child 2 fails the run only after child 1 is done.
        max_concurrency=1,
        next=ALL_OVER,
    )


def test_children_are_retried_each_with_their_own_attempts(store_path):
    child_calls = {0: [], 1: [], 2: []}
    res = run_flow(ChildRetries, store_path, child_calls=child_calls, fail_times={0: 0, 1: 1, 2: 2})

    assert res.outcome == "all_over"
    assert list(results(res.state, "work")) == [(0, "A"), (1, "B"), (2, "C")]
    assert child_calls == {0: ["a"], 1: ["b", "b"], 2: ["c", "c", "c"]}
    assert attempts(store_path, res.run_id) == [1]
    assert {i: attempts(store_path, res.run_id, child_id=i) for i in range(3)} == {
        0: [1],
        1: [1, 2],
        2: [1, 2, 3],
    }


def test_child_using_up_its_attempts_does_not_use_up_its_siblings(store_path):
    child_calls = {0: [], 1: [], 2: []}
    res = run_flow(ChildRetries, store_path, child_calls=child_calls, fail_times={0: 0, 1: 2, 2: 3})

    assert res.outcome == "failed_over"
    assert res.task == ("work", 2)
    assert str(res.error) == "child 2 attempt 3"
    assert child_calls == {0: ["a"], 1: ["b", "b", "b"], 2: ["c", "c", "c"]}


# --- callbacks and signals see the error ------------------------------------------------------


class ExitCallbacks(Flow, server_name="retries-exit-callbacks"):
    work = task(task_func=fail_always, task_retry_limit=3, next=ALL_OVER)

    def handle_task_exit(self, task, state):
        state["exits"].append(task)

    def handle_task_failed(self, task, state):
        state["failed_tasks"].append(task)


def test_handle_task_exit_fires_for_every_failed_attempt(store_path):
    res = run_flow(ExitCallbacks, store_path, calls=[], exits=[], failed_tasks=[])

    assert res.outcome == "failed_over"
    assert res.state["exits"] == [("work",), ("work",), ("work",)]
    assert res.state["failed_tasks"] == [("work",)]


def test_exit_retry_failed_signals_carry_the_error(store_path):
    flow = make_flow("retries-error-signals", task_func=fail_always, task_retry_limit=2)
    recorded = []

    def recorder(name):
        def receive(sender, **kwargs):
            error = kwargs["error"]
            recorded.append(f"{name} {kwargs['task']} {type(error).__name__}: {error}")

        return receive

    receivers = {
        name: recorder(name) for name in ("task_exit", "task_retry", "task_failed", "failed_over")
    }
    with flow.start_link(store=store_path, calls=[]) as server:
        with (
            signals.task_exit.connected_to(receivers["task_exit"], sender=server),
            signals.task_retry.connected_to(receivers["task_retry"], sender=server),
            signals.task_failed.connected_to(receivers["task_failed"], sender=server),
            signals.failed_over.connected_to(receivers["failed_over"], sender=server),
        ):
            res = server.start_flow().result(timeout=30)

    assert res.outcome == "failed_over"
    assert recorded == [
        "task_exit ('work',) ValueError: boom 1",
        "task_retry ('work',) ValueError: boom 1",
        "task_exit ('work',) ValueError: boom 2",
        "task_failed ('work',) ValueError: boom 2",
        "failed_over ('work',) ValueError: boom 2",
    ]


def test_exit_event_stores_the_error_as_data(store_path):
    flow = make_flow("retries-error-data", task_func=fail_always, task_retry_limit=1)
    res = run_flow(flow, store_path, calls=[])

    (exit_event,) = events(store_path, res.run_id, "exit")
    error = exit_event.data["error"]
    assert error["type"].endswith("ValueError")
    assert error["message"] == "boom 1"
    assert "fail_always" in error["traceback"]


# --- NoRetry: programming errors fail at once -------------------------------------------------


def refuse_to_retry(state):
    state["calls"].append("work")
    try:
        int("not a number")
    except ValueError as exc:
        raise threadflow.NoRetry("the input is not a number") from exc


def add_refusing_children(state):
    add_children_tasks([(0, None), (1, None)], state)


def child_refuses(child, state):
    state["calls"].append(child[0])
    raise threadflow.NoRetry(f"child {child[0]} cannot be done")


def add_unencodable_payload(state):
    state["calls"].append("split")
    add_children_tasks([(0, float("nan"))], state)


class RefusesRetry(Flow):
    work = task(task_func=refuse_to_retry, task_retry_limit=5, next=ALL_OVER)


class ChildrenRefuse(Flow):
    split = task(
        task_func=add_refusing_children,
        child_task_func=child_refuses,
        task_retry_limit=5,
        exit_on_failed=False,
        next=ALL_OVER,
    )


class BadPayload(Flow):
    split = task(
        task_func=add_unencodable_payload,
        child_task_func=lambda child, state: None,
        task_retry_limit=5,
        retry_on=lambda error: True,  # not asked: NoRetry wins
        next=ALL_OVER,
    )


def test_no_retry_fails_the_task_after_one_attempt_keeping_its_cause(store_path):
    res = RefusesRetry.run(store=store_path, calls=(calls := []))
    assert res.outcome == "failed_over"
    assert calls == ["work"]
    assert isinstance(res.error, threadflow.NoRetry)
    assert isinstance(res.error.__cause__, ValueError)
    assert not EventStore(store_path).events(res.run_id, "retry")
    [exit_event] = EventStore(store_path).events(res.run_id, "exit")
    assert "ValueError" in exit_event.data["error"]["traceback"]  # the cause is kept


def test_a_child_raising_no_retry_is_tolerated_after_one_attempt(store_path):
    res = ChildrenRefuse.run(store=store_path, calls=(calls := []))
    assert res.outcome == "all_over"
    assert sorted(res.failed) == [("split", 0), ("split", 1)]
    assert sorted(calls) == [0, 1]


def test_a_payload_that_cannot_be_stored_is_not_retried(store_path):
    res = BadPayload.run(store=store_path, calls=(calls := []))
    assert res.outcome == "failed_over"
    assert isinstance(res.error, threadflow.EncodeError)
    assert isinstance(res.error, threadflow.NoRetry)
    assert calls == ["split"]
