"""What isolation="subprocess" costs per attempt, and how fast a hanging attempt is killed.

    python tools/bench_subprocess.py [--warm 300] [--cold 20] [--hanging 100]

Per-attempt time is read from the store itself: from an attempt's ``task_started`` event to
its ``task_over`` event, for no-op tasks. Thread and subprocess attempts are measured in the
same run and the overhead is the difference of their medians.

* warm: ``--warm`` children in sequence (``max_concurrency=1``) in one run; the server's
  worker process is reused, so every attempt after the first is warm.
* cold: ``--cold`` runs of a one-task flow, each on a new server, so each attempt starts a
  new process (spawn: a fresh interpreter that imports threadflow and this script).
* deadline to gone: ``--hanging`` children that sleep in C and ignore their token, with
  ``task_timeout=2``, ten at a time. Each notes that it began to hang: a kill of a process
  still booting is not counted, and more children run until that many did hang. For each,
  from its ``timeout`` event (the deadline) to the ``stale`` event that records its kill,
  which is written once the process is killed and reaped. Measured with the default
  ``kill_grace`` and with ``kill_grace=0``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import tempfile
import time
from collections.abc import Iterable
from typing import Any

from threadflow import ALL_OVER, EventStore, Flow, add_children_tasks, task

TIMEOUT = 2.0


def noop(state: Any) -> None:
    return None


def noop_child(child: Any, state: Any) -> None:
    return None


def add_n(state: Any) -> None:
    add_children_tasks(((i, None) for i in range(state["n"])), state)


def hang_child(child: Any, state: Any) -> None:
    open(os.path.join(state["dir"], str(child[0])), "w").close()
    time.sleep(60)  # in C, deaf to the cancel token


def flows(isolation: str, grace: float) -> dict[str, type[Flow]]:
    class Warm(Flow, server_name=f"bench-warm-{isolation}"):
        many = task(
            task_func=add_n,
            child_task_func=noop_child,
            isolation=isolation,
            max_concurrency=1,
            next=ALL_OVER,
        )

    class Cold(Flow, server_name=f"bench-cold-{isolation}"):
        one = task(task_func=noop, isolation=isolation, next=ALL_OVER)

    class Hanging(Flow, server_name=f"bench-hang-{grace}"):
        kill_grace = grace
        many = task(
            task_func=add_n,
            child_task_func=hang_child,
            isolation="subprocess",
            max_concurrency=10,
            task_timeout=TIMEOUT,
            task_retry_limit=1,
            exit_on_failed=False,
            next=ALL_OVER,
        )

    return {"warm": Warm, "cold": Cold, "hanging": Hanging}


def stamp(ts: str) -> float:
    return datetime.datetime.fromisoformat(ts).timestamp()


def attempt_times(store: str, run_id: str, children: bool) -> list[float]:
    """Seconds from task_started to task_over of each attempt (children, or the parent)."""
    started: dict[Any, float] = {}
    times = []
    for e in EventStore(store).events(run_id):
        if (e.ref is not None) != children:  # a child's events refer to its child_added
            continue
        key = (e.ref, e.attempt)
        if e.kind == "task_started":
            started[key] = stamp(e.ts)
        elif e.kind == "task_over" and key in started:
            times.append(stamp(e.ts) - started.pop(key))
    return times


def warm(bench: type[Flow], store: str, n: int) -> list[float]:
    result = bench.run(store=store, n=n)
    assert result.outcome == "all_over", result
    return attempt_times(store, result.run_id, children=True)[1:]  # the first may be cold


def cold(bench: type[Flow], store: str, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        result = bench.run(store=store)
        assert result.outcome == "all_over", result
        times.extend(attempt_times(store, result.run_id, children=False))
    return times


def deadline_to_gone(bench: type[Flow], store: str, n: int) -> tuple[list[float], int]:
    """Seconds from deadline to kill of ``n`` attempts that hung; and how many were skipped.

    An attempt whose deadline passes while its process is still booting (ten boots at once
    on a small machine) never hangs, and its kill takes no grace: it is not counted, and more
    children are run until ``n`` attempts that did hang are measured.
    """
    gone: list[float] = []
    skipped = 0
    while len(gone) < n:
        marks = tempfile.mkdtemp(dir=os.path.dirname(store))
        want = n - len(gone)
        with bench.start_link(store=store, n=want, dir=marks) as server:
            result = server.start_flow().result(timeout=600)
            assert result.outcome == "all_over", result
            deadline = time.monotonic() + 60
            while len(EventStore(store).events(result.run_id, "stale")) < want:  # last kills
                assert time.monotonic() < deadline, "kills were not recorded"
                time.sleep(0.05)
        hung = {int(name) for name in os.listdir(marks)}
        events = EventStore(store).events(result.run_id)
        timeouts = {e.ref: stamp(e.ts) for e in events if e.kind == "timeout"}
        for e in events:
            if e.kind != "stale":
                continue
            assert e.data is not None and e.data["process"]["signal"] == "SIGKILL", e.data
            if e.child_id in hung:
                gone.append(stamp(e.ts) - timeouts[e.ref])
            else:
                skipped += 1
    return gone, skipped


def ms(values: Iterable[float]) -> str:
    values = sorted(values)
    return (
        f"median {statistics.median(values) * 1000:7.2f} ms   "
        f"worst {values[-1] * 1000:7.2f} ms   (n={len(values)})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--warm", type=int, default=300)
    parser.add_argument("--cold", type=int, default=20)
    parser.add_argument("--hanging", type=int, default=100)
    args = parser.parse_args()
    default_grace = Flow.kill_grace
    thread, sub = flows("thread", default_grace), flows("subprocess", default_grace)
    with tempfile.TemporaryDirectory() as directory:

        def path(name: str) -> str:
            return os.path.join(directory, f"{name}.db")

        warm_t = warm(thread["warm"], path("warm-thread"), args.warm)
        warm_s = warm(sub["warm"], path("warm-subprocess"), args.warm)
        cold_t = cold(thread["cold"], path("cold-thread"), args.cold)
        cold_s = cold(sub["cold"], path("cold-subprocess"), args.cold)
        gone, skipped = deadline_to_gone(sub["hanging"], path("hanging"), args.hanging)
        no_grace = flows("subprocess", 0.0)["hanging"]
        gone0, skipped0 = deadline_to_gone(no_grace, path("hanging0"), args.hanging)

    def overhead(s: list[float], t: list[float]) -> str:
        return f"{(statistics.median(s) - statistics.median(t)) * 1000:7.2f} ms"

    print(f"per attempt, task_started -> task_over, no-op task ({os.cpu_count()} CPUs)")
    print(f"  warm  thread      {ms(warm_t)}")
    print(f"  warm  subprocess  {ms(warm_s)}")
    print(f"  cold  thread      {ms(cold_t)}")
    print(f"  cold  subprocess  {ms(cold_s)}")
    print(f"  overhead of a subprocess attempt: warm {overhead(warm_s, warm_t)}")
    print(f"                                    cold {overhead(cold_s, cold_t)}")
    print(f"deadline -> process killed and reaped, {args.hanging} hanging attempts, 10 at a time")
    print(f"  kill_grace={default_grace:g} s (default)  {ms(gone)}")
    print(f"  kill_grace=0            {ms(gone0)}")
    print(
        f"  not counted: {skipped + skipped0} attempts whose deadline passed while their "
        "process was still booting"
    )


if __name__ == "__main__":
    main()
