"""Hostile input and store faults: the engine never hangs, never dies, never loses a result.

Each test is a way a user's data, code or disk once killed the coordinator or hung
``result()``; see docs/reliability.md for the list of guarantees.
"""

import contextlib
import json
import logging
import math
import os
import pathlib
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading

import pytest
import subprocess_tasks as sub_tasks
from helpers import ctrl_c_able

import threadflow
from threadflow import (
    ALL_OVER,
    EncodeError,
    EventStore,
    Flow,
    FlowDefinitionError,
    add_children_tasks,
    signals,
    task,
)
from threadflow.store import Writer

HANG_GUARD = 30  # seconds: a result that takes longer means the engine hung
SURROGATE = "caf\udce9"  # what os.listdir() gives for b"caf\xe9" on a UTF-8 system


def events(path, run_id, kind=None):
    return [e for e in EventStore(path).events(run_id) if kind is None or e.kind == kind]


def all_event_data_is_json(path):
    with contextlib.closing(sqlite3.connect(path)) as conn:
        bad = conn.execute(
            "SELECT count(*) FROM events WHERE data IS NOT NULL AND NOT json_valid(data)"
        ).fetchone()[0]
    return bad == 0


# --- task functions --------------------------------------------------------------------------


def add_surrogate_children(state):
    add_children_tasks([(SURROGATE, {"name": SURROGATE}), (1, SURROGATE)], state)


def echo_payload(child, state):
    return child[1]


def collect_results(state):
    return sorted(map(repr, threadflow.results(state, "split")))


class Surrogates(Flow):
    split = task(
        task_func=add_surrogate_children,
        child_task_func=echo_payload,
        next="report",
    )
    report = task(task_func=collect_results, next=ALL_OVER)


def test_text_that_is_not_utf8_is_stored_losslessly(store_path):
    with Surrogates.start_link(store=store_path) as server:
        result = server.start_flow().result(timeout=HANG_GUARD)
    assert result.outcome == "all_over"
    got = dict(EventStore(store_path).results(result.run_id, "split"))
    assert got == {SURROGATE: {"name": SURROGATE}, 1: SURROGATE}
    assert all_event_data_is_json(store_path)


def return_surrogate(state):
    return SURROGATE


class SurrogateLast(Flow):
    only = task(task_func=return_surrogate, next=ALL_OVER)


def test_a_lone_surrogate_in_the_last_result_of_a_run_does_not_hang_run(store_path):
    # The run's last turn is where a failed write used to hang Flow.run() for ever.
    with SurrogateLast.start_link(store=store_path) as server:
        result = server.start_flow().result(timeout=HANG_GUARD)
    assert result.outcome == "all_over"
    [over] = events(store_path, result.run_id, "task_over")
    assert over.data == {"result": SURROGATE}


# --- numbers JSON cannot hold ----------------------------------------------------------------


def add_payload_from_state(state):
    add_children_tasks([(state["child_id"], state["payload"])], state)


def return_from_state(state):
    return state["value"]


class AddsOne(Flow):
    split = task(
        task_func=add_payload_from_state,
        child_task_func=echo_payload,
        task_retry_limit=1,
        next=ALL_OVER,
    )


class Returns(Flow):
    only = task(task_func=return_from_state, task_retry_limit=1, next=ALL_OVER)


@pytest.mark.parametrize(
    ("child_id", "payload", "says"),
    [
        (10**5000, None, "4,300 digits"),
        (1, {"ratio": math.nan}, "nan or infinite"),
        (2, [math.inf], "nan or infinite"),
        (math.nan, None, "not a JSON scalar"),
    ],
    ids=["huge-int-id", "nan-payload", "inf-payload", "nan-id"],
)
def test_children_json_cannot_hold_are_refused_with_a_type_error(
    store_path, child_id, payload, says
):
    with AddsOne.start_link(store=store_path, child_id=child_id, payload=payload) as server:
        result = server.start_flow().result(timeout=HANG_GUARD)
    assert result.outcome == "failed_over"
    assert isinstance(result.error, TypeError)
    assert says in str(result.error)
    assert "split" in str(result.error)
    assert all_event_data_is_json(store_path)


