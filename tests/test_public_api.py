"""The public names of threadflow are pinned: adding or removing one is a decision."""

import importlib

import pytest

import threadflow

EXPECTED_ALL = sorted(
    [
        "ALL_OVER",
        "AlreadyStarted",
        "CancelToken",
        "CancelledError",
        "DuplicateChildError",
        "EncodeError",
        "EventStore",
        "Flow",
        "FlowDefinitionError",
        "FlowRunning",
        "NoRetry",
        "ProcessDiedError",
        "Progress",
        "ReplayError",
        "RunHandle",
        "RunResult",
        "RunningAttempt",
        "Schedule",
        "StoreError",
        "TaskProgress",
        "TaskTimeout",
        "ThreadflowError",
        "Tick",
        "add_child_task",
        "add_children_tasks",
        "current_token",
        "output",
        "results",
        "signals",
        "sleep",
        "task",
    ]
)

SIGNAL_NAMES = [
    "start_flow",
    "all_over",
    "failed_over",
    "task_start",
    "task_over",
    "task_all_over",
    "task_failed",
    "task_timeout",
    "task_exit",
    "task_retry",
]


def test_all_lists_exactly_the_public_names():
    assert sorted(threadflow.__all__) == EXPECTED_ALL


def test_all_has_no_duplicates():
    assert len(threadflow.__all__) == len(set(threadflow.__all__))


@pytest.mark.parametrize("name", EXPECTED_ALL)
def test_each_public_name_is_importable_from_the_package(name):
    namespace: dict[str, object] = {}
    exec(f"from threadflow import {name}", namespace)
    assert namespace[name] is getattr(importlib.import_module("threadflow"), name)


def test_star_import_gives_exactly_the_public_names():
    namespace: dict[str, object] = {}
    exec("from threadflow import *", namespace)
    assert sorted(k for k in namespace if k != "__builtins__") == EXPECTED_ALL


def test_all_over_constant_is_the_seed_word():
    assert threadflow.ALL_OVER == "all_over"


@pytest.mark.parametrize(
    "name",
    [
        "FlowDefinitionError",
        "AlreadyStarted",
        "FlowRunning",
        "NoRetry",
        "DuplicateChildError",
        "EncodeError",
        "ProcessDiedError",
    ],
)
def test_library_errors_share_the_threadflow_base(name):
    assert issubclass(getattr(threadflow, name), threadflow.ThreadflowError)


def test_task_timeout_is_a_timeout_error():
    assert issubclass(threadflow.TaskTimeout, TimeoutError)


def test_cancelled_error_is_not_swallowed_by_except_exception():
    assert issubclass(threadflow.CancelledError, BaseException)
    assert not issubclass(threadflow.CancelledError, Exception)


@pytest.mark.parametrize("name", SIGNAL_NAMES)
def test_signals_module_has_one_signal_per_moment(name):
    signal = getattr(threadflow.signals, name)
    assert callable(signal.connect)
    assert callable(signal.send)
