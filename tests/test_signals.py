"""Callbacks and signals: order, arguments, isolation of errors, thread (API.md section 4)."""

import contextlib
import gc
import json
import logging
import queue
import re
import sqlite3
import threading

import threadflow
from threadflow import ALL_OVER, EventStore, Flow, signals, task
from threadflow.events import SIGNAL_OF

SIGNAL_NAMES = [
    "start_flow",
    "all_over",
    "failed_over",
    "task_start",
    "task_over",
    "task_all_over",
    "task_failed",
    "task_timeout",
    "task_exit",
    "task_retry",
]
RUN_SIGNALS = {"start_flow", "all_over", "failed_over"}
SIGNALS_WITH_ERROR = {"task_exit", "task_timeout", "task_failed", "task_retry", "failed_over"}

TWO_STAGE_ORDER = [
    "start_flow",
    "task_start ('first',)",
    "task_over ('first',)",
    "task_start ('first', 0)",
    "task_over ('first', 0)",
    "task_start ('first', 1)",
    "task_over ('first', 1)",
    "task_all_over ('first',)",
    "task_start ('second',)",
    "task_over ('second',)",
    "task_all_over ('second',)",
    "all_over",
]

# --- task functions ---


def noop(state):
    return None


def split_two(state):
    threadflow.add_children_tasks([(0, "a"), (1, "b")], state)


def echo_child(child, state):
    return child[1]


def flaky_work(state):
    """Attempt 1 raises, attempt 2 hangs until its timeout cancels it, attempt 3 raises."""
    attempts = state["attempts"]
    attempts.append(len(attempts) + 1)
    if attempts[-1] == 2:
        threadflow.current_token().wait(10)
        return "too late"
    raise ValueError(f"boom {attempts[-1]}")


def read_marker_parent(state):
    state["markers"].append(state["marker"])
    threadflow.add_children_tasks([(0, None), (1, None)], state)


def read_marker_child(child, state):
    return state["marker"]


def split_four_recording_thread(state):
    state["worker_threads"].append(threading.current_thread().name)
    threadflow.add_children_tasks([(i, i) for i in range(4)], state)


def child_recording_thread(child, state):
    state["worker_threads"].append(threading.current_thread().name)
    return child[1]


# --- flows ---


class TwoStageFlow(Flow):
    first = task(task_func=split_two, child_task_func=echo_child, max_concurrency=1, next="second")
    second = task(task_func=noop, next=ALL_OVER)


class FailingFlow(Flow):
    work = task(task_func=flaky_work, task_retry_limit=3, task_timeout=0.2, next=ALL_OVER)


def describe(name, task_tuple):
    return name if task_tuple is None else f"{name} {task_tuple!r}"


class HandleRecordingFlow(Flow):
    first = task(task_func=split_two, child_task_func=echo_child, max_concurrency=1, next="second")
    second = task(task_func=noop, next=ALL_OVER)

    def handle_start_flow(self, state):
        state["calls"].append("start_flow")

    def handle_all_over(self, state):
        state["calls"].append("all_over")

    def handle_task_start(self, task, state):
        state["calls"].append(describe("task_start", task))

    def handle_task_over(self, task, state):
        state["calls"].append(describe("task_over", task))

    def handle_task_all_over(self, task, state):
        state["calls"].append(describe("task_all_over", task))

    def handle_task_failed(self, task, state):
        state["calls"].append(describe("task_failed", task))

    def handle_task_timeout(self, task, state):
        state["calls"].append(describe("task_timeout", task))

    def handle_task_exit(self, task, state):
        state["calls"].append(describe("task_exit", task))


class StateChangingFlow(Flow):
    first = task(task_func=split_two, child_task_func=echo_child, next="second")
    second = task(task_func=noop, next=ALL_OVER)

    def handle_start_flow(self, state):
        state["overs"] = []
        state["stages_done"] = []

    def handle_task_over(self, task, state):
        state["overs"].append(task)

    def handle_task_all_over(self, task, state):
        state["stages_done"].append(task[0])

    def handle_all_over(self, state):
        state["finished"] = True


