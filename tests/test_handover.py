"""Children handed from worker to worker (no coordinator turn between them) keep every rule:
order, the concurrency cap, timeouts, retries first, and a complete log."""

import threading

import threadflow
from threadflow import ALL_OVER, EventStore, Flow, add_children_tasks, signals, task

N = 60
active = {"now": 0, "peak": 0}
lock = threading.Lock()


def add_children(state):
    add_children_tasks(((i, i) for i in range(N)), state)


def count(child, state):
    child_id, _ = child
    with lock:
        active["now"] += 1
        active["peak"] = max(active["peak"], active["now"])
    try:
        if child_id == 17:
            threadflow.current_token().wait(30)  # hangs until its timeout cancels it
        return child_id
    finally:
        with lock:
            active["now"] -= 1


class Stream(Flow):
    a = task(
        task_func=add_children,
        child_task_func=count,
        max_concurrency=3,
        task_timeout=0.3,
        task_retry_limit=1,
        exit_on_failed=False,
        next=ALL_OVER,
    )


def test_streamed_children_keep_the_cap_time_out_and_are_all_logged(store_path):
    active["peak"] = 0

    with Stream.start_link(store=store_path) as server:
        # The hand-over path is the one under test: nobody may listen to task_start here.
        assert not signals.task_start.has_receivers_for(server)
        result = server.start_flow().result(timeout=30)

    assert result.outcome == "all_over"
    assert result.failed == [("a", 17)]
    assert 1 <= active["peak"] <= 3
    store = EventStore(store_path)
    assert [cid for cid, _ in threadflow.results(result.state, "a")] == [
        i for i in range(N) if i != 17
    ]
    started = [
        e.child_id for e in store.events(result.run_id, "task_started") if e.child_id is not None
    ]
    over = [e.child_id for e in store.events(result.run_id, "task_over") if e.child_id is not None]
    assert sorted(started) == list(range(N))  # each child started once, and logged
    assert sorted(over) == [i for i in range(N) if i != 17]
    (timeout,) = store.events(result.run_id, "timeout")
    assert timeout.child_id == 17


def test_children_start_in_the_order_added_with_one_slot(store_path):
    class OneSlot(Flow):
        a = task(task_func=add_children, child_task_func=record, max_concurrency=1, next=ALL_OVER)

    order.clear()
    result = OneSlot.run(store=store_path)

    assert result.outcome == "all_over"
    assert order == list(range(N))


order: list = []


def record(child, state):
    order.append(child[0])
