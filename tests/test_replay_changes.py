"""A replay notices that the code changed since the run last ran.

The flow is a module written to ``tmp_path``; each run and replay is a fresh ``threadflow``
process that imports it, as after a deploy: the run fails, the module is edited, the replay
compares the fingerprints the log recorded with the code it imports now.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from threadflow import ALL_OVER, EventStore, Flow, ReplayError, task
from threadflow._fingerprint import fingerprint

ROOT = Path(__file__).resolve().parent.parent

#: Three stages: load (children 0..2), square (children 0..2, child 2 broken), report.
#: Every child attempt appends "task child" to the journal: what really ran.
PIPELINE = '''
"""A pipeline the tests edit between a run and its replay."""
import os

from threadflow import ALL_OVER, Flow, add_children_tasks, task


def ran(name, child_id):
    with open(os.environ["JOURNAL"], "a") as f:
        f.write(f"{name} {child_id}\\n")


def add_three(state):
    add_children_tasks(((i, i) for i in range(3)), state)


def load_item(child, state):
    child_id, payload = child
    ran("load", child_id)
    return payload + 1


def square_item(child, state):
    child_id, payload = child
    ran("square", child_id)
    if child_id == 2:
        raise ValueError("square 2 is broken")
    return payload * payload


def report(state):
    ran("report", None)


class Pipeline(Flow):
    load = task(add_three, child_task_func=load_item, next="square")
    # One at a time: 0 and 1 are over (in the log) before 2 fails the run, however loaded
    # the machine is, so that what a replay keeps is known.
    square = task(add_three, child_task_func=square_item, max_concurrency=1, next="report")
    report = task(report, next=ALL_OVER)
'''

#: The fix: square's children are computed differently and child 2 no longer fails.
FIXED = PIPELINE.replace(
    """    if child_id == 2:
        raise ValueError("square 2 is broken")
    return payload * payload""",
    "    return payload * 100",
)


def cli(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``threadflow ARGS`` in a fresh process that imports the pipeline from ``workdir``."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(workdir), str(ROOT)]),
        "PYTHONDONTWRITEBYTECODE": "1",  # an edit must be what the next process imports
        "JOURNAL": str(workdir / "journal.txt"),
    }
    return subprocess.run(
        [sys.executable, "-m", "threadflow", *args],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def failed_run(tmp_path):
    """The pipeline run to a failure (square child 2): ``(workdir, db, run_id)``."""
    (tmp_path / "pipeline.py").write_text(PIPELINE)
    db = str(tmp_path / "runs.db")
    done = cli(tmp_path, "run", "pipeline:Pipeline", "--db", db)
    assert done.returncode == 1, done.stderr
    (info,) = EventStore(db).runs()
    (tmp_path / "journal.txt").write_text("")  # from here on: what the replay runs
    return tmp_path, db, info.run_id


def journal(workdir: Path) -> list[str]:
    return sorted((workdir / "journal.txt").read_text().splitlines())


def test_a_replay_of_changed_code_is_refused_naming_the_task_and_the_options(failed_run):
    workdir, db, run_id = failed_run
    (workdir / "pipeline.py").write_text(FIXED)
    refused = cli(workdir, "replay", run_id, "--db", db)
    assert refused.returncode == 3, refused.stderr  # refused
    message = refused.stderr
    assert "the code of task 'square' (child_task_func) changed" in message
    assert f"threadflow replay {run_id} --db {db} --on-change rerun" in message
    assert "--on-change continue" in message
    assert f"Pipeline.replay({run_id!r}, store={db!r}, on_change='rerun')" in message
    assert journal(workdir) == []  # nothing ran
    assert EventStore(db).run(run_id).outcome == "failed_over"


def test_rerun_runs_the_changed_stage_and_those_after_it_with_the_new_code(failed_run):
    workdir, db, run_id = failed_run
    (workdir / "pipeline.py").write_text(FIXED)
    done = cli(workdir, "replay", run_id, "--db", db, "--on-change", "rerun")
    assert done.returncode == 0, done.stderr
    # square's children 0 and 1 had finished with the old code: they ran again; load did not.
    assert journal(workdir) == ["report None", "square 0", "square 1", "square 2"]
    store = EventStore(db)
    assert list(store.results(run_id, "square")) == [(0, 0), (1, 100), (2, 200)]
    assert list(store.results(run_id, "load")) == [(0, 1), (1, 2), (2, 3)]
    (replayed,) = store.events(run_id, "replayed")
    assert replayed.data["rerun"] == ["report", "square"]


def test_readers_agree_after_a_rerun(failed_run):
    workdir, db, run_id = failed_run
    (workdir / "pipeline.py").write_text(FIXED)
    assert cli(workdir, "replay", run_id, "--db", db, "--on-change", "rerun").returncode == 0
    store = EventStore(db)
    info = store.run(run_id)
    square = info.history.tasks["square"]
    assert (square.children_added, square.children_done, square.children_failed) == (3, 3, 0)
    assert square.exits == 0  # the old attempt's exit was forgotten with its work
    assert (
        info.children_done
        == 6
        == sum(1 for t in ("load", "square") for _ in store.results(run_id, t))
    )
    summary = json.loads(cli(workdir, "show", run_id, "--db", db, "--summary", "--json").stdout)
    by_task = {t["task"]: t for t in summary["tasks"]}
    assert by_task["square"]["children_done"] == 3
    assert by_task["square"]["children_failed"] == 0
    (listed,) = json.loads(cli(workdir, "runs", "--db", db, "--json").stdout)
    assert listed["outcome"] == "all_over"
    shown = cli(workdir, "show", run_id, "--db", db, "--kind", "replayed").stdout
    assert "rerun: report, square" in shown


def test_continue_keeps_finished_work_and_runs_the_rest_with_the_new_code(failed_run):
    workdir, db, run_id = failed_run
    (workdir / "pipeline.py").write_text(FIXED)
    done = cli(workdir, "replay", run_id, "--db", db, "--on-change", "continue")
    assert done.returncode == 0, done.stderr
    assert journal(workdir) == ["report None", "square 2"]
    assert list(EventStore(db).results(run_id, "square")) == [(0, 0), (1, 1), (2, 200)]


def test_whitespace_comment_and_docstring_edits_are_not_changes(failed_run):
    workdir, db, run_id = failed_run
    reformatted = (
        PIPELINE.replace(
            "    return payload * payload",
            "    return (payload *\n            payload)  # reflowed",
        )
        .replace(
            "def square_item(child, state):\n",
            'def square_item(child, state):\n    """Squares (a docstring is not code)."""\n',
        )
        .replace(
            "def add_three(state):", "# a comment moves every line below\n\ndef add_three(state):"
        )
    )
    assert reformatted != PIPELINE
    (workdir / "pipeline.py").write_text(reformatted)
    diff = cli(workdir, "replay", run_id, "--db", db, "--diff")
    assert diff.stdout.splitlines()[1:] == [
        "  load    unchanged",
        "  report  unchanged",
        "  square  unchanged",
        "nothing the run reaches changed: a replay continues it as before",
    ]
    # The default (refuse) lets it through: child 2 still fails, the run is failed_over again.
    again = cli(workdir, "replay", run_id, "--db", db)
    assert again.returncode == 1, again.stderr
    assert set(journal(workdir)) == {"square 2"}  # (once per attempt)


def test_diff_lists_each_task_and_runs_nothing(failed_run):
    workdir, db, run_id = failed_run
    (workdir / "pipeline.py").write_text(FIXED)
    diff = cli(workdir, "replay", run_id, "--db", db, "--diff")
    assert diff.returncode == 0, diff.stderr
    assert diff.stdout.splitlines() == [
        f"run {run_id}: the code of flow 'Pipeline' now, against the last run",
        "  load    unchanged",
        "  report  unchanged",
        "  square  changed (child_task_func)",
        "--on-change rerun would run again from scratch: report, square",
    ]
    as_json = json.loads(cli(workdir, "replay", run_id, "--db", db, "--diff", "--json").stdout)
    assert as_json["tasks"] == {"load": "unchanged", "square": "changed", "report": "unchanged"}
    assert as_json["rerun"] == ["report", "square"]
    assert journal(workdir) == []
    assert EventStore(db).run(run_id).segments == 1


def test_the_next_replay_compares_with_the_code_that_replayed_last(failed_run):
    workdir, db, run_id = failed_run
    # A fix that still fails child 2, replayed with continue: the log now holds its code.
    still_broken = PIPELINE.replace("return payload * payload", "return payload * 3")
    (workdir / "pipeline.py").write_text(still_broken)
    assert cli(workdir, "replay", run_id, "--db", db, "--on-change", "continue").returncode == 1
    diff = cli(workdir, "replay", run_id, "--db", db, "--diff").stdout
    assert "square  unchanged" in diff
    assert cli(workdir, "replay", run_id, "--db", db).returncode == 1  # not refused


def test_a_log_without_fingerprints_replays_as_before(failed_run):
    workdir, db, run_id = failed_run
    # A log written before fingerprints were recorded: take them out of its flow_started.
    conn = sqlite3.connect(db)
    with conn:
        conn.execute(
            "UPDATE events SET data = json_remove(data, '$.fingerprints') "
            "WHERE kind = 'flow_started'"
        )
    conn.close()
    (workdir / "pipeline.py").write_text(FIXED)
    diff = cli(workdir, "replay", run_id, "--db", db, "--diff")
    assert "recorded no fingerprints" in diff.stdout and "nothing to compare" in diff.stdout
    done = cli(workdir, "replay", run_id, "--db", db)
    assert done.returncode == 0, done.stderr
    assert journal(workdir) == ["report None", "square 2"]


def test_only_the_functions_that_compare_are_named_changed(failed_run):
    workdir, db, run_id = failed_run
    # square's task_func was recorded by the code object (its source could not be read then):
    # a fingerprint of another kind, which says nothing about whether it changed.
    conn = sqlite3.connect(db)
    with conn:
        conn.execute(
            "UPDATE events SET data = json_set(data, '$.fingerprints.square.task_func', "
            "'code:0000000000000000') WHERE kind = 'flow_started'"
        )
    conn.close()
    (workdir / "pipeline.py").write_text(FIXED)
    diff = cli(workdir, "replay", run_id, "--db", db, "--diff", "--json")
    assert json.loads(diff.stdout)["functions"] == {"square": ["child_task_func"]}
    refused = cli(workdir, "replay", run_id, "--db", db)
    assert "task 'square' (child_task_func) changed" in refused.stderr


# --- in one process: the Python API -------------------------------------------------------------


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    return module


def test_the_api_refuses_by_default_and_reruns_when_asked(failed_run, monkeypatch):
    workdir, db, run_id = failed_run
    monkeypatch.setenv("JOURNAL", str(workdir / "journal.txt"))
    (workdir / "fixed.py").write_text(FIXED)
    fixed = _load(workdir / "fixed.py", "fixed_pipeline")
    with pytest.raises(ReplayError, match=r"task 'square' \(child_task_func\) changed") as refused:
        fixed.Pipeline.replay(run_id, store=db)
    assert refused.value.changed == ["square"]
    with pytest.raises(ReplayError, match="on_change must be 'refuse', 'rerun' or 'continue'"):
        fixed.Pipeline.replay(run_id, store=db, on_change="redo")
    result = fixed.Pipeline.replay(run_id, store=db, on_change="rerun")
    assert result.outcome == "all_over"
    assert list(EventStore(db).results(run_id, "square")) == [(0, 0), (1, 100), (2, 200)]


def test_a_change_to_stages_that_never_started_is_no_reason_to_refuse(tmp_path, monkeypatch):
    monkeypatch.setenv("JOURNAL", str(tmp_path / "journal.txt"))
    db = str(tmp_path / "runs.db")
    # load's parent fails, so square and report never start; then report's code changes.
    broken_load = PIPELINE.replace(
        "def add_three(state):\n", "def add_three(state):\n    raise OSError('no input')\n"
    )
    (tmp_path / "broken.py").write_text(broken_load)
    first = _load(tmp_path / "broken.py", "broken_pipeline").Pipeline.run(store=db)
    assert first.outcome == "failed_over"
    (tmp_path / "fixed.py").write_text(PIPELINE.replace('ran("report", None)', 'ran("report", 2)'))
    fixed = _load(tmp_path / "fixed.py", "fixed_pipeline")
    # load's parent is fixed, and load had started: what to do must be chosen.
    with pytest.raises(ReplayError, match=r"tasks 'load' \(task_func\), 'report'"):
        fixed.Pipeline.replay(first.run_id, store=db)
    assert fixed.Pipeline.replay(first.run_id, store=db, on_change="continue").outcome == (
        "failed_over"  # square 2 still fails
    )
    # Now only report changes, and report has never started: no choice to make.
    (tmp_path / "later.py").write_text(PIPELINE.replace('ran("report", None)', 'ran("report", 3)'))
    later = _load(tmp_path / "later.py", "later_pipeline")
    assert later.Pipeline.replay(first.run_id, store=db).outcome == "failed_over"


#: Square's child 2 waits, until it is cancelled, so that stopping the server interrupts the run.
STUCK = PIPELINE.replace(
    """    if child_id == 2:
        raise ValueError("square 2 is broken")""",
    """    if child_id == 2:
        state["stuck"].set()
        threadflow.sleep(60)  # wakes with CancelledError when the server stops""",
).replace("import os\n", "import os\n\nimport threadflow\n")


