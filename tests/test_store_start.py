"""Opening a store at start: concurrent creation (API.md section 6, "never a database is locked
error under normal load"), stores that cannot be written or are corrupt, and the permissions of
the files it creates.
"""

import multiprocessing
import os
import random
import re
import shutil
import sqlite3
import stat
import subprocess
import sys

import pytest
import store_flows
from store_flows import GUARD, Filler, Tiny, create_and_run

from threadflow import StoreError

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
            if process.is_alive():  # stuck: do not leave it behind the test
                process.kill()
                process.join()
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


# --- stores that cannot be written, or are corrupt ----------------------------------------------


def snapshot(path):
    """The file's bytes (None if missing) and the names in its directory."""
    folder = os.path.dirname(path)
    if not os.path.exists(path):
        return None, sorted(os.listdir(folder))
    with open(path, "rb") as f:
        return f.read(), sorted(os.listdir(folder))


def bound_by_permissions():
    """The command that runs a child process to which file permissions apply.

    Root writes any file whatever its mode (the CAP_DAC_OVERRIDE capability), so a read-only
    store would prove nothing run as root. As root the child runs under util-linux's setpriv
    without that capability: the kernel then refuses its writes as it would a user's.
    """
    if not hasattr(os, "geteuid"):
        pytest.skip("file permissions are POSIX ones")
    if os.geteuid() != 0:
        return [sys.executable]
    setpriv = shutil.which("setpriv")
    drop = ["--inh-caps=-dac_override", "--bounding-set=-dac_override"]
    if setpriv is None or subprocess.run([setpriv, *drop, "true"]).returncode != 0:
        pytest.skip("run as root, which may write read-only files, and setpriv cannot drop that")
    return [setpriv, *drop, sys.executable]


def read_only_file(folder):
    path = str(folder / "runs.db")
    assert store_flows.start_once(path) == "all_over"
    os.chmod(path, 0o444)
    return path, r"this process cannot write the store '{path}' \(Permission denied\)"


def store_in_read_only_directory(folder):
    path = str(folder / "runs.db")
    assert store_flows.start_once(path) == "all_over"
    os.chmod(folder, 0o555)
    return path, r"this process cannot write the store '{path}' \(attempt to write a readonly "


def new_store_in_read_only_directory(folder):
    os.chmod(folder, 0o555)
    return str(folder / "runs.db"), r"cannot create the store '{path}' in '{folder}': "


@pytest.mark.parametrize(
    "make",
    [read_only_file, store_in_read_only_directory, new_store_in_read_only_directory],
    ids=lambda make: make.__name__,
)
def test_a_store_this_process_cannot_write_is_refused_at_start_and_left_as_it_was(tmp_path, make):
    folder = tmp_path / "stores"
    folder.mkdir()
    path, expected = make(folder)
    before = snapshot(path)
    try:
        said = subprocess.run(
            [*bound_by_permissions(), store_flows.__file__, path],
            capture_output=True,
            text=True,
            timeout=GUARD,
        )
    finally:
        os.chmod(folder, 0o755)  # so that tmp_path can be removed

    assert said.returncode == 0, said.stderr
    message = said.stdout.strip()
    assert message.startswith("StoreError: "), message
    assert re.search(expected.format(path=re.escape(path), folder=re.escape(str(folder))), message)
    assert "writable" in message or "write access" in message, f"no advice in: {message}"
    assert snapshot(path) == before


