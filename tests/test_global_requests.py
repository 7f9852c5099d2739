"""Requests written into the store by hand: the owner of a global name refuses bad ones, and
keeps serving (docs/store.md, "Who may write the store").

Anyone who can write the store file can insert ``requests`` rows. The owner is a real process
(``crash_child.py own``); the forged rows are inserted with ``sqlite3`` by this test, as any
other tool could. Every wait is for the answer row (or the owner's log line), with a guard
against hangs.
"""

import sqlite3
import time

import pytest
from crash_child import Child
from helpers import wait_until
from replay_flows import GlobalWork

from threadflow import EventStore, results

GUARD = 30.0  # seconds; a hang guard, never a synchronisation
#: Seconds the owner gets to answer a request: what an asking process waits (remote.py).
ANSWER_GUARD = 10.0
NAME = ("global", "g")


def owner(tmp_path, store_path):
    """A child process that owns ``('global', 'g')`` on ``store_path``."""
    child = Child(tmp_path, "own", store_path, "GlobalWork")
    try:
        child.expect("ready")
    except BaseException:
        child.kill()
        raise
    return child


def forge(store_path, rows, server="g"):
    """Insert pending requests ``(entrance, run_id)`` in one transaction; return their ids."""
    conn = sqlite3.connect(store_path, isolation_level=None, timeout=GUARD)
    try:
        conn.execute("BEGIN IMMEDIATE")
        ids = [
            conn.execute(
                "INSERT INTO requests (server, entrance, run_id, status, created) "
                "VALUES (?, ?, ?, 'pending', ?)",
                (server, entrance, run_id, time.time()),
            ).lastrowid
            for entrance, run_id in rows
        ]
        conn.execute("COMMIT")
    finally:
        conn.close()
    return ids


def answers(store_path, ids):
    """``{id: (status, message)}`` once the owner has answered every request of ``ids``."""
    marks = ",".join("?" * len(ids))
    got = {}

    def answered():
        conn = sqlite3.connect(store_path, timeout=GUARD)
        try:
            rows = conn.execute(
                f"SELECT id, status, message FROM requests WHERE id IN ({marks})", ids
            ).fetchall()
        finally:
            conn.close()
        got.update({i: (status, message) for i, status, message in rows})
        return all(status != "pending" for status, _ in got.values())

    assert wait_until(answered, ANSWER_GUARD), f"requests pending after {ANSWER_GUARD} s: {got}"
    return got


def execute(store_path, *statements):
    conn = sqlite3.connect(store_path, isolation_level=None, timeout=GUARD)
    try:
        for sql in statements:
            conn.execute(sql)
    finally:
        conn.close()


def serves_a_legitimate_run(store_path):
    """The owner still answers a request of another process and runs it to the end."""
    res = GlobalWork.start_flow(NAME, store=store_path).result(timeout=GUARD)
    assert res.outcome == "all_over"
    assert list(results(res.state, "work")) == [(i, i * i) for i in range(5)]
    return res


def test_forged_requests_are_refused_with_a_reason_and_the_owner_keeps_serving(
    tmp_path, store_path
):
    with owner(tmp_path, store_path) as other:
        first = serves_a_legitimate_run(store_path)
        forged = {
            "a used run id": (None, first.run_id),
            "an empty run id": (None, ""),
            "a run id of 65 characters": (None, "a" * 65),
            "a path as run id": (None, "../../etc"),
            "a run id with a space": (None, "abc def"),
            "a run id with a newline": (None, "abc\n"),
            "a run id with a terminal escape": (None, "\x1b[2Jabc"),
            "a run id of non-ASCII letters": (None, "ééé"),
            "an unknown entrance": ("nope", "0123456789ab"),
            "an empty entrance": ("", "0123456789ac"),
        }
        ids = dict(zip(forged, forge(store_path, forged.values()), strict=True))
        got = answers(store_path, list(ids.values()))

        reasons = {label: got[i] for label, i in ids.items()}
        assert all(status == "refused" for status, _ in reasons.values()), reasons
        assert "is already used by a run in this store" in reasons["a used run id"][1]
        for label in forged:
            if "run id" in label and label != "a used run id":
                assert "the run id must be text of 1 to 64 ASCII letters" in reasons[label][1], (
                    label
                )
        assert "flow 'GlobalWork' has no task 'nope'" in reasons["an unknown entrance"][1]
        assert "flow 'GlobalWork' has no task ''" in reasons["an empty entrance"][1]
        serves_a_legitimate_run(store_path)
        log = other.stderr()

    for label, i in ids.items():
        assert f"threadflow: refused request {i} for ('global', 'g'): " in log, label
    assert "\x1b" not in log  # the forged value is logged as its repr
    assert [run.run_id for run in EventStore(store_path).runs()][0] == first.run_id
    assert len(EventStore(store_path).runs()) == 2


