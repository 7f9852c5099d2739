"""Children sent to other executors: a real Dask LocalCluster and a real ProcessPoolExecutor.

The Dask tests start a ``distributed.LocalCluster`` on loopback (2 worker processes of 2
threads) once for the module, and are skipped only if the ``dask`` extra is not installed.
Task functions live in ``scale_tasks`` (the workers import them by name) and report through
their results and files in ``state["dir"]``; the test waits for a file, or for an event in the
store, with a bounded check.
"""

import concurrent.futures as cf
import multiprocessing
import os
import time
import warnings
from pathlib import Path

import pytest
import scale_tasks as tasks
import subprocess_tasks
from helpers import wait_until

from threadflow import (
    ALL_OVER,
    DuplicateChildError,
    EventStore,
    Flow,
    FlowDefinitionError,
    ThreadflowError,
    results,
    task,
)

HANG_GUARD = 60  # seconds: only a guard against a hanging test, never a synchronisation


def events(store_path, run_id, kind=None):
    return EventStore(store_path).events(run_id, kind)


@pytest.fixture(scope="module")
def dask_client(tmp_path_factory):
    """A client of a fresh LocalCluster: 2 worker processes of 2 threads, loopback only."""
    pytest.importorskip(
        "distributed", reason="the dask extra is not installed: pip install '.[dask]'"
    )
    import dask
    from distributed import Client, LocalCluster

    # A task whose worker dies fails at once (KilledWorker), so that threadflow's own retry
    # policy decides, as docs/scale-out.md recommends.
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), warnings.catch_warnings():
        # Dask warns when making its scratch directory takes over a second, as it may on a
        # busy machine: not a failure of this test.
        warnings.filterwarnings("ignore", "Creating scratch directories", UserWarning)
        cluster = LocalCluster(
            n_workers=2,
            threads_per_worker=2,
            processes=True,
            host="127.0.0.1",
            dashboard_address=":0",  # any free port: 8787 may be taken on the machine
            local_directory=str(tmp_path_factory.mktemp("dask")),
        )
    client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


@pytest.fixture(scope="module")
def dask_executor(dask_client):
    """The cluster's ``concurrent.futures`` face, as the docs pass it: ``get_executor()``."""
    return dask_client.get_executor()


@pytest.fixture(scope="module")
def process_pool():
    with cf.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield pool


# --- Dask ---------------------------------------------------------------------------------------


class AllOnDask(Flow):
    fan = task(
        task_func=tasks.add_numbers, child_task_func=tasks.square, max_concurrency=4, next=ALL_OVER
    )


def test_children_on_dask_complete_and_their_results_are_readable(dask_executor, store_path):
    res = AllOnDask.run(store=store_path, executor=dask_executor, n=6)

    assert res.outcome == "all_over", res.error
    found = list(results(res.state, "fan"))
    assert [cid for cid, _ in found] == list(range(6))
    assert [r["square"] for _, r in found] == [i * i for i in range(6)]
    assert all(r["pid"] != os.getpid() for _, r in found)
    # The parent ran on the cluster too; its children came back with its outcome.
    [parent] = [e for e in events(store_path, res.run_id, "task_over") if e.child_id is None]
    assert parent.data["result"] != os.getpid()


class LocalParent(Flow):
    fan = task(
        task_func=tasks.add_numbers,
        child_task_func=tasks.square,
        child_executor="dask",
        max_concurrency=4,
        next=ALL_OVER,
    )


def test_the_parent_stays_local_while_its_children_run_on_dask(dask_executor, store_path):
    res = LocalParent.run(store=store_path, executors={"dask": dask_executor}, n=4)

    assert res.outcome == "all_over", res.error
    over = events(store_path, res.run_id, "task_over")
    assert [e.data["result"] for e in over if e.child_id is None] == [os.getpid()]
    pids = {r["pid"] for _, r in results(res.state, "fan")}
    assert pids and os.getpid() not in pids


