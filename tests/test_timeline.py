"""The timeline of a run: rows and bars folded from a real log, and the HTML page drawn from it.

Every run here is a real run into a store in ``tmp_path``; runs that must be caught in the
middle wait on ``threading.Event``s that the test sets.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import threading
from html.parser import HTMLParser
from pathlib import Path

import freezegun
import pytest
from click.testing import CliRunner
from helpers import wait_until

import threadflow
from threadflow import ALL_OVER, EventStore, Flow, add_children_tasks, task
from threadflow.cli import cli
from threadflow.timeline import build, render, timeline

# --- flows -----------------------------------------------------------------------------------

TRIES: dict[int, int] = {}
RELEASE = threading.Event()  # frees the thread that ignores its cancel
GO = threading.Event()  # lets Mixed's second stage start
HOLD = threading.Event()  # keeps a child running while the test looks
HELD = threading.Event()  # set when that child has started


def split(state):
    add_children_tasks(((i, {"n": i}) for i in range(1, 5)), state)


def work(child, state):
    """1 fails once; 2 hangs past the timeout once, cooperatively; 3 ignores its cancel once."""
    child_id, _ = child
    TRIES[child_id] = TRIES.get(child_id, 0) + 1
    first = TRIES[child_id] == 1
    if child_id == 1 and first:
        raise ConnectionError('HTTP 503 <busy> & "try again"')
    if child_id == 2 and first:
        threadflow.sleep(30)
    if child_id == 3 and first:
        RELEASE.wait(30)  # a thread that never looks at its token
    return child_id * 10


def batches(state):
    if not GO.wait(30):
        raise TimeoutError("the test never said go")
    add_children_tasks([(1, None), (2, None)], state)


def load_batch(child, state):
    if child[0] == 2:
        raise ValueError("batch 2 is malformed")
    return 1


def finish(state):
    return None


class Mixed(Flow):
    """Retries, a cooperative timeout, an abandoned thread, then a fatal child failure."""

    abandon_grace = 0.05
    split = task(
        task_func=split,
        child_task_func=work,
        max_concurrency=4,
        task_retry_limit=2,
        task_timeout=0.2,
        next="load",
    )
    load = task(
        task_func=batches,
        child_task_func=load_batch,
        max_concurrency=1,
        task_retry_limit=2,
        next="finish",
    )
    finish = task(task_func=finish, next=ALL_OVER)


def many(state):
    add_children_tasks(((i, None) for i in range(200)), state)


def quick(child, state):
    if child[0] in (150, 170):
        raise ValueError("bad")
    return child[0]


class Many(Flow):
    split = task(
        task_func=many,
        child_task_func=quick,
        max_concurrency=8,
        task_retry_limit=1,
        exit_on_failed=False,
        next=ALL_OVER,
    )


def hold(child, state):
    if not HOLD.wait(30):
        raise TimeoutError("the test never let go")


def two(state):
    add_children_tasks([(1, None), (2, None)], state)


class Held(Flow):
    split = task(task_func=two, child_task_func=hold, max_concurrency=1, next=ALL_OVER)

    def handle_task_start(self, task, state):
        # Callbacks run once their event is committed: the child is in the store from here on.
        if len(task) == 2:
            HELD.set()


FIXED = threading.Event()


def fragile(state):
    if not FIXED.is_set():
        raise RuntimeError("disk full")


class Fragile(Flow):
    first = task(task_func=finish, next="second")
    second = task(task_func=fragile, task_retry_limit=1, next=ALL_OVER)


# --- helpers ---------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def reset():
    for event in (HOLD, HELD, FIXED):
        event.clear()
    yield
    HOLD.set()


class Page(HTMLParser):
    """What a browser would fetch or run, and the SVG tooltips of the bars."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.fetches: list[str] = []
        self.bar_titles: list[str] = []
        self._bar = False
        self._title = False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href", "srcset") or re.search(r"url\((?!#)", value or ""):
                self.fetches.append(f"{tag} {name}={value}")
        if tag == "rect":
            self._bar = ("class", "bar") in attrs
        self._title = tag == "title" and self._bar

    def handle_endtag(self, tag):
        if tag == "rect":
            self._bar = False
        self._title = False

    def handle_data(self, data):
        if self._title:
            self.bar_titles.append(data)


def rows_by_label(tl):
    return {row.label: row for row in tl.rows}


def kinds(row):
    return [(bar.kind, bar.attempt) for bar in row.bars if not bar.thread_only]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A Mixed run that ended failed_over, with its abandoned thread still blocked when the
    server stopped (so the log ends before that thread returns)."""
    path = str(tmp_path_factory.mktemp("mixed") / "runs.db")
    TRIES.clear()
    RELEASE.clear()
    GO.clear()
    try:
        with Mixed.start_link(store=path) as server:
            handle = server.start_flow()
            # The second stage waits until the ignored cancel has been recorded as abandoned.
            assert wait_until(lambda: server.abandoned == 1), "child 3 was never abandoned"
            GO.set()
            result = handle.result(timeout=30)
    finally:
        GO.set()
        RELEASE.set()
    assert result.outcome == "failed_over"
    return path, result.run_id


@pytest.fixture(scope="module")
def mixed_timeline(mixed):
    path, run_id = mixed
    return build(EventStore(path).iter_events(run_id), run_id)


# --- building --------------------------------------------------------------------------------


def test_each_attempt_is_a_bar_coloured_by_its_outcome(mixed_timeline):
    rows = rows_by_label(mixed_timeline)
    assert list(rows) == [
        "split",
        "split[1]",
        "split[2]",
        "split[3]",
        "split[4]",
        "load",
        "load[1]",
        "load[2]",
    ]
    assert kinds(rows["split"]) == [("over", 1)]
    assert kinds(rows["split[1]"]) == [("exit", 1), ("over", 2)]
    assert kinds(rows["split[2]"]) == [("timeout", 1), ("over", 2)]
    assert kinds(rows["split[3]"]) == [("timeout", 1), ("over", 2)]
    assert kinds(rows["split[4]"]) == [("over", 1)]
    assert kinds(rows["load[2]"]) == [("exit", 1), ("exit", 2)]
    assert rows["load[2]"].failed is not None and not rows["load[2]"].tolerated
    assert rows["load[2]"].error == "ValueError: batch 2 is malformed"
    assert all(r.failed is None for label, r in rows.items() if label != "load[2]")


def test_a_thread_that_ignores_its_cancel_is_drawn_as_abandoned_until_the_log_ends(
    mixed_timeline,
):
    rows = rows_by_label(mixed_timeline)
    row = rows["split[3]"]
    (thread,) = [b for b in row.bars if b.thread_only]
    timed_out = row.bars[0]
    assert (thread.kind, thread.start, thread.end) == (
        "abandoned",
        timed_out.end,
        mixed_timeline.end,
    )
    assert "had not returned when the log ends" in thread.text
    # the cooperative one returned within the grace: not abandoned, no thread bar
    assert [b for b in rows["split[2]"].bars if b.thread_only] == []


def test_a_retry_is_preceded_by_its_wait(mixed_timeline):
    bars = rows_by_label(mixed_timeline)["split[1]"].bars
    assert len(bars) in (2, 3)  # the wait has no width when the retry starts in the same turn
    if len(bars) == 3:
        assert bars[1].kind == "retry" and bars[1].start == bars[0].end == bars[1].end


def test_the_task_that_never_started_is_listed_and_the_run_end_is_marked(mixed_timeline):
    tl = mixed_timeline
    assert [s.name for s in tl.stages] == ["split", "load", "finish"]
    assert tl.stages[2].started is None
    assert [m.kind for m in tl.markers] == ["failed_over"]
    assert "load[2]: ValueError: batch 2 is malformed" in tl.markers[0].text
    assert tl.status == "failed_over"
    assert "ValueError: batch 2 is malformed" in tl.failure_traceback
    assert 'raise ValueError("batch 2 is malformed")' in tl.failure_traceback


def test_children_beyond_max_rows_are_summed_up_failures_first(store_path):
    result = Many.run(store=store_path)
    tl = build(EventStore(store_path).iter_events(result.run_id), result.run_id, max_rows=5)
    children = [r.label for r in tl.rows if not r.is_parent]
    assert children == ["split[0]", "split[1]", "split[2]", "split[150]", "split[170]"]
    (stage,) = tl.stages
    assert stage.hidden_children == 195
    assert len(stage.hidden_starts) == 195
    assert stage.hidden_kinds == {"over": 195}
    page = render(tl)
    assert "+195 more children" in page
    assert re.search(r"195 attempts of 195 children .*; at most \d+ running at once", page)


def test_a_running_run_draws_its_open_attempt_as_running(store_path):
    with Held.start_link(store=store_path) as server:
        handle = server.start_flow()
        assert HELD.wait(10)
        store = EventStore(store_path)
        tl = build(store.iter_events(handle.run_id), handle.run_id, status="running")
        HOLD.set()
        assert handle.result(timeout=10).outcome == "all_over"
    assert tl.status == "running"
    rows = rows_by_label(tl)
    assert kinds(rows["split[1]"]) == [("running", 1)]
    assert "split[2]" not in rows  # a child that has not started has no row yet
    assert tl.stages[0].added == 2
    assert tl.markers == []


def test_a_replayed_run_is_drawn_with_both_segments(store_path):
    first = Fragile.run(store=store_path)
    assert first.outcome == "failed_over"
    FIXED.set()
    assert Fragile.replay(first.run_id, store=store_path).outcome == "all_over"
    tl = build(EventStore(store_path).iter_events(first.run_id), first.run_id)
    assert len(tl.spans) == 2
    assert [m.kind for m in tl.markers] == ["failed_over", "replayed", "all_over"]
    second = rows_by_label(tl)["second"]
    assert kinds(second) == [("exit", 1), ("over", 1)]
    assert second.failed is not None and second.recovered
    assert tl.status == "all_over"
    assert tl.history.segments == 2


# --- the page --------------------------------------------------------------------------------


def test_the_page_is_self_contained_and_every_bar_has_hover_text(mixed):
    path, run_id = mixed
    page = timeline(EventStore(path), run_id)
    parsed = Page()
    parsed.feed(page)
    assert parsed.fetches == []
    assert {"script", "link", "img", "iframe", "object"}.isdisjoint(parsed.tags)
    assert "@import" not in page
    assert len(parsed.bar_titles) == page.count('<rect class="bar"') > 10
    assert any(
        t.startswith("load[2] attempt 2: exit") and "batch 2 is malformed" in t
        for t in parsed.bar_titles
    )
    assert any(t.startswith("split[2] attempt 1: timeout") for t in parsed.bar_titles)


def test_timeline_draws_at_most_max_rows_children_one_by_one(mixed):
    path, run_id = mixed
    page = timeline(EventStore(path), run_id, max_rows=3)
    # three rows at most, all taken by split's retried children
    assert "+1 more child<" in page  # split[4]
    assert "+2 more children<" in page  # load[1] and load[2]
    assert page == render(
        build(EventStore(path).iter_events(run_id), run_id, status="failed_over", max_rows=3)
    )


def test_the_page_escapes_what_came_from_the_log(mixed):
    path, run_id = mixed
    page = timeline(EventStore(path), run_id)
    assert "HTTP 503 &lt;busy&gt; &amp; &quot;try again&quot;" in page
    assert "<busy>" not in page


def test_the_header_sums_up_the_run(mixed):
    path, run_id = mixed
    page = timeline(EventStore(path), run_id)
    text = " ".join(re.sub(r"<[^>]+>", " ", page.split("<svg", 1)[0]).split())
    assert f"Mixed run {run_id} failed_over" in text
    assert "failed task load[2] : ValueError: batch 2 is malformed" in text
    assert "exits 3 timeouts 2 retries 4 abandoned 1" in text
    assert re.search(r"split \+0\.000 s [0-9.]+ s 1 4 4 0 1 2 3 all over", text), text
    assert re.search(r"load \+[0-9.]+ s [0-9.]+ s 1 2 1 1 2 0 1 failed", text), text
    assert "finish - - 0 - - - - - - not started" in text


# --- the command -----------------------------------------------------------------------------


def invoke(*args):
    try:
        runner = CliRunner(mix_stderr=False)
    except TypeError:  # click >= 8.2 keeps stderr apart by itself
        runner = CliRunner()
    return runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_timeline_command_writes_the_page(mixed, tmp_path):
    path, run_id = mixed
    out = tmp_path / "run.html"
    result = invoke("timeline", run_id[:6], "--db", path, "-o", out)
    assert result.exit_code == 0, result.stderr
    assert out.read_text(encoding="utf-8") == timeline(EventStore(path), run_id)
    assert result.stderr == (
        f"wrote {out}: run {run_id} (failed_over), 3 tasks, 6 children drawn\n"
    )


def test_timeline_command_defaults_to_the_run_id_here_and_dash_is_stdout(
    mixed, tmp_path, monkeypatch
):
    path, run_id = mixed
    monkeypatch.chdir(tmp_path)
    assert invoke("timeline", run_id, "--db", path).exit_code == 0
    assert (tmp_path / f"{run_id}.html").exists()
    result = invoke("timeline", run_id, "--db", path, "-o", "-", "--max-rows", "3")
    assert result.exit_code == 0
    assert result.stdout.startswith("<!doctype html>")
    # three rows at most, all taken by split's retried children
    assert "+1 more child<" in result.stdout  # split[4]
    assert "+2 more children<" in result.stdout  # load[1] and load[2]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{run_id}.html"]


def test_timeline_command_unknown_run_exits_3(mixed):
    path, _ = mixed
    result = invoke("timeline", "zzzz", "--db", path)
    assert result.exit_code == 3
    assert result.stderr.startswith(f"Error: no run in {path!r} matches 'zzzz'")


def test_timeline_command_reports_an_unwritable_output(mixed, tmp_path):
    path, run_id = mixed
    result = invoke("timeline", run_id, "--db", path, "-o", tmp_path / "no" / "x.html")
    assert result.exit_code == 3
    assert "cannot write" in result.stderr
    assert result.stderr.rstrip().endswith("pass -o with a writable path")


def test_a_run_under_a_frozen_clock_is_drawn_without_error(store_path):
    with freezegun.freeze_time("2030-01-01"):
        result = Many.run(store=store_path)
    tl = build(EventStore(store_path).iter_events(result.run_id), result.run_id, max_rows=3)
    assert tl.end == 0.0  # every event carries the same frozen time
    page = render(tl)
    assert "2030-01-01 00:00:00" in page
    assert page.count('<rect class="bar"') >= 4


def test_a_crashed_then_replayed_run_shows_the_crash(tmp_path, monkeypatch):
    root = Path(__file__).resolve().parent.parent
    monkeypatch.syspath_prepend(str(root))
    db = str(tmp_path / "runs.db")
    crashed = subprocess.run(
        [sys.executable, "-c", f"import tests.cli_flows as f; f.Stages.run(store={db!r})"],
        cwd=root,
        env={**os.environ, "CLI_FLOWS_CRASH": "2", "PYTHONPATH": str(root)},
        capture_output=True,
        timeout=60,
    )
    assert crashed.returncode == 17, crashed.stderr  # os._exit in child 2: no final event
    flows = importlib.import_module("tests.cli_flows")
    (info,) = EventStore(db).runs()
    assert flows.Stages.replay(info.run_id, store=db).outcome == "all_over"
    tl = build(EventStore(db).iter_events(info.run_id), info.run_id)
    assert [m.kind for m in tl.markers] == ["interrupted", "replayed", "all_over"]
    assert "without a final event" in tl.markers[0].text
    row = rows_by_label(tl)["split[2]"]
    assert [b.kind for b in row.bars] == ["running", "over"]
    assert "its process ended" in row.bars[0].text