def test_requests_of_the_wrong_type_are_refused(tmp_path, store_path):
    with owner(tmp_path, store_path) as other:
        # Whoever can write the file can also replace the table by one that checks no types.
        execute(
            store_path,
            "DROP TABLE requests",
            "CREATE TABLE requests (id INTEGER PRIMARY KEY, server, entrance, run_id, status, "
            "message, created)",
        )
        forged = {
            "a null run id": (None, None),
            "a number as run id": (None, 12),
            "bytes as run id": (None, b"0123456789ab"),
            "a number as entrance": (7, "0123456789ab"),
            "bytes as entrance": (b"work", "0123456789ab"),
        }
        ids = dict(zip(forged, forge(store_path, forged.values()), strict=True))
        got = answers(store_path, list(ids.values()))

        reasons = {label: got[i] for label, i in ids.items()}
        assert all(status == "refused" for status, _ in reasons.values()), reasons
        for label in forged:
            what = "run id" if "run id" in label else "entrance"
            assert f"the {what} must be " in reasons[label][1], (label, reasons[label])
        serves_a_legitimate_run(store_path)
        log = other.stderr()

    for i in ids.values():
        assert f"threadflow: refused request {i} " in log


@pytest.mark.parametrize("undo", ["ABORT", "ROLLBACK"])
def test_a_request_the_store_fails_to_start_is_refused_and_the_owner_keeps_serving(
    tmp_path, store_path, undo
):
    with owner(tmp_path, store_path) as other:
        # A trigger stands for any failing write: SQLite undoes the statement (ABORT) or the
        # whole transaction (ROLLBACK) and the owner's insert of the run raises.
        execute(
            store_path,
            "CREATE TRIGGER no_room BEFORE INSERT ON runs WHEN NEW.run_id = 'refused00001' "
            f"BEGIN SELECT RAISE({undo}, 'no room for this run'); END",
        )
        [request] = forge(store_path, [(None, "refused00001")])
        [(status, message)] = answers(store_path, [request]).values()

        assert status == "refused"
        assert "the store failed to start the run" in message
        assert "no room for this run" in message
        assert "refused00001" not in [run.run_id for run in EventStore(store_path).runs()]
        assert EventStore(store_path).events("refused00001") == []
        serves_a_legitimate_run(store_path)
        log = other.stderr()

    assert f"threadflow: refused request {request} for ('global', 'g'): " in log
    assert "coordinator of" not in log  # it did not fail


def logged(child, text):
    """Wait until the child's log (its stderr) holds ``text``; return the log."""
    assert wait_until(lambda: text in child.stderr(), ANSWER_GUARD), (
        f"the owner never logged {text!r}; its log:\n{child.stderr()}"
    )
    return child.stderr()


@pytest.mark.parametrize("undo", ["ABORT", "ROLLBACK"])
def test_a_request_the_store_will_not_let_the_owner_answer_stays_pending_and_harmless(
    tmp_path, store_path, undo
):
    with owner(tmp_path, store_path) as other:
        conn = sqlite3.connect(store_path, isolation_level=None, timeout=GUARD)
        try:
            conn.execute("BEGIN IMMEDIATE")
            request = conn.execute(
                "INSERT INTO requests (server, run_id, status, created) "
                "VALUES ('g', 'unanswered01', 'pending', ?)",
                (time.time(),),
            ).lastrowid
            conn.execute(
                f"CREATE TRIGGER no_answer BEFORE UPDATE ON requests WHEN NEW.id = {request} "
                f"BEGIN SELECT RAISE({undo}, 'this request is read-only'); END"
            )
            conn.execute("COMMIT")
        finally:
            conn.close()

        log = logged(other, f"threadflow: could not answer request {request} ")

        assert "this request is read-only" in log
        serves_a_legitimate_run(store_path)
        # Its run was started, then undone with the answer that could not be written.
        assert "unanswered01" not in [run.run_id for run in EventStore(store_path).runs()]
        assert EventStore(store_path).events("unanswered01") == []
        log = other.stderr()

    assert "coordinator of" not in log  # it did not fail