class FailedStateFlow(Flow):
    work = task(task_func=flaky_work, task_retry_limit=3, task_timeout=0.2, next=ALL_OVER)

    def handle_task_failed(self, task, state):
        state["failed_seen"] = task


class MarkerFlow(Flow):
    fetch = task(
        task_func=read_marker_parent,
        child_task_func=read_marker_child,
        max_concurrency=1,
        next=ALL_OVER,
    )

    def handle_task_start(self, task, state):
        state["marker"] = "-".join(str(part) for part in task)


class RaisingHandleFlow(Flow):
    first = task(task_func=split_two, child_task_func=echo_child, max_concurrency=1, next="second")
    second = task(task_func=noop, next=ALL_OVER)

    def handle_task_over(self, task, state):
        raise RuntimeError("handle_task_over broke")


class StrongHandleFlow(Flow):
    fetch = task(task_func=noop, next=ALL_OVER)

    def handle_task_over(self, task, state):
        state["handled"].append(task)

    def handle_all_over(self, state):
        state["handled"].append("all_over")


class ThreadNamesFlow(Flow):
    fetch = task(
        task_func=split_four_recording_thread,
        child_task_func=child_recording_thread,
        max_concurrency=2,
        next="store",
    )
    store = task(task_func=noop, next=ALL_OVER)

    def handle_start_flow(self, state):
        state["callback_threads"].append(threading.current_thread().name)

    def handle_task_start(self, task, state):
        state["callback_threads"].append(threading.current_thread().name)

    def handle_task_over(self, task, state):
        state["callback_threads"].append(threading.current_thread().name)

    def handle_task_all_over(self, task, state):
        state["callback_threads"].append(threading.current_thread().name)

    def handle_all_over(self, state):
        state["callback_threads"].append(threading.current_thread().name)


# --- helpers ---


def connect_all(stack, server, make_receiver, names=SIGNAL_NAMES):
    for name in names:
        signal = getattr(signals, name)
        stack.enter_context(signal.connected_to(make_receiver(name), sender=server))


def run_recorded(flow_cls, store_path, make_receiver, **extra_state):
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(flow_cls.start_link(store=store_path, **extra_state))
        connect_all(stack, server, make_receiver)
        handle = server.start_flow()
        return server, handle, handle.result(timeout=30)


def order_recorder(calls):
    def make_receiver(name):
        def receiver(sender, **kwargs):
            calls.append(describe(name, kwargs.get("task")))

        return receiver

    return make_receiver


# --- order ---


def test_signals_fire_in_the_seed_order_for_two_stages_with_children(store_path):
    calls: list[str] = []
    _, _, result = run_recorded(TwoStageFlow, store_path, order_recorder(calls))

    assert result.outcome == "all_over"
    assert calls == TWO_STAGE_ORDER


def test_handle_methods_are_called_in_the_seed_order(store_path):
    calls: list[str] = []
    with HandleRecordingFlow.start_link(store=store_path, calls=calls) as server:
        result = server.start_flow().result(timeout=30)

    assert result.outcome == "all_over"
    assert calls == TWO_STAGE_ORDER


