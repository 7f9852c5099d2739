"""The live dashboard (``threadflow ui``): its routes, asked through Datasette's own client, about
real runs in a store in ``tmp_path``; and the command that serves it, as a real process.

Runs that must be caught in the middle wait on gates (``threading.Event``) that the test opens;
what the store shows meanwhile is awaited with ``wait_until`` (a hang guard, not a sleep).
"""

from __future__ import annotations

import asyncio
import datetime
import gc
import json
import os
import re
import shlex
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import urllib.request
import warnings
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner
from crash_child import Child
from freezegun import freeze_time
from helpers import wait_until
from ui_flows import (
    BROKEN,
    BROKEN_ERROR,
    CHILDREN,
    HOSTILE_CHILD,
    HOSTILE_ERROR,
    HOSTILE_TASK,
    Gated,
    Hostile,
)

from threadflow import EventStore
from threadflow.cli import cli
from threadflow.dashboard import Dashboard
from threadflow.result import Progress

# Datasette leaves connections to its own in-memory databases unclosed (it probes SQLite's
# version and JSON support with throwaway ones, on import too, and its threads keep theirs until
# they end), which Python 3.13 reports as they are collected. None of them is a connection to the
# store: the dashboard's are closed by ui.close(), and the tests of the store's bytes check it.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", ResourceWarning)
    ui = pytest.importorskip("threadflow.ui", reason="the ui extra (Datasette) is not installed")
    gc.collect()

pytestmark = pytest.mark.filterwarnings(
    "ignore:unclosed database in <sqlite3.Connection:ResourceWarning"
)

GUARD = 30.0  # seconds; a hang guard for result(), never a synchronisation
OVER = 'fill="#2f9e58"'  # an attempt that returned, in the chart
RUNNING = 'fill="#3b7dd8"'  # an attempt with no outcome yet


def get(ds, path):
    """GET ``path`` from the Datasette ``ds`` (its in-process ASGI client)."""
    return asyncio.run(ds.client.get(path))


@pytest.fixture
def serve(store_path):
    """Datasette with the plugin, on the test's store (made first by the test)."""
    made = []

    def make():
        ds = ui.datasette_for(store_path)
        made.append(ds)
        return ds

    yield make
    for ds in made:
        close(ds)


