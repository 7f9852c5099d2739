"""The README's example is real code: it runs and prints what the README says it prints."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_flow_example_runs_and_prints_the_sums(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (block,) = python_blocks()

    exec(compile(block, str(README), "exec"), {"__name__": "readme_example"})

    out = capsys.readouterr().out.splitlines()
    assert out == ["{0: 6, 1: 15, 2: 24}", "all_over"]
    assert (tmp_path / "runs.db").exists()


def test_readme_set_up_commands_are_the_ones_ci_runs():
    ci = (README.parent / ".ci" / "run").read_text()
    commands = re.findall(r"```sh\n(.*?)\n```", README.read_text(), flags=re.S)
    assert len(commands) == 2
    assert commands[1] in ci
