"""The store file: what is refused and left untouched, run status, and the fold (API.md section 6).

Files that are not a store of this threadflow are refused with ``StoreError`` and stay
byte-identical, with no journal or WAL file left beside them.
"""

import dataclasses
import os
import random
import sqlite3
import time

import pytest
from crash_child import Child
from replay_flows import CrashFlow

from threadflow import (
    ALL_OVER,
    EventStore,
    Flow,
    StoreError,
    add_children_tasks,
    task,
)

GUARD = 30.0  # seconds; a hang guard for result(), never a synchronisation


def add_four(state):
    add_children_tasks(((i, i) for i in range(4)), state)


def flaky(child, state):
    """Child 1 fails on its first attempt, child 3 on every attempt."""
    child_id = child[0]
    if child_id == 1 and child_id not in state["failed_once"]:
        state["failed_once"].add(child_id)
        raise ValueError("child 1 fails once")
    if child_id == 3:
        raise ValueError("child 3 always fails")
    return child_id


def report(state):
    return "reported"


class Known(Flow, server_name="store-known"):
    fetch = task(
        task_func=add_four,
        child_task_func=flaky,
        max_concurrency=1,
        exit_on_failed=False,
        task_retry_limit=2,
        next="report",
    )
    report = task(task_func=report, task_retry_limit=1, next=ALL_OVER)


def snapshot(path):
    """The file's bytes and the names in its directory."""
    with open(path, "rb") as f:
        return f.read(), sorted(os.listdir(os.path.dirname(path)))


# --- files that are refused -------------------------------------------------------------------


def newer_schema(path):
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE events (seq INTEGER PRIMARY KEY, kind TEXT)")
    conn.execute("INSERT INTO events (kind) VALUES ('from the future')")
    conn.execute("PRAGMA user_version = 99")
    conn.commit()
    conn.close()


def random_bytes(path):
    with open(path, "wb") as f:
        f.write(random.Random(7).randbytes(8192))


def text_file(path):
    with open(path, "w") as f:
        f.write("id,name\n" + "".join(f"{i},name {i}\n" for i in range(200)))


def other_application(path):
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
    conn.execute("INSERT INTO users (name) VALUES ('alice')")
    conn.commit()
    conn.close()


REFUSED = {
    newer_schema: r"schema version 99, written by a newer threadflow",
    random_bytes: r"not a usable SQLite database",
    text_file: r"not a usable SQLite database",
}


@pytest.mark.parametrize("make", list(REFUSED), ids=lambda make: make.__name__)
def test_start_link_refuses_a_file_it_cannot_use_and_leaves_it_untouched(tmp_path, make):
    path = str(tmp_path / "runs.db")
    make(path)
    before = snapshot(path)

    with pytest.raises(StoreError, match=REFUSED[make]) as caught:
        Known.start_link(store=path)

    assert path in str(caught.value)
    assert snapshot(path) == before
    assert Known.whereis("store-known") is None


@pytest.mark.parametrize("make", [*REFUSED, other_application], ids=lambda make: make.__name__)
def test_event_store_refuses_a_file_that_is_not_its_store_and_leaves_it_untouched(tmp_path, make):
    path = str(tmp_path / "runs.db")
    make(path)
    before = snapshot(path)

    for read in (EventStore(path).runs, lambda: EventStore(path).events("any")):
        with pytest.raises(StoreError, match="runs.db"):
            read()

    assert snapshot(path) == before


def test_a_store_in_a_missing_directory_is_a_clear_store_error(tmp_path):
    missing = tmp_path / "no-such-dir"
    path = str(missing / "runs.db")

    with pytest.raises(StoreError) as caught:
        Known.start_link(store=path)

    message = str(caught.value)
    assert path in message
    assert "directory" in message, f"the message does not say the directory is missing: {message}"
    assert not missing.exists()
    assert Known.whereis("store-known") is None


def test_event_store_on_a_missing_file_raises_store_error_and_creates_nothing(tmp_path):
    path = str(tmp_path / "missing.db")

    with pytest.raises(StoreError, match="no store at"):
        EventStore(path).runs()

    assert os.listdir(tmp_path) == []