class Grandchildren(Flow):
    fan = task(
        task_func=tasks.add_numbers,
        child_task_func=tasks.add_a_grandchild,
        child_executor="dask",
        max_concurrency=3,
        next=ALL_OVER,
    )


def test_children_added_on_dask_are_added_with_their_adders_success(dask_executor, store_path):
    res = Grandchildren.run(store=store_path, executors={"dask": dask_executor}, n=3)

    assert res.outcome == "all_over", res.error
    added = [cid for cid, _ in results(res.state, "fan")]
    assert added[:3] == [0, 1, 2]
    assert sorted(added[3:]) == ["0.1", "1.1", "2.1"]  # in the order their adders succeeded
    log = [(e.kind, e.child_id) for e in events(store_path, res.run_id)]
    for i in range(3):
        # Carried back with the outcome: added right before the adder's success, in one turn.
        at = log.index(("child_added", f"{i}.1"))
        assert log[at + 1 : at + 3] == [("task_over", i), ("children_released", i)]
        assert log.index(("task_started", f"{i}.1")) > at + 2


class Duplicates(Flow):
    fan = task(
        task_func=tasks.add_numbers,
        child_task_func=tasks.add_duplicates,
        child_executor="dask",
        exit_on_failed=False,
        task_retry_limit=2,
        next=ALL_OVER,
    )


def test_a_duplicate_child_added_on_dask_fails_the_attempt(dask_executor, store_path):
    res = Duplicates.run(store=store_path, executors={"dask": dask_executor}, n=2)

    assert res.outcome == "all_over", res.error
    assert res.failed == [("fan", 0)]
    exits = [e for e in events(store_path, res.run_id, "exit") if e.child_id == 0]
    assert [e.data["error"]["type"] for e in exits] == ["threadflow.errors.DuplicateChildError"] * 2
    found = dict(results(res.state, "fan"))
    # A repeat within one attempt raises at once, in the worker, as in a thread.
    assert found[1] == "caught x"
    assert found["x"] == "ran"


class Sleepy(Flow):
    fan = task(
        task_func=tasks.add_numbers,
        child_task_func=tasks.sleep_on_first_attempt,
        child_executor="dask",
        task_timeout=0.5,
        task_retry_limit=3,
        next=ALL_OVER,
    )


def test_a_child_past_its_timeout_on_dask_is_cancelled_and_retried(
    dask_executor, store_path, tmp_path
):
    with Sleepy.start_link(
        store=store_path, executors={"dask": dask_executor}, dir=str(tmp_path), n=1
    ) as server:
        res = server.start_flow().result(timeout=HANG_GUARD)
        assert res.outcome == "all_over", res.error
        # The late outcome of attempt 1 is logged as stale, never acted on.
        assert wait_until(lambda: events(store_path, res.run_id, "stale"), HANG_GUARD)

    kinds = [(e.kind, e.attempt) for e in events(store_path, res.run_id) if e.child_id == 0]
    assert kinds[:4] == [("child_added", 1), ("task_started", 1), ("timeout", 1), ("retry", 1)]
    assert [
        e.attempt for e in events(store_path, res.run_id, "task_over") if e.child_id is not None
    ] == [2]
    assert ("stale", 1) in kinds
    assert dict(results(res.state, "fan")) == {0: 2}
    # The token in the worker cancelled itself at the deadline: the sleep did not go on.
    assert wait_until(Path(tmp_path, "woke-0").exists, HANG_GUARD)
    assert Path(tmp_path, "woke-0").read_text() == "timeout"


