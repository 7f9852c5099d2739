"""Attempts in the user's ``concurrent.futures.Executor``\\ s: in this process, or remote.

``start_link(executor=..., executors={...})`` gives a server executors, and ``task(executor=,
child_executor=)`` picks one by name. There are two kinds:

* **In-process**: a ``ThreadPoolExecutor`` (or a subclass) runs
  ``run_attempt`` in its threads, exactly like the server's own
  threads (without their hand-over of children between attempts).
* **Remote**: every other executor (``ProcessPoolExecutor``, Dask's
  ``Client.get_executor()``, anything unknown) runs ``_run_remote`` on a picklable job: the
  task function (by import name when it has one), the child, a copy of the state's picklable
  entries and the seconds left until the deadline. There, ``add_children_tasks`` checks and
  encodes children as in a thread but keeps them in memory; they come back with the outcome and
  the coordinator adds them right before it records the attempt's success. The cancel token
  cancels itself at the deadline, since nothing else can reach it there.

No thread waits for a remote attempt: the future's done callback posts the outcome to the
coordinator's inbox. Dask's executors (``Client.get_executor()``, or a ``Client``) are driven
through their client instead, a turn at a time: the attempts the coordinator submits in one
turn go to the cluster in one ``client.map`` when it calls ``flush()``, and outcomes come back
in batches (``_DaskBatches``); each attempt keeps a future of its own.

A cancelled remote attempt (timeout, failed run, ``stop()``) gets ``future.cancel()``, called
from one of the server's threads because an executor may block in it (Dask asks its
scheduler); the executor may or may not stop the work, and whatever comes back
later is a stale outcome, as for an abandoned thread.
"""

from __future__ import annotations

import concurrent.futures as cf
import difflib
import functools
import logging
import os
import pickle
import sys
import traceback
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, cast

from ._clock import monotonic
from ._portable import PICKLE, RemoteAttempt, StateCopier, load_error, run_job
from .cancel import CancelToken
from .errors import CancelledError, DuplicateChildError, ThreadflowError
from .events import codec_of, codec_ref, decode_id, error_json
from .isolation import ThreadPool
from .messages import Carried, Done, Reply

if TYPE_CHECKING:
    from .coordinator import Attempt

log = logging.getLogger("threadflow")

#: Where a task's attempts run: ``(label, executor)``, or None for the server's own threads.
Where = tuple[str, Any] | None


def is_local(executor: Any) -> bool:
    """Whether ``executor`` runs attempts in threads of this process."""
    return isinstance(executor, cf.ThreadPoolExecutor)


def _check_executor(what: str, value: Any) -> None:
    if not callable(getattr(value, "submit", None)):
        raise TypeError(
            f"start_link(): {what}={value!r} is not a concurrent.futures.Executor (it has no "
            "submit()); pass e.g. ThreadPoolExecutor(), ProcessPoolExecutor() or a Dask "
            "client's get_executor()"
        )


def resolve(
    definition: Any, executor: Any, executors: Mapping[str, Any] | None
) -> dict[str, tuple[Where, Where]]:
    """Where each task's parent and children run, checked against what ``start_link`` got.

    :raises TypeError: for an executor without ``submit()`` or a bad ``executors`` mapping.
    :raises ValueError: for a task that names an executor not in ``executors``, or a task with
        ``isolation="subprocess"`` placed in a remote executor.
    """
    if executor is not None:
        _check_executor("executor", executor)
    named: dict[str, Any] = {}
    if executors is not None:
        if not isinstance(executors, Mapping):
            raise TypeError(
                f"start_link(): executors={executors!r} is not a mapping; pass a dict of "
                "name -> executor, e.g. executors={'dask': client.get_executor()}"
            )
        for name, value in executors.items():
            if not isinstance(name, str) or not name:
                raise TypeError(
                    f"start_link(): executors has the name {name!r}; names are non-empty strings"
                )
            _check_executor(f"executors[{name!r}]", value)
            named[name] = value
    default: Where = None if executor is None else ("the default executor", executor)
    flow = definition.name
    placed: dict[str, tuple[Where, Where]] = {}
    for task, spec in definition.tasks.items():
        where = f"flow {flow!r}: task {task!r}"
        parent = _pick(where, "executor", spec.executor, named, default)
        child = _pick(where, "child_executor", spec.child_executor, named, parent)
        if spec.isolation == "subprocess":
            for place in (parent, child):
                if place is not None and not is_local(place[1]):
                    raise ValueError(
                        f"start_link(): {where} has "
                        f"isolation='subprocess' and runs in {place[0]}, which runs attempts "
                        "in other processes; a subprocess attempt is driven from a thread of "
                        "this process. Leave out isolation='subprocess' (the executor's "
                        "workers are other processes already), or run the task in the "
                        "server's threads or a ThreadPoolExecutor"
                    )
        placed[task] = (parent, child)
    return placed


