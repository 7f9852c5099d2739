"""Replay: a failed or interrupted run goes on from its log (API.md section 6).

Each test writes a run into a real store file, fixes what broke it, replays it, and reads the
whole log back: which attempts ran in which segment (segments are split at ``replayed``
events), and how many ``task_over`` each child has across the log.
"""

import pickle
import queue
import threading
from collections import Counter

import pytest
from helpers import recording
from replay_flows import (
    BrokenParent,
    FanIn,
    Interruptible,
    ManyNumbers,
    Numbers,
    Tolerant,
    TwoStages,
    add_first,
    add_second,
    work_child,
)

from threadflow import (
    ALL_OVER,
    EventStore,
    Flow,
    FlowRunning,
    ReplayError,
    results,
    task,
)

GUARD = 30.0  # seconds; a hang guard for result(), never a synchronisation
CHILDREN_TO_FOLD = 10_000


# --- reading the log --------------------------------------------------------------------------


def segments(store_path, run_id):
    """The run's events, split into segments at each ``replayed`` event."""
    parts = [[]]
    for event in EventStore(store_path).iter_events(run_id):
        if event.kind == "replayed":
            parts.append([])
        parts[-1].append(event)
    return parts


def started(events):
    """``(task, child_id)`` of every ``task_started``, in order (child_id None for a parent)."""
    return [(e.task, e.child_id) for e in events if e.kind == "task_started"]


def overs(store_path, run_id):
    """How many ``task_over`` each ``(task, child_id)`` has across the whole log."""
    return Counter(
        (e.task, e.child_id) for e in EventStore(store_path).iter_events(run_id, "task_over")
    )


def only_once(task_name, ids):
    return Counter({(task_name, None): 1, **{(task_name, i): 1 for i in ids}})


def hold_until_stopped(flow, store_path, holds, **extra_state):
    """Start a run that holds the children ``holds``; stop the server once they all wait.

    Returns the interrupted run's result.
    """
    holding = queue.SimpleQueue()
    server = flow.start_link(store=store_path, hold=holds, holding=holding, **extra_state)
    try:
        handle = server.start_flow()
        waiting = {holding.get(timeout=GUARD) for _ in holds}
        assert waiting == set(holds)
    finally:
        server.stop(timeout=GUARD)
    return handle.result(timeout=GUARD)


# --- flows whose definition differs from the one that wrote the run --------------------------


class RenamedStage(Flow, server_name="replay-renamed-stage"):
    __qualname__ = "TwoStages"  # same flow name as replay_flows.TwoStages; 'second' renamed
    first = task(task_func=add_first, child_task_func=work_child, task_retry_limit=1, next="later")
    later = task(
        task_func=add_second, child_task_func=work_child, task_retry_limit=1, next=ALL_OVER
    )


class ChangedNext(Flow, server_name="replay-changed-next"):
    __qualname__ = "TwoStages"  # same flow name; 'first' no longer leads to 'second'
    default_entrance = "first"
    first = task(task_func=add_first, child_task_func=work_child, task_retry_limit=1, next=ALL_OVER)
    second = task(
        task_func=add_second, child_task_func=work_child, task_retry_limit=1, next=ALL_OVER
    )


class OtherName(TwoStages, server_name="replay-other-name"):
    """The same tasks and edges under another class name."""


class InterruptibleTwin(Interruptible, server_name="replay-interruptible-twin"):
    __qualname__ = "Interruptible"  # the same flow, served under a second server name


class ManyNumbersTwin(ManyNumbers, server_name="replay-many-numbers-twin"):
    __qualname__ = "ManyNumbers"


# --- finished work is not run again -----------------------------------------------------------


@pytest.mark.parametrize("fix", ["extra_state", "file"])
def test_replay_after_a_failed_child_reruns_it_and_the_children_after_it(store_path, tmp_path, fix):
    broken_file = tmp_path / "broken.txt"
    broken_file.write_text("2\n")
    if fix == "extra_state":
        breaks, fixed = {"broken": [2]}, {}
    else:
        breaks = fixed = {"broken_file": str(broken_file)}
    first_calls, replay_calls = [], []

    failed = Numbers.run(store=store_path, calls=first_calls, **breaks)
    assert (failed.outcome, failed.task) == ("failed_over", ("square", 2))
    broken_file.unlink()
    res = Numbers.replay(failed.run_id, store=store_path, calls=replay_calls, **fixed)

    assert res.outcome == "all_over"
    assert res.run_id == failed.run_id
    assert first_calls == [0, 1, 2]
    assert replay_calls == [2, 3, 4]
    first, second = segments(store_path, res.run_id)
    assert started(first) == [("square", None), ("square", 0), ("square", 1), ("square", 2)]
    assert started(second) == [("square", 2), ("square", 3), ("square", 4)]
    assert overs(store_path, res.run_id) == only_once("square", range(5))
    # The child that failed the run and succeeded on replay is done, not failed.
    [all_over] = [e for e in second if e.kind == "task_all_over"]
    assert all_over.data == {"done": 5, "failed": 0}
    assert list(results(res.state, "square")) == [(i, i * 10) for i in range(5)]
    [info] = EventStore(store_path).runs()
    assert (info.run_id, info.outcome, info.status) == (res.run_id, "all_over", "all_over")


