"""Scheduled runs (``Flow.schedule``): ticks on the cron or interval boundaries, overlap and
catch-up policies, one run per tick between processes, and every decision in the store.

Ticks are driven with a frozen clock (freezegun): the test moves it onto a tick and waits for
what the tick does (a run's result, a row in the store); the scheduler looks at the clock every
``clock_check`` seconds, so the frozen tests set it small.
"""

from __future__ import annotations

import datetime
import os
import queue
import sqlite3
import subprocess
import sys
import threading

import freezegun
import pytest
from click.testing import CliRunner
from helpers import wait_until
from schedule_flows import Held, Quick

import threadflow
from threadflow import EventStore, Schedule, ThreadflowError, Tick
from threadflow.cli import cli

UTC = datetime.timezone.utc
GUARD = 20.0  # seconds: a hang guard, never a timing assertion
FAST = {"clock_check": 0.01}  # the frozen tests move the clock; the scheduler sees it at once
HERE = os.path.dirname(os.path.abspath(__file__))


def at(hour: int, minute: int, second: int = 0, day: int = 1) -> datetime.datetime:
    return datetime.datetime(2024, 5, day, hour, minute, second, tzinfo=UTC)


def iso(t: datetime.datetime) -> str:
    return t.isoformat(timespec="microseconds")


T0 = at(12, 3, 30)


def decisions(ticks: list[Tick]) -> list[tuple[datetime.datetime, str]]:
    return [(t.tick, t.decision) for t in ticks]


def schedule_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("threadflow-schedule-")]


def run_inputs(store_path: str) -> list[str]:
    """The tick time each run of the store was given (``scheduled_at``), in start order."""
    store = EventStore(store_path)
    return [
        store.events(info.run_id, "flow_started")[0].data["inputs"]["scheduled_at"]
        for info in store.runs()
    ]


def ended(store_path: str, n: int) -> bool:
    """Whether ``n`` runs of the store have ended."""
    return sum(info.status == "all_over" for info in EventStore(store_path).runs()) >= n


# --- ticks on the boundaries -----------------------------------------------------------------


def test_cron_ticks_start_runs_exactly_on_the_boundaries_under_a_frozen_clock(store_path):
    results: queue.Queue = queue.Queue()
    with freezegun.freeze_time(T0) as clock:
        with Quick.start_link(store=store_path, return_to=results) as srv:
            with Quick.schedule(server=srv, cron="*/5 * * * *", **FAST) as sched:
                assert sched.next_fire == at(12, 5)  # aware: a naive time never equals it
                clock.move_to(at(12, 5))
                first = results.get(timeout=GUARD)
                clock.move_to(at(12, 10))
                second = results.get(timeout=GUARD)
                assert wait_until(lambda: sched.next_fire == at(12, 15), within=GUARD)

    # Drift 0: each run started at its tick's time, and was given that time.
    assert first.state["start_time"] == at(12, 5)
    assert second.state["start_time"] == at(12, 10)
    assert first.state["scheduled_at"] == iso(at(12, 5))
    assert second.state["scheduled_at"] == iso(at(12, 10))
    ticks = EventStore(store_path).ticks("Quick")
    assert [(t.tick, t.decision, t.run_id) for t in ticks] == [
        (at(12, 5), "fired", first.run_id),
        (at(12, 10), "fired", second.run_id),
    ]


def test_every_ticks_fall_on_multiples_of_the_interval_since_the_epoch(store_path):
    results: queue.Queue = queue.Queue()
    with freezegun.freeze_time(at(12, 3, 31)) as clock:
        with Quick.start_link(store=store_path, return_to=results) as srv:
            with Quick.schedule(server=srv, every=45, **FAST) as sched:
                # 12:03:45 is 1714565025 s since the epoch, a multiple of 45.
                assert sched.next_fire == at(12, 3, 45)
                clock.move_to(at(12, 3, 45))
                res = results.get(timeout=GUARD)
    assert res.state["start_time"] == at(12, 3, 45)
    assert res.state["scheduled_at"] == iso(at(12, 3, 45))