def test_a_store_with_a_corrupt_page_is_refused_at_start_and_left_as_it_was(store_path):
    assert Filler.run(store=store_path, children=2000).outcome == "all_over"
    page_size = pragma(store_path, "page_size")
    with open(store_path, "r+b") as f:
        f.seek(pragma(store_path, "page_count") // 2 * page_size)  # a page of the log's table
        f.write(random.Random(5).randbytes(page_size))
    assert quick_check(store_path) != "ok", "the test did not break the store"
    before = snapshot(store_path)

    with pytest.raises(StoreError, match=r"is corrupt; SQLite's quick_check found: ") as caught:
        Tiny.start_link(store=store_path)

    assert store_path in str(caught.value)
    assert "restore it from a backup" in str(caught.value)
    assert snapshot(store_path) == before
    assert Tiny.whereis("store-tiny") is None


def pragma(path, name):
    conn = sqlite3.connect(path)
    try:
        return conn.execute(f"PRAGMA {name}").fetchone()[0]
    finally:
        conn.close()


def quick_check(path):
    """SQLite's own verdict on the file: ``"ok"``, or what is wrong."""
    try:
        return pragma(path, "quick_check")
    except sqlite3.DatabaseError as exc:  # a page too broken to walk
        return str(exc)


# --- permissions of the files ------------------------------------------------------------------


@pytest.fixture
def umask_022():
    """The usual umask, under which SQLite alone creates files that every user may read."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def modes(path):
    """Permissions of the store file and of its -wal and -shm files, as octal strings."""
    return {
        os.path.basename(name): oct(stat.S_IMODE(os.stat(name).st_mode))
        for name in (path, path + "-wal", path + "-shm")
    }


def run_and_look(flow, path):
    """Run ``flow`` once on ``path`` and return the modes while the server still has it open."""
    with flow.start_link(store=path) as server:
        assert server.start_flow().result(GUARD).outcome == "all_over"
        return modes(path)


class Shared(Tiny, server_name="store-shared"):
    store_mode = 0o640


class GroupWrites(Tiny, server_name="store-group-writes"):
    store_mode = 0o660


def test_a_new_store_and_its_wal_and_shm_files_are_readable_by_their_owner_only(
    store_path, umask_022
):
    assert run_and_look(Tiny, store_path) == {
        "runs.db": "0o600",
        "runs.db-wal": "0o600",
        "runs.db-shm": "0o600",
    }


@pytest.mark.parametrize(("flow", "mode"), [(Shared, "0o640"), (GroupWrites, "0o660")])
def test_store_mode_sets_the_permissions_of_a_new_store_as_given(store_path, umask_022, flow, mode):
    # 0o660 is not cut to 0o640 by the umask: a group that is meant to write can.
    assert run_and_look(flow, store_path) == {
        "runs.db": mode,
        "runs.db-wal": mode,
        "runs.db-shm": mode,
    }


def test_an_existing_store_keeps_its_permissions(store_path, umask_022):
    run_and_look(Shared, store_path)
    assert stat.S_IMODE(os.stat(store_path).st_mode) == 0o640  # -wal and -shm went with close

    assert set(run_and_look(Tiny, store_path).values()) == {"0o640"}


@pytest.mark.parametrize("bad", [0o1000, -1, "0o600", 1.5, True], ids=repr)
def test_a_store_mode_that_is_not_a_permission_mode_is_refused_before_any_file_is_made(
    tmp_path, bad
):
    class Bad(Tiny, server_name="store-bad-mode"):
        store_mode = bad

    with pytest.raises(ValueError, match=r"store_mode=.* is not a file permission mode; use"):
        Bad.start_link(store=str(tmp_path / "runs.db"))

    assert os.listdir(tmp_path) == []
    assert Bad.whereis("store-bad-mode") is None


def runs_seen_by_another_process(path):
    """How many runs a fresh process reads in the store (its connection closed at once, as a
    ``threadflow runs`` would)."""
    code = (
        f"import sqlite3; c = sqlite3.connect({path!r}); "
        "print(c.execute('SELECT count(*) FROM runs').fetchone()[0]); c.close()"
    )
    said = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert said.returncode == 0, said.stderr
    return int(said.stdout)


def test_a_second_server_on_a_store_keeps_the_first_ones_commits_seen_by_other_processes(
    tmp_path,
):
    # Checking that the store is writable used to open and close the file, which drops every
    # POSIX lock this process held on it: a reader in another process then took the store for
    # unused and deleted the WAL the first server went on writing into, unseen by anyone.
    path = str(tmp_path / "runs.db")
    with Tiny.start_link(store=path) as tiny:
        assert tiny.start_flow().result(timeout=GUARD).outcome == "all_over"
        with Filler.start_link(store=path, children=1):  # the second writer of this process
            assert runs_seen_by_another_process(path) == 1
            assert tiny.start_flow().result(timeout=GUARD).outcome == "all_over"
            assert runs_seen_by_another_process(path) == 2
            assert os.path.exists(path + "-wal")
