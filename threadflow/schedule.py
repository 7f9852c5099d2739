"""Scheduled runs: ``Flow.schedule`` starts a run at each tick of a cron expression or of a fixed
interval, and records in the store what it decided for every tick.

One scheduler thread per schedule waits for the next tick on an ``Event`` (``stop()`` and the
end of the schedule's run set it), never in a sleep loop. Each decision is one ``BEGIN
IMMEDIATE`` transaction on the store: it reads the last tick any process recorded for the
schedule's name, writes a row per tick into ``ticks`` (primary key: schedule name and tick
time) and starts the run before it commits. So two processes that share a store and a schedule
name are ordered by the store's write lock: whichever decides a tick first writes its row, and
the other, reading it under the lock, finds nothing left to decide.

Tick times are aware UTC datetimes; in the store they are fixed-width ISO 8601 text
(``2024-05-01T12:05:00.000000+00:00``), so that text order is time order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import math
import os
import socket
import sqlite3
import threading
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from ._clock import utcnow, wall
from .definition import suggest
from .errors import FlowRunning, ThreadflowError
from .events import owner_alive, pid_alive
from .result import RunHandle
from .store import EventStore, Tick, connect

if TYPE_CHECKING:
    from .flow import Flow

log = logging.getLogger("threadflow")

UTC = datetime.timezone.utc
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=UTC)
_MICRO = datetime.timedelta(microseconds=1)

OVERLAPS = ("skip", "queue")
CATCH_UPS = ("none", "latest", "all")

#: Ticks of a cron expression counted one by one in a stretch of missed ticks, at most; a
#: longer stretch is recorded as "more than" this many (``every=`` stretches are counted
#: exactly, by arithmetic).
MISSED_COUNTED = 10_000
#: Late ticks still within ``grace`` that one wake-up handles as live ticks, at most (the
#: older ones are taken as missed): bounds the rows a stalled ``every=0.001`` writes.
LIVE_AT_ONCE = 100
#: Seconds ``stop()`` waits for the scheduler thread: it wakes at once, but a decision it is
#: making may wait for the store's write lock (the busy timeout) before it can end.
JOIN_TIMEOUT = 35.0

_PENDING = ("queued", "catching_up")

# Schedule names running in this process, per store file: a second scheduler of one name in one
# process would take the first one's waiting ticks for its own (both have the same pid).
_running: set[tuple[str, str]] = set()
_running_lock = threading.Lock()


def iso(t: datetime.datetime) -> str:
    """``t`` as the store writes tick times: UTC, fixed width, microseconds included."""
    return t.astimezone(UTC).isoformat(timespec="microseconds")


# -- tick sources ----------------------------------------------------------------------------


class _Every:
    """Ticks every ``every`` seconds, on the multiples of it since 1970-01-01 00:00 UTC: every
    process computes the same tick times, whenever it started."""

    def __init__(self, every: float) -> None:
        self.step = round(every * 1_000_000)  # microseconds: exact integer arithmetic

    def _k(self, t: datetime.datetime) -> int:
        """The number of the last tick at or before ``t``."""
        return ((t - _EPOCH) // _MICRO) // self.step

    def _at(self, k: int) -> datetime.datetime:
        return _EPOCH + datetime.timedelta(microseconds=k * self.step)

    def after(self, t: datetime.datetime) -> datetime.datetime | None:
        return self._at(self._k(t) + 1)

    def backwards(self, t: datetime.datetime) -> Iterator[datetime.datetime]:
        k = self._k(t)
        while True:
            yield self._at(k)
            k -= 1

    def count(self, a: datetime.datetime, b: datetime.datetime) -> int | None:
        return max(0, self._k(b) - self._k(a))


class _Cron:
    """Ticks of a cron expression (parsed and walked by ``cronsim``) in the time zone ``tz``."""

    def __init__(self, expr: str, tz: datetime.tzinfo) -> None:
        self.expr = expr
        self.tz = tz
        self._cronsim = _cronsim()

    def _iterate(self, t: datetime.datetime, reverse: bool) -> Iterator[datetime.datetime]:
        it = self._cronsim.CronSim(self.expr, t.astimezone(self.tz), reverse=reverse)
        # cronsim gives up (StopIteration) past 50 years without a match: no more ticks.
        for value in it:
            yield value.astimezone(UTC)

    def after(self, t: datetime.datetime) -> datetime.datetime | None:
        # cronsim starts from the whole second after t: every tick is on a whole second, so the
        # first one it gives is the first after t.
        return next(self._iterate(t, reverse=False), None)

    def backwards(self, t: datetime.datetime) -> Iterator[datetime.datetime]:
        # In reverse, cronsim's first step is one second back from the whole second it is given
        # (2.7; 2.8 takes a time with microseconds to its whole second instead): from the whole
        # second after floor(t), its first tick is the last one at or before t, in both.
        start = t.replace(microsecond=0) + datetime.timedelta(seconds=1)
        yield from self._iterate(start, reverse=True)

    def count(self, a: datetime.datetime, b: datetime.datetime) -> int | None:
        n = 0
        for t in self._iterate(a, reverse=False):
            if t > b:
                return n
            n += 1
            if n > MISSED_COUNTED:
                return None
        return n


def _cronsim() -> Any:
    try:
        import cronsim
    except ImportError:  # a dependency of threadflow: missing only if it was removed
        raise ImportError(
            "schedule(cron=...) needs the cronsim package, which threadflow depends on; "
            "install it with: pip install cronsim (or use every=SECONDS)"
        ) from None
    return cronsim


_CRON_FIELDS = ("second", "minute", "hour", "day-of-month", "month", "day-of-week")
_CRON_HELP = (
    "a cron expression has 5 fields, minute hour day-of-month month day-of-week (e.g. "
    "'*/5 * * * *': every 5 minutes; '0 2 * * MON-FRI': 02:00 on weekdays), or 6 with a "
    "seconds field first"
)


def parse_cron(expr: Any, tz: datetime.tzinfo) -> _Cron:
    """A checked cron expression.

    :raises ValueError: naming the expression, the field that is wrong and what a cron
        expression looks like; also for one that matches no time in the next 50 years.
    """
    if not isinstance(expr, str):
        raise TypeError(f"schedule(cron={expr!r}): pass the cron expression as a string")
    cronsim = _cronsim()
    source = _Cron(expr, tz)
    try:
        first = source.after(utcnow())
    except cronsim.CronSimError as exc:
        problem = _cron_problem(expr, exc)
        raise ValueError(f"schedule(cron={expr!r}): {problem}; {_CRON_HELP}") from None
    if first is None:
        raise ValueError(
            f"schedule(cron={expr!r}): the expression matches no time in the next 50 years; "
            f"check its day-of-month, month and day-of-week fields; {_CRON_HELP}"
        )
    return source


def _cron_problem(expr: str, exc: Exception) -> str:
    """What cronsim found wrong (``Bad minute``), with the field's own text."""
    message = str(exc)
    parts = expr.split()
    if not message.startswith("Bad "):  # "Wrong number of fields"
        return f"{message.lower()} ({len(parts)})"
    field = message[4:]
    if field in _CRON_FIELDS:
        index = _CRON_FIELDS.index(field) - (1 if len(parts) == 5 else 0)
        if 0 <= index < len(parts):
            return f"bad {field} field {parts[index]!r}"
    return f"bad {field} field"


