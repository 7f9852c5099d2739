"""``task(rate_limit=...)``: the starts of a task's children are paced, evenly and without a burst.

Spacing is read from the log (``task_started`` stamps, which may be up to ``STAMP_REUSE`` older
than the turn that wrote them, so a gap may look that much shorter) or, exactly, from a
``task_start`` receiver: it runs on the coordinator thread before the attempt is submitted, and
the next start of the stage is decided only once its time has come. Lower bounds only: a loaded
machine makes gaps longer, never shorter.
"""

import concurrent.futures as cf
import itertools
import multiprocessing
import threading
import time
import warnings

import freezegun
import pytest
import scale_tasks
import subprocess_tasks

import threadflow
from threadflow import (
    ALL_OVER,
    EventStore,
    Flow,
    FlowDefinitionError,
    add_children_tasks,
    signals,
    task,
)
from threadflow.coordinator import STAMP_REUSE
from threadflow.events import ts_seconds

HANG_GUARD = 60  # seconds: only a guard against a hang, never a timing assertion
#: What a stamp may lose: the reuse of a turn's stamp, and a microsecond of rounding.
SLACK = STAMP_REUSE + 2e-6


def child_starts(store_path, run_id, stage="fetch"):
    """``(child_id, attempt, seconds)`` of every child start of ``stage``, in log order."""
    return [
        (e.child_id, e.attempt, ts_seconds(e.ts))
        for e in EventStore(store_path).events(run_id, "task_started")
        if e.task == stage and e.child_id is not None
    ]


def gaps(times):
    return [b - a for a, b in itertools.pairwise(times)]


def paced_starts(store_path, run_id, per_second, stage="fetch"):
    """:func:`child_starts`, once checked: no two closer than ``1 / per_second`` (less what a
    stamp may lose)."""
    starts = child_starts(store_path, run_id, stage)
    assert min(gaps([t for _, _, t in starts])) >= 1 / per_second - SLACK, starts
    return starts


@pytest.fixture
def start_clock():
    """Record when each child attempt's start is announced (``task_start``), by the real
    monotonic clock, which freezegun does not reach."""
    seen = []

    def on_start(sender, **kw):
        if len(kw["task"]) == 2:
            seen.append(time.clock_gettime(time.CLOCK_MONOTONIC))

    signals.task_start.connect(on_start)
    try:
        yield seen
    finally:
        signals.task_start.disconnect(on_start)


def add_children(state):
    add_children_tasks(((i, i) for i in range(state["n"])), state)


def echo(child, state):
    return child[0]


class Paced(Flow):
    fetch = task(
        task_func=add_children,
        child_task_func=echo,
        max_concurrency=8,
        rate_limit="20/s",
        next=ALL_OVER,
    )


# --- spacing ----------------------------------------------------------------------------------


def test_children_start_no_closer_than_the_limit_and_in_the_order_added(store_path):
    # Nobody listens to task_start: the path where workers would take the next child
    # themselves, which a rate-limited stage must not do.
    with Paced.start_link(store=store_path, n=12) as server:
        assert not signals.task_start.has_receivers_for(server)
        res = server.start_flow().result(timeout=HANG_GUARD)

    assert res.outcome == "all_over", res.error
    starts = paced_starts(store_path, res.run_id, 20)
    assert [cid for cid, _, _ in starts] == list(range(12))
    assert [cid for cid, _ in threadflow.results(res.state, "fetch")] == list(range(12))


def test_a_start_is_announced_only_once_the_limit_allows_it(store_path, start_clock):
    with Paced.start_link(store=store_path, n=8) as server:
        res = server.start_flow().result(timeout=HANG_GUARD)

    assert res.outcome == "all_over", res.error
    assert len(start_clock) == 8
    assert min(gaps(start_clock)) >= 1 / 20


class Spread(Flow):
    fetch = task(
        task_func=add_children,
        child_task_func=echo,
        rate_limit=" 2.5 / s ",  # spaces are fine; a float rate: 0.4 s apart
        next=ALL_OVER,
    )


def test_a_fractional_rate_spaces_starts_by_its_inverse(store_path):
    res = Spread.run(store=store_path, n=2)

    assert res.outcome == "all_over", res.error
    assert len(paced_starts(store_path, res.run_id, 2.5)) == 2


holding = {"now": 0, "peak": 0}
holding_lock = threading.Lock()


def hold(child, state):
    with holding_lock:
        holding["now"] += 1
        holding["peak"] = max(holding["peak"], holding["now"])
    try:
        # Long enough for the next starts to come while this one runs.
        threadflow.current_token().wait(0.05)
    finally:
        with holding_lock:
            holding["now"] -= 1


