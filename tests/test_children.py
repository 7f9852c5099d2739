"""Children: durable on return, lazy, ordered, bounded, validated (API.md section 2)."""

import re
import resource
import sqlite3
import threading

import pytest

import threadflow
from threadflow import ALL_OVER, DuplicateChildError, Flow, task

# --- helpers ---


def count_events(db_path, run_id, kind, children_only=False):
    """Count events of a run with a connection of our own (not the engine's). A ``task_ran``
    row (a child started and over between two commits) counts as its start and its end."""
    kinds = (kind, "task_ran") if kind in ("task_started", "task_over") else (kind, kind)
    sql = "SELECT count(*) FROM events WHERE run_id = ? AND kind IN (?, ?)"
    if children_only:
        sql += " AND child_id IS NOT NULL"
    conn = sqlite3.connect(db_path, timeout=30)
    try:
        return conn.execute(sql, (run_id, *kinds)).fetchone()[0]
    finally:
        conn.close()


def run_flow(flow_cls, store_path, timeout=30, **extra_state):
    with flow_cls.start_link(store=store_path, **extra_state) as server:
        handle = server.start_flow()
        return handle.result(timeout=timeout)


def raise_recorded(errors):
    """Re-raise the one error a task recorded, so pytest.raises can pin it."""
    assert len(errors) == 1, errors
    raise errors[0]


class ConcurrencyTracker:
    """Counts the child attempts running at once; a barrier makes `parties` meet."""

    def __init__(self, parties):
        self.lock = threading.Lock()
        self.current = 0
        self.peak = 0
        self.barrier = threading.Barrier(parties, timeout=10)

    def __enter__(self):
        with self.lock:
            self.current += 1
            self.peak = max(self.peak, self.current)
        return self

    def __exit__(self, *exc_info):
        with self.lock:
            self.current -= 1


# --- task functions ---


def echo_child(child, state):
    return child[1]


def noop_child(child, state):
    return None


def record_child(child, state):
    state["seen"].append(repr(child[0]))
    return child[1]


def add_and_count(state):
    threadflow.add_children_tasks(((i, i) for i in range(2500)), state)
    state["counts"].append(count_events(state["db"], state["run_id"], "child_added"))
    threadflow.add_child_task(2500, 2500, state)
    state["counts"].append(count_events(state["db"], state["run_id"], "child_added"))


def lazy_children(state, progress):
    pause = threading.Event()
    for i in range(5000):
        if i == 3000:
            # Chunks already given must reach the store while this generator is still going:
            # it is consumed chunk by chunk, not drained first. (Commits are grouped, so wait
            # a little for one; a guard of 10 s keeps a broken engine from hanging the test.)
            for _ in range(1000):
                if count_events(state["db"], state["run_id"], "child_added") > 0:
                    progress["first_durable_at"] = i
                    break
                pause.wait(0.01)
        progress["consumed"] = i + 1
        yield (i, None)


def add_from_generator(state):
    threadflow.add_children_tasks(lazy_children(state, state["progress"]), state)


def add_listed_children(state):
    threadflow.add_children_tasks(state["children"], state)


def tracked_child(child, state):
    with state["tracker"] as tracker:
        tracker.barrier.wait()
    return child[1]


def reverse_finishing_child(child, state):
    index = child[1]
    done = state["done"]
    if index + 1 < len(done):
        done[index + 1].wait(timeout=10)
    state["finished"].append(child[0])
    done[index].set()
    return index * 10


def add_bad_child(state):
    case = state["case"]
    try:
        if case == "object payload":
            threadflow.add_child_task("bad-child", object(), state)
        elif case == "set payload in a list":
            threadflow.add_children_tasks([("ok-child", 1), ("bad-child", {1, 2})], state)
        elif case == "dict id":
            threadflow.add_child_task({"a": 1}, 1, state)
        elif case == "object inside a list id":
            threadflow.add_child_task(["bad-child", object()], 1, state)
    except Exception as error:  # recorded for the test to pin
        state["errors"].append(error)


