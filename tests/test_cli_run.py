"""``threadflow run``: a flow from the command line, its progress lines, its outcome, Ctrl-C.

Runs go into real store files in ``tmp_path``. The flows are those of ``tests/cli_flows.py``,
and two here: :class:`Watched`, whose children wait until the live progress has been drawn,
and :class:`Hold`, whose children sleep (cancellably) until the test presses Ctrl-C on a real
``python -m threadflow run`` process.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import ctrl_c_able

import threadflow
from threadflow import ALL_OVER, EventStore, Flow, add_children_tasks, task
from threadflow.cli import cli
from threadflow.events import TaskHistory
from threadflow.progress import ProgressView, stage_line

ROOT = Path(__file__).resolve().parent.parent
FLOWS = "tests.cli_flows"
HERE = __name__  # the name the CLI imports this module by, in this process

# --- flows -----------------------------------------------------------------------------------

DRAWN = threading.Event()  # set once a live progress line with both children has been drawn


def two_children(state):
    add_children_tasks([(1, None), (2, None)], state)


def wait_for_drawing(child, state):
    if not DRAWN.wait(30):
        raise TimeoutError("the progress was never drawn")
    return 1


class Watched(Flow):
    split = task(
        task_func=two_children, child_task_func=wait_for_drawing, max_concurrency=2, next=ALL_OVER
    )


def four_children(state):
    add_children_tasks(((i, None) for i in range(4)), state)


def hold_until_cancelled(child, state):
    """With HOLD_CHILDREN set, say so on stderr and sleep until cancelled; else return."""
    if os.environ.get("HOLD_CHILDREN"):
        print(f"holding {child[0]}", file=sys.stderr, flush=True)
        threadflow.sleep(60)
    return child[0]


class Hold(Flow):
    split = task(
        task_func=four_children,
        child_task_func=hold_until_cancelled,
        max_concurrency=2,
        next=ALL_OVER,
    )


# --- helpers ---------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Run in tmp_path with no store or CLI_FLOWS_* variables; the test flows importable."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(ROOT), *sys.path])
    for name in ("THREADFLOW_DB", "CLI_FLOWS_FAIL", "CLI_FLOWS_CRASH", "CLI_FLOWS_STOP"):
        monkeypatch.delenv(name, raising=False)
    DRAWN.clear()
    yield
    DRAWN.set()


@pytest.fixture
def flows():
    return importlib.import_module(FLOWS)


def invoke(*args, env=None):
    try:
        runner = CliRunner(mix_stderr=False)
    except TypeError:  # click >= 8.2 keeps stderr apart by itself
        runner = CliRunner()
    return runner.invoke(cli, [str(a) for a in args], env=env, catch_exceptions=False)


def only_run(path):
    (info,) = EventStore(path).runs()
    return info


# --- outcomes and exit codes -----------------------------------------------------------------


def test_run_all_over_exits_0_and_prints_a_line_per_stage(tmp_path, flows):
    db = tmp_path / "runs.db"
    result = invoke("run", f"{FLOWS}:Stages", "--db", db)
    assert result.exit_code == 0, result.stderr
    info = only_run(str(db))
    assert info.outcome == "all_over"
    assert result.stdout.startswith(f"run {info.run_id}: all_over in ")
    lines = result.stderr.splitlines()
    assert lines[0] == f"run {info.run_id}: Stages started at split (store {db})"
    assert lines[1].startswith("split        [####################] 3/3 children  ")
    assert lines[2].startswith("total        over  ")
    assert len(lines) == 3


def test_run_creates_a_missing_store_and_defaults_to_threadflow_db(tmp_path, flows):
    result = invoke("run", f"{FLOWS}:Stages", "--no-progress")
    assert result.exit_code == 0, result.stderr
    assert only_run(str(tmp_path / "threadflow.db")).outcome == "all_over"
    assert len(result.stderr.splitlines()) == 1  # only the "started" line


def test_run_failed_over_exits_1_with_the_task_the_error_and_the_replay_command(tmp_path, flows):
    db = str(tmp_path / "runs.db")
    result = invoke("run", f"{FLOWS}:Fatal", "--db", db, env={"CLI_FLOWS_FAIL": "2"})
    assert result.exit_code == 1
    run_id = only_run(db).run_id
    assert result.stdout.splitlines()[1:] == [
        "failed task: split[2]",
        "error: ValueError: child 2 is broken",
    ]
    replay = f"threadflow replay {run_id} --db {db} --flow {FLOWS}:Fatal --on-change continue"
    assert f"fix the cause, then replay: {replay}\n" in result.stderr
    assert f"threadflow timeline {run_id} --db {db} -o {run_id}.html" in result.stderr
    assert "split        [" in result.stderr and "1 failed, 2 exits, 1 retry" in result.stderr
    # the printed command is the one that finishes the run once the cause is fixed
    again = invoke(*replay.split()[1:])
    assert again.exit_code == 0, again.stderr
    assert only_run(db).outcome == "all_over"


def test_run_json_prints_the_result_for_scripts(tmp_path, flows):
    db = str(tmp_path / "runs.db")
    result = invoke("run", f"{FLOWS}:Tolerated", "--db", db, "--json", env={"CLI_FLOWS_FAIL": "2"})
    assert result.exit_code == 0
    assert json.loads(result.stdout) == {
        "run_id": only_run(db).run_id,
        "outcome": "all_over",
        "task": None,
        "error": None,
        "failed": [["split", 2]],
    }


def test_run_entrance_starts_at_another_task(tmp_path, flows):
    db = str(tmp_path / "runs.db")
    result = invoke("run", f"{FLOWS}:Stages", "--db", db, "--entrance", "total")
    assert result.exit_code == 0, result.stderr
    info = only_run(db)
    assert info.entrance == "total"
    assert {ev.task for ev in EventStore(db).events(info.run_id)} == {None, "total"}


def test_run_unknown_entrance_is_a_usage_error_with_a_suggestion(tmp_path, flows):
    result = invoke("run", f"{FLOWS}:Stages", "--db", tmp_path / "runs.db", "--entrance", "totl")
    assert result.exit_code == 2
    assert "'totl' is not a task of 'Stages'; did you mean 'total'?" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_run_refuses_a_file_that_is_not_a_store_and_leaves_it_alone(tmp_path, flows):
    path = tmp_path / "notes.db"
    path.write_bytes(b"my notes\n" * 100)
    result = invoke("run", f"{FLOWS}:Stages", "--db", path)
    assert result.exit_code == 3
    assert "is not a readable SQLite database" in result.stderr
    assert path.read_bytes() == b"my notes\n" * 100


def test_run_bad_flow_is_a_usage_error(flows):
    result = invoke("run", f"{FLOWS}:NotAFlow")
    assert result.exit_code == 2
    assert "not a threadflow Flow subclass" in result.stderr


# --- progress --------------------------------------------------------------------------------


def test_live_progress_is_redrawn_in_place(tmp_path, monkeypatch):
    draw = ProgressView.draw

    def draw_and_tell(self, final=False):
        draw(self, final)
        split = self.run.history.tasks.get("split")
        if self._display is not None and split is not None and split.children_added == 2:
            DRAWN.set()  # a live line with both children is on the screen

    monkeypatch.setattr(ProgressView, "draw", draw_and_tell)
    result = invoke("run", f"{HERE}:Watched", "--db", tmp_path / "runs.db", "--progress")
    assert result.exit_code == 0, result.stderr
    err = result.stderr
    assert "split        [--------------------] 0/2 children" in err
    # the live line is erased and drawn again in place (cursor to its start, line erased)
    assert "\r\x1b[2K" in err
    # once the run is over, the live area is erased and the stage's final line stays
    last = err.rstrip("\n").split("\n")[-1]
    erased = re.match(r"\x1b\[\?25h\r(\x1b\[1A\x1b\[2K)+", last)  # cursor shown, lines erased
    assert erased is not None, repr(last)
    last = last[erased.end() :]
    assert last.startswith("split        [####################] 2/2 children")


def test_progress_line_shows_children_rate_time_and_troubles():
    stage = TaskHistory("parse", children_added=40, children_done=9, children_failed=1)
    stage.exits, stage.timeouts, stage.retries = 3, 1, 3
    line = stage_line(stage, took=2.0)
    assert line == (
        "parse        [#####---------------] 10/40 children  5.0/s  2.000 s  "
        "1 failed, 3 exits, 1 timeout, 3 retries"
    )


def test_progress_line_of_a_stage_without_children():
    stage = TaskHistory("store", attempts=2, parent="running")
    stage.exits = stage.retries = 1
    assert (
        stage_line(stage, took=0.5) == "store        running (attempt 2)  0.500 s  1 exit, 1 retry"
    )
    stage.parent = "over"
    assert stage_line(stage, took=0.75) == "store        over  0.750 s  1 exit, 1 retry"
    stage.parent = "failed"
    assert stage_line(stage, took=0.75).startswith("store        failed after 2 attempts")


# --- Ctrl-C ----------------------------------------------------------------------------------


@pytest.mark.skipif(sys.platform == "win32", reason="sends SIGINT to a child process")
def test_ctrl_c_stops_records_the_run_interrupted_and_prints_the_replay_command(tmp_path):
    db = str(tmp_path / "runs.db")
    env = {
        **{k: v for k, v in os.environ.items() if k != "THREADFLOW_DB"},
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)]),
        "HOLD_CHILDREN": "1",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "threadflow", "run", "test_cli_run:Hold", "--db", db],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=ctrl_c_able,
    )
    try:
        seen = []
        for line in proc.stderr:  # the children say when they are running
            seen.append(line)
            if line.startswith("holding "):
                break
        else:
            pytest.fail(f"the run never started: {''.join(seen)}")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = "".join(seen) + err
    assert proc.returncode == 4, err
    info = only_run(db)
    assert info.outcome == "interrupted"
    kinds = [ev.kind for ev in EventStore(db).events(info.run_id)]
    assert kinds[-1] == "interrupted" and "abandoned" not in kinds
    assert out.startswith(f"run {info.run_id}: interrupted in ")
    assert "interrupted: stopping the run" in err
    replay = f"threadflow replay {info.run_id} --db {db} --flow test_cli_run:Hold"
    assert f"replay it to go on: {replay}\n" in err
    # and the printed command finishes the run (the children no longer hold)
    again = invoke("replay", info.run_id, "--db", db, "--flow", f"{HERE}:Hold")
    assert again.exit_code == 0, again.stderr
    assert only_run(db).outcome == "all_over"
