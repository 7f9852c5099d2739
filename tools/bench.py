"""threadflow against raw ThreadPoolExecutor.map on the same workloads, each in a fresh process.

    python tools/bench.py                      # every workload, 3 rounds (a few minutes)
    python tools/bench.py --quick              # sizes / 10, one round: a smoke run (~15 s)
    python tools/bench.py --only noop --rounds 5
    python tools/bench.py --peers              # also Dask and OpenStack TaskFlow, if installed
    python tools/bench.py --json results.json --markdown

Every measurement runs in a fresh interpreter (this script with ``--child WORKLOAD IMPL``),
which prints one JSON line: the seconds of the timed section and the process's peak RSS. So
raw ``ThreadPoolExecutor.map``, which makes every Future up front, never hides threadflow's
peak, and no run inherits another's heap. Rounds interleave the implementations (alternating
which goes first) so that a noisy machine hurts both alike; a throughput is reported as the
best and the median of the rounds, a peak RSS as the highest. Each process first runs its
workload with 10 items, untimed, so that one-time costs (the imports ``start_link`` defers)
stay out of throughputs; ``import`` and ``latency`` measure them. Children cache bytecode in a
private directory, as an installed package would.

threadflow runs with its full durable log: every ``child_added``, ``task_started`` and
``task_over`` event is written to a fresh SQLite store (WAL, ``synchronous=NORMAL``, group
commit) in a temporary directory (``--dir`` to choose where).

Workloads (children, max_concurrency C):

* ``noop``: 100k no-op children, C=10.
* ``sleep-c10``, ``sleep-c100``: 10k children that each sleep 1 ms, C=10 and C=100.
* ``dag``: ``a -> [b, c] -> d``; b, c and d each add 5k no-op children (C=10 each). Raw: the
  same three batches of ``map`` in order, b and c at once on two executors.
* ``million``: 1M no-op children, C=10: memory when children are streamed.
* ``scale`` (with ``--peers``, or ``--only scale``): 10k children sleeping 10 ms on a Dask
  ``LocalCluster`` (2 workers x 8 threads) against threadflow's own threads and raw
  ``client.map`` (``tools/bench_scale.py``).
* ``peer-dask``, ``peer-taskflow`` (``--peers``): 10k and 2k no-op tasks, C=10, with raw and
  threadflow at the same size.

Measurements of threadflow alone:

* ``timeout``: children that wait on their cancel token with ``task_timeout=0.05`` run beside a
  stage of 100k no-op children; for each ``timeout`` event written while that stage runs, the
  gap between the attempt's deadline (its ``task_started`` ts + 0.05 s) and the event's ts.
  Event ts are stamped once per coordinator turn, so this gap is an upper bound; the gap seen
  by the hanging worker (start to wake-up, minus 0.05 s) is printed beside it.
* ``import``: ``python -c "import threadflow"`` minus ``python -c pass`` (median of 7 pairs),
  and the cumulative time ``python -X importtime`` reports for ``threadflow``.
* ``latency``: a one-task flow from ``start_link()`` to its ``RunResult`` (median of 50), with a
  new store file each time and with one reused store.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import bench_peers

RAW, TF = "raw", "threadflow"
#: Seconds each hanging child may run, in the ``timeout`` measurement.
HANG_TIMEOUT = 0.05


@dataclass(frozen=True)
class Workload:
    """A workload run by several implementations; ``n`` is children per stage."""

    name: str
    n: int
    c: int
    impls: tuple[str, ...]
    about: str
    stages: int = 1
    peer: bool = False

    def size(self, quick: bool) -> int:
        return max(1, self.n // 10) if quick else self.n

    def children(self, quick: bool) -> int:
        return self.size(quick) * self.stages


WORKLOADS = {
    w.name: w
    for w in (
        Workload("noop", 100_000, 10, (RAW, TF), "no-op children"),
        Workload("sleep-c10", 10_000, 10, (RAW, TF), "children sleeping 1 ms"),
        Workload("sleep-c100", 10_000, 100, (RAW, TF), "children sleeping 1 ms"),
        Workload("dag", 5_000, 10, (RAW, TF), "a -> [b, c] -> d, no-op children", stages=3),
        Workload("million", 1_000_000, 10, (RAW, TF), "no-op children (memory)"),
        Workload("peer-dask", 10_000, 10, (RAW, TF, "dask"), "no-op tasks", peer=True),
        Workload("peer-taskflow", 2_000, 10, (RAW, TF, "taskflow"), "no-op tasks", peer=True),
    )
}
MEASURES = ["timeout", "import", "latency"]


# -- work done by children and tasks (module level: the same functions for every impl) --------


def noop(*args: Any) -> None:
    return None


def nap(*args: Any) -> None:
    time.sleep(0.001)


def add_many(state: Any) -> None:
    from threadflow import add_children_tasks

    add_children_tasks(((i, None) for i in range(state["n"])), state)


# -- one measurement, in this (fresh) process -------------------------------------------------


def peak_mb() -> float:
    """Peak RSS of this process so far, in MB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def raw_map(fn: Callable[..., Any], n: int, c: int) -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=c) as pool:
        for _ in pool.map(fn, range(n)):
            pass
    return time.perf_counter() - start


