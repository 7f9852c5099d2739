"""Subprocess attempts: a server's worker processes and the two ends of the pipe to each.

A subprocess attempt is still driven by one of the server's worker threads
(``threadflow.isolation.run_attempt``). That thread takes a worker process from the server's
``ProcessPool``, sends it the attempt, relays the children the task adds to the coordinator
(with the protocol thread attempts use, so they are durable when the call returns), watches the
attempt's cancel token, and finally posts the outcome to the coordinator like a thread attempt.
The coordinator does not know that a process was involved.

Worker processes are started with the ``spawn`` method: a fresh interpreter, never a ``fork``
of a server that holds threads, locks and SQLite connections. Each makes itself the leader of a
new process group before it runs anything, so that killing the group also kills what the task
started. A process is reused for the next attempt only if its attempt ended on its own;
after a cancelled attempt, a death or a broken pipe, its group is killed and it is reaped.

Messages on the pipe (pickled tuples)::

    worker -> server   ("ready", pid)             once, after it has made its process group
                       ("add", ids, datas, final) a chunk of encoded children; "added" answers
                                                  it (a final one once committed)
                       ("over", data)             the task returned; data: its task_over data
                       ("exit", exc_blob, data)   the task raised; exc_blob None if unpicklable
    server -> worker   ("run", job_blob)          run one attempt
                       ("cancel", reason)         cancel the running attempt's token
                       ("added", error)           the chunk is committed (error None) or not

The worker's end of the pipe doubles as its life line: EOF means the other side is gone.
"""

from __future__ import annotations

import atexit
import collections
import json
import logging
import multiprocessing
import multiprocessing.util  # noqa: F401  (registers its exit hook before ours: see _started)
import os
import pickle
import queue
import selectors
import signal
import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._clock import monotonic
from ._portable import PICKLE, RemoteAttempt, StateCopier, load_error, portable_error, run_job
from .cancel import CancelToken
from .children import wait_reply
from .errors import CancelledError, ProcessDiedError, signal_name
from .events import codec_of, codec_ref, error_data
from .messages import Done, Reply

if TYPE_CHECKING:
    from .coordinator import Attempt, Coordinator

log = logging.getLogger("threadflow")

_PICKLE = PICKLE
#: Seconds to wait for a killed process to be reaped before leaving it (uninterruptible sleep).
REAP_WAIT = 5.0


class _Wake:
    """Per-select markers returned by ``_Process.next_message``."""


_WOKEN = _Wake()  # the token was (maybe) cancelled
_GRACE_OVER = _Wake()  # the cancelled attempt did not return within the grace
_GONE = _Wake()  # the process ended (EOF on the pipe)