@pytest.mark.parametrize(
    "value",
    [math.nan, -math.inf, {"x": [1.0, math.inf]}, 10**5000, pathlib.Path("/photos/a.jpg")],
    ids=["nan", "-inf", "nested-inf", "huge-int", "path"],
)
def test_a_result_json_cannot_hold_fails_the_attempt_instead_of_being_lost(store_path, value):
    with Returns.start_link(store=store_path, value=value) as server:
        result = server.start_flow().result(timeout=HANG_GUARD)
    assert result.outcome == "failed_over"
    assert isinstance(result.error, EncodeError)
    assert "cannot be stored" in str(result.error)
    assert all_event_data_is_json(store_path)
    [exit_event] = events(store_path, result.run_id, "exit")
    assert exit_event.data["error"]["type"] == "threadflow.errors.EncodeError"


def test_an_infinite_retry_delay_is_refused_when_the_class_is_made():
    with pytest.raises(FlowDefinitionError, match="task_retry_delay=inf; use finite seconds"):

        class Never(Flow):
            only = task(task_func=return_surrogate, task_retry_delay=math.inf, next=ALL_OVER)


def fail_first_attempt(state):
    state["attempts"].append(1)
    if len(state["attempts"]) == 1:
        raise ValueError("first attempt fails")
    return len(state["attempts"])


class FarNumbers(Flow):
    # A timeout ten billion seconds away, and a delay function that answers infinity.
    only = task(
        task_func=fail_first_attempt,
        task_timeout=1e10,
        task_retry_limit=2,
        task_retry_delay=lambda n: math.inf,
        next=ALL_OVER,
    )


def test_far_deadlines_and_an_infinite_delay_do_not_stop_the_engine(store_path, caplog):
    with FarNumbers.start_link(store=store_path, attempts=[]) as server:
        result = server.start_flow().result(timeout=HANG_GUARD)
    assert result.outcome == "all_over"
    assert result.state["attempts"] == [1, 1]
    assert "returned inf; retrying at once" in caplog.text


# --- exceptions and receivers that misbehave -------------------------------------------------


class Unprintable(Exception):
    def __str__(self):
        raise RuntimeError("__str__ is broken too")


def raise_unprintable(state):
    raise Unprintable()


def raise_unprintable_child(child, state):
    raise Unprintable()


def add_three(state):
    add_children_tasks([(0, None), (1, None), (2, None)], state)


class UnprintableParent(Flow):
    only = task(task_func=raise_unprintable, task_retry_limit=1, next=ALL_OVER)


class UnprintableChildren(Flow):
    split = task(
        task_func=add_three,
        child_task_func=raise_unprintable_child,
        exit_on_failed=False,
        task_retry_limit=2,
        next=ALL_OVER,
    )


def test_an_exception_whose_str_raises_is_recorded_not_fatal(store_path):
    with UnprintableParent.start_link(store=store_path) as server:
        result = server.start_flow().result(timeout=HANG_GUARD)
    assert result.outcome == "failed_over"
    assert isinstance(result.error, Unprintable)
    [exit_event] = events(store_path, result.run_id, "exit")
    assert exit_event.data["error"]["type"].endswith("Unprintable")
    assert "str() of this" in exit_event.data["error"]["message"]
    [failed] = events(store_path, result.run_id, "failed_over")
    assert "str() of this" in failed.data["error"]["message"]


def test_children_whose_errors_cannot_be_printed_are_retried_and_tolerated(store_path):
    with UnprintableChildren.start_link(store=store_path) as server:
        result = server.start_flow().result(timeout=HANG_GUARD)
    assert result.outcome == "all_over"
    assert sorted(result.failed) == [("split", 0), ("split", 1), ("split", 2)]
    assert len(events(store_path, result.run_id, "exit")) == 6
    assert not events(store_path, result.run_id, "timeout")


class Plain(Flow):
    split = task(task_func=add_three, child_task_func=echo_payload, next=ALL_OVER)


@pytest.mark.parametrize(
    "raised",
    [Unprintable(), SystemExit(3), KeyboardInterrupt(), threadflow.CancelledError("stop")],
    ids=["unprintable", "SystemExit", "KeyboardInterrupt", "CancelledError"],
)
def test_a_receiver_that_raises_anything_never_ends_the_engine(store_path, raised):
    def receiver(sender, **kw):
        raise raised

    with Plain.start_link(store=store_path) as server:
        with signals.task_over.connected_to(receiver, sender=server):
            first = server.start_flow().result(timeout=HANG_GUARD)
        second = server.start_flow().result(timeout=HANG_GUARD)  # the server still serves
    assert (first.outcome, second.outcome) == ("all_over", "all_over")
    errors = events(store_path, first.run_id, "callback_error")
    assert len(errors) == 4  # the parent and three children
    assert errors[0].data["error"]["type"].endswith(type(raised).__name__)