def close(ds):
    """Close the dashboard and Datasette, and collect what Datasette's threads left: their
    connections to its in-memory databases (see ``pytestmark``), now rather than in some later
    test."""
    ui.close(ds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


@pytest.fixture
def gated(store_path):
    """A run of ``Gated`` in progress: ``(server, handle, gates)``; every gate opens at the end."""
    gates = {i: threading.Event() for i in range(CHILDREN)}
    server = Gated.start_link(store=store_path, gates=gates)
    handle = server.start_flow()
    assert wait_until(lambda: handle.progress().running == 4)
    yield server, handle, gates
    for gate in gates.values():
        gate.set()
    server.stop()


def open_gates(handle, gates, *ids, done):
    for i in ids:
        gates[i].set()
    assert wait_until(lambda: handle.progress().done == done)


class Page(HTMLParser):
    """What a browser would run or fetch: script elements, event handler attributes."""

    def __init__(self):
        super().__init__()
        self.scripts = []
        self.handlers = []
        self.text = []

    def handle_starttag(self, tag, attrs):
        if tag == "script":
            self.scripts.append(dict(attrs))
        self.handlers += [name for name, _ in attrs if name.startswith("on")]

    def handle_data(self, data):
        self.text.append(data)


def parsed(html):
    page = Page()
    page.feed(html)
    return page


# --- the runs list ----------------------------------------------------------------------------


def test_runs_list_shows_a_running_run_with_its_progress(gated, serve):
    server, handle, gates = gated
    open_gates(handle, gates, 0, 1, done=2)
    ds = serve()

    listed = get(ds, "/-/threadflow/api/runs").json()
    page = get(ds, "/-/threadflow")

    [run] = listed["runs"]
    assert run["run_id"] == handle.run_id
    assert (run["status"], run["done"], run["failed"], run["running"], run["total"]) == (
        "running",
        2,
        0,
        4,
        CHILDREN,
    )
    assert page.status_code == 200
    assert handle.run_id in page.text and ">running<" in page.text
    assert "2/6 · 4 running" in page.text


def test_runs_list_counts_are_the_folds(gated, serve, store_path):
    server, handle, gates = gated
    open_gates(handle, gates, 0, 1, 2, 4, 5, done=5)
    ds = serve()

    [run] = get(ds, "/-/threadflow/api/runs").json()["runs"]

    [info] = EventStore(store_path).runs()
    folded = Progress.of(info.history, info.status)
    assert (run["done"], run["failed"], run["running"], run["total"]) == (
        folded.done,
        folded.failed,
        folded.running,
        folded.total,
    )
    assert (run["done"], run["running"]) == (info.children_done, 1)


def test_an_empty_store_lists_no_runs(store_path, serve):
    Gated.start_link(store=store_path, gates={}).stop()  # a store, without a run
    ds = serve()

    assert get(ds, "/-/threadflow/api/runs").json()["runs"] == []
    assert "No runs in this store yet" in get(ds, "/-/threadflow").text


def test_the_start_page_is_the_dashboard(gated, serve):
    response = get(serve(), "/")
    assert response.status_code == 302
    assert response.headers["location"] == "/-/threadflow"


def test_datasettes_own_pages_link_to_the_dashboard(gated, serve):
    page = get(serve(), "/runs")  # Datasette's page of the store's tables
    assert page.status_code == 200
    assert '<a href="/-/threadflow">threadflow runs</a>' in page.text


# --- a run's page -----------------------------------------------------------------------------


def test_run_page_timeline_and_progress_follow_the_run(gated, serve):
    server, handle, gates = gated
    ds = serve()
    url = f"/-/threadflow/api/run/{handle.run_id}"

    before = get(ds, url).json()
    open_gates(handle, gates, 0, 1, done=2)
    # A poll may get the chart of a moment ago (its rebuilds are spaced by what they cost, which
    # on a busy machine is a while): the next polls catch up.
    polls = []

    def caught_up():
        polls.append(get(ds, url).json())
        return polls[-1]["html"]["timeline"].count(OVER) == 3

    assert wait_until(caught_up)
    after = polls[-1]

    assert (before["status"], before["done"], before["running"]) == ("running", 0, 4)
    assert (after["status"], after["done"], after["running"]) == ("running", 2, 4)
    # Four children running, then two over and four running (the next two started).
    assert before["html"]["timeline"].count(OVER) == 1  # the parent's attempt
    assert before["html"]["timeline"].count(RUNNING) == 4
    assert after["html"]["timeline"].count(OVER) == 3
    assert after["html"]["timeline"].count(RUNNING) == 4
    assert "fetch[5]" in after["html"]["timeline"]
    assert [t["task"] for t in after["tasks"]] == ["fetch", "report"]
    assert after["tasks"][0]["state"] == "running" and after["tasks"][1]["state"] == "waiting"
    assert after["replay"] is None
    page = get(ds, f"/-/threadflow/run/{handle.run_id}").text
    assert "live: updates every second" in page
    assert 'data-poll="/-/threadflow/api/run/' + handle.run_id + '"' in page


def test_a_running_runs_chart_reaches_now_while_nothing_new_is_logged(gated, store_path):
    # Four children wait on their gates: nothing is logged for as long as they wait, and the
    # chart still shows them running until now, not until the last event.
    server, handle, gates = gated
    dashboard = Dashboard(store_path)
    try:
        first = dashboard.run(handle.run_id).timeline
        later = datetime.datetime.fromisoformat(first.begin) + datetime.timedelta(minutes=5)
        with freeze_time(later):
            chart = dashboard.run(handle.run_id).timeline
        assert first.end < 60 and 299 < chart.end <= 300
        running = [bar for row in chart.rows for bar in row.bars if bar.kind == "running"]
        assert len(running) == 4 and all(299 < bar.end <= 300 for bar in running)
        for gate in gates.values():
            gate.set()
        assert handle.result(GUARD).outcome == "failed_over"
        with freeze_time(later + datetime.timedelta(minutes=5)):
            ended = dashboard.run(handle.run_id).timeline
        assert ended.end < 60  # an ended run is drawn up to its last event, whenever it is read
    finally:
        dashboard.close()


def test_a_failed_attempt_shows_its_traceback_and_the_run_its_replay_command(
    gated, serve, store_path
):
    server, handle, gates = gated
    open_gates(handle, gates, *(i for i in range(CHILDREN) if i != BROKEN), done=CHILDREN - 1)
    gates[BROKEN].set()
    assert handle.result(timeout=GUARD).outcome == "failed_over"
    ds = serve()

    run = get(ds, f"/-/threadflow/api/run/{handle.run_id}").json()
    page = get(ds, f"/-/threadflow/run/{handle.run_id}").text

    command = f"threadflow replay {handle.run_id} --db {shlex.quote(os.path.abspath(store_path))}"
    assert run["status"] == "failed_over"
    assert run["replay"] == command
    assert f"<code id=replay-command>{command}</code>" in page
    assert run["failed_attempts"] == 2
    newest, first = run["failures"]
    assert (newest["task"], newest["child_id"], newest["attempt"]) == ("fetch", BROKEN, 2)
    assert first["attempt"] == 1
    assert newest["error"]["message"] == BROKEN_ERROR
    traceback = newest["error"]["traceback"]
    assert "in parse" in traceback and traceback.rstrip().endswith(f"ValueError: {BROKEN_ERROR}")
    # The traceback is on the page, as text: in a <pre>, escaped.
    shown = re.findall(r"<pre>(.*?)</pre>", page, flags=re.S)
    assert len(shown) == 2
    assert "in parse" in shown[0]
    assert "&lt;script&gt;alert(&#x27;error&#x27;)&lt;/script&gt;" in shown[0]
    assert "failed task fetch[3]</b>: ValueError: row 3 is malformed" in page


def test_a_run_id_prefix_leads_to_the_run_and_an_unknown_one_is_404(gated, serve):
    server, handle, gates = gated
    ds = serve()

    found = get(ds, f"/-/threadflow/run/{handle.run_id[:5]}")
    missing = get(ds, "/-/threadflow/run/nosuchrun")
    missing_api = get(ds, "/-/threadflow/api/run/nosuchrun")

    assert found.status_code == 302
    assert found.headers["location"] == f"/-/threadflow/run/{handle.run_id}"
    assert missing.status_code == 404
    assert "no run in" in missing.text and "matches &#x27;nosuchrun&#x27;" in missing.text
    assert missing_api.status_code == 404
    assert missing_api.json()["error"].endswith("'nosuchrun'; see the runs list")


# --- what came from the log is text -----------------------------------------------------------


def test_every_string_from_the_log_is_escaped_and_no_script_but_the_dashboards_runs(
    store_path, serve
):
    run_id = Hostile.run(store=store_path).run_id
    ds = serve()
    escaped = "&lt;script&gt;alert(&#x27;task&#x27;)&lt;/script&gt;"

    pages = [get(ds, "/-/threadflow").text, get(ds, f"/-/threadflow/run/{run_id}").text]
    updates = [
        get(ds, "/-/threadflow/api/runs").json()["html"],
        get(ds, f"/-/threadflow/api/run/{run_id}").json()["html"],
    ]
    fragments = [html for update in updates for html in update.values()]

    for html in pages + fragments:
        page = parsed(html)
        assert page.handlers == []
        assert page.scripts in ([], [{"src": "/-/threadflow/dashboard.js", "defer": None}])
        assert "<img" not in html and "<script>" not in html
    run_page = pages[1]
    assert escaped in run_page  # the task name
    assert "&lt;/pre&gt;&lt;script&gt;alert(&#x27;traceback&#x27;)" in run_page  # the error
    assert "&lt;img src=x onerror=" in run_page  # the child id
    # A person reads the strings as they are.
    text = "".join(parsed(run_page).text)
    assert HOSTILE_TASK in text and HOSTILE_ERROR in text and "onerror=" in text
    assert HOSTILE_CHILD.replace('"', '\\"') in text  # the child id, as JSON


def test_pages_forbid_inline_scripts_and_foreign_assets(gated, serve):
    ds = serve()
    for path in ("/-/threadflow", "/-/threadflow/api/runs", "/-/threadflow/dashboard.js"):
        policy = get(ds, path).headers["content-security-policy"]
        assert "script-src 'self'" in policy and "default-src 'none'" in policy
    script = get(ds, "/-/threadflow/dashboard.js")
    assert script.headers["content-type"].startswith("text/javascript")
    assert "innerHTML = html" in script.text  # only the server's fragments become markup


# --- read-only --------------------------------------------------------------------------------


def test_the_dashboard_leaves_the_store_byte_identical(tmp_path, store_path, serve):
    # The hardest case: a writer killed with events in the WAL that the file does not hold yet.
    # A connection that could write, closing last, would copy them into the file.
    Hostile.run(store=store_path)
    hold = sqlite3.connect(f"file:{store_path}?mode=ro", uri=True)
    hold.execute("BEGIN")
    hold.execute("SELECT count(*) FROM events").fetchone()  # no checkpoint passes this snapshot
    journal = str(tmp_path / "journal")
    with Child(tmp_path, "crash", store_path, "children", "600", journal) as child:
        child.expect("marker")
        child.kill()
    hold.close()
    wal = store_path + "-wal"

    def state():
        return (
            os.stat(store_path).st_mtime_ns,
            Path(store_path).read_bytes(),
            Path(wal).read_bytes() if os.path.exists(wal) else None,
        )

    before = state()
    assert before[2]
    ds = serve()
    runs = get(ds, "/-/threadflow/api/runs").json()["runs"]
    paths = ["/", "/-/threadflow", "/runs", "/runs/events", "/runs/runs.json"]
    for run in runs:
        paths += [run["url"], run["url"].replace("/run/", "/api/run/")]
    for path in paths:
        assert get(ds, path).status_code in (200, 302), path
    close(ds)

    assert sorted(r["status"] for r in runs) == ["failed_over", "interrupted"]
    assert state() == before


def test_a_flow_writes_on_while_the_dashboard_polls(gated, serve):
    server, handle, gates = gated
    ds = serve()
    url = f"/-/threadflow/api/run/{handle.run_id}"
    seen = []
    for i in (0, 1, 2, 4, 5):
        gates[i].set()
        seen.append(get(ds, url).json()["done"])
    gates[BROKEN].set()

    assert handle.result(timeout=GUARD).outcome == "failed_over"
    assert seen == sorted(seen)
    assert get(ds, url).json()["status"] == "failed_over"


# --- the command ------------------------------------------------------------------------------


def threadflow_ui(*args):
    """``threadflow ui ARGS`` as a process, and its first line on stderr (the address)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "threadflow", "ui", *args],
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc, proc.stderr.readline()


def test_ui_serves_the_dashboard_on_loopback_until_interrupted(store_path):
    run_id = Hostile.run(store=store_path).run_id
    proc, line = threadflow_ui("--db", store_path, "--port", "0")
    try:
        address = r"http://127\.0\.0\.1:\d+/-/threadflow"
        found = re.fullmatch(rf"dashboard of (.+) at ({address}) \(Ctrl-C stops it\)\n", line)
        assert found, line
        with urllib.request.urlopen(found.group(2) + "/api/runs", timeout=GUARD) as response:
            listed = json.loads(response.read())
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        proc.wait(GUARD)
        rest = proc.stderr.read()
        proc.stderr.close()
    assert found.group(1) == store_path
    assert [r["run_id"] for r in listed["runs"]] == [run_id]
    assert (proc.returncode, rest) == (0, "dashboard stopped\n")


def test_ui_refuses_a_file_that_is_not_a_store(tmp_path):
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE users (name TEXT)")
    conn.commit()
    conn.close()
    before = path.read_bytes()

    result = CliRunner().invoke(cli, ["ui", "--db", str(path)])

    assert result.exit_code == 3
    assert "is not a threadflow store" in result.output
    assert "pass --db with the path of a threadflow store" in result.output
    assert path.read_bytes() == before


def test_ui_on_a_taken_port_says_so(store_path):
    Hostile.run(store=store_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = CliRunner().invoke(cli, ["ui", "--db", store_path, "--port", str(port)])
    assert result.exit_code == 3
    assert f"cannot listen on 127.0.0.1:{port}" in result.output
    assert "pass --port with another port, or --port 0 for any free one" in result.output


def test_ui_without_the_extra_says_how_to_install_it(store_path):
    Hostile.run(store=store_path)
    # The fault: Datasette cannot be imported, as where the ui extra is not installed.
    code = (
        "import sys; sys.modules['datasette'] = None; from threadflow.cli import main; "
        f"main(['ui', '--db', {store_path!r}])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 3
    assert "threadflow ui needs Datasette" in done.stderr
    assert "install it with: pip install 'threadflow[ui]'" in done.stderr
