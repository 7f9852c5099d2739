"""The documentation tells the truth: every command and public name is in it, its examples run,
and the site builds with ``mkdocs build --strict`` (when the ``docs`` extra is installed)."""

from __future__ import annotations

import importlib
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import threadflow
from threadflow.cli import EVENT_KINDS, cli

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))


def page(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def nav_pages() -> list[str]:
    """The pages named in mkdocs.yml's nav (read without a YAML parser)."""
    text = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    nav = text.split("\nnav:\n", 1)[1]
    return re.findall(r"([\w-]+\.md)\s*$", nav, flags=re.M)


# --- what must be documented -----------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_every_command_has_help_and_is_documented(name):
    command = cli.commands[name]
    assert command.help and command.help.strip(), f"threadflow {name} has no help text"
    for param in command.params:
        if isinstance(param, click.Option) and not param.hidden:
            assert param.help, f"threadflow {name} {'/'.join(param.opts)} has no help text"
    result = CliRunner().invoke(cli, [name, "--help"])
    assert result.exit_code == 0
    assert f"Usage: threadflow {name} " in result.output
    heading = f"## `threadflow {name}`"
    assert heading in page("cli.md") or heading in page("reference.md"), (
        f"threadflow {name} has no section in docs/cli.md or docs/reference.md"
    )


@pytest.mark.parametrize("name", threadflow.__all__)
def test_every_public_name_is_in_the_reference_and_the_api_page(name):
    assert f"`{name}" in page("reference.md"), f"{name} is not in docs/reference.md"
    assert f"::: threadflow.{name}" in page("api.md"), f"{name} has no block in docs/api.md"


def test_every_task_option_is_in_the_reference():
    text = page("reference.md")
    for option in inspect.signature(threadflow.task).parameters:
        assert f"| `{option}` |" in text, option


def test_every_signal_and_callback_is_in_the_reference():
    text = page("reference.md")
    for name in threadflow.signals.__all__:
        assert f"`{name}`" in text, name
    for method in threadflow.signals.HANDLERS:
        assert f"`{method}(" in text, method


def test_every_event_kind_is_in_the_store_page():
    text = page("store.md")
    for kind in EVENT_KINDS:
        assert f"| `{kind}` |" in text, kind


def test_every_page_is_in_the_nav_and_every_nav_entry_exists():
    nav = nav_pages()
    assert sorted(set(nav)) == sorted(nav), "a page is twice in the nav"
    assert sorted(nav) == sorted(p.name for p in PAGES)


def test_the_timeline_picture_is_there_and_shown():
    picture = DOCS / "img" / "timeline.png"
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "(img/timeline.png)" in page("index.md")
    assert (ROOT / "tools" / "make_timeline_picture.py").exists()


# --- the examples run ------------------------------------------------------------------------


@pytest.mark.parametrize("path", PAGES, ids=lambda p: p.name)
def test_python_examples_are_valid_python(path):
    for block in python_blocks(path.read_text(encoding="utf-8")):
        compile(block, str(path), "exec")


def test_quickstart_example_prints_the_sums(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    block = python_blocks(page("quickstart.md"))[0]
    exec(compile(block, "quickstart.md", "exec"), {"__name__": "quickstart_example"})
    assert capsys.readouterr().out.splitlines() == ["{0: 6, 1: 15, 2: 24}", "all_over"]


def test_home_page_example_prints_the_rows(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    block = python_blocks(page("index.md"))[0]
    exec(compile(block, "index.md", "exec"), {"__name__": "index_example"})
    assert capsys.readouterr().out == "500\n"


def test_testing_page_module_passes(tmp_path, monkeypatch):
    """The test module of docs/testing.md, run test by test."""
    monkeypatch.chdir(tmp_path)
    block = python_blocks(page("testing.md"))[0]
    namespace: dict = {"__name__": "test_squares"}
    exec(compile(block, "testing.md", "exec"), namespace)
    tests = {name: f for name, f in namespace.items() if name.startswith("test_")}
    assert len(tests) == 7
    for index, function in enumerate(tests.values()):
        params = inspect.signature(function).parameters
        if "tmp_path" in params:
            store_dir = tmp_path / str(index)
            store_dir.mkdir()
            function(tmp_path=store_dir)
        else:
            function()


def test_schedule_page_examples_run(tmp_path, monkeypatch, capsys):
    """The first example of docs/schedule.md (a schedule started and stopped), then its test
    of a schedule under a frozen clock, with the first one's flow."""
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks(page("schedule.md"))
    namespace: dict = {"__name__": "schedule_example"}
    exec(compile(blocks[0], "schedule.md", "exec"), namespace)
    assert capsys.readouterr().out.startswith("next run at ")
    exec(compile(blocks[-1], "schedule.md", "exec"), namespace)
    store_dir = tmp_path / "test"
    store_dir.mkdir()
    namespace["test_sync_runs_on_the_hour"](tmp_path=store_dir)


def test_tk_example_flow_runs_without_a_window(tmp_path):
    pytest.importorskip("tkinter", reason="this Python has no Tk")
    spec = importlib.util.spec_from_file_location("tk_app", ROOT / "examples" / "tk_app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.Thumbnails.run(store=tmp_path / "tk.db", count=12)
    assert result.outcome == "all_over"
    assert result.failed == []
    assert dict(threadflow.results(result.state, "scan"))[4] == "photo-004-thumb.jpg"


@pytest.mark.skipif(
    sys.platform.startswith("linux") and not os.environ.get("DISPLAY"),
    reason="the Tk example needs a display (set DISPLAY, e.g. under xvfb-run)",
)
def test_tk_example_window_runs_a_flow(tmp_path):
    pytest.importorskip("tkinter", reason="this Python has no Tk")
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "tk_app.py"), "--autorun", "--db", "tk.db"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    (run,) = threadflow.EventStore(tmp_path / "tk.db").runs()
    assert run.outcome == "all_over"


# --- the site builds -------------------------------------------------------------------------


def test_site_builds_strictly(tmp_path):
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        pytest.importorskip(module, reason="the docs extra is not installed: pip install '.[docs]'")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=ROOT,  # mkdocs.yml, and the snippets it includes, are found from here
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    site = tmp_path / "site"
    assert (site / "img" / "timeline.png").exists()
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    for name in threadflow.__all__:
        assert f'id="threadflow.{name}"' in api, f"{name} is missing from the API page"
    gui = (site / "gui" / "index.html").read_text(encoding="utf-8")
    assert "POLL_MS" in gui, "the Tk example was not included in the GUI page"


def test_no_file_holds_a_merge_conflict_marker():
    markers = ("<<<<<<< ", ">>>>>>> ")
    found = []
    for folder in ("docs", "threadflow", "tests", "tools", "examples"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".md", ".py", ".yml", ".toml", ".cfg") and path.is_file():
                for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                    if line.startswith(markers):
                        found.append(f"{path.relative_to(ROOT)}:{n}")
    assert found == []