def test_a_return_to_that_raises_system_exit_does_not_stop_the_server(store_path):
    got = []

    def return_to(result):
        got.append(result.outcome)
        raise SystemExit("no")

    with Plain.start_link(store=store_path, return_to=return_to) as server:
        first = server.start_flow().result(timeout=HANG_GUARD)
        second = server.start_flow().result(timeout=HANG_GUARD)
    assert (first.outcome, second.outcome) == ("all_over", "all_over")
    assert got == ["all_over", "all_over"]


# --- store faults ----------------------------------------------------------------------------


class Fault:
    """Makes one call of a Writer method fail, once armed (a fault the test injects)."""

    def __init__(self, monkeypatch, method, error):
        self.armed = threading.Event()
        self.fired = threading.Event()
        original = getattr(Writer, method)
        fault = self

        def failing(writer, *args, **kwargs):
            if fault.armed.is_set() and not fault.fired.is_set():
                fault.fired.set()
                raise error
            return original(writer, *args, **kwargs)

        monkeypatch.setattr(Writer, method, failing)


def arm_then_add(state):
    add_children_tasks(((i, None) for i in range(20)), state)
    state["fault"].armed.set()


def count_child(child, state):
    return child[0]


def arm_and_finish(state):
    state["fault"].armed.set()
    return "done"


class TwoStages(Flow):
    split = task(task_func=add_three, child_task_func=count_child, next="last")
    last = task(task_func=arm_and_finish, next=ALL_OVER)


class Wide(Flow):
    split = task(
        task_func=arm_then_add, child_task_func=count_child, max_concurrency=2, next=ALL_OVER
    )


def task_overs(path, run_id):
    return [(e.task, e.child_id) for e in events(path, run_id, "task_over")]


def test_a_commit_that_fails_in_the_last_turn_still_delivers_a_result(store_path, monkeypatch):
    fault = Fault(monkeypatch, "commit", sqlite3.OperationalError("database or disk is full"))
    with TwoStages.start_link(store=store_path, fault=fault) as server:
        result = server.start_flow().result(timeout=HANG_GUARD)
    assert fault.fired.is_set()
    assert result.outcome == "interrupted"
    assert "database or disk is full" in str(result.error)
    # The log ends where the last commit left it, marked interrupted: it can be replayed.
    info = EventStore(store_path).run(result.run_id)
    assert (info.outcome, info.status) == ("interrupted", "interrupted")
    assert not events(store_path, result.run_id, "all_over")
    [crash] = events(store_path, result.run_id, "interrupted")
    assert crash.data["reason"] == "crash"

    again = TwoStages.replay(result.run_id, store=store_path, fault=fault)
    assert again.outcome == "all_over"
    overs = task_overs(store_path, result.run_id)
    assert sorted(overs.count(("split", i)) for i in range(3)) == [1, 1, 1]  # not run again


def test_a_store_fault_mid_run_marks_the_run_interrupted_at_once(store_path, monkeypatch):
    fault = Fault(monkeypatch, "read_children", sqlite3.DatabaseError("disk I/O error"))
    with Wide.start_link(store=store_path, fault=fault) as server:
        result = server.start_flow().result(timeout=HANG_GUARD)
        # Not "running" until the lease runs out: the run is replayable right away.
        assert EventStore(store_path).run(result.run_id).status == "interrupted"
    assert result.outcome == "interrupted"
    assert "disk I/O error" in str(result.error)

    again = Wide.replay(result.run_id, store=store_path, fault=fault)
    assert again.outcome == "all_over"
    overs = task_overs(store_path, result.run_id)
    assert sorted(overs.count(("split", i)) for i in range(20)) == [1] * 20


FULL_DISK_SCRIPT = textwrap.dedent(
    """
    import json, resource, signal, sys
    sys.path.insert(0, sys.argv[2])
    from test_reliability import Fill

    # A small file size limit is a full disk for SQLite: writes fail with SQLITE_FULL.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, resource.RLIM_INFINITY))
    result = Fill.run(store=sys.argv[1])
    print(json.dumps({"outcome": result.outcome, "error": str(result.error),
                      "run_id": result.run_id}))
    """
)


def add_many(state):
    add_children_tasks(((i, None) for i in range(300)), state)


def big_result(child, state):
    return "x" * 20_000


class Fill(Flow):
    split = task(task_func=add_many, child_task_func=big_result, max_concurrency=4, next=ALL_OVER)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="RLIMIT_FSIZE is a POSIX limit")
