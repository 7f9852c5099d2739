"""How long a replay takes to start on a big log.

    python tools/bench_replay.py [--children 1000000]

Runs a flow whose parent adds N no-op children; the last child fails (``exit_on_failed``), so
the run ends ``failed_over`` with N - 1 children done and about 3 N child events in the log.
Then it replays the run and prints: the time to fold the log and claim the run (``replay()``
returning), the time until the failed child runs again, and the time to the end.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from typing import Any

from threadflow import ALL_OVER, EventStore, Flow, add_children_tasks, task

FIRST_RERUN = threading.Event()
stamps: dict[str, float] = {}


def add_many(state: Any) -> None:
    add_children_tasks(((i, None) for i in range(state["n"])), state)


def child(item: Any, state: Any) -> None:
    if item[0] == state["n"] - 1:
        if state.get("fixed"):
            stamps.setdefault("rerun", time.perf_counter())
            return
        raise ValueError("the last child fails until it is fixed")


class Big(Flow, server_name="bench-replay"):
    many = task(
        task_func=add_many,
        child_task_func=child,
        max_concurrency=10,
        task_retry_limit=1,
        next=ALL_OVER,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--children", type=int, default=1_000_000)
    n = parser.parse_args().children
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "replay.db")
        start = time.perf_counter()
        failed = Big.run(store=path, n=n)
        print(f"first run: {failed.outcome} after {time.perf_counter() - start:.1f} s")
        events = sum(1 for _ in EventStore(path).iter_events(failed.run_id))
        print(f"log: {events:,} events, {os.path.getsize(path) / 1e6:.0f} MB")
        with Big.start_link(store=path, n=n, fixed=True) as server:
            start = time.perf_counter()
            handle = server.replay(failed.run_id)
            claimed = time.perf_counter()
            result = handle.result()
            ended = time.perf_counter()
        print(f"replay(): fold + claim       {claimed - start:6.2f} s")
        print(f"until the failed child ran  {stamps['rerun'] - start:6.2f} s")
        print(f"until the run ended         {ended - start:6.2f} s  ({result.outcome})")


if __name__ == "__main__":
    main()