def test_resume_of_a_run_whose_code_changed_follows_start_links_on_change(tmp_path, monkeypatch):
    monkeypatch.setenv("JOURNAL", str(tmp_path / "journal.txt"))
    db = str(tmp_path / "runs.db")
    (tmp_path / "stuck.py").write_text(STUCK)
    stuck_module = _load(tmp_path / "stuck.py", "stuck_pipeline")
    stuck = threading.Event()
    server = stuck_module.Pipeline.start_link(store=db, stuck=stuck)
    handle = server.start_flow()
    assert stuck.wait(60)
    server.stop()  # the app is shut down mid-run: the run is interrupted
    assert handle.result(60).outcome == "interrupted"
    (tmp_path / "fixed.py").write_text(FIXED)
    fixed = _load(tmp_path / "fixed.py", "fixed_pipeline")
    with pytest.raises(ValueError, match="on_change must be 'refuse', 'rerun' or 'continue'"):
        fixed.Pipeline.start_link(store=db, resume=True, on_change="redo")

    # The default: the changed run is not resumed; its handle says why, and the server serves.
    server = fixed.Pipeline.start_link(store=db, resume=True)
    try:
        (refused,) = server.resumed
        with pytest.raises(ReplayError, match=r"task 'square' \(child_task_func\) changed"):
            refused.result(60)
    finally:
        server.stop()
    assert [r.status for r in EventStore(db).runs()] == ["interrupted"]

    # on_change="rerun": square (changed) and report (after it) start over, load does not.
    (tmp_path / "journal.txt").write_text("")
    server = fixed.Pipeline.start_link(store=db, resume=True, on_change="rerun")
    try:
        (resumed,) = server.resumed
        assert resumed.result(60).outcome == "all_over"
    finally:
        server.stop()
    assert journal(tmp_path) == ["report None", "square 0", "square 1", "square 2"]
    store = EventStore(db)
    assert list(store.results(handle.run_id, "square")) == [(0, 0), (1, 100), (2, 200)]
    assert list(store.results(handle.run_id, "load")) == [(0, 1), (1, 2), (2, 3)]


