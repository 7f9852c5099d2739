"""A bad flow definition is rejected when its class is created (SEED.md bug 10).

Each check raises FlowDefinitionError whose message names the flow, the task and
the fix (API.md section 1). The regexes are loose on wording and strict on the
names that must appear.
"""

import functools

import pytest

import threadflow
from threadflow import ALL_OVER, Flow, FlowDefinitionError, task

# --- module-level task functions (flows may only use importable functions) ---


def fetch_rows(state):
    return None


def store_rows(state):
    return None


def parse_row(child, state):
    return child[1]


def one_argument_child(child):
    return child


def three_argument_child(child, state, extra):
    return child


def star_args_child(*args):
    return args[0][1]


def defaulted_third_child(child, state, extra=None):
    return child[1]


def record_stage(state):
    state["order"].append("stage")


def record_left(state):
    state["order"].append("left")


def record_right(state):
    state["order"].append("right")


def record_join(state):
    state["order"].append("join")


def tagged_parent(tag, state):
    state["order"].append(tag)
    threadflow.add_children_tasks([(0, 1), (1, 2)], state)


def tagged_child(tag, child, state):
    return f"{tag}{child[1]}"


class AddingParent:
    """A callable object used as a task_func."""

    def __call__(self, state):
        threadflow.add_children_tasks([(0, 3), (1, 4)], state)


class Doubler:
    """A callable object used as a child_task_func."""

    def __call__(self, child, state):
        return child[1] * 2


def run_flow(flow_cls, store_path, entrance=None, **extra_state):
    with flow_cls.start_link(store=store_path, **extra_state) as server:
        handle = server.start_flow(entrance=entrance)
        return handle.result(timeout=30)


# --- unknown names ---


def test_unknown_next_names_flow_task_and_suggests_closest_name():
    with pytest.raises(
        FlowDefinitionError, match=r"(?s)UnknownNextFlow.*fetch.*stor.*did you mean 'store'"
    ):

        class UnknownNextFlow(Flow):
            default_entrance = "fetch"
            fetch = task(task_func=fetch_rows, next="stor")
            store = task(task_func=store_rows, next=ALL_OVER)


def test_unknown_next_inside_a_fan_out_list_is_rejected():
    with pytest.raises(
        FlowDefinitionError, match=r"(?s)UnknownFanOutFlow.*fetch.*stor.*did you mean 'store'"
    ):

        class UnknownFanOutFlow(Flow):
            default_entrance = "fetch"
            fetch = task(task_func=fetch_rows, next=["store", "stor"])
            store = task(task_func=store_rows, next=ALL_OVER)


def test_unknown_default_entrance_names_the_flow_and_the_known_task():
    with pytest.raises(FlowDefinitionError, match=r"(?s)BadEntranceFlow.*'fetchh'.*'fetch'"):

        class BadEntranceFlow(Flow):
            default_entrance = "fetchh"
            fetch = task(task_func=fetch_rows, next="store")
            store = task(task_func=store_rows, next=ALL_OVER)


def test_start_flow_with_unknown_entrance_raises_and_server_still_runs(store_path):
    class EntranceFlow(Flow):
        fetch = task(task_func=fetch_rows, next="store")
        store = task(task_func=store_rows, next=ALL_OVER)

    with EntranceFlow.start_link(store=store_path) as server:
        with pytest.raises(FlowDefinitionError, match=r"(?s)EntranceFlow.*'nope'"):
            server.start_flow(entrance="nope")
        with pytest.raises(FlowDefinitionError, match=r"(?s)EntranceFlow.*'stor'.*'store'"):
            EntranceFlow.start_flow(server, entrance="stor")
        result = server.start_flow().result(timeout=30)
    assert result.outcome == "all_over"


# --- cycles ---


def test_cycle_is_rejected_with_its_path():
    with pytest.raises(
        FlowDefinitionError,
        match=r"(?s)CyclicFlow.*(ping -> pong -> ping|pong -> ping -> pong)",
    ):

        class CyclicFlow(Flow):
            default_entrance = "fetch"
            fetch = task(task_func=fetch_rows, next="ping")
            ping = task(task_func=fetch_rows, next="pong")
            pong = task(task_func=store_rows, next="ping")