def test_next_fire_of_sub_second_intervals_and_six_field_cron_expressions(store_path):
    with freezegun.freeze_time(at(12, 0, 0) + datetime.timedelta(microseconds=100_000)):
        with Quick.schedule(store=store_path, every=0.25) as sched:
            assert sched.next_fire == at(12, 0, 0) + datetime.timedelta(microseconds=250_000)
        with Quick.schedule(store=store_path, cron="*/20 * * * * *") as sched:
            assert sched.next_fire == at(12, 0, 20)
        with Quick.schedule(store=store_path, every=datetime.timedelta(hours=1)) as sched:
            assert sched.next_fire == at(13, 0)


def test_cron_in_a_time_zone_follows_its_daylight_saving_time(store_path):
    with freezegun.freeze_time(at(1, 0)):  # 1 May: Paris is UTC+2
        with Quick.schedule(store=store_path, cron="0 9 * * *", tz="Europe/Paris") as sched:
            assert sched.next_fire == at(7, 0)
    with freezegun.freeze_time(datetime.datetime(2024, 1, 10, 1, tzinfo=UTC)):  # UTC+1
        with Quick.schedule(store=store_path, cron="0 9 * * *", tz="Europe/Paris") as sched:
            assert sched.next_fire == datetime.datetime(2024, 1, 10, 8, tzinfo=UTC)


def test_the_inputs_are_given_to_every_run_and_the_tick_input_can_be_renamed(store_path):
    results: queue.Queue = queue.Queue()
    with freezegun.freeze_time(T0) as clock:
        with Quick.start_link(store=store_path, return_to=results) as srv:
            with Quick.schedule(
                server=srv, every=60, inputs={"folder": "in"}, tick_input="tick", **FAST
            ):
                clock.move_to(at(12, 4))
                res = results.get(timeout=GUARD)
    assert res.state["folder"] == "in"
    assert res.state["tick"] == iso(at(12, 4))
    assert "scheduled_at" not in res.state


# --- overlap -------------------------------------------------------------------------------


def held_server(store_path, results):
    started: queue.Queue = queue.Queue()
    permits: queue.Queue = queue.Queue()
    srv = Held.start_link(store=store_path, return_to=results, started=started, permits=permits)
    return srv, started, permits


def fire_held_then_tick(clock, started, sched):
    """12:04 fires a run of ``Held`` that waits for its permit; 12:05 comes while it runs:
    both ticks are decided."""
    clock.move_to(at(12, 4))
    assert started.get(timeout=GUARD) == iso(at(12, 4))
    clock.move_to(at(12, 5))
    assert wait_until(lambda: len(sched.ticks()) == 2, within=GUARD)


def test_overlap_skip_records_a_tick_that_comes_while_the_schedules_run_is_open(store_path):
    results: queue.Queue = queue.Queue()
    with freezegun.freeze_time(T0) as clock:
        srv, started, permits = held_server(store_path, results)
        with srv, Held.schedule(server=srv, every=60, overlap="skip", **FAST) as sched:
            fire_held_then_tick(clock, started, sched)
            permits.put(1)
            first = results.get(timeout=GUARD)
            clock.move_to(at(12, 6))
            assert started.get(timeout=GUARD) == iso(at(12, 6))
            permits.put(1)
            results.get(timeout=GUARD)

    ticks = EventStore(store_path).ticks("Held")
    assert decisions(ticks) == [
        (at(12, 4), "fired"),
        (at(12, 5), "skipped"),
        (at(12, 6), "fired"),
    ]
    assert ticks[1].run_id is None
    assert f"run {first.run_id} of this schedule is still running" in ticks[1].detail


