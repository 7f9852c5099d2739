"""The one fold: ``EventStore.history`` (SQLite counting the bulk of the log) is the plain fold of
every event, field by field, on random logs that the engine could have written.

The logs are written by a small model of the coordinator, into a real store through the
coordinator's own ``Writer``: runs of one to three stages whose parents add children and may
fail and retry (their children discarded); children that fail, time out, are retried, are
tolerated or fail the run, add grandchildren; segments that end ``all_over``, ``failed_over``,
``interrupted`` (a stop, with attempts ending while it waits) or with no final event at all (a
kill); then replays an hour later, which run what had not finished, or run stages again from
scratch (a ``rerun`` list: their code changed), forgetting their work. Another run writes its
events in between. The two folds are compared at random points of the log, not only at its end,
so that open segments (running attempts, children held by a running parent) are compared too.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import json
import os
import tempfile
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from threadflow import EventStore
from threadflow.events import Event, RunHistory, fold
from threadflow.store import Follower, Writer

BASE = datetime.datetime(2030, 1, 1, tzinfo=datetime.timezone.utc)
RUN = "run-under-test"
OTHER = "another-run"
ERROR = {"type": "ValueError", "message": "broken"}


def comparable(history: RunHistory) -> dict[str, Any]:
    """Every field of the fold, times and running attempts included; not the private records it
    counts with (see :func:`continuable`)."""
    fields = dataclasses.asdict(history)
    fields["tasks"] = {
        name: {k: v for k, v in task.items() if not k.startswith("_")}
        for name, task in fields["tasks"].items()
    }
    for name, task in history.tasks.items():
        fields["tasks"][name]["running"] = task.running_attempts(history.last_ts)
    fields["running"] = history.running_attempts(history.last_ts, limit=3)
    return fields


def continuable(history: RunHistory) -> dict[str, Any]:
    """What the fold keeps to go on counting: equal, so that both go on alike."""
    return {
        name: (
            task._open,
            task._parent_open,
            task._failed,
            task._tolerated,
            task._released_rows,
            task._seg_added - task._seg_gone if history.segment_open else None,
        )
        for name, task in history.tasks.items()
    }


def check_folds_agree(
    path: str, writer: Writer, followers: list[Follower] | None = None
) -> RunHistory:
    """The SQL fold is the plain fold; what the listing and the status say is the fold's; and a
    fold that goes on from an SQL fold taken earlier (a :class:`Follower`) is the plain fold
    too."""
    store = EventStore(path)
    quick = store.history(RUN)
    full = fold(store.iter_rows(RUN), RUN)
    assert comparable(quick) == comparable(full)
    assert continuable(quick) == continuable(full)
    if followers is not None:
        followers.append(store.follow(RUN))  # starts here, with the SQL fold
        for follower in followers:
            followed = follower.update()
            assert comparable(followed) == comparable(full)
            assert continuable(followed) == continuable(full)
            assert follower.status() == store.status(RUN)
    (info,) = [r for r in store.runs() if r.run_id == RUN]
    assert (info.outcome, info.ended, info.children_done, info.children_failed) == (
        full.outcome,
        full.ended,
        full.children_done,
        full.children_failed,
    )
    assert (info.active, info.wall, info.segments) == (full.active, full.wall, full.segments)
    assert store.status(RUN) == info.status
    # The results a task reads (results(state, task), RunResult.results) are the children the
    # fold counts done: after a rerun, only those of the stage's new work.
    for name, task in full.tasks.items():
        assert len(list(store.results(RUN, name))) == task.children_done
    if not full.segment_open:
        # What a replay would run again is what the fold does not count as finished.
        for name, task in full.tasks.items():
            unfinished = sum(
                len(writer.read_unfinished_children(RUN, name, lo, hi, 10**6))
                for lo, hi in task.released
            )
            assert unfinished == task.children_added - task.children_done - (
                task.children_tolerated
            )
    return full


@dataclasses.dataclass
class Stage:
    name: str
    children: bool
    tolerant: bool  # exit_on_failed=False
    limit: int  # attempts
    all_over: bool = False
    parent_over: bool = False
    released: list[int] = dataclasses.field(default_factory=list)  # child_added seqs
    ranges: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    finished: set[int] = dataclasses.field(default_factory=set)
    done: int = 0
    tolerated: int = 0


class SegmentOver(Exception):
    """The segment ended; ``args[0]`` is its final kind, None for a kill (no final event)."""


class Model:
    """Writes a run's events the way the coordinator does; hypothesis draws every choice."""

    def __init__(self, writer: Writer, data: st.DataObject, stages: list[Stage]) -> None:
        self.w = writer
        self.draw = data.draw
        self.stages = stages
        self.clock = 0.0
        self.segment = 1
        self.failed: list[list[Any]] = []
        self.ids: dict[int, Any] = {}  # child_added seq -> child id
        self.fail_rate = self.draw(st.sampled_from([2, 4, 6]))  # of 10 attempts, those that fail
        # Attempts running in this segment: (task, ref) -> [attempt, held ranges, child id].
        self.open: dict[tuple[str, int | None], list[Any]] = {}
        # Quick child attempts: started, no task_started row written yet.
        self.quick: dict[tuple[str, int | None], tuple[int, Any]] = {}
        #: Folds that go on from the SQL fold of an earlier point of the log.
        self.followers: list[Follower] = []

    def check(self) -> None:
        self.w.commit()
        check_folds_agree(self.w.path, self.w, self.followers)

    # -- writing

    def ts(self) -> str:
        self.clock += self.draw(st.sampled_from([0.0, 0.0005, 0.003, 0.25]))
        return (BASE + datetime.timedelta(seconds=self.clock)).isoformat()

    def event(
        self,
        kind: str,
        task: str | None = None,
        child: Any = None,
        attempt: int | None = None,
        ref: int | None = None,
        data: Any = None,
    ) -> None:
        child_json = None if child is None else json.dumps(child)
        text = None if data is None else json.dumps(data)
        self.w.append([(RUN, self.ts(), kind, task, child_json, attempt, ref, text)])
        if self.draw(st.integers(0, 15)) == 0:  # another run writes meanwhile
            self.w.append([(OTHER, self.ts(), "task_started", "a", "1", 1, 1, None)])
        if self.draw(st.integers(0, 12)) == 0:
            self.check()

    def add_children(self, stage: Stage, ids: list[Any], attempt: int, by: Any) -> list[int]:
        rows = [
            (
                RUN,
                self.ts(),
                "child_added",
                stage.name,
                json.dumps(i),
                attempt,
                None,
                json.dumps({"payload": i, "by": by}),
            )
            for i in ids
        ]
        first = self.w.add_children(RUN, stage.name, rows, [json.dumps(i) for i in ids])
        for seq, child_id in enumerate(ids, first):
            self.ids[seq] = child_id
        return [first, first + len(ids) - 1]

    # -- the run and its segments

    def run(self) -> None:
        first = self.stages[0].name
        self.w.run_started(
            {
                "run_id": RUN,
                "flow": "Model",
                "server": "Model",
                "entrance": first,
                "started": self.ts(),
                "pid": 1,
                "host": "nowhere",
                "heartbeat": 0.0,
            }
        )
        nexts = {
            s.name: [n.name for n in self.stages[i + 1 : i + 2]] for i, s in enumerate(self.stages)
        }
        self.event(
            "flow_started",
            data={"flow": "Model", "entrance": first, "server": "Model", "definition": nexts},
        )
        while True:
            outcome = self.segment_body()
            self.check()
            if outcome == "all_over" or self.segment >= 4 or self.draw(st.integers(0, 4)) == 0:
                return
            self.open.clear()
            self.quick.clear()
            # Now and then the code of a stage changed and the replay reruns it, and every
            # stage after it, from scratch (on_change="rerun"): the fold forgets their work.
            rerun: list[str] = []
            if self.draw(st.integers(0, 2)) == 0:
                first = self.draw(st.integers(0, len(self.stages) - 1))
                for stage in self.stages[first:]:
                    rerun.append(stage.name)
                    fresh = Stage(stage.name, stage.children, stage.tolerant, stage.limit)
                    self.stages[self.stages.index(stage)] = fresh
                self.failed = [f for f in self.failed if f[0] not in rerun]
            self.w.drop_unreleased_children(RUN, [r for s in self.stages for r in s.ranges])
            self.clock += 3600  # the replay comes an hour later: not running time
            self.segment += 1
            data: dict[str, Any] = {"segment": self.segment, "previous_outcome": outcome}
            if rerun:
                data["rerun"] = rerun
            self.event("replayed", data=data)

    def segment_body(self) -> str | None:
        try:
            for stage in self.stages:
                if stage.all_over:
                    continue
                if not stage.parent_over:
                    self.parent(stage)
                self.children(stage)
                self.event(
                    "task_all_over",
                    stage.name,
                    data={"done": stage.done, "failed": stage.tolerated},
                )
                stage.all_over = True
            self.end("all_over", {"failed": self.failed})
        except SegmentOver as over:
            return over.args[0]
        raise AssertionError("unreachable")  # pragma: no cover

    def materialize(self, name: str, ref: int) -> None:
        """The task_started row of a quick attempt, written late, as the coordinator does for
        one that does not end in a plain success before the commit."""
        quick = self.quick.pop((name, ref), None)
        if quick is not None:
            attempt, child = quick
            self.event("task_started", name, child, attempt, ref)

    def end(self, kind: str, data: dict[str, Any]) -> None:
        """The final event, then what may come after it: late outcomes, a callback error."""
        for name, ref in list(self.quick):
            self.materialize(name, ref)
        self.event(kind, data=data)
        for (name, ref), (attempt, _, child) in list(self.open.items())[:2]:
            self.event("stale", name, child, attempt, ref, {"outcome": "over"})
        self.open.clear()
        self.quick.clear()
        if self.draw(st.integers(0, 3)) == 0:
            self.event("callback_error", data={"signal": kind, "receiver": "r", "error": ERROR})
        raise SegmentOver(kind)

    def maybe_stop(self) -> None:
        """Now and then the segment ends here: its process is killed, or the server stops."""
        if self.draw(st.integers(0, 25)) != 0:
            return
        if self.draw(st.booleans()):
            raise SegmentOver(None)  # killed: no final event
        for (name, ref), (attempt, held, child) in list(self.open.items()):
            stage = next(s for s in self.stages if s.name == name)
            how = self.draw(st.sampled_from(["task_over", "exit", "abandoned"]))
            del self.open[(name, ref)]
            self.materialize(name, ref)
            self.event(how, name, child, attempt, ref)
            if how == "task_over":  # recorded while stopping: it releases what it added
                self.succeeded(stage, ref, child, attempt, held)
        if self.draw(st.booleans()):  # look while the stop waits, or after a kill just then
            self.check()
            if self.draw(st.booleans()):
                raise SegmentOver(None)
        self.end("interrupted", {"reason": "stop"})

    def succeeded(
        self, stage: Stage, ref: int | None, child: Any, attempt: int, held: list[list[int]]
    ) -> list[int]:
        if held:
            self.event("children_released", stage.name, child, attempt, ref, {"ranges": held})
        new = [seq for lo, hi in held for seq in range(lo, hi + 1)]
        stage.ranges.extend((lo, hi) for lo, hi in held)
        stage.released.extend(new)
        if ref is None:
            stage.parent_over = True
        else:
            stage.finished.add(ref)
            stage.done += 1
        return new

    def failed_attempt(
        self, stage: Stage, ref: int | None, child: Any, attempt: int, held: list[list[int]]
    ) -> None:
        how = self.draw(st.sampled_from(["exit", "timeout"]))
        self.event(how, stage.name, child, attempt, ref, {"error": ERROR})
        if how == "timeout" and self.draw(st.booleans()):
            self.event("abandoned", stage.name, child, attempt, ref)  # after the grace
        if held:
            self.w.discard_children([(lo, hi) for lo, hi in held])
            count = sum(hi - lo + 1 for lo, hi in held)
            self.event("children_discarded", stage.name, child, attempt, ref, {"count": count})

    # -- a stage

    def parent(self, stage: Stage) -> None:
        for attempt in range(1, stage.limit + 1):
            self.event("task_started", stage.name, None, attempt)
            held: list[list[int]] = []
            self.open[(stage.name, None)] = [attempt, held, None]
            count = self.draw(st.integers(0, 4)) if stage.children else 0
            if count:
                held.append(self.add_children(stage, list(range(count)), attempt, None))
            self.maybe_stop()
            del self.open[(stage.name, None)]
            if self.draw(st.integers(0, 9)) >= self.fail_rate:
                self.event("task_over", stage.name, None, attempt)
                self.succeeded(stage, None, None, attempt, held)
                return
            self.failed_attempt(stage, None, None, attempt, held)
            if attempt < stage.limit:
                self.event(
                    "retry",
                    stage.name,
                    None,
                    attempt,
                    None,
                    {"delay": 0, "next_attempt": attempt + 1},
                )
                continue
            self.event(
                "task_failed", stage.name, None, attempt, None, {"error": ERROR, "tolerated": False}
            )
            self.end("failed_over", {"task": [stage.name], "error": ERROR, "failed": self.failed})

    def children(self, stage: Stage) -> None:
        waiting = collections.deque(s for s in stage.released if s not in stage.finished)
        attempts: dict[int, int] = {}  # attempts start at 1 again in each segment
        while waiting or any(name == stage.name for name, _ in self.open):
            running = [ref for name, ref in self.open if name == stage.name]
            if waiting and (not running or (len(running) < 3 and self.draw(st.booleans()))):
                ref = waiting.popleft()
                attempt = attempts[ref] = attempts.get(ref, 0) + 1
                child = self.ids[ref]
                held: list[list[int]] = []
                self.open[(stage.name, ref)] = [attempt, held, child]
                if self.draw(st.integers(0, 2)) == 0:
                    # Quick: no task_started row unless it ends otherwise than in a plain
                    # success (the coordinator writes one outcome row, task_ran, for it).
                    self.quick[(stage.name, ref)] = (attempt, child)
                    self.maybe_stop()
                    continue
                self.event("task_started", stage.name, child, attempt, ref)
                if not isinstance(child, list) and self.draw(st.integers(0, 4)) == 0:
                    ids = [[child, k] for k in range(self.draw(st.integers(1, 3)))]
                    held.append(self.add_children(stage, ids, attempt, child))
                self.maybe_stop()
                continue
            ref = self.draw(st.sampled_from(running))
            attempt, held, child = self.open.pop((stage.name, ref))
            if self.draw(st.integers(0, 9)) >= self.fail_rate:
                if self.quick.pop((stage.name, ref), None) is not None:
                    data = {"started": self.ts(), "result": 1}
                    self.event("task_ran", stage.name, child, attempt, ref, data)
                else:
                    self.event("task_over", stage.name, child, attempt, ref, {"result": 1})
                waiting.extend(self.succeeded(stage, ref, child, attempt, held))
                continue
            self.materialize(stage.name, ref)
            self.failed_attempt(stage, ref, child, attempt, held)
            if attempt < stage.limit:
                self.event(
                    "retry",
                    stage.name,
                    child,
                    attempt,
                    ref,
                    {"delay": 0, "next_attempt": attempt + 1},
                )
                waiting.appendleft(ref)
                continue
            self.event(
                "task_failed",
                stage.name,
                child,
                attempt,
                ref,
                {"error": ERROR, "tolerated": stage.tolerant},
            )
            if not stage.tolerant:
                self.end(
                    "failed_over",
                    {"task": [stage.name, child], "error": ERROR, "failed": self.failed},
                )
            self.failed.append([stage.name, child])
            stage.finished.add(ref)
            stage.tolerated += 1


