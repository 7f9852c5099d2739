"""No-op children per second: threadflow against raw ThreadPoolExecutor.map, same run.

    python tools/bench_children.py [--children 100000] [--concurrency 10] [--rounds 2]
    python tools/bench_children.py --memory 200000


Each round runs raw ``ThreadPoolExecutor(max_workers=C).map`` over the same number of no-op
items, then a threadflow flow whose parent adds that many no-op children (every child's
``child_added``, ``task_started`` and ``task_over`` events committed to a fresh store in a
temporary directory). Rounds interleave the two so that a noisy machine hurts both alike. The
ratio is threadflow's throughput over raw threads'.

``--memory N`` runs only threadflow with N children in a fresh process and prints its peak RSS
(raw ``ThreadPoolExecutor.map`` makes every Future up front, so its peak would hide ours).
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from threadflow import ALL_OVER, Flow, add_children_tasks, task


def noop(*args: Any) -> None:
    return None


def add_many(state: Any) -> None:
    add_children_tasks(((i, None) for i in range(state["n"])), state)


def make_flow(concurrency: int) -> type[Flow]:
    class Bench(Flow, server_name=f"bench-{concurrency}"):
        many = task(
            task_func=add_many, child_task_func=noop, max_concurrency=concurrency, next=ALL_OVER
        )

    return Bench


def raw(n: int, concurrency: int) -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for _ in pool.map(noop, range(n)):
            pass
    return time.perf_counter() - start


def flow(bench: type[Flow], n: int, directory: str, round_no: int) -> float:
    store = os.path.join(directory, f"bench-{round_no}.db")
    start = time.perf_counter()
    result = bench.run(store=store, n=n)
    elapsed = time.perf_counter() - start
    assert result.outcome == "all_over", result
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--children", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--memory", type=int, metavar="N", help="peak RSS with N children")
    parser.add_argument("--flow-only", type=int, metavar="N", help=argparse.SUPPRESS)
    args = parser.parse_args()
    n, c = args.children, args.concurrency
    if args.flow_only:
        with tempfile.TemporaryDirectory() as directory:
            elapsed = flow(make_flow(c), args.flow_only, directory, 0)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"{args.flow_only} no-op children, max_concurrency={c}, threadflow alone")
        print(f"  throughput: {args.flow_only / elapsed:,.0f} /s  ({elapsed:.2f} s)")
        print(f"  peak RSS:   {peak:.0f} MB")
        return
    if args.memory:
        cmd = [sys.executable, __file__, "--flow-only", str(args.memory), "--concurrency", str(c)]
        subprocess.run(cmd, check=True)
        return
    bench = make_flow(c)
    raw_times, flow_times = [], []
    with tempfile.TemporaryDirectory() as directory:
        for round_no in range(args.rounds):
            raw_times.append(raw(n, c))
            flow_times.append(flow(bench, n, directory, round_no))
    raw_best, flow_best = min(raw_times), min(flow_times)
    print(f"{n} no-op children, max_concurrency={c}, best of {args.rounds} rounds")
    print(f"  raw ThreadPoolExecutor.map: {n / raw_best:10,.0f} /s  ({raw_best:.2f} s)")
    print(f"  threadflow (durable log):   {n / flow_best:10,.0f} /s  ({flow_best:.2f} s)")
    print(f"  ratio threadflow / raw:     {raw_best / flow_best:10.2f}")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"  peak RSS of this process:   {peak_mb:10.0f} MB")


if __name__ == "__main__":
    main()