def test_overlap_queue_runs_one_waiting_tick_when_the_run_ends_and_skips_the_others(store_path):
    results: queue.Queue = queue.Queue()
    with freezegun.freeze_time(T0) as clock:
        srv, started, permits = held_server(store_path, results)
        with srv, Held.schedule(server=srv, every=60, overlap="queue", **FAST) as sched:
            fire_held_then_tick(clock, started, sched)
            clock.move_to(at(12, 6))
            assert wait_until(lambda: len(sched.ticks()) == 3, within=GUARD)
            assert decisions(sched.ticks())[1:] == [(at(12, 5), "queued"), (at(12, 6), "skipped")]
            permits.put(1)
            first = results.get(timeout=GUARD)
            # The queued tick starts as the run ends, with its own tick time.
            assert started.get(timeout=GUARD) == iso(at(12, 5))
            permits.put(1)
            second = results.get(timeout=GUARD)

    ticks = EventStore(store_path).ticks("Held")
    assert [(t.tick, t.decision, t.run_id) for t in ticks] == [
        (at(12, 4), "fired", first.run_id),
        (at(12, 5), "fired", second.run_id),
        (at(12, 6), "skipped", None),
    ]
    assert "queued; started 60.000 s after its tick" in ticks[1].detail
    assert f"tick {iso(at(12, 5))} is queued already" in ticks[2].detail


def test_a_tick_while_the_server_runs_another_run_is_skipped_naming_it(store_path):
    results: queue.Queue = queue.Queue()
    with freezegun.freeze_time(T0) as clock:
        srv, started, permits = held_server(store_path, results)
        with srv, Held.schedule(server=srv, every=60, **FAST) as sched:
            manual = srv.start_flow(scheduled_at="by hand")
            assert started.get(timeout=GUARD) == "by hand"
            for n, minute in enumerate((4, 5, 6), 1):
                clock.move_to(at(12, minute))
                assert wait_until(lambda n=n: len(sched.ticks()) == n, within=GUARD)
            # However many ticks find it running, the schedule asks once to be woken by its
            # end: a long run by hand does not pile up callbacks.
            assert len(manual._when_done) == 1
            permits.put(1)
            manual.result(timeout=GUARD)
    ticks = EventStore(store_path).ticks("Held")
    assert [t.decision for t in ticks] == ["skipped"] * 3
    assert all(f"busy with run {manual.run_id}" in t.detail for t in ticks)


def test_stop_records_a_queued_tick_as_skipped(store_path):
    results: queue.Queue = queue.Queue()
    with freezegun.freeze_time(T0) as clock:
        srv, started, permits = held_server(store_path, results)
        with srv:
            sched = Held.schedule(server=srv, every=60, overlap="queue", **FAST)
            fire_held_then_tick(clock, started, sched)
            sched.stop()
            permits.put(1)
            results.get(timeout=GUARD)
    ticks = EventStore(store_path).ticks("Held")
    assert decisions(ticks) == [(at(12, 4), "fired"), (at(12, 5), "skipped")]
    assert "the schedule stopped before this tick could run" in ticks[1].detail
    assert len(EventStore(store_path).runs()) == 1


# --- catch-up after a downtime -------------------------------------------------------------


def first_life(store_path, clock, every=60):
    """A schedule that fires one tick (born at T0, ticks at the next boundary), then stops."""
    with Quick.schedule(store=store_path, every=every, **FAST) as sched:
        tick = sched.next_fire
        clock.move_to(tick)
        assert wait_until(lambda: ended(store_path, 1), within=GUARD)
    return tick


def second_life(store_path, rows, runs=0, every=60, **options):
    """A schedule started after the downtime; returns its ticks once ``rows`` are recorded."""
    with Quick.schedule(store=store_path, every=every, **FAST, **options) as sched:
        assert wait_until(lambda: len(sched.ticks()) >= rows, within=GUARD)
        assert wait_until(lambda: ended(store_path, 1 + runs), within=GUARD)
        return sched.ticks()