def test_replay_after_a_failed_parent_reruns_it_from_attempt_one(store_path):
    failed = BrokenParent.run(store=store_path, broken=["split"])
    assert (failed.outcome, failed.task) == ("failed_over", ("split",))

    calls = []
    res = BrokenParent.replay(failed.run_id, store=store_path, calls=calls)

    assert res.outcome == "all_over"
    first, second = segments(store_path, res.run_id)
    assert [e.attempt for e in first if e.kind == "task_started"] == [1, 2]
    assert [(e.task, e.child_id, e.attempt) for e in second if e.kind == "task_started"][0] == (
        "split",
        None,
        1,
    )
    assert sorted(calls) == [0, 1, 2]
    assert Counter(started(second)) == only_once("split", range(3))
    assert [child for _, child in started(first)] == [None, None]
    assert overs(store_path, res.run_id) == only_once("split", range(3))
    assert list(results(res.state, "split")) == [(0, 0), (1, 10), (2, 20)]


def test_replay_after_stop_reruns_only_the_children_that_had_not_finished(store_path):
    # Two at a time: children 2 and 3 hold (2 after adding children 100 and 101), so 0 and 1
    # have finished and 4 and 5 wait when the server is stopped.
    interrupted = hold_until_stopped(
        Interruptible, store_path, {2, 3}, grandchildren={2: [100, 101]}
    )
    assert interrupted.outcome == "interrupted"
    assert EventStore(store_path).run(interrupted.run_id).outcome == "interrupted"

    calls = []
    res = Interruptible.replay(
        interrupted.run_id, store=store_path, calls=calls, grandchildren={2: [100, 101]}
    )

    assert res.outcome == "all_over"
    assert sorted(calls) == [2, 3, 4, 5, 100, 101]
    first, second = segments(store_path, res.run_id)
    assert sorted(child for _, child in started(second)) == [2, 3, 4, 5, 100, 101]
    ids = [0, 1, 2, 3, 4, 5, 100, 101]
    assert overs(store_path, res.run_id) == only_once("work", ids)
    assert list(results(res.state, "work")) == [(i, i * 10) for i in ids]


def test_replay_across_a_stage_boundary_runs_only_the_failed_child_stage(store_path):
    failed = TwoStages.run(store=store_path, broken=[11])
    assert (failed.outcome, failed.task) == ("failed_over", ("second", 11))

    res = TwoStages.replay(failed.run_id, store=store_path)

    assert res.outcome == "all_over"
    first, second = segments(store_path, res.run_id)
    assert ("first", None) in started(first)
    assert started(second) == [("second", 11), ("second", 12)]
    assert overs(store_path, res.run_id) == only_once("first", range(3)) + only_once(
        "second", range(10, 13)
    )


def test_replay_across_a_stage_boundary_reruns_a_failed_parent_stage(store_path):
    failed = TwoStages.run(store=store_path, broken=["second"])
    assert (failed.outcome, failed.task) == ("failed_over", ("second",))

    res = TwoStages.replay(failed.run_id, store=store_path)

    assert res.outcome == "all_over"
    _, second = segments(store_path, res.run_id)
    assert [task_name for task_name, _ in started(second)] == ["second"] * 4
    assert started(second)[0] == ("second", None)
    assert overs(store_path, res.run_id) == only_once("first", range(3)) + only_once(
        "second", range(10, 13)
    )


def test_replay_keeps_the_entrance_of_the_run(store_path):
    with TwoStages.start_link(store=store_path, broken=[11]) as server:
        failed = server.start_flow(entrance="second").result(timeout=GUARD)
    assert (failed.outcome, failed.task) == ("failed_over", ("second", 11))

    res = TwoStages.replay(failed.run_id, store=store_path)

    assert res.outcome == "all_over"
    assert [e for e in EventStore(store_path).events(res.run_id) if e.task == "first"] == []
    assert overs(store_path, res.run_id) == only_once("second", range(10, 13))


