"""How cheap ``RunHandle.progress()`` is: calls per second on a big run, while it runs and after.

    python tools/bench_progress.py [--children 100000]

Runs a flow whose parent adds N no-op children, ten at a time (about 3 N events). While it
runs, the main thread calls ``handle.progress()`` in a loop, as a GUI timer would if it never
slept: it prints how many calls a second, and the slowest call. Then, on the finished run, a
fresh handle: the first call (which folds the whole log, SQLite counting its bulk) and the calls
after it (which read only what was written since: nothing). The last child fails, so the run
ends ``failed_over``; then it is replayed, and the first call on the replay's handle shows the
earlier segment's children counted.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Any

from threadflow import ALL_OVER, EventStore, Flow, RunHandle, add_children_tasks, task


def add_many(state: Any) -> None:
    add_children_tasks(((i, None) for i in range(state["n"])), state)


def child(item: Any, state: Any) -> None:
    if item[0] == state["n"] - 1 and not state.get("fixed"):
        raise ValueError("the last child fails until it is fixed")


class Big(Flow, server_name="bench-progress"):
    many = task(
        task_func=add_many,
        child_task_func=child,
        max_concurrency=10,
        task_retry_limit=1,
        next=ALL_OVER,
    )


def timed_calls(handle: RunHandle, seconds: float | None = None) -> tuple[int, float, float]:
    """Call ``progress()`` until the run ends (or for ``seconds``): calls, elapsed, slowest."""
    calls, slowest = 0, 0.0
    start = time.perf_counter()
    while True:
        before = time.perf_counter()
        handle.progress()
        slowest = max(slowest, time.perf_counter() - before)
        calls += 1
        elapsed = time.perf_counter() - start
        if (seconds is None and handle.done()) or (seconds is not None and elapsed >= seconds):
            return calls, elapsed, slowest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--children", type=int, default=100_000)
    n = parser.parse_args().children
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "progress.db")
        with Big.start_link(store=path, n=n) as server:
            handle = server.start_flow()
            calls, elapsed, slowest = timed_calls(handle)
            result = handle.result()
        events = sum(1 for _ in EventStore(path).iter_events(result.run_id))
        print(f"run: {result.outcome}, {events:,} events, {elapsed:.1f} s")
        print(
            f"while it ran: {calls:,} calls, {calls / elapsed:,.0f} calls/s, "
            f"slowest {slowest * 1000:.1f} ms"
        )
        fresh = RunHandle(result.run_id, None, EventStore(path))
        before = time.perf_counter()
        first = fresh.progress()
        print(
            f"after: first call {(time.perf_counter() - before) * 1000:.0f} ms "
            f"({first.done:,} done, {first.failed} failed)"
        )
        calls, elapsed, slowest = timed_calls(fresh, 2.0)
        print(f"after: {calls / elapsed:,.0f} calls/s, slowest {slowest * 1000:.1f} ms")
        with Big.start_link(store=path, n=n, fixed=True) as server:
            handle = server.replay(result.run_id)
            before = time.perf_counter()
            first = handle.progress()
            took = time.perf_counter() - before
            handle.result()
        print(
            f"replay: first call {took * 1000:.0f} ms, {first.done:,} of {first.total:,} "
            "children already done"
        )


if __name__ == "__main__":
    main()
