"""Futures: handles on submitted nodes, for threads and for asyncio.

A :class:`Future` is a :class:`concurrent.futures.Future` (so the standard
``concurrent.futures.wait`` and ``as_completed`` take it) that is also awaitable
(``await fut``, ``asyncio.gather(*futures)``) and can be passed to a task like a
node: the new node depends on it and gets its value.

A future is a thin handle. The scheduler's record of its node (``_task``) holds
the value's bytes; the future decodes them on the first :meth:`Future.result`
and keeps the value. Dropping the last future of a node that nothing pending
needs lets its value go (plain reference counting: the scheduler keeps no
strong reference to futures).

Only the scheduler thread moves a future's state, and nothing waits on its lock:
:meth:`Future.result` and :func:`as_completed` install waiters, as
``concurrent.futures.wait`` does. So a future's ``_condition`` (the lock
``concurrent.futures`` takes) is a plain ``RLock``, not a ``Condition``.

States, as ``concurrent.futures`` names them: ``PENDING`` (submitted, waiting for
inputs or resources), ``RUNNING`` (its call was handed to a worker or process; on a
busy worker it may still wait there behind the call before it, as a
``ProcessPoolExecutor``'s queued calls do), ``FINISHED`` (a value or an exception),
``CANCELLED_AND_NOTIFIED`` (cancelled: by :meth:`Future.cancel`, by
``Session.cancel()``, or because a fail-fast run stopped before it started).

>>> import rhapsody_graph as rhapsody
>>> @rhapsody.task
... def inc(x): return x + 1
>>> with rhapsody.Session() as s:
...     a = s.submit(inc(1))
...     b = s.submit(inc(a))            # a future is an input, like a node
...     b.result(timeout=60), a.done()
(3, True)
"""
from __future__ import annotations

import concurrent.futures as cf
import queue
import threading
import time
import weakref
from collections import deque
from concurrent.futures._base import (CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED, LOGGER,
                                      PENDING, RUNNING, _AcquireFutures)
from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Sequence, Tuple

from .errors import brief
from .graph import Ref

__all__ = ["Future", "Where", "as_completed", "wait", "ALL_COMPLETED", "FIRST_COMPLETED",
           "FIRST_EXCEPTION"]

ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION = (cf.ALL_COMPLETED, cf.FIRST_COMPLETED,
                                                   cf.FIRST_EXCEPTION)
_UNDECODED = object()  # a finished future's value before its first result()
_ENDED = (CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED)


class Where:
    """Where and how a node ran: set on its future once it has finished.

    Attributes:
        backend: the backend's name.
        host, cpus, gpus: the first rank's placement (the ledger's host, core ids, GPU ids).
        placements: every rank's :class:`~rhapsody_graph.resources.Placement`.
        attempts: how many times it was started (1 unless retried; 0: its value was
            reused from the session's journal, it did not run).
        start, end: wall-clock times (``time.time()``) of its last attempt; ``seconds``:
            how long it ran.
        outputs: per rank, ``(stdout, stderr)`` as the last attempt printed them (Python
            nodes: what went through ``sys.stdout``/``sys.stderr``, the last MiB of
            each kept), or ``None`` for a rank that printed nothing; ``()`` when no
            rank printed anything or the backend keeps no output. An executable's output is on its value
            (:class:`~rhapsody_graph.ExecResult`).
        stdout, stderr: every rank's output, in rank order.
    """

    __slots__ = ("backend", "placements", "attempts", "start", "end", "outputs")

    def __init__(self, backend: str, placements: Sequence[Any], attempts: int, start: float,
                 end: float, outputs: Optional[Sequence[Any]] = None) -> None:
        self.backend, self.placements, self.attempts = backend, placements, attempts
        self.start, self.end = start, end
        self.outputs = tuple(outputs or ())

    @property
    def stdout(self) -> str:
        return "".join(o[0] for o in self.outputs if o)

    @property
    def stderr(self) -> str:
        return "".join(o[1] for o in self.outputs if o)

    @property
    def seconds(self) -> float:
        """How long its last attempt ran (``end - start``)."""
        return self.end - self.start

    @property
    def host(self) -> str:
        return self.placements[0].host if self.placements else ""

    @property
    def cpus(self) -> Tuple[int, ...]:
        return tuple(self.placements[0].cpus) if self.placements else ()

    @property
    def gpus(self) -> Tuple[int, ...]:
        return tuple(self.placements[0].gpus) if self.placements else ()

    def __repr__(self) -> str:
        return (f"Where(backend={self.backend!r}, host={self.host!r}, cpus={list(self.cpus)}, "
                f"gpus={list(self.gpus)}, attempts={self.attempts}, "
                f"seconds={self.seconds:.3f})")


