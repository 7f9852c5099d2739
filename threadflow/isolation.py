"""Where attempts run: the server's worker threads, and the code that runs one attempt.

Subprocess attempts are driven from the same threads; their processes live in
``threadflow.processes``. Attempts in the user's executors: ``threadflow.executors``.

Workers run user code and report an *outcome value* to the coordinator's inbox; they never
raise into the engine and never touch run state (one owner: the coordinator).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._clock import monotonic
from .cancel import enter_attempt
from .events import decode_id, decode_payload, encode_result, error_json
from .messages import Done

if TYPE_CHECKING:
    from .coordinator import Attempt


def run_attempt(first: Attempt) -> None:
    """Run an attempt in this thread and post its outcome to the coordinator.

    The message is a ``Done``. If the attempt succeeded and its stage has a standby child,
    this worker takes it at once and runs it in the finished attempt's slot (``next``, started
    at ``started``), so that a stream of children
    does not wait for a coordinator turn between two of them. The attempt is this thread's
    context while it runs, so that ``current_token()`` and ``add_children_tasks()`` find it.
    A subprocess attempt is handed to a worker process (``threadflow.processes``); this
    thread drives it and posts its outcome the same way (it hands nothing over).
    """
    if first.stage.spec.isolation == "subprocess":
        first.worker = threading.current_thread().name
        try:
            first.coord.procs.run(first)
        finally:
            first.returned = True
        return
    post = first.coord.post
    codec = first.coord.definition.codec
    worker = threading.current_thread().name
    att: Attempt | None = first
    while att is not None:
        att.worker = worker
        enter_attempt(att)
        try:
            spec = att.stage.spec
            if att.child_json is None:
                value = spec.task_func(att.run.view)
            else:
                child = (decode_id(att.child_json), decode_payload(att.data, codec))
                value = spec.child_task_func(child, att.run.view)
            data = encode_result(value, codec)
            error = None
        except BaseException as exc:  # the engine decides; a worker never raises
            value, error, data = None, exc, error_json(exc)
        finally:
            enter_attempt(None)
            att.returned = True
        nxt = None
        standby = att.stage.standby
        # Only a success hands its slot over: after a failure the coordinator decides (a retry
        # goes first), and a cancelled attempt's slot is no longer its own.
        if standby and error is None and not att.token.cancelled:
            try:
                nxt = standby.popleft()
            except IndexError:
                pass
            else:
                if nxt.run.over:  # the coordinator is draining it: not ours to start
                    nxt = None
        post(Done(att.uid, error, data, nxt, monotonic() if nxt else 0.0))
        del value, error  # do not keep them alive while running the next one
        att = nxt


class ThreadPool:
    """Daemon worker threads that grow on demand.

    Invariant: every queued item is matched either by an idle worker (an ``_idle`` permit) or by
    a newly started thread, so an item never waits behind a thread that was abandoned in user
    code. The coordinator enforces ``max_concurrency``; the pool only supplies threads.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._threads: list[threading.Thread] = []

    def submit(self, fn: Callable[[Any], None], arg: Any) -> None:
        self._queue.put((fn, arg))
        if not self._idle.acquire(blocking=False):
            thread = threading.Thread(
                target=self._work,
                name=f"threadflow-worker-{self._name}-{len(self._threads)}",
                daemon=True,
            )
            self._threads.append(thread)
            thread.start()

    def _work(self) -> None:
        get = self._queue.get
        while True:
            item = get()
            if item is None:
                return
            item[0](item[1])
            del item  # drop the attempt before idling: it may hold a large state
            self._idle.release()

    def shutdown(self) -> None:
        """Ask every worker to exit once it is idle; does not wait (a worker may be stuck)."""
        for _ in self._threads:
            self._queue.put(None)
