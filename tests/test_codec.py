"""A flow's codec stores what JSON cannot hold (Paths, datetimes): results, payloads, inputs
and outputs, in text, and gives them back, replays included."""

import datetime
import pathlib

import pytest
from codec_flows import CODEC, NoCodec, Photos, PhotosInProcesses, results

import threadflow
from threadflow import EncodeError, EventStore, FlowDefinitionError

FOLDER = pathlib.Path("/photos/2026")
SINCE = datetime.datetime(2026, 12, 1, 8, 30)
THUMBS = {"a.jpg": FOLDER / "a.thumb.jpg", "b.jpg": FOLDER / "b.thumb.jpg"}


@pytest.mark.parametrize("flow", [Photos, PhotosInProcesses], ids=["thread", "subprocess"])
def test_values_json_cannot_hold_go_through_the_codec_and_come_back(store_path, flow):
    res = flow.run(store=store_path, inputs={"folder": FOLDER, "since": SINCE})
    assert res.outcome == "all_over", res.error
    assert res.state["folder"] == FOLDER and res.state["since"] == SINCE
    assert results(res.state) == THUMBS
    assert threadflow.output(res.state, "scan") == {"folder": FOLDER, "since": SINCE}
    # The store stays text: the codec's text, readable without the codec.
    overs = [e for e in EventStore(store_path).events(res.run_id, "task_over") if e.child_id]
    assert [e.data for e in overs] == [{"coded": CODEC.dumps(THUMBS[e.child_id])} for e in overs]
    assert dict(EventStore(store_path).results(res.run_id, "scan"))["a.jpg"] == (
        '{"$path": "/photos/2026/a.thumb.jpg"}'
    )


def test_a_replay_gets_the_coded_inputs_and_payloads_back(store_path):
    failed = Photos.run(
        store=store_path, inputs={"folder": FOLDER, "since": SINCE}, broken={"b.jpg"}
    )
    assert failed.outcome == "failed_over"
    res = Photos.replay(failed.run_id, store=store_path, broken={"b.jpg"})
    assert res.outcome == "all_over"
    assert res.state["since"] == SINCE
    assert results(res.state) == THUMBS


def test_without_a_codec_such_a_value_fails_at_once_and_says_what_to_do(store_path):
    with NoCodec.start_link(store=store_path) as server:
        with pytest.raises(EncodeError, match="pass plain data"):
            server.start_flow(folder=FOLDER, since=SINCE)
        res = server.start_flow(folder="/photos", since="2026-12-01").result(timeout=30)
    assert res.outcome == "failed_over"  # str / "a.jpg" is a TypeError in list_photos
    assert not EventStore(store_path).events(res.run_id, "retry")


def test_a_codec_without_dumps_and_loads_is_refused_when_the_class_is_made():
    with pytest.raises(FlowDefinitionError, match="has no dumps\\(\\) and loads\\(\\)"):

        class Bad(NoCodec):
            codec = object()