def add_duplicate_in_two_calls(state):
    threadflow.add_child_task("x", 1, state)
    try:
        threadflow.add_child_task("x", 2, state)
    except Exception as error:
        state["errors"].append(error)


def add_duplicate_in_one_call(state):
    try:
        threadflow.add_children_tasks([("x", 1), ("x", 2)], state)
    except Exception as error:
        state["errors"].append(error)


def add_look_alike_ids(state):
    threadflow.add_children_tasks([(1, "int"), (1.0, "float"), (True, "bool"), ("1", "str")], state)


def add_without_child_task_func(state):
    for adder in (
        lambda: threadflow.add_child_task("x", 1, state),
        lambda: threadflow.add_children_tasks([("x", 1)], state),
    ):
        try:
            adder()
        except Exception as error:
            state["errors"].append(error)


def add_list_ids(state):
    threadflow.add_child_task([1, "a"], "first", state)
    threadflow.add_children_tasks([([2, "b"], "second")], state)


def expand_child(child, state):
    child_id, kind = child
    state["seen"].append(child_id)
    if kind == "top":
        threadflow.add_children_tasks([([child_id, j], "leaf") for j in range(2)], state)
    return kind


def add_one_root_child(state):
    threadflow.add_child_task("root", "root", state)


def root_adds_meeting_leaves(child, state):
    if child[1] == "root":
        threadflow.add_children_tasks([(f"leaf-{j}", "leaf") for j in range(3)], state)
        return "root"
    state["barrier"].wait()
    return "leaf"


def add_200k_children(state):
    threadflow.add_children_tasks(((i, None) for i in range(200_000)), state)


# --- flows ---


class DurableFlow(Flow):
    fetch = task(task_func=add_and_count, child_task_func=noop_child, next=ALL_OVER)


class LazyFlow(Flow):
    fetch = task(task_func=add_from_generator, child_task_func=noop_child, next=ALL_OVER)


class OrderedFlow(Flow):
    fetch = task(
        task_func=add_listed_children,
        child_task_func=record_child,
        max_concurrency=1,
        next=ALL_OVER,
    )


class BoundedFlow(Flow):
    fetch = task(
        task_func=add_listed_children,
        child_task_func=tracked_child,
        max_concurrency=3,
        task_retry_limit=1,
        next=ALL_OVER,
    )


class ReverseFinishFlow(Flow):
    fetch = task(
        task_func=add_listed_children,
        child_task_func=reverse_finishing_child,
        max_concurrency=3,
        task_retry_limit=1,
        next=ALL_OVER,
    )


class BadChildFlow(Flow):
    fetch = task(task_func=add_bad_child, child_task_func=echo_child, next=ALL_OVER)


class DuplicateTwoCallsFlow(Flow):
    fetch = task(task_func=add_duplicate_in_two_calls, child_task_func=echo_child, next=ALL_OVER)


class DuplicateOneCallFlow(Flow):
    fetch = task(task_func=add_duplicate_in_one_call, child_task_func=echo_child, next=ALL_OVER)


class LookAlikeIdsFlow(Flow):
    fetch = task(task_func=add_look_alike_ids, child_task_func=echo_child, next=ALL_OVER)


class NoChildFuncFlow(Flow):
    fetch = task(task_func=add_without_child_task_func, next=ALL_OVER)


class ListIdFlow(Flow):
    fetch = task(task_func=add_list_ids, child_task_func=record_child, next=ALL_OVER)


class NestedChildrenFlow(Flow):
    fetch = task(
        task_func=add_listed_children,
        child_task_func=expand_child,
        max_concurrency=1,
        next=ALL_OVER,
    )