def test_a_worker_killed_mid_attempt_is_an_exit_and_a_retry(dask_executor, store_path, tmp_path):
    class Dies(Flow):
        fan = task(
            task_func=tasks.add_numbers,
            child_task_func=tasks.die_on_first_attempt,
            child_executor="dask",
            next=ALL_OVER,
        )

    res = Dies.run(store=store_path, executors={"dask": dask_executor}, n=1, dir=str(tmp_path))

    assert res.outcome == "all_over", res.error
    [exit_] = events(store_path, res.run_id, "exit")
    assert exit_.attempt == 1
    assert exit_.data["error"]["type"] == "distributed.scheduler.KilledWorker"
    [retry] = events(store_path, res.run_id, "retry")
    assert retry.data["next_attempt"] == 2
    [(child, pid)] = list(results(res.state, "fan"))
    assert child == 0 and pid != os.getpid()


class Capped(Flow):
    fan = task(
        task_func=tasks.add_numbers,
        child_task_func=tasks.interval,
        child_executor="dask",
        max_concurrency=2,
        next=ALL_OVER,
    )


def test_max_concurrency_holds_across_the_cluster(dask_executor, store_path):
    # 4 threads in the cluster, a cap of 2: never more than 2 children at once.
    res = Capped.run(store=store_path, executors={"dask": dask_executor}, n=8, busy=0.1)

    assert res.outcome == "all_over", res.error
    spans = [span for _, span in results(res.state, "fan")]
    assert len(spans) == 8
    moments = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    running = most = 0
    for _, step in moments:  # an end sorts before a start at the same instant
        running += step
        most = max(most, running)
    assert most <= 2


class Batched(Flow):
    batched = task(
        task_func=tasks.add_numbers,
        child_task_func=tasks.square,
        child_executor="dask",
        max_concurrency=4,
        next=ALL_OVER,
    )


def test_children_on_dask_reach_the_scheduler_in_batches(dask_client, store_path):
    from dask_graphs import GraphLog, graphs_seen

    dask_client.register_plugin(GraphLog())
    try:
        res = Batched.run(store=store_path, executors={"dask": dask_client.get_executor()}, n=24)
        graphs = dask_client.run_on_scheduler(graphs_seen)
    finally:
        dask_client.unregister_scheduler_plugin(GraphLog.name)

    assert res.outcome == "all_over", res.error
    assert [r["square"] for _, r in results(res.state, "batched")] == [i * i for i in range(24)]
    # One Dask task per attempt, named after its task (Dask's dashboard groups them so) ...
    mine = [keys for keys in graphs if any(key.startswith("batched-") for key in keys)]
    keys = [key for graph in mine for key in graph]
    assert len(set(keys)) == len(keys) == 24
    assert all(key.startswith("batched-") for key in keys)
    # ... sent a turn at a time: the first max_concurrency children in one graph, and the
    # ones that replace finished children together with whatever else finished meanwhile.
    assert len(mine[0]) == 4
    assert len(mine) < 24


class TimeoutInABatch(Flow):
    fan = task(
        task_func=tasks.add_numbers,
        child_task_func=tasks.hang_child_zero_once,
        child_executor="dask",
        max_concurrency=4,
        task_timeout=2,
        task_retry_limit=2,
        next=ALL_OVER,
    )


def test_a_timeout_in_a_batch_on_dask_cancels_only_that_child(dask_executor, store_path, tmp_path):
    # The four children start together in one batch; only child 0 passes its deadline.
    with TimeoutInABatch.start_link(
        store=store_path, executors={"dask": dask_executor}, dir=str(tmp_path), n=4
    ) as server:
        res = server.start_flow().result(timeout=HANG_GUARD)
        assert res.outcome == "all_over", res.error
        assert wait_until(lambda: events(store_path, res.run_id, "stale"), HANG_GUARD)

    log = events(store_path, res.run_id)
    assert [(e.child_id, e.attempt) for e in log if e.kind == "timeout"] == [(0, 1)]
    assert [(e.child_id, e.attempt) for e in log if e.kind == "stale"] == [(0, 1)]
    over = sorted(
        (e.child_id, e.attempt) for e in log if e.kind == "task_over" and e.child_id is not None
    )
    assert over == [(0, 2), (1, 1), (2, 1), (3, 1)]
    assert dict(results(res.state, "fan")) == {0: 0, 1: 1, 2: 2, 3: 3}
    assert wait_until(Path(tmp_path, "woke-0").exists, HANG_GUARD)
    assert Path(tmp_path, "woke-0").read_text() == "timeout"