stages = st.lists(
    st.tuples(st.booleans(), st.booleans(), st.integers(1, 3)), min_size=1, max_size=3
).map(lambda specs: [Stage(f"s{i}", *spec) for i, spec in enumerate(specs)])


@settings(max_examples=150, deadline=None)
@given(stages=stages, data=st.data())
def test_the_sql_fold_is_the_fold_of_every_event(stages, data):
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "runs.db")
        writer = Writer(path)
        model = Model(writer, data, stages)
        try:
            model.run()
            writer.commit()
            history = check_folds_agree(path, writer, model.followers)
        finally:
            for follower in model.followers:
                follower.close()
            writer.close()
    assert history.events > 0


# --- what the fold says, on logs written by hand ---------------------------------------------


def write(path: str, rows: list[tuple[Any, ...]]) -> list[Event]:
    """Append ``(seconds, kind, task, child, attempt, ref, data)`` rows of run RUN; return the
    events as stored (seqs start at 1 in a new store)."""
    writer = Writer(path)
    try:
        writer.run_started(
            {
                "run_id": RUN,
                "flow": "F",
                "server": "F",
                "entrance": "s",
                "started": BASE.isoformat(),
                "pid": 1,
                "host": "h",
                "heartbeat": 0.0,
            }
        )
        writer.append(
            [
                (
                    RUN,
                    (BASE + datetime.timedelta(seconds=t)).isoformat(),
                    kind,
                    task,
                    None if child is None else json.dumps(child),
                    attempt,
                    ref,
                    None if data is None else json.dumps(data),
                )
                for t, kind, task, child, attempt, ref, data in rows
            ]
        )
        writer.commit()
    finally:
        writer.close()
    return list(EventStore(path).iter_rows(RUN))