def test_replay_across_a_fan_in_runs_the_failed_branch_then_the_join(store_path):
    failed = FanIn.run(store=store_path, broken=[21], b_over=threading.Event())
    assert (failed.outcome, failed.task) == ("failed_over", ("c", 21))

    res = FanIn.replay(failed.run_id, store=store_path)

    assert res.outcome == "all_over"
    first, second = segments(store_path, res.run_id)
    assert ("d", None) not in started(first)
    assert started(second) == [("c", 21), ("c", 22), ("d", None)]
    all_over = [e.task for e in second if e.kind == "task_all_over"]
    assert all_over == ["c", "d"]


def test_tolerated_failures_stay_failed_after_a_replay_and_are_not_rerun(store_path):
    # One at a time: 0 finishes, 1 fails twice (tolerated), 2 finishes, 3 holds; then stop.
    interrupted = hold_until_stopped(Tolerant, store_path, {3}, broken=[1])
    assert interrupted.outcome == "interrupted"
    assert interrupted.failed == [("tolerant", 1)]

    res = Tolerant.replay(interrupted.run_id, store=store_path, broken=[1])

    assert res.outcome == "all_over"
    assert res.failed == [("tolerant", 1)]
    first, second = segments(store_path, res.run_id)
    assert Counter(started(first))[("tolerant", 1)] == 2
    assert started(second) == [("tolerant", 3)]
    [over] = [e for e in second if e.kind == "task_all_over"]
    assert over.data == {"done": 3, "failed": 1}


# --- what a replay looks like ------------------------------------------------------------------


def test_replayed_runs_count_their_segments_in_state_and_log(store_path):
    seen = []
    failed = Numbers.run(store=store_path, broken=[2], seen_replayed=seen)
    again = Numbers.replay(failed.run_id, store=store_path, broken=[2], seen_replayed=seen)
    assert again.outcome == "failed_over"
    res = Numbers.replay(failed.run_id, store=store_path, seen_replayed=seen)

    assert res.outcome == "all_over"
    assert seen == [0, 1, 2]
    assert res.state["replayed"] == 2
    marks = EventStore(store_path).events(res.run_id, "replayed")
    assert [(m.data["segment"], m.data["previous_outcome"]) for m in marks] == [
        (2, "failed_over"),
        (3, "failed_over"),
    ]
    assert len(segments(store_path, res.run_id)) == 3
    assert overs(store_path, res.run_id) == only_once("square", range(5))


def test_replay_fires_callbacks_for_the_new_segment_only(store_path):
    failed = Numbers.run(store=store_path, broken=[2])

    with Numbers.start_link(store=store_path) as server, recording(server) as log:
        res = server.replay(failed.run_id).result(timeout=GUARD)

    assert res.outcome == "all_over"
    assert log == [
        "start_flow",
        "task_start square 2",
        "task_over square 2",
        "task_start square 3",
        "task_over square 3",
        "task_start square 4",
        "task_over square 4",
        "task_all_over square",
        "all_over",
    ]


# --- runs that cannot be replayed ---------------------------------------------------------------


def test_replaying_a_run_that_ended_all_over_raises_value_error(store_path):
    done = Numbers.run(store=store_path)
    assert done.outcome == "all_over"

    with pytest.raises(ValueError, match=f"run {done.run_id} ended all_over"):
        Numbers.replay(done.run_id, store=store_path)
    with Numbers.start_link(store=store_path) as server:
        with pytest.raises(ReplayError, match="nothing to replay; start a new run") as caught:
            server.replay(done.run_id)
    # a ReplayError like every other refusal, and still the ValueError API.md promises
    assert isinstance(caught.value, ValueError)
    assert caught.value.run_id == done.run_id

    assert EventStore(store_path).events(done.run_id, "replayed") == []


def test_a_replay_error_pickles_with_its_message_and_run_id():
    error = ReplayError("3f2a", "run 3f2a ended all_over; there is nothing to replay")
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is ReplayError and isinstance(again, ValueError)
    assert (str(again), again.run_id) == (str(error), "3f2a")


def test_replaying_an_unknown_run_raises_replay_error(store_path):
    Numbers.run(store=store_path)

    with pytest.raises(ReplayError, match="no run 'no-such-run'") as caught:
        Numbers.replay("no-such-run", store=store_path)
    assert caught.value.run_id == "no-such-run"
    with pytest.raises(ReplayError, match="no run ''"):  # an empty prefix names no run
        Numbers.replay("", store=store_path)


def test_replay_accepts_a_unique_prefix_of_the_run_id_as_the_command_line_does(store_path):
    failed = Numbers.run(store=store_path, broken=[2])
    assert failed.outcome == "failed_over"

    result = Numbers.replay(failed.run_id[:4], store=store_path)

    assert (result.outcome, result.run_id) == ("all_over", failed.run_id)
    assert overs(store_path, failed.run_id) == only_once("square", range(5))