class OneTurnTwoTasks(Flow):
    root = task(task_func=tasks.where, next=["good", "bad"])
    good = task(task_func=tasks.where, executor="dask", next=ALL_OVER)
    bad = task(task_func=tasks.BoundParent(), executor="dask", task_retry_limit=1, next=ALL_OVER)


def test_an_attempt_that_cannot_go_to_dask_fails_alone_with_a_clear_error(dask_client, store_path):
    from dask_graphs import GraphLog, graphs_seen

    # good and bad start in the same turn, so their attempts go to Dask in one call, which bad
    # spoils: its task function refuses pickling. Each is then sent on its own.
    dask_client.register_plugin(GraphLog())
    try:
        res = OneTurnTwoTasks.run(store=store_path, executors={"dask": dask_client.get_executor()})
        graphs = dask_client.run_on_scheduler(graphs_seen)
    finally:
        dask_client.unregister_scheduler_plugin(GraphLog.name)

    assert res.outcome == "failed_over"
    assert res.task == ("bad",)
    assert isinstance(res.error, ThreadflowError)
    message = str(res.error)
    assert "executor 'dask' could not send the attempt to its workers (TypeError: a " in message
    assert "BoundToThisProcess stays in the process that made it)" in message
    assert "define the function at the top level of a module" in message
    assert len(message) < 600  # Dask's own message repeats the whole call, state included
    # good went to the cluster, alone, and nothing of bad's failure touched it.
    assert [graph for graph in graphs if any("good-" in key or "bad-" in key for key in graph)] == [
        [key for graph in graphs for key in graph if key.startswith("good-")]
    ]
    log = events(store_path, res.run_id)
    assert [e.kind for e in log if e.task == "good"][0] == "task_started"
    assert not [e for e in log if e.task == "good" and e.kind == "exit" and "pickl" in str(e.data)]


def test_a_dask_client_itself_may_be_the_executor(dask_client, store_path):
    res = AllOnDask.run(store=store_path, executor=dask_client, n=3)

    assert res.outcome == "all_over", res.error
    found = list(results(res.state, "fan"))
    assert [(cid, r["square"]) for cid, r in found] == [(0, 0), (1, 1), (2, 4)]
    assert os.getpid() not in {r["pid"] for _, r in found}


class HangsOnDask(Flow):
    fan = task(
        task_func=tasks.add_numbers,
        child_task_func=tasks.started_then_hang,
        child_executor="dask",
        max_concurrency=3,
        task_timeout=10,
        next=ALL_OVER,
    )


def test_stop_interrupts_a_run_whose_children_are_on_dask(dask_executor, store_path, tmp_path):
    # Three children, sent together in one batch, all running when stop() comes.
    server = HangsOnDask.start_link(
        store=store_path, executors={"dask": dask_executor}, dir=str(tmp_path), n=3
    )
    handle = server.start_flow()
    for i in range(3):
        assert wait_until(Path(tmp_path, f"started-{i}").exists, HANG_GUARD)
    began = time.monotonic()
    server.stop(timeout=4)

    assert time.monotonic() - began < 4
    assert handle.result(timeout=HANG_GUARD).outcome == "interrupted"
    log = events(store_path, handle.run_id)
    assert log[-1].kind == "interrupted"
    # Each one's future was cancelled: it ended at once, as cancelled by the stop.
    ended = {e.child_id: e.data["error"] for e in log if e.kind == "exit"}
    assert sorted(ended) == [0, 1, 2]
    assert {(error["type"], error["message"]) for error in ended.values()} == {
        ("threadflow.errors.CancelledError", "attempt cancelled (stop)")
    }


# --- ProcessPoolExecutor ------------------------------------------------------------------------


