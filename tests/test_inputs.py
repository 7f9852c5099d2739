"""Inputs per run: ``start_flow(**inputs)`` puts them in the state, records them in the log,
and a replay gets them back; one server runs the same flow on different inputs."""

import pathlib

import pytest
from crash_child import Child

import threadflow
from threadflow import ALL_OVER, EncodeError, EventStore, Flow, add_children_tasks, task

GUARD = 30.0


def list_folder(state):
    add_children_tasks(((name, state["folder"]) for name in state["names"]), state)


def import_file(child, state):
    name, folder = child
    if name in state["broken"]:
        raise ValueError(f"{name} is broken")
    return f"{folder}/{name}"


class Import(Flow):
    scan = task(
        task_func=list_folder,
        child_task_func=import_file,
        task_retry_limit=1,
        next=ALL_OVER,
    )


def test_one_server_runs_the_flow_on_each_runs_own_inputs(store_path):
    with Import.start_link(store=store_path, broken=set()) as server:
        first = server.start_flow(folder="/photos/2025", names=["a.jpg"]).result(timeout=GUARD)
        second = server.start_flow(folder="/photos/2026", names=["b.jpg", "c.jpg"]).result(
            timeout=GUARD
        )
    assert (first.outcome, second.outcome) == ("all_over", "all_over")
    assert first.state["folder"] == "/photos/2025"
    assert dict(threadflow.results(first.state, "scan")) == {"a.jpg": "/photos/2025/a.jpg"}
    assert dict(threadflow.results(second.state, "scan")) == {
        "b.jpg": "/photos/2026/b.jpg",
        "c.jpg": "/photos/2026/c.jpg",
    }
    [started] = EventStore(store_path).events(second.run_id, "flow_started")
    assert started.data["inputs"] == {"folder": "/photos/2026", "names": ["b.jpg", "c.jpg"]}
    assert started.data["import"] == "test_inputs:Import"


def test_a_replay_gets_the_runs_inputs_back_from_the_log(store_path):
    failed = Import.run(
        store=store_path,
        inputs={"folder": "/in", "names": ["a", "b", "c"]},
        broken={"b"},
    )
    assert failed.outcome == "failed_over"
    # Nothing but the store is passed: the folder and the names come from the log.
    replayed = Import.replay(failed.run_id, store=store_path, broken=set())
    assert replayed.outcome == "all_over"
    assert replayed.state["folder"] == "/in" and replayed.state["names"] == ["a", "b", "c"]
    assert dict(threadflow.results(replayed.state, "scan")) == {
        "a": "/in/a",
        "b": "/in/b",
        "c": "/in/c",
    }


def test_inputs_hold_what_the_log_holds(store_path):
    # A tuple is recorded as a JSON list: the run sees from the start what a replay would see.
    res = Import.run(store=store_path, inputs={"folder": "x", "names": ("a",)}, broken=set())
    assert res.state["names"] == ["a"]


def test_an_input_that_cannot_be_stored_is_refused_in_the_callers_thread(store_path):
    with Import.start_link(store=store_path, broken=set()) as server:
        with pytest.raises(EncodeError, match=r"start_flow\(\): the inputs cannot be stored"):
            server.start_flow(folder=pathlib.Path("/photos"), names=[])
        with pytest.raises(EncodeError, match="nan or infinite"):
            server.start_flow(folder="x", names=[float("nan")])
        # Nothing was started: the server takes the next run.
        ok = server.start_flow(folder="x", names=[]).result(timeout=GUARD)
    assert ok.outcome == "all_over"
    assert len(EventStore(store_path).runs()) == 1


@pytest.mark.parametrize(
    ("inputs", "says"),
    [
        ({"run_id": "mine"}, r"\['run_id'\] are set by threadflow"),
        ({"broken": []}, r"\['broken'\] are already start_link\(\) entries"),
    ],
)
def test_inputs_named_like_state_entries_are_refused(store_path, inputs, says):
    with Import.start_link(store=store_path, broken=set()) as server:
        with pytest.raises(TypeError, match=says):
            server.start_flow(folder="x", names=[], **inputs)


def test_a_global_server_in_another_process_gets_the_inputs(tmp_path, store_path):
    from replay_flows import GlobalWork

    with Child(tmp_path, "own", store_path, "GlobalWork") as other:
        other.expect("ready")
        handle = GlobalWork.start_flow(("global", "g"), store=store_path, count=3)
        res = handle.result(timeout=GUARD)
    assert res.outcome == "all_over"
    assert list(threadflow.results(res.state, "work")) == [(0, 0), (1, 1), (2, 4)]
    [started] = EventStore(store_path).events(res.run_id, "flow_started")
    assert started.data["inputs"] == {"count": 3}
