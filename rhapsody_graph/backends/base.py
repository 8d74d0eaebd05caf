"""The contract between the scheduler and a backend: calls in, completions out.

The scheduler decides *what* runs *where* (a ready node and its placements from
the backend's ledger); a backend only *runs* calls and reports each one's end to
the session's one :class:`Completions` queue. No backend owns the loop: the
session's scheduler thread sleeps in :meth:`Completions.wait`, which watches
every backend's file descriptors and takes what their threads post.

A backend never sees a graph node after ``prepare``: the session asks ``accepts``
and ``prepare`` of each node (routing and encoding, possibly in a submitting
thread), and from then on the scheduler hands the backend only what ``prepare``
returned (its own self-contained record: key, kind, the options it needs, the
encoded callable and arguments, each upstream value a slot) and flat
:class:`Call` s: that record, the upstream values' bytes that fill its slots
(in the order of the node's ``deps``), the placements, the lease and the timeout.

One line of contract per method (the scheduler calls them all from its thread,
except ``accepts`` and ``prepare``, which the session calls):

* ``attach(completions)``: join a session (``None``: leave it); post every completion there.
* ``kinds``: the node kinds it runs (``function``, ``executable``, ``ranks``, ``ai``).
* ``accepts(node)``: whether it can run this node's options (routing asks it).
* ``prepare(node)``: the node's record, or raise ``TypeError``/``ValueError`` naming the node.
* ``uses_lease(prepared)``: True if the call runs under a :class:`Lease` on a pool executor.
* ``slots_free()``: how many more leases can be started now.
* ``admit(prepared)``: take what the call needs beyond its placements (an AI
  node's inference service), or answer False: the node waits.
* ``release_idle()``: free what admissions hold for no running call; True if it freed any.
* ``submit(call)``: start (or queue on its lease) one call; ``flush()`` ends a round.
* ``forwards``: True if a leased call's input may be, instead of bytes, the ``tid``
  (an int) of an earlier call on the same lease: the executor fills it with that
  call's value where it ran (no round trip through the driver), or reports the call
  ``DROPPED`` if that call returned no value.
* ``fuses`` (optional): True if short function nodes may run inside the call of the
  node that reads them (see :mod:`rhapsody_graph.fusion`); default False.
* ``lease_budget`` (optional): seconds of measured work the scheduler queues on one
  shared lease at most (default 2 ms; more where each round trip costs more).
* ``runs_code`` (optional): False for a backend that runs no user code (the
  simulation): its nodes' values are never kept in, nor taken from, a journal.
* ``waits_for_hosts`` (optional): True while it has no host now but expects some (a
  Dask cluster whose workers restart): its ready nodes wait, not fail as stalled.
* ``drop_queued()``: calls queued behind a running one come back ``DROPPED``.
* ``kill(tid)``: stop one call now; it reports one ``KILLED`` completion once its
  processes are gone (and nothing else).
* ``end_lease(lease)``: the scheduler is done with a lease and gave its placement back.
* ``decode(payload)``: the value of an ``OK`` payload.
* ``end_run()``: the session went idle: drop per-run caches (and run-scoped services).
* ``server_spawner()`` (compute backends only): how an inference service placed on
  this backend starts its server (:class:`~rhapsody_graph.InferenceBackend` ``on=``).
* ``abort()``: kill everything now; ``shutdown()``: stop for good.

A completion is ``(tid, status, payload, seconds)``: ``OK`` with the value's
bytes, ``ERROR`` and ``DIED`` with the exception to raise, ``DROPPED`` with
``None`` (it never started), ``KILLED`` with ``None`` (after ``kill``).
"""
from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import pickle
import selectors
import threading
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Sequence, Tuple

from ..resources import Inventory, Ledger, Placement

try:
    from typing import Protocol
except ImportError:  # pragma: no cover - Python < 3.8
    Protocol = object  # type: ignore[assignment]