class InProcesses(Flow):
    fan = task(
        task_func=tasks.add_numbers,
        child_task_func=tasks.square,
        child_executor="procs",
        max_concurrency=2,
        next=ALL_OVER,
    )


def test_children_in_a_process_pool_record_their_results(process_pool, store_path):
    res = InProcesses.run(store=store_path, executors={"procs": process_pool}, n=5)

    assert res.outcome == "all_over", res.error
    found = list(results(res.state, "fan"))
    assert [(cid, r["square"]) for cid, r in found] == [(i, i * i) for i in range(5)]
    assert os.getpid() not in {r["pid"] for _, r in found}


class BadInProcesses(Flow):
    fan = task(
        task_func=tasks.add_numbers,
        child_task_func=tasks.value_error,
        child_executor="procs",
        task_retry_limit=2,
        next=ALL_OVER,
    )


def test_an_error_in_a_process_pool_comes_back_with_its_type(process_pool, store_path):
    res = BadInProcesses.run(store=store_path, executors={"procs": process_pool}, n=1)

    assert res.outcome == "failed_over"
    assert res.task == ("fan", 0)
    assert isinstance(res.error, ValueError)
    assert str(res.error) == "child 0 is bad"
    [exit_, _] = events(store_path, res.run_id, "exit")
    assert exit_.data["error"]["type"] == "ValueError"
    assert 'raise ValueError(f"child {child[0]} is bad")' in exit_.data["error"]["traceback"]


def test_a_lambda_child_in_a_process_pool_is_a_clear_exit_error(process_pool, store_path):
    class Lambda(Flow):
        fan = task(
            task_func=tasks.add_numbers,
            child_task_func=lambda child, state: child,
            child_executor="procs",
            task_retry_limit=1,
            next=ALL_OVER,
        )

    res = Lambda.run(store=store_path, executors={"procs": process_pool}, n=1)

    assert res.outcome == "failed_over"
    assert isinstance(res.error, ThreadflowError)
    assert "could not send the attempt to its workers" in str(res.error)
    assert "define the function at the top level of a module" in str(res.error)
    [exit_] = events(store_path, res.run_id, "exit")
    assert exit_.data["error"]["type"] == "threadflow.errors.ThreadflowError"


def test_a_child_function_that_refuses_pickling_in_a_process_pool_is_a_clear_exit_error(
    process_pool, store_path
):
    class Bound(Flow):
        fan = task(
            task_func=tasks.add_numbers,
            child_task_func=tasks.BoundToThisProcess(),
            child_executor="procs",
            task_retry_limit=1,
            next=ALL_OVER,
        )

    res = Bound.run(store=store_path, executors={"procs": process_pool}, n=1)

    assert res.outcome == "failed_over"
    assert isinstance(res.error, ThreadflowError)
    assert "could not send the attempt to its workers" in str(res.error)
    assert "stays in the process that made it" in str(res.error)


class Replayed(Flow):
    fan = task(
        task_func=tasks.add_numbers,
        child_task_func=tasks.square_unless_told,
        child_executor="procs",
        task_retry_limit=1,
        next=ALL_OVER,
    )


def test_a_run_with_remote_children_replays_only_what_did_not_finish(process_pool, store_path):
    executors = {"procs": process_pool}
    first = Replayed.run(store=store_path, executors=executors, n=4, fail=True)
    assert first.outcome == "failed_over"

    again = Replayed.replay(first.run_id, store=store_path, executors=executors, n=4, fail=False)

    assert again.outcome == "all_over", again.error
    assert dict(results(again.state, "fan")) == {0: 0, 1: 1, 2: 4, 3: 9}


class Keys(Flow):
    fan = task(
        task_func=tasks.add_numbers,
        child_task_func=tasks.state_keys,
        child_executor="procs",
        next=ALL_OVER,
    )