def test_replaying_a_prefix_several_runs_share_raises_replay_error_naming_them(store_path):
    # 17 runs: two of them share their first hex digit.
    by_first: dict[str, list[str]] = {}
    for _ in range(17):
        run_id = Numbers.run(store=store_path).run_id
        by_first.setdefault(run_id[0], []).append(run_id)
    prefix, matches = next((k, v) for k, v in by_first.items() if len(v) > 1)

    with Numbers.start_link(store=store_path) as server:
        with pytest.raises(ReplayError) as caught:
            server.replay(prefix)
    message = str(caught.value)
    assert message.startswith(f"{len(matches)} runs in {store_path!r} match {prefix!r} (")
    assert all(run_id in message for run_id in matches[:5])
    assert message.endswith("; give more characters of the run id")
    assert caught.value.run_id == prefix


def test_replaying_a_run_still_active_in_this_process_raises_replay_error(store_path):
    holding = queue.SimpleQueue()
    with Interruptible.start_link(store=store_path, hold={0}, holding=holding) as server:
        handle = server.start_flow()
        assert holding.get(timeout=GUARD) == 0

        with pytest.raises(ReplayError, match="still running in server 'replay-interruptible'"):
            server.replay(handle.run_id)
        with pytest.raises(ReplayError, match=f"run {handle.run_id} is still running"):
            InterruptibleTwin.replay(handle.run_id, store=store_path)
        assert not handle.done()

    assert handle.result(timeout=GUARD).outcome == "interrupted"
    assert EventStore(store_path).events(handle.run_id, "replayed") == []


@pytest.mark.parametrize(
    ("flow", "difference"),
    [
        (RenamedStage, r"task 'second' is no longer in the flow"),
        (ChangedNext, r"task 'first' had next=\['second'\], now 'all_over'"),
        (OtherName, r"it was written by flow 'TwoStages'"),
    ],
    ids=["renamed task", "changed next", "other class name"],
)
def test_replay_with_a_changed_definition_raises_replay_error_naming_it(
    store_path, flow, difference
):
    failed = TwoStages.run(store=store_path, broken=[11])

    with pytest.raises(ReplayError, match=difference) as caught:
        flow.replay(failed.run_id, store=store_path)

    assert caught.value.run_id == failed.run_id
    assert f"run {failed.run_id} cannot be replayed" in str(caught.value)
    assert EventStore(store_path).events(failed.run_id, "replayed") == []
    assert EventStore(store_path).run(failed.run_id).outcome == "failed_over"


def test_two_servers_of_this_process_cannot_replay_one_run_at_once(store_path):
    # Child 0 fails at once, so nearly every child is left for the replay, where they wait at
    # a gate: whichever server wins the run still holds it when the other one asks. The log is
    # long so that reading it (before a replay claims the run) takes a while.
    failed = ManyNumbers.run(store=store_path, children=CHILDREN_TO_FOLD, broken=[0])
    assert failed.outcome == "failed_over"
    gate = threading.Event()
    barrier = threading.Barrier(2, timeout=GUARD)
    answers = {}

    def replay(server):
        barrier.wait()
        try:
            answers[server.name] = server.replay(failed.run_id)
        except ReplayError as exc:
            answers[server.name] = exc

    with (
        ManyNumbers.start_link(store=store_path, children=CHILDREN_TO_FOLD, gate=gate) as one,
        ManyNumbersTwin.start_link(store=store_path, children=CHILDREN_TO_FOLD, gate=gate) as two,
    ):
        threads = [threading.Thread(target=replay, args=(server,)) for server in (one, two)]
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(GUARD)
        finally:
            gate.set()  # stop() does not wake children that wait at the gate
        handles = [a for a in answers.values() if not isinstance(a, ReplayError)]
        refusals = [a for a in answers.values() if isinstance(a, ReplayError)]
        outcomes = [handle.result(timeout=GUARD).outcome for handle in handles]

    assert len(answers) == 2
    assert outcomes == ["all_over"], f"{len(handles)} servers replayed run {failed.run_id}"
    assert len(refusals) == 1
    assert "still running" in str(refusals[0])
    assert len(EventStore(store_path).events(failed.run_id, "replayed")) == 1
    assert max(overs(store_path, failed.run_id).values()) == 1


def test_server_replay_while_the_server_runs_raises_flow_running(store_path):
    failed = Interruptible.run(store=store_path, broken=[0])
    assert failed.outcome == "failed_over"

    holding = queue.SimpleQueue()
    with Interruptible.start_link(store=store_path, hold={0}, holding=holding) as server:
        busy = server.start_flow()
        assert holding.get(timeout=GUARD) == 0

        with pytest.raises(FlowRunning) as caught:
            server.replay(failed.run_id)
        assert caught.value.run_id == busy.run_id

    assert EventStore(store_path).events(failed.run_id, "replayed") == []
    assert EventStore(store_path).run(failed.run_id).outcome == "failed_over"