class Future(cf.Future, Ref):
    """The eventual value of one submitted node. Made by ``Session.submit``.

    Attributes:
        node: the node it stands for. Once it has its value, a node that took inputs
            is kept only while you keep it (or the session has a journal, which keys
            later nodes by it): a finished future keeps no upstream future or value
            alive; then it is a copy without its inputs, which cannot run again
            (``node.released``). A failed or cancelled future keeps its node.
            ``key``: its key.
        where: a :class:`Where` once it has run (with a value or an exception; ``None``
            while it has not, or when it never started).
    """

    def __init__(self, node: Any, task: Any, session: Any) -> None:
        # concurrent.futures.Future's fields, with a lock for its condition (see above)
        self._condition = threading.RLock()
        self._state = PENDING
        self._result: Any = None
        self._exception: Optional[BaseException] = None
        self._w: Optional[list] = None  # waiters and callbacks: lists made on first use
        self._cbs: Optional[list] = None
        self._node: Any = node  # a weak reference once ended, if the node took inputs
        self.key = node.key
        self.where: Optional[Where] = None
        self._task = task  # the scheduler's record: holds the value's bytes
        self._session = session

    @property
    def node(self) -> Any:
        node = self._node
        if type(node) is weakref.ref:  # once gone: the record's copy without its inputs
            alive = node()                # (which cannot run again: Node.released)
            node = alive if alive is not None else self._task.node
        return node

    # concurrent.futures reads and appends to these lists under ``_condition``; most
    # futures never get a waiter or a callback, and two lists per future would be two
    # more objects for Python's cyclic collector to walk while they live
    @property
    def _waiters(self) -> list:
        if self._w is None:
            self._w = []
        return self._w

    @property
    def _done_callbacks(self) -> list:
        if self._cbs is None:
            self._cbs = []
        return self._cbs

    def result(self, timeout: Optional[float] = None) -> Any:
        """The node's value, waiting up to ``timeout`` seconds (``None``: for ever).

        Raises:
            Exception: the node's own exception (remote traceback as ``__cause__``).
            concurrent.futures.CancelledError: if it was cancelled.
            TimeoutError: after ``timeout``.
        """
        if self._ended(timeout) is not None:
            try:
                raise self._exception
            finally:
                self = None  # as concurrent.futures: no cycle through the traceback
        value = self._result
        if value is _UNDECODED:
            try:
                value = self._task.value()
            except Exception as failed:  # kept: every caller gets this one error, and
                with self._condition:    # exception() and wait(FIRST_EXCEPTION) see it
                    if self._result is _UNDECODED:
                        self._result, self._exception = None, failed
                return self.result()
            with self._condition:  # the first decoded value is the one every caller gets
                if self._result is _UNDECODED:
                    self._result = value
                value = self._result
        return value

    def exception(self, timeout: Optional[float] = None) -> Optional[BaseException]:
        """The node's exception (``None`` if it returned), waiting as :meth:`result` does.

        Raises:
            concurrent.futures.CancelledError: if it was cancelled.
            TimeoutError: after ``timeout``.
        """
        exc = self._ended(timeout)
        if exc is None and self._result is _UNDECODED:  # a value the driver cannot load is
            try:                                        # the error result() raises
                self.result()
            except Exception as failed:
                return failed
        return exc

    def _ended(self, timeout: Optional[float]) -> Optional[BaseException]:
        """Wait (a waiter of its own, as ``concurrent.futures.wait``) until finished;
        return its exception, or raise ``CancelledError``/``TimeoutError``."""
        if self._state not in _ENDED:
            _refuse_on_scheduler((self,))
            with INSIDE:
                in_steps(lambda step: cf.wait((self,), step), lambda: self._state in _ENDED,
                         timeout)
        state = self._state
        if state == FINISHED:
            return self._exception
        if state in (CANCELLED, CANCELLED_AND_NOTIFIED):
            raise cf.CancelledError(f"node {self.key!r} was cancelled")
        raise cf.TimeoutError(f"node {self.key!r} did not finish within {timeout} s "
                              f"({'running' if state == RUNNING else 'not started yet'}); "
                              "it goes on: wait again, or cancel() it")

    @property
    def backend(self) -> str:
        """The name of the backend the session routed its node to."""
        return self._task.lane.backend.name

    def cancel(self) -> bool:
        """Stop the node: dequeue it, or kill its process(es) if it runs; cancel what
        depends on it. Returns once its processes are reaped (and their cores and
        GPUs are back in the ledger); False if it had already finished."""
        with self._condition:
            if self._state == FINISHED:
                return False
            if self._state in (CANCELLED, CANCELLED_AND_NOTIFIED):
                return True
        self._session._cancel([self._task])
        return self.cancelled()

    def __await__(self):
        import asyncio  # imported already by whoever awaits
        return asyncio.wrap_future(self).__await__()

    def __repr__(self) -> str:
        state = "cancelled" if self._state == CANCELLED_AND_NOTIFIED else self._state.lower()
        return f"<Future {self.key} {state}>"

    def __reduce__(self):
        raise TypeError(f"future {self.key!r} cannot be pickled: pass it as an argument of "
                        "a task (it becomes an edge) or send its .result()")

    # -- called by the scheduler (its thread) ----------------------------------------------

    def add_done_callback(self, fn: Any) -> None:
        """Call ``fn(future)`` once it ends (now, if it has): as ``concurrent.futures``,
        and also when nobody keeps the future (the session does until then)."""
        with self._condition:
            if self._state not in _ENDED:
                self._done_callbacks.append(fn)
                self._session._kept.add(self)
                return
        super().add_done_callback(fn)  # ended: it runs it now

    def _start(self) -> None:
        if self._state == PENDING:  # no lock: only this thread moves it; no waiter wakes
            self._state = RUNNING

    def set_result(self, result: Any) -> None:
        """Refused: only its session ends a future (with its node's value)."""
        raise RuntimeError(f"future {self.key!r}: only its session sets its result; "
                           "cancel() it, or submit a task that returns the value")

    def set_exception(self, exception: Optional[BaseException]) -> None:
        """Refused: only its session ends a future (with its node's exception)."""
        raise RuntimeError(f"future {self.key!r}: only its session sets its exception; "
                           "cancel() it, or submit a task that raises it")

    def _queued(self) -> None:
        if self._state == RUNNING:  # a retry waits out its backoff: no call of it runs
            self._state = PENDING

    def _finish(self, where: Where) -> None:
        """The value's bytes are on the record now: its node's inputs may go (see node)."""
        self.where = where
        node = self._node
        if type(node) is not weakref.ref and node.deps and \
                self._session._futures.journal is None:  # (a journal keys later nodes by it)
            self._node = weakref.ref(node)
        self._end(FINISHED, "add_result", "_result", _UNDECODED)

    def _fail(self, exc: BaseException, where: Optional[Where] = None) -> None:
        self.where = where
        self._end(FINISHED, "add_exception", "_exception", exc)

    def _cancelled(self) -> None:
        self._end(CANCELLED_AND_NOTIFIED, "add_cancelled", None, None)

    def _end(self, state: str, tell: str, field: Optional[str], value: Any) -> None:
        """Move to ``state`` once, as ``concurrent.futures`` does: waiters, then callbacks."""
        with self._condition:
            if self._state in _ENDED:
                return
            if field is not None:
                setattr(self, field, value)
            self._state = state
            if self._w:
                for waiter in self._w:
                    getattr(waiter, tell)(self)
        if self._cbs:
            for callback in self._cbs:
                try:
                    callback(self)
                except BaseException:  # a sys.exit() there must not stop the scheduler
                    LOGGER.exception("exception calling callback for %r", self)
            self._session._kept.discard(self)