class ParallelGrandchildrenFlow(Flow):
    fetch = task(
        task_func=add_one_root_child,
        child_task_func=root_adds_meeting_leaves,
        max_concurrency=3,
        task_retry_limit=1,
        next=ALL_OVER,
    )


class ManyChildrenFlow(Flow):
    fetch = task(task_func=add_200k_children, child_task_func=noop_child, next=ALL_OVER)


# --- durability and laziness ---


def test_children_are_in_the_store_when_add_children_tasks_returns(store_path):
    counts: list[int] = []
    result = run_flow(DurableFlow, store_path, db=store_path, counts=counts)

    assert result.outcome == "all_over"
    assert counts == [2500, 2501]
    assert count_events(store_path, result.run_id, "task_over", children_only=True) == 2501


def test_generator_of_children_is_consumed_in_chunks_not_materialised(store_path):
    progress = {"first_durable_at": None, "consumed": 0}
    result = run_flow(LazyFlow, store_path, db=store_path, progress=progress)

    assert result.outcome == "all_over"
    assert progress["consumed"] == 5000
    # Some children were already durable while the generator still had items to give.
    assert progress["first_durable_at"] is not None
    assert progress["first_durable_at"] < 5000
    assert count_events(store_path, result.run_id, "task_over", children_only=True) == 5000


# --- order and concurrency ---


def test_children_run_in_insertion_order_under_max_concurrency_one(store_path):
    children = [(7, "a"), ("b", "b"), (3, "c"), ("a", "d"), ([2, "x"], "e"), (0, "f")]
    children += [(5.5, "g"), (True, "h"), (None, "i")]
    seen: list[str] = []
    result = run_flow(OrderedFlow, store_path, children=children, seen=seen)

    assert result.outcome == "all_over"
    assert seen == ["7", "'b'", "3", "'a'", "(2, 'x')", "0", "5.5", "True", "None"]
    assert list(threadflow.results(result.state, "fetch")) == [
        (7, "a"),
        ("b", "b"),
        (3, "c"),
        ("a", "d"),
        ((2, "x"), "e"),
        (0, "f"),
        (5.5, "g"),
        (True, "h"),
        (None, "i"),
    ]


def test_max_concurrency_is_never_exceeded_and_is_reached(store_path):
    tracker = ConcurrencyTracker(parties=3)
    children = [(i, i) for i in range(30)]
    result = run_flow(BoundedFlow, store_path, children=children, tracker=tracker)

    assert result.outcome == "all_over", result.error
    assert tracker.peak == 3
    assert list(threadflow.results(result.state, "fetch")) == children


def test_results_follow_insertion_order_not_completion_order(store_path):
    children = [("c", 0), ("a", 1), ("b", 2)]
    done = [threading.Event() for _ in children]
    finished: list[str] = []
    result = run_flow(
        ReverseFinishFlow, store_path, children=children, done=done, finished=finished
    )

    assert result.outcome == "all_over", result.error
    assert finished == ["b", "a", "c"]
    assert list(threadflow.results(result.state, "fetch")) == [("c", 0), ("a", 10), ("b", 20)]


# --- validation ---


@pytest.mark.parametrize(
    ("case", "pattern"),
    [
        ("object payload", r"bad-child"),
        ("set payload in a list", r"bad-child"),
        ("dict id", r"""\{['"]a['"]: 1\}"""),
        ("object inside a list id", r"bad-child"),
    ],
)
def test_non_json_child_raises_type_error_naming_the_child(store_path, case, pattern):
    errors: list[BaseException] = []
    result = run_flow(BadChildFlow, store_path, case=case, errors=errors)

    assert result.outcome == "all_over"
    with pytest.raises(TypeError, match=pattern):
        raise_recorded(errors)


def test_duplicate_child_id_in_a_later_call_raises_duplicate_child_error(store_path):
    errors: list[BaseException] = []
    result = run_flow(DuplicateTwoCallsFlow, store_path, errors=errors)

    with pytest.raises(DuplicateChildError, match=r"'x'"):
        raise_recorded(errors)
    assert result.outcome == "all_over"
    assert list(threadflow.results(result.state, "fetch")) == [("x", 1)]


