"""Children that sleep, per second: threadflow's threads, threadflow on Dask, raw Dask.

    python tools/bench_scale.py [--children 10000] [--sleep 0.01] [--concurrency 16]
                                [--workers 2] [--threads 8] [--rounds 1] [--only dask]

Needs the ``dask`` extra (``pip install '.[dask]'``). Four workloads run the same number of
children that each sleep ``--sleep`` seconds:

* ``threads``: threadflow with the server's own threads (``max_concurrency=C``);
* ``dask``: threadflow with a local parent and ``child_executor="dask"``, on a
  ``distributed.LocalCluster`` on loopback with ``--workers`` processes of ``--threads``
  threads each (``max_concurrency=C``, ``client.get_executor(pure=False)``);
* ``raw``: ``client.map`` of the same sleep on the same cluster, with no limit but the
  cluster's threads;
* ``capped``: plain Dask on the same cluster with at most C sleeps at a time, as a Dask program
  would hold a cap: ``as_completed(...).batches()``, each batch replaced by one ``client.map``.
  Each of its tasks waits for a free slot, as threadflow's children do: the round trip from the
  client to a worker and back is paid once per slot turn, not once for all.

Every threadflow run writes its full event log to a fresh store in a temporary directory.
Rounds interleave the workloads; the best round of each is printed, with the ratios.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Any

from threadflow import ALL_OVER, Flow, add_children_tasks, task


def nap(child: Any, state: Any) -> None:
    time.sleep(state["nap"])


def add_many(state: Any) -> None:
    add_children_tasks(((i, None) for i in range(state["n"])), state)


def raw_nap(seconds: float, _: int) -> None:
    time.sleep(seconds)


def make_flows(concurrency: int) -> tuple[type[Flow], type[Flow]]:
    class OnThreads(Flow, server_name="bench-scale-threads"):
        naps = task(
            task_func=add_many, child_task_func=nap, max_concurrency=concurrency, next=ALL_OVER
        )

    class OnDask(Flow, server_name="bench-scale-dask"):
        naps = task(
            task_func=add_many,
            child_task_func=nap,
            max_concurrency=concurrency,
            child_executor="dask",
            next=ALL_OVER,
        )

    return OnThreads, OnDask


def timed_flow(flow: type[Flow], store: str, **kwargs: Any) -> float:
    start = time.perf_counter()
    result = flow.run(store=store, **kwargs)
    elapsed = time.perf_counter() - start
    assert result.outcome == "all_over", result
    return elapsed


def timed_raw(client: Any, n: int, seconds: float) -> float:
    start = time.perf_counter()
    futures = client.map(raw_nap, [seconds] * n, range(n), pure=False)
    client.gather(futures)
    elapsed = time.perf_counter() - start
    del futures
    return elapsed


def timed_capped(client: Any, n: int, seconds: float, cap: int) -> float:
    from distributed import as_completed

    start = time.perf_counter()
    first = min(cap, n)
    done = as_completed(client.map(raw_nap, [seconds] * first, range(first), pure=False))
    sent = first
    for batch in done.batches():
        client.gather(batch)
        more = min(len(batch), n - sent)
        if more:
            done.update(client.map(raw_nap, [seconds] * more, range(sent, sent + more), pure=False))
            sent += more
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--children", type=int, default=10_000)
    parser.add_argument("--sleep", type=float, default=0.01, help="seconds each child sleeps")
    parser.add_argument("--concurrency", type=int, default=16, help="threadflow max_concurrency")
    parser.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes")
    parser.add_argument("--threads", type=int, default=8, help="threads per worker")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "--only",
        choices=("threads", "dask", "raw", "capped"),
        action="append",
        help="run only these",
    )
    args = parser.parse_args()
    only = set(args.only or ("threads", "dask", "raw", "capped"))
    n, c, s = args.children, args.concurrency, args.sleep
    on_threads, on_dask = make_flows(c)
    times: dict[str, list[float]] = {name: [] for name in only}
    client = cluster = None
    if only & {"dask", "raw", "capped"}:
        from distributed import Client, LocalCluster

        cluster = LocalCluster(
            n_workers=args.workers,
            threads_per_worker=args.threads,
            processes=True,
            host="127.0.0.1",
            dashboard_address=":0",  # any free port: 8787 may be taken on the machine
        )
        client = Client(cluster)
    try:
        with tempfile.TemporaryDirectory() as directory:
            for round_no in range(args.rounds):
                if "threads" in only:
                    store = os.path.join(directory, f"threads-{round_no}.db")
                    times["threads"].append(timed_flow(on_threads, store, n=n, nap=s))
                if "dask" in only:
                    assert client is not None
                    store = os.path.join(directory, f"dask-{round_no}.db")
                    executors = {"dask": client.get_executor(pure=False)}
                    times["dask"].append(
                        timed_flow(on_dask, store, executors=executors, n=n, nap=s)
                    )
                if "raw" in only:
                    times["raw"].append(timed_raw(client, n, s))
                if "capped" in only:
                    times["capped"].append(timed_capped(client, n, s, c))
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
    best = {name: min(t) for name, t in times.items()}
    cluster_shape = f"{args.workers} workers x {args.threads} threads"
    labels = {
        "threads": f"threadflow, its own threads (max_concurrency={c})",
        "dask": f"threadflow, children on Dask {cluster_shape} (max_concurrency={c})",
        "raw": f"raw client.map on the same cluster ({cluster_shape})",
        "capped": f"raw Dask on the same cluster, at most {c} at a time",
    }
    cpus = os.cpu_count()
    print(f"{n} children sleeping {s * 1000:g} ms, best of {args.rounds} round(s), {cpus} CPUs")
    width = max(len(label) for label in labels.values())
    for name in ("threads", "dask", "raw", "capped"):
        if name in best:
            t = best[name]
            print(f"  {labels[name]:<{width}} {n / t:8,.0f} /s  ({t:.2f} s)")
    if "threads" in best and "dask" in best:
        label = "ratio: threadflow on Dask / threadflow on its threads"
        print(f"  {label:<{width}} {best['threads'] / best['dask']:8.2f}")
    if "raw" in best and "dask" in best:
        label = "ratio: threadflow on Dask / raw client.map"
        print(f"  {label:<{width}} {best['raw'] / best['dask']:8.2f}")
    if "capped" in best and "dask" in best:
        label = f"ratio: threadflow on Dask / raw Dask at most {c} at a time"
        print(f"  {label:<{width}} {best['capped'] / best['dask']:8.2f}")


if __name__ == "__main__":
    main()
