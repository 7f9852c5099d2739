"""``RunHandle.progress()``: how far a run has got, as an application (a GUI timer) reads it.

Every number is the fold of the run's log, read through the store: children done, failed,
running and in all, overall and per task, and the attempts running longest. Tests synchronise
on signals (a receiver runs once its event is committed, so the store holds it).
"""

from __future__ import annotations

import dataclasses
import datetime
import queue
import threading
from typing import Any

import pytest
from replay_flows import Interruptible, Numbers

import threadflow
from threadflow import (
    ALL_OVER,
    EventStore,
    Flow,
    Progress,
    RunHandle,
    RunningAttempt,
    TaskProgress,
    ThreadflowError,
    add_children_tasks,
    task,
)
from threadflow.remote import RemoteRunHandle

GUARD = 30.0  # seconds; a hang guard, never a synchronisation


def four_children(state: Any) -> None:
    add_children_tasks(((i, None) for i in range(4)), state)


def gated_child(child: Any, state: Any) -> int:
    if not state["gate"].wait(GUARD):
        raise TimeoutError("the test never opened the gate")
    if child[0] == 3:
        raise ValueError("child 3 is broken")
    return child[0]


def nothing(state: Any) -> None:
    return None


class Gated(Flow, server_name="progress-gated"):
    """Four children, two at a time, that wait for the gate; child 3 fails, tolerated."""

    split = task(
        task_func=four_children,
        child_task_func=gated_child,
        max_concurrency=2,
        exit_on_failed=False,
        task_retry_limit=1,
        next="total",
    )
    total = task(task_func=nothing, next=ALL_OVER)


def child_starts(server: Flow) -> queue.SimpleQueue[Any]:
    """A queue that gets the child id of every child attempt of ``server`` once its
    ``task_started`` is in the store."""
    started: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def receive(sender: Any, task: tuple[Any, ...], **kw: Any) -> None:
        if len(task) == 2:
            started.put(task[1])

    threadflow.signals.task_start.connect(receive, sender=server, weak=False)
    return started


def counts(progress: Progress) -> list[tuple[Any, ...]]:
    """Per task, everything but the time (which goes on between two reads)."""
    return [
        dataclasses.astuple(dataclasses.replace(t, seconds=0.0)) for t in progress.tasks.values()
    ]


@pytest.fixture
def gate():
    """Children wait for it; opened at the end of the test whatever happens, so that no
    thread is left waiting."""
    event = threading.Event()
    yield event
    event.set()


def test_progress_counts_children_overall_and_per_task_while_the_run_runs(store_path, gate):
    with Gated.start_link(store=store_path, gate=gate) as server:
        started = child_starts(server)
        handle = server.start_flow()
        assert {started.get(timeout=GUARD), started.get(timeout=GUARD)} == {0, 1}

        now = handle.progress()

        assert isinstance(now, Progress)
        assert (now.run_id, now.status, now.segments) == (handle.run_id, "running", 1)
        assert (now.total, now.done, now.failed, now.running, now.finished) == (4, 0, 0, 2, 0)
        assert list(now.tasks) == ["split", "total"]  # the flow's order; total not started
        assert counts(now)[0] == ("split", "running", 4, 0, 0, 2, 1, 0.0)
        assert now.tasks["total"] == TaskProgress("total", "waiting")
        # what the run waits on: the two children, oldest first
        assert [(a.task, a.child_id, a.attempt, a.parent) for a in now.slowest] == [
            ("split", 0, 1, False),
            ("split", 1, 1, False),
        ]
        assert all(isinstance(a, RunningAttempt) and a.seconds >= 0 for a in now.slowest)
        # a handle that reads the run from the store alone says the same
        remote = RemoteRunHandle(handle.run_id, handle.start_time, EventStore(store_path))
        assert counts(remote.progress()) == counts(now)

        gate.set()
        result = handle.result(timeout=GUARD)

    assert (result.outcome, result.failed) == ("all_over", [("split", 3)])
    end = handle.progress()
    assert (end.status, end.total, end.done, end.failed, end.running) == ("all_over", 4, 3, 1, 0)
    assert [(t.name, t.state) for t in end.tasks.values()] == [("split", "over"), ("total", "over")]
    assert end.slowest == ()
    assert end.seconds == EventStore(store_path).history(handle.run_id).active
    told = remote.progress()
    assert told == dataclasses.replace(end, at=told.at)


def test_a_replayed_runs_progress_counts_what_earlier_segments_did(store_path, gate):
    failed = Numbers.run(store=store_path, broken=[2])  # one child at a time: 0 and 1 done
    assert failed.outcome == "failed_over"
    with Numbers.start_link(store=store_path, gate=gate) as server:
        started = child_starts(server)
        handle = server.replay(failed.run_id)

        first = handle.progress()  # before the new segment has done anything
        assert (first.status, first.total, first.done, first.failed) == ("running", 5, 2, 1)

        assert started.get(timeout=GUARD) == 2  # the new segment runs child 2 again
        again = handle.progress()
        assert (again.segments, again.done, again.failed, again.running) == (2, 2, 1, 1)
        assert again.tasks["square"].state == "running"

        gate.set()
        assert handle.result(timeout=GUARD).outcome == "all_over"

    end = handle.progress()
    assert (end.status, end.segments, end.total, end.done, end.failed) == ("all_over", 2, 5, 5, 0)


def test_progress_of_an_interrupted_run_shows_its_unfinished_stage_stopped(store_path):
    holding: queue.SimpleQueue[Any] = queue.SimpleQueue()
    with Interruptible.start_link(store=store_path, hold={0, 1}, holding=holding) as server:
        handle = server.start_flow()
        assert {holding.get(timeout=GUARD), holding.get(timeout=GUARD)} == {0, 1}
    assert handle.result(timeout=GUARD).outcome == "interrupted"

    end = handle.progress()

    assert (end.status, end.running, end.slowest) == ("interrupted", 0, ())
    assert end.tasks["work"].state == "stopped"
    assert (end.total, end.done) == (6, 0)


def test_progress_may_be_read_from_any_thread(store_path, gate):
    with Gated.start_link(store=store_path, gate=gate) as server:
        started = child_starts(server)
        handle = server.start_flow()
        started.get(timeout=GUARD)
        seen = [handle.progress()]  # this thread first (its connection), then another
        other = threading.Thread(target=lambda: seen.append(handle.progress()))
        other.start()
        other.join(GUARD)
        gate.set()
        handle.result(timeout=GUARD)
    assert [p.total for p in seen] == [4, 4]
    assert handle.progress().done == 3


def test_progress_of_a_handle_without_a_store_says_which_handle_to_use():
    handle = RunHandle("3f2a", datetime.datetime.now(datetime.timezone.utc))
    with pytest.raises(ThreadflowError, match="has no store .* use the handle start_flow"):
        handle.progress()