def test_failure_signals_fire_in_order_with_their_errors(store_path):
    calls: list[str] = []

    def make_receiver(name):
        def receiver(sender, **kwargs):
            text = describe(name, kwargs.get("task"))
            if name in {"task_start", "task_exit", "task_timeout", "task_over"}:
                text += f" attempt={kwargs['attempt']}"
            if kwargs.get("error") is not None:
                text += f" error={type(kwargs['error']).__name__}"
            calls.append(text)

        return receiver

    _, _, result = run_recorded(FailingFlow, store_path, make_receiver, attempts=[])

    assert result.outcome == "failed_over"
    starts = [re.search(r"attempt=(\d+)", c) for c in calls if c.startswith("task_start")]
    first = int(starts[0].group(1)) if starts and starts[0] else 1  # counted from 0 or 1
    a1, a2, a3 = first, first + 1, first + 2
    assert calls == [
        "start_flow",
        f"task_start ('work',) attempt={a1}",
        f"task_exit ('work',) attempt={a1} error=ValueError",
        "task_retry ('work',) error=ValueError",
        f"task_start ('work',) attempt={a2}",
        f"task_timeout ('work',) attempt={a2} error=TaskTimeout",
        "task_retry ('work',) error=TaskTimeout",
        f"task_start ('work',) attempt={a3}",
        f"task_exit ('work',) attempt={a3} error=ValueError",
        "task_failed ('work',) error=ValueError",
        "failed_over ('work',) error=ValueError",
    ]


# --- arguments ---


def kwargs_checker(problems, fired):
    def make_receiver(name):
        def receiver(sender, **kwargs):
            fired.add(name)
            missing = {"task", "state", "run_id", "attempt"} - set(kwargs)
            if missing:
                problems.append(f"{name}: missing {sorted(missing)}")
                return
            if not isinstance(sender, Flow):
                problems.append(f"{name}: sender {sender!r} is not the server")
            state = kwargs["state"]
            if not isinstance(state, dict) or state.get("run_id") != kwargs["run_id"]:
                problems.append(f"{name}: state is not the run's dict")
            task_tuple = kwargs["task"]
            if name in {"start_flow", "all_over"}:
                pass
            elif not isinstance(task_tuple, tuple) or not task_tuple:
                problems.append(f"{name}: task {task_tuple!r} is not a tuple")
            error = kwargs.get("error")
            if name in SIGNALS_WITH_ERROR and not isinstance(error, BaseException):
                problems.append(f"{name}: error {error!r} is not an exception")
            if name not in SIGNALS_WITH_ERROR and error is not None:
                problems.append(f"{name}: unexpected error {error!r}")
            if name in {"task_start", "task_over", "task_exit", "task_timeout"}:
                if not isinstance(kwargs["attempt"], int):
                    problems.append(f"{name}: attempt {kwargs['attempt']!r} is not an int")

        return receiver

    return make_receiver


def test_every_signal_fires_with_the_promised_keyword_arguments(store_path):
    problems: list[str] = []
    fired: set[str] = set()
    checker = kwargs_checker(problems, fired)

    _, _, ok = run_recorded(TwoStageFlow, store_path, checker)
    _, _, failed = run_recorded(FailingFlow, store_path, checker, attempts=[])

    assert (ok.outcome, failed.outcome) == ("all_over", "failed_over")
    assert problems == []
    assert fired == set(SIGNAL_NAMES)


def test_signal_kwargs_carry_the_run_id_and_the_server_as_sender(store_path):
    seen: list[tuple[str, object, str]] = []

    def make_receiver(name):
        def receiver(sender, **kwargs):
            seen.append((name, sender, kwargs["run_id"]))

        return receiver

    server, handle, result = run_recorded(TwoStageFlow, store_path, make_receiver)

    assert result.run_id == handle.run_id
    assert len(seen) == len(TWO_STAGE_ORDER)
    assert {(sender is server, run_id) for _, sender, run_id in seen} == {(True, handle.run_id)}


def test_each_signal_carries_the_time_its_event_has_in_the_store(store_path):
    # ts is what a reader of the log sees for that moment (a tracer dates spans with it), not
    # the time the receiver happened to run.
    fired: list[tuple[object, ...]] = []

    def make_receiver(name):
        def receiver(sender, **kwargs):
            task_tuple = () if name in RUN_SIGNALS else kwargs["task"]
            attempt = None if name in RUN_SIGNALS else kwargs["attempt"]
            fired.append((name, *(task_tuple + (None, None))[:2], attempt, kwargs["ts"]))

        return receiver

    run_ids = [
        run_recorded(flow, store_path, make_receiver, attempts=[])[1].run_id
        for flow in (TwoStageFlow, FailingFlow)
    ]

    logged = {
        (SIGNAL_OF[e.kind], e.task, e.child_id, e.attempt, e.ts)
        for run_id in run_ids
        for e in EventStore(store_path).events(run_id)
        if e.kind in SIGNAL_OF
    }
    assert {name for name, *_ in fired} == set(SIGNAL_NAMES)
    assert [f for f in fired if f not in logged] == []