def _pick(
    where: str, option: str, name: str | None, named: dict[str, Any], fallback: Where
) -> Where:
    if name is None:
        return fallback
    if name not in named:
        if named:
            close = difflib.get_close_matches(name, list(named), n=1)
            known = f"the names given are {sorted(named)}" + (
                f"; did you mean {close[0]!r}?" if close else ""
            )
        else:
            known = f"no executors were given: pass executors={{{name!r}: <executor>}}"
        raise ValueError(
            f"start_link(): {where} has {option}={name!r}, which is not in "
            f"start_link(executors=...); {known}"
        )
    return (f"executor {name!r}", named[name])


def make_pools(
    placed: Mapping[str, tuple[Where, Where]], threads: ThreadPool
) -> dict[str, tuple[Any, Any]]:
    """Each task's ``(parent pool, child pool)``; one pool per executor, shared by tasks."""
    pools: dict[int, Any] = {}

    def pool(where: Where) -> Any:
        if where is None:
            return threads
        label, executor = where
        made = pools.get(id(executor))
        if made is None:
            if is_local(executor):
                made = ExecutorPool(executor)
            else:
                made = RemotePool(executor, label, threads)
            pools[id(executor)] = made
        return made

    return {task: (pool(parent), pool(child)) for task, (parent, child) in placed.items()}


def batching_pools(pools: Mapping[str, tuple[Any, Any]]) -> list[Any]:
    """The pools among ``pools`` that keep a turn's attempts until their ``flush()``.

    The coordinator calls ``flush()`` on each of them after the submits of every turn; a pool
    with nothing kept does nothing then.
    """
    found: dict[int, Any] = {}
    for pair in pools.values():
        for pool in pair:
            if callable(getattr(pool, "flush", None)):
                found[id(pool)] = pool
    return list(found.values())


class ExecutorPool:
    """Runs attempts in a user's in-process executor (a ``ThreadPoolExecutor``)."""

    def __init__(self, executor: Any) -> None:
        self._executor = executor

    def submit(self, fn: Callable[[Any], None], arg: Any) -> None:
        self._executor.submit(fn, arg)


