"""Helpers shared by the test files: signal recording and a bounded wait for outside facts."""

import contextlib
import signal
import threading

from threadflow import signals

#: Every signal, in the order of a run's life.
SIGNAL_NAMES = (
    "start_flow",
    "task_start",
    "task_over",
    "task_all_over",
    "task_failed",
    "task_timeout",
    "task_exit",
    "task_retry",
    "all_over",
    "failed_over",
)
#: Signals about the whole run, sent with ``task=None``.
RUN_SIGNALS = {"start_flow", "all_over", "failed_over"}


def _recorder(log, name):
    def receive(sender, **kwargs):
        task_tuple = () if name in RUN_SIGNALS else kwargs["task"]
        log.append(" ".join([name, *map(str, task_tuple)]))

    return receive


@contextlib.contextmanager
def recording(server):
    """Record the server's signals as ``"name task child"`` strings, in the order they fire."""
    log = []
    with contextlib.ExitStack() as stack:
        for name in SIGNAL_NAMES:
            signal = getattr(signals, name)
            stack.enter_context(signal.connected_to(_recorder(log, name), sender=server))
        yield log


def wait_until(predicate, within=10.0):
    """Wait until ``predicate()`` holds; False if it still does not after ``within`` seconds.

    Only for facts no event announces: another process, a file, the store seen from outside,
    a count the engine keeps. It looks every 10 ms; ``within`` is a hang guard.
    """
    tick = threading.Event()
    for _ in range(int(within / 0.01)):
        if predicate():
            return True
        tick.wait(0.01)
    return predicate()


def ctrl_c_able() -> None:
    """``preexec_fn`` of a program a test interrupts with SIGINT: the default disposition, as a
    terminal's foreground job has. A program started with SIGINT ignored (a shell starts its
    background jobs so) keeps ignoring it: Python only turns SIGINT into KeyboardInterrupt
    when it finds the default disposition at start-up."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
