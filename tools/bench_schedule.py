"""How late scheduled runs start, on the real clock: lateness of each run's start after its tick.

    python tools/bench_schedule.py [--every 0.2] [--ticks 20] [--cron]

Schedules a no-op flow with ``every=`` (or, with ``--cron``, the 6-field cron expression
``* * * * * *``: every second) on a fresh store, and waits for ``--ticks`` runs. For each run,
the lateness is its ``start_time`` (taken when ``start_flow`` accepted it) minus its tick
(``scheduled_at``): the scheduler's wake-up, its decision in the store (one write transaction)
and the start of the run. Prints the mean, the median and the largest lateness, and how many
ticks were fired, skipped or missed.
"""

from __future__ import annotations

import argparse
import datetime
import os
import queue
import statistics
import tempfile
from collections import Counter
from typing import Any

from threadflow import ALL_OVER, EventStore, Flow, RunResult, task


def nothing(state: Any) -> None:
    return None


class Tick(Flow, server_name="bench-schedule"):
    go = task(task_func=nothing, next=ALL_OVER)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=float, default=0.2, help="seconds between ticks")
    parser.add_argument("--ticks", type=int, default=20, help="runs to wait for")
    parser.add_argument("--cron", action="store_true", help="cron '* * * * * *' instead")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "bench.db")
        results: queue.Queue[RunResult] = queue.Queue()
        late: list[float] = []
        with Tick.start_link(store=path, return_to=results) as server:
            when = {"cron": "* * * * * *"} if args.cron else {"every": args.every}
            with Tick.schedule(server=server, **when):  # type: ignore[arg-type]
                for _ in range(args.ticks):
                    result = results.get(timeout=60)
                    tick = datetime.datetime.fromisoformat(result.state["scheduled_at"])
                    late.append((result.state["start_time"] - tick).total_seconds())
        decisions = Counter(t.decision for t in EventStore(path).ticks())

    what = "cron '* * * * * *'" if args.cron else f"every={args.every:g}"
    ms = [x * 1000 for x in late]
    print(f"{what}: {len(ms)} runs; lateness of the run's start after its tick (ms):")
    print(
        f"  mean {statistics.mean(ms):.2f}  median {statistics.median(ms):.2f}  "
        f"max {max(ms):.2f}  min {min(ms):.2f}"
    )
    print("  ticks: " + ", ".join(f"{k} {v}" for k, v in sorted(decisions.items())))


if __name__ == "__main__":
    main()