def both_folds(path: str) -> RunHistory:
    quick = EventStore(path).history(RUN)
    full = fold(EventStore(path).iter_rows(RUN), RUN)
    assert comparable(quick) == comparable(full)
    return full


@pytest.fixture
def replayed_log(store_path):
    """A parent that added two children and failed, its retry that added them again; child 1
    fails the run; ten seconds later a replay where child 1 succeeds, and a third child
    tolerated."""
    rows = [
        (0.0, "flow_started", None, None, None, None, {"flow": "F", "entrance": "s"}),
        (0.0, "task_started", "s", None, 1, None, None),
        (0.1, "child_added", "s", 0, 1, None, {"payload": 0}),  # seq 3
        (0.1, "child_added", "s", 1, 1, None, {"payload": 1}),
        (0.2, "exit", "s", None, 1, None, {"error": ERROR}),
        (0.2, "children_discarded", "s", None, 1, None, {"count": 2}),
        (0.2, "retry", "s", None, 1, None, {"delay": 0, "next_attempt": 2}),
        (0.3, "task_started", "s", None, 2, None, None),
        (0.3, "child_added", "s", 0, 2, None, {"payload": 0}),  # seq 9
        (0.3, "child_added", "s", 1, 2, None, {"payload": 1}),
        (0.3, "child_added", "s", 2, 2, None, {"payload": 2}),
        (0.4, "task_over", "s", None, 2, None, None),
        (0.4, "children_released", "s", None, 2, None, {"ranges": [[9, 11]]}),
        (0.5, "task_started", "s", 0, 1, 9, None),
        (0.5, "task_started", "s", 1, 1, 10, None),
        (0.6, "task_over", "s", 0, 1, 9, {"result": 0}),
        (0.7, "exit", "s", 1, 1, 10, {"error": ERROR}),
        (0.7, "task_failed", "s", 1, 1, 10, {"error": ERROR, "tolerated": False}),
        (1.0, "failed_over", None, None, None, None, {"task": ["s", 1], "error": ERROR}),
        (11.0, "replayed", None, None, None, None, {"segment": 2}),
        (11.0, "task_started", "s", 1, 1, 10, None),
        (11.0, "task_started", "s", 2, 1, 11, None),
        (11.5, "task_over", "s", 1, 1, 10, {"result": 1}),
        (11.5, "exit", "s", 2, 1, 11, {"error": ERROR}),
        (11.5, "task_failed", "s", 2, 1, 11, {"error": ERROR, "tolerated": True}),
        (12.0, "task_all_over", "s", None, None, None, {"done": 2, "failed": 1}),
        (12.0, "all_over", None, None, None, None, {"failed": [["s", 2]]}),
    ]
    write(store_path, rows)
    return store_path


