"""The command line: runs, show, replay, graph, and its errors (API.md section 6).

Every store here is a real SQLite file in ``tmp_path`` written by real runs of the flows in
``tests/cli_flows.py``; the commands run in-process through click's ``CliRunner``, and once
through ``python -m threadflow``.
"""

import hashlib
import importlib
import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import threadflow
from threadflow.cli import EXIT_CODES, cli

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "cli.md"
FLOWS = "tests.cli_flows"
BROKEN = "child 2 is broken"


# --- fixtures and helpers ---


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Run in tmp_path (nothing lands in the checkout), with no store variables set, and undo
    the CLI's sys.path change (it adds the working directory, as ``python -m`` does)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(ROOT), *sys.path])
    for name in ("THREADFLOW_DB", "CLI_FLOWS_FAIL", "CLI_FLOWS_CRASH", "CLI_FLOWS_STOP"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def flows():
    """The test flows, imported under the same name the CLI imports them by."""
    return importlib.import_module(FLOWS)


def _runner():
    # click < 8.2 mixes stderr into output unless told not to; later versions keep both.
    try:
        return CliRunner(mix_stderr=False)
    except TypeError:
        return CliRunner()


def invoke(*args, env=None):
    return _runner().invoke(cli, [str(a) for a in args], env=env, catch_exceptions=False)


def run_flow(flow, db, monkeypatch, **env):
    """Run ``flow`` to its end in ``db`` with the given CLI_FLOWS_* variables set."""
    with monkeypatch.context() as m:
        for name, value in env.items():
            m.setenv(f"CLI_FLOWS_{name.upper()}", value)
        return flow.run(store=db)


@pytest.fixture
def db(tmp_path, flows, monkeypatch):
    """A store with three runs: Stages (all_over), Fatal (failed_over), Tolerated (all_over)."""
    path = str(tmp_path / "runs.db")
    ids = {
        "stages": run_flow(flows.Stages, path, monkeypatch).run_id,
        "fatal": run_flow(flows.Fatal, path, monkeypatch, fail="2").run_id,
        "tolerated": run_flow(flows.Tolerated, path, monkeypatch, fail="2").run_id,
    }
    return path, ids


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def one_error_line(result, code):
    """The command failed with ``code`` and said why on exactly one stderr line."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    return lines[0]


def table(text):
    """Rows of a plain table printed by the CLI, split on runs of two or more spaces."""
    return [re.split(r"\s{2,}", line.strip()) for line in text.strip().splitlines()]


# --- runs ---


def test_runs_lists_every_run_oldest_first_with_status_and_children(db):
    path, ids = db
    result = invoke("runs", "--db", path)
    assert result.exit_code == 0, result.stderr
    header, *rows = table(result.stdout)
    assert header == ["RUN", "FLOW", "STATUS", "STARTED (UTC)", "DURATION", "DONE", "FAILED"]
    assert [(r[0], r[1], r[2], r[5], r[6]) for r in rows] == [
        (ids["stages"], "Stages", "all_over", "3", "0"),
        (ids["fatal"], "Fatal", "failed_over", "1", "1"),
        (ids["tolerated"], "Tolerated", "all_over", "2", "1"),
    ]
    for row in rows:
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", row[3])
        assert re.fullmatch(r"[\d.]+ s|\d+m\d\ds|\d+h\d\dm", row[4])


def test_runs_json_gives_every_field_for_scripts(db):
    path, ids = db
    result = invoke("runs", "--db", path, "--json")
    assert result.exit_code == 0, result.stderr
    records = json.loads(result.stdout)
    assert [r["run_id"] for r in records] == [ids["stages"], ids["fatal"], ids["tolerated"]]
    fatal = records[1]
    assert set(fatal) == {
        "run_id",
        "flow",
        "server",
        "entrance",
        "status",
        "outcome",
        "started",
        "ended",
        "duration",
        "active",
        "wall",
        "segments",
        "children_added",
        "children_done",
        "children_failed",
        "children_tolerated",
        "children_recovered",
    }
    assert fatal["flow"] == "Fatal"
    assert fatal["status"] == fatal["outcome"] == "failed_over"
    assert fatal["entrance"] == "split"
    assert (fatal["children_done"], fatal["children_failed"]) == (1, 1)
    assert fatal["duration"] >= 0
    assert [(r["children_done"], r["children_failed"]) for r in records] == [(3, 0), (1, 1), (2, 1)]
    infos = threadflow.EventStore(path).runs()
    assert [(r["started"], r["ended"]) for r in records] == [(i.started, i.ended) for i in infos]


def test_runs_flow_filters_and_limit_keeps_the_newest(db, flows, monkeypatch):
    path, ids = db
    again = run_flow(flows.Stages, path, monkeypatch).run_id
    records = json.loads(invoke("runs", "--db", path, "--json", "--flow", "Stages").stdout)
    assert [r["run_id"] for r in records] == [ids["stages"], again]
    records = json.loads(invoke("runs", "--db", path, "--json", "--limit", "2").stdout)
    assert [r["run_id"] for r in records] == [ids["tolerated"], again]
    records = json.loads(
        invoke("runs", "--db", path, "--json", "--flow", "Stages", "--limit", "1").stdout
    )
    assert [r["run_id"] for r in records] == [again]
    result = invoke("runs", "--db", path, "--flow", "Nope")
    assert result.exit_code == 0
    assert result.stdout == ""
    assert "no runs of flow 'Nope'" in result.stderr
    assert json.loads(invoke("runs", "--db", path, "--flow", "Nope", "--json").stdout) == []


def test_runs_limit_must_be_positive(db):
    path, _ = db
    result = invoke("runs", "--db", path, "--limit", "0")
    assert result.exit_code == 2
    assert "--limit" in result.stderr


def test_runs_shows_a_run_in_progress_as_running(tmp_path, flows):
    path = str(tmp_path / "live.db")
    flows.GATE.clear()
    flows.ENTERED.clear()
    with flows.Gated.start_link(store=path) as server:
        handle = server.start_flow()
        try:
            assert flows.ENTERED.wait(10)
            (record,) = json.loads(invoke("runs", "--db", path, "--json").stdout)
            assert (record["run_id"], record["status"]) == (handle.run_id, "running")
            assert record["outcome"] is None and record["ended"] is None
            assert record["duration"] is None
            _, row = table(invoke("runs", "--db", path).stdout)
            assert row[2:3] == ["running"] and row[4] == "-"
        finally:
            flows.GATE.set()
        assert handle.result(timeout=10).outcome == "all_over"


def test_runs_of_a_process_that_died_are_interrupted(tmp_path):
    path = str(tmp_path / "crash.db")
    crashed = run_in_subprocess(tmp_path, "Fatal", path, CLI_FLOWS_CRASH="2")
    assert crashed.returncode == 17, crashed.stderr
    (record,) = json.loads(invoke("runs", "--db", path, "--json").stdout)
    assert record["status"] == "interrupted"
    assert record["outcome"] is None


def test_db_defaults_to_the_environment_variable_then_the_group_option(db, tmp_path):
    path, ids = db
    result = invoke("runs", "--json", env={"THREADFLOW_DB": path})
    assert [r["run_id"] for r in json.loads(result.stdout)] == list(ids.values())
    result = invoke("--db", path, "show", ids["fatal"], "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)[0]["run_id"] == ids["fatal"]
    # The command's own --db wins over the group's and the variable.
    missing = str(tmp_path / "missing.db")
    result = invoke("--db", path, "runs", "--db", missing, env={"THREADFLOW_DB": path})
    assert "missing.db" in one_error_line(result, 3)


def test_db_defaults_to_threadflow_db_in_the_working_directory(tmp_path):
    line = one_error_line(invoke("runs"), 3)
    assert line == (
        "Error: no store at 'threadflow.db'; pass --db with the path of a threadflow store, "
        "or set $THREADFLOW_DB"
    )
    assert not (tmp_path / "threadflow.db").exists()


# --- show ---


def test_show_prints_every_event_in_order_with_a_data_digest(db):
    path, ids = db
    result = invoke("show", ids["fatal"], "--db", path)
    assert result.exit_code == 0, result.stderr
    header, *rows = table(result.stdout)
    assert header == ["SEQ", "TS (UTC)", "KIND", "TASK", "CHILD", "ATTEMPT", "DATA"]
    events = threadflow.EventStore(path).events(ids["fatal"])
    assert [int(r[0]) for r in rows] == [e.seq for e in events]
    assert [r[2] for r in rows] == [e.kind for e in events]
    by_kind = {}
    for row in rows:
        by_kind.setdefault(row[2], []).append(row)
    assert by_kind["flow_started"][0][3:] == ["-", "-", "-", "flow=Fatal entrance=split"]
    assert by_kind["child_added"][1][3:] == ["split", "2", "1", 'payload={"n":2}']
    assert ["split", "1", "1", "result=2"] in [r[3:] for r in by_kind["task_over"]]
    assert by_kind["exit"][0][3:] == ["split", "2", "1", f"ValueError: {BROKEN}"]
    assert by_kind["retry"][0][3:] == ["split", "2", "1", "next attempt 2 in 0 s"]
    assert by_kind["task_failed"][0][3:] == ["split", "2", "2", f"ValueError: {BROKEN}"]
    assert by_kind["failed_over"][0][3:] == ["-", "-", "-", f"split[2]: ValueError: {BROKEN}"]


def test_show_kind_filters_and_repeats(db):
    path, ids = db
    result = invoke("show", ids["fatal"], "--db", path, "--kind", "task_failed", "--kind", "exit")
    assert result.exit_code == 0, result.stderr
    _, *rows = table(result.stdout)
    assert [(r[2], r[4], r[5]) for r in rows] == [
        ("exit", "2", "1"),
        ("exit", "2", "2"),
        ("task_failed", "2", "2"),
    ]
    assert [int(r[0]) for r in rows] == sorted(int(r[0]) for r in rows)
    result = invoke("show", ids["stages"], "--db", path, "--kind", "exit")
    assert (result.exit_code, result.stdout) == (0, "")
    assert f"run {ids['stages']} has no events of kind exit" in result.stderr


def test_show_warns_about_a_kind_threadflow_never_writes(db):
    path, ids = db
    result = invoke("show", ids["fatal"], "--db", path, "--kind", "exits")
    assert result.exit_code == 0
    assert "warning: 'exits' is not an event kind threadflow writes" in result.stderr


def test_show_json_is_the_whole_log(db):
    path, ids = db
    result = invoke("show", ids["tolerated"], "--db", path, "--json")
    assert result.exit_code == 0, result.stderr
    records = json.loads(result.stdout)
    events = threadflow.EventStore(path).events(ids["tolerated"])
    assert records == [
        {
            "seq": e.seq,
            "run_id": e.run_id,
            "ts": e.ts,
            "kind": e.kind,
            "task": e.task,
            "child_id": e.child_id,
            "attempt": e.attempt,
            "ref": e.ref,
            "data": e.data,
        }
        for e in events
    ]
    failed = [r for r in records if r["kind"] == "task_failed"]
    assert failed[0]["data"]["tolerated"] is True
    result = invoke("show", ids["tolerated"], "--db", path, "--json", "--kind", "task_failed")
    assert json.loads(result.stdout) == failed
    result = invoke("show", ids["stages"], "--db", path, "--json", "--kind", "exit")
    assert json.loads(result.stdout) == []


def test_show_summary_counts_per_task_and_names_the_failure(db):
    path, ids = db
    result = invoke("show", ids["fatal"], "--db", path, "--summary")
    assert result.exit_code == 0, result.stderr
    head, _, body = result.stdout.partition("\n\n")
    fields = dict(re.split(r":\s+", line, maxsplit=1) for line in head.splitlines())
    assert fields["run"] == ids["fatal"]
    assert fields["flow"] == "Fatal"
    assert fields["status"] == "failed_over"
    assert fields["segments"] == "1"
    assert fields["failed task"] == "split[2]"
    assert fields["error"] == f"ValueError: {BROKEN}"
    assert table(body) == [
        [
            "TASK",
            "ATTEMPTS",
            "ADDED",
            "DONE",
            "FAILED",
            "EXITS",
            "TIMEOUTS",
            "RETRIES",
            "ALL_OVER",
        ],
        ["split", "1", "3", "1", "1", "2", "0", "1", "no"],
    ]


def test_show_summary_of_a_tolerated_failure(db):
    path, ids = db
    result = invoke("show", ids["tolerated"], "--db", path, "--summary")
    head, _, body = result.stdout.partition("\n\n")
    fields = dict(re.split(r":\s+", line, maxsplit=1) for line in head.splitlines())
    assert fields["status"] == "all_over"
    assert fields["tolerated"] == "1: split[2]"
    assert "failed task" not in fields
    rows = table(body)[1:]
    assert rows == [
        ["split", "1", "3", "2", "1", "1", "0", "0", "yes"],
        ["total", "1", "0", "0", "0", "0", "0", "0", "yes"],
    ]


def test_show_summary_json(db):
    path, ids = db
    result = invoke("show", ids["fatal"][:6], "--db", path, "--summary", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["run_id"] == ids["fatal"]
    assert (summary["flow"], summary["status"], summary["outcome"]) == (
        "Fatal",
        "failed_over",
        "failed_over",
    )
    assert summary["segments"] == 1
    assert summary["task"] == ["split", 2]
    assert summary["error"] == {"type": "ValueError", "message": BROKEN}
    assert summary["failed"] == []
    (split,) = summary["tasks"]
    assert {k: split[k] for k in ("task", "attempts", "children_added", "all_over")} == {
        "task": "split",
        "attempts": 1,
        "children_added": 3,
        "all_over": False,
    }
    assert (split["children_done"], split["children_failed"]) == (1, 1)
    assert (split["exits"], split["timeouts"], split["retries"]) == (2, 0, 1)
    tolerated = json.loads(
        invoke("show", ids["tolerated"], "--db", path, "--summary", "--json").stdout
    )
    assert tolerated["failed"] == [["split", 2]]
    assert tolerated["task"] is None and tolerated["error"] is None


def test_show_accepts_a_unique_prefix(db):
    path, ids = db
    full = invoke("show", ids["fatal"], "--db", path, "--json").stdout
    prefix = ids["fatal"]
    while len(prefix) > 1 and not any(
        other.startswith(prefix[:-1]) for other in ids.values() if other != ids["fatal"]
    ):
        prefix = prefix[:-1]
    result = invoke("show", prefix, "--db", path, "--json")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == full


def test_show_ambiguous_prefix_exits_3_and_lists_the_matches(tmp_path, flows, monkeypatch):
    path = str(tmp_path / "many.db")
    by_first: dict[str, list[str]] = {}
    while not any(len(v) > 1 for v in by_first.values()):  # at most 17 runs: 16 hex digits
        run_id = run_flow(flows.Stages, path, monkeypatch).run_id
        by_first.setdefault(run_id[0], []).append(run_id)
    prefix, matches = next((k, v) for k, v in by_first.items() if len(v) > 1)
    line = one_error_line(invoke("show", prefix, "--db", path), 3)
    assert line.startswith(f"Error: 2 runs in {path!r} match {prefix!r} (")
    for run_id in matches:
        assert run_id in line
    assert line.endswith("; give more characters of the run id")


def test_show_unknown_run_exits_3_with_a_hint(db):
    path, _ = db
    line = one_error_line(invoke("show", "nosuchrun", "--db", path), 3)
    assert line == (
        f"Error: no run in {path!r} matches 'nosuchrun'; list the runs with: "
        f"threadflow runs --db {path}"
    )
    assert one_error_line(invoke("show", "nosuchrun", "--db", path, "--summary"), 3) == line


# --- unusable stores ---

STORE_COMMANDS = [
    ["runs"],
    ["runs", "--json"],
    ["show", "abc"],
    ["show", "abc", "--summary"],
    ["replay", "abc", "--flow", f"{FLOWS}:Fatal"],
]


@pytest.mark.parametrize("command", STORE_COMMANDS, ids=" ".join)
def test_missing_store_exits_3_and_is_not_created(tmp_path, command):
    path = tmp_path / "absent.db"
    line = one_error_line(invoke(*command, "--db", path), 3)
    assert line.startswith(f"Error: no store at {str(path)!r}; pass --db")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", STORE_COMMANDS, ids=" ".join)
def test_a_file_that_is_not_sqlite_exits_3_and_is_left_untouched(tmp_path, command):
    path = tmp_path / "notes.db"
    path.write_bytes(b"these are my notes, not a database\n" * 200)
    before = digest(path)
    line = one_error_line(invoke(*command, "--db", path), 3)
    assert line.startswith(f"Error: {str(path)!r} is not a readable SQLite database (")
    assert digest(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.db"]


@pytest.mark.parametrize("command", STORE_COMMANDS, ids=" ".join)
def test_another_sqlite_database_exits_3_and_is_left_untouched(tmp_path, command):
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE events (x)")
    conn.commit()
    conn.close()
    before = digest(path)
    line = one_error_line(invoke(*command, "--db", path), 3)
    assert line == (
        f"Error: {str(path)!r} is not a threadflow store (no threadflow tables); "
        "pass --db with the path of a threadflow store, or set $THREADFLOW_DB"
    )
    assert digest(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.db"]


def test_an_empty_file_is_not_a_store_and_stays_empty(tmp_path):
    path = tmp_path / "empty.db"
    path.touch()
    line = one_error_line(invoke("runs", "--db", path), 3)
    assert "is not a threadflow store" in line
    assert path.read_bytes() == b""


def test_a_directory_is_not_a_store(tmp_path):
    line = one_error_line(invoke("runs", "--db", tmp_path), 3)
    assert "is a directory, not a store file" in line


def test_a_store_from_a_newer_threadflow_exits_3(db):
    path, _ = db
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    line = one_error_line(invoke("runs", "--db", path), 3)
    assert "has schema version 99, written by a newer threadflow" in line
    assert line.endswith("; upgrade threadflow")


# --- graph ---

DIAMOND_MERMAID = """\
flowchart TD
    entrance((entrance))
    start["start"]
    left[["left (children)"]]
    right["right"]
    join["join"]
    all_over([all_over])
    entrance --> start
    start --> left
    start --> right
    left --> join
    right --> join
    join --> all_over
"""

DIAMOND_DOT = """\
digraph "Diamond" {
    rankdir=TB;
    node [shape=box];
    "entrance" [shape=circle, label="entrance"];
    "start";
    "left" [peripheries=2, label="left (children)"];
    "right";
    "join";
    "all_over" [shape=doublecircle, label="all_over"];
    "entrance" -> "start";
    "start" -> "left";
    "start" -> "right";
    "left" -> "join";
    "right" -> "join";
    "join" -> "all_over";
}
"""


def edges(text, arrow):
    return sorted(
        tuple(part.strip().strip('";') for part in line.split(arrow))
        for line in text.splitlines()
        if arrow in line
    )


def test_graph_draws_fan_out_and_fan_in_as_mermaid(flows):
    result = invoke("graph", f"{FLOWS}:Diamond")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == DIAMOND_MERMAID
    assert edges(result.stdout, "-->") == [
        ("entrance", "start"),
        ("join", "all_over"),
        ("left", "join"),
        ("right", "join"),
        ("start", "left"),
        ("start", "right"),
    ]


def test_graph_dot(flows):
    result = invoke("graph", f"{FLOWS}:Diamond", "--dot")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == DIAMOND_DOT
    assert edges(result.stdout, "->") == edges(DIAMOND_MERMAID, "-->")


def test_graph_imports_a_module_from_the_working_directory(tmp_path):
    # Task names that are Mermaid keywords ("end") get another node id; labels keep the name.
    (tmp_path / "cli_graph_pipeline.py").write_text(
        "from threadflow import ALL_OVER, Flow, task\n"
        "def step(state): pass\n"
        "def child(c, state): pass\n"
        "class Pipeline(Flow):\n"
        "    default_entrance = 'entrance'\n"
        "    entrance = task(task_func=step, child_task_func=child, next='end')\n"
        "    end = task(task_func=step, next=ALL_OVER)\n"
    )
    try:
        result = invoke("graph", "cli_graph_pipeline:Pipeline")
        assert result.exit_code == 0, result.stderr
        assert result.stdout.splitlines() == [
            "flowchart TD",
            "    entrance_((entrance))",
            '    entrance[["entrance (children)"]]',
            '    end_["end"]',
            "    all_over([all_over])",
            "    entrance_ --> entrance",
            "    entrance --> end_",
            "    end_ --> all_over",
        ]
    finally:
        sys.modules.pop("cli_graph_pipeline", None)


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("tests.cli_flows", "'tests.cli_flows' is not module:Class, e.g. myjobs:Nightly"),
        (
            "cli_no_such_module:Flow",
            "cannot import module 'cli_no_such_module' (ModuleNotFoundError: No module named "
            "'cli_no_such_module'); run from the directory that holds it, or add that directory "
            "to PYTHONPATH",
        ),
        (
            f"{FLOWS}:Diamon",
            f"module '{FLOWS}' has no 'Diamon'; did you mean 'Diamond'? its flows are "
            "['Diamond', 'Fatal', 'Gated', 'Stages', 'Stoppable', 'Tolerated']",
        ),
        (
            f"{FLOWS}:NotAFlow",
            f"'{FLOWS}:NotAFlow' is a class, not a threadflow Flow subclass; "
            "name a class that subclasses threadflow.Flow",
        ),
        (
            f"{FLOWS}:split",
            f"'{FLOWS}:split' is a function, not a threadflow Flow subclass; "
            "name a class that subclasses threadflow.Flow",
        ),
        ("threadflow:Flow", "'threadflow:Flow' has no tasks; name a flow that declares tasks"),
    ],
)
def test_graph_bad_module_class_is_a_usage_error(flows, target, message):
    result = invoke("graph", target)
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"Error: Invalid value for 'MODULE:CLASS': {message}"
    )


def test_graph_reports_a_flow_module_that_fails_to_import(tmp_path):
    (tmp_path / "cli_graph_broken.py").write_text(
        "from threadflow import ALL_OVER, Flow, task\n"
        "def step(state): pass\n"
        "class Broken(Flow):\n"
        "    fetch = task(task_func=step, next='stor')\n"
        "    store = task(task_func=step, next=ALL_OVER)\n"
    )
    result = invoke("graph", "cli_graph_broken:Broken")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "Error: Invalid value for 'MODULE:CLASS': cannot import module 'cli_graph_broken' "
        "(FlowDefinitionError: flow 'Broken': task 'fetch' names next='stor', which is not a "
        "task; did you mean 'store'?); fix the error in that module"
    )


# --- replay (needs Flow.replay) ---


def replay(run, path, *extra, flow="Fatal", env=None):
    return invoke("replay", run, "--db", path, "--flow", f"{FLOWS}:{flow}", *extra, env=env)


def test_replay_of_a_fixed_run_ends_all_over_under_the_same_id(db):
    path, ids = db
    result = replay(ids["fatal"][:8], path)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert result.stdout == f"run {ids['fatal']}: all_over\n"
    records = json.loads(invoke("runs", "--db", path, "--json").stdout)
    fatal = next(r for r in records if r["run_id"] == ids["fatal"])
    assert fatal["status"] == "all_over"
    assert len(records) == 3
    summary = json.loads(invoke("show", ids["fatal"], "--db", path, "--summary", "--json").stdout)
    assert (summary["outcome"], summary["segments"]) == ("all_over", 2)
    assert summary["task"] is None
    assert [t["task"] for t in summary["tasks"]] == ["split", "total"]
    assert all(t["all_over"] for t in summary["tasks"])
    store = threadflow.EventStore(path)
    assert list(store.results(ids["fatal"], "split")) == [(1, 2), (2, 4), (3, 6)]
    totals = [
        e.data["result"] for e in store.events(ids["fatal"], "task_over") if e.task == "total"
    ]
    assert totals == [12]
    _, row = table(invoke("show", ids["fatal"], "--db", path, "--kind", "replayed").stdout)
    assert row[2:] == ["replayed", "-", "-", "-", "segment 2 (after failed_over)"]


def test_replay_that_fails_again_exits_1_with_the_task_and_error(db):
    path, ids = db
    result = replay(ids["fatal"], path, env={"CLI_FLOWS_FAIL": "2"})
    assert result.exit_code == 1, (result.stdout, result.stderr)
    assert result.stdout.splitlines() == [
        f"run {ids['fatal']}: failed_over",
        "failed task: split[2]",
        f"error: ValueError: {BROKEN}",
    ]
    assert result.stderr == (
        f"fix the cause, then replay: threadflow replay {ids['fatal']} --db {path} "
        f"--flow {FLOWS}:Fatal --on-change continue\n"
        "(--on-change rerun instead runs the changed stages, and those after them, again from "
        "scratch; --diff lists the changes)\n"
        f"see where time went: threadflow timeline {ids['fatal']} --db {path} "
        f"-o {ids['fatal']}.html\n"
    )


def test_replay_json(db):
    path, ids = db
    result = replay(ids["fatal"], path, "--json", env={"CLI_FLOWS_FAIL": "2"})
    assert result.exit_code == 1
    assert json.loads(result.stdout) == {
        "run_id": ids["fatal"],
        "outcome": "failed_over",
        "task": ["split", 2],
        "error": {"type": "ValueError", "message": BROKEN},
        "failed": [],
    }
    result = replay(ids["fatal"], path, "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["outcome"] == "all_over"


def test_replay_interrupted_exits_4_and_can_be_replayed_again(tmp_path, flows, monkeypatch):
    path = str(tmp_path / "stop.db")
    run_id = run_flow(flows.Stoppable, path, monkeypatch, fail="1").run_id
    result = replay(run_id, path, flow="Stoppable", env={"CLI_FLOWS_STOP": "1"})
    assert result.exit_code == 4, (result.stdout, result.stderr)
    assert result.stdout == f"run {run_id}: interrupted\n"
    assert "replay it to go on: threadflow replay" in result.stderr
    (record,) = json.loads(invoke("runs", "--db", path, "--json").stdout)
    assert record["status"] == "interrupted"
    result = replay(run_id, path, flow="Stoppable")
    assert result.exit_code == 0, (result.stdout, result.stderr)
    summary = json.loads(invoke("show", run_id, "--db", path, "--summary", "--json").stdout)
    assert (summary["outcome"], summary["segments"]) == ("all_over", 3)


def test_replay_finishes_a_run_whose_process_died(tmp_path):
    path = str(tmp_path / "crash.db")
    crashed = run_in_subprocess(tmp_path, "Fatal", path, CLI_FLOWS_CRASH="2")
    assert crashed.returncode == 17, crashed.stderr
    (record,) = json.loads(invoke("runs", "--db", path, "--json").stdout)
    result = replay(record["run_id"][:5], path)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert result.stdout == f"run {record['run_id']}: all_over\n"
    store = threadflow.EventStore(path)
    assert list(store.results(record["run_id"], "split")) == [(1, 2), (2, 4), (3, 6)]


def test_replay_of_a_run_that_ended_all_over_is_refused(db):
    path, ids = db
    before = digest(path)
    line = one_error_line(replay(ids["stages"], path, flow="Stages"), 3)
    assert line.startswith("Error: replay refused: ")
    assert line == (
        f"Error: replay refused: run {ids['stages']} ended all_over; there is nothing to "
        "replay; start a new run to do the work again"
    )
    assert digest(path) == before


def test_replay_of_a_run_owned_by_a_live_server_is_refused(tmp_path, flows):
    path = str(tmp_path / "live.db")
    flows.GATE.clear()
    flows.ENTERED.clear()
    with flows.Gated.start_link(store=path) as server:
        handle = server.start_flow()
        try:
            assert flows.ENTERED.wait(10)
            line = one_error_line(replay(handle.run_id, path, flow="Gated"), 3)
            assert line.startswith("Error: replay refused: ")
        finally:
            flows.GATE.set()
        assert handle.result(timeout=10).outcome == "all_over"


def test_replay_with_a_changed_flow_is_refused(db, tmp_path):
    # Same class name, but split now ends the flow: the log no longer fits the definition.
    (tmp_path / "cli_replay_changed.py").write_text(
        "from threadflow import ALL_OVER, Flow, task\n"
        "from tests.cli_flows import double, split\n"
        "class Fatal(Flow):\n"
        "    split = task(task_func=split, child_task_func=double, next=ALL_OVER)\n"
    )
    path, ids = db
    before = digest(path)
    try:
        result = invoke("replay", ids["fatal"], "--db", path, "--flow", "cli_replay_changed:Fatal")
    finally:
        sys.modules.pop("cli_replay_changed", None)
    line = one_error_line(result, 3)
    assert line.startswith(
        f"Error: replay refused: run {ids['fatal']} cannot be replayed with flow 'Fatal': "
    )
    assert "'split'" in line
    assert digest(path) == before


def test_replay_with_another_flow_is_refused(db):
    path, ids = db
    line = one_error_line(replay(ids["fatal"], path, flow="Stages"), 3)
    assert line == (
        f"Error: replay refused: run {ids['fatal']} is a run of flow 'Fatal', not 'Stages'; "
        "pass --flow with the module:Class of 'Fatal'"
    )


def test_replay_unknown_run_exits_3(db):
    path, _ = db
    line = one_error_line(replay("nosuchrun", path), 3)
    assert line.startswith(f"Error: no run in {path!r} matches 'nosuchrun'")


def test_replay_without_flow_imports_the_flow_the_run_recorded(db):
    path, ids = db
    assert threadflow.EventStore(path).history(ids["fatal"]).flow_import == f"{FLOWS}:Fatal"
    result = invoke("replay", ids["fatal"][:6], "--db", path)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert result.stdout == f"run {ids['fatal']}: all_over\n"


def test_replay_without_flow_of_a_flow_that_was_not_importable_asks_for_flow(tmp_path):
    def fail(state):
        raise ValueError("broken")

    class Local(threadflow.Flow):  # defined in a function: no module:Class imports it
        only = threadflow.task(task_func=fail, task_retry_limit=1, next=threadflow.ALL_OVER)

    path = str(tmp_path / "runs.db")
    run_id = Local.run(store=path).run_id
    assert threadflow.EventStore(path).history(run_id).flow_import is None
    line = one_error_line(invoke("replay", run_id, "--db", path), 2)
    assert line == (
        f"Error: run {run_id} does not record where its flow {Local.__qualname__!r} can be "
        "imported from (its "
        "class was not importable by name when the run started, e.g. it was defined in "
        "__main__); pass --flow module:Class"
    )


def test_replay_without_flow_names_the_recorded_flow_it_cannot_import(tmp_path):
    module = tmp_path / "gone_flows.py"
    module.write_text(
        "import threadflow\n"
        "def fail(state):\n"
        "    raise ValueError('broken')\n"
        "class Gone(threadflow.Flow):\n"
        "    only = threadflow.task(\n"
        "        task_func=fail, task_retry_limit=1, next=threadflow.ALL_OVER\n"
        "    )\n",
        encoding="utf-8",
    )
    path = str(tmp_path / "runs.db")
    done = subprocess.run(
        [sys.executable, "-c", f"import gone_flows; gone_flows.Gone.run(store={path!r})"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    module.unlink()  # the module that made the run is gone
    (info,) = threadflow.EventStore(path).runs()
    assert info.history.flow_import == "gone_flows:Gone"
    line = one_error_line(invoke("replay", info.run_id, "--db", path), 2)
    assert line.startswith(
        f"Error: the flow recorded for run {info.run_id}, gone_flows:Gone, cannot be used here: "
        "cannot import module 'gone_flows' (ModuleNotFoundError: "
    )
    assert line.endswith("; or pass --flow module:Class")


def test_replay_with_flow_that_is_not_a_flow_is_a_usage_error(db):
    path, ids = db
    result = invoke("replay", ids["fatal"], "--db", path, "--flow", f"{FLOWS}:NotAFlow")
    assert result.exit_code == 2
    assert "not a threadflow Flow subclass" in result.stderr


# --- help, python -m, docs ---


def run_in_subprocess(tmp_path, flow, path, **env):
    """Run ``tests.cli_flows.<flow>`` in a fresh interpreter (it may crash on purpose)."""
    code = f"import {FLOWS} as f; print(f.{flow}.run(store={path!r}).outcome)"
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_python_m_threadflow_runs_the_cli(tmp_path, db):
    path, ids = db
    env = {k: v for k, v in os.environ.items() if k != "THREADFLOW_DB"}
    done = subprocess.run(
        [sys.executable, "-m", "threadflow", "--help"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Usage: threadflow [OPTIONS] COMMAND [ARGS]...")
    assert "Exit codes:" in done.stdout
    done = subprocess.run(
        [sys.executable, "-m", "threadflow", "runs", "--json"],
        cwd=tmp_path,
        env={**env, "THREADFLOW_DB": path},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert [r["run_id"] for r in json.loads(done.stdout)] == list(ids.values())
    done = subprocess.run(
        [sys.executable, "-m", "threadflow", "show", "nosuchrun", "--db", path],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 3
    assert done.stderr.startswith("Error: no run in")


def test_help_lists_every_exit_code():
    result = invoke("--help")
    assert result.exit_code == 0
    epilog = result.stdout.split("Exit codes:", 1)[1]
    for code, meaning in EXIT_CODES:
        assert f"{code}  {meaning}" in epilog
    assert "$THREADFLOW_DB" in epilog


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_every_command_has_help_with_an_example(name):
    result = invoke(name, "--help")
    assert result.exit_code == 0
    assert result.stdout.startswith(f"Usage: threadflow {name} ")
    assert re.search(r"Examples?:\n\s+threadflow " + name, result.stdout)
    command = cli.commands[name]
    for param in command.params:
        if isinstance(param, click.Option) and not param.hidden:
            assert param.help, f"{name} {param.opts} has no help"


def test_every_command_and_exit_code_is_documented():
    text = DOCS.read_text()
    for name in cli.commands:
        assert f"## `threadflow {name}`" in text, name
        assert f"$ threadflow {name} " in text, name
    for code, _ in EXIT_CODES:
        assert re.search(rf"^\| {code} \|", text, re.M), code
    for word in ("--json", "--db", "$THREADFLOW_DB"):
        assert word in text


def test_commands_are_the_documented_set():
    assert sorted(cli.commands) == [
        "cancel",
        "graph",
        "replay",
        "run",
        "runs",
        "show",
        "ticks",
        "timeline",
        "ui",
    ]