def raw_dag(n: int, c: int) -> float:
    start = time.perf_counter()
    noop()  # a
    with ThreadPoolExecutor(max_workers=c) as pool_b, ThreadPoolExecutor(max_workers=c) as pool_c:
        # map() submits everything at once, so b and c run together.
        b, c_ = pool_b.map(noop, range(n)), pool_c.map(noop, range(n))
        for _ in b:
            pass
        for _ in c_:
            pass
        for _ in pool_b.map(noop, range(n)):  # d
            pass
    return time.perf_counter() - start


def flow_children(child: Callable[..., Any], n: int, c: int, store: str) -> float:
    from threadflow import ALL_OVER, Flow, task

    class Children(Flow, server_name="bench-children"):
        many = task(task_func=add_many, child_task_func=child, max_concurrency=c, next=ALL_OVER)

    start = time.perf_counter()
    result = Children.run(store=store, n=n)
    elapsed = time.perf_counter() - start
    if result.outcome != "all_over":
        raise SystemExit(f"the flow ended {result!r}")
    return elapsed


def flow_dag(n: int, cap: int, store: str) -> float:
    from threadflow import ALL_OVER, Flow, task

    # (not `c`: the class body assigns its own `c`)
    class Dag(Flow, server_name="bench-dag"):
        a = task(task_func=noop, next=["b", "c"])
        b = task(task_func=add_many, child_task_func=noop, max_concurrency=cap, next="d")
        c = task(task_func=add_many, child_task_func=noop, max_concurrency=cap, next="d")
        d = task(task_func=add_many, child_task_func=noop, max_concurrency=cap, next=ALL_OVER)

    start = time.perf_counter()
    result = Dag.run(store=store, n=n)
    elapsed = time.perf_counter() - start
    if result.outcome != "all_over":
        raise SystemExit(f"the flow ended {result!r}")
    return elapsed


def measure(work: Workload, impl: str, quick: bool, directory: str) -> dict[str, Any]:
    n, c = work.size(quick), work.c
    child = nap if work.name.startswith("sleep") else noop
    store = os.path.join(directory, "bench.db")
    # Pay the process's one-time costs (lazy imports, the first start_link) before timing:
    # they are measured on their own, by `import` and `latency`.
    if impl == RAW:
        raw_map(noop, 10, c)
    elif impl == TF:
        flow_children(noop, 10, c, os.path.join(directory, "warm-up.db"))
    base = peak_mb()
    if impl == RAW:
        elapsed = raw_dag(n, c) if work.name == "dag" else raw_map(child, n, c)
    elif impl == TF:
        if work.name == "dag":
            elapsed = flow_dag(n, c, store)
        else:
            elapsed = flow_children(child, n, c, store)
    else:
        elapsed = bench_peers.RUNNERS[impl](n, c)
    out = {"elapsed": elapsed, "peak_mb": peak_mb(), "base_mb": base}
    if impl == TF:
        out["store_mb"] = sum(
            os.path.getsize(os.path.join(directory, f))
            for f in os.listdir(directory)
            if f.startswith("bench.db")
        ) / (1024 * 1024)
    return out