class RemotePool:
    """Runs attempts in an executor whose workers are other processes (or machines).

    :param label: how messages name the executor (``"executor 'dask'"``).
    :param threads: the server's own threads, which call ``future.cancel()``.
    """

    def __init__(self, executor: Any, label: str, threads: ThreadPool) -> None:
        self._executor = executor
        self._label = label
        self._threads = threads
        self._copier = StateCopier(
            f"runs in {label}", "read them in a task that runs in the server's own threads"
        )
        # Task function -> its pickle by import name, or the function itself when it has no
        # importable name (the executor then pickles it its own way, e.g. cloudpickle).
        self._funcs: dict[Any, Any] = {}
        # Makes every job unique, also across servers and processes: Dask names a task by a
        # hash of its function and arguments (unless pure=False), and would answer a retry, or
        # an attempt of another server, with the result it holds for an equal job.
        self._nonce = uuid.uuid4().hex
        # Dask: a turn's attempts go in one client.map, outcomes come back in batches.
        found = _dask_client(executor)
        self._dask = None if found is None else _DaskBatches(self, *found)

    def submit(self, fn: Callable[[Any], None], att: Attempt) -> None:
        """Send ``att`` to the executor; its outcome is posted to the coordinator's inbox.

        ``fn`` (``run_attempt``, which runs an attempt in this
        process) is not used: the executor's worker runs ``_run_remote``. Never raises.
        Called on the coordinator thread, right after ``att.deadline`` was set. On Dask the
        attempt waits for :meth:`flush`, at the end of the same turn.
        """
        try:
            job = self._job(att)
            if self._dask is not None:
                self._dask.add(att, job)
                return
            future = self._executor.submit(_run_remote, job)
        except Exception as exc:  # e.g. the executor was shut down, or the job does not pickle
            self._post_error(att, self._error(att, exc))
            att.returned = True
            return
        # The token's callback reaches the future through a list that _done empties: no
        # reference cycle keeps a finished future (and Dask's copy of its result) alive.
        pending = [future]
        att.token.on_cancel(lambda: self._cancel_later(pending))
        future.add_done_callback(lambda done: self._done(att, done, pending))

    def flush(self) -> None:
        """Send the attempts of this turn that wait for it (Dask only), in one call.

        Called by the coordinator at the end of each turn that submitted attempts, after the
        last ``submit``. Never raises.
        """
        if self._dask is not None:
            self._dask.flush()

    def _job(self, att: Attempt) -> tuple[Any, ...]:
        """What ``_run_remote`` gets for ``att``: picklable, and unique (see ``_nonce``)."""
        spec = att.stage.spec
        func = self._ref(spec.task_func if att.child_json is None else spec.child_task_func)
        left = None if att.deadline is None else max(0.0, att.deadline - monotonic())
        return (
            f"{self._nonce}-{att.uid}",
            att.stage.name,
            att.child_json,
            att.data,
            spec.child_task_func is not None,
            att.run.run_id,
            func,
            self._copier.blobs(att),
            left,
            codec_ref(att.coord.definition.codec),
        )

    def _cancel_later(self, pending: list[Any]) -> None:
        """A token callback (the cancelling thread: quick, never raises)."""
        for future in pending[:1]:
            self._threads.submit(_cancel, future)

    def _ref(self, func: Any) -> Any:
        try:
            return self._funcs[func]
        except (KeyError, TypeError):  # TypeError: an unhashable callable, never cached
            pass
        ref = func
        inner = func
        while isinstance(inner, functools.partial):  # where is its function from?
            inner = inner.func
        if getattr(inner, "__module__", "__main__") != "__main__":
            # By import name: quick to send, and an error that says what to fix if the worker
            # cannot import it. __main__ is left to the executor: a remote worker's __main__ is
            # not this program's, and cloudpickle (Dask) sends such functions by value.
            try:
                ref = pickle.dumps(func, PICKLE)
            except Exception:
                pass  # a lambda or nested function: the executor may still manage (cloudpickle)
        try:
            self._funcs[func] = ref
        except TypeError:
            pass
        return ref

    def _done(self, att: Attempt, future: Any, pending: list[Any]) -> None:
        """The future is done: post the outcome. Runs in the executor's thread; never raises."""
        pending.clear()
        att.returned = True
        try:
            outcome = future.result()
        except BaseException as exc:  # the executor failed, not the task: it never raises
            self._post_error(att, self._error(att, exc))
            return
        self._post_outcome(att, outcome)

    def _post_outcome(self, att: Attempt, outcome: tuple[Any, ...]) -> None:
        """Post what ``_run_remote`` returned for ``att``. Never raises."""
        post = att.coord.post
        try:
            if outcome[0] == "over":
                _, data, ids, datas = outcome
                if ids:
                    post(Carried(att.uid, data, ids, datas))
                else:
                    post(Done(att.uid, None, data))
            else:
                _, blob, data = outcome
                post(Done(att.uid, load_error(blob, att, data, self._label), data))
        except BaseException as exc:  # pragma: no cover - a malformed outcome
            self._post_error(att, exc)

    @staticmethod
    def _post_error(att: Attempt, error: BaseException) -> None:
        att.coord.post(Done(att.uid, error, error_json(error)))

    def _error(self, att: Attempt, exc: BaseException) -> BaseException:
        """The error to record when the executor, not the task, failed the attempt."""
        if isinstance(exc, cf.CancelledError):
            return CancelledError(att.token.reason or "cancelled")
        cause = _pickling_cause(exc)
        if cause is not None:
            text = f"{type(cause).__name__}: {cause}"
            error = ThreadflowError(
                f"task {att.task()!r} attempt {att.number}: {self._label} could not send the "
                f"attempt to its workers ({text}). A remote executor pickles the task "
                "function and the copy of the state: define the function at the top level of "
                "a module, so that it travels by import name (lambdas and nested functions "
                "travel only with executors that use cloudpickle, such as Dask's)"
            )
            error.__cause__ = exc
            return error
        return exc