# --- what a fingerprint covers ----------------------------------------------------------------


class _Callable:
    def __call__(self, state):
        return 1


def test_functions_that_cannot_be_read_never_fail_a_run(store_path):
    import functools

    class Odd(Flow):
        first = task(lambda state: None, next="second")
        second = task(functools.partial(lambda state, n: None, n=3), next="third")
        third = task(_Callable(), next="fourth")
        fourth = task(len, next=ALL_OVER)  # a builtin: no fingerprint

    fps = Odd.definition.fingerprints
    assert fps["first"]["task_func"] is not None
    assert fps["second"]["task_func"] is not None
    assert fps["third"]["task_func"] is not None
    assert fps["fourth"]["task_func"] is None
    assert Odd.run(store=store_path).outcome == "all_over"


def test_a_partials_arguments_are_part_of_its_fingerprint():
    def scale(factors, child, state):
        return child

    base = fingerprint(functools.partial(scale, (1, 2)))
    assert base == fingerprint(functools.partial(scale, (1, 2)))
    assert base != fingerprint(functools.partial(scale, (1, 3)))
    assert base != fingerprint(functools.partial(scale, [1, 2]))  # another value: a list


def test_a_function_without_source_gets_a_code_fingerprint():
    namespace: dict[str, object] = {}
    exec("def made(state):\n    return 2\n", namespace)  # no file to read its source from
    print_fp = fingerprint(namespace["made"])
    assert print_fp is not None and print_fp.startswith("code:")
    exec("def made(state):\n    return 3\n", namespace)
    assert fingerprint(namespace["made"]) != print_fp


