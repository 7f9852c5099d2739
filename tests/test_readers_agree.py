"""Every reader of a run says the same thing about it: the result of the last replay,
``threadflow runs`` (table and JSON), ``show --summary`` (text and JSON), the timeline and the
live progress all show the fold's numbers and durations.

The run (``readers_flows.Agree``) has what used to make them disagree:

* segment 1 (this process): ``split``'s first attempt adds its six children and fails, the
  retry adds them again; child 2 fails twice and fails the run;
* segment 2 (a child process): a replay, killed with SIGKILL while child 4 runs, after child 2
  succeeded (it *recovered*) and child 3 too;
* segment 3 (the command line, ``replay --progress --json``): the rest; ``load``'s child 1 fails
  and is tolerated.

Between the segments the run was not running: that time is no part of its duration.
"""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner
from crash_child import Child
from helpers import wait_until
from readers_flows import Agree

from threadflow import EventStore, RunHandle
from threadflow._format import duration
from threadflow.cli import cli
from threadflow.events import FINAL_KINDS, ts_seconds
from threadflow.progress import FollowedRun
from threadflow.timeline import build, render

#: What the live area writes to move the cursor, erase its lines and hide the cursor.
CURSOR = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")


def invoke(*args):
    try:
        runner = CliRunner(mix_stderr=False)
    except TypeError:  # click >= 8.2 keeps stderr apart by itself
        runner = CliRunner()
    return runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)


