"""No-op children in ONE process: raw ThreadPoolExecutor.map and threadflow, alternating.

    python tools/bench_inprocess.py [--children 20000 100000] [--rounds 3] [--concurrency 10]

tools/bench.py gives every measurement a fresh interpreter; an app runs its flows in a process
that has done other work already. This runs, in one process and without a warm-up, raw
``ThreadPoolExecutor(C).map`` and a threadflow stage of the same no-op children
(``max_concurrency=C``, ``task_retry_limit=1``, a fresh store each run, full durable log),
alternating, and prints each round's children per second and the ratio to raw map measured in
the same round. The machine is noisy: read the medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from threadflow import ALL_OVER, Flow, add_children_tasks, task


def noop(*_: Any) -> None:
    return None


def add_many(state: Any) -> None:
    add_children_tasks(((i, None) for i in range(state["n"])), state)


def make_flow(concurrency: int) -> type[Flow]:
    class NoOps(Flow):
        stage = task(
            task_func=add_many,
            child_task_func=noop,
            max_concurrency=concurrency,
            task_retry_limit=1,
            next=ALL_OVER,
        )

    return NoOps


def raw(n: int, concurrency: int) -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for _ in pool.map(noop, range(n)):
            pass
    return time.perf_counter() - start


def flow(cls: type[Flow], n: int, directory: str, name: str) -> float:
    start = time.perf_counter()
    result = cls.run(store=os.path.join(directory, name), inputs={"n": n})
    took = time.perf_counter() - start
    assert result.outcome == "all_over", result
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--children", type=int, nargs="+", default=[20_000, 100_000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=10)
    args = parser.parse_args()
    cls = make_flow(args.concurrency)
    with tempfile.TemporaryDirectory() as directory:
        for n in args.children:
            ratios = []
            for r in range(args.rounds):
                # Alternate which goes first, so that drift hurts both alike.
                if r % 2:
                    t_flow = flow(cls, n, directory, f"{n}-{r}.db")
                    t_raw = raw(n, args.concurrency)
                else:
                    t_raw = raw(n, args.concurrency)
                    t_flow = flow(cls, n, directory, f"{n}-{r}.db")
                ratio = t_raw / t_flow
                ratios.append(ratio)
                print(
                    f"{n:>9,} children round {r + 1}: raw {n / t_raw:>9,.0f}/s  "
                    f"threadflow {n / t_flow:>9,.0f}/s  ratio {ratio:.2f}x"
                )
            print(f"{n:>9,} children: median ratio {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
