"""A second process for the tests, and the test side's handle on it.

Run as a script, it is the other process::

    python crash_child.py crash STORE PHASE CHILDREN JOURNAL
        Start a run of ``replay_flows.CrashFlow``; at PHASE (``parent``, ``children``,
        ``stage_callback``, ``stage_parent``) print ``marker`` and block until killed.
    python crash_child.py agree STORE RUN_ID
        Replay run RUN_ID of ``readers_flows.Agree``, committing every turn; when its child 4
        starts, print ``marker`` and block until killed.
    python crash_child.py own STORE FLOW [KEY=VALUE ...]
        Own the global server of ``replay_flows.FLOW`` (extra state entries as given), print
        ``ready``, then read stdin: ``release`` opens the flow's gate; end of input stops it.

Imported, it gives the test a :class:`Child`: the process with a line reader on its stdout that
never waits longer than a guard, and that kills the process when the test is over.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
from typing import Any

SCRIPT = os.path.abspath(__file__)
#: Seconds a test waits for a line from the child before it gives up (a hang guard only).
LINE_GUARD = 20.0


class Child:
    """A child process running this script; a context manager that kills it on exit."""

    def __init__(self, tmp_path: Any, *args: str) -> None:
        fd, self.stderr_path = tempfile.mkstemp(prefix=f"{args[0]}-", suffix=".err", dir=tmp_path)
        self._stderr = os.fdopen(fd, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, SCRIPT, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            cwd=str(tmp_path),
        )
        self.pid = self.proc.pid
        self._buffer = b""

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.kill()

    def stderr(self) -> str:
        with open(self.stderr_path, "rb") as f:
            return f.read().decode(errors="replace")

    def read_line(self, timeout: float = LINE_GUARD) -> str:
        """The next line the child prints; fails if none comes within ``timeout`` seconds."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            ready, _, _ = select.select([fd], [], [], timeout)
            chunk = os.read(fd, 4096) if ready else b""
            if not chunk:
                raise AssertionError(
                    f"child {self.pid} printed no line within {timeout} s (exit code "
                    f"{self.proc.poll()}); its stderr:\n{self.stderr()}"
                )
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def expect(self, line: str) -> None:
        got = self.read_line()
        assert got == line, f"child {self.pid} printed {got!r}, not {line!r}:\n{self.stderr()}"

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def close_stdin(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()

    def wait(self, timeout: float = LINE_GUARD) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL the child and reap it, so that its pid is gone."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(LINE_GUARD)
        for stream in (self.proc.stdin, self.proc.stdout, self._stderr):
            if stream is not None and not stream.closed:
                stream.close()


# --- the child's side ---------------------------------------------------------------------------


def _print(line: str) -> None:
    os.write(1, line.encode() + b"\n")  # one write: the test reads whole lines


def _crash(store: str, phase: str, children: str, journal: str, commit_every: str = "0.02") -> None:
    from replay_flows import CrashFlow

    CrashFlow.commit_every = float(commit_every)  # this process only
    crash = {"phase": phase, "notify": lambda: _print("marker")}
    server = CrashFlow.start_link(store=store, crash=crash, children=int(children), journal=journal)
    result = server.start_flow().result()
    # The test kills this process at the phase; getting here means the phase never came.
    _print(f"ended {result.outcome}")
    server.stop()


def _agree(store: str, run_id: str) -> None:
    from readers_flows import Agree

    Agree.commit_every = 0.0  # this process only
    crash = {"at": 4, "notify": lambda: _print("marker")}
    with Agree.start_link(store=store, crash=crash) as server:
        result = server.replay(run_id).result()
    _print(f"ended {result.outcome}")  # the test kills this process before


def _own(store: str, flow: str, *entries: str) -> None:
    import replay_flows

    extra: dict[str, Any] = dict(entry.split("=", 1) for entry in entries)
    gate = threading.Event()
    server = getattr(replay_flows, flow).start_link(store=store, gate=gate, **extra)
    _print("ready")
    for line in sys.stdin:
        if line.strip() == "release":
            gate.set()
    server.stop()


if __name__ == "__main__":
    command, *arguments = sys.argv[1:]
    {"crash": _crash, "own": _own, "agree": _agree}[command](*arguments)
