"""What the command line writes cannot act on the terminal or land outside where it should.

Error messages, child ids, payloads and task names come from user code; run ids and flow names
from whoever can write the store. The stores here are real files written by real runs of
``tests/hostile_flows.py`` (plus, where a forged row is the point, one row changed by hand);
the commands run through click's ``CliRunner`` with ``color=True``, as on a terminal (click
otherwise strips some escape sequences itself), and through ``python -m threadflow`` where the
interpreter's own path and streams matter.
"""

import hashlib
import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from threadflow.cli import cli

ROOT = Path(__file__).resolve().parent.parent
FLOWS = "tests.hostile_flows"

#: What must never reach a terminal raw: C0 controls but the line feed, DEL, C1 controls, and
#: lone surrogates (a UTF-8 stream cannot even write those).
UNSAFE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\ud800-\udfff]")
#: How HOSTILE (tests/hostile_flows.py) reads once made printable.
SHOWN = "\\x1b[2J\\x1b[31mpwned\\x07\\r\\x7f\\x9b31m"
SHOWN_ERROR = f"RuntimeError: {SHOWN} \\udcff"
SHOWN_TASK = 'load "rows" [1]\\n\\x1b[2Jend'
#: The child id as ``show`` and ``replay`` write it: JSON text (which escapes C0 itself), made
#: printable.
SHOWN_CHILD = '"\\u001b[2J\\u001b[31mpwned\\u0007\\r\\x7f\\x9b31m"'


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Run in tmp_path with no store variable, and undo the CLI's sys.path change."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(ROOT), *sys.path])
    monkeypatch.delenv("THREADFLOW_DB", raising=False)


@pytest.fixture
def hostile():
    from tests import hostile_flows

    return hostile_flows


def invoke(*args):
    try:
        runner = CliRunner(mix_stderr=False)
    except TypeError:  # click >= 8.2 keeps stderr apart by itself
        runner = CliRunner()
    # catch_exceptions=False: an UnicodeEncodeError while printing fails the test as it is.
    return runner.invoke(cli, [str(a) for a in args], catch_exceptions=False, color=True)


def assert_inert(text):
    found = UNSAFE.search(text)
    assert found is None, f"raw {found.group()!r} in {text!r}"


def forge_run_id(path, old, new):
    """Rename a run in the store, as anyone with write access to the file can."""
    with sqlite3.connect(path) as conn:
        for table in ("runs", "events", "children"):
            conn.execute(f"UPDATE {table} SET run_id = ? WHERE run_id = ?", (new, old))
    conn.close()


@pytest.fixture
def db(tmp_path, hostile):
    """A store with a failed_over run of Hostile."""
    path = str(tmp_path / "runs.db")
    result = hostile.Hostile.run(store=path)
    assert result.outcome == "failed_over"
    return path, result.run_id


# --- item: control characters in human-readable output ---


def test_show_prints_control_characters_from_the_log_as_escapes(db):
    path, run_id = db
    result = invoke("show", run_id, "--db", path)
    assert result.exit_code == 0, result.stderr
    assert_inert(result.stdout + result.stderr)
    header, *rows = result.stdout.splitlines()
    # One line per event: no line feed, carriage return or cursor move split or rewrote one.
    with sqlite3.connect(path) as conn:
        assert len(rows) == conn.execute("SELECT count(*) FROM events").fetchone()[0]
    conn.close()
    # Cells are measured as printed: every row's KIND starts under the header's.
    column = header.index("KIND")
    assert all(row[column - 2 : column] == "  " and row[column] != " " for row in rows)
    exits = [row for row in rows if " exit " in row]
    assert exits
    for row in exits:
        assert f"  {SHOWN_TASK}  {SHOWN_CHILD}  " in row
        assert "RuntimeError: \\x1b[2J\\x1b[31mpwned" in row
    (added,) = [row for row in rows if " child_added " in row]
    assert '{"note":"\\u001b[2J' in added and "\\x7f\\x9b31m" in added
    assert any(" callback_error " in row and "RuntimeError: \\x1b[2J" in row for row in rows)