OK, ERROR, DIED, DROPPED, KILLED = "ok", "error", "died", "dropped", "killed"

#: ``(tid, status, payload, seconds[, outputs])``: ``outputs`` (where the backend
#: captures them) holds per rank ``(stdout, stderr)``, or ``None`` if it printed nothing
Completion = Tuple[Any, ...]
#: the kind routing gives a node with ``ranks > 1``; any other node's kind is its own
#: ``node.kind`` (``graph.FUNCTION``, ``graph.EXECUTABLE``, ``ai.nodes.AI``)
RANKS_KIND = "ranks"
#: the longest the completion queue sleeps at once (``poll`` takes at most 2**31-1 ms):
#: a 30-day timeout or retry backoff is waited for in steps of this
LONGEST_WAIT = 86400.0


def kind_of(node: Any) -> str:
    """The kind a node is routed by: :data:`RANKS_KIND` for a function or executable
    of several ranks, else its own ``node.kind``."""
    if node.kind != "ai" and node.opts.resources.ranks > 1:
        return RANKS_KIND
    return node.kind


def kind_name(node: Any) -> str:
    """A node's kind as pictures and run journals show it: ``job`` for several ranks,
    else ``function``, ``executable`` or ``ai``."""
    kind = kind_of(node)
    return "job" if kind == RANKS_KIND else kind


class Completions:
    """The session's one completion queue: backends post, the scheduler drains.

    Three sources feed it: file descriptors a backend watches (``watch``: its
    callback runs on the scheduler thread and appends completions), items posted
    from any thread (``post``: a completion, or a callable run on the scheduler
    thread), and timers (``call_at``). :meth:`wait` sleeps in one ``select`` until
    one of them has something, or the timeout passes. Never a poll, never a sleep.
    """

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self._posted: Deque[Any] = deque()
        self._timers: List[Tuple[float, int, Callable[[List[Completion]], None]]] = []
        self._seq = itertools.count()
        self._asleep = False
        # a weak reference to what closes the session that owns it
        self.closer: Optional[Callable[[], Optional[Callable[[], None]]]] = None
        self.owner: Optional[threading.Thread] = None  # the scheduler thread that drains it
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.selector.register(self._wake_r, selectors.EVENT_READ, None)

    def post(self, item: Any) -> None:
        """From any thread: a completion, or ``fn(out)`` to run on the scheduler thread."""
        self._posted.append(item)
        if self._asleep:
            self._asleep = False  # one wake-up byte per sleep: later posts find it awake
            try:
                os.write(self._wake_w, b"x")
            except (BlockingIOError, OSError):
                pass  # a full pipe wakes it already; a closed one has no reader

    def watch(self, fd: int, events: int, callback: Callable[[int, List[Completion]], None]) -> None:
        """Call ``callback(mask, out)`` on the scheduler thread when ``fd`` is ready."""
        self.selector.register(fd, events, callback)

    def unwatch(self, fd: int) -> None:
        self.selector.unregister(fd)

    def call_at(self, when: float, callback: Callable[[List[Completion]], None]) -> None:
        """Call ``callback(out)`` on the scheduler thread once ``time.monotonic()`` passes ``when``."""
        heapq.heappush(self._timers, (when, next(self._seq), callback))

    def wait(self, timeout: Optional[float]) -> List[Completion]:
        """What happened since the last call; sleeps first only if nothing has."""
        out: List[Completion] = []
        self._asleep = True  # before the check: a post after it writes the wake-up byte
        if not self._posted:
            if self._timers:
                left = max(0.0, self._timers[0][0] - time.monotonic())
                timeout = left if timeout is None else min(timeout, left)
            if timeout is not None and timeout > LONGEST_WAIT:
                timeout = LONGEST_WAIT  # the loop comes back and waits again
            for key, mask in self.selector.select(timeout):
                if key.data is None:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                else:
                    key.data(mask, out)
        self._asleep = False
        self._drain(out)
        if self._timers:
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                heapq.heappop(self._timers)[2](out)
        return out

    def _drain(self, out: List[Completion]) -> None:
        posted = self._posted
        while posted:
            item = posted.popleft()
            if type(item) is tuple:
                out.append(item)
            else:
                item(out)

    def close(self) -> None:
        self.selector.close()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass


class Lease:
    """A placement held for a run of calls on one executor.

    Calls that share a lease run one after the other in submission order on the one
    executor that holds the lease's placement: that is how tiny nodes are batched.
    """

    __slots__ = ("placement", "placements", "outstanding", "depth", "key", "executor", "tail")

    def __init__(self, placement: Placement, depth: int, key: Optional[tuple] = None) -> None:
        self.placement = placement
        self.placements = (placement,)  # every call's placements: one tuple for all of them
        self.key = key  # the scheduler's sharing key; None for a lease of its own
        self.outstanding = 0  # calls submitted and not yet completed
        self.depth = depth  # most calls the scheduler queues on it at once
        self.executor: Any = None  # set by the backend when it binds the lease
        self.tail: Any = None  # the scheduler's record of the last call queued on it


class Call:
    """One submission, flat: no graph node in it.

    ``tid`` (the scheduler's id of this attempt), ``key`` (the node's, for messages),
    ``prepared`` (what the backend's ``prepare`` returned), ``inputs`` (the upstream
    values' bytes, filling the record's slots in order; on a backend that
    ``forwards``, an int: the tid of an earlier call on the same lease whose value
    it is), ``placements`` (one per
    rank), ``lease`` (``None``: the call runs on processes of its own) and
    ``timeout`` (seconds, or ``None``; the scheduler enforces it with ``kill``, a
    backend may pass it on as well).
    """

    __slots__ = ("tid", "key", "prepared", "inputs", "placements", "lease", "timeout")

    def __init__(self, tid: int, key: str, prepared: Any, inputs: Sequence[Any],
                 placements: Sequence[Placement], lease: Optional[Lease],
                 timeout: Optional[float]) -> None:
        self.tid, self.key, self.prepared = tid, key, prepared
        self.inputs, self.placements, self.lease, self.timeout = inputs, placements, lease, timeout


def _scheduler_elsewhere(hub: Optional[Completions]) -> Optional[threading.Thread]:
    """The scheduler thread of the open session that drains ``hub``, if this thread is
    another one."""
    owner = hub.owner if hub is not None else None
    if owner is not None and owner.is_alive() and threading.current_thread() is not owner:
        return owner
    return None


def refuse_foreign_abort(backend: Any, hub: Optional[Completions]) -> None:
    """Raise if ``backend.abort()`` is called from a thread other than the scheduler of
    an open session that runs it: that scheduler owns its calls and workers."""
    if _scheduler_elsewhere(hub) is not None:
        raise RuntimeError(
            f"{type(backend).__name__}.abort(): backend {backend.name!r} is in an open "
            "session (compute() with backend= opens one that stays open), whose scheduler "
            "owns its calls and workers; call backend.shutdown() instead (it closes that "
            "session and stops the workers, and the backend can be used again), or cancel "
            "the calls with session.cancel()")


def on_scheduler(hub: Optional[Completions], fn: Callable[[], None]) -> bool:
    """Run ``fn`` on the scheduler thread of the open session that drains ``hub``, and
    wait for it (its exception is raised here). ``False`` where there is none, or this
    is that thread: the caller runs ``fn`` itself."""
    owner = _scheduler_elsewhere(hub)
    if owner is None or hub is None:
        return False
    done = threading.Event()
    failed: List[BaseException] = []

    def run(out: List[Completion]) -> None:
        try:
            fn()
        except BaseException as exc:  # raised in the caller's thread
            failed.append(exc)
        finally:
            done.set()

    hub.post(run)
    while not done.wait(0.1):  # woken by the event; the timeout only checks for a
        if not owner.is_alive() and not done.is_set():  # session closed meanwhile
            return False
    if failed:
        raise failed[0]
    return True