#: Functions without threadflow, for interpreters that do not have it installed.
SAMPLE = """
import functools


def square_item(child, state):
    \"\"\"A docstring.\"\"\"
    child_id, payload = child  # a comment
    return [payload * payload for _ in range(2) if child_id] or {"k": -1.5}


async def fetch(url, *, retries=3, **options):
    async with options["client"].get(url) as response:
        return await response.json()


class Scaler:
    def __call__(self, state):
        return lambda x: x * 2


scaled = functools.partial(square_item, state={})
"""


def _interpreter(version: str) -> str | None:
    """Python ``version``: ``pythonX.Y`` if it runs, else one pyenv has installed but not
    selected (its shim then only says so), as CI finds them."""
    python = shutil.which(f"python{version}")
    if (
        python is not None
        and subprocess.run([python, "-c", ""], capture_output=True).returncode == 0
    ):
        return python
    pyenv = shutil.which("pyenv")
    if pyenv is None:
        return None
    root = subprocess.run([pyenv, "root"], capture_output=True, text=True).stdout.strip()
    found = [
        p for p in Path(root, "versions").glob(f"{version}.*/bin/python") if os.access(p, os.X_OK)
    ]
    found.sort(key=lambda p: [int(n) for n in p.parent.parent.name.split(".") if n.isdigit()])
    return str(found[-1]) if found else None


