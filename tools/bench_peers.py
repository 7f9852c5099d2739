"""Peers for ``tools/bench.py --peers``: Dask and OpenStack TaskFlow on no-op tasks.

Neither is a dependency of threadflow; both come from the ``bench`` extra
(``pip install -e '.[bench]'``) and are used only when importable. Each runner returns the
seconds its timed section took; ``tools/bench.py`` calls it in a fresh process.
"""

from __future__ import annotations

import importlib.util
import time
from typing import Any

#: Peer name -> the top-level module that must be importable for it to run.
MODULES = {"dask": "distributed", "taskflow": "taskflow"}


def installed(peer: str) -> bool:
    """Whether ``peer`` can be imported here (looked up without importing it)."""
    return importlib.util.find_spec(MODULES[peer]) is not None


def noop(*args: Any) -> None:
    return None


def run_dask(n: int, concurrency: int) -> float:
    """``client.map`` + ``client.gather`` of ``n`` no-op calls on an in-process cluster.

    One worker with ``concurrency`` threads (``processes=False``), so the work runs in threads
    of this process as with the others. Starting and closing the cluster is not timed.
    """
    from dask.distributed import Client, LocalCluster

    with (
        LocalCluster(
            processes=False, n_workers=1, threads_per_worker=concurrency, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        start = time.perf_counter()
        futures = client.map(noop, range(n), pure=False)
        client.gather(futures)
        return time.perf_counter() - start


def run_taskflow(n: int, concurrency: int) -> float:
    """OpenStack TaskFlow: ``n`` no-op tasks in an unordered flow on the parallel engine.

    Timed: building the flow, loading (compiling) the engine and running it, with the default
    in-memory persistence (TaskFlow writes no durable log unless given a backend).
    """
    from taskflow import engines
    from taskflow import task as tf_task
    from taskflow.patterns import unordered_flow

    class Noop(tf_task.Task):  # type: ignore[misc]
        def execute(self) -> None:
            return None

    start = time.perf_counter()
    flow = unordered_flow.Flow("bench")
    flow.add(*[Noop(name=f"noop-{i}") for i in range(n)])
    engine = engines.load(flow, engine="parallel", executor="threaded", max_workers=concurrency)
    engine.run()
    return time.perf_counter() - start


RUNNERS = {"dask": run_dask, "taskflow": run_taskflow}