class Inside:
    """``with INSIDE:`` marks the calling thread as inside a call that waits for results
    (``compute()``, ``result()``, ``wait()``, ``as_completed()``) while it lasts: at the
    program's end, the sessions close once no other live non-daemon thread is inside
    one (see :func:`rhapsody_graph.api._shut_down_at_exit`). Each thread writes only its
    own entry (no lock on the way in or out); the way out notifies only while the exit
    waits."""

    threads: Dict[threading.Thread, int] = {}  # thread -> how many calls deep
    changed = threading.Condition()
    waiting = False  # the exit waits: a thread leaving its last call notifies

    def __enter__(self) -> None:
        here, threads = threading.current_thread(), Inside.threads
        threads[here] = threads.get(here, 0) + 1

    def __exit__(self, *exc: Any) -> None:
        here, threads = threading.current_thread(), Inside.threads
        depth = threads[here] - 1
        if depth:
            threads[here] = depth
            return
        del threads[here]
        if Inside.waiting:  # set before the exit looks at `threads`: it is told
            with Inside.changed:
                Inside.changed.notify_all()

    @staticmethod
    def wait_for_others(here: threading.Thread) -> None:
        """Wait until no live non-daemon thread but ``here`` is inside a call."""
        with Inside.changed:
            Inside.waiting = True
            while any(t is not here and not t.daemon and t.is_alive()
                      for t in list(Inside.threads)):
                Inside.changed.wait()


