"""isolation="subprocess": attempts in worker processes that are killed, reaped and retried.

Real processes throughout. Task functions live in ``subprocess_tasks`` (a worker process imports
them by name) and report through files in ``state["dir"]``; the test waits for those files, or
for a process to be gone, with a bounded check of the operating system's state.
"""

import functools
import json
import os
import signal as signals_module
import subprocess
import sys
import textwrap
import threading
import time
import types
from pathlib import Path

import freezegun
import pytest
import subprocess_tasks as tasks
from helpers import wait_until

import threadflow
from threadflow import (
    ALL_OVER,
    EventStore,
    Flow,
    FlowDefinitionError,
    ProcessDiedError,
    ThreadflowError,
    results,
    signals,
    task,
)

HANG_GUARD = 30  # seconds: only a guard against a hanging test, never a synchronisation
GONE_WITHIN = 5.0  # seconds a killed process gets to disappear
# A task's timeout covers the boot of a new process (about 0.1 s; over a second on a machine
# running several test suites at once): long enough for that, short enough to keep the file
# quick.
TIMEOUT = 2.0


# --- helpers ------------------------------------------------------------------------------------


def reaped(pid):
    """True once ``pid`` no longer exists at all (a zombie still does: it was not reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def dead(pid):
    """True once ``pid`` has ended: gone, or a zombie waiting for its (new) parent to reap it."""
    if reaped(pid):
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    except OSError:  # no /proc (macOS): trust kill(pid, 0)
        return False
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def read_pid(directory, name):
    path = Path(directory, name)
    assert wait_until(path.exists, HANG_GUARD), f"{name} never appeared"
    return int(path.read_text())


def recorder(seen):
    """A signal receiver that keeps the ``error`` of each signal sent."""
    return lambda sender, **kw: seen.append(kw["error"])


def events(store_path, run_id, kind=None):
    return EventStore(store_path).events(run_id, kind)


def event_data(store_path, run_id, kind):
    return [e.data for e in events(store_path, run_id, kind)]


# --- running in a process -----------------------------------------------------------------------


class Probe(Flow):
    look = task(task_func=tasks.pid_and_state, isolation="subprocess", next="again")
    again = task(task_func=tasks.pid, isolation="subprocess", next=ALL_OVER)


def test_task_runs_in_another_process_with_a_copy_of_the_state(store_path, tmp_path):
    with Probe.start_link(store=store_path, dir=str(tmp_path), extra=[1, "two"]) as server:
        res = server.start_flow().result(timeout=HANG_GUARD)

    assert res.outcome == "all_over", res.error
    [look] = event_data(store_path, res.run_id, "task_over")[:1]
    seen = look["result"]
    assert seen["pid"] != os.getpid()
    assert seen["keys"] == [
        "dir",
        "extra",
        "replayed",
        "run_id",
        "start_time",
        "store",
        "task_flow",
    ]
    assert seen["extra"] == [1, "two"]
    assert seen["cancelled"] is False


def test_a_warm_process_runs_the_next_attempt(store_path, tmp_path):
    with Probe.start_link(store=store_path, dir=str(tmp_path)) as server:
        res = server.start_flow().result(timeout=HANG_GUARD)

    look, again = [d["result"] for d in event_data(store_path, res.run_id, "task_over")]
    assert look["pid"] == again


class OneAtATime(Flow):
    split = task(
        task_func=tasks.add_five,
        child_task_func=tasks.child_pid,
        isolation="subprocess",
        max_concurrency=1,
        next=ALL_OVER,
    )


def test_attempts_one_after_another_all_run_in_the_same_warm_process(store_path, tmp_path):
    with OneAtATime.start_link(store=store_path, dir=str(tmp_path)) as server:
        res = server.start_flow().result(timeout=HANG_GUARD)

    assert res.outcome == "all_over", res.error
    assert len({pid for _, pid in results(res.state, "split")}) == 1


class ReadStore(Flow):
    split = task(
        task_func=tasks.add_three,
        child_task_func=tasks.double,
        isolation="subprocess",
        next="read",
    )
    read = task(task_func=tasks.results_of, isolation="subprocess", next=ALL_OVER)


def test_children_added_in_a_process_are_durable_and_run_in_processes(store_path, tmp_path):
    with ReadStore.start_link(store=store_path, dir=str(tmp_path)) as server:
        res = server.start_flow().result(timeout=HANG_GUARD)

    assert res.outcome == "all_over", res.error
    assert list(results(res.state, "split")) == [(0, 0), (1, 20), (2, 40)]
    added = events(store_path, res.run_id, "child_added")
    over_split = [e for e in events(store_path, res.run_id, "task_over") if e.task == "split"]
    assert [e.child_id for e in added] == [0, 1, 2]
    assert added[-1].seq < over_split[0].seq  # durable before the parent attempt ended
    read = event_data(store_path, res.run_id, "task_over")[-1]["result"]
    assert read == {"flow": "ReadStore", "results": [[0, 0], [1, 20], [2, 40]]}


class Nested(Flow):
    split = task(
        task_func=tasks.add_two,
        child_task_func=tasks.child_adds_children,
        isolation="subprocess",
        max_concurrency=2,
        next=ALL_OVER,
    )


def test_children_in_processes_add_children(store_path, tmp_path):
    with Nested.start_link(store=store_path, dir=str(tmp_path)) as server:
        res = server.start_flow().result(timeout=HANG_GUARD)

    assert res.outcome == "all_over", res.error
    assert sorted(results(res.state, "split"), key=str) == sorted(
        [(0, 1), (1, 2), ("0.0", 10), ("0.1", 11), ("1.0", 20), ("1.1", 21)], key=str
    )
    by = {e.child_id: e.data["by"] for e in events(store_path, res.run_id, "child_added")}
    assert by == {0: None, 1: None, "0.0": 0, "0.1": 0, "1.0": 1, "1.1": 1}


class AddErrors(Flow):
    split = task(
        task_func=tasks.add_duplicate_and_bad,
        child_task_func=tasks.double,
        isolation="subprocess",
        next=ALL_OVER,
    )


def test_add_child_errors_reach_the_task_with_their_type(store_path, tmp_path):
    with AddErrors.start_link(store=store_path, dir=str(tmp_path)) as server:
        res = server.start_flow().result(timeout=HANG_GUARD)

    parent = next(d for d in event_data(store_path, res.run_id, "task_over") if d)
    assert parent["result"]["duplicate"] == ["DuplicateChildError", "split", 1]
    assert "child 2" in parent["result"]["bad"]
    assert "JSON" in parent["result"]["bad"]


# --- deaths -------------------------------------------------------------------------------------


class Dies(Flow):
    work = task(task_func=tasks.die_first, isolation="subprocess", next=ALL_OVER)


@pytest.mark.parametrize(
    ("how", "exitcode", "signal"), [("exit", 3, None), ("segv", -signals_module.SIGSEGV, "SIGSEGV")]
)
def test_a_process_that_dies_is_an_exit_with_its_code_then_a_retry(
    store_path, tmp_path, how, exitcode, signal
):
    seen = []
    with Dies.start_link(store=store_path, dir=str(tmp_path), how=how) as server:
        with signals.task_exit.connected_to(recorder(seen), sender=server):
            res = server.start_flow().result(timeout=HANG_GUARD)

    assert res.outcome == "all_over", res.error
    [exit_event] = events(store_path, res.run_id, "exit")
    process = exit_event.data["process"]
    assert (process["exitcode"], process["signal"], process["killed"]) == (exitcode, signal, None)
    assert exit_event.data["error"]["type"] == "threadflow.errors.ProcessDiedError"
    assert reaped(process["pid"])
    [error] = seen
    assert isinstance(error, ProcessDiedError)
    assert (error.exitcode, error.signal, error.pid) == (exitcode, signal, process["pid"])
    assert [e.kind for e in events(store_path, res.run_id) if e.task == "work"] == [
        "task_started",
        "exit",
        "retry",
        "task_started",
        "task_over",
        "task_all_over",
    ]


class DiesLeavingAProcess(Flow):
    work = task(
        task_func=tasks.die_leaving_a_forked_process_first, isolation="subprocess", next=ALL_OVER
    )


def test_a_death_is_seen_although_a_forked_process_lives_on_and_that_one_is_killed(
    store_path, tmp_path
):
    with DiesLeavingAProcess.start_link(store=store_path, dir=str(tmp_path)) as server:
        res = server.start_flow().result(timeout=HANG_GUARD)

    assert res.outcome == "all_over", res.error
    [exit_event] = event_data(store_path, res.run_id, "exit")
    assert exit_event["process"]["exitcode"] == 3
    assert wait_until(lambda: dead(read_pid(tmp_path, "grandchild.pid")), GONE_WITHIN)


class Unpicklable(Flow):
    result = task(task_func=tasks.return_unpicklable, isolation="subprocess", next="error")
    error = task(
        task_func=tasks.raise_unpicklable,
        isolation="subprocess",
        task_retry_limit=2,
        next=ALL_OVER,
    )


def test_an_unstorable_result_fails_the_attempt_like_a_thread_result(store_path, tmp_path):
    with Unpicklable.start_link(store=store_path, dir=str(tmp_path)) as server:
        res = server.start_flow(entrance="result").result(timeout=HANG_GUARD)

    assert res.outcome == "failed_over"
    assert isinstance(res.error, threadflow.EncodeError)
    assert "_thread.lock" in str(res.error)
    assert len(event_data(store_path, res.run_id, "exit")) == 1  # not retried


def test_an_unpicklable_exception_is_a_clear_exit_error(store_path, tmp_path):
    with Unpicklable.start_link(store=store_path, dir=str(tmp_path)) as server:
        res = server.start_flow(entrance="error").result(timeout=HANG_GUARD)

    assert res.outcome == "failed_over"
    assert type(res.error) is ThreadflowError
    assert "TwoArgumentError: row 7: bad value" in str(res.error)
    assert "cannot be brought back" in str(res.error)
    exits = event_data(store_path, res.run_id, "exit")
    assert len(exits) == 2  # retried, like any exit
    assert exits[0]["error"]["type"] == "subprocess_tasks.TwoArgumentError"
    assert "raise TwoArgumentError" in exits[0]["error"]["traceback"]


class Raises(Flow):
    work = task(
        task_func=tasks.raise_value_error_first,
        isolation="subprocess",
        retry_on=ValueError,
        next=ALL_OVER,
    )


def test_an_exception_comes_back_with_its_type_for_retry_on_and_callbacks(store_path, tmp_path):
    seen = []
    with Raises.start_link(store=store_path, dir=str(tmp_path)) as server:
        with signals.task_exit.connected_to(recorder(seen), sender=server):
            res = server.start_flow().result(timeout=HANG_GUARD)

    assert res.outcome == "all_over"
    [error] = seen
    assert type(error) is ValueError
    assert str(error) == "bad row 7"


# --- timeouts and kills -------------------------------------------------------------------------


class Hangs(Flow):
    work = task(
        task_func=tasks.hang_first,
        isolation="subprocess",
        task_timeout=TIMEOUT,
        task_retry_limit=2,
        next=ALL_OVER,
    )


def test_a_hanging_process_is_killed_soon_after_its_deadline_and_reaped(store_path, tmp_path):
    fired = []
    with Hangs.start_link(store=store_path, dir=str(tmp_path)) as server:
        with signals.task_timeout.connected_to(
            lambda s, **kw: fired.append(time.monotonic()), sender=server
        ):
            res = server.start_flow().result(timeout=HANG_GUARD)
        first = read_pid(tmp_path, "hang-1.pid")
        assert wait_until(lambda: reaped(first), GONE_WITHIN), "the hanging process is still there"
        gone_after = time.monotonic() - fired[0]
        assert wait_until(lambda: events(store_path, res.run_id, "stale"), GONE_WITHIN)

    assert res.outcome == "all_over"
    assert gone_after < server.kill_grace + 2.0
    assert read_pid(tmp_path, "hang-2.pid") != first  # a killed process is not reused
    [stale] = event_data(store_path, res.run_id, "stale")
    assert stale["process"] == {
        "pid": first,
        "exitcode": -signals_module.SIGKILL,
        "signal": "SIGKILL",
        "killed": "timeout",
    }
    assert stale["error"]["type"] == "threadflow.errors.ProcessDiedError"
    assert server.abandoned == 0
    assert events(store_path, res.run_id, "abandoned") == []


class HangsWithGrandchild(Flow):
    work = task(
        task_func=tasks.hang_with_grandchild_first,
        isolation="subprocess",
        task_timeout=TIMEOUT,
        task_retry_limit=2,
        next=ALL_OVER,
    )


def test_a_process_the_task_started_is_killed_with_it(store_path, tmp_path):
    with HangsWithGrandchild.start_link(store=store_path, dir=str(tmp_path)) as server:
        res = server.start_flow().result(timeout=HANG_GUARD)

    assert res.outcome == "all_over"
    grandchild = read_pid(tmp_path, "grandchild.pid")
    assert wait_until(lambda: dead(grandchild), GONE_WITHIN), (
        "the task's own process survived the kill"
    )
    assert reaped(read_pid(tmp_path, "hang-1.pid"))


class SleepsCooperatively(Flow):
    work = task(
        task_func=tasks.sleep_cooperatively_first,
        isolation="subprocess",
        task_timeout=TIMEOUT,
        task_retry_limit=2,
        next=ALL_OVER,
    )


def test_threadflow_sleep_in_a_process_wakes_on_timeout(store_path, tmp_path):
    with SleepsCooperatively.start_link(store=store_path, dir=str(tmp_path)) as server:
        res = server.start_flow().result(timeout=HANG_GUARD)
        assert wait_until(lambda: events(store_path, res.run_id, "stale"), GONE_WITHIN)

    assert res.outcome == "all_over"
    assert Path(tmp_path, "cancelled").read_text() == "timeout"
    [stale] = event_data(store_path, res.run_id, "stale")
    # It returned within the grace, with the CancelledError; its group is killed all the same.
    assert stale["error"]["type"] == "threadflow.errors.CancelledError"
    assert stale["process"]["killed"] == "timeout"
    assert reaped(read_pid(tmp_path, "sleep-1.pid"))


def test_timeouts_kill_processes_under_a_frozen_clock(store_path, tmp_path):
    with freezegun.freeze_time("2020-01-01"):
        with Hangs.start_link(store=store_path, dir=str(tmp_path)) as server:
            res = server.start_flow().result(timeout=HANG_GUARD)

    assert res.outcome == "all_over"
    assert wait_until(lambda: reaped(read_pid(tmp_path, "hang-1.pid")), GONE_WITHIN)
    assert all(e.ts.startswith("2020-01-01") for e in events(store_path, res.run_id))


# --- stop ---------------------------------------------------------------------------------------


class HangingChildren(Flow):
    split = task(
        task_func=tasks.add_two,
        child_task_func=tasks.hang_child_with_grandchild,
        isolation="subprocess",
        max_concurrency=2,
        next=ALL_OVER,
    )


def start_hanging_children(store_path, tmp_path):
    server = HangingChildren.start_link(store=store_path, dir=str(tmp_path))
    handle = server.start_flow()
    pids = [read_pid(tmp_path, f"child-{i}.pid") for i in (0, 1)]
    grandchildren = [read_pid(tmp_path, f"grandchild-{i}.pid") for i in (0, 1)]
    return server, handle, pids, grandchildren


def test_stop_during_running_attempts_leaves_no_process_behind(store_path, tmp_path):
    server, handle, pids, grandchildren = start_hanging_children(store_path, tmp_path)

    server.stop(timeout=HANG_GUARD)

    assert [pid for pid in pids if not reaped(pid)] == []
    assert wait_until(lambda: all(dead(pid) for pid in grandchildren), GONE_WITHIN)
    res = handle.result(timeout=HANG_GUARD)
    assert res.outcome == "interrupted"
    kills = [d["process"] for d in event_data(store_path, res.run_id, "exit")]
    assert sorted(k["pid"] for k in kills) == sorted(pids)
    assert {(k["signal"], k["killed"]) for k in kills} == {("SIGKILL", "stop")}


def test_stop_with_a_short_timeout_still_kills_every_process(store_path, tmp_path):
    server, handle, pids, grandchildren = start_hanging_children(store_path, tmp_path)

    server.stop(timeout=0.1)  # shorter than the kill grace: the pool's shutdown kills them

    assert wait_until(lambda: all(reaped(pid) for pid in pids), GONE_WITHIN)
    assert wait_until(lambda: all(dead(pid) for pid in grandchildren), GONE_WITHIN)
    assert handle.result(timeout=HANG_GUARD).outcome == "interrupted"


# --- state copy ---------------------------------------------------------------------------------


def test_state_entries_that_do_not_pickle_are_left_out_with_one_warning(store_path, tmp_path):
    with pytest.warns(RuntimeWarning, match=r"'lock' \(lock: ") as record:
        with Probe.start_link(store=store_path, dir=str(tmp_path), lock=threading.Lock()) as server:
            res = server.start_flow().result(timeout=HANG_GUARD)

    assert res.outcome == "all_over", res.error
    assert len([w for w in record if "'lock'" in str(w.message)]) == 1  # two tasks, one warning
    seen = event_data(store_path, res.run_id, "task_over")[0]["result"]
    assert "lock" not in seen["keys"]
    assert "dir" in seen["keys"]


# --- definitions --------------------------------------------------------------------------------


def define_with(func):
    class Defined(Flow):
        work = task(task_func=func, isolation="subprocess", next=ALL_OVER)

    return Defined


def test_a_function_of_an_interactive_main_is_rejected(monkeypatch):
    main = types.ModuleType("__main__")  # no __file__, no __spec__: a REPL or python -c

    def work(state):
        return None

    work.__module__, work.__qualname__ = "__main__", "work"
    main.work = work
    monkeypatch.setitem(sys.modules, "__main__", main)

    with pytest.raises(FlowDefinitionError, match=r"(?s)Defined.*work.*interactive.*module"):
        define_with(work)


def test_a_function_of_a_script_main_is_accepted(monkeypatch, tmp_path):
    main = types.ModuleType("__main__")
    main.__file__ = str(tmp_path / "script.py")

    def work(state):
        return None

    work.__module__, work.__qualname__ = "__main__", "work"
    main.work = work
    monkeypatch.setitem(sys.modules, "__main__", main)

    assert define_with(work).definition is not None


def test_a_partial_with_arguments_that_do_not_pickle_is_rejected():
    func = functools.partial(tasks.double, threading.Lock())  # double(lock, state)

    with pytest.raises(FlowDefinitionError, match=r"(?s)Defined.*cannot be pickled.*module"):
        define_with(func)


# --- whole programs -----------------------------------------------------------------------------

SCRIPT = """
import json, os, sys, time
from pathlib import Path
from threadflow import ALL_OVER, Flow, task