def test_readers_leave_the_store_of_a_crashed_writer_byte_identical(tmp_path, store_path):
    # A writer killed with events in the WAL that no checkpoint copied into the file: a reader
    # that opened the file read-write and closed it last would copy them now, and delete the WAL.
    Known.run(store=store_path, failed_once=set())
    wal = store_path + "-wal"
    hold = sqlite3.connect(f"file:{store_path}?mode=ro", uri=True)
    hold.execute("BEGIN")
    hold.execute("SELECT count(*) FROM events").fetchone()  # a snapshot no checkpoint passes
    journal = str(tmp_path / "journal")
    with Child(tmp_path, "crash", store_path, "children", "600", journal) as child:
        child.expect("marker")
        child.kill()
    hold.close()

    def state():
        wal_size = os.path.getsize(wal) if os.path.exists(wal) else None
        return os.stat(store_path).st_mtime_ns, snapshot(store_path), wal_size

    before = state()
    assert before[2]  # the WAL holds what the file does not

    store = EventStore(store_path)
    infos = store.runs()
    for info in infos:
        store.history(info.run_id)
        list(store.iter_rows(info.run_id))
        follower = store.follow(info.run_id)
        follower.update()
        follower.close()

    assert [i.status for i in infos] == ["all_over", "interrupted"]
    assert state() == before


# --- run status -------------------------------------------------------------------------------


def test_run_status_is_running_while_the_owner_lives_and_interrupted_once_it_is_gone(
    tmp_path, store_path
):
    with Child(tmp_path, "crash", store_path, "parent", "10", str(tmp_path / "journal")) as child:
        child.expect("marker")
        [info] = EventStore(store_path).runs()
        assert (info.pid, info.outcome, info.status) == (child.pid, None, "running")
        # A lease that ran out makes the run interrupted even while its pid lives.
        assert dataclasses.replace(info, heartbeat=time.time() - 3600).status == "interrupted"
        child.kill()

    [info] = EventStore(store_path).runs()
    assert (info.pid, info.outcome, info.status) == (child.pid, None, "interrupted")
    assert info.flow == CrashFlow.definition.name


def test_run_status_of_a_run_in_this_process(store_path):
    with Known.start_link(store=store_path, failed_once=set()) as server:
        res = server.start_flow().result(timeout=GUARD)
    [info] = EventStore(store_path).runs()
    assert (info.run_id, info.status, info.pid) == (res.run_id, "all_over", os.getpid())
    assert (info.children_done, info.children_failed) == (3, 1)


# --- the fold ---------------------------------------------------------------------------------


def test_history_folds_a_known_run(store_path):
    res = Known.run(store=store_path, failed_once=set())
    assert res.outcome == "all_over"
    events = EventStore(store_path).events(res.run_id)
    first_child = min(e.seq for e in events if e.kind == "child_added")

    history = EventStore(store_path).history(res.run_id)

    assert (history.run_id, history.flow, history.entrance) == (res.run_id, "Known", "fetch")
    assert history.definition == {"fetch": ["report"], "report": []}
    assert (history.outcome, history.segments, history.task, history.error) == (
        "all_over",
        1,
        None,
        None,
    )
    assert history.failed == [("fetch", 3)]
    assert history.events == len(list(EventStore(store_path).iter_rows(res.run_id)))
    assert history.callback_errors == 0
    fetch = history.tasks["fetch"]
    assert (fetch.started, fetch.parent_over, fetch.all_over, fetch.attempts) == (
        True,
        True,
        True,
        1,
    )
    counts = (
        fetch.children_added,
        fetch.children_started,
        fetch.children_done,
        fetch.children_failed,
    )
    assert counts == (4, 6, 3, 1)
    assert (fetch.exits, fetch.retries, fetch.timeouts, fetch.abandoned) == (3, 2, 0, 0)
    assert fetch.released == [(first_child, first_child + 3)]
    after = history.tasks["report"]
    assert (after.attempts, after.parent_over, after.all_over, after.children_added) == (
        1,
        True,
        True,
        0,
    )
    assert set(history.tasks) == {"fetch", "report"}
