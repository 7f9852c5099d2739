"""A process killed with SIGKILL mid-run leaves a store that replays to the end (API.md section 6).

A child process runs ``replay_flows.CrashFlow`` (split: 2,000 children, four at a time -> merge:
three children); at the phase under test it prints ``marker`` and blocks, and the test kills it
there. The test then checks the file, replays the run in this process and audits the whole log:
every child has exactly one ``task_over``, and nothing whose ``task_over`` was committed before
the kill ran again. The children that ran twice are printed (``pytest -s``).
"""

import sqlite3
from collections import Counter

import pytest
from crash_child import Child
from replay_flows import CRASH_CHILDREN, CRASH_MARK, CrashFlow

from threadflow import EventStore, ReplayError

MERGE_CHILDREN = 3


def kill_at(tmp_path, store_path, journal, phase, commit_every=0.0):
    """Run the crash flow in a child process, SIGKILL it at ``phase``; return (run_id, pid).

    ``commit_every=0`` commits every coordinator turn, so that only attempts in flight at the
    kill can run twice; with group commit, children that ended within the last
    ``commit_every`` seconds may run again too (docs/replay.md).
    """
    args = ("crash", store_path, phase, str(CRASH_CHILDREN), journal, str(commit_every))
    with Child(tmp_path, *args) as child:
        child.expect("marker")
        [info] = EventStore(store_path).runs()
        assert (info.pid, info.outcome, info.status) == (child.pid, None, "running")
        if phase == "parent":
            # While its owner lives, the run is not ours to replay.
            with pytest.raises(ReplayError, match=f"still running in process {child.pid} on "):
                CrashFlow.replay(info.run_id, store=store_path, children=CRASH_CHILDREN)
        child.kill()
    return info.run_id, child.pid


def check_file_after_kill(store_path, run_id, pid):
    conn = sqlite3.connect(store_path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        conn.close()
    info = EventStore(store_path).run(run_id)
    assert (info.pid, info.outcome, info.status) == (pid, None, "interrupted")
    assert EventStore(store_path).events(run_id, "replayed") == []


def executions(journal, skip=0):
    """``(task, child_id)`` of each attempt the journal saw start, after its first ``skip``."""
    with open(journal) as f:
        lines = f.read().splitlines()[skip:]
    return [(name, None if child == "-" else int(child)) for name, child in map(str.split, lines)]


def audit(store_path, run_id, before_kill, after_kill):
    """Check the replayed log against what really ran; return the children that ran twice,
    by the log (``task_started`` in both segments) and by the journal."""
    events = EventStore(store_path).events(run_id)
    [mark] = [e.seq for e in events if e.kind == "replayed"]
    before = [e for e in events if e.seq < mark]
    after = [e for e in events if e.seq > mark]

    children = [("split", i) for i in range(CRASH_CHILDREN)]
    children += [("merge", i) for i in range(MERGE_CHILDREN)]
    overs = Counter((e.task, e.child_id) for e in events if e.kind == "task_over")
    assert overs == Counter({("split", None): 1, ("merge", None): 1, **dict.fromkeys(children, 1)})
    assert Counter(before_kill + after_kill).keys() == overs.keys()
    assert max(Counter(before_kill).values()) == 1
    assert max(Counter(after_kill).values()) == 1

    over_before = {(e.task, e.child_id) for e in before if e.kind == "task_over"}
    rerun = over_before & set(after_kill)
    assert not rerun, f"finished before the kill, yet ran again: {sorted(rerun)[:10]}"
    started_before = {(e.task, e.child_id) for e in before if e.kind == "task_started"}
    started_after = {(e.task, e.child_id) for e in after if e.kind == "task_started"}
    assert started_after == set(after_kill)
    by_log = sorted(k for k in started_before & started_after if k[1] is not None)
    by_journal = sorted(k for k in set(before_kill) & set(after_kill) if k[1] is not None)
    return by_log, by_journal


def brief(keys):
    """``split 497-500, 512`` for a sorted list of (task, child_id)."""
    parts = []
    for task_name, child_id in keys:
        if parts and parts[-1][0] == task_name and parts[-1][2] == child_id - 1:
            parts[-1][2] = child_id
        else:
            parts.append([task_name, child_id, child_id])
    return ", ".join(f"{t} {lo}" if lo == hi else f"{t} {lo}-{hi}" for t, lo, hi in parts)


@pytest.mark.parametrize(
    ("phase", "parents_logged_twice", "parents_ran_twice"),
    [
        ("parent", {"split"}, {"split"}),
        ("children", set(), set()),
        # Killed in the callback: merge's task_started is committed, its function never ran.
        ("stage_callback", {"merge"}, set()),
        ("stage_parent", {"merge"}, {"merge"}),
    ],
)
def test_killed_run_replays_to_the_end_without_redoing_finished_work(
    tmp_path, store_path, phase, parents_logged_twice, parents_ran_twice
):
    journal = str(tmp_path / "journal.txt")
    run_id, pid = kill_at(tmp_path, store_path, journal, phase)
    check_file_after_kill(store_path, run_id, pid)
    before_kill = executions(journal)

    res = CrashFlow.replay(run_id, store=store_path, children=CRASH_CHILDREN, journal=journal)

    assert res.outcome == "all_over"
    assert res.run_id == run_id
    assert EventStore(store_path).run(run_id).status == "all_over"
    after_kill = executions(journal, skip=len(before_kill))
    by_log, by_journal = audit(store_path, run_id, before_kill, after_kill)
    print(
        f"\n{phase}: children that ran twice: {len(by_log)} by the log ({brief(by_log)}), "
        f"{len(by_journal)} in fact ({brief(by_journal)})"
    )
    if phase == "children":
        # The marked child was running at the kill. Others ran twice only if their end was not
        # yet committed (audit() checks that): those running, those handed over from worker to
        # worker, and those whose outcome was in the coordinator's last, uncommitted turn.
        assert ("split", CRASH_MARK) in by_journal
    else:
        assert by_log == by_journal == []
    parents_rerun = {t for t, c in set(before_kill) & set(after_kill) if c is None}
    assert parents_rerun == parents_ran_twice, "parents that ran both before and after the kill"
    starts = EventStore(store_path).iter_events(run_id, "task_started")
    parents = Counter(e.task for e in starts if e.child_id is None)
    assert {name for name, n in parents.items() if n == 2} == parents_logged_twice
    assert set(parents.values()) <= {1, 2}


def test_with_group_commit_a_kill_reruns_only_unlogged_children(tmp_path, store_path):
    # The default commit_every groups commits: children that ended less than commit_every
    # before the kill have no task_over on disk and run again. Nothing committed runs again,
    # and every child still ends exactly once in the log.
    journal = str(tmp_path / "journal.txt")
    run_id, pid = kill_at(tmp_path, store_path, journal, "children", CrashFlow.commit_every)
    check_file_after_kill(store_path, run_id, pid)
    before_kill = executions(journal)

    res = CrashFlow.replay(run_id, store=store_path, children=CRASH_CHILDREN, journal=journal)

    assert res.outcome == "all_over"
    after_kill = executions(journal, skip=len(before_kill))
    by_log, by_journal = audit(store_path, run_id, before_kill, after_kill)
    print(
        f"\ngroup commit ({CrashFlow.commit_every:g} s): children that ran twice: "
        f"{len(by_log)} by the log, {len(by_journal)} in fact"
    )
    assert ("split", CRASH_MARK) in by_journal