def _dask_client(executor: Any) -> tuple[Any, Any, dict[str, Any]] | None:
    """``(executor, client, options)`` if ``executor`` is Dask's, else None.

    ``Client.get_executor()`` (a ``distributed.cfexecutor.ClientExecutor``) and a ``Client``
    itself count; ``options`` are what the executor's ``submit()`` would pass on to the client
    (``workers=``, ``resources=``, ``retries=`` ...). Dask is looked for only if it was
    imported: an executor of Dask cannot exist without that, and an import costs a second.
    """
    distributed = sys.modules.get("distributed")
    client_type = getattr(distributed, "Client", None)
    if client_type is None:
        return None
    if isinstance(executor, client_type):
        return executor, executor, {}
    try:
        from distributed.cfexecutor import ClientExecutor
    except ImportError:  # pragma: no cover - a Dask without it: the generic path works
        return None
    if isinstance(executor, ClientExecutor):
        client = getattr(executor, "_client", None)
        options = getattr(executor, "_kwargs", None)
        if isinstance(client, client_type) and isinstance(options, dict):
            return executor, client, options
    return None  # another executor, or a ClientExecutor whose insides changed: one by one


class _DaskBatches:
    """The attempts of a :class:`RemotePool` on Dask: sent a turn at a time, answered in
    batches.

    Through ``Executor.submit`` every attempt is a message of its own to the scheduler, its
    outcome a request of its own for the result, and each crosses three threads of this
    process on its way back; for short children that costs more than the children. Here
    ``add`` (coordinator thread) keeps a turn's attempts and ``flush`` (coordinator thread, end
    of the turn) sends them with one ``client.map``: one message, whatever their number. Each
    attempt still has a future of its own, under a key of its own (the task's name first, so
    that Dask's dashboard groups them by task): its deadline, its cancel (``future.cancel()``
    when its token is cancelled) and a late outcome stay per attempt, and ``max_concurrency``
    holds because the coordinator submits exactly what it would submit one by one.

    Outcomes are read on the client's event loop, where Dask learns them: one coroutine per
    pool (``_drain``) takes every future that finished meanwhile, fetches their results with one
    ``client.gather`` and posts them to the coordinator's inbox, which takes them in one turn
    and sends the attempts that replace them in one ``client.map``. The busier the cluster,
    the bigger the batches.

    Invariant: ``_done``, ``_atts`` and ``_draining`` are touched only on the event loop;
    ``_drain`` runs whenever ``_done`` holds a future, and ends when it holds none.
    """

    def __init__(
        self, pool: RemotePool, executor: Any, client: Any, options: dict[str, Any]
    ) -> None:
        from distributed import as_completed

        self._pool = pool
        self._executor = executor
        self._client = client
        # The keys name the jobs, so pure= (naming by a hash of the job) has nothing to do.
        self._options = {k: v for k, v in options.items() if k != "pure"}
        self._turn: list[tuple[Attempt, tuple[Any, ...]]] = []  # coordinator thread only
        self._done: Any = cast(Any, as_completed)(loop=client.loop)  # futures that finished
        self._atts: dict[Any, tuple[Attempt, list[Any]]] = {}  # future key -> attempt
        self._draining = False

    def add(self, att: Attempt, job: tuple[Any, ...]) -> None:
        self._turn.append((att, job))

    def flush(self) -> None:
        """Send the turn's attempts. Never raises: an attempt that could not be sent is
        posted as an ``exit`` with the error."""
        if not self._turn:
            return
        turn, self._turn = self._turn, []
        try:
            futures: list[Any] = self._map(turn)
        except Exception as exc:
            if len(turn) == 1:
                self._refused(turn[0][0], exc)
                return
            # One job may spoil the call (it does not pickle, say): send each alone, so that
            # only the attempts that cannot go fail, each with its own error.
            futures = []
            for one in turn:
                try:
                    futures.extend(self._map([one]))
                except Exception as exc_one:
                    self._refused(one[0], exc_one)
                    futures.append(None)
        sent = []
        cancel_later = self._pool._cancel_later
        for (att, _), future in zip(turn, futures, strict=True):
            if future is None:
                continue
            # As on the one-by-one path: the token reaches the future through a list that the
            # outcome empties, so that no cycle keeps a finished future alive.
            pending = [future]
            att.token.on_cancel(functools.partial(cancel_later, pending))
            sent.append((att, future, pending))
        if sent:
            self._client.loop.add_callback(self._arrive, sent)

    def _map(self, turn: list[tuple[Attempt, tuple[Any, ...]]]) -> list[Any]:
        # What ClientExecutor.submit() says once shut down (a Client's _shutdown is a method).
        if getattr(self._executor, "_shutdown", None) is True:
            raise RuntimeError("cannot schedule new futures after shutdown")
        nonce = self._pool._nonce
        futures = self._client.map(
            _run_remote,
            [job for _, job in turn],
            key=[f"{att.stage.name}-{nonce}-{att.uid}" for att, _ in turn],
            pure=False,
            **self._options,
        )
        known = getattr(self._executor, "_futures", None)
        if known is not None and hasattr(known, "update"):
            known.update(futures)  # ClientExecutor.shutdown() waits for (or cancels) them
        return list(futures)

    def _refused(self, att: Attempt, exc: BaseException) -> None:
        self._pool._post_error(att, self._pool._error(att, exc))
        att.returned = True

    def _arrive(self, sent: list[tuple[Attempt, Any, list[Any]]]) -> None:
        """On the event loop: watch the futures just sent."""
        for att, future, pending in sent:
            self._atts[future.key] = (att, pending)
        self._done.update([future for _, future, _ in sent])
        if not self._draining:
            self._draining = True
            self._client.loop.add_callback(self._drain)

    async def _drain(self) -> None:
        """On the event loop: post outcomes, a batch of finished futures at a time."""
        import asyncio  # loaded already: Dask runs on it

        try:
            async for future in self._done:
                await self._answer([future, *self._done.next_batch(block=False)])
        except asyncio.CancelledError:  # the client is closing its event loop
            raise
        except Exception:  # pragma: no cover - _answer never raises
            log.exception("threadflow: reading the outcomes of Dask attempts failed")
        finally:
            self._draining = False

    async def _answer(self, batch: list[Any]) -> None:
        done = [future for future in batch if future.status == "finished"]
        got: dict[Any, Any] = {}
        if done:
            try:
                values = await self._client.gather(done, asynchronous=True)
                got = dict(zip([future.key for future in done], values, strict=True))
            except Exception:  # e.g. a result lost with its worker: each one on its own below
                log.debug("threadflow: gathering %d Dask results failed", len(done), exc_info=True)
        pool = self._pool
        for future in batch:
            found = self._atts.pop(future.key, None)
            if found is None:  # pragma: no cover - every future watched was sent with its attempt
                continue
            att, pending = found
            pending.clear()
            att.returned = True
            try:
                if future.key in got:
                    pool._post_outcome(att, got[future.key])
                    continue
                if future.status == "cancelled":
                    raise cf.CancelledError()
                if future.status == "error":  # the executor's error (KilledWorker ...)
                    raise await future.exception(asynchronous=True)
                [outcome] = await self._client.gather([future], asynchronous=True)
                pool._post_outcome(att, outcome)
            except BaseException as exc:  # the executor failed, not the task: it never raises
                pool._post_error(att, pool._error(att, exc))


