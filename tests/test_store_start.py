"""Opening a store at start: concurrent creation (API.md section 6, "never a database is locked
error under normal load").
"""

import multiprocessing
import sqlite3

from store_flows import GUARD, create_and_run

#: Processes that create the same new store at once, and how many new stores they create.
PROCESSES = 8
ROUNDS = 20


def test_processes_creating_the_same_new_store_at_once_all_start_and_run(tmp_path):
    # Spawned processes, as a user's separate programs would be. They import threadflow once
    # and then create the stores one after another, released together by a barrier for each,
    # so that every creation is a real race between PROCESSES writers.
    paths = [str(tmp_path / f"round-{n}.db") for n in range(ROUNDS)]
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(PROCESSES)
    answers = context.Queue()
    processes = [
        context.Process(target=create_and_run, args=(paths, barrier, answers))
        for _ in range(PROCESSES)
    ]
    for process in processes:
        process.start()
    try:
        got = [answers.get(timeout=GUARD) for _ in range(PROCESSES * ROUNDS)]
    finally:
        for process in processes:
            process.join(GUARD)
    failed = [f"{path}: {outcome}" for path, outcome in got if outcome != "all_over"]

    assert not failed, f"{len(failed)} of {len(got)} starts failed; the first:\n{failed[0]}"
    assert [process.exitcode for process in processes] == [0] * PROCESSES
    if sqlite3.sqlite_version_info >= (3, 37):
        # One creator made each schema, whole: no table lost its STRICT typing to the race.
        loose = [path for path in paths if not all(sql.endswith("STRICT") for sql in tables(path))]
        assert not loose, f"tables without STRICT in {loose}"


def tables(path):
    conn = sqlite3.connect(path)
    try:
        return [row[0] for row in conn.execute("SELECT sql FROM sqlite_master WHERE type='table'")]
    finally:
        conn.close()
