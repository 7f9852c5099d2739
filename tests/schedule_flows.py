"""Flows of the schedule tests, and a program that runs a schedule in its own process.

``python schedule_flows.py STORE`` schedules ``Quick`` every 0.1 s on STORE, prints ``ready``,
and stops once a line comes on its standard input (printing ``stopped``).
"""

from __future__ import annotations

import os
import sys

from threadflow import ALL_OVER, Flow, task


def quick(state):
    return state.get("scheduled_at")


class Quick(Flow):
    go = task(task_func=quick, next=ALL_OVER)


def held(state):
    """Tells the test it started (with its tick), then waits for a permit to end."""
    state["started"].put(state["scheduled_at"])
    state["permits"].get(timeout=30)
    return state["scheduled_at"]


class Held(Flow):
    """A run that stays open until the test lets it end: a permit per run."""

    go = task(task_func=held, next=ALL_OVER)


def main() -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from schedule_flows import Quick as Imported  # the class by its importable name

    with Imported.schedule(store=sys.argv[1], every=0.1, name="shared"):
        print("ready", flush=True)
        sys.stdin.readline()
    print("stopped", flush=True)


if __name__ == "__main__":
    main()