# -- arguments -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Options:
    name: str
    source: _Every | _Cron
    what: str  # "cron='*/5 * * * *'" or "every=300s": for messages and logs
    overlap: str
    catch_up: str
    catch_up_limit: int
    grace: float
    clock_check: float
    entrance: str | None
    inputs: Mapping[str, Any]
    tick_input: str | None


def _choice(param: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(
            f"schedule({param}={value!r}): use one of {', '.join(map(repr, allowed))}"
            f"{suggest(value, allowed)}"
        )
    return str(value)


def _positive(param: str, value: Any) -> float:
    if isinstance(value, datetime.timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"schedule({param}={value!r}): pass a number of seconds")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"schedule({param}={value!r}): must be a positive number of seconds")
    return float(value)


def _zone(tz: Any) -> datetime.tzinfo:
    if tz is None:
        return UTC
    if isinstance(tz, datetime.tzinfo):
        return tz
    if not isinstance(tz, str):
        raise TypeError(
            f"schedule(tz={tz!r}): pass a zone name such as 'Europe/Paris', or a tzinfo"
        )
    import zoneinfo

    try:
        return zoneinfo.ZoneInfo(tz)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"schedule(tz={tz!r}): no such time zone; use an IANA name such as 'Europe/Paris' "
            "or 'America/New_York' (on a system without a zone database, pip install tzdata)"
        ) from None