class PacedAndCapped(Flow):
    fetch = task(
        task_func=add_children,
        child_task_func=hold,
        max_concurrency=2,
        rate_limit="200/s",
        next=ALL_OVER,
    )


def test_max_concurrency_still_holds_under_a_rate_limit(store_path):
    holding.update(now=0, peak=0)

    res = PacedAndCapped.run(store=store_path, n=10)

    assert res.outcome == "all_over", res.error
    assert 1 <= holding["peak"] <= 2
    starts = paced_starts(store_path, res.run_id, 200)
    assert [cid for cid, _, _ in starts] == list(range(10))


def fail_first_attempt(child, state):
    if child[0] not in state["failed_once"]:
        state["failed_once"].add(child[0])  # a set given to start_link: shared, not the state
        raise ValueError(f"child {child[0]} fails its first attempt")
    return child[0]


class PacedRetries(Flow):
    fetch = task(
        task_func=add_children,
        child_task_func=fail_first_attempt,
        max_concurrency=4,
        task_retry_limit=2,
        rate_limit="20/s",
        next=ALL_OVER,
    )


def test_retries_are_starts_too_and_are_paced(store_path):
    res = PacedRetries.run(store=store_path, n=5, failed_once=set())

    assert res.outcome == "all_over", res.error
    # Every start counts, first attempts and retries alike (a retry goes first).
    starts = paced_starts(store_path, res.run_id, 20)
    assert sorted((cid, n) for cid, n, _ in starts) == [(i, n) for i in range(5) for n in (1, 2)]


# --- where attempts run -------------------------------------------------------------------------


class PacedInSubprocesses(Flow):
    fetch = task(
        task_func=subprocess_tasks.add_five,
        child_task_func=subprocess_tasks.child_pid,
        isolation="subprocess",
        max_concurrency=5,
        rate_limit="20/s",
        next=ALL_OVER,
    )


def test_subprocess_children_are_paced(store_path):
    res = PacedInSubprocesses.run(store=store_path)

    assert res.outcome == "all_over", res.error
    starts = paced_starts(store_path, res.run_id, 20)
    assert [cid for cid, _, _ in starts] == list(range(5))


def test_children_in_a_thread_pool_executor_are_paced(store_path):
    with cf.ThreadPoolExecutor(8) as pool:
        res = Paced.run(store=store_path, executor=pool, n=6)

    assert res.outcome == "all_over", res.error
    starts = paced_starts(store_path, res.run_id, 20)
    assert [cid for cid, _, _ in starts] == list(range(6))


class PacedInProcesses(Flow):
    fetch = task(
        task_func=scale_tasks.add_numbers,
        child_task_func=scale_tasks.square,
        child_executor="procs",
        max_concurrency=4,
        rate_limit="20/s",
        next=ALL_OVER,
    )


def test_children_in_a_process_pool_are_paced(store_path):
    with cf.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        res = PacedInProcesses.run(store=store_path, executors={"procs": pool}, n=5)

    assert res.outcome == "all_over", res.error
    starts = paced_starts(store_path, res.run_id, 20)
    assert [cid for cid, _, _ in starts] == list(range(5))


def test_children_on_dask_are_paced(store_path, tmp_path):
    pytest.importorskip(
        "distributed", reason="the dask extra is not installed: pip install '.[dask]'"
    )
    from distributed import Client, LocalCluster

    with warnings.catch_warnings():
        # Dask warns when making its scratch directory takes over a second, as it may on a
        # busy machine: not a failure of this test.
        warnings.filterwarnings("ignore", "Creating scratch directories", UserWarning)
        cluster = LocalCluster(
            n_workers=1,
            threads_per_worker=4,
            processes=False,  # the scheduler, batches and futures are Dask's all the same
            dashboard_address=":0",  # any free port: None means 8787, which may be taken
            local_directory=str(tmp_path / "dask"),
        )
    try:
        with Client(cluster) as client:
            res = PacedInProcesses.run(store=store_path, executors={"procs": client}, n=5)
    finally:
        cluster.close()

    assert res.outcome == "all_over", res.error
    starts = paced_starts(store_path, res.run_id, 20)
    assert [cid for cid, _, _ in starts] == list(range(5))


# --- across runs: replay ------------------------------------------------------------------------


def fail_if_broken(child, state):
    if child[0] in state["broken"]:
        raise ValueError(f"child {child[0]} is broken")
    return child[0]