INSIDE = Inside()


def _refuse_on_scheduler(futures: Iterable[Any]) -> None:
    """Refuse to wait, on a session's scheduler thread (in a done-callback), for a
    future of that session: only that thread could end it."""
    here = threading.current_thread()
    for f in futures:
        if isinstance(f, Future) and f._state not in _ENDED and here is f._session._thread:
            raise RuntimeError(
                f"node {f.key!r}: waiting for a future in a done-callback, which runs on "
                "the session's scheduler thread, would wait for ever; submit the follow-up "
                "work instead (submit() returns at once)")


class _Arrivals:
    """A waiter, as ``concurrent.futures`` installs on futures: queues each one that ends."""

    __slots__ = ("queue", "add_result", "add_exception", "add_cancelled")

    def __init__(self) -> None:
        self.queue: "queue.SimpleQueue[cf.Future]" = queue.SimpleQueue()
        self.add_result = self.add_exception = self.add_cancelled = self.queue.put


def as_completed(futures: Iterable[cf.Future], timeout: Optional[float] = None) -> Iterator[cf.Future]:
    """Yield ``futures`` as they finish (or are cancelled), as ``concurrent.futures.as_completed``
    (any ``concurrent.futures.Future`` may be among them).

    Raises:
        TimeoutError: if not all have finished ``timeout`` seconds after the call.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    pending = set(futures)
    for f in pending:
        if not isinstance(f, cf.Future):
            raise TypeError(f"as_completed() takes futures, got {brief(f)}")
    _refuse_on_scheduler(pending)
    return _as_completed(pending, deadline)


def _as_completed(pending: set, deadline: Optional[float]) -> Iterator[cf.Future]:
    total = len(pending)
    arrivals = _Arrivals()
    with _AcquireFutures(pending):  # the lock order of concurrent.futures.wait
        done = deque(f for f in pending if f._state in (CANCELLED_AND_NOTIFIED, FINISHED))
        pending.difference_update(done)
        for f in pending:
            f._waiters.append(arrivals)
    try:
        while done:
            yield done.popleft()  # no reference kept to what was yielded
        while pending:
            left = None if deadline is None else deadline - time.monotonic()
            try:
                if left is not None and left <= 0:
                    raise queue.Empty
                with INSIDE:
                    f = _taken(arrivals.queue, left)
            except queue.Empty:
                raise cf.TimeoutError(f"{len(pending)} (of {total}) futures unfinished") from None
            pending.discard(f)
            yield f
    finally:
        for f in pending:
            with f._condition:
                f._waiters.remove(arrivals)


def wait(futures: Iterable[cf.Future], timeout: Optional[float] = None,
         return_when: str = ALL_COMPLETED) -> Tuple[set, set]:
    """Wait for ``futures``; return ``(done, not_done)``, as ``concurrent.futures.wait``.

    ``return_when``: :data:`ALL_COMPLETED` (default), :data:`FIRST_COMPLETED` or
    :data:`FIRST_EXCEPTION`.
    """
    futures = list(futures)
    for f in futures:
        if not isinstance(f, cf.Future):
            raise TypeError(f"wait() takes futures, got {brief(f)}")
    _refuse_on_scheduler(futures)
    answer: list = []

    def wait_once(step: Optional[float]) -> None:
        answer[:] = [cf.wait(futures, step, return_when)]

    def answered() -> bool:  # (by what it returned: a scan of many futures takes a step)
        if not answer:
            return False
        done, not_done = answer[0]
        return not not_done or (return_when == FIRST_COMPLETED and bool(done)) or (
            return_when == FIRST_EXCEPTION and any(
                not f.cancelled() and f.exception() is not None for f in done))
    with INSIDE:
        in_steps(wait_once, answered, timeout)
    return answer[0] if answer else cf.wait(futures, 0, return_when)


def _taken(q: queue.SimpleQueue, timeout: Optional[float]) -> Any:
    """``q.get(timeout=timeout)``, waiting as :func:`in_steps` does."""
    try:
        return q.get_nowait()  # (most often there already, under a stream of results)
    except queue.Empty:
        pass
    got: list = []

    def get_once(step: Optional[float]) -> None:
        try:
            got.append(q.get(timeout=step))
        except queue.Empty:
            pass
    in_steps(get_once, lambda: bool(got), timeout)
    if not got:
        raise queue.Empty
    return got[0]


#: the main thread waits in steps of this: a signal (Ctrl-C, SIGTERM) another thread
#: received runs its handler there within a step (an untimed wait is not interrupted)
SIGNAL_STEP = 0.25


def in_steps(wait: Callable[[Optional[float]], Any], done: Callable[[], bool],
             timeout: Optional[float] = None) -> None:
    """``wait(timeout)`` until ``done()`` or ``timeout`` seconds pass; in the main
    thread in steps of :data:`SIGNAL_STEP`, so that a signal's handler runs there."""
    if threading.current_thread() is not threading.main_thread():
        wait(_bounded(timeout))
        return
    deadline = None if timeout is None else time.monotonic() + timeout
    while not done():
        step = SIGNAL_STEP if deadline is None else min(SIGNAL_STEP,
                                                        deadline - time.monotonic())
        if step <= 0:
            return
        wait(step)


def wait_for(event: threading.Event) -> None:
    """Wait until ``event`` is set (see :func:`in_steps`)."""
    in_steps(event.wait, event.is_set)


def _bounded(timeout: Optional[float]) -> Optional[float]:
    """``timeout`` as a lock takes it: at most ``threading.TIMEOUT_MAX`` (some 292
    years; a longer one raised ``OverflowError``)."""
    return timeout if timeout is None or timeout <= threading.TIMEOUT_MAX \
        else threading.TIMEOUT_MAX