def test_task_naming_itself_as_next_is_a_cycle():
    with pytest.raises(FlowDefinitionError, match=r"(?s)SelfLoopFlow.*fetch -> fetch"):

        class SelfLoopFlow(Flow):
            default_entrance = "fetch"
            fetch = task(task_func=fetch_rows, next="fetch")


# --- task functions ---


def test_missing_task_func_is_rejected():
    with pytest.raises(FlowDefinitionError, match=r"(?s)NoTaskFuncFlow.*fetch.*task_func"):

        class NoTaskFuncFlow(Flow):
            default_entrance = "fetch"
            fetch = task(next=ALL_OVER)


@pytest.mark.parametrize("not_callable", ["etl.fetch", 42])
def test_non_callable_task_func_is_rejected(not_callable):
    with pytest.raises(
        FlowDefinitionError, match=r"(?s)NotCallableFlow.*fetch.*task_func.*callable"
    ):

        class NotCallableFlow(Flow):
            default_entrance = "fetch"
            fetch = task(task_func=not_callable, next=ALL_OVER)


def test_non_callable_child_task_func_is_rejected():
    with pytest.raises(
        FlowDefinitionError, match=r"(?s)NotCallableChildFlow.*fetch.*child_task_func"
    ):

        class NotCallableChildFlow(Flow):
            default_entrance = "fetch"
            fetch = task(task_func=fetch_rows, child_task_func="etl.parse", next=ALL_OVER)


@pytest.mark.parametrize("child_func", [one_argument_child, three_argument_child])
def test_child_task_func_that_cannot_take_two_arguments_is_rejected(child_func):
    with pytest.raises(
        FlowDefinitionError,
        match=r"(?s)BadChildFlow.*fetch.*child_task_func.*(two|2|\(child, state\))",
    ):

        class BadChildFlow(Flow):
            default_entrance = "fetch"
            fetch = task(task_func=fetch_rows, child_task_func=child_func, next=ALL_OVER)


def test_lambda_task_func_is_rejected_for_subprocess_isolation():
    with pytest.raises(
        FlowDefinitionError, match=r"(?s)LambdaSubprocessFlow.*fetch.*(import|module)"
    ):

        class LambdaSubprocessFlow(Flow):
            default_entrance = "fetch"
            fetch = task(task_func=lambda state: None, isolation="subprocess", next=ALL_OVER)


def test_nested_child_task_func_is_rejected_for_subprocess_isolation():
    def nested_child(child, state):
        return child

    with pytest.raises(
        FlowDefinitionError, match=r"(?s)NestedSubprocessFlow.*fetch.*(import|module)"
    ):

        class NestedSubprocessFlow(Flow):
            default_entrance = "fetch"
            fetch = task(
                task_func=fetch_rows,
                child_task_func=nested_child,
                isolation="subprocess",
                next=ALL_OVER,
            )


# --- reserved name and option values ---


def test_task_named_all_over_is_rejected():
    with pytest.raises(
        FlowDefinitionError,
        match=r"(?si)ReservedNameFlow.*'all_over'.*(reserved|rename|another name)",
    ):

        class ReservedNameFlow(Flow):
            default_entrance = "fetch"
            fetch = task(task_func=fetch_rows, next=ALL_OVER)
            all_over = task(task_func=store_rows, next=ALL_OVER)


@pytest.mark.parametrize("value", [0, -1])
def test_max_concurrency_below_one_is_rejected(value):
    with pytest.raises(
        FlowDefinitionError,
        match=r"(?si)BadConcurrencyFlow.*fetch.*max_concurrency.*(positive|>= ?1|at least 1)",
    ):

        class BadConcurrencyFlow(Flow):
            default_entrance = "fetch"
            fetch = task(
                task_func=fetch_rows,
                child_task_func=parse_row,
                max_concurrency=value,
                next=ALL_OVER,
            )


