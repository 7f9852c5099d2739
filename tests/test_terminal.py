"""``threadflow run`` on a real terminal: a pseudo-terminal, read by a terminal emulator.

The command runs in a fresh interpreter whose stdin, stdout and stderr are the slave side of a
pty (200 columns, 50 rows); the test reads the master side and feeds every byte to ``pyte``,
which keeps the screen as a person would see it. The flow is ``tests/terminal_flows.py``'s
:class:`Printer`, whose children end when the test says so.
"""

from __future__ import annotations

import fcntl
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import pytest
from helpers import ctrl_c_able

from threadflow import EventStore

pyte = pytest.importorskip("pyte")

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")

ROOT = Path(__file__).resolve().parent.parent
COLUMNS, ROWS = 200, 50
GUARD = 60.0  # seconds: a hang guard, never a synchronisation


class Terminal:
    """A command running on a pseudo-terminal, and the screen it has drawn so far."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str]) -> None:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
        self.master = master
        self.proc = subprocess.Popen(
            args,
            cwd=cwd,
            env=env,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            close_fds=True,
            preexec_fn=ctrl_c_able,
        )
        os.close(slave)
        self.screen = pyte.Screen(COLUMNS, ROWS)
        self.stream = pyte.ByteStream(self.screen)
        self.raw = b""
        self.closed = False

    def _read(self, wait: float) -> None:
        if self.closed:
            return
        ready, _, _ = select.select([self.master], [], [], wait)
        if not ready:
            return
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: the command has ended and closed the terminal
            data = b""
        if not data:
            self.closed = True
            return
        self.raw += data
        self.stream.feed(data)

    def read_until(self, predicate, what: str) -> None:
        """Read the command's output until ``predicate(self)`` holds (within :data:`GUARD`)."""
        deadline = threading.Event()
        timer = threading.Timer(GUARD, deadline.set)
        timer.start()
        try:
            while not predicate(self):
                if deadline.is_set() or self.closed:
                    pytest.fail(f"never saw {what}; the screen:\n{self.text()}")
                self._read(0.05)
        finally:
            timer.cancel()

    def finish(self) -> int:
        """Read until the command has ended; its exit code."""
        self.read_until(lambda t: t.closed, "the end of the command")
        code = self.proc.wait(GUARD)
        os.close(self.master)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(GUARD)
        if not self.closed:
            os.close(self.master)
            self.closed = True

    def text(self) -> str:
        return "\n".join(line.rstrip() for line in self.screen.display).rstrip()

    def raw_text(self) -> str:
        return self.raw.decode("utf-8", "replace")


@pytest.fixture
def gate(tmp_path):
    folder = tmp_path / "gate"
    folder.mkdir()
    return folder


@pytest.fixture
def printer(tmp_path, gate):
    """``threadflow run terminal_flows:Printer`` on a terminal; the test opens the gates."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("THREADFLOW_DB", "COLUMNS", "LINES", "NO_COLOR", "FORCE_COLOR")
        and not k.startswith("TTY_")
    }
    env.update(
        PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT)]),
        TERM="xterm-256color",
        TERMINAL_GATE=str(gate),
    )
    db = str(tmp_path / "runs.db")
    args = [sys.executable, "-m", "threadflow", "run", "terminal_flows:Printer", "--db", db]
    terminal = Terminal(args, tmp_path, env)
    yield terminal, db
    terminal.kill()


def open_gate(gate: Path, child: int) -> None:
    (gate / f"go-{child}").touch()


def test_what_the_flow_prints_stays_above_the_live_progress(printer, gate):
    terminal, db = printer
    terminal.read_until(lambda t: "0/9 children" in t.text(), "the live progress")
    for child in range(1, 10):
        open_gate(gate, child)
        # Its receiver prints a line; then the progress is drawn again (which used to erase
        # the line: of 9 lines, 3 stayed on the screen).
        mark = f"user line {child}".encode()
        terminal.read_until(
            lambda t, mark=mark: mark in t.raw and b"/9 children" in t.raw.split(mark, 1)[1],
            f"'user line {child}' and a redraw after it",
        )
    assert terminal.finish() == 0
    lines = terminal.text().splitlines()
    printed = [line for line in lines if line.startswith("user line ")]
    assert printed == [f"user line {i}" for i in range(1, 10)], terminal.text()
    # above the stage's final line and the outcome; the live area is gone
    (run_id,) = [r.run_id for r in EventStore(db).runs()]
    assert lines[0] == f"run {run_id}: Printer started at split (store {db})"
    assert lines[1:10] == printed
    assert lines[10].startswith("split        [####################] 9/9 children")
    assert lines[11].startswith(f"run {run_id}: all_over in ")
    assert len(lines) == 12, terminal.text()


def test_the_live_progress_names_the_attempts_running_longest(printer, gate):
    terminal, _ = printer
    # Child 1 waits for its gate: after a second the live area names it, with its time.
    terminal.read_until(lambda t: "running longest: split[1] " in t.text(), "split[1] named")
    assert re.search(r"^  running longest: split\[1\] \d\.\d{3} s$", terminal.text(), re.M)
    for child in range(1, 10):
        open_gate(gate, child)
    assert terminal.finish() == 0
    assert "running longest" not in terminal.text()  # the live area went with the run


def test_ctrl_c_on_a_terminal_stops_the_run_and_leaves_the_replay_command(printer, gate):
    terminal, db = printer
    open_gate(gate, 1)
    terminal.read_until(lambda t: "user line 1" in t.text(), "child 1 over")
    terminal.read_until(lambda t: "1/9 children" in t.text(), "the live progress of child 1")
    terminal.proc.send_signal(signal.SIGINT)
    assert terminal.finish() == 4
    (info,) = EventStore(db).runs()
    assert info.outcome == "interrupted"
    lines = terminal.text().splitlines()
    assert lines[1:] == [
        "user line 1",
        "interrupted: stopping the run (running attempts are cancelled)",
        lines[3],
        lines[4],
        f"replay it to go on: threadflow replay {info.run_id} --db {db} "
        "--flow terminal_flows:Printer",
    ], terminal.text()
    assert lines[3].startswith("split        [##------------------] 1/9 children")
    assert lines[4].startswith(f"run {info.run_id}: interrupted in ")