def test_duplicate_child_id_within_one_call_raises_duplicate_child_error(store_path):
    errors: list[BaseException] = []
    run_flow(DuplicateOneCallFlow, store_path, errors=errors)

    with pytest.raises(DuplicateChildError, match=r"'x'"):
        raise_recorded(errors)


def test_int_float_bool_and_str_ids_that_look_alike_are_different_children(store_path):
    result = run_flow(LookAlikeIdsFlow, store_path)

    assert result.outcome == "all_over"
    pairs = list(threadflow.results(result.state, "fetch"))
    assert [(type(child_id), value) for child_id, value in pairs] == [
        (int, "int"),
        (float, "float"),
        (bool, "bool"),
        (str, "str"),
    ]


@pytest.mark.parametrize(
    "call",
    [
        lambda: threadflow.add_child_task("x", 1, {}),
        lambda: threadflow.add_children_tasks([("x", 1)], {}),
    ],
    ids=["add_child_task", "add_children_tasks"],
)
def test_adding_children_outside_a_task_raises_runtime_error(call):
    with pytest.raises(RuntimeError, match=r"(?i)(inside|within|from|only|outside).*task"):
        call()


def test_adding_children_from_a_task_without_child_task_func_raises_runtime_error(store_path):
    errors: list[BaseException] = []
    result = run_flow(NoChildFuncFlow, store_path, errors=errors)

    assert result.outcome == "all_over"
    assert [type(error) for error in errors] == [RuntimeError, RuntimeError]
    for error in errors:
        assert re.search(r"(?s)fetch.*child_task_func|child_task_func.*fetch", str(error))


# --- ids, results, nesting ---


def test_list_child_ids_come_back_as_tuples(store_path):
    seen: list[str] = []
    result = run_flow(ListIdFlow, store_path, seen=seen)

    assert result.outcome == "all_over"
    # Both are released when the parent returns and run in parallel: in either order.
    assert sorted(seen) == ["(1, 'a')", "(2, 'b')"]
    assert list(threadflow.results(result.state, "fetch")) == [
        ((1, "a"), "first"),
        ((2, "b"), "second"),
    ]


def test_children_added_by_children_run_after_their_adder_in_order(store_path):
    seen: list[object] = []
    children = [(i, "top") for i in range(3)]
    result = run_flow(NestedChildrenFlow, store_path, children=children, seen=seen)

    assert result.outcome == "all_over"
    leaves = [(i, j) for i in range(3) for j in range(2)]
    assert seen == [0, 1, 2, *leaves]
    assert list(threadflow.results(result.state, "fetch")) == [
        (0, "top"),
        (1, "top"),
        (2, "top"),
        *[(leaf, "leaf") for leaf in leaves],
    ]


def test_children_added_by_a_child_run_in_parallel(store_path):
    barrier = threading.Barrier(3, timeout=10)
    result = run_flow(ParallelGrandchildrenFlow, store_path, barrier=barrier)

    assert result.outcome == "all_over", result.error
    assert list(threadflow.results(result.state, "fetch")) == [
        ("root", "root"),
        ("leaf-0", "leaf"),
        ("leaf-1", "leaf"),
        ("leaf-2", "leaf"),
    ]


# --- memory ---


def test_200k_noop_children_complete_without_holding_them_in_memory(store_path):
    before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = run_flow(ManyChildrenFlow, store_path, timeout=600)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    growth_mb = (peak_kb - before_kb) / 1024
    print(f"\n200k children: peak RSS {peak_kb / 1024:.1f} MB, growth {growth_mb:.1f} MB")

    assert result.outcome == "all_over", result.error
    assert growth_mb < 300
    assert count_events(store_path, result.run_id, "task_over", children_only=True) == 200_000