def _pickling_cause(exc: BaseException) -> BaseException | None:
    """The error that says a job did not pickle: ``exc`` or one it was raised from, or None.

    The innermost such error is taken: Dask wraps the pickler's error in a ``TypeError("Could
    not serialize object of type ...", <a repr of the whole call, state pickles included>)``,
    which says nothing the inner one does not, at great length.
    """
    found = None
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        if _pickling_failed(link):
            found = link
        link = link.__cause__ or link.__context__
    return found


def _pickling_failed(exc: BaseException) -> bool:
    """Whether ``exc`` says that a job did not pickle.

    Only ``pickle.PicklingError`` is certain. A function that has no import name (a
    lambda, a nested function) fails with an AttributeError whose wording depends on the Python
    version ("Can't pickle local object" up to 3.12, "Can't get local object" in 3.13), and an
    object that refuses pickling with a TypeError ("cannot pickle '_thread.lock' object"); so
    those count when their message says so, or when they were raised while pickling (a
    ``dump``/``dumps`` of a pickling module in their traceback: process pools pickle a job in a
    feeder thread, and the future carries that traceback).
    """
    if isinstance(exc, pickle.PicklingError):
        return True
    if not isinstance(exc, (TypeError, AttributeError)):
        return False
    message = str(exc).lower()
    if "pickle" in message or "local object" in message:
        return True
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        code = frame.f_code
        module = os.path.basename(code.co_filename)
        if code.co_name in ("dump", "dumps") and ("pickle" in module or module == "reduction.py"):
            return True
    return False