@pytest.mark.parametrize("version", ["3.10", "3.11", "3.12", "3.13"])
def test_a_fingerprint_is_the_same_on_every_python(version, tmp_path):
    """The fingerprint module, loaded alone (it needs only the standard library), gives the
    same fingerprints in another interpreter."""
    python = _interpreter(version)
    if python is None:
        pytest.skip(f"python{version} is not installed")
    sample = tmp_path / "sample.py"
    sample.write_text(SAMPLE)
    names = ["square_item", "fetch", "Scaler()", "scaled"]
    script = textwrap.dedent(
        f"""
        import importlib.util
        import sys

        def load(path, name):
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module

        fp = load({str(ROOT / "threadflow" / "_fingerprint.py")!r}, "fp")
        sys.modules["sample"] = sample = load({str(sample)!r}, "sample")
        for name in {names!r}:
            print(fp.fingerprint(eval(name, vars(sample))))
        """
    )
    done = subprocess.run([python, "-c", script], capture_output=True, text=True, timeout=60)
    if done.returncode != 0 and "Traceback" not in done.stderr:  # a stub that runs no Python
        pytest.skip(f"python{version} cannot run here: {done.stderr.strip()[:200]}")
    assert done.returncode == 0, done.stderr
    here = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    ).stdout.split()
    assert done.stdout.split() == here
    assert len(here) == 4 and all(fp.startswith("src:") for fp in here)
