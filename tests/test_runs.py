"""``EventStore.runs(status=..., flow=..., limit=...)``: the runs an application asks for, such as
those a restart should pick up again (``status="interrupted"``).

One store holds a run of every status: ended ``all_over``, ``failed_over``, ``cancelled``,
stopped (``interrupted``), crashed (its process killed itself: ``interrupted`` too, though its
log has no end) and one still running in this process.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from replay_flows import Interruptible

from threadflow import EventStore
from threadflow.store import STATUSES

ROOT = Path(__file__).resolve().parent.parent
GUARD = 30.0  # seconds; a hang guard, never a synchronisation


def run_elsewhere(path: str, flow: str, **env: str) -> None:
    """Run ``tests.cli_flows.<flow>`` in a fresh interpreter (it may crash on purpose)."""
    code = f"import tests.cli_flows as f; f.{flow}.run(store={path!r})"
    subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        timeout=60,
    )


def held_run(path: str) -> tuple[Interruptible, Any, queue.SimpleQueue[Any]]:
    """A run of :class:`Interruptible` whose children 0 and 1 hold until cancelled."""
    holding: queue.SimpleQueue[Any] = queue.SimpleQueue()
    server = Interruptible.start_link(store=path, hold={0, 1}, holding=holding)
    handle = server.start_flow()
    assert {holding.get(timeout=GUARD), holding.get(timeout=GUARD)} == {0, 1}
    return server, handle, holding


@pytest.fixture
def store_of_every_status(store_path):
    """The store, the run ids by the status they have, and the server still running one."""
    ids: dict[str, list[str]] = {status: [] for status in STATUSES}
    run_elsewhere(store_path, "Stages")
    run_elsewhere(store_path, "Fatal", CLI_FLOWS_FAIL="2")
    run_elsewhere(store_path, "Fatal", CLI_FLOWS_CRASH="2")  # os._exit mid-run: no end
    by_flow = {(r.flow, r.outcome): r.run_id for r in EventStore(store_path).runs()}
    ids["all_over"].append(by_flow[("Stages", "all_over")])
    ids["failed_over"].append(by_flow[("Fatal", "failed_over")])
    ids["interrupted"].append(by_flow[("Fatal", None)])
    server, handle, _ = held_run(store_path)
    handle.cancel()
    assert handle.result(timeout=GUARD).outcome == "cancelled"
    server.stop()
    ids["cancelled"].append(handle.run_id)
    server, handle, _ = held_run(store_path)
    server.stop()
    assert handle.result(timeout=GUARD).outcome == "interrupted"
    ids["interrupted"].append(handle.run_id)
    server, handle, _ = held_run(store_path)
    ids["running"].append(handle.run_id)
    yield store_path, ids
    server.stop()


def test_runs_lists_the_runs_of_one_status(store_of_every_status):
    path, ids = store_of_every_status
    store = EventStore(path)
    every = store.runs()
    assert len(every) == 6
    for status in STATUSES:
        listed = store.runs(status=status)
        assert [r.run_id for r in listed] == ids[status], status
        assert all(r.status == status for r in listed)
        assert [r.run_id for r in listed] == [r.run_id for r in every if r.status == status]
        # each listed run is folded, as runs() folds them
        assert [r.children_done for r in listed] == [
            r.children_done for r in every if r.status == status
        ]


def test_runs_combines_status_with_flow_and_limit(store_of_every_status):
    path, ids = store_of_every_status
    store = EventStore(path)
    crashed, stopped = ids["interrupted"]
    assert [r.run_id for r in store.runs(status="interrupted", flow="Fatal")] == [crashed]
    assert [r.run_id for r in store.runs(status="interrupted", flow="Interruptible")] == [stopped]
    assert [r.run_id for r in store.runs(status="interrupted", limit=1)] == [stopped]
    assert [r.run_id for r in store.runs(status="failed_over", limit=1)] == ids["failed_over"]
    assert store.runs(status="all_over", flow="Fatal") == []


def test_runs_refuses_a_status_that_is_not_one(store_path):
    with pytest.raises(ValueError, match="runs\\(status='failed'\\): a run's status is one of"):
        EventStore(store_path).runs(status="failed")
