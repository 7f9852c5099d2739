"""The fold behind replay and the CLI: ``EventStore.history`` (counted by SQLite) says exactly
what a plain fold over every event says."""

import dataclasses
import threading

import pytest

import threadflow
from threadflow import ALL_OVER, EventStore, Flow, add_children_tasks, task
from threadflow.events import fold

broken = {"now": {3}}
lock = threading.Lock()


def split(state):
    add_children_tasks(((i, i) for i in range(8)), state)


def child(item, state):
    child_id, _ = item
    if child_id in (5, 6):  # these add grandchildren: they release children of their own
        add_children_tasks((((child_id, k), k) for k in range(3)), state)
    with lock:
        if child_id in broken["now"]:
            raise ValueError(f"child {child_id} is broken")
    return child_id


def tail(state):
    return sum(1 for _ in threadflow.results(state, "split"))


class Folded(Flow):
    split = task(
        task_func=split,
        child_task_func=child,
        max_concurrency=3,
        task_retry_limit=2,
        exit_on_failed=True,
        next="tail",
    )
    tail = task(task_func=tail, next=ALL_OVER)


def comparable(history):
    """Every field of the fold, times included; not the private sets it counts with."""
    fields = dataclasses.asdict(history)
    fields["tasks"] = {
        name: {k: v for k, v in task.items() if not k.startswith("_")}
        for name, task in fields["tasks"].items()
    }
    return fields


@pytest.fixture
def two_segments(store_path):
    broken["now"] = {3}
    failed = Folded.run(store=store_path)
    assert failed.outcome == "failed_over"
    broken["now"] = set()
    replayed = Folded.replay(failed.run_id, store=store_path)
    assert replayed.outcome == "all_over"
    return store_path, failed.run_id


def test_history_is_the_fold_of_every_event(two_segments):
    path, run_id = two_segments
    store = EventStore(path)

    quick = store.history(run_id)
    full = fold(store.iter_rows(run_id), run_id)

    assert comparable(quick) == comparable(full)
    split = quick.tasks["split"]
    assert (quick.outcome, quick.segments) == ("all_over", 2)
    # Grandchildren of 5 and 6 included; adds of attempts cancelled by the failure count too.
    assert split.children_added >= 8 + 6
    assert split.children_done == 8 + 6
    assert split.children_failed == 0  # child 3 failed, then succeeded in the replay
    assert split.released  # the parent's children, and the grandchildren of 5 and 6
    assert quick.events == sum(1 for _ in store.iter_rows(run_id))


def test_history_of_a_failed_run_counts_the_child_still_failed(store_path):
    broken["now"] = {3}
    failed = Folded.run(store=store_path)
    store = EventStore(store_path)

    quick = store.history(failed.run_id)

    assert comparable(quick) == comparable(fold(store.iter_rows(failed.run_id)))
    assert quick.outcome == "failed_over"
    assert quick.task == ("split", 3)
    assert quick.tasks["split"].children_failed == 1
    assert quick.tasks["split"].exits == 2  # two attempts of child 3