class ProcessPool:
    """The worker processes of one server: warm ones kept idle, busy ones tracked for killing.

    Made by the coordinator; starts no process until a subprocess attempt needs one. Any worker
    thread may call ``run``; ``shutdown`` (the coordinator, at its end, or ``atexit``)
    kills every process, busy or idle, and reaps them.
    """

    def __init__(self, coord: Coordinator) -> None:
        self._coord = coord
        self.grace = max(0.0, min(coord.settings.kill_grace, coord.grace / 2))
        specs = [s for s in coord.definition.tasks.values() if s.isolation == "subprocess"]
        cpus = os.cpu_count() or 1
        #: Idle processes kept warm: as many as a subprocess task may run at once.
        self.keep = max((s.max_concurrency or cpus for s in specs), default=0)
        self._name = str(coord.core.name)
        self._mp = multiprocessing.get_context("spawn")
        self._lock = threading.Lock()  # guards the fields below; never held across a wait
        self._idle: list[_Process] = []
        self._procs: set[_Process] = set()
        self._count = 0
        self._closed = False
        self._atexit = False
        self._blobs: dict[Any, bytes] = {}  # task function -> pickle (definitions are fixed)
        self._preload: tuple[bytes, ...] | None = None
        self._copier = StateCopier(
            "runs in a subprocess", "read them in a task with isolation='thread'"
        )

    # -- one attempt (a worker thread) -------------------------------------------------------

    def run(self, att: Attempt) -> None:
        """Run ``att`` in a worker process; post its ``Done`` after.

        Never raises: every failure becomes the attempt's outcome, as in a thread attempt.
        """
        proc: _Process | None = None
        reuse = False
        try:
            job = self._job(att)
            if att.token.cancelled:  # cancelled before it began: do not start a process for it
                raise CancelledError(att.token.reason or "cancelled")
            proc = self._acquire()
            att.token.on_cancel(proc.wake)
            error, data, reuse = proc.attempt(att, job, self.grace, self._spare)
        except BaseException as exc:  # the engine decides; a worker never raises
            error, data = exc, json.dumps({"error": error_data(exc)})
        finally:
            if proc is not None:
                self._release(proc, reuse)
        att.coord.post(Done(att.uid, error, data))

    def _blob(self, func: Any) -> bytes:
        blob = self._blobs.get(func)
        if blob is None:
            blob = self._blobs[func] = pickle.dumps(func, _PICKLE)
        return blob

    def _job(self, att: Attempt) -> bytes:
        stage, run = att.stage, att.run
        spec = stage.spec
        blob = self._blob(spec.task_func if att.child_json is None else spec.child_task_func)
        job = (
            stage.name,
            att.child_json,
            att.data,
            spec.child_task_func is not None,
            run.run_id,
            blob,
            self._copier.blobs(att),
            codec_ref(self._coord.definition.codec),
        )
        return pickle.dumps(job, _PICKLE)

    # -- processes ---------------------------------------------------------------------------

    def _acquire(self) -> _Process:
        while True:
            with self._lock:
                if self._closed:
                    raise CancelledError("stop")
                if not self._idle:
                    self._count += 1
                    name = f"threadflow-process-{self._name}-{self._count}"
                    break
                proc = self._idle.pop()
            if not proc.exited():
                return proc
            proc.terminate(None)  # died while idle (e.g. the OOM killer): replace it
            proc.close()
            with self._lock:
                self._procs.discard(proc)
        started = self._start(name)
        if started is None:
            raise CancelledError("stop")
        return started

    def _start(self, name: str, idle: bool = False) -> _Process | None:
        """Start a process (its boot goes on in the background); None if the pool closed."""
        if self._preload is None:
            # Imported while the process boots, not during its first attempt.
            funcs = [
                func
                for spec in self._coord.definition.tasks.values()
                if spec.isolation == "subprocess"
                for func in (spec.task_func, spec.child_task_func)
                if func is not None
            ]
            self._preload = tuple(self._blob(func) for func in funcs)
        proc = _Process(self._mp, name, self._preload)
        with self._lock:
            if not self._closed:
                if not self._atexit:
                    # multiprocessing.util registered its exit hook when imported, so ours runs
                    # first (LIFO): the server stops and its processes die before
                    # multiprocessing tries to terminate and join them.
                    atexit.register(self._at_exit)
                    self._atexit = True
                self._procs.add(proc)
                if idle:
                    self._idle.append(proc)
                return proc
        proc.terminate("stop")
        proc.close()
        return None

    def _spare(self) -> None:
        """Keep one process booting while none is idle (at most ``keep + 1`` in all).

        An attempt that times out or dies is retried at once, before its process is killed,
        and a killed process is never reused: the spare lets that retry start warm instead of
        spending its timeout on booting an interpreter.
        """
        with self._lock:
            if self._closed or self._idle or len(self._procs) > self.keep:
                return
            self._count += 1
            name = f"threadflow-process-{self._name}-{self._count}"
        try:
            self._start(name, idle=True)
        except Exception:  # e.g. out of file descriptors: the running attempt must not suffer
            log.warning("threadflow: could not start a spare process", exc_info=True)

    def _release(self, proc: _Process, reuse: bool) -> None:
        if reuse:
            with self._lock:
                # Up to keep + 1, the spare included: the process just used is warm and
                # proven, and taken first (LIFO); never drop it in favour of a spare.
                if not self._closed and len(self._idle) <= self.keep:
                    self._idle.append(proc)
                    return
        proc.terminate(None)
        proc.close()
        with self._lock:
            self._procs.discard(proc)

    def shutdown(self) -> None:
        """Kill every process of this pool with its group and reap them (idempotent).

        Busy processes are killed too; the threads driving them see the pipe close and report
        the attempt as killed.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            procs, idle = list(self._procs), self._idle
            self._idle = []
            registered, self._atexit = self._atexit, False
        if registered:
            atexit.unregister(self._at_exit)
        for proc in procs:  # signal all first, so that the reaping waits overlap
            proc.kill_group("stop")
        for proc in procs:
            proc.terminate("stop")
        for proc in idle:  # idle processes have no driving thread to close them
            proc.close()

    def _at_exit(self) -> None:
        # Stop the server first, so that its run is recorded as interrupted rather than seeing
        # its attempts die; then make sure nothing is left.
        try:
            self._coord.stop(grace=1.0, timeout=2.0)
        finally:
            self.shutdown()


class _Process:
    """One worker process and the server's end of its pipe.

    One driving thread at a time uses ``attempt``; ``kill_group`` and
    ``terminate`` may be called from any thread (the pool's shutdown). Only the owner calls
    ``close``, so that no file descriptor is closed under a thread waiting on it.
    """

    def __init__(self, mp: Any, name: str, preload: tuple[bytes, ...]) -> None:
        self.conn, child = mp.Pipe()
        # A socket object, not a raw fd: waking a closed process is then a harmless OSError,
        # never a write to a file descriptor number that was reused meanwhile.
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.process = mp.Process(target=worker_main, args=(child, preload), name=name, daemon=True)
        try:
            self.process.start()
        except BaseException:
            for end in (self.conn, child, self._wake_r, self._wake_w):
                end.close()
            raise
        child.close()
        assert self.process.pid is not None
        self.pid: int = self.process.pid
        self.ready = False  # the process has made its own group and waits for jobs
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.conn, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._lock = threading.Lock()
        self.exitcode: int | None = None
        self.reaped = False
        self.killed: str | None = None  # why threadflow killed it, if it did

    def wake(self) -> None:
        """Wake the driving thread (a cancel-token callback: quick, never raises)."""
        try:
            self._wake_w.send(b"\0")
        except OSError:  # closed, or the buffer is full: either way it is awake
            pass

    def send(self, msg: tuple[Any, ...]) -> bool:
        """Send ``msg``; False if the pipe is broken (the process is gone)."""
        try:
            self.conn.send(msg)
        except (OSError, ValueError):
            return False
        return True

    def next_message(self, cancel_at: float | None) -> Any:
        """The next message, or a marker: woken, grace over (at ``cancel_at``), or gone."""
        timeout = None if cancel_at is None else max(0.0, cancel_at - monotonic())
        # Not multiprocessing.connection.wait: its timeout loop reads time.monotonic, which a
        # frozen clock (freezegun) would stop.
        ready = {key.fileobj for key, _ in self._selector.select(timeout)}
        if self._wake_r in ready:
            try:
                while self._wake_r.recv(4096):
                    pass
            except OSError:  # drained
                pass
        if self.conn in ready:
            try:
                return self.conn.recv()
            except (EOFError, OSError):
                return _GONE
            except Exception as exc:  # a message that does not unpickle: the protocol broke
                log.error("threadflow: unreadable message from process %d: %r", self.pid, exc)
                return _GONE
        if cancel_at is not None and monotonic() >= cancel_at:
            return _GRACE_OVER
        return _WOKEN

    def attempt(
        self, att: Attempt, job: bytes, grace: float, on_sent: Callable[[], None]
    ) -> tuple[Any, str | None, bool]:
        """Run one attempt; return ``(error, data, reusable)`` for the coordinator's outcome.

        ``on_sent`` is called once the job is on its way (the pool starts a spare meanwhile).
        """
        token: CancelToken = att.token
        cancel_at: float | None = None
        sent = False
        while True:
            if cancel_at is None and token.cancelled:
                # Before "ready" no user code has run: nothing deserves a grace.
                cancel_at = monotonic() + (grace if sent else 0.0)
                if sent:
                    self.send(("cancel", token.reason or "cancelled"))
            if self.ready and not sent and cancel_at is None:
                if not self.send(("run", job)):
                    return self._ended(att, None)
                sent = True
                on_sent()
            msg = self.next_message(cancel_at)
            if msg is _WOKEN:
                continue
            if msg is _GONE:
                return self._ended(att, None)
            if msg is _GRACE_OVER:
                return self._ended(att, token.reason or "cancelled")
            tag = msg[0]
            if tag == "ready":
                self.ready = True
            elif tag == "add":
                self._relay(att, msg[1], msg[2], msg[3])
            elif tag in ("over", "exit"):
                return self._outcome(att, msg, token)
            else:  # pragma: no cover - both ends are this module
                log.error("threadflow: unknown message %r from process %d", tag, self.pid)
                return self._ended(att, None)

    def _relay(self, att: Attempt, ids: list[str], datas: list[str], final: bool) -> None:
        """Pass a chunk of children to the coordinator and the answer back to the process.

        With the process's own ``final`` flag: only its last chunk waits for a commit, as in a
        thread.
        """
        try:
            wait_reply(att, att.send_children(ids, datas, final))
        except BaseException as exc:
            self.send(("added", portable_error(exc)))
        else:
            self.send(("added", None))

    def _outcome(
        self, att: Attempt, msg: tuple[Any, ...], token: CancelToken
    ) -> tuple[Any, Any, bool]:
        error: BaseException | None = None
        if msg[0] == "over":
            data = msg[1]
        else:
            data = msg[2]
            error = load_error(msg[1], att, data, "its process")
        if not token.cancelled:
            return error, data, True
        # Cancelled, and it returned within the grace: still kill its group, which may hold
        # what the task started; a process whose attempt was cancelled is never reused.
        self.terminate(token.reason or "cancelled")
        return error, _with_process(data, self._facts()), False

    def _ended(self, att: Attempt, killed: str | None) -> tuple[Any, str, bool]:
        """The process died (``killed`` None) or is killed now: kill its group, reap it."""
        self.terminate(killed)
        facts = self._facts()
        error = ProcessDiedError(att.task(), att.number, self.pid, self.exitcode, self.killed)
        return error, json.dumps({"error": error_data(error), "process": facts}), False

    def _facts(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "exitcode": self.exitcode,
            "signal": signal_name(self.exitcode),
            "killed": self.killed,
        }

    def exited(self) -> bool:
        """Whether the process has ended, without reaping it (so its pid stays reserved)."""
        if not hasattr(os, "waitid"):  # macOS before Python 3.13: reaps, if it has ended
            return self.process.exitcode is not None
        try:
            info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # reaped already, by multiprocessing's own clean-up
            return True
        return info is not None

    def kill_group(self, reason: str | None) -> None:
        """Send SIGKILL to the process group, and to the process itself if it is alive.

        The group id is the leader's pid, and a pid cannot be reused while its process is
        unreaped or its group has members: the signal reaches this group or nobody.
        ``reason`` (timeout, run_over, stop) is recorded if the kill is what ends the process.
        """
        with self._lock:
            if self.reaped:
                return
            alive = not self.exited()
            if alive and reason is not None and self.killed is None:
                self.killed = reason
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass  # not its own group yet (before "ready"), or nobody left in it
            if alive:
                try:  # the leader, in case its group did not exist yet
                    os.kill(self.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass

    def terminate(self, reason: str | None) -> None:
        """Kill the group and reap the process, waiting at most ``REAP_WAIT`` seconds.

        ``reason`` None: the process died by itself (or is let go); its group is killed all the
        same so that nothing it started outlives it.
        """
        self.kill_group(reason)
        with self._lock:
            if self.reaped:
                return
            deadline = monotonic() + REAP_WAIT
            sentinel = selectors.DefaultSelector()
            try:
                sentinel.register(self.process.sentinel, selectors.EVENT_READ)
                while (code := self.process.exitcode) is None:  # waitpid(WNOHANG)
                    left = deadline - monotonic()
                    if left <= 0:
                        log.warning(
                            "threadflow: process %d did not end %.0f s after SIGKILL; leaving it",
                            self.pid,
                            REAP_WAIT,
                        )
                        return
                    # The sentinel wakes us when it ends, unless something it started holds a
                    # copy of it: then this is a short poll.
                    sentinel.select(min(left, 0.05))
            finally:
                sentinel.close()
            self.exitcode = code
            self.reaped = True
            if code != -signal.SIGKILL:
                self.killed = None  # it ended on its own before the kill reached it

    def close(self) -> None:
        """Release the pipe and descriptors (the owner only, after ``terminate``)."""
        self._selector.close()
        for end in (self.conn, self._wake_r, self._wake_w):
            end.close()
        if self.reaped:
            self.process.close()


def _with_process(data: str | None, facts: dict[str, Any]) -> str:
    record = json.loads(data) if data else {}
    record["process"] = facts
    return json.dumps(record)


# -- the worker process ---------------------------------------------------------------------


class _Link:
    """The worker's end of the pipe: a listener thread reads it, the main thread runs tasks.

    It is also the child sink of the attempt context, so that ``add_children_tasks`` sends its
    chunks over the pipe as a thread sends them to the coordinator.
    """

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.jobs: queue.SimpleQueue[tuple[CancelToken, bytes] | None] = queue.SimpleQueue()
        self.token: CancelToken | None = None  # the token of the latest job
        # The "add"s sent and not yet answered: "added" answers them in order.
        self.replies: collections.deque[Any] = collections.deque()
        self._send_lock = threading.Lock()
        self.thread = threading.Thread(target=self._listen, name="threadflow-link", daemon=True)

    def send(self, msg: tuple[Any, ...]) -> None:
        with self._send_lock:
            self.conn.send(msg)

    def add(self, ids: list[str], datas: list[str], final: bool) -> Reply:
        # Answered by the server's "added" messages, in order; add_children_tasks waits on it.
        reply = Reply()
        self.replies.append(reply)
        self.send(("add", ids, datas, final))
        return reply

    def alive(self) -> bool:
        return self.thread.is_alive()

    def _listen(self) -> None:
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                # The server is gone (it died, or closed us): take down the whole group, since
                # nobody is left to kill what the task started.
                os.killpg(0, signal.SIGKILL)
                return
            tag = msg[0]
            if tag == "run":
                # The token exists from here on, so a "cancel" that overtakes the job's start
                # is not lost.
                self.token = CancelToken()
                self.jobs.put((self.token, msg[1]))
            elif tag == "cancel":
                if self.token is not None:
                    self.token.cancel(msg[1])
            elif tag == "added":
                if self.replies:
                    self.replies.popleft().set(msg[1])


def worker_main(conn: Any, preload: tuple[bytes, ...] = ()) -> None:
    """The body of a worker process: make a process group, then run jobs until the pipe closes.

    ``preload``: pickled task functions, loaded (their modules imported) before "ready", so
    that an attempt does not spend its timeout importing them. A failure here is left for the
    attempt to report.
    """
    os.setpgid(0, 0)
    # Processes the task execs must not hold the pipe either.
    os.set_inheritable(conn.fileno(), False)
    # Started daemonic so that multiprocessing never waits for it at exit; tasks in it may
    # still start processes of their own (their group dies with it).
    multiprocessing.current_process().daemon = False
    # A task that forks must not leave a copy of the pipe open: EOF is how each side learns
    # that the other is gone.
    os.register_at_fork(after_in_child=conn.close)
    link = _Link(conn)
    link.thread.start()
    for blob in preload:
        try:
            pickle.loads(blob)
        except Exception:
            pass
    link.send(("ready", os.getpid()))
    while True:
        item = link.jobs.get()
        if item is None:  # pragma: no cover - the server kills rather than asks
            return
        token, job = item
        link.send(_run_job(link, token, job))


def _run_job(link: _Link, token: CancelToken, job: bytes) -> tuple[Any, ...]:
    task, child_json, data_json, has_children, run_id, func_blob, blobs, codec = pickle.loads(job)
    ctx = RemoteAttempt(token, link, task, child_json, has_children, run_id, codec_of(codec))
    return run_job(ctx, data_json, func_blob, blobs, "its worker process")