def test_catch_up_none_records_the_missed_ticks_in_one_row(store_path):
    with freezegun.freeze_time(T0) as clock:
        first_life(store_path, clock)
        clock.move_to(at(12, 10, 30))  # down through 12:05 ... 12:10
        ticks = second_life(store_path, rows=2, catch_up="none")
    assert decisions(ticks) == [(at(12, 4), "fired"), (at(12, 10), "missed")]
    missed = ticks[1]
    assert (missed.count, missed.first, missed.run_id) == (6, at(12, 5), None)
    assert "6 ticks from" in missed.detail and "no scheduler was running" in missed.detail
    assert len(EventStore(store_path).runs()) == 1


def test_catch_up_latest_runs_the_latest_missed_tick_once(store_path):
    with freezegun.freeze_time(T0) as clock:
        first_life(store_path, clock)
        clock.move_to(at(12, 10, 30))
        ticks = second_life(store_path, rows=3, runs=1, catch_up="latest")
    assert decisions(ticks) == [
        (at(12, 4), "fired"),
        (at(12, 9), "missed"),
        (at(12, 10), "caught_up"),
    ]
    assert (ticks[1].count, ticks[1].first) == (5, at(12, 5))
    assert run_inputs(store_path) == [iso(at(12, 4)), iso(at(12, 10))]
    assert EventStore(store_path).runs()[-1].run_id == ticks[2].run_id


def test_catch_up_all_runs_each_missed_tick_in_order_up_to_the_limit(store_path):
    with freezegun.freeze_time(T0) as clock:
        first_life(store_path, clock)
        clock.move_to(at(12, 10, 30))
        ticks = second_life(store_path, rows=6, runs=4, catch_up="all", catch_up_limit=4)
    assert decisions(ticks) == [
        (at(12, 4), "fired"),
        (at(12, 6), "missed"),
        (at(12, 7), "caught_up"),
        (at(12, 8), "caught_up"),
        (at(12, 9), "caught_up"),
        (at(12, 10), "caught_up"),
    ]
    assert (ticks[1].count, ticks[1].first) == (2, at(12, 5))
    # One after another, oldest first, each with its own tick time.
    assert run_inputs(store_path) == [iso(at(12, m)) for m in (4, 7, 8, 9, 10)]
    assert [t.run_id for t in ticks[2:]] == [r.run_id for r in EventStore(store_path).runs()[1:]]


def test_a_month_down_with_every_second_writes_a_bounded_number_of_rows(store_path):
    with freezegun.freeze_time(T0) as clock:
        fired = first_life(store_path, clock, every=1)
        clock.move_to(fired + datetime.timedelta(days=30))
        ticks = second_life(store_path, rows=5, runs=3, every=1, catch_up="all", catch_up_limit=3)
    assert [t.decision for t in ticks] == ["fired", "missed", "caught_up", "caught_up", "caught_up"]
    assert ticks[1].count == 30 * 86400 - 3
    assert ticks[1].first == fired + datetime.timedelta(seconds=1)
    assert ticks[-1].tick == fired + datetime.timedelta(days=30)


def test_ticks_passed_while_the_scheduler_was_late_are_missed_beyond_grace(store_path):
    results: queue.Queue = queue.Queue()
    with freezegun.freeze_time(T0) as clock:
        with Quick.start_link(store=store_path, return_to=results) as srv:
            with Quick.schedule(server=srv, every=60, grace=90, **FAST) as sched:
                clock.move_to(at(12, 4))
                results.get(timeout=GUARD)
                # As if the machine slept from 12:04 to 12:10:30: 12:10 is late by less than
                # grace and runs; 12:05 ... 12:09 are missed (catch_up="none").
                clock.move_to(at(12, 10, 30))
                late = results.get(timeout=GUARD)
                assert wait_until(lambda: len(sched.ticks()) == 3, within=GUARD)
    ticks = EventStore(store_path).ticks("Quick")
    assert decisions(ticks) == [(at(12, 4), "fired"), (at(12, 9), "missed"), (at(12, 10), "fired")]
    assert "the scheduler was late" in ticks[1].detail
    assert late.state["scheduled_at"] == iso(at(12, 10))


# --- several processes ---------------------------------------------------------------------