def children_done_since_replay(store, run_id):
    """``split``'s children with a committed ``task_over`` after the last ``replayed`` event.

    The child process commits a turn's events within ``commit_every``: a child may run before
    the events of the turn that started it are on disk, so the test waits for them.
    """
    events = store.events(run_id)
    replays = [e.seq for e in events if e.kind == "replayed"]
    return {
        e.child_id
        for e in events
        if replays and e.seq > replays[-1] and e.kind == "task_over" and e.task == "split"
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The store and run id, and what the third segment's ``threadflow replay`` printed."""
    folder = tmp_path_factory.mktemp("agree")
    path = str(folder / "runs.db")
    first = Agree.run(store=path, broken={2}, parent_fails=[])
    assert (first.outcome, first.task) == ("failed_over", ("split", 2))
    store = EventStore(path)
    with Child(folder, "agree", path, first.run_id) as child:
        child.expect("marker")  # child 4 runs: 2 and 3 have returned
        assert wait_until(lambda: {2, 3} <= children_done_since_replay(store, first.run_id))
        child.kill()
    assert store.run(first.run_id).status == "interrupted"
    replayed = invoke(
        "replay",
        first.run_id,
        "--db",
        path,
        "--flow",
        "readers_flows:Agree",
        "--progress",
        "--json",
    )
    assert replayed.exit_code == 0, replayed.stderr
    return path, first.run_id, replayed


def segments_by_hand(events):
    """``(active, wall)`` from the raw events: each segment runs from its flow_started or
    replayed event to its final event (to its last event if it has none)."""
    bounds = [i for i, e in enumerate(events) if e.kind in ("flow_started", "replayed")]
    active = 0.0
    for start, stop in zip(bounds, [*bounds[1:], len(events)], strict=True):
        segment = events[start:stop]
        final = [e for e in segment if e.kind in FINAL_KINDS]
        end = final[0] if final else segment[-1]
        active += ts_seconds(end.ts) - ts_seconds(segment[0].ts)
    return active, ts_seconds(events[-1].ts) - ts_seconds(events[0].ts)


def page_header(page):
    return " ".join(re.sub(r"<[^>]+>", " ", page.split("<svg", 1)[0]).split())


def test_the_fold_counts_each_child_once_and_the_run_without_its_pauses(run):
    path, run_id, _ = run
    store = EventStore(path)
    history = store.history(run_id)
    split, load = history.tasks["split"], history.tasks["load"]
    assert (history.outcome, history.segments) == ("all_over", 3)
    assert [s.outcome for s in history.spans] == ["failed_over", None, "all_over"]
    # The first attempt's six children were discarded: six, not twelve.
    assert (split.attempts, split.children_added, split.children_done) == (2, 6, 6)
    assert (split.children_failed, split.children_recovered) == (0, 1)  # child 2
    assert (load.children_added, load.children_done, load.children_failed) == (2, 1, 1)
    assert load.children_tolerated == 1
    active, wall = segments_by_hand(store.events(run_id))
    assert history.active == pytest.approx(active, abs=1e-6)
    assert history.wall == pytest.approx(wall, abs=1e-6)
    assert history.wall > history.active  # each replay came after the end before it


def test_the_result_lists_what_the_fold_lists(run):
    path, run_id, replayed = run
    history = EventStore(path).history(run_id)
    result = json.loads(replayed.stdout)
    assert result == {
        "run_id": run_id,
        "outcome": "all_over",
        "task": None,
        "error": None,
        "failed": [["load", 1]],
    }
    assert history.failed == [("load", 1)]


def test_runs_shows_the_folds_counts_and_active_time(run):
    path, run_id, _ = run
    history = EventStore(path).history(run_id)
    (record,) = json.loads(invoke("runs", "--db", path, "--json").stdout)
    assert (record["status"], record["segments"]) == ("all_over", 3)
    assert (record["children_added"], record["children_done"], record["children_failed"]) == (
        8,
        7,
        1,
    )
    assert (record["children_tolerated"], record["children_recovered"]) == (1, 1)
    assert record["duration"] == record["active"] == history.active
    assert record["wall"] == history.wall
    header, row = invoke("runs", "--db", path).stdout.splitlines()
    cells = re.split(r"\s{2,}", row.strip())
    assert cells[4:] == [duration(history.active), "7", "1"]


def test_show_summary_shows_the_folds_counts_and_active_time(run):
    path, run_id, _ = run
    history = EventStore(path).history(run_id)
    summary = json.loads(invoke("show", run_id, "--db", path, "--summary", "--json").stdout)
    assert (summary["duration"], summary["wall"]) == (history.active, history.wall)
    tasks = {t["task"]: t for t in summary["tasks"]}
    assert {k: tasks["split"][k] for k in ("children_added", "children_done")} == {
        "children_added": 6,
        "children_done": 6,
    }
    assert (tasks["split"]["children_failed"], tasks["split"]["children_recovered"]) == (0, 1)
    assert (tasks["load"]["children_failed"], tasks["load"]["children_tolerated"]) == (1, 1)
    text = invoke("show", run_id, "--db", path, "--summary").stdout
    head, _, body = text.partition("\n\n")
    fields = dict(re.split(r":\s+", line, maxsplit=1) for line in head.splitlines())
    assert fields["duration"] == duration(history.active)
    assert fields["first start to last event"] == duration(history.wall)
    assert fields["recovered"].startswith("1 ")
    rows = [re.split(r"\s{2,}", line.strip()) for line in body.strip().splitlines()[1:]]
    assert [r[:5] for r in rows] == [["split", "2", "6", "6", "0"], ["load", "1", "2", "1", "1"]]


def test_the_timeline_shows_the_folds_counts_and_active_time(run):
    path, run_id, _ = run
    store = EventStore(path)
    history = store.history(run_id)
    tl = build(store.iter_events(run_id), run_id)
    assert [(s.name, s.added) for s in tl.stages] == [("split", 6), ("load", 2)]
    assert (tl.history.active, tl.history.wall) == (history.active, history.wall)
    text = page_header(render(tl))
    assert f"duration {duration(history.active)} " in text
    assert f"first start to last event {duration(history.wall)} " in text
    split_time = duration(history.task_seconds("split"))
    assert re.search(rf"split \+0\.000 s {re.escape(split_time)} 2 6 6 0 ", text), text


def test_the_progress_of_the_replay_counts_the_earlier_segments_too(run):
    path, run_id, replayed = run
    history = EventStore(path).history(run_id)
    lines = CURSOR.sub("", replayed.stderr).splitlines()
    split = [line for line in lines if line.startswith("split ")][-1]
    load = [line for line in lines if line.startswith("load ")][-1]
    assert "[####################] 6/6 children" in split
    assert f"  {duration(history.task_seconds('split'))}  " in split
    assert "[####################] 2/2 children" in load and "1 failed" in load
    # Followed in the store, the progress folds exactly what the store folds.
    progress = FollowedRun(EventStore(path), run_id)
    try:
        followed = progress.update()
    finally:
        progress.close()
    assert (followed.children_added, followed.children_done, followed.children_failed) == (
        history.children_added,
        history.children_done,
        history.children_failed,
    )
    assert (followed.active, followed.wall) == (history.active, history.wall)
    # and so does what an application reads from a handle of the run
    told = RunHandle(run_id, None, EventStore(path)).progress()
    assert (told.status, told.segments, told.total, told.done, told.failed) == (
        "all_over",
        3,
        history.children_added,
        history.children_done,
        history.children_failed,
    )
    assert [(t.name, t.state, t.total, t.done, t.failed) for t in told.tasks.values()] == [
        (name, "over", t.children_added, t.children_done, t.children_failed)
        for name, t in history.tasks.items()
    ]
    assert told.seconds == history.active