def test_task_exit_error_is_the_exception_the_task_raised(store_path):
    errors: list[BaseException] = []

    def record(sender, **kwargs):
        errors.append(kwargs["error"])

    with FailingFlow.start_link(store=store_path, attempts=[]) as server:
        with signals.task_exit.connected_to(record, sender=server):
            result = server.start_flow().result(timeout=30)

    assert result.outcome == "failed_over"
    assert [(type(e), str(e)) for e in errors] == [(ValueError, "boom 1"), (ValueError, "boom 3")]
    assert isinstance(result.error, ValueError)


# --- receivers that raise ---


def test_raising_receivers_do_not_stop_other_receivers_nor_the_run(store_path, caplog):
    calls: list[str] = []

    def make_raiser(label):
        def receiver(sender, **kwargs):
            calls.append(f"{label} {kwargs['task']!r}")
            raise RuntimeError(f"receiver {label} broke")

        return receiver

    caplog.set_level(logging.ERROR, logger="threadflow")
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(TwoStageFlow.start_link(store=store_path))
        for label in ("one", "two"):
            stack.enter_context(signals.task_over.connected_to(make_raiser(label), sender=server))
        result = server.start_flow().result(timeout=30)

    assert result.outcome == "all_over"
    overs = ["('first',)", "('first', 0)", "('first', 1)", "('second',)"]
    assert [c for c in calls if c.startswith("one ")] == [f"one {t}" for t in overs]
    assert [c for c in calls if c.startswith("two ")] == [f"two {t}" for t in overs]

    errors = [e for e in EventStore(store_path).events(result.run_id) if e.kind == "callback_error"]
    assert len(errors) == 8
    assert {e.data["signal"] for e in errors} == {"task_over"}
    assert all("broke" in json.dumps(e.data) for e in errors)
    assert any(
        r.name.startswith("threadflow") and "broke" in r.getMessage() + str(r.exc_info)
        for r in caplog.records
    )


def test_raising_handle_method_is_recorded_and_other_receivers_still_fire(store_path):
    calls: list[str] = []
    _, _, result = run_recorded(RaisingHandleFlow, store_path, order_recorder(calls))

    assert result.outcome == "all_over"
    assert calls == TWO_STAGE_ORDER
    errors = [e for e in EventStore(store_path).events(result.run_id) if e.kind == "callback_error"]
    assert [e.data["signal"] for e in errors] == ["task_over"] * 4
    assert all("handle_task_over broke" in json.dumps(e.data) for e in errors)


# --- persist, then signal ---


SIGNAL_EVENT_KINDS = {
    "start_flow": "flow_started",
    "task_start": "task_started",
    "task_over": "task_over",
    "task_all_over": "task_all_over",
    "all_over": "all_over",
}


def test_receivers_see_their_event_already_committed_in_the_store(store_path):
    checks: list[tuple[str, object, bool]] = []

    def make_receiver(name):
        def receiver(sender, **kwargs):
            kind = SIGNAL_EVENT_KINDS.get(name)
            if kind is None:
                return
            task_tuple = kwargs.get("task")
            conn = sqlite3.connect(store_path, timeout=30)
            try:
                rows = conn.execute(
                    "SELECT task, child_id FROM events WHERE run_id = ? AND kind = ?",
                    (kwargs["run_id"], kind),
                ).fetchall()
            finally:
                conn.close()
            if name in {"start_flow", "all_over"}:
                visible = len(rows) == 1
            else:
                child_id = task_tuple[1] if len(task_tuple) > 1 else None
                visible = any(
                    t == task_tuple[0] and (None if c is None else json.loads(c)) == child_id
                    for t, c in rows
                )
            checks.append((name, task_tuple, visible))

        return receiver

    _, _, result = run_recorded(TwoStageFlow, store_path, make_receiver)

    assert result.outcome == "all_over"
    assert len(checks) == len(TWO_STAGE_ORDER)
    assert [c for c in checks if not c[2]] == []


