"""OpenTelemetry tracing (threadflow.otel): the span tree of real runs, dated by the log.

Every test records into its own TracerProvider (an InMemorySpanExporter behind a
SimpleSpanProcessor), passed to instrument(): no global provider is set.
"""

import logging
import queue
import re
import subprocess
import sys
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

import threadflow
from threadflow import ALL_OVER, EventStore, Flow, add_children_tasks, results, task
from threadflow.events import ts_seconds
from threadflow.otel import instrument

GUARD = 30.0  # seconds: a hang guard for result() and queue.get(), never a synchronisation
ROOT = Path(__file__).resolve().parent.parent

# --- task functions ---------------------------------------------------------------------------


def split(state):
    add_children_tasks([(0, "a"), ("b", "b"), ([1, "x"], "c")], state)


def fail_once(child, state):
    """Child "b" raises on its first attempt; every child returns its payload upper-cased."""
    child_id, payload = child
    if child_id == "b" and "b" not in state["failed"]:
        state["failed"].add("b")
        raise ValueError("b fails once")
    return payload.upper()


def noop(state):
    return None


def hang_once(state):
    """The first attempt waits on its token until its timeout cancels it; the next returns."""
    calls = state["calls"]
    calls.append(len(calls) + 1)
    if len(calls) == 1:
        threadflow.current_token().wait(GUARD)
    return "done"


def split_four(state):
    add_children_tasks([(i, None) for i in range(4)], state)


def two_fails(child, state):
    if child[0] == 2:
        raise ValueError("child 2 is broken")
    return child[0]


def add_many(state):
    add_children_tasks(((i, None) for i in range(state["children"])), state)


def echo(child, state):
    return child[0]


def block_if_asked(state):
    """Waits on its token (say so on state["running"]) when the run's input block is true."""
    if state.get("block"):
        state["running"].put(state["run_id"])
        threadflow.current_token().wait(GUARD)
    return "done"


# --- flows ------------------------------------------------------------------------------------


class Parts(Flow, server_name="otel-parts"):
    split = task(
        task_func=split,
        child_task_func=fail_once,
        max_concurrency=2,
        task_retry_limit=2,
        next="report",
    )
    report = task(task_func=noop, next=ALL_OVER)


class Slow(Flow, server_name="otel-slow"):
    work = task(task_func=hang_once, task_timeout=0.2, task_retry_limit=2, next=ALL_OVER)


class Broken(Flow, server_name="otel-broken"):
    work = task(task_func=split_four, child_task_func=two_fails, task_retry_limit=1, next=ALL_OVER)


class Tolerant(Flow, server_name="otel-tolerant"):
    work = task(
        task_func=split_four,
        child_task_func=two_fails,
        task_retry_limit=1,
        exit_on_failed=False,
        next=ALL_OVER,
    )


class Many(Flow, server_name="otel-many"):
    work = task(
        task_func=add_many,
        child_task_func=echo,
        max_concurrency=4,
        task_retry_limit=1,
        next=ALL_OVER,
    )


class Blocking(Flow, server_name="otel-blocking"):
    work = task(task_func=block_if_asked, task_retry_limit=1, next=ALL_OVER)


class Other(Flow, server_name="otel-other"):
    work = task(task_func=noop, next=ALL_OVER)


# --- helpers ----------------------------------------------------------------------------------


def recorder():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def ns(ts):
    """An event's ts as the nanoseconds a span holds: its microseconds, exactly (worked out
    apart from the tracer's own arithmetic, through the float seconds of the log's readers)."""
    return round(ts_seconds(ts) * 1_000_000) * 1000


def log_times(store_path, run_id):
    """(kind, task, child_id, attempt) -> ts in ns, for every event of the run (the last one
    of each key: a replay's segment comes after the first)."""
    return {
        (e.kind, e.task, e.child_id, e.attempt): ns(e.ts)
        for e in EventStore(store_path).events(run_id)
    }


def parent_of(span, spans):
    found = [
        s for s in spans if span.parent is not None and s.context.span_id == span.parent.span_id
    ]
    return found[0] if found else None


def root(spans):
    (run,) = [s for s in spans if s.parent is None]
    return run


def named(spans, name):
    return [s for s in spans if s.name == name]


def assert_within(spans):
    """Every span lies within its parent's time, and shares its trace."""
    for span in spans:
        parent = parent_of(span, spans)
        if span.parent is None:
            continue
        assert parent is not None, f"{span.name}: its parent was not exported"
        assert parent.context.trace_id == span.context.trace_id
        assert parent.start_time <= span.start_time <= span.end_time <= parent.end_time, span.name


def error_events(span):
    return [dict(e.attributes) for e in span.events if e.name == "exception"]


# --- the span tree ----------------------------------------------------------------------------