def work(state):
    Path(state["dir"], "worker.pid").write_text(str(os.getpid()))
    if state["hang"]:
        time.sleep(60)
    return os.getpid()

class Script(Flow):
    work = task(task_func=work, isolation="subprocess", next=ALL_OVER)

if __name__ == "__main__":
    hang = sys.argv[1].startswith("hang")
    server = Script.start_link(store=sys.argv[2], dir=sys.argv[3], hang=hang)
    handle = server.start_flow()
    if hang:  # leave without stop(): the program's exit must not leave the worker behind
        while not Path(sys.argv[3], "worker.pid").exists():
            time.sleep(0.01)
        print(json.dumps({"run_id": handle.run_id}), flush=True)
        if sys.argv[1] == "hang-until-killed":
            time.sleep(60)
    else:
        res = handle.result(timeout=30)
        print(json.dumps({"outcome": res.outcome, "run_id": res.run_id, "me": os.getpid()}))
        server.stop()
"""


def script_command(tmp_path, store_path, mode):
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(SCRIPT))
    return [sys.executable, str(script), mode, store_path, str(tmp_path)]


def run_script(tmp_path, store_path, mode):
    out = subprocess.run(
        script_command(tmp_path, store_path, mode),
        capture_output=True,
        text=True,
        timeout=HANG_GUARD,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_a_task_function_of_a_script_runs_in_a_process(tmp_path, store_path):
    report = run_script(tmp_path, store_path, "return")

    assert report["outcome"] == "all_over"
    [over] = event_data(store_path, report["run_id"], "task_over")
    assert over["result"] != report["me"]


def test_a_program_that_exits_without_stop_leaves_no_worker_behind(tmp_path, store_path):
    report = run_script(tmp_path, store_path, "hang")

    worker = int(Path(tmp_path, "worker.pid").read_text())
    assert wait_until(lambda: dead(worker), GONE_WITHIN)
    [run] = EventStore(store_path).runs()
    assert (run.run_id, run.outcome) == (report["run_id"], "interrupted")
    # The server stopped first and killed it; multiprocessing's own exit hook (SIGTERM) came
    # too late to matter.
    [killed] = event_data(store_path, run.run_id, "exit")
    assert (killed["process"]["signal"], killed["process"]["killed"]) == ("SIGKILL", "stop")


def test_workers_of_a_program_killed_with_sigkill_kill_themselves(tmp_path, store_path):
    program = subprocess.Popen(
        script_command(tmp_path, store_path, "hang-until-killed"),
        stdout=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        program.stdout.readline()  # the worker runs the task
        worker = int(Path(tmp_path, "worker.pid").read_text())
    finally:
        program.kill()  # SIGKILL: no atexit, no stop(); nobody left to kill the worker
        program.wait(timeout=HANG_GUARD)
        program.stdout.close()

    assert wait_until(lambda: dead(worker), GONE_WITHIN), "the worker outlived its server"


class ManyChunks(Flow):
    split = task(
        task_func=tasks.add_many_then_count,
        child_task_func=tasks.double,
        isolation="subprocess",
        max_concurrency=4,
        next=ALL_OVER,
    )


def test_many_chunks_added_in_a_process_are_all_durable_when_the_call_returns(store_path):
    # 1,100 children are five chunks, sent ahead over the pipe: only the last waits for its
    # commit, and it is answered after every earlier one.
    with ManyChunks.start_link(store=store_path) as server:
        res = server.start_flow().result(timeout=HANG_GUARD)

    assert res.outcome == "all_over", res.error
    [parent_over] = [e for e in events(store_path, res.run_id, "task_over") if e.child_id is None]
    assert parent_over.data["result"] == 1100
    assert [cid for cid, _ in results(res.state, "split")] == list(range(1100))
