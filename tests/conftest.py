"""Fixtures shared by the whole suite: leak checks and a store file per test."""

import threading
import time

import pytest

import threadflow

THREAD_PREFIX = "threadflow-"
LEAK_WAIT = 5.0  # seconds a test's threadflow threads get to end once its servers are stopped


def _threadflow_threads():
    return [t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)]


def _stop_registered_servers():
    # The registry is the library's only module-level state; the lead exposes it for this fixture.
    registered = getattr(threadflow, "_registry_servers", None)
    if registered is None:
        return
    for server in list(registered()):
        server.stop(timeout=LEAK_WAIT)


def _wait_for_threadflow_threads(timeout):
    """Join every threadflow thread within one shared deadline; return the names still alive."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [t for t in _threadflow_threads() if t.is_alive()]
        if not alive or time.monotonic() >= deadline:
            return sorted(t.name for t in alive)
        # Joining is bounded by the deadline; threads started meanwhile are seen on the next turn.
        for thread in alive:
            thread.join(max(0.0, deadline - time.monotonic()))


@pytest.fixture(autouse=True)
def no_threadflow_threads_left():
    """Stop the servers a test left running, then fail it if threadflow threads outlive it."""
    yield
    _stop_registered_servers()
    leftover = _wait_for_threadflow_threads(LEAK_WAIT)
    if leftover:
        pytest.fail(
            f"threadflow threads still alive {LEAK_WAIT} s after the test: {', '.join(leftover)}",
            pytrace=False,
        )


@pytest.fixture
def store_path(tmp_path):
    """Path of a fresh SQLite store file for one test."""
    return str(tmp_path / "runs.db")