# --- handle_* overrides and state ---


def test_handle_methods_change_the_state_in_place_and_the_result_has_every_change(store_path):
    returned: queue.Queue = queue.Queue()
    with StateChangingFlow.start_link(store=store_path, return_to=returned) as server:
        result = server.start_flow().result(timeout=30)
        sent = returned.get(timeout=30)

    assert result.outcome == "all_over"
    for state in (result.state, sent.state):
        overs = state["overs"]
        assert overs[0] == ("first",)
        assert sorted(overs[1:3]) == [("first", 0), ("first", 1)]
        assert overs[3:] == [("second",)]
        assert state["stages_done"] == ["first", "second"]
        assert state["finished"] is True


def test_handle_task_failed_change_is_in_the_failed_result(store_path):
    with FailedStateFlow.start_link(store=store_path, attempts=[]) as server:
        result = server.start_flow().result(timeout=30)

    assert result.as_tuple() == ("failed_over", ("can_not_retry", ("work",), result.state))
    assert result.state["failed_seen"] == ("work",)


def test_state_change_in_handle_task_start_is_visible_to_the_task_function(store_path):
    markers: list[str] = []
    with MarkerFlow.start_link(store=store_path, markers=markers) as server:
        result = server.start_flow().result(timeout=30)

    assert result.outcome == "all_over"
    assert markers == ["fetch"]
    assert list(threadflow.results(result.state, "fetch")) == [(0, "fetch-0"), (1, "fetch-1")]


def test_handle_methods_are_held_strongly_and_survive_garbage_collection(store_path):
    handled: list[object] = []
    with StrongHandleFlow.start_link(store=store_path, handled=handled) as server:
        gc.collect()
        gc.collect()
        first = server.start_flow().result(timeout=30)
        gc.collect()
        second = server.start_flow().result(timeout=30)

    assert (first.outcome, second.outcome) == ("all_over", "all_over")
    assert handled == [("fetch",), "all_over", ("fetch",), "all_over"]


# --- threads ---


def test_callbacks_and_signals_all_run_on_the_one_coordinator_thread(store_path):
    callback_threads: list[str] = []
    worker_threads: list[str] = []
    receiver_threads: list[str] = []

    def make_receiver(name):
        def receiver(sender, **kwargs):
            receiver_threads.append(threading.current_thread().name)

        return receiver

    _, _, result = run_recorded(
        ThreadNamesFlow,
        store_path,
        make_receiver,
        callback_threads=callback_threads,
        worker_threads=worker_threads,
    )

    assert result.outcome == "all_over"
    assert len(receiver_threads) == len(callback_threads) > 0
    names = set(callback_threads) | set(receiver_threads)
    assert len(names) == 1
    (coordinator,) = names
    assert coordinator.startswith("threadflow-")
    assert coordinator != threading.main_thread().name
    assert len(worker_threads) == 5
    assert coordinator not in worker_threads


class RaisingAllOverFlow(TwoStageFlow):
    def handle_all_over(self, state):
        raise RuntimeError("handle_all_over broke")


def test_error_of_a_final_callback_is_in_the_store_when_the_result_is_delivered(store_path):
    # return_to runs on the coordinator thread as soon as the result is ready: whatever the run's
    # last callbacks recorded must already be committed then.
    seen: list = []

    def read_errors(result):
        seen.extend(EventStore(store_path).events(result.run_id, "callback_error"))

    result = RaisingAllOverFlow.run(store=store_path, return_to=read_errors)

    assert result.outcome == "all_over"
    assert [e.data["signal"] for e in seen] == ["all_over"]