def test_a_full_disk_ends_the_run_interrupted_and_the_log_replays(store_path):
    here = os.path.dirname(__file__)
    proc = subprocess.run(
        [sys.executable, "-c", FULL_DISK_SCRIPT, store_path, here],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    first = json.loads(proc.stdout.splitlines()[-1])
    assert first["outcome"] == "interrupted"
    assert "sqlite3.OperationalError" in first["error"]  # SQLite reports EFBIG as an I/O error
    with contextlib.closing(sqlite3.connect(store_path)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

    again = Fill.replay(first["run_id"], store=store_path)
    assert again.outcome == "all_over"
    overs = task_overs(store_path, first["run_id"])
    assert len(overs) == 301 and len(set(overs)) == 301  # each task and child over once


# --- stop() ----------------------------------------------------------------------------------


def stop_own_server(state):
    threadflow.Flow.whereis(state["name"]).stop()
    state["stop_returned"].set()
    return "returned after stop()"


class StopsItself(Flow, server_name="stops-itself"):
    stop_grace = 60.0  # a stop() that waited for its own caller would wait this long
    only = task(task_func=stop_own_server, next=ALL_OVER)


def test_stop_called_inside_a_task_returns_at_once_and_the_stop_goes_on(store_path):
    stop_returned = threading.Event()
    server = StopsItself.start_link(
        store=store_path, name="stops-itself", stop_returned=stop_returned
    )
    result = server.start_flow().result(timeout=HANG_GUARD)
    assert stop_returned.is_set()
    assert result.outcome == "interrupted"
    assert not events(store_path, result.run_id, "abandoned")
    [over] = events(store_path, result.run_id, "task_over")
    assert over.data == {"result": "returned after stop()"}


def ignore_token(state):
    state["entered"].set()
    state["gate"].wait(HANG_GUARD)


class Stubborn(Flow):
    stop_grace = 0.1
    only = task(task_func=ignore_token, next=ALL_OVER)


def test_stop_logs_a_warning_naming_each_abandoned_attempt(store_path, caplog):
    entered, gate = threading.Event(), threading.Event()
    server = Stubborn.start_link(store=store_path, entered=entered, gate=gate)
    try:
        handle = server.start_flow()
        assert entered.wait(HANG_GUARD)
        with caplog.at_level(logging.WARNING, logger="threadflow"):
            server.stop()
    finally:
        gate.set()
    assert handle.result(timeout=HANG_GUARD).outcome == "interrupted"
    [record] = [r for r in caplog.records if "abandoned" in r.getMessage()]
    assert record.levelno == logging.WARNING and record.name == "threadflow"
    message = record.getMessage()
    assert "('only',) attempt 1" in message
    assert "threadflow-worker-" in message  # the thread still running it
    assert handle.run_id in message


class HangsInProcess(Flow):
    abandon_grace = 4.0
    kill_grace = 1.0
    work = task(
        task_func=sub_tasks.hang_first,
        isolation="subprocess",
        task_timeout=0.3,
        task_retry_limit=1,
        next=ALL_OVER,
    )


def test_a_stop_within_kill_grace_of_a_timeout_still_records_the_kill(store_path, tmp_path):
    with HangsInProcess.start_link(store=store_path, dir=str(tmp_path)) as server:
        result = server.start_flow().result(timeout=HANG_GUARD)
        assert result.outcome == "failed_over"  # timed out; its process is not killed yet
        server.stop()
    [stale] = events(store_path, result.run_id, "stale")
    assert stale.data["process"]["killed"] == "timeout"
    assert stale.data["process"]["signal"] == "SIGKILL"


CTRL_C_SCRIPT = textwrap.dedent(
    """
    import sys, threading
    import threadflow
    from threadflow import ALL_OVER, Flow, task

    def hang(state):
        print("running", flush=True)
        threadflow.current_token().wait(60)

    class Hangs(Flow):
        stop_grace = 0.5
        only = task(task_func=hang, next=ALL_OVER)

    Hangs.run(store=sys.argv[1])
    """
)


def test_ctrl_c_in_flow_run_records_the_run_interrupted_and_says_how_to_replay(store_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", CTRL_C_SCRIPT, store_path],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=ctrl_c_able,
    )
    try:
        assert proc.stdout.readline().strip() == "running"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=HANG_GUARD)
    finally:
        proc.kill()
    assert proc.returncode != 0  # the KeyboardInterrupt still ends the program
    [info] = EventStore(store_path).runs()
    assert info.status == "interrupted"
    assert f"Run {info.run_id} is recorded interrupted: continue it with Hangs.replay(" in err
    assert f"threadflow replay {info.run_id} --db {store_path}" in err
