"""What a run gives back: ``RunResult``, and ``RunHandle`` to wait for it."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RunResult:
    """The end of a run.

    :ivar outcome: ``"all_over"``, ``"failed_over"``, ``"cancelled"`` (``cancel()`` ended it)
        or ``"interrupted"`` (``stop()`` or a failure of the engine ended it); the last two can
        be replayed.
    :ivar run_id: the run's id in the store.
    :ivar state: the run's state, including every change the final callbacks made.
    :ivar task: the task that could not be retried (``("fetch",)`` or ``("fetch", child_id)``),
        or None.
    :ivar error: the last error of that task, or None.
    :ivar failed: tasks that used up their attempts but were tolerated (``exit_on_failed=False``).
    """

    outcome: str
    run_id: str
    state: dict[str, Any]
    task: tuple[Any, ...] | None = None
    error: BaseException | None = None
    failed: list[tuple[Any, ...]] = field(default_factory=list)

    def as_tuple(self) -> tuple[Any, ...]:
        """The seed's shape: ``("all_over", state)`` or
        ``("failed_over", ("can_not_retry", task, state))``; ``("interrupted", state)`` after
        ``stop()``."""
        if self.outcome == "failed_over":
            return ("failed_over", ("can_not_retry", self.task, self.state))
        return (self.outcome, self.state)

    def __repr__(self) -> str:
        extra = f", task={self.task!r}, error={self.error!r}" if self.task else ""
        return f"RunResult(outcome={self.outcome!r}, run_id={self.run_id!r}{extra})"


def settle(handle: RunHandle, result: RunResult | None, exc: BaseException | None = None) -> None:
    """Give ``handle`` its result (the engine's side of ``RunHandle.result``)."""
    handle._set(result, exc)


class RunHandle:
    """A run that was started: its id, and its ``RunResult`` once it ends.

    :ivar run_id: the run's id in the store.
    :ivar start_time: when it started (aware UTC datetime).
    :ivar store: the ``EventStore`` of its log (None for a handle made by hand).
    """

    def __init__(
        self,
        run_id: str,
        start_time: Any,
        store: Any = None,
        canceller: Callable[[str, str], None] | None = None,
    ) -> None:
        self.run_id = run_id
        self.start_time = start_time
        self.store = store
        self._canceller = canceller
        self._done = threading.Event()
        self._result: RunResult | None = None
        self._exc: BaseException | None = None

    def cancel(self, reason: str = "cancelled") -> None:
        """Cancel this run, without stopping its server; returns at once.

        Every running attempt is cancelled (its token; a subprocess attempt's process is
        killed; a remote attempt's future cancelled), the run ends ``"cancelled"`` (a
        ``cancelled`` event; it can be replayed) and ``result()`` returns that outcome. A run
        that has already ended keeps its result.
        """
        if self._canceller is not None and not self.done():
            self._canceller(self.run_id, reason)

    def done(self) -> bool:
        """True once the run has ended."""
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> RunResult:
        """Wait for the run's result.

        :raises TimeoutError: if the run has not ended within ``timeout`` seconds.
        :raises ThreadflowError: if the engine itself failed and could not finish the run.
        """
        if not self._done.wait(timeout):
            raise TimeoutError(f"run {self.run_id} has not ended after {timeout} s")
        if self._exc is not None:
            raise self._exc
        assert self._result is not None
        return self._result

    def _set(self, result: RunResult | None, exc: BaseException | None = None) -> None:
        self._result, self._exc = result, exc
        self._done.set()

    def __repr__(self) -> str:
        return f"<RunHandle {self.run_id} {'done' if self.done() else 'running'}>"