def test_a_run_with_children_is_a_tree_of_run_task_and_attempt_spans(store_path):
    provider, exporter = recorder()
    with Parts.start_link(store=store_path, failed=set()) as server:
        with instrument(server, tracer_provider=provider):
            res = server.start_flow().result(timeout=GUARD)
    assert res.outcome == "all_over"
    assert dict(results(res.state, "split")) == {0: "A", "b": "B", (1, "x"): "C"}

    spans = exporter.get_finished_spans()
    assert_within(spans)
    run = root(spans)
    assert run.name == "run Parts"
    base = {"threadflow.flow": "Parts", "threadflow.run_id": res.run_id}
    assert dict(run.attributes) == {
        **base,
        "threadflow.server": "otel-parts",
        "threadflow.segment": 1,
        "threadflow.outcome": "all_over",
    }
    assert run.status.status_code == StatusCode.UNSET

    stages = {s.attributes["threadflow.task"]: s for s in spans if s.name.startswith("task ")}
    assert sorted(stages) == ["report", "split"]
    for name, stage in stages.items():
        assert stage.name == f"task {name}"
        assert parent_of(stage, spans) is run
        assert dict(stage.attributes) == {
            **base,
            "threadflow.task": name,
            "threadflow.outcome": "task_all_over",
        }

    (parent,) = named(spans, "attempt split")
    assert parent_of(parent, spans) is stages["split"]
    assert dict(parent.attributes) == {
        **base,
        "threadflow.task": "split",
        "threadflow.attempt": 1,
        "threadflow.outcome": "over",
    }
    children = named(spans, "child split")
    assert {parent_of(c, spans).name for c in children} == {"task split"}
    assert sorted(
        (
            c.attributes["threadflow.child_id"],
            c.attributes["threadflow.attempt"],
            c.attributes["threadflow.outcome"],
            c.status.status_code.name,
        )
        for c in children
    ) == [
        ("0", 1, "over", "UNSET"),
        ('[1, "x"]', 1, "over", "UNSET"),
        ("b", 1, "exit", "ERROR"),
        ("b", 2, "over", "UNSET"),
    ]
    (failed,) = [c for c in children if c.attributes["threadflow.outcome"] == "exit"]
    assert failed.status.description == "ValueError: b fails once"
    (error,) = error_events(failed)
    assert (error["exception.type"], error["exception.message"]) == ("ValueError", "b fails once")
    assert "in fail_once" in error["exception.stacktrace"]
    assert named(spans, "attempt report")[0].attributes["threadflow.outcome"] == "over"
    assert len(spans) == 1 + 2 + 1 + 4 + 1


def test_spans_are_dated_by_the_event_log(store_path):
    provider, exporter = recorder()
    with Parts.start_link(store=store_path, failed=set()) as server:
        with instrument(server, tracer_provider=provider):
            res = server.start_flow().result(timeout=GUARD)
    times = log_times(store_path, res.run_id)
    spans = exporter.get_finished_spans()

    run = root(spans)
    assert (run.start_time, run.end_time) == (
        times[("flow_started", None, None, None)],
        times[("all_over", None, None, None)],
    )
    (stage,) = [s for s in spans if s.name == "task split"]
    assert (stage.start_time, stage.end_time) == (
        times[("task_started", "split", None, 1)],
        times[("task_all_over", "split", None, None)],
    )
    ids = {"0": 0, "b": "b", '[1, "x"]': (1, "x")}
    for child in named(spans, "child split"):
        key = ("split", ids[child.attributes["threadflow.child_id"]])
        attempt = child.attributes["threadflow.attempt"]
        ended = "exit" if child.attributes["threadflow.outcome"] == "exit" else "task_over"
        assert child.start_time == times[("task_started", *key, attempt)]
        assert child.end_time == times[(ended, *key, attempt)]


def test_a_timeout_is_an_error_span_and_the_retry_another_attempt(store_path):
    provider, exporter = recorder()
    with Slow.start_link(store=store_path, calls=[]) as server:
        with instrument(server, tracer_provider=provider):
            res = server.start_flow().result(timeout=GUARD)
    assert res.outcome == "all_over"

    spans = exporter.get_finished_spans()
    assert_within(spans)
    attempts = sorted(
        named(spans, "attempt work"), key=lambda s: s.attributes["threadflow.attempt"]
    )
    assert [
        (a.attributes["threadflow.attempt"], a.attributes["threadflow.outcome"]) for a in attempts
    ] == [(1, "timeout"), (2, "over")]
    timed_out = attempts[0]
    assert timed_out.status.status_code == StatusCode.ERROR
    assert timed_out.status.description.startswith("threadflow.errors.TaskTimeout: ")
    assert [e["exception.type"] for e in error_events(timed_out)] == [
        "threadflow.errors.TaskTimeout"
    ]
    times = log_times(store_path, res.run_id)
    assert timed_out.end_time == times[("timeout", "work", None, 1)]
    assert root(spans).attributes["threadflow.outcome"] == "all_over"