@pytest.mark.parametrize("value", [0, 0.0, -1.5])
def test_non_positive_task_timeout_is_rejected(value):
    with pytest.raises(
        FlowDefinitionError,
        match=r"(?si)BadTimeoutFlow.*fetch.*task_timeout.*(positive|> ?0|None)",
    ):

        class BadTimeoutFlow(Flow):
            default_entrance = "fetch"
            fetch = task(task_func=fetch_rows, task_timeout=value, next=ALL_OVER)


def test_unknown_isolation_is_rejected_with_the_valid_choices():
    with pytest.raises(
        FlowDefinitionError,
        match=r"(?s)BadIsolationFlow.*fetch.*'process'.*(thread.*subprocess|subprocess.*thread)",
    ):

        class BadIsolationFlow(Flow):
            default_entrance = "fetch"
            fetch = task(task_func=fetch_rows, isolation="process", next=ALL_OVER)


def test_missing_next_is_rejected_and_suggests_all_over():
    with pytest.raises(
        FlowDefinitionError, match=r"(?si)NoNextFlow.*fetch.*next.*(ALL_OVER|all_over)"
    ):

        class NoNextFlow(Flow):
            default_entrance = "fetch"
            fetch = task(task_func=fetch_rows)


def test_empty_next_list_is_rejected():
    with pytest.raises(
        FlowDefinitionError, match=r"(?si)EmptyNextFlow.*fetch.*next.*(empty|ALL_OVER|all_over)"
    ):

        class EmptyNextFlow(Flow):
            default_entrance = "fetch"
            fetch = task(task_func=fetch_rows, next=[])


def test_definition_error_is_a_threadflow_error():
    with pytest.raises(threadflow.ThreadflowError):

        class AlsoBadFlow(Flow):
            default_entrance = "fetch"
            fetch = task(task_func=fetch_rows, next="nowhere")


# --- valid definitions are accepted ---


def test_fan_out_and_fan_in_definition_is_accepted_and_joins_after_both_branches(store_path):
    class DiamondFlow(Flow):
        stage = task(task_func=record_stage, next=["left", "right"])
        left = task(task_func=record_left, next="join")
        right = task(task_func=record_right, next="join")
        join = task(task_func=record_join, next=ALL_OVER)

    order: list[str] = []
    result = run_flow(DiamondFlow, store_path, order=order)

    assert result.outcome == "all_over"
    assert order[0] == "stage"
    assert sorted(order[1:3]) == ["left", "right"]
    assert order[3:] == ["join"]


def test_partial_task_funcs_are_accepted(store_path):
    class PartialFlow(Flow):
        fetch = task(
            task_func=functools.partial(tagged_parent, "p"),
            child_task_func=functools.partial(tagged_child, "c"),
            next=ALL_OVER,
        )

    order: list[str] = []
    result = run_flow(PartialFlow, store_path, order=order)

    assert result.outcome == "all_over"
    assert order == ["p"]
    assert list(threadflow.results(result.state, "fetch")) == [(0, "c1"), (1, "c2")]


def test_callable_objects_are_accepted_as_task_funcs(store_path):
    class CallableObjectFlow(Flow):
        fetch = task(task_func=AddingParent(), child_task_func=Doubler(), next=ALL_OVER)

    result = run_flow(CallableObjectFlow, store_path)

    assert result.outcome == "all_over"
    assert list(threadflow.results(result.state, "fetch")) == [(0, 6), (1, 8)]


@pytest.mark.parametrize("child_func", [star_args_child, defaulted_third_child])
def test_child_task_func_that_can_take_two_arguments_is_accepted(child_func):
    class FlexibleChildFlow(Flow):
        fetch = task(task_func=fetch_rows, child_task_func=child_func, next=ALL_OVER)

    assert FlexibleChildFlow.__name__ == "FlexibleChildFlow"


def test_task_timeout_none_and_limits_zero_and_one_are_accepted():
    class LimitsFlow(Flow):
        default_entrance = "fetch"
        fetch = task(task_func=fetch_rows, task_timeout=None, task_retry_limit=0, next="store")
        store = task(task_func=store_rows, task_timeout=0.5, task_retry_limit=1, next=ALL_OVER)

    assert LimitsFlow.__name__ == "LimitsFlow"