def measure_timeout(quick: bool, directory: str) -> dict[str, Any]:
    """Timeout gaps of hanging children while a sibling stage runs 100k no-op children."""
    import threadflow
    from threadflow import ALL_OVER, Flow, task

    n = 10_000 if quick else 100_000
    # One chunk (CHUNK is 1,000): the parent adding them has the 50 ms timeout too. With three
    # attempts each, five at a time, they outlast the load (which then lets them finish).
    hangers = 100 if quick else 1_000
    hanging = threading.Event()
    load_done = threading.Event()
    worker_gaps: list[float] = []  # seconds from deadline to wake-up, seen by the worker

    def add_hangers(state: Any) -> None:
        threadflow.add_children_tasks(((i, None) for i in range(hangers)), state)

    def add_load(state: Any) -> None:
        # Start the load once children hang: the parent of `hang` has the 50 ms timeout too,
        # and adding its children must not wait behind 100k others.
        hanging.wait(60)
        add_many(state)

    def wait_for_cancel(child: Any, state: Any) -> None:
        if load_done.is_set():
            return  # the load is over: finish quickly
        token = threadflow.current_token()
        start = time.monotonic()
        hanging.set()
        try:
            token.wait(None)
        except threadflow.CancelledError:
            now = time.monotonic()
            if not load_done.is_set():
                worker_gaps.append(now - start - HANG_TIMEOUT)
            raise

    class Timeouts(Flow, server_name="bench-timeout"):
        root = task(task_func=noop, next=["hang", "load"])
        # A parent that times out on a busy machine is retried, not fatal.
        hang = task(
            task_func=add_hangers,
            child_task_func=wait_for_cancel,
            max_concurrency=5,
            task_timeout=HANG_TIMEOUT,
            task_retry_limit=3,
            exit_on_failed=False,
            next=ALL_OVER,
        )
        load = task(task_func=add_load, child_task_func=noop, max_concurrency=10, next=ALL_OVER)

        def handle_task_all_over(self, task: tuple[Any, ...], state: dict[str, Any]) -> None:
            if task == ("load",):
                load_done.set()

    store = os.path.join(directory, "bench.db")
    start = time.perf_counter()
    result = Timeouts.run(store=store, n=n)
    elapsed = time.perf_counter() - start
    if result.outcome != "all_over":
        raise SystemExit(f"the flow ended {result!r}")
    conn = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    try:
        (load_over,) = conn.execute(
            "SELECT seq FROM events WHERE run_id = ? AND kind = 'task_all_over' AND task = 'load'",
            (result.run_id,),
        ).fetchone()
        started = {
            (ref, attempt): ts
            for ref, attempt, ts in conn.execute(
                "SELECT ref, attempt, ts FROM events "
                "WHERE run_id = ? AND kind = 'task_started' AND task = 'hang'",
                (result.run_id,),
            )
        }
        log_gaps = []
        for seq, ref, attempt, ts in conn.execute(
            "SELECT seq, ref, attempt, ts FROM events "
            "WHERE run_id = ? AND kind = 'timeout' AND task = 'hang'",
            (result.run_id,),
        ):
            if seq > load_over:
                continue
            began = datetime.datetime.fromisoformat(started[(ref, attempt)])
            fired = datetime.datetime.fromisoformat(ts)
            log_gaps.append((fired - began).total_seconds() - HANG_TIMEOUT)
    finally:
        conn.close()
    return {
        "elapsed": elapsed,
        "peak_mb": peak_mb(),
        "load_children": n,
        "log_gaps_ms": [g * 1000 for g in log_gaps],
        "worker_gaps_ms": [g * 1000 for g in worker_gaps],
    }


def measure_latency(quick: bool, directory: str) -> dict[str, Any]:
    """start_link() to RunResult of a one-task flow: a new store each time, and a reused one."""
    from threadflow import ALL_OVER, Flow, task

    class One(Flow, server_name="bench-one"):
        only = task(task_func=noop, next=ALL_OVER)

    def once(path: str) -> float:
        start = time.perf_counter()
        server = One.start_link(store=path)
        result = server.start_flow().result()
        elapsed = time.perf_counter() - start
        server.stop()
        if result.outcome != "all_over":
            raise SystemExit(f"the flow ended {result!r}")
        return elapsed * 1000

    k = 10 if quick else 50
    first = once(os.path.join(directory, "first.db"))  # pays the lazy imports of start_link
    fresh = [once(os.path.join(directory, f"one-{i}.db")) for i in range(k)]
    reused_path = os.path.join(directory, "reused.db")
    reused = [once(reused_path) for _ in range(k)]
    return {"first_ms": first, "fresh_ms": fresh, "reused_ms": reused, "peak_mb": peak_mb()}