def check_options(
    flow_name: str,
    *,
    cron: Any,
    every: Any,
    tz: Any,
    name: Any,
    overlap: Any,
    catch_up: Any,
    catch_up_limit: Any,
    grace: Any,
    clock_check: Any,
    entrance: str | None,
    inputs: Mapping[str, Any] | None,
    tick_input: Any,
) -> _Options:
    """The schedule's arguments, checked before anything starts.

    :raises TypeError: for both or neither of ``cron`` and ``every``, or a value of the wrong type.
    :raises ValueError: for a bad cron expression, a non-positive interval, an unknown
        ``overlap``, ``catch_up`` or time zone.
    """
    if (cron is None) == (every is None):
        raise TypeError(
            "schedule(): pass exactly one of cron='*/5 * * * *' (a cron expression) and "
            f"every=SECONDS (a fixed interval); got {'both' if cron is not None else 'neither'}"
        )
    source: _Every | _Cron
    if every is not None:
        seconds = _positive("every", every)
        if round(seconds * 1_000_000) < 1:
            raise ValueError(f"schedule(every={every!r}): the shortest interval is 1 microsecond")
        if tz is not None:
            raise TypeError(
                "schedule(): tz= applies to cron= only; every= ticks are counted from "
                "1970-01-01 00:00 UTC whatever the zone"
            )
        source = _Every(seconds)
        what = f"every={seconds:g}s"
    else:
        source = parse_cron(cron, _zone(tz))
        what = f"cron={cron!r}" + (f" tz={tz!s}" if tz is not None else "")
    if name is None:
        name = flow_name
    if not isinstance(name, str) or not name:
        raise TypeError(f"schedule(name={name!r}): a schedule's name is a non-empty string")
    if isinstance(catch_up_limit, bool) or not isinstance(catch_up_limit, int):
        raise TypeError(f"schedule(catch_up_limit={catch_up_limit!r}): pass a whole number")
    if catch_up_limit < 1:
        raise ValueError(f"schedule(catch_up_limit={catch_up_limit!r}): must be at least 1")
    if tick_input is not None and (not isinstance(tick_input, str) or not tick_input):
        raise TypeError(
            f"schedule(tick_input={tick_input!r}): pass the name of the run input that gets "
            "the tick time, or None for no such input"
        )
    inputs = dict(inputs or {})
    if tick_input is not None and tick_input in inputs:
        raise TypeError(
            f"schedule(): inputs has an entry {tick_input!r}, which is the input that gets the "
            "tick time; rename it, or pass tick_input= another name"
        )
    return _Options(
        name=name,
        source=source,
        what=what,
        overlap=_choice("overlap", overlap, OVERLAPS),
        catch_up=_choice("catch_up", catch_up, CATCH_UPS),
        catch_up_limit=catch_up_limit,
        grace=_positive("grace", grace),
        clock_check=_positive("clock_check", clock_check),
        entrance=entrance,
        inputs=inputs,
        tick_input=tick_input,
    )


# -- the schedule ----------------------------------------------------------------------------


@dataclasses.dataclass
class _Waiting:
    """A tick this scheduler decided to run later (a ``queued`` or ``catching_up`` row)."""

    tick: datetime.datetime
    decision: str  # "queued" or "catching_up"