def test_a_failed_run_records_the_error_on_the_run_its_task_and_the_attempt(store_path):
    provider, exporter = recorder()
    with Broken.start_link(store=store_path) as server:
        with instrument(server, tracer_provider=provider):
            res = server.start_flow().result(timeout=GUARD)
    assert (res.outcome, res.task) == ("failed_over", ("work", 2))

    spans = exporter.get_finished_spans()
    assert_within(spans)
    run = root(spans)
    assert run.status.status_code == StatusCode.ERROR
    assert run.status.description == "ValueError: child 2 is broken"
    assert {k: run.attributes[k] for k in ("threadflow.task", "threadflow.child_id")} == {
        "threadflow.task": "work",
        "threadflow.child_id": "2",
    }
    assert run.attributes["threadflow.outcome"] == "failed_over"
    assert [e["exception.message"] for e in error_events(run)] == ["child 2 is broken"]
    (stage,) = named(spans, "task work")
    assert stage.status.status_code == StatusCode.ERROR
    assert stage.attributes["threadflow.outcome"] == "failed_over"
    (broken,) = [
        c for c in named(spans, "child work") if c.attributes["threadflow.child_id"] == "2"
    ]
    assert (broken.attributes["threadflow.outcome"], broken.status.status_code) == (
        "exit",
        StatusCode.ERROR,
    )
    # Children still running when the run failed were cut off by its end.
    others = {c.attributes["threadflow.outcome"] for c in named(spans, "child work")} - {"exit"}
    assert others <= {"over", "cancelled"}
    end = log_times(store_path, res.run_id)[("failed_over", None, None, None)]
    assert run.end_time == stage.end_time == end


def test_a_tolerated_child_failure_leaves_its_task_and_run_ok(store_path):
    provider, exporter = recorder()
    with Tolerant.start_link(store=store_path) as server:
        with instrument(server, tracer_provider=provider):
            res = server.start_flow().result(timeout=GUARD)
    assert (res.outcome, res.failed) == ("all_over", [("work", 2)])

    spans = exporter.get_finished_spans()
    assert_within(spans)
    assert [
        (s.name, s.status.status_code) for s in spans if s.name.startswith(("run", "task"))
    ] == [
        ("task work", StatusCode.UNSET),
        ("run Tolerant", StatusCode.UNSET),
    ]
    assert sorted(
        (c.attributes["threadflow.child_id"], c.attributes["threadflow.outcome"])
        for c in named(spans, "child work")
    ) == [("0", "over"), ("1", "over"), ("2", "exit"), ("3", "over")]


def test_every_child_attempt_of_a_large_stage_gets_its_span(store_path):
    # Children that start and end between two commits of the log are one row in it; each
    # still has its task_start and task_over signals, hence its span.
    provider, exporter = recorder()
    with Many.start_link(store=store_path) as server:
        with instrument(server, tracer_provider=provider):
            res = server.start_flow(children=500).result(timeout=GUARD)
    assert res.outcome == "all_over"
    spans = exporter.get_finished_spans()
    children = named(spans, "child work")
    assert sorted(int(c.attributes["threadflow.child_id"]) for c in children) == list(range(500))
    (stage,) = named(spans, "task work")
    assert {c.parent.span_id for c in children} == {stage.context.span_id}
    assert all(c.attributes["threadflow.outcome"] == "over" for c in children)


def test_an_interrupted_run_and_its_replay_are_two_traces_of_one_run(store_path):
    first, first_spans = recorder()
    running = queue.SimpleQueue()
    # block is the server's entry, not the run's input: a replay gets the inputs back.
    server = Blocking.start_link(store=store_path, running=running, block=True)
    with instrument(server, tracer_provider=first):
        handle = server.start_flow()
        running.get(timeout=GUARD)
        server.stop()  # the run is recorded interrupted; no signal says so
    assert handle.result(timeout=GUARD).outcome == "interrupted"

    spans = first_spans.get_finished_spans()
    assert_within(spans)
    interrupted_at = log_times(store_path, handle.run_id)[("interrupted", None, None, None)]
    run = root(spans)
    assert (run.attributes["threadflow.outcome"], run.end_time) == ("interrupted", interrupted_at)
    (attempt,) = named(spans, "attempt work")
    assert attempt.attributes["threadflow.outcome"] == "cancelled"

    second, second_spans = recorder()
    with Blocking.start_link(store=store_path, running=running, block=False) as server:
        with instrument(server, tracer_provider=second):
            res = server.replay(handle.run_id).result(timeout=GUARD)
    assert res.outcome == "all_over"
    spans = second_spans.get_finished_spans()
    replay = root(spans)
    assert replay.context.trace_id != run.context.trace_id
    assert {k: replay.attributes[k] for k in ("threadflow.run_id", "threadflow.segment")} == {
        "threadflow.run_id": handle.run_id,
        "threadflow.segment": 2,
    }
    assert [a.attributes["threadflow.outcome"] for a in named(spans, "attempt work")] == ["over"]


