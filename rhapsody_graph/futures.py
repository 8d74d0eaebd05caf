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

States, as ``concurrent.futures`` names them: ``PENDING`` (submitted, waiting for
inputs or resources), ``RUNNING`` (its call started), ``FINISHED`` (a value or an
exception), ``CANCELLED_AND_NOTIFIED`` (cancelled: by :meth:`Future.cancel`, by
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

import asyncio
import concurrent.futures as cf
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED
from typing import Any, Iterable, Iterator, Optional, Sequence, Tuple

from .graph import Ref

__all__ = ["Future", "Where", "as_completed", "wait", "ALL_COMPLETED", "FIRST_COMPLETED",
           "FIRST_EXCEPTION"]

ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION = (cf.ALL_COMPLETED, cf.FIRST_COMPLETED,
                                                   cf.FIRST_EXCEPTION)
_UNDECODED = object()  # a finished future's value before its first result()


class Where:
    """Where and how a node ran: set on its future once it has finished.

    Attributes:
        backend: the backend's name.
        host, cpus, gpus: the first rank's placement (the ledger's host, core ids, GPU ids).
        placements: every rank's :class:`~rhapsody_graph.resources.Placement`.
        attempts: how many times it was started (1 unless retried).
        start, end: wall-clock times (``time.time()``) of its last attempt.
    """

    __slots__ = ("backend", "host", "cpus", "gpus", "placements", "attempts", "start", "end")

    def __init__(self, backend: str, placements: Sequence[Any], attempts: int, start: float,
                 end: float) -> None:
        self.backend, self.placements, self.attempts = backend, list(placements), attempts
        first = placements[0] if placements else None
        self.host = first.host if first is not None else ""
        self.cpus = tuple(first.cpus) if first is not None else ()
        self.gpus = tuple(first.gpus) if first is not None else ()
        self.start, self.end = start, end

    def __repr__(self) -> str:
        return (f"Where(backend={self.backend!r}, host={self.host!r}, cpus={list(self.cpus)}, "
                f"gpus={list(self.gpus)}, attempts={self.attempts}, "
                f"seconds={self.end - self.start:.3f})")


class Future(cf.Future, Ref):
    """The eventual value of one submitted node. Made by ``Session.submit``.

    Attributes:
        node: the node it stands for; ``key``: its key.
        where: a :class:`Where` once it has finished with a value (else ``None``).
    """

    def __init__(self, node: Any, task: Any, session: Any) -> None:
        super().__init__()
        self.node = node
        self.key = node.key
        self.where: Optional[Where] = None
        self._task = task  # the scheduler's record: holds the value's bytes
        self._session = session

    def result(self, timeout: Optional[float] = None) -> Any:
        """The node's value, waiting up to ``timeout`` seconds (``None``: for ever).

        Raises:
            the node's own exception (remote traceback as ``__cause__``);
            ``concurrent.futures.CancelledError``; ``TimeoutError`` after ``timeout``.
        """
        value = super().result(timeout)
        if value is _UNDECODED:
            with self._condition:
                if self._result is _UNDECODED:
                    self._result = self._task.backend.decode(self._task.payload)
                value = self._result
        return value

    def cancel(self) -> bool:
        """Stop the node: dequeue it, or kill its process(es) if it runs; cancel what
        depends on it. Returns once its processes are gone (and their cores and
        GPUs are back in the ledger); False if it had already finished."""
        with self._condition:
            if self._state == FINISHED:
                return False
            if self._state in (CANCELLED, CANCELLED_AND_NOTIFIED):
                return True
        self._session._cancel([self._task])
        return self.cancelled()

    def __await__(self):
        return asyncio.wrap_future(self).__await__()

    def __repr__(self) -> str:
        return f"<Future {self.key} {self._state.lower()}>"

    def __reduce__(self):
        raise TypeError(f"future {self.key!r} cannot be pickled: pass it as an argument of "
                        "a task (it becomes an edge) or send its .result()")

    # -- called by the scheduler (its thread) ----------------------------------------------

    def _start(self) -> None:
        with self._condition:
            if self._state == "PENDING":
                self._state = "RUNNING"  # no notify: result() waiters wake only when it ends

    def _finish(self, where: Where) -> None:
        """The value's bytes are on the record now."""
        self.where = where
        self._end(FINISHED, "add_result", "_result", _UNDECODED)

    def _fail(self, exc: BaseException) -> None:
        self._end(FINISHED, "add_exception", "_exception", exc)

    def _cancelled(self) -> None:
        self._end(CANCELLED_AND_NOTIFIED, "add_cancelled", None, None)

    def _end(self, state: str, tell: str, field: Optional[str], value: Any) -> None:
        """Move to ``state`` once, as ``concurrent.futures`` does: waiters, then callbacks."""
        with self._condition:
            if self._state in (CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED):
                return
            if field is not None:
                setattr(self, field, value)
            self._state = state
            for waiter in self._waiters:
                getattr(waiter, tell)(self)
            self._condition.notify_all()
        self._invoke_callbacks()


def as_completed(futures: Iterable[cf.Future], timeout: Optional[float] = None) -> Iterator[cf.Future]:
    """Yield ``futures`` as they finish (or are cancelled), as ``concurrent.futures.as_completed``.

    Raises:
        TimeoutError: if not all have finished ``timeout`` seconds after the call.
    """
    return cf.as_completed(futures, timeout)


def wait(futures: Iterable[cf.Future], timeout: Optional[float] = None,
         return_when: str = ALL_COMPLETED) -> Tuple[set, set]:
    """Wait for ``futures``; return ``(done, not_done)``, as ``concurrent.futures.wait``.

    ``return_when``: :data:`ALL_COMPLETED` (default), :data:`FIRST_COMPLETED` or
    :data:`FIRST_EXCEPTION`.
    """
    return cf.wait(futures, timeout, return_when)