class Schedule:
    """A running schedule: what ``Flow.schedule`` returns. Stop it with :meth:`stop` (or use
    it as a context manager).

    :ivar name: the schedule's name: its rows in the store's ``ticks`` table carry it.
    :ivar server: the server its runs start on (its own, or the one given as ``server=``).
    :ivar owns_server: True when the schedule started that server (and stops it in
        :meth:`stop`).
    """

    def __init__(
        self,
        srv: Flow,
        owns: bool,
        opts: _Options,
        conn: sqlite3.Connection,
        key: tuple[str, str],
    ) -> None:
        self.name = opts.name
        self.server = srv
        self.owns_server = owns
        self._opts = opts
        self._key = key  # (store path, name), which claim_name took: released as it ends
        self._pid = os.getpid()
        self._host = socket.gethostname()
        # Owned by the scheduler thread once it starts: the connection, the cursor (the last
        # tick it decided or saw decided), its run and its waiting ticks, oldest first.
        self._conn = conn
        self._cursor: datetime.datetime | None = None
        self._born = utcnow()
        self._active: RunHandle | None = None
        # The run of someone else that keeps the server busy, whose end wakes this schedule:
        # its callback is added once, however many ticks find it still running.
        self._blocker: RunHandle | None = None
        self._waiting: list[_Waiting] = []
        self._last_error = ""
        # Set by stop(), by the end of a run it waits for, and by stop() again to wake it.
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._stop_lock = threading.Lock()  # one stop() does the work; the others wait for it
        self._stopped = False
        self._next: datetime.datetime | None = opts.source.after(self._born)
        self._thread = threading.Thread(
            target=self._main, name=f"threadflow-schedule-{opts.name}", daemon=True
        )

    # -- public ------------------------------------------------------------------------------

    @property
    def next_fire(self) -> datetime.datetime | None:
        """The time of the next tick (aware, UTC), or None once stopped or if the cron
        expression matches no later time. A snapshot: the scheduler thread moves it on."""
        return None if self._stopping.is_set() else self._next

    @property
    def stopped(self) -> bool:
        """True once :meth:`stop` was called, or the schedule ended because its server stopped."""
        return self._stopping.is_set()

    @property
    def store(self) -> EventStore:
        """The ``EventStore`` the schedule records its ticks in (its server's)."""
        return self.server.store

    def ticks(self, limit: int | None = None) -> list[Tick]:
        """This schedule's recorded ticks, oldest first: ``store.ticks(name)``."""
        return self.store.ticks(self.name, limit=limit)

    def stop(self, timeout: float | None = None) -> None:
        """Stop the schedule: no more ticks; idempotent.

        The scheduler thread wakes at once and is joined (a decision it is writing ends first).
        Ticks it had queued and not started yet are recorded ``skipped``. A run the schedule
        started goes on if the server is yours (``server=``); if the schedule started its own
        server, that server is stopped as ``Flow.stop(timeout)`` does: a run still going is
        recorded interrupted, to replay or resume.
        """
        if threading.current_thread() is self._thread:
            self._stopping.set()
            return
        with self._stop_lock:
            self._stopping.set()
            self._wake.set()
            if not self._stopped:
                self._stopped = True
                if self._thread.is_alive():
                    self._thread.join(JOIN_TIMEOUT)
                    if self._thread.is_alive():
                        log.warning(
                            "threadflow: schedule %r: the scheduler thread is still waiting "
                            "for the store after %g s; it ends once the store answers",
                            self.name,
                            JOIN_TIMEOUT,
                        )
                if self.owns_server:
                    self.server.stop(timeout)

    def __enter__(self) -> Schedule:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "stopped" if self.stopped else f"next {iso(self._next) if self._next else '-'}"
        return f"<Schedule {self.name!r} {self._opts.what} {state}>"

    # -- the scheduler thread ----------------------------------------------------------------

    def _main(self) -> None:
        first = True
        try:
            while not self._stopping.is_set():
                # Cleared before the state is read: a wake-up set from now on is not lost.
                self._wake.clear()
                now = utcnow()
                failed = False
                try:
                    if first or (self._next is not None and self._next <= now):
                        self._decide(now, first)
                        first = False
                    elif self._waiting:
                        self._start_waiting_in_tx()
                    self._last_error = ""
                except _ServerGone:
                    break
                except Exception as exc:  # the store, or the server: tried again, not a crash
                    failed = True
                    self._logged_once(f"{type(exc).__name__}: {exc}; trying again")
                if self._cursor is not None:
                    self._next = self._opts.source.after(self._cursor)
                if not failed and self._next is not None and self._next <= now:
                    # Every tick up to now was decided: a next tick not after now is a bug of
                    # the tick arithmetic; wait rather than spin on it.
                    failed = True
                    self._logged_once(f"tick {iso(self._next)} is due but was not decided")
                if self._stopping.is_set():
                    break
                # Waits for the next tick, but looks at the wall clock at least every
                # clock_check seconds: Event.wait counts real (monotonic) seconds, which stand
                # still while the machine sleeps, and the wall clock may be set or frozen.
                timeout = self._opts.clock_check
                if self._next is not None and not failed:
                    until = (self._next - utcnow()).total_seconds()
                    timeout = max(0.0, min(timeout, until))
                self._wake.wait(timeout)
        except BaseException:
            log.exception("threadflow: schedule %r failed and stopped", self.name)
            raise
        finally:
            self._stopping.set()
            self._give_up_waiting("the schedule stopped before this tick could run")
            self._conn.close()
            release_name(self._key)

    def _logged_once(self, message: str) -> None:
        if message != self._last_error:
            log.error("threadflow: schedule %r: %s", self.name, message)
        self._last_error = message

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One decision: a write transaction that takes the store's lock up front."""
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _insert(
        self,
        conn: sqlite3.Connection,
        tick: datetime.datetime,
        decision: str,
        detail: str | None,
        run_id: str | None = None,
        count: int = 1,
        first: datetime.datetime | None = None,
    ) -> bool:
        """Record a tick's decision; False if some process had recorded that tick already."""
        cur = conn.execute(
            "INSERT OR IGNORE INTO ticks (schedule, tick, decision, run_id, count, first, "
            "detail, decided, pid, host, lease) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (
                self.name,
                iso(tick),
                decision,
                run_id,
                count,
                None if first is None else iso(first),
                detail,
                iso(utcnow()),
                self._pid,
                self._host,
                wall(),
            ),
        )
        return cur.rowcount == 1

    def _update(
        self,
        conn: sqlite3.Connection,
        tick: datetime.datetime,
        decision: str,
        detail: str | None,
        run_id: str | None = None,
    ) -> None:
        conn.execute(
            "UPDATE ticks SET decision = ?, detail = ?, run_id = ?, decided = ?, lease = ? "
            "WHERE schedule = ? AND tick = ?",
            (decision, detail, run_id, iso(utcnow()), wall(), self.name, iso(tick)),
        )

    # -- deciding ----------------------------------------------------------------------------

    def _decide(self, now: datetime.datetime, first: bool) -> None:
        """Decide every tick up to ``now`` that no process has decided yet, in one transaction."""
        opts = self._opts
        source = opts.source
        with self._tx() as conn:
            if first:
                self._clear_dead_waiting(conn)
            row = conn.execute(
                "SELECT max(tick) FROM ticks WHERE schedule = ?", (self.name,)
            ).fetchone()
            last = None if row[0] is None else datetime.datetime.fromisoformat(row[0])
            # Decided already: up to the last tick any process recorded, or this scheduler saw.
            # A schedule never recorded starts at its birth (nothing before it was missed).
            after = self._born if last is None else last
            if self._cursor is not None:
                after = max(after, self._cursor)
            # The ticks in (after, now]: live ones (after this scheduler's birth, and late by
            # less than grace) run as ticks; the older ones were missed: no scheduler looked
            # (the app was down, the machine slept), and catch_up decides.
            cutoff = max(after, self._born, now - datetime.timedelta(seconds=opts.grace))
            live: list[datetime.datetime] = []
            for t in source.backwards(now):
                if t <= cutoff or len(live) == LIVE_AT_ONCE:
                    break
                live.append(t)
            live.reverse()
            missed_to = live[0] - _MICRO if live else now
            latest_missed = next(source.backwards(missed_to), None)
            if latest_missed is not None and latest_missed > after:
                reason = "no scheduler was running" if first else "the scheduler was late"
                self._missed(conn, after, missed_to, bool(live), reason)
            for t in live:
                self._live(conn, t)
            self._cursor = live[-1] if live else max(after, latest_missed or after)
            self._start_waiting(conn)

    def _missed(
        self,
        conn: sqlite3.Connection,
        after: datetime.datetime,
        upto: datetime.datetime,
        live: bool,
        reason: str,
    ) -> None:
        """The ticks in (after, upto] passed unseen: apply ``catch_up``, write bounded rows."""
        opts = self._opts
        source = opts.source
        # Which of them run: none; the latest (unless a live tick, later still, runs anyway);
        # or the latest catch_up_limit of them, oldest first.
        want = {"none": 0, "latest": 0 if live else 1, "all": opts.catch_up_limit}[opts.catch_up]
        newest: list[datetime.datetime] = []
        for t in source.backwards(upto):
            if t <= after or len(newest) > want:
                break
            newest.append(t)
        newest.reverse()  # the latest want + 1 of them (fewer if there are fewer), oldest first
        to_run = newest[-want:] if want else []
        rest_to = newest[-want - 1] if len(newest) > want else None
        if rest_to is not None:
            count = source.count(after, rest_to)
            first = source.after(after)
            counted = f"{count}" if count is not None else f"more than {MISSED_COUNTED}"
            detail = f"{counted} ticks from {iso(first) if first else '?'} missed: {reason}"
            if opts.catch_up != "none":
                detail += f" (catch_up={opts.catch_up!r} runs only the latest {want})"
            self._insert(
                conn, rest_to, "missed", detail, count=count or MISSED_COUNTED, first=first
            )
        for t in to_run:
            if self._insert(conn, t, "catching_up", f"missed ({reason}); runs as a catch-up"):
                self._waiting.append(_Waiting(t, "catching_up"))

    def _live(self, conn: sqlite3.Connection, tick: datetime.datetime) -> None:
        """A tick on time (or late by less than grace): fire it, or apply ``overlap``."""
        busy = self._busy(conn)
        if busy is None and not self._waiting:
            handle = self._fire(conn, tick)
            if isinstance(handle, RunHandle):
                self._insert(conn, tick, "fired", None, handle.run_id)
                return
            busy = handle  # the server is busy with a run this schedule did not start
        elif busy is None:
            busy = f"tick {iso(self._waiting[0].tick)} waits to run first"
        if self._opts.overlap == "skip":
            self._insert(conn, tick, "skipped", busy)
            return
        queued = self._queued_elsewhere(conn) or next(
            (iso(w.tick) for w in self._waiting if w.decision == "queued"), None
        )
        if queued is not None:
            self._insert(conn, tick, "skipped", f"{busy}; tick {queued} is queued already")
        elif self._insert(conn, tick, "queued", busy):
            self._waiting.append(_Waiting(tick, "queued"))

    def _busy(self, conn: sqlite3.Connection) -> str | None:
        """What keeps the schedule from starting a run now (its run still going, in this
        process or in another one sharing the store), or None."""
        if self._active is not None and not self._active.done():
            return f"run {self._active.run_id} of this schedule is still running"
        row = conn.execute(
            "SELECT t.run_id, t.pid, t.host, t.lease, r.outcome, r.pid, r.host, r.heartbeat, "
            "r.run_id FROM ticks t LEFT JOIN runs r ON r.run_id = t.run_id "
            "WHERE t.schedule = ? AND t.run_id IS NOT NULL ORDER BY t.tick DESC LIMIT 1",
            (self.name,),
        ).fetchone()
        if row is None or (self._active is not None and row[0] == self._active.run_id):
            return None
        run_id, pid, host, lease, outcome, r_pid, r_host, heartbeat, known = row
        if known is None:  # started, its first row not committed yet: its process tells
            running = owner_alive(pid, host, lease)
        else:
            running = outcome is None and owner_alive(r_pid, r_host, heartbeat)
        if running:
            return f"run {run_id} of this schedule is still running (process {pid} on {host})"
        return None

    def _queued_elsewhere(self, conn: sqlite3.Connection) -> str | None:
        """A tick of this schedule another live process has queued, if any (one at most)."""
        for tick, pid, host in conn.execute(
            "SELECT tick, pid, host FROM ticks WHERE schedule = ? AND decision = 'queued'",
            (self.name,),
        ):
            if pid != self._pid and pid_alive(pid, host):
                return str(tick)
        return None

    def _fire(self, conn: sqlite3.Connection, tick: datetime.datetime) -> RunHandle | str:
        """Start the tick's run, in the caller's transaction: its handle, or why the server
        cannot start it now.

        :raises _ServerGone: if the server is stopped: the schedule ends.
        """
        opts = self._opts
        inputs = dict(opts.inputs)
        if opts.tick_input is not None:
            inputs[opts.tick_input] = iso(tick)
        try:
            handle: RunHandle = self.server.start_flow(opts.entrance, **inputs)
        except FlowRunning as exc:
            # A run this schedule did not start (a manual one, another schedule's): wake up
            # when it ends, to start what waits.
            other = self.server._core.busy_with()
            if other is not None and other is not self._blocker:
                self._blocker = other
                other._call_when_done(self._woken)
            return f"server {self.server.name!r} is busy with run {exc.run_id}"
        except ThreadflowError as exc:
            if self.server._core.stopped:
                log.warning(
                    "threadflow: schedule %r stops: its server %r was stopped",
                    self.name,
                    self.server.name,
                )
                raise _ServerGone from exc
            raise
        self._active = handle
        handle._call_when_done(self._woken)
        return handle

    def _woken(self, _handle: RunHandle) -> None:
        # On the coordinator thread, as a run ends: only set the Event.
        self._wake.set()

    def _start_waiting_in_tx(self) -> None:
        if self._active is not None and not self._active.done():
            return  # its end wakes the thread
        with self._tx() as conn:
            self._start_waiting(conn)

    def _start_waiting(self, conn: sqlite3.Connection) -> None:
        """Start the oldest waiting tick, if nothing keeps the schedule from it."""
        if not self._waiting or self._busy(conn) is not None:
            return
        waiting = self._waiting[0]
        handle = self._fire(conn, waiting.tick)
        if not isinstance(handle, RunHandle):
            return
        self._waiting.pop(0)
        late = (utcnow() - waiting.tick).total_seconds()
        if waiting.decision == "queued":
            decision, detail = "fired", f"queued; started {late:.3f} s after its tick"
        else:
            decision, detail = "caught_up", f"missed; caught up {late:.3f} s after its tick"
        self._update(conn, waiting.tick, decision, detail, handle.run_id)

    def _clear_dead_waiting(self, conn: sqlite3.Connection) -> None:
        """Ticks left waiting by a process that ended before it could run them: skipped."""
        rows = conn.execute(
            f"SELECT tick, pid, host FROM ticks WHERE schedule = ? AND decision IN "
            f"({','.join('?' * len(_PENDING))})",
            (self.name, *_PENDING),
        ).fetchall()
        for tick, pid, host in rows:
            if pid == self._pid or not pid_alive(pid, host):
                self._update(
                    conn,
                    datetime.datetime.fromisoformat(tick),
                    "skipped",
                    f"its process ({pid} on {host}) ended before it could run this tick",
                )

    def _give_up_waiting(self, why: str) -> None:
        if not self._waiting:
            return
        try:
            with self._tx() as conn:
                for waiting in self._waiting:
                    self._update(conn, waiting.tick, "skipped", why)
        except sqlite3.Error as exc:
            log.error("threadflow: schedule %r could not record its end: %s", self.name, exc)
        self._waiting.clear()


class _ServerGone(Exception):
    """The schedule's server was stopped: the schedule ends."""


def claim_name(path: str, name: str) -> tuple[str, str]:
    """Take the schedule name ``name`` on store ``path`` for this process.

    :raises ThreadflowError: if a running schedule of this process has it.
    """
    key = (os.path.abspath(path), name)
    with _running_lock:
        if key in _running:
            raise ThreadflowError(
                f"a schedule named {name!r} is already running in this process on {path!r}; "
                "stop it first, or give this one another name= (two schedules of one flow "
                "need two names)"
            )
        _running.add(key)
    return key


def release_name(key: tuple[str, str]) -> None:
    with _running_lock:
        _running.discard(key)


def start(srv: Flow, owns: bool, opts: _Options, key: tuple[str, str]) -> Schedule:
    """Start the schedule's thread on server ``srv`` (checked by ``Flow.schedule``), under the
    name ``key`` that ``claim_name`` took."""
    # The scheduler thread's own connection; the server's writer has brought the store to this
    # version's schema (its ticks table) before start_link returned.
    sched = Schedule(srv, owns, opts, connect(srv.store.path, shared=True), key)
    sched._thread.start()
    return sched
