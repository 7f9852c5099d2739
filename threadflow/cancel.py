"""Cancel tokens: how a running attempt learns that it should stop.

Cancellation is cooperative for threads: the coordinator cancels the token (timeout, a failed
run, ``stop()``) and the task notices it through ``sleep``, ``CancelToken.wait``,
``CancelToken.raise_if_cancelled`` or ``CancelToken.cancelled``. A thread that never
looks is abandoned, not joined.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .errors import CancelledError

if TYPE_CHECKING:
    from .messages import AttemptContext

_event_lock = threading.Lock()


class CancelToken:
    """The cancel state of one attempt. Cancelling is idempotent; the first reason wins."""

    __slots__ = ("_callbacks", "_cancelled", "_event", "reason")

    def __init__(self) -> None:
        # Most attempts never wait on their token: the Event is made only when one does.
        # Invariant: cancel() writes _cancelled before it reads _event, and _waitable() writes
        # _event before it reads _cancelled, so no wait can miss a cancel.
        self._cancelled = False
        self._event: threading.Event | None = None
        self.reason: str | None = None
        self._callbacks: list[Callable[[], None]] | None = None

    @property
    def cancelled(self) -> bool:
        """True once the attempt has been cancelled."""
        return self._cancelled

    def cancel(self, reason: str = "cancelled") -> None:
        """Ask the attempt to stop; safe from any thread, any number of times."""
        if self.reason is None:
            self.reason = reason
        self._cancelled = True
        event = self._event
        if event is not None:
            event.set()
        for callback in self._callbacks or ():
            callback()

    def _waitable(self) -> threading.Event:
        event = self._event
        if event is None:
            with _event_lock:
                event = self._event
                if event is None:
                    event = self._event = threading.Event()
        if self._cancelled:
            event.set()
        return event

    def on_cancel(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` once the token is cancelled (at once if it already is).

        The engine uses it to wake the thread that drives a subprocess attempt or to cancel a
        remote future. The callback runs in the cancelling thread (usually the coordinator),
        so it must be quick and must not raise; it may run twice when registering races with
        cancelling.
        """
        # Append, then look: whichever order this and cancel() interleave in, the callback
        # runs at least once after the token is cancelled.
        if self._callbacks is None:
            self._callbacks = []
        self._callbacks.append(callback)
        if self._cancelled:
            callback()

    def raise_if_cancelled(self) -> None:
        """Raise ``CancelledError`` if the attempt has been cancelled."""
        if self._cancelled:
            raise CancelledError(self.reason or "cancelled")

    def wait(self, seconds: float | None) -> None:
        """Sleep up to ``seconds`` (None: until cancelled), waking at once on cancel.

        :raises CancelledError: when the token is (or becomes) cancelled.
        """
        if self._waitable().wait(seconds):
            raise CancelledError(self.reason or "cancelled")

    def __repr__(self) -> str:
        state = f"cancelled ({self.reason})" if self.cancelled else "active"
        return f"<CancelToken {state}>"


class _Local(threading.local):
    # The attempt the current worker thread is running, or None outside a task.
    ctx: AttemptContext | None = None


_local = _Local()


def enter_attempt(ctx: AttemptContext | None) -> None:
    """Make ``ctx`` this thread's running attempt (None: the attempt has ended)."""
    _local.ctx = ctx


def current_context() -> AttemptContext | None:
    """The running attempt of this thread (engine internal), or None."""
    return _local.ctx


def current_token() -> CancelToken:
    """The cancel token of the attempt running in this thread.

    :raises RuntimeError: outside a ``task_func`` or ``child_task_func``.
    """
    ctx = _local.ctx
    if ctx is None:
        raise RuntimeError(
            "threadflow.current_token() was called outside a task; call it from inside a "
            "task_func or child_task_func"
        )
    return ctx.token


def sleep(seconds: float) -> None:
    """Sleep that wakes on cancel: inside a task it is ``current_token().wait(seconds)``.

    Outside a task it is a plain ``time.sleep``.

    :raises CancelledError: when the running attempt is cancelled during the sleep.
    """
    ctx = _local.ctx
    if ctx is None:
        time.sleep(seconds)
    else:
        ctx.token.wait(seconds)
