"""How closely ``task(rate_limit=...)`` keeps its pace: observed rate, burst and smallest gap.

    python tools/bench_rate.py                       # 20/s for 10 s, 200/s for 5 s, 120/m for 10 s
    python tools/bench_rate.py --case 50/s:4 --case 1000/s:2
    python tools/bench_rate.py --quick               # each case for a fifth of its time

Each case runs a flow whose one task adds enough no-op children for the duration, with
``max_concurrency=10`` and the rate limit, on a fresh store, twice:

* on the server's own threads; each child notes the real monotonic time when it begins
  (``child``: what the work sees, a thread's pick-up delay included), and the log's
  ``task_started`` stamps are read back (``log``: stamped per coordinator turn, so they may be
  up to ``STAMP_REUSE``, 1 ms, early);
* in a ``ThreadPoolExecutor`` given to ``start_link(executor=...)`` whose ``submit`` notes the
  time (``submit``: the moment the coordinator starts an attempt, which is what the limit paces).

For each series: the observed rate ``(starts - 1) / (last - first)`` and its error against the
limit in %, the burst (the most starts in any half-open window of length 1/rate: 1 means no
burst), the smallest gap between two starts, and the CPU the process used per second of the run
(the coordinator sleeps between starts: no busy wait).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import os
import platform
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import threadflow
from threadflow import ALL_OVER, EventStore, Flow, add_children_tasks, task
from threadflow.definition import rate_interval
from threadflow.events import ts_seconds

DEFAULT_CASES = ("20/s:10", "200/s:5", "120/m:10")

#: Real monotonic seconds at which each child began, appended by the children.
began: list[float] = []


def add_children(state: Any) -> None:
    add_children_tasks(((i, None) for i in range(state["n"])), state)


def note_start(child: Any, state: Any) -> None:
    began.append(time.monotonic())


class StampedPool(cf.ThreadPoolExecutor):
    """A thread pool that notes when each work item is submitted to it."""

    def __init__(self, max_workers: int) -> None:
        super().__init__(max_workers)
        self.submitted: list[float] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future[Any]:
        self.submitted.append(time.monotonic())
        return super().submit(fn, *args, **kwargs)


def flow_for(rate: str) -> type[Flow]:
    class Paced(Flow, server_name=f"bench-rate-{rate}"):
        fetch = task(
            task_func=add_children,
            child_task_func=note_start,
            max_concurrency=10,
            rate_limit=rate,
            next=ALL_OVER,
        )

    return Paced


def figures(times: list[float], interval: float) -> dict[str, float]:
    times = sorted(times)
    span = times[-1] - times[0]
    rate = (len(times) - 1) / span
    burst, j = 1, 0
    for i, t in enumerate(times):  # the most starts in [t, t + interval)
        j = max(j, i)
        while j + 1 < len(times) and times[j + 1] < t + interval:
            j += 1
        burst = max(burst, j - i + 1)
    gap = min(b - a for a, b in zip(times, times[1:], strict=False))
    return {
        "starts": len(times),
        "rate": rate,
        "error": (rate * interval - 1) * 100,
        "burst": burst,
        "min_gap_ms": gap * 1000,
    }


def run_case(rate: str, seconds: float, folder: str) -> list[tuple[str, dict[str, float], float]]:
    interval = rate_interval(rate)
    assert interval is not None, rate
    n = int(seconds / interval) + 1
    flow = flow_for(rate)
    rows = []

    path = os.path.join(folder, f"own-{rate.replace('/', '_')}.db")
    began.clear()
    cpu, wall = time.process_time(), time.monotonic()
    result = flow.run(store=path, n=n)
    cpu_share = (time.process_time() - cpu) / (time.monotonic() - wall)
    assert result.outcome == "all_over", result.error
    rows.append(("child", figures(list(began), interval), cpu_share))
    stamps = [
        ts_seconds(e.ts)
        for e in EventStore(path).events(result.run_id, "task_started")
        if e.child_id is not None
    ]
    rows.append(("log", figures(stamps, interval), cpu_share))

    path = os.path.join(folder, f"executor-{rate.replace('/', '_')}.db")
    with StampedPool(10) as pool:
        cpu, wall = time.process_time(), time.monotonic()
        result = flow.run(store=path, executor=pool, n=n)
        cpu_share = (time.process_time() - cpu) / (time.monotonic() - wall)
        assert result.outcome == "all_over", result.error
        # The first submission is the parent's; the children's follow.
        rows.append(("submit", figures(pool.submitted[1:], interval), cpu_share))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--case",
        action="append",
        metavar="RATE:SECONDS",
        help=f"a rate limit and how long to run it (default: {' '.join(DEFAULT_CASES)})",
    )
    parser.add_argument("--quick", action="store_true", help="each case for a fifth of its time")
    args = parser.parse_args()
    cases = []
    for case in args.case or DEFAULT_CASES:
        rate, _, seconds = case.rpartition(":")
        cases.append((rate, float(seconds) / (5 if args.quick else 1)))

    print(
        f"{datetime.date.today()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"SQLite {sqlite3.sqlite_version}, {platform.system()} {platform.machine()}, "
        f"threadflow {threadflow.__version__}"
    )
    header = (
        f"{'limit':>8} {'s':>4} {'series':>7} {'starts':>6} {'observed /s':>11} "
        f"{'error %':>8} {'burst':>5} {'min gap ms':>10} {'limit gap ms':>12} {'cpu %':>6}"
    )
    print(header)
    worst = 0.0
    bursts = 1
    with tempfile.TemporaryDirectory() as folder:
        for rate, seconds in cases:
            interval = rate_interval(rate)
            assert interval is not None
            for series, f, cpu_share in run_case(rate, seconds, folder):
                print(
                    f"{rate:>8} {seconds:>4g} {series:>7} {f['starts']:>6} {f['rate']:>11.2f} "
                    f"{f['error']:>+8.2f} {f['burst']:>5} {f['min_gap_ms']:>10.3f} "
                    f"{interval * 1000:>12.3f} {cpu_share * 100:>6.1f}"
                )
                if series == "submit":
                    worst = max(worst, abs(f["error"]))
                    bursts = max(bursts, int(f["burst"]))
                sys.stdout.flush()
    met = worst <= 5 and bursts == 1
    print(
        f"[{'met' if met else 'NOT met'}] submissions within 5% of the limit (worst "
        f"{worst:.2f}%) and no burst (largest {bursts})"
    )


if __name__ == "__main__":
    main()