class PacedBreakable(Flow):
    fetch = task(
        task_func=add_children,
        child_task_func=fail_if_broken,
        task_retry_limit=1,
        rate_limit="20/s",
        next=ALL_OVER,
    )


def test_a_replay_right_after_a_run_keeps_the_pace(store_path):
    broken = {3}
    with PacedBreakable.start_link(store=store_path, n=8, broken=broken) as server:
        first = server.start_flow().result(timeout=HANG_GUARD)
        assert first.outcome == "failed_over"
        assert first.task == ("fetch", 3)
        broken.clear()  # fixed: the replay runs child 3 and the rest at once
        again = server.replay(first.run_id).result(timeout=HANG_GUARD)

    assert again.outcome == "all_over", again.error
    # The replay's first start waited for the failed run's last one: no burst between runs.
    starts = paced_starts(store_path, first.run_id, 20)
    assert [cid for cid, _, _ in starts] == [0, 1, 2, 3, 3, 4, 5, 6, 7]


# --- stopping while children wait for their turn ------------------------------------------------

first_started = threading.Event()


def signal_start(child, state):
    first_started.set()
    return child[0]


class Hourly(Flow):
    fetch = task(
        task_func=add_children,
        child_task_func=signal_start,
        rate_limit="1/h",  # the second child would start an hour later
        next=ALL_OVER,
    )


def test_a_cancel_while_children_wait_for_their_turn_ends_the_run(store_path):
    first_started.clear()
    with Hourly.start_link(store=store_path, n=5) as server:
        handle = server.start_flow()
        assert first_started.wait(HANG_GUARD)
        handle.cancel("enough")
        res = handle.result(timeout=HANG_GUARD)

    assert res.outcome == "cancelled"
    assert [cid for cid, _, _ in child_starts(store_path, res.run_id)] == [0]


def test_a_stop_while_children_wait_for_their_turn_ends_the_run(store_path):
    first_started.clear()
    server = Hourly.start_link(store=store_path, n=5)
    handle = server.start_flow()
    assert first_started.wait(HANG_GUARD)
    server.stop(timeout=HANG_GUARD)
    res = handle.result(timeout=HANG_GUARD)

    assert res.outcome == "interrupted"
    assert [cid for cid, _, _ in child_starts(store_path, res.run_id)] == [0]


# --- frozen wall clock --------------------------------------------------------------------------


def test_the_limit_keeps_real_time_under_a_frozen_clock(store_path, start_clock):
    with freezegun.freeze_time("2020-01-01"):
        with Paced.start_link(store=store_path, n=5) as server:
            res = server.start_flow().result(timeout=HANG_GUARD)

    assert res.outcome == "all_over", res.error
    assert len(start_clock) == 5
    assert min(gaps(start_clock)) >= 1 / 20
    # The log follows the frozen clock (so its stamps cannot show the pace).
    assert {ts for _, _, ts in child_starts(store_path, res.run_id)} == {
        ts_seconds("2020-01-01T00:00:00+00:00")
    }


# --- definition ---------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", ["20/s", "20 / s", " 0.5/s ", ".5/s", "120/m", "3/h", "1.5/m"])
def test_rate_limit_accepts_a_count_per_second_minute_or_hour(rate):
    class Fine(Flow):
        fetch = task(task_func=add_children, child_task_func=echo, rate_limit=rate, next=ALL_OVER)

    assert Fine.fetch.rate_limit == rate


@pytest.mark.parametrize(
    "rate", ["20", "20/x", "/s", "0/s", "0.0/m", "-1/s", "20/sec", "20 per s", "inf/s", "", 20]
)
def test_a_bad_rate_limit_is_refused_with_the_valid_forms(rate):
    with pytest.raises(FlowDefinitionError) as caught:

        class BadRate(Flow):
            fetch = task(
                task_func=add_children, child_task_func=echo, rate_limit=rate, next=ALL_OVER
            )

    message = str(caught.value)
    assert "BadRate" in message and "'fetch'" in message
    assert f"rate_limit={rate!r}" in message
    assert "'N/s', 'N/m' or 'N/h'" in message and "rate_limit='20/s'" in message


def test_a_rate_limit_needs_children_to_pace():
    with pytest.raises(
        FlowDefinitionError,
        match=r"NoChildren.*'fetch' has rate_limit='5/s' but no child_task_func",
    ):

        class NoChildren(Flow):
            fetch = task(task_func=add_children, rate_limit="5/s", next=ALL_OVER)