def child_main(name: str, impl: str, quick: bool, parent_dir: str | None) -> None:
    with tempfile.TemporaryDirectory(prefix="threadflow-bench-", dir=parent_dir) as directory:
        if name == "warm-up":  # fills the bytecode cache
            flow_children(noop, 10, 2, os.path.join(directory, "bench.db"))
            out: dict[str, Any] = {}
        elif name == "timeout":
            out = measure_timeout(quick, directory)
        elif name == "latency":
            out = measure_latency(quick, directory)
        else:
            out = measure(WORKLOADS[name], impl, quick, directory)
    print(json.dumps(out))


# -- the parent: spawn, collect, summarise ----------------------------------------------------


class Failed(Exception):
    """A measurement's process failed; the others go on."""


def spawn(name: str, impl: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, impl]
    if args.quick:
        cmd.append("--quick")
    if args.dir:
        cmd += ["--dir", args.dir]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env=args.env)
    if proc.returncode != 0:
        raise Failed(
            f"{name} {impl} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))]


def spread(values: list[float]) -> dict[str, float]:
    if not values:
        return {"count": 0}
    return {
        "count": len(values),
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
        "max": max(values),
    }


def child_env(cache: str) -> dict[str, str]:
    """The environment of every child: bytecode cached (in ``cache``), as once installed.

    Without a cache each process would compile threadflow again, which an installed package
    never does; a private cache directory leaves the source tree untouched.
    """
    env = dict(os.environ, PYTHONPYCACHEPREFIX=cache)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def time_command(code: str, env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    return (time.perf_counter() - start) * 1000


def importtime_ms(env: dict[str, str]) -> float:
    """Cumulative import time of ``threadflow`` as ``python -X importtime`` reports it."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import threadflow"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    for line in proc.stderr.splitlines():
        fields = [f.strip() for f in line.split("|")]
        if len(fields) == 3 and fields[2] == "threadflow":
            return int(fields[1]) / 1000
    raise SystemExit("python -X importtime did not report threadflow")


def measure_import(pairs: int, env: dict[str, str]) -> dict[str, Any]:
    bare, loaded, cumulative = [], [], []
    for _ in range(pairs):
        bare.append(time_command("pass", env))
        loaded.append(time_command("import threadflow", env))
        cumulative.append(importtime_ms(env))
    return {"bare_ms": bare, "import_ms": loaded, "importtime_ms": cumulative}


def summarise(work: Workload, runs: dict[str, list[dict[str, Any]]], quick: bool) -> dict[str, Any]:
    n = work.children(quick)
    out: dict[str, Any] = {"children": n, "concurrency": work.c, "about": work.about, "impls": {}}
    raw = runs.get(RAW)
    for impl, rows in runs.items():
        if not rows or "skipped" in rows[0]:
            out["impls"][impl] = {"skipped": rows[0]["skipped"] if rows else "not run"}
            continue
        times = [r["elapsed"] for r in rows]
        best, median = min(times), statistics.median(times)
        entry: dict[str, Any] = {
            "seconds": times,
            "best_per_s": n / best,
            "median_per_s": n / median,
            "us_per_child": best / n * 1e6,
            "peak_mb": max(r["peak_mb"] for r in rows),
            "base_mb": max(r["base_mb"] for r in rows),
        }
        if "store_mb" in rows[0]:
            entry["store_mb"] = max(r["store_mb"] for r in rows)
        if raw and impl != RAW and "skipped" not in raw[0]:
            raw_times = [r["elapsed"] for r in raw]
            entry["overhead_us"] = (best - min(raw_times)) / n * 1e6
            entry["ratio_best"] = min(raw_times) / best
            entry["ratio_median"] = statistics.median(raw_times) / median
        out["impls"][impl] = entry
    return out


def run_workload(work: Workload, rounds: int, args: argparse.Namespace) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {impl: [] for impl in work.impls}
    for impl in work.impls:
        if impl in bench_peers.MODULES and not bench_peers.installed(impl):
            runs[impl].append({"skipped": "not installed"})
    for round_no in range(rounds):
        # Alternate who goes first, so that neither always runs on a warmer machine.
        for impl in work.impls if round_no % 2 == 0 else work.impls[::-1]:
            if runs[impl] and "skipped" in runs[impl][0]:
                continue
            row = spawn(work.name, impl, args)
            runs[impl].append(row)
            note(
                f"{work.name} {impl} round {round_no + 1}/{rounds}: {row['elapsed']:.3f} s, "
                f"peak {row['peak_mb']:.0f} MB"
            )
    return summarise(work, runs, args.quick)


def run_timeout(rounds: int, args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for round_no in range(rounds):
        rows.append(spawn("timeout", TF, args))
        note(f"timeout round {round_no + 1}/{rounds}: {len(rows[-1]['log_gaps_ms'])} timeouts")
    return {
        "load_children": rows[0]["load_children"],
        "log_ms": spread([g for r in rows for g in r["log_gaps_ms"]]),
        "worker_ms": spread([g for r in rows for g in r["worker_gaps_ms"]]),
    }


def run_import(args: argparse.Namespace) -> dict[str, Any]:
    samples = measure_import(3 if args.quick else 7, args.env)
    note("import measured")
    return {
        "import_ms": statistics.median(samples["import_ms"])
        - statistics.median(samples["bare_ms"]),
        "importtime_ms": statistics.median(samples["importtime_ms"]),
        "samples": samples,
    }


def run_latency(rounds: int, args: argparse.Namespace) -> dict[str, Any]:
    rows = [spawn("latency", TF, args) for _ in range(rounds)]
    note("latency measured")
    fresh = [v for r in rows for v in r["fresh_ms"]]
    reused = [v for r in rows for v in r["reused_ms"]]
    return {
        "first_ms": statistics.median(r["first_ms"] for r in rows),
        "fresh_median_ms": statistics.median(fresh),
        "fresh_p90_ms": percentile(fresh, 90),
        "reused_median_ms": statistics.median(reused),
        "reused_p90_ms": percentile(reused, 90),
    }


def run_scale(args: argparse.Namespace) -> dict[str, Any]:
    """Children sleeping 10 ms on a Dask LocalCluster: ``tools/bench_scale.py``, as it prints."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_scale.py")
    size = ["--children", "1000"] if args.quick else []
    out = subprocess.run(
        [sys.executable, script, *size], env=args.env, capture_output=True, text=True, check=True
    ).stdout
    print(out, end="", flush=True)
    return {"output": out}


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    if args.only:
        names = [args.only]
    else:
        names = [w.name for w in WORKLOADS.values() if args.peers or not w.peer]
        names += MEASURES
        if args.peers:
            names.append("scale")
    rounds = args.rounds or (1 if args.quick else 3)
    results: dict[str, Any] = {"rounds": rounds, "workloads": {}, "measures": {}}
    errors: dict[str, str] = {}
    results["errors"] = errors
    with tempfile.TemporaryDirectory(prefix="threadflow-bench-pyc-") as cache:
        args.env = child_env(cache)
        try:
            spawn("warm-up", TF, args)
        except Failed as exc:
            raise SystemExit(str(exc)) from None
        run_names(names, rounds, args, results)
    return results


def run_names(names: list[str], rounds: int, args: argparse.Namespace, results: Any) -> None:
    errors = results["errors"]
    for name in names:
        try:
            if name in WORKLOADS:
                results["workloads"][name] = run_workload(WORKLOADS[name], rounds, args)
            elif name == "timeout":
                results["measures"][name] = run_timeout(rounds, args)
            elif name == "import":
                results["measures"][name] = run_import(args)
            elif name == "scale":
                results["measures"][name] = run_scale(args)
            else:
                results["measures"][name] = run_latency(rounds, args)
        except (Failed, subprocess.SubprocessError) as exc:
            errors[name] = str(exc)
            note(f"{name}: {exc}")


def note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- targets and reports ----------------------------------------------------------------------


def targets(results: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) for each target whose measurement ran (met None: not run)."""
    work, meas = results["workloads"], results["measures"]
    rows: list[tuple[str, str, bool | None]] = []

    def tf(name: str) -> dict[str, Any] | None:
        impls = work.get(name, {}).get("impls", {})
        entry = impls.get(TF)
        return entry if entry and "ratio_best" in entry else None

    if entry := tf("noop"):
        rows.append(
            (
                "no-op children throughput >= 1.0x raw ThreadPoolExecutor.map",
                f"{entry['ratio_best']:.2f}x best, {entry['ratio_median']:.2f}x median",
                entry["ratio_best"] >= 1.0,
            )
        )
    if (million := work.get("million")) and TF in million["impls"]:
        entry = million["impls"][TF]
        rows.append(
            (
                f"{million['children']:,} children streamed, peak RSS < 150 MB",
                f"{entry['peak_mb']:.0f} MB",
                entry["peak_mb"] < 150,
            )
        )
    if entry := tf("sleep-c100"):
        rows.append(
            (
                "children sleeping 1 ms at C=100 within 5% of raw threads",
                f"{entry['ratio_best']:.2f}x best, {entry['ratio_median']:.2f}x median",
                entry["ratio_best"] >= 0.95,
            )
        )
    if (timeout := meas.get("timeout")) and timeout["log_ms"]["count"]:
        log_ms, worker = timeout["log_ms"], timeout["worker_ms"]
        seen = f"; worker-seen p99 {worker['p99']:.1f} ms" if worker["count"] else ""
        rows.append(
            (
                f"timeout detection p99 < 20 ms under {timeout['load_children']:,} no-op children",
                f"p99 {log_ms['p99']:.1f} ms from the log ({log_ms['count']} timeouts){seen}",
                log_ms["p99"] < 20,
            )
        )
    if imp := meas.get("import"):
        rows.append(
            (
                "import threadflow < 100 ms",
                f"{imp['import_ms']:.0f} ms (-X importtime: {imp['importtime_ms']:.0f} ms)",
                imp["import_ms"] < 100,
            )
        )
    if lat := meas.get("latency"):
        rows.append(
            (
                "one-task flow, start_link to RunResult < 20 ms",
                f"{lat['fresh_median_ms']:.1f} ms median, new store; "
                f"{lat['reused_median_ms']:.1f} ms reused store",
                lat["fresh_median_ms"] < 20,
            )
        )
    return rows


def engine_version() -> str | None:
    """The git commit of the engine, ``+`` if ``threadflow/`` has uncommitted changes."""
    here = os.path.dirname(os.path.abspath(__file__))

    def git(*argv: str) -> str:
        proc = subprocess.run(["git", *argv], cwd=here, capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "../threadflow")
    except OSError:  # no git
        return None
    return (head + ("+" if dirty else "")) or None


def durability() -> str:
    """The log settings every threadflow measurement ran with (the defaults)."""
    from threadflow import Flow

    every = getattr(Flow, "commit_every", None)
    group = f", group commit every {every * 1000:g} ms" if every else ""
    return f"WAL, synchronous={'FULL' if Flow.fsync else 'NORMAL'}{group}"


def meta(quick: bool) -> dict[str, Any]:
    return {
        "engine": engine_version(),
        "log": durability(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "system": f"{platform.system()} {platform.machine()}",
        "quick": quick,
    }


def plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def fmt_ratio(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.3f}x" if value < 0.1 else f"{value:.2f}x"


def fmt_rate(value: float) -> str:
    return f"{value:,.0f}"


def table_rows(results: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name, work in results["workloads"].items():
        for impl, e in work["impls"].items():
            head = [name, f"{work['children']:,}", str(work["concurrency"]), impl]
            if "skipped" in e:
                rows.append(head + [e["skipped"]] + [""] * (len(HEADERS) - len(head) - 1))
                continue
            rows.append(
                head
                + [
                    fmt_rate(e["best_per_s"]),
                    fmt_rate(e["median_per_s"]),
                    f"{e['us_per_child']:.1f}",
                    f"{e['overhead_us']:+.1f}" if "overhead_us" in e else "",
                    fmt_ratio(e.get("ratio_best")),
                    fmt_ratio(e.get("ratio_median")),
                    f"{e['peak_mb']:.0f}",
                ]
            )
    return rows


HEADERS = [
    "workload",
    "children",
    "C",
    "impl",
    "best /s",
    "median /s",
    "us/child",
    "overhead us/child",
    "vs raw (best)",
    "vs raw (median)",
    "peak RSS MB",
]


def measure_lines(results: dict[str, Any]) -> list[str]:
    meas = results["measures"]
    lines = []
    if t := meas.get("timeout"):
        for label, key in (("from the log", "log_ms"), ("seen by the worker", "worker_ms")):
            s = t[key]
            if s["count"]:
                lines.append(
                    f"timeout gap {label}: p50 {s['p50']:.1f} ms, p99 {s['p99']:.1f} ms, "
                    f"max {s['max']:.1f} ms ({s['count']} timeouts, "
                    f"{t['load_children']:,} no-op children beside)"
                )
    if i := meas.get("import"):
        lines.append(
            f"import threadflow: {i['import_ms']:.0f} ms over a bare interpreter; "
            f"-X importtime: {i['importtime_ms']:.0f} ms"
        )
    if lat := meas.get("latency"):
        lines.append(
            f"one-task flow start_link -> RunResult: new store {lat['fresh_median_ms']:.1f} ms "
            f"median (p90 {lat['fresh_p90_ms']:.1f}); reused store "
            f"{lat['reused_median_ms']:.1f} ms (p90 {lat['reused_p90_ms']:.1f}); "
            f"first in the process {lat['first_ms']:.1f} ms"
        )
    return lines


def print_text(results: dict[str, Any]) -> None:
    m = results["meta"]
    print(
        f"\n{m['date']}, {m['cpus']} CPUs, Python {m['python']}, SQLite {m['sqlite']}, "
        f"{m['system']}, {plural(results['rounds'], 'round')}{', quick' if m['quick'] else ''}, "
        f"engine {m['engine']}; log: {m['log']}"
    )
    rows = table_rows(results)
    if rows:
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(HEADERS)]
        for row in [HEADERS, *rows]:
            print(
                "  ".join(
                    c.rjust(w) if i else c.ljust(w)
                    for i, (c, w) in enumerate(zip(row, widths, strict=True))
                )
            )
    for line in measure_lines(results):
        print(line)
    for target, measured, met in results["targets"]:
        print(f"[{'met' if met else 'NOT met'}] {target}: {measured}")
    for name, error in results["errors"].items():
        print(f"[failed] {name}: {error}")


def print_markdown(results: dict[str, Any]) -> None:
    m = results["meta"]
    print(
        f"\nMeasured {m['date']}: {m['cpus']} CPUs, Python {m['python']}, "
        f"SQLite {m['sqlite']}, {m['system']}; {plural(results['rounds'], 'round')}; "
        f"engine {m['engine']}{' (quick sizes)' if m['quick'] else ''}; log: {m['log']}.\n"
    )
    rows = table_rows(results)
    if rows:
        print("| " + " | ".join(h.replace("us", "µs") for h in HEADERS) + " |")
        print("|" + "|".join("---" if i < 4 else "--:" for i in range(len(HEADERS))) + "|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
        print()
    for line in measure_lines(results):
        print(f"* {line}")
    if results["targets"]:
        print()
        print("| target | measured | |")
        print("|---|---|---|")
        for target, measured, met in results["targets"]:
            print(f"| {target} | {measured} | {'met' if met else '**not met**'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument(
        "--only",
        choices=[*WORKLOADS, *MEASURES, "scale"],
        metavar="NAME",
        help=f"run one of: {', '.join([*WORKLOADS, *MEASURES, 'scale'])}",
    )
    parser.add_argument("--quick", action="store_true", help="sizes / 10, one round")
    parser.add_argument("--rounds", type=int, help="rounds (default 3; 1 with --quick)")
    parser.add_argument("--peers", action="store_true", help="add Dask and OpenStack TaskFlow")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table too")
    parser.add_argument("--dir", help="where the stores go (default: the temporary directory)")
    parser.add_argument("--child", nargs=2, metavar=("WORKLOAD", "IMPL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args.child[0], args.child[1], args.quick, args.dir)
        return
    started = time.perf_counter()
    results = run_all(args)
    results["meta"] = meta(args.quick)
    results["meta"]["seconds"] = round(time.perf_counter() - started, 1)
    results["targets"] = targets(results)
    print_text(results)
    if args.markdown:
        print_markdown(results)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    if results["errors"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