def test_show_summary_prints_the_failed_task_and_error_as_escapes(db):
    path, run_id = db
    result = invoke("show", run_id, "--db", path, "--summary")
    assert result.exit_code == 0, result.stderr
    assert_inert(result.stdout + result.stderr)
    fields = dict(line.split(":", 1) for line in result.stdout.split("\n\n")[0].splitlines())
    assert fields["error"].strip() == SHOWN_ERROR
    assert fields["failed task"].strip().startswith(SHOWN_TASK + "[")
    assert fields["callback errors"].strip() == "1"
    header, row = result.stdout.split("\n\n")[1].splitlines()
    assert row.startswith(SHOWN_TASK + "  ")
    # The task column is as wide as the escaped name: the counts line up under their headers.
    assert header.index("ATTEMPTS") == len(SHOWN_TASK) + 2


def test_runs_prints_a_forged_run_id_and_flow_name_as_escapes(db):
    path, run_id = db
    forged = "\x1b]0;owned\x07\x1b[1A\r" + run_id
    forge_run_id(path, run_id, forged)
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE runs SET flow = ? WHERE run_id = ?", ("Flow\x1b[8m", forged))
    conn.close()
    result = invoke("runs", "--db", path)
    assert result.exit_code == 0, result.stderr
    assert_inert(result.stdout + result.stderr)
    row = result.stdout.splitlines()[1]
    assert row.startswith("\\x1b]0;owned\\x07\\x1b[1A\\r" + run_id + "  Flow\\x1b[8m  failed_over")
    result = invoke("show", "\x1b]0;owned", "--db", path, "--kind", "no\x1bkind")
    assert result.exit_code == 0, result.stderr
    assert_inert(result.stdout + result.stderr)
    assert "\\x1b]0;owned\\x07\\x1b[1A\\r" + run_id + " has no events of kind no\\x1bkind" in (
        result.stderr
    )


def test_errors_print_a_forged_run_id_as_escapes(db):
    path, run_id = db
    forge_run_id(path, run_id, "\x1b[2Jrun-a")
    with sqlite3.connect(path) as conn:
        conn.execute(
            "INSERT INTO runs (run_id, flow, server, started) "
            "SELECT '\x1b[2Jrun-b', flow, server, started FROM runs"
        )
    conn.close()
    result = invoke("show", "\x1b[2Jrun", "--db", path)
    assert result.exit_code == 3
    assert_inert(result.stdout + result.stderr)
    assert result.stderr.startswith("Error: 2 runs in")
    assert "\\x1b[2Jrun-a" in result.stderr and "\\x1b[2Jrun-b" in result.stderr


def test_json_output_keeps_the_text_exact_and_holds_no_raw_control_character(db, hostile):
    path, run_id = db
    result = invoke("show", run_id, "--db", path, "--json")
    assert result.exit_code == 0, result.stderr
    assert_inert(result.stdout)  # JSON escapes all of them, and decodes them back
    events = json.loads(result.stdout)
    failed = next(ev for ev in events if ev["kind"] == "task_failed")
    assert failed["child_id"] == hostile.HOSTILE
    assert failed["task"] == hostile.HOSTILE_TASK
    assert failed["data"]["error"]["message"] == hostile.HOSTILE_ERROR
    added = next(ev for ev in events if ev["kind"] == "child_added")
    assert added["data"]["payload"] == {"note": hostile.HOSTILE}
    result = invoke("show", run_id, "--db", path, "--summary", "--json")
    assert_inert(result.stdout)
    assert json.loads(result.stdout)["error"]["message"] == hostile.HOSTILE_ERROR


def test_replay_outcome_lines_print_the_error_as_escapes(db, hostile):
    path, run_id = db
    result = invoke("replay", run_id, "--db", path, "--flow", f"{FLOWS}:Hostile")
    assert result.exit_code == 1
    assert_inert(result.stdout + result.stderr)
    assert result.stdout.splitlines() == [
        f"run {run_id}: failed_over",
        f"failed task: {SHOWN_TASK}[{SHOWN_CHILD}]",
        f"error: {SHOWN_ERROR}",
    ]
    result = invoke("replay", run_id, "--db", path, "--flow", f"{FLOWS}:Hostile", "--json")
    assert_inert(result.stdout)
    assert json.loads(result.stdout)["error"]["message"] == hostile.HOSTILE_ERROR


def test_run_progress_and_outcome_print_the_task_name_and_error_as_escapes(tmp_path):
    path = tmp_path / "runs.db"
    result = invoke("run", f"{FLOWS}:Hostile", "--db", path, "--progress")
    assert result.exit_code == 1
    # The live area hides the cursor, and moves it up to erase its lines when it is redrawn:
    # those sequences are threadflow's own, and only they.
    own = re.compile(r"\x1b\[\?25[lh]|\r(?:\x1b\[(?:1A|2K))+")
    shown = own.sub("", result.stderr)
    assert_inert(result.stdout + shown)
    stage = next(line for line in shown.splitlines() if "children" in line)
    assert stage.startswith(SHOWN_TASK + " [")
    assert f"error: {SHOWN_ERROR}" in result.stdout.splitlines()


def test_a_flow_module_whose_import_error_holds_escapes_is_reported_printable(tmp_path):
    (tmp_path / "cli_hostile_import.py").write_text(
        "raise ImportError('\\x1b[2J\\x1b[31mpwned')\n", encoding="utf-8"
    )
    result = invoke("graph", "cli_hostile_import:Flow")
    assert result.exit_code == 2
    assert_inert(result.stdout + result.stderr)
    assert "(ImportError: \\x1b[2J\\x1b[31mpwned)" in result.stderr


def test_logged_callback_errors_reach_stderr_printable_with_their_traceback(tmp_path):
    # In a fresh interpreter with no logging set up: what Python would print raw, as it does
    # for any library's log records, and with a stderr that refuses lone surrogates.
    done = subprocess.run(
        [sys.executable, "-m", "threadflow", "run", f"{FLOWS}:Hostile", "--db", "runs.db"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONIOENCODING": "utf-8:strict"},
        capture_output=True,
        timeout=60,
    )
    stderr = done.stderr.decode("utf-8")  # strict: valid UTF-8 all through
    stdout = done.stdout.decode("utf-8")
    assert done.returncode == 1, stderr
    assert_inert(stdout + stderr)
    assert f"error: {SHOWN_ERROR}" in stdout.splitlines()
    # The traceback keeps its lines; its message shows as text.
    lines = stderr.splitlines()
    assert "threadflow: a task_failed receiver raised" in lines
    assert "Traceback (most recent call last):" in lines
    assert f"RuntimeError: {SHOWN} \\udcff" in lines


def test_the_timeline_page_shows_control_characters_as_text(db):
    path, run_id = db
    result = invoke("timeline", run_id, "--db", path, "-o", "-")
    assert result.exit_code == 0, result.stderr
    assert_inert(result.stdout + result.stderr)
    assert "RuntimeError: \\x1b[2J\\x1b[31mpwned" in result.stdout


# --- item: the timeline's default file name ---


@pytest.fixture
def plain_db(tmp_path):
    """A store with one run whose texts are all plain (only its id will be forged)."""
    from tests import cli_flows

    path = str(tmp_path / "plain.db")
    return path, cli_flows.Stages.run(store=path).run_id


@pytest.mark.parametrize(
    "forged", ["../../x", "..", "{tmp_path}/outside", "-rf", "CON", "a\x1b[2J/b"]
)
def test_timeline_default_file_stays_in_the_working_directory(
    plain_db, tmp_path, monkeypatch, forged
):
    path, run_id = plain_db
    forged = forged.format(tmp_path=tmp_path)  # an absolute path
    forge_run_id(path, run_id, forged)
    here = tmp_path / "a" / "b"
    here.mkdir(parents=True)
    monkeypatch.chdir(here)
    result = invoke("timeline", "--db", path, "--", forged)
    assert result.exit_code == 0, result.stderr
    assert_inert(result.stderr)
    (page,) = tmp_path.rglob("*.html")
    assert page.parent == here
    digest = hashlib.sha256(forged.encode()).hexdigest()[:8]
    assert re.fullmatch(rf"([A-Za-z0-9][A-Za-z0-9_-]*-)?(run-)?{digest}\.html", page.name)
    assert result.stderr.startswith(f"wrote {page.name}: run ")


def test_timeline_default_file_of_a_real_run_is_its_id(plain_db, tmp_path):
    path, run_id = plain_db
    result = invoke("timeline", run_id, "--db", path)
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / f"{run_id}.html").is_file()


# --- item: Mermaid labels ---

MERMAID_LINE = re.compile(
    r"    (?:"
    r"(?P<id>[A-Za-z0-9_]+)(?P<open>\[\[|\[)\"(?P<label>(?:[^\"#\[\]{}<>|;\\\n]|#\d+;)*)\"(?:\]\]|\])"
    r"|(?P<entrance>[A-Za-z0-9_]+)\(\(entrance\)\)"
    r"|(?P<end>[A-Za-z0-9_]+)\(\[all_over\]\)"
    r"|(?P<src>[A-Za-z0-9_]+) --> (?P<dst>[A-Za-z0-9_]+)"
    r")"
)


def test_graph_mermaid_writes_any_task_name_as_a_valid_label(hostile):
    result = invoke("graph", f"{FLOWS}:Hostile")
    assert result.exit_code == 0, result.stderr
    assert_inert(result.stdout)
    lines = result.stdout.splitlines()
    assert lines[0] == "flowchart TD"
    labels, declared, edges = {}, set(), []
    for line in lines[1:]:
        match = MERMAID_LINE.fullmatch(line)
        assert match, f"not a statement of the flowchart subset threadflow writes: {line!r}"
        if match["label"] is not None:
            text = re.sub(r"#(\d+);", lambda m: chr(int(m[1])), match["label"])
            labels[match["id"]] = text
        node = match["id"] or match["entrance"] or match["end"]
        if node:
            declared.add(node)
        else:
            edges.append((match["src"], match["dst"]))
    assert list(labels.values()) == [f"{hostile.HOSTILE_TASK} (children)"]
    (task_id,) = labels
    assert edges == [("entrance", task_id), (task_id, "all_over")]
    assert {node for edge in edges for node in edge} <= declared


def test_graph_dot_quotes_any_task_name(hostile):
    result = invoke("graph", f"{FLOWS}:Hostile", "--dot")
    assert result.exit_code == 0, result.stderr
    assert_inert(result.stdout)
    name = json.dumps(hostile.HOSTILE_TASK)
    assert (
        f"    {name} [peripheries=2, label={json.dumps(hostile.HOSTILE_TASK + ' (children)')}];"
        in (result.stdout.splitlines())
    )


# --- item: a module in the working directory does not shadow installed packages ---

DECOY = "raise RuntimeError('the decoy {name} in the working directory was imported')\n"
JOBS = """
import os

from threadflow import ALL_OVER, Flow, task


def libraries(state):
    # In a worker process, which inherits the command's sys.path.
    import click  # noqa: F401
    import sqlite_utils  # noqa: F401


class Jobs(Flow):
    libraries = task(task_func=libraries, isolation="subprocess", next=ALL_OVER)
"""


@pytest.mark.skipif(os.name != "posix", reason="subprocess isolation needs POSIX")
@pytest.mark.parametrize("entry", ["python -m threadflow", "script"])
def test_a_flow_module_here_does_not_let_files_here_shadow_installed_packages(tmp_path, entry):
    work = tmp_path / "work"
    work.mkdir()
    for name in ("sqlite_utils", "click"):
        (work / f"{name}.py").write_text(DECOY.format(name=name), encoding="utf-8")
    (work / "myjobs.py").write_text(JOBS, encoding="utf-8")
    if entry == "script":
        # What the installed ``threadflow`` script does: its own directory first on sys.path.
        script = tmp_path / "bin" / "threadflow_script.py"
        script.parent.mkdir()
        script.write_text(
            "import sys\nfrom threadflow.cli import main\n"
            "if __name__ == '__main__':\n    sys.exit(main())\n",
            encoding="utf-8",
        )
        command = [sys.executable, str(script)]
    else:
        command = [sys.executable, "-m", "threadflow"]
    env = {k: v for k, v in os.environ.items() if k != "THREADFLOW_DB"}
    done = subprocess.run(
        [*command, "run", "myjobs:Jobs", "--db", "runs.db", "--json"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "decoy" not in done.stderr
    assert json.loads(done.stdout)["outcome"] == "all_over"


def test_text_that_reorders_or_hides_itself_is_shown_as_escapes(db):
    # A flow name that a right-to-left override would print as "Flow" + reversed text, with a
    # zero-width space hidden in it ("Trojan Source").
    path, run_id = db
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE runs SET flow = ? WHERE run_id = ?", ("Fl\u200bow\u202edlo", run_id))
    conn.close()
    result = invoke("runs", "--db", path)
    assert result.exit_code == 0, result.stderr
    assert "Fl\\u200bow\\u202edlo" in result.stdout
    assert "\u202e" not in result.stdout and "\u200b" not in result.stdout