def test_a_cancelled_run_is_ended_from_the_log_when_the_next_run_starts(store_path):
    provider, exporter = recorder()
    running = queue.SimpleQueue()
    with Blocking.start_link(store=store_path, running=running) as server:
        with instrument(server, tracer_provider=provider):
            handle = server.start_flow(block=True)
            running.get(timeout=GUARD)
            handle.cancel("enough")
            assert handle.result(timeout=GUARD).outcome == "cancelled"
            after = server.start_flow(block=False).result(timeout=GUARD)
            # No signal says a run was cancelled: its spans end when the next run starts.
            spans = [
                s
                for s in exporter.get_finished_spans()
                if s.attributes["threadflow.run_id"] == handle.run_id
            ]
    assert after.outcome == "all_over"
    assert_within(spans)
    cancelled_at = log_times(store_path, handle.run_id)[("cancelled", None, None, None)]
    run = root(spans)
    assert (run.attributes["threadflow.outcome"], run.end_time) == ("cancelled", cancelled_at)
    assert [a.attributes["threadflow.outcome"] for a in named(spans, "attempt work")] == [
        "cancelled"
    ]


# --- a reader that cannot break a run ---------------------------------------------------------


class RaisingExporter(SpanExporter):
    def export(self, spans):
        raise RuntimeError("the collector is down")

    def shutdown(self):
        pass


class RaisingProcessor(SpanProcessor):
    def on_start(self, span, parent_context=None):
        raise RuntimeError("on_start is broken")

    def on_end(self, span):
        raise RuntimeError("on_end is broken")


def test_a_broken_exporter_or_processor_does_not_change_the_run(store_path, caplog):
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(RaisingExporter()))
    provider.add_span_processor(RaisingProcessor())
    with Parts.start_link(store=store_path, failed=set()) as server:
        with instrument(server, tracer_provider=provider) as inst:
            with caplog.at_level(logging.WARNING, logger="threadflow"):
                res = server.start_flow().result(timeout=GUARD)
    assert res.outcome == "all_over"
    assert dict(results(res.state, "split")) == {0: "A", "b": "B", (1, "x"): "C"}
    assert inst.errors > 0
    # Caught by the instrumentation itself, not by the engine's guard around receivers.
    assert EventStore(store_path).events(res.run_id, "callback_error") == []
    warnings = [r for r in caplog.records if r.name == "threadflow" and "span" in r.getMessage()]
    assert len(warnings) == 1


def test_after_uninstrument_no_span_is_made(store_path):
    provider, exporter = recorder()
    with Parts.start_link(store=store_path, failed=set()) as server:
        inst = instrument(server, tracer_provider=provider)
        inst.uninstrument()
        inst.uninstrument()  # idempotent
        res = server.start_flow().result(timeout=GUARD)
    assert res.outcome == "all_over"
    assert exporter.get_finished_spans() == ()


def test_two_servers_instrumented_apart_do_not_share_spans(store_path, tmp_path):
    parts_provider, parts_spans = recorder()
    other_provider, other_spans = recorder()
    with (
        Parts.start_link(store=store_path, failed=set()) as parts,
        Other.start_link(store=tmp_path / "other.db") as other,
        instrument(parts, tracer_provider=parts_provider),
        instrument(other, tracer_provider=other_provider),
    ):
        a = parts.start_flow()
        b = other.start_flow()
        assert (a.result(timeout=GUARD).outcome, b.result(timeout=GUARD).outcome) == (
            "all_over",
            "all_over",
        )
    assert {s.attributes["threadflow.run_id"] for s in parts_spans.get_finished_spans()} == {
        a.run_id
    }
    assert {s.attributes["threadflow.run_id"] for s in other_spans.get_finished_spans()} == {
        b.run_id
    }


def test_instrument_takes_a_server_not_a_flow_class():
    with pytest.raises(TypeError, match=r"pass a server, not the flow class: server = Parts"):
        instrument(Parts)
    with pytest.raises(TypeError, match=r"instrument\('otel-parts'\): pass a server"):
        instrument("otel-parts")


def test_the_otel_page_example_prints_its_spans(tmp_path):
    text = (ROOT / "docs" / "otel.md").read_text(encoding="utf-8")
    block = re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)[0]
    (tmp_path / "words.py").write_text(block, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "words.py"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count('"name": "run Words"') == 1
    assert done.stdout.count('"name": "child count"') == 3
    assert done.stdout.rstrip().endswith("all_over")