def test_two_processes_on_one_store_start_one_run_per_tick(store_path):
    script = os.path.join(HERE, "schedule_flows.py")
    procs = [
        subprocess.Popen(
            [sys.executable, script, store_path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        for proc in procs:
            assert proc.stdout.readline() == "ready\n"
        store = EventStore(store_path)
        assert wait_until(
            lambda: sum(t.decision == "fired" for t in store.ticks("shared")) >= 20, within=60
        )
    finally:
        for proc in procs:
            proc.stdin.write("stop\n")
            proc.stdin.flush()
        outs = [proc.communicate(timeout=GUARD)[0] for proc in procs]
    assert outs == ["stopped\n", "stopped\n"]
    assert [proc.returncode for proc in procs] == [0, 0]

    ticks = EventStore(store_path).ticks("shared")
    started = run_inputs(store_path)
    # Each tick started one run at most (a second run of a tick would be a duplicate in
    # started, which fired cannot hold), and every run was a tick's.
    fired = {iso(t.tick): t.run_id for t in ticks if t.run_id}
    assert sorted(fired) == sorted(started)
    assert {r.run_id for r in EventStore(store_path).runs()} == set(fired.values())


# --- stopping ------------------------------------------------------------------------------


def test_stop_joins_the_scheduler_thread_stops_its_own_server_and_is_idempotent(store_path):
    sched = Quick.schedule(store=store_path, cron="0 0 1 1 *")
    assert isinstance(sched, Schedule) and sched.owns_server
    assert schedule_threads() == ["threadflow-schedule-Quick"]
    sched.stop()
    assert schedule_threads() == []
    assert sched.stopped and sched.next_fire is None
    assert Quick.whereis("Quick") is None
    sched.stop()
    with Quick.schedule(store=store_path, cron="0 0 1 1 *"):  # the name is free again
        pass
    assert schedule_threads() == []


def test_stop_leaves_a_given_server_running(store_path):
    with Quick.start_link(store=store_path) as srv:
        with Quick.schedule(server=srv, every=3600) as sched:
            assert not sched.owns_server
        assert Quick.whereis("Quick") is srv
        assert srv.start_flow().result(timeout=GUARD).outcome == "all_over"


def test_a_schedule_ends_when_its_server_is_stopped(store_path):
    with freezegun.freeze_time(T0) as clock:
        srv = Quick.start_link(store=store_path)
        sched = Quick.schedule(server=srv, every=60, **FAST)
        srv.stop()
        clock.move_to(at(12, 4))
        assert wait_until(lambda: sched.stopped, within=GUARD)
        sched.stop()
    assert schedule_threads() == []
    assert EventStore(store_path).ticks() == []


# --- the store -----------------------------------------------------------------------------


def test_a_schema_2_store_is_upgraded_and_records_ticks(store_path):
    first = Quick.run(store=store_path)
    conn = sqlite3.connect(store_path)
    conn.execute("DROP TABLE ticks")  # what a schema 2 store is: the same, without ticks
    conn.execute("PRAGMA user_version = 2")
    conn.commit()
    conn.close()
    assert EventStore(store_path).ticks() == []

    with freezegun.freeze_time(T0) as clock:
        with Quick.schedule(store=store_path, every=60, **FAST):
            clock.move_to(at(12, 4))
            assert wait_until(lambda: ended(store_path, 2), within=GUARD)

    conn = sqlite3.connect(store_path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 3
    conn.close()
    assert decisions(EventStore(store_path).ticks()) == [(at(12, 4), "fired")]
    assert first.run_id in {r.run_id for r in EventStore(store_path).runs()}  # still there


def test_the_ticks_command_lists_ticks_and_escapes_control_characters(store_path):
    with freezegun.freeze_time(T0) as clock:
        with Quick.schedule(store=store_path, every=60, name="evil\x1b[2J", **FAST) as sched:
            clock.move_to(at(12, 4))
            assert wait_until(lambda: len(sched.ticks()) == 1, within=GUARD)
    run_id = EventStore(store_path).ticks()[0].run_id

    result = CliRunner().invoke(cli, ["ticks", "--db", store_path])
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["SCHEDULE", "TICK", "(UTC)", "DECISION", "RUN", "DETAIL"]
    assert lines[1].split() == ["evil\\x1b[2J", "2024-05-01", "12:04:00", "fired", run_id]

    result = CliRunner().invoke(cli, ["ticks", "nothing", "--db", store_path])
    assert result.exit_code == 0
    assert "no ticks of schedule 'nothing'" in result.output

    result = CliRunner().invoke(cli, ["ticks", "evil\x1b[2J", "--json", "--db", store_path])
    assert result.exit_code == 0
    assert "\x1b" not in result.output
    assert '"tick": "2024-05-01T12:04:00+00:00"' in result.output


# --- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({}, TypeError, r"exactly one of cron=.* and every=.*; got neither"),
        ({"cron": "* * * * *", "every": 5}, TypeError, r"got both"),
        ({"every": 0}, ValueError, r"every=0\): must be a positive number of seconds"),
        ({"every": -1.5}, ValueError, r"every=-1.5\): must be a positive"),
        ({"every": float("nan")}, ValueError, r"must be a positive"),
        ({"every": "5"}, TypeError, r"every='5'\): pass a number of seconds"),
        (
            {"cron": "61 * * * *"},
            ValueError,
            r"cron='61 \* \* \* \*'\): bad minute field '61'; a cron expression has 5 fields",
        ),
        (
            {"cron": "*/5 * * *"},
            ValueError,
            r"cron='\*/5 \* \* \*'\): wrong number of fields \(4\)",
        ),
        ({"cron": "0 0 * * FUNDAY"}, ValueError, r"bad day-of-week field 'FUNDAY'"),
        ({"cron": "0 0 31 2 *"}, ValueError, r"bad day-of-month field '31'"),
        ({"every": 5, "overlap": "skp"}, ValueError, r"overlap='skp'\).*did you mean 'skip'"),
        ({"every": 5, "catch_up": "every"}, ValueError, r"catch_up='every'\): use one of"),
        ({"cron": "* * * * *", "tz": "Mars/Olympus"}, ValueError, r"no such time zone"),
        ({"every": 5, "tz": "UTC"}, TypeError, r"tz= applies to cron= only"),
        ({"every": 5, "catch_up_limit": 0}, ValueError, r"catch_up_limit=0\): must be at least"),
        ({"every": 5, "inputs": {"scheduled_at": 1}}, TypeError, r"inputs has an entry"),
        ({"every": 5, "inputs": {"run_id": 1}}, TypeError, r"set by threadflow"),
        ({"every": 5, "tick_input": "run_id"}, TypeError, r"\['run_id'\] are set by threadflow"),
        ({"every": 5, "entrance": "gone"}, threadflow.FlowDefinitionError, r"not a task"),
    ],
)
def test_bad_arguments_are_refused_before_anything_starts(store_path, options, error, message):
    with pytest.raises(error, match=message):
        Quick.schedule(store=store_path, **options)
    assert schedule_threads() == []
    assert Quick.whereis("Quick") is None


def test_a_second_schedule_of_one_name_in_one_process_is_refused(store_path):
    with Quick.schedule(store=store_path, every=3600) as sched:
        with pytest.raises(ThreadflowError, match="server named 'Quick' is already running"):
            Quick.schedule(store=store_path, every=60)
        with pytest.raises(ThreadflowError, match="schedule named 'Quick' is already running"):
            Quick.schedule(server=sched.server, every=60)
        with Quick.schedule(server=sched.server, every=60, name="other") as other:
            assert other.name == "other"


def test_a_server_of_another_flow_or_store_is_refused(store_path, tmp_path):
    with Quick.start_link(store=store_path) as srv:
        with pytest.raises(TypeError, match="pass a server of Held"):
            Held.schedule(server=srv, every=60)
        with pytest.raises(ValueError, match="leave out store="):
            Quick.schedule(store=str(tmp_path / "other.db"), server=srv, every=60)