def refuse_second_session(name: str, current: Optional[Completions],
                          completions: Optional[Completions]) -> None:
    """Raise if a backend already in a session (its queue ``current``) is asked to join one."""
    if completions is not None and current is not None:
        raise RuntimeError(f"backend {name!r} already belongs to a session; close "
                           "that session first, or make another backend")


_environ_lock = threading.Lock()
_environ_before: Dict[str, Optional[str]] = {}  # a variable's value before the blocks open
_environ_open: Dict[str, int] = {}  # how many open blocks (any thread's) set it


@contextlib.contextmanager
def environ(env: Dict[str, str]) -> Iterator[None]:
    """``os.environ`` updated with ``env`` inside the block, as it was after it. Blocks
    of several threads may overlap (calls on one Dask worker's threads): a variable
    holds the latest block's value while they do, and goes back to what it was before
    the first once the last has ended.

    >>> with environ({"RHAPSODY_DOCTEST": "1"}):
    ...     os.environ["RHAPSODY_DOCTEST"]
    '1'
    >>> "RHAPSODY_DOCTEST" in os.environ
    False
    """
    with _environ_lock:
        for k in env:
            if k not in _environ_open:
                _environ_before[k] = os.environ.get(k)
            _environ_open[k] = _environ_open.get(k, 0) + 1
        os.environ.update(env)
    try:
        yield
    finally:
        with _environ_lock:
            for k in env:
                _environ_open[k] -= 1
                if not _environ_open[k]:
                    del _environ_open[k]
                    v = _environ_before.pop(k)
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v


def close_session(hub: Optional[Completions]) -> None:
    """Close the session whose queue is ``hub``, if any (it detaches its backends)."""
    close = hub.closer() if hub is not None and hub.closer is not None else None
    if close is not None:
        close()


class OwnCalls:
    """The protocol methods of a backend whose every call runs on its own, under no
    lease, started at ``submit`` (Dask's futures, inference requests): nothing to
    queue, flush or drop. A subclass sets ``name``; ``hub`` is its session's queue."""

    name: str
    hub: Optional[Completions] = None
    forwards = False

    def attach(self, completions: Optional[Completions]) -> None:
        refuse_second_session(self.name, self.hub, completions)
        self.hub = completions

    def uses_lease(self, prepared: Any) -> bool:
        return False

    def flush(self) -> None:
        pass  # every call started at submit()

    def drop_queued(self) -> None:
        pass  # nothing is queued here

    def end_lease(self, lease: Any) -> None:
        raise AssertionError(f"{type(self).__name__} calls run under no lease")

    def decode(self, payload: bytes) -> Any:
        return pickle.loads(payload)


class Backend(Protocol):
    """What every backend provides (see the module docstring for the contract)."""

    name: str
    kinds: frozenset
    forwards: bool
    inventory: Inventory
    ledger: Ledger  # the backend's, so what it holds outside a run (services) is accounted

    def attach(self, completions: Optional[Completions]) -> None: ...
    def accepts(self, node: Any) -> bool: ...
    def prepare(self, node: Any) -> Any: ...
    def uses_lease(self, prepared: Any) -> bool: ...
    def slots_free(self) -> int: ...
    def admit(self, prepared: Any) -> bool: ...
    def release_idle(self) -> bool: ...
    def submit(self, call: Call) -> None: ...
    def flush(self) -> None: ...
    def drop_queued(self) -> None: ...
    def kill(self, tid: int) -> None: ...
    def end_lease(self, lease: Lease) -> None: ...
    def decode(self, payload: bytes) -> Any: ...
    def end_run(self) -> None: ...
    def abort(self) -> None: ...
    def shutdown(self) -> None: ...