def test_children_are_counted_once_net_of_a_failed_attempts_adds(replayed_log):
    task = both_folds(replayed_log).tasks["s"]
    assert task.children_added == 3  # not 5: the first attempt's two were discarded
    assert (task.children_done, task.children_failed, task.children_tolerated) == (2, 1, 1)
    assert task.children_recovered == 1  # child 1: failed in segment 1, done in segment 2
    assert (task.attempts, task.children_started, task.exits, task.retries) == (2, 4, 3, 1)


def test_the_run_lasts_its_segments_not_the_pause_before_the_replay(replayed_log):
    history = both_folds(replayed_log)
    assert [(s.outcome, s.seconds) for s in history.spans] == [
        ("failed_over", 1.0),
        ("all_over", 1.0),
    ]
    assert (history.active, history.wall) == (2.0, 12.0)
    assert (
        history.active_between(
            (BASE + datetime.timedelta(seconds=0.5)).isoformat(),
            (BASE + datetime.timedelta(seconds=11.5)).isoformat(),
        )
        == 1.0
    )
    assert (history.outcome, history.failed, history.task) == ("all_over", [("s", 2)], None)


def test_a_running_segment_counts_held_children_and_running_attempts(store_path):
    rows = [
        (0.0, "flow_started", None, None, None, None, {"flow": "F", "entrance": "s"}),
        (0.0, "task_started", "s", None, 1, None, None),
        (0.1, "child_added", "s", 0, 1, None, {"payload": 0}),  # seq 3
        (0.1, "child_added", "s", 1, 1, None, {"payload": 1}),
        (0.2, "task_over", "s", None, 1, None, None),
        (0.2, "children_released", "s", None, 1, None, {"ranges": [[3, 4]]}),
        (0.3, "task_started", "s", 0, 1, 3, None),
        (0.3, "task_started", "s", 1, 1, 4, None),
        (0.4, "child_added", "s", [1, 0], 1, None, {"payload": 0, "by": 1}),  # held by child 1
        (0.5, "timeout", "s", 0, 1, 3, {"error": ERROR}),
        (0.5, "retry", "s", 0, 1, 3, {"delay": 0, "next_attempt": 2}),
        (0.6, "task_started", "s", 0, 2, 3, None),
        (2.0, "abandoned", "s", 0, 1, 3, None),  # the timed-out thread: no longer running
    ]
    write(store_path, rows)
    history = both_folds(store_path)
    task = history.tasks["s"]
    assert history.segment_open and history.outcome is None
    assert (task.children_added, task.children_running, task.parent) == (3, 2, "over")
    assert history.active == history.wall == 2.0