def test_state_entries_that_do_not_pickle_are_left_out_with_a_warning(process_pool, store_path):
    import threading

    with pytest.warns(RuntimeWarning, match=r"task 'fan' runs in executor 'procs'.*'lock' \(lock"):
        res = Keys.run(
            store=store_path, executors={"procs": process_pool}, n=1, lock=threading.Lock()
        )

    assert res.outcome == "all_over", res.error
    [(_, keys)] = list(results(res.state, "fan"))
    assert keys == ["n", "replayed", "run_id", "start_time", "store", "task_flow"]


# --- in-process executors -----------------------------------------------------------------------


class InThreads(Flow):
    fan = task(
        task_func=tasks.add_numbers,
        child_task_func=tasks.add_a_grandchild,
        child_executor="threads",
        next=ALL_OVER,
    )


def test_a_thread_pool_executor_runs_attempts_in_this_process(store_path):
    with cf.ThreadPoolExecutor(4) as pool:
        res = InThreads.run(store=store_path, executors={"threads": pool}, n=2)

    assert res.outcome == "all_over", res.error
    found = dict(results(res.state, "fan"))
    assert sorted(found, key=str) == [0, "0.1", 1, "1.1"]
    assert set(found.values()) == {os.getpid()}


# --- definitions and start_link -----------------------------------------------------------------


@pytest.mark.parametrize("option", ["executor", "child_executor"])
@pytest.mark.parametrize("value", ["", 3])
def test_an_executor_name_must_be_a_non_empty_string(option, value):
    with pytest.raises(
        FlowDefinitionError, match=rf"Bad': task 'fan' has {option}={value!r}; name one"
    ):

        class Bad(Flow):
            fan = task(
                task_func=tasks.add_numbers,
                child_task_func=tasks.square,
                next=ALL_OVER,
                **{option: value},
            )


def test_a_child_executor_needs_children():
    with pytest.raises(
        FlowDefinitionError,
        match=r"task 'one' has child_executor='dask' but no child_task_func",
    ):

        class Bad(Flow):
            one = task(task_func=tasks.add_numbers, child_executor="dask", next=ALL_OVER)


def test_start_link_refuses_an_executor_name_it_was_not_given(store_path):
    with (
        cf.ThreadPoolExecutor(1) as pool,
        pytest.raises(
            ValueError,
            match=r"flow 'LocalParent': task 'fan' has child_executor='dask', which is not in "
            r"start_link\(executors=...\); the names given are \['dsk'\]; did you mean 'dsk'\?",
        ),
    ):
        LocalParent.start_link(store=store_path, executors={"dsk": pool})
    with pytest.raises(ValueError, match=r"no executors were given: pass executors=\{'dask'"):
        LocalParent.start_link(store=store_path)
    assert LocalParent.whereis("LocalParent") is None


def test_start_link_refuses_a_subprocess_task_in_a_remote_executor(process_pool, store_path):
    class Both(Flow):
        fan = task(
            task_func=subprocess_tasks.add_five,
            child_task_func=subprocess_tasks.child_pid,
            isolation="subprocess",
            child_executor="procs",
            next=ALL_OVER,
        )

    with pytest.raises(
        ValueError,
        match=r"task 'fan' has isolation='subprocess' and runs in executor 'procs', which runs "
        "attempts in other processes",
    ):
        Both.start_link(store=store_path, executors={"procs": process_pool})


def test_start_link_refuses_an_executor_without_submit(store_path):
    with pytest.raises(TypeError, match=r"executors\['dask'\]=42 is not a concurrent.futures"):
        LocalParent.start_link(store=store_path, executors={"dask": 42})
    with pytest.raises(TypeError, match=r"executor='pool' is not a concurrent.futures"):
        AllOnDask.start_link(store=store_path, executor="pool")


def test_duplicate_child_error_pickles_for_the_trip_back():
    # What a remote worker sends back when a task re-adds its own child.
    import pickle

    error = pickle.loads(pickle.dumps(DuplicateChildError("fan", "x")))
    assert (error.task, error.child_id) == ("fan", "x")