def _cancel(future: Any) -> None:
    """Ask the executor to drop a future (may block: Dask asks its scheduler)."""
    try:
        future.cancel()
    except Exception:
        log.debug("threadflow: cancelling a remote attempt failed", exc_info=True)


# -- in the executor's worker ---------------------------------------------------------------


class _DeadlineToken(CancelToken):
    """A cancel token that cancels itself at the attempt's deadline.

    In a remote worker nothing from the server can reach the token, so the deadline is the one
    cancel it gets (the server records the timeout on its own clock, whatever happens here).
    """

    __slots__ = ("_deadline",)

    def __init__(self, deadline: float | None) -> None:
        super().__init__()
        self._deadline = deadline

    def _expired(self) -> bool:
        deadline = self._deadline
        if not self._cancelled and deadline is not None and monotonic() >= deadline:
            self.cancel("timeout")
        return self._cancelled

    @property
    def cancelled(self) -> bool:
        return self._expired()

    def raise_if_cancelled(self) -> None:
        if self._expired():
            raise CancelledError(self.reason or "cancelled")

    def wait(self, seconds: float | None) -> None:
        deadline = self._deadline
        if deadline is not None:
            left = deadline - monotonic()
            if seconds is None or seconds >= left:
                self._waitable().wait(max(0.0, left))
                self.cancel("timeout")
                raise CancelledError(self.reason or "cancelled")
        super().wait(seconds)


class _Carried:
    """The children a remote attempt adds, kept to travel back with its outcome.

    It is the attempt context's child sink: ``add_children_tasks`` sends its chunks here and
    they are accepted at once. A child id this attempt already added raises
    ``DuplicateChildError`` here; one added by another attempt is found by the coordinator when
    the outcome arrives, and fails the attempt.
    """

    def __init__(self, task: str) -> None:
        self.task = task
        self.ids: list[str] = []
        self.datas: list[str] = []
        self._seen: set[str] = set()

    def add(self, ids: list[str], datas: list[str], final: bool) -> Reply:
        reply = Reply()
        chunk = set(ids)
        if len(chunk) < len(ids) or not self._seen.isdisjoint(chunk):
            seen = set(self._seen)
            for cid in ids:  # the first repeated id, as the store would name it
                if cid in seen:
                    reply.set(DuplicateChildError(self.task, decode_id(cid)))
                    return reply
                seen.add(cid)
        self._seen |= chunk
        self.ids.extend(ids)
        self.datas.extend(datas)
        reply.set()
        return reply

    def alive(self) -> bool:
        return True


def _run_remote(job: tuple[Any, ...]) -> tuple[Any, ...]:
    """Run one attempt in an executor's worker; what a remote executor is given. Never raises.

    :returns: ``("over", data, child_ids, child_datas)`` or ``("exit", exc_blob, data)``.
    """
    _, task, child_json, data_json, has_children, run_id, func, blobs, left, codec = job
    token = _DeadlineToken(None if left is None else monotonic() + left)
    carried = _Carried(task)
    ctx = RemoteAttempt(token, carried, task, child_json, has_children, run_id, codec_of(codec))
    outcome = run_job(ctx, data_json, func, blobs, "the executor's worker")
    if outcome[0] == "over":
        return (*outcome, carried.ids, carried.datas)
    return outcome
