"""The scheduler: one per session, one loop in its own thread, the whole policy.

State (all of it touched only by the scheduler thread, except where noted):

* ``tasks``: node → :class:`Task`, the record of every node submitted and not yet
  forgotten. A record's ``state`` goes ``PENDING`` (waiting for ``waiting``
  upstream records) → ``READY`` (on its lane's heap) → ``RUNNING`` (a call is in
  ``inflight``) → ``DONE``, or back to ``READY`` (a retry, a dropped call), or
  ends ``FAILED`` (its own error or an upstream one) or ``CANCELLED``.
* ``payload``: a done record's value bytes. Its ``needed`` counts the dependents
  not yet finished; at 0 the record leaves ``tasks`` and its bytes live on only
  while a future holds the record (futures are the only other holders).
* ``lanes``: one per backend: its ready records by shape (:class:`Ready`; ``ready``:
  pool nodes under leases, ``ready_own``: nodes on processes of their own), its open
  shared leases.
* ``inflight``: tid → :class:`Attempt`; ``killing``: the attempts killed (timeout,
  cancel) whose ``KILLED`` completion has not come yet: their placements go back
  to the ledger only then; ``deadlines``: a heap of (time, tid), of calls in flight
  and (until it is compacted, at twice their number) of calls that ended since.
* per lane, counters the progress display reads (:mod:`.progress`): records
  ``submitted``, attempts ``started`` and ``stopped``, records ended ``done``,
  ``failed``, ``cancelled``.
* groups: what one ``compute()`` added (:class:`Group`): its errors, its
  failure policy (``on_error``), and an event set when all of it has ended (at the end of that
  loop pass, after an idle session's backends dropped their per-run state). All
  ``submit()`` calls of a session share one group that keeps no errors (each
  future holds its own) and that nothing waits on.
* ``rest_due``: when the session goes idle, its backends drop per-run state at once
  if a ``compute()`` ends or someone waits (``Session.wait``), else only after
  :data:`IDLE_GRACE` seconds still idle (a timer): a loop that submits again as soon
  as a result arrives keeps its pickled functions and its inference servers.
* ``intake``: what submitting threads handed over, ``(records, futures to attach,
  group)`` each, taken at the start of the next pass (one posted wake-up takes all).

One loop: ``dispatch`` admits ready records against their backend's ledger and
submits calls; the session's :class:`~.backends.base.Completions` queue wakes it
with completions and with what other threads asked (submit, cancel, close);
``complete`` records each completion and wakes dependents. Nothing polls or sleeps.

Admission: a Python node with one rank runs under a :class:`~.backends.base.Lease`
(a placement held by one worker). Tiny nodes with the same request share a lease:
up to ``depth`` of them are queued on one worker, ``depth`` sized so a lease holds
about 2 ms of work (the backend's ``lease_budget``, larger where a round trip costs
more) by the function's measured run time (1 until it is measured), and a lease
once chosen takes a run of neighbours in priority order up to its depth;
nodes with GPUs, a timeout, or a process of their own (a raw ``policy=`` or template
arguments) get a lease of their own. A dispatch pass starts pool nodes in priority
order; when the best node's shape (its request and sharing) cannot be placed, the
rest of that shape waits and the next shape's nodes start where they fit (backfill:
one look per blocked shape and pass, however many nodes it holds). Executables,
multi-rank and AI nodes get one placement per rank from the ledger; an AI node's
inference service is admitted by the backend (``backend.admit``).

Forwarding (on a backend that ``forwards``): a pending record whose only unfinished
input is running on a shared lease of the same request is started at once behind
that input on the same worker, its input named by the running call's tid
(:meth:`Scheduler._forward`), whether it came in the same submission or later (a
chain submitted future by future); so is one whose unfinished inputs were all queued
on that lease since its lane's last flush (``flushed``: they reach the worker in the
frame that names them). A chain then runs hop after hop on one worker with the
values it made, and the driver tops the lease up once half of what it holds is done
(one frame per half-depth of hops, not a round trip per hop). A forwarded record is
``RUNNING`` with ``waiting`` > 0. If its input fails, it comes back ``DROPPED`` and
waits again (a retry), or ends with its input (no retry left). When nothing runs and a ready node still waits,
idle services give back what they hold (``backend.release_idle``).

Journal: a record the session made with its value from the group's journal
(``payload`` already set) is ended ``DONE`` as it is taken, after the rest of its
submission, and its dependents wake as for any completion; a record with ``saved``
writes its value to the journal when it is done (failures never are).

Failure: a node that raises is retried up to ``retries`` times on a fresh
placement (only for the exception types of ``retry_on``, when given), each retry
``backoff * 2**k`` seconds after the failure; an infrastructure failure (its worker
or ranks died, its program was killed by a signal, 137 or 143) is retried too, at
least ``INFRASTRUCTURE_RETRIES`` times, and on other hosts than the ones where it
ran while other hosts of its backend could take all its ranks (``avoid``). Then it and everything downstream fail with
its exception. Then, by
the group's ``on_error``: ``WAIT`` (``compute()``'s default) starts nothing more of
the group while its running nodes finish; ``RAISE`` also kills its running nodes, so
the group ends at once; ``FINISH`` and ``CONTINUE`` run everything that does not
depend on the failure (the session raises, or returns the exceptions). Cancelling kills what runs and cancels what
depends on it. Priority: submission order, then the graph's post-order.
"""
from __future__ import annotations

import heapq
import itertools
import threading
import time
import weakref
from collections import deque
from concurrent.futures import CancelledError
from contextlib import closing
from typing import (Any, Callable, Collection, Deque, Dict, Iterator, List, Optional,
                    Sequence, Set, Tuple)

from .backends.base import DIED, DROPPED, KILLED, OK, Call, Completions, Lease
from .errors import (ExecutableError, NodeTimeoutError, RemoteError, add_note,
                     exception_text, unreadable_value, warn)
from .fusion import Fused
from .futures import Where

__all__ = ["Scheduler", "Task", "Group"]

PENDING, READY, RUNNING, DONE, FAILED, CANCELLED = range(6)
STATE_NAMES = {PENDING: "pending", READY: "ready", RUNNING: "running", DONE: "done",
               FAILED: "failed", CANCELLED: "cancelled"}
ENDED = (DONE, FAILED, CANCELLED)
#: what a submission does when one of its nodes fails: raise at once, killing what
#: runs (RAISE); start nothing more, let what runs finish, then raise (WAIT); run
#: everything that does not depend on the failure, then raise (FINISH); or that, and
#: return the exceptions in place of the values (CONTINUE)
RAISE, WAIT, FINISH, CONTINUE = "raise", "wait", "finish", "continue"
INFRASTRUCTURE_RETRIES = 1  # a node whose process died or was killed runs again this often
TRIES_NOTED = 5  # the failed attempts a node's final error note says why of
ON_ERROR = (RAISE, WAIT, CONTINUE)  # the names compute(on_error=) takes
LEASE_BUDGET = 0.002  # seconds of queued work a shared lease may hold (a backend's lease_budget)
MAX_DEPTH = 64
UNKNOWN_DEPTH = 1  # before a function's run time has been measured: strict priority
#: how long a session with only futures may stay idle before its backends drop
#: per-run state (pickled functions, measured run times, idle inference servers):
#: a stream of submissions that keeps catching up keeps its warm state
IDLE_GRACE = 5.0
TIMED_KEPT = 4_096  # functions whose run time is kept between runs, then forgotten
FORWARD_DEPTH = 2  # a forwarded chain keeps at least its next hop queued on the worker
SCAN = 8  # up to this many open shared leases of one request are scanned, more keep a heap

_tids = itertools.count(1)
_priorities = itertools.count()  # taken by submitting threads, in post-order
_pushes = itertools.count()  # numbers shared leases and their heap entries (see Shared)


class Group:
    """What one ``compute()`` (or every ``submit()`` of a session) added: its policy,
    its errors, and whether it has ended."""

    __slots__ = ("on_error", "live", "errors", "ended", "stopping", "journal")

    def __init__(self, on_error: str, waited: bool) -> None:
        self.on_error = on_error  # RAISE, WAIT, FINISH or CONTINUE
        self.live = 0  # its records not yet ended
        # in the order they failed; only for a compute() (waited), which raises the first
        self.errors: Optional[List[Tuple["Task", BaseException]]] = [] if waited else None
        # set when live falls to 0 (only for a compute(), which waits on it)
        self.ended: Optional[threading.Event] = threading.Event() if waited else None
        self.stopping = False  # RAISE/WAIT: a node failed, start nothing more of it
        self.journal: Any = None  # where its records' values are kept and reused from


class Task:
    """The scheduler's record of one node (see the module docstring for the fields)."""

    __slots__ = ("node", "prio", "lane", "backend", "prepared", "leased", "group", "state",
                 "deps", "dependents", "waiting", "needed", "payload", "futures", "failures",
                 "tid", "where", "error", "saved", "avoid", "fused", "weight", "tried",
                 "__weakref__")

    def __init__(self, node: Any, lane: "Lane", prepared: Any, group: Group,
                 deps: Sequence["Task"]) -> None:
        self.node, self.lane, self.prepared, self.group = node, lane, prepared, group
        self.backend = lane.backend
        self.prio = next(_priorities)
        self.leased = prepared is not None and lane.backend.uses_lease(prepared)  # None: reused
        self.state = PENDING
        self.deps = deps  # upstream records, in the order of node.deps; () once ended
        # records waiting on this one: () until the first, () again once ended
        self.dependents: Sequence[Task] = ()
        self.waiting = 0
        self.needed = 0  # dependents not yet ended
        self.payload: Optional[bytes] = None
        self.futures: Optional[List[Any]] = None  # weak references to its futures
        self.failures = 0
        self.tid = 0  # the running call
        self.where: Optional[Where] = None  # a done record's, for futures attached late
        self.error: Optional[BaseException] = None  # a failed record's
        self.saved: Optional[Tuple[Any, str]] = None  # (journal, key) to keep its value in
        # hosts where its process died: a retry goes elsewhere while another host can take it
        self.avoid: Optional[frozenset] = None
        self.fused: Optional[Fused] = None  # the nodes run inside its call (see .fusion)
        self.weight = 1  # nodes it stands for: 1 + the fused ones (what progress counts)
        self.tried: Optional[List[str]] = None  # why each attempt retried failed

    def value(self) -> Any:
        """A done record's value, decoded in this process.

        Raises:
            RuntimeError: naming the node, when its value's bytes cannot be unpickled
            here (a class only the worker has, a broken ``__reduce__``).
        """
        try:
            return self.backend.decode(self.payload)
        except Exception as exc:
            raise unreadable_value(self.node.key, exc) from exc

    def __repr__(self) -> str:
        return f"<Task {self.node.key} {STATE_NAMES[self.state]}>"


class Lane:
    """One backend's share of the scheduler: its ready heaps and its leases."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.ready = Ready()  # pool nodes, under leases, by the shape of their lease
        self.last_opts: Any = None  # the options of the record pushed last, and its shape
        self.last_shape: tuple = ()
        self.ready_own = Ready()  # nodes on processes of their own, by request
        self.open_leases: Dict[tuple, Shared] = {}  # shared leases by request
        self.drained: List[Lease] = []  # shared leases with nothing queued
        self.slots = max(1, backend.slots_free())
        self.used = False  # ran something since the session was last idle
        self.forwards = getattr(backend, "forwards", False)  # see _forward
        self.fuses = getattr(backend, "fuses", False)  # see rhapsody_graph.fusion
        self.budget = getattr(backend, "lease_budget", LEASE_BUDGET)  # see _by_time
        self.runs_code = getattr(backend, "runs_code", True)  # its values may be journaled
        self.unflushed = False  # calls were submitted since its backend's last flush
        self.flushed = 0  # every call with a tid up to this one went out at a flush
        # what the progress display reads (from its own thread: plain int reads)
        self.submitted = self.started = self.stopped = 0  # records; attempts begun, ended
        self.done = self.failed = self.cancelled = 0  # records ended so

    def shape_of(self, t: Task) -> tuple:
        """The key of ``t``'s lease: its sharing key, or, for a retry after its process
        died, its request with the hosts to avoid (a lease of its own elsewhere)."""
        opts = t.node.opts
        if t.avoid is not None:
            return (opts.resources.key, True, t.avoid)
        self.last_opts, self.last_shape = opts, _sharing_key(opts)
        return self.last_shape


class Ready:
    """A lane's ready records by *shape*, the key that decides where they can go (pool
    nodes: their lease's, :meth:`Lane.shape_of`; others: their request and the hosts to
    avoid). ``shapes`` holds a non-empty heap of ``(prio, record)`` per shape, ``heads``
    a heap of ``(prio, shape)``: each shape's best record's priority as ``listed``
    says (an entry whose priority is not its shape's ``listed`` one is stale and
    dropped as it surfaces). Outside a dispatch pass every shape is listed. A pass
    (:meth:`by_shape`) takes shapes best first and drains each while it fits, so a
    shape that cannot be placed now costs one look per pass however many records it
    holds, and the records of other shapes behind it still start (backfill without a
    window). ``count``: the records held, cancelled ones too until they surface. The
    scheduler pushes (``_push``) and pops (the dispatchers) a shape's heap itself,
    keeping ``count``: that is the hot path."""

    __slots__ = ("shapes", "heads", "listed", "count", "waiting")

    def __init__(self) -> None:
        self.shapes: Dict[tuple, List[Tuple[int, Task]]] = {}
        self.heads: List[Tuple[int, tuple]] = []
        self.listed: Dict[tuple, int] = {}
        self.count = 0
        self.waiting: List[tuple] = []  # shapes that wait for the next pass (see wait())

    def by_shape(self) -> Iterator[Tuple[tuple, List[Tuple[int, Task]]]]:
        """One dispatch pass: ``(shape, heap)`` best shape first. The caller pops what
        it starts, stops draining a shape when another shape's best comes first
        (``heap[0][0] > heads[0][0]``; a stale head only costs a look), and calls
        :meth:`wait` for a shape that cannot be placed now; when the pass ends (or the
        caller closes it) every shape it took is listed again."""
        waiting = self.waiting
        try:
            while True:
                shape = self._take()
                if shape is None:
                    return
                heap = self.shapes[shape]
                yield shape, heap
                if not heap:
                    if self.shapes.get(shape) is heap:
                        del self.shapes[shape]
                elif not waiting or waiting[-1] is not shape:
                    self.list_shape(shape)  # it gave way to a better shape
        finally:
            for shape in waiting:
                self.list_shape(shape)
            waiting.clear()

    def wait(self, shape: tuple) -> None:
        """``shape`` cannot be placed now: not again in this pass."""
        self.waiting.append(shape)

    def list_shape(self, shape: tuple) -> None:
        """Enter ``shape`` in ``heads`` by its best record, unless it is there already
        by a priority as good."""
        heap = self.shapes.get(shape)
        if heap:
            prio = heap[0][0]
            listed = self.listed.get(shape)
            if listed is None or prio < listed:
                self.listed[shape] = prio
                heapq.heappush(self.heads, (prio, shape))

    def _take(self) -> Optional[tuple]:
        """The shape of the best record, out of ``heads`` until it is listed again."""
        heads, listed = self.heads, self.listed
        while heads:
            prio, shape = heapq.heappop(heads)
            if listed.get(shape) == prio:
                del listed[shape]
                return shape
        return None

    def records(self) -> List[Task]:
        return [t for heap in self.shapes.values() for _, t in heap]

    def clear(self) -> None:
        self.shapes.clear()
        self.heads.clear()
        self.listed.clear()
        self.count = 0


class Shared:
    """A lane's open shared leases of one request: ``leases`` in the order they were
    opened (lease → its number), and, while there are more than :data:`SCAN` of them,
    ``heap``, whose valid top is the least loaded ``(outstanding, number, push,
    lease)``; an entry goes stale when its lease's count changes (a new one is pushed)
    or the lease ends, and is dropped as it surfaces. A few leases are scanned instead:
    cheaper than keeping the heap (one per worker of a small machine)."""

    __slots__ = ("leases", "heap")

    def __init__(self) -> None:
        self.leases: Dict[Lease, int] = {}
        self.heap: List[Tuple[int, int, int, Lease]] = []

    def add(self, lease: Lease) -> None:
        leases = self.leases
        leases[lease] = next(_pushes)
        if len(leases) == SCAN + 1:  # from now on a heap: made afresh
            self._rebuild()
        elif len(leases) > SCAN:
            self.note(lease)

    def note(self, lease: Lease) -> None:
        """``lease.outstanding`` changed."""
        leases = self.leases
        if len(leases) <= SCAN:
            return
        number = leases.get(lease)
        if number is None:
            return
        if len(self.heap) > 2 * len(leases) + 32:  # mostly stale
            self._rebuild()
        else:
            heapq.heappush(self.heap, (lease.outstanding, number, next(_pushes), lease))

    def _rebuild(self) -> None:
        heap = self.heap
        heap[:] = [(l.outstanding, n, next(_pushes), l) for l, n in self.leases.items()]
        heapq.heapify(heap)

    def least(self) -> Optional[Lease]:
        """The open lease with the fewest calls outstanding (the first opened of those)."""
        leases = self.leases
        if len(leases) <= SCAN:
            best = None
            for lease in leases:
                if best is None or lease.outstanding < best.outstanding:
                    best = lease
            return best
        heap = self.heap
        while heap:
            outstanding, number, _, lease = heap[0]
            if lease.outstanding == outstanding and leases.get(lease) == number:
                return lease
            heapq.heappop(heap)
        return None


class Attempt:
    __slots__ = ("task", "lease", "placements", "start", "end", "after", "outputs", "why")

    def __init__(self, task: Task, lease: Optional[Lease], placements: Sequence[Any],
                 timed: Any) -> None:
        self.task, self.lease, self.placements = task, lease, placements
        self.start = time.time() if timed else 0.0  # for a future's `where`, the run log
        self.end = 0.0
        self.after: Optional[Callable[[], None]] = None  # once killed: what then
        self.outputs: Optional[Tuple[Any, ...]] = None  # per rank: (stdout, stderr) or None
        self.why = ""  # why it was killed, if the scheduler killed it (a timeout)

    def ended(self, seconds: float) -> None:
        """It ended now, after running ``seconds`` by its executor's clock (0: not
        measured): its start moves to when it began to run (a call queued on a worker
        waited first)."""
        self.end = time.time()
        if self.start < 0:  # timed since a future was attached while it ran, at -start
            self.start = self.end - seconds if seconds > 0 else -self.start
        elif seconds > 0:
            self.start = max(self.start, self.end - seconds)


class Scheduler:
    """The state machine of one session, run by :meth:`run` in the session's thread."""

    def __init__(self, backends: Sequence[Any], completions: Completions) -> None:
        self.completions = completions
        self.lanes = {id(b): Lane(b) for b in backends}
        self.tasks: Dict[Any, Task] = {}  # read (only) by submitting threads too
        # records handed over by submitting threads and not taken yet (see Session._hand)
        self.handed: Dict[Any, Task] = {}
        # records of a stopped compute() that another call waits for (see _stop)
        self.adopted = Group(FINISH, waited=False)
        self.after: Optional[Callable[[], None]] = None  # run once the loop has ended
        # futures with a done-callback, until they end: this loop keeps them (and their
        # session) alive, so a session nobody else refers to is not closed before they run
        self.kept: Set[Any] = set()
        self.inflight: Dict[int, Attempt] = {}
        self.killing: Dict[int, Attempt] = {}
        self.kill_waits: List[Tuple[Set[int], threading.Event]] = []
        self.deadlines: List[Tuple[float, int]] = []
        self.seconds: Dict[int, float] = {}  # id(fn) -> moving average of run time
        self.timed: Dict[int, Any] = {}  # id(fn) -> a weak reference to fn (see _time)
        self.live = 0
        self.ended: List[Group] = []  # groups whose events are set at the end of the pass
        self.idle_waiters: List[threading.Event] = []  # set once nothing is left
        self.closing = False
        self.closed = threading.Event()
        self.intake: Deque[Tuple[Sequence[Task], Sequence[Tuple[Task, Any]], Group]] = deque()
        self.runlog: Any = None  # a RunLog: each ended attempt is written there
        self.unsaved: set = set()  # journals that failed a write (warned once each)
        self.rest_due = False  # a timer will end the run if the session stays idle

    # -- asked from any thread (each runs later on the scheduler thread) ------------------

    def take(self, new: Sequence[Task], attach: Sequence[Tuple[Task, Any]], group: Group) -> None:
        """Add ``new`` records (in post-order) and give ``attach`` futures to their records."""
        self.intake.append((new, attach, group))
        self.completions.post(self._take_all)

    def cancel(self, tasks: Optional[List[Task]]) -> threading.Event:
        """Cancel ``tasks`` (``None``: everything); the event is set once their
        processes are gone."""
        done = threading.Event()
        self.completions.post(lambda out: self._cancel(tasks, done))
        return done

    def abort_idle(self) -> threading.Event:
        """If nothing is left to run, end every backend's processes (workers too): a
        failed ``compute()`` leaves no process behind. The event is set once done."""
        done = threading.Event()

        def abort(out: List[Any]) -> None:
            if not self.live and not self.inflight and not self.killing:
                self._abort_backends()
            done.set()
        self.completions.post(abort)
        return done

    def when_idle(self) -> threading.Event:
        """An event set once everything taken so far has ended."""
        done = threading.Event()
        self.completions.post(lambda out: self.idle_waiters.append(done))
        return done

    def close(self) -> None:
        """Cancel everything and end the loop once every killed call has reported."""
        def closing(out: List[Any]) -> None:
            self._cancel(None, threading.Event())
            self.closing = True
        self.completions.post(closing)

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> None:
        wait = self.completions.wait
        while True:
            try:
                self._dispatch()
                if not self.inflight and not self.killing:
                    if self.closing:
                        break
                    if self._when_nothing_runs():
                        continue
                if self.ended or (self.idle_waiters and self._at_rest()):
                    self._notify()  # after _idle(): a compute() returns with backends at rest
                timeout = None
                if self.deadlines:
                    timeout = max(0.0, self.deadlines[0][0] - time.monotonic())
                for completion in wait(timeout):
                    self._complete(*completion)
                if self.deadlines:
                    self._expire()
            except BaseException as exc:  # a bug here must not hang every future
                self._crash(exc)
        self.live = 0
        self._notify(closed=True)
        if self.after is not None:  # a session dropped unclosed lets go of the rest
            self.after()
        self.closed.set()

    def _when_nothing_runs(self) -> bool:
        """Free idle services for nodes that wait (True: dispatch again), fail what
        can never start, or let backends drop per-run state when nothing is left."""
        lanes = [lane for lane in self.lanes.values()
                 if lane.ready.count or lane.ready_own.count]
        if lanes and any([lane.backend.release_idle() for lane in self.lanes.values()]):
            return True  # an idle inference service held what a ready node needs (its own
            # lane's, or a node of the backend whose ledger it is placed on)
        for lane in lanes:
            if getattr(lane.backend, "waits_for_hosts", False):
                continue  # its hosts are gone for now (restarting): its nodes wait for them
            lost = getattr(lane.backend, "lost", None)  # why it can run nothing more
            for t in lane.ready.records() + lane.ready_own.records():
                if t.state == READY:
                    self._fail(t, RuntimeError(
                        f"node {t.node.key!r} can never start: " + (lost or (
                            "the scheduler stalled with it ready and nothing running; "
                            "please report this"))), final=True)
            lane.ready.clear()
            lane.ready_own.clear()
        if self._at_rest():
            if self.ended or self.idle_waiters:  # a compute() returns, or wait(): at rest
                self._idle()
            elif not self.rest_due and any(lane.used for lane in self.lanes.values()):
                self.rest_due = True
                self.completions.call_at(time.monotonic() + IDLE_GRACE, self._rest)
        return False

    def _at_rest(self) -> bool:
        """Nothing is left: no record lives, and nothing handed over waits to be taken
        (a done-callback's submit is taken on the next turn of the loop)."""
        return not self.live and not self.intake

    def _rest(self, out: List[Any]) -> None:
        """The grace after futures ended has passed: rest, unless work came meanwhile."""
        self.rest_due = False
        if not self.live and not self.inflight and not self.killing:
            self._idle()

    def _idle(self) -> None:
        """Nothing is left to run: backends drop their per-run state."""
        for lane in self.lanes.values():
            if lane.used:
                lane.used = False
                self._end_drained(lane)
                lane.backend.end_run()
        if len(self.timed) > TIMED_KEPT:  # run times stay known from run to run
            self.seconds.clear()
            self.timed.clear()

    def _crash(self, exc: BaseException) -> None:
        """An error in the loop itself: fail everything, kill every process, go on."""
        for t in list(self.tasks.values()):
            if t.state not in ENDED:
                self._fail(t, exc, final=True)
        self._abort_backends()
        for attempt in self.inflight.values():
            attempt.task.lane.stopped += 1
        self.inflight.clear()
        self.killing.clear()
        for _, event in self.kill_waits:
            event.set()
        self.kill_waits.clear()
        self._notify()

    def _abort_backends(self) -> None:
        """Kill every backend's processes; their leases go (their ledgers start afresh)."""
        for lane in self.lanes.values():
            lane.backend.abort()
            lane.ready.clear()
            lane.ready_own.clear()
            lane.open_leases.clear()
            lane.drained.clear()

    def _notify(self, closed: bool = False) -> None:
        """Set the events of ended groups, and of idle waiters when nothing is left
        (or the loop has ended)."""
        for group in self.ended:
            group.ended.set()
        self.ended.clear()
        if closed or self._at_rest():
            for event in self.idle_waiters:
                event.set()
            self.idle_waiters.clear()

    # -- taking submissions --------------------------------------------------------------

    def _take_all(self, out: List[Any]) -> None:
        """Take everything handed over so far (later posts of this find the intake empty)."""
        intake = self.intake
        while intake:
            self._take(*intake.popleft())

    def _take(self, new: Sequence[Task], attach: Sequence[Tuple[Task, Any]], group: Group) -> None:
        tasks, handed = self.tasks, self.handed
        reused: List[Task] = []  # came with their values: done once all of new is taken
        unrun: List[Tuple[Task, Task]] = []  # on an ended input without a value: likewise
        for t in new:
            tasks.setdefault(t.node, t)
            if handed.get(t.node) is t:  # known as taken from now on (in that order)
                del handed[t.node]
            group.live += 1
            self.live += 1
            t.lane.submitted += t.weight
            waiting = 0
            upstream_failed = None
            for d in t.deps:
                d.needed += 1
                if d.state == DONE:
                    continue
                if d.state in (FAILED, CANCELLED):
                    upstream_failed = d
                    continue
                if d.dependents:
                    d.dependents.append(t)
                else:
                    d.dependents = [t]
                waiting += 1
            t.waiting = waiting
            if upstream_failed is not None:
                unrun.append((t, upstream_failed))
            elif t.payload is not None:
                reused.append(t)
            elif not waiting:
                self._push(t)
            elif waiting == 1 and t.leased and t.lane.forwards:
                self._forward_behind(t)  # a future's dependent, submitted while it runs
        for t, upstream in unrun:  # (a group ended before all of it is counted ends early)
            if t.state not in ENDED:  # (not ended already, downstream of another)
                self._end_unrun(t, upstream)
        for t in reused:
            self._done(t, t.payload, 0.0, None)
        for t, fut in attach:
            if t.state == DONE:
                fut._finish(t.where)
            elif t.state == FAILED:
                fut._fail(t.error, t.where)
            elif t.state == CANCELLED:
                fut._cancelled()
            else:
                if t.futures is None:
                    t.futures = []
                t.futures.append(weakref.ref(fut))
                if t.state == RUNNING:
                    attempt = self.inflight.get(t.tid)
                    if attempt is not None and not attempt.start:  # untimed until now
                        attempt.start = -time.time()
                    fut._start()
        if not group.live and group.ended is not None:
            self.ended.append(group)

    def _end_unrun(self, t: Task, upstream: Task) -> None:
        """``t`` depends on an ended record that has no value: end it the same way; in a
        ``compute()`` (whose outputs must each hold a value or an error) a cancelled
        input is ``t``'s error, a ``CancelledError`` that names both."""
        if upstream.state == FAILED:
            self._fail(t, upstream.error, final=True)
        elif t.group.errors is not None:
            self._fail(t, CancelledError(f"node {t.node.key!r} did not run: its input "
                                         f"{upstream.node.key!r} was cancelled"), final=True)
        else:
            self._cancel_one(t, set())

    def _push(self, t: Task) -> None:
        t.state = READY
        lane = t.lane
        if t.leased:
            shape = (lane.last_shape if t.node.opts is lane.last_opts and t.avoid is None
                     else lane.shape_of(t))
            ready = lane.ready
        else:
            shape = (t.node.opts.resources.key, t.avoid)
            ready = lane.ready_own
        heap = ready.shapes.get(shape)
        if heap is None:
            heap = ready.shapes[shape] = []
        heapq.heappush(heap, (t.prio, t))
        ready.count += 1
        if heap[0][1] is t:  # its shape's new best
            ready.list_shape(shape)

    # -- dispatch ------------------------------------------------------------------------

    def _dispatch(self) -> None:
        for lane in self.lanes.values():
            if lane.ready.count or lane.ready_own.count or lane.drained:
                while True:
                    if lane.ready_own.count:
                        # their placements (and an AI node's service) come fresh from the
                        # ledger: drained leases must not hold cores against them
                        self._end_drained(lane)
                        self._dispatch_own(lane)
                    if lane.ready.count:
                        self._dispatch_leased(lane)
                    # drained leases stay open through one pass, so a chain reuses its
                    # worker; the ones not reused are ended, and may admit more nodes
                    if not (self._end_drained(lane)
                            and (lane.ready.count or lane.ready_own.count)):
                        break
            if lane.unflushed:
                lane.unflushed = False
                lane.backend.flush()
                lane.flushed = next(_tids)

    def _end_drained(self, lane: Lane, helping: Optional[Task] = None) -> bool:
        """End the shared leases left with nothing queued (only those whose cores would
        let record ``helping`` fit, if given); True if any was ended."""
        if helping is None:
            ended = [lease for lease in lane.drained if not lease.outstanding]
            lane.drained.clear()
        else:
            ended = [lease for lease in lane.drained
                     if not lease.outstanding and self._frees_room(lane, lease, (helping,))]
            lane.drained = [lease for lease in lane.drained if lease not in ended]
        for lease in ended:
            self._end_lease(lane, lease)
        return bool(ended)

    @staticmethod
    def _frees_room(lane: Lane, lease: Lease, waiting: Sequence[Task]) -> bool:
        """Whether ending ``lease`` would let one of the ``waiting`` records fit."""
        ledger = lane.backend.ledger
        return any(ledger.fits_after_release(t.node.opts.resources, lease.placement,
                                             t.avoid or ()) for t in waiting)

    def _dispatch_own(self, lane: Lane) -> None:
        """Executables, multi-rank and AI nodes, best shape (request) first: one
        placement per rank, if they fit now."""
        ready, backend = lane.ready_own, lane.backend
        unadmitted = []
        with closing(ready.by_shape()) as shapes:
            for shape, heap in shapes:
                while heap:
                    t = heap[0][1]
                    if t.state != READY:  # cancelled or failed while it waited
                        heapq.heappop(heap)
                        ready.count -= 1
                        continue
                    if not backend.admit(t.prepared):
                        heapq.heappop(heap)
                        ready.count -= 1
                        unadmitted.append(t)  # its service does not fit now; others may
                        continue
                    placements = backend.ledger.allocate_ranks(t.node.opts.resources,
                                                               avoid=t.avoid or ())
                    if placements is None:
                        ready.wait(shape)
                        break
                    heapq.heappop(heap)
                    ready.count -= 1
                    self._start(t, None, placements)
                    if heap and ready.heads and heap[0][0] > ready.heads[0][0]:
                        break  # another shape's best comes first
        for t in unadmitted:
            self._push(t)

    def _dispatch_leased(self, lane: Lane) -> None:
        """Pool nodes, best shape first (see :class:`Ready`): top up shared leases, or
        open a lease on a free slot; a shape that cannot be placed waits for the next
        pass. A shared lease, once chosen, takes the shape's next records until it
        holds its depth (a run of neighbours in priority order, so a reduction's pairs
        land on one worker), then the next one is chosen."""
        ready, b = lane.ready, lane.backend
        filling: set = set()
        last_fn = None  # consecutive records of a shape are mostly calls of one function
        by_time = 1
        # the best record of each better shape that waits for cores: a lease whose cores
        # would let one fit is not topped up (it drains, and is ended)
        blocked: List[Task] = []
        with closing(ready.by_shape()) as shapes:
            for shape, heap in shapes:
                exclusive = shape[1]
                lease, depth, shared = None, 0, None  # the shared lease being filled
                while heap:
                    t = heap[0][1]
                    if t.state != READY:
                        heapq.heappop(heap)
                        ready.count -= 1
                        continue
                    if not exclusive and (t.fused or t.node.fn) is not last_fn:
                        last_fn = t.fused or t.node.fn
                        by_time = self._by_time(t)
                        lease = None
                    if lease is None or lease.outstanding >= depth:
                        # a shared lease holds the backend's lease budget of work,
                        # spread over slots
                        depth = (1 if exclusive
                                 else max(1, min(by_time, 1 + ready.count // lane.slots)))
                        lease = (None if exclusive
                                 else self._lease_with_room(lane, shape, depth, filling))
                        if lease is not None and blocked and self._frees_room(lane, lease,
                                                                              blocked):
                            lease = None
                        if lease is None:
                            placement = self._allocate(lane, t)
                            short = placement is None and self._short_of_cores(lane, t)
                            if short and lane.drained and self._end_drained(lane, t):
                                # idle leases must not hold cores against a better shape
                                placement = self._allocate(lane, t)
                            if placement is None:  # the shape waits for the next pass
                                ready.wait(shape)
                                if short:
                                    blocked.append(t)
                                if b.slots_free() <= 0 and not self._any_lease_room(lane, filling):
                                    return  # nothing fits anywhere
                                break
                            if exclusive:
                                lease = Lease(placement, 1)
                            else:
                                lease = Lease(placement, depth, shape)
                                shared = lane.open_leases.get(shape)
                                if shared is None:
                                    shared = lane.open_leases[shape] = Shared()
                                shared.add(lease)
                        shared = lane.open_leases[shape] if lease.key is not None else None
                        filling.add(lease)
                    heapq.heappop(heap)
                    ready.count -= 1
                    lease.outstanding += 1
                    if shared is not None:
                        shared.note(lease)
                    self._start(t, lease, lease.placements)
                    if shared is not None and lane.forwards:
                        lease.tail = t
                        if t.dependents:
                            self._forward(lease, t)
                    if heap and ready.heads and heap[0][0] > ready.heads[0][0]:
                        break  # another shape's best comes first

    @staticmethod
    def _short_of_cores(lane: Lane, t: Task) -> bool:
        """Whether pool node ``t``, which does not fit now, lacks cores (or a worker),
        which the shared leases of other shapes hold, rather than GPUs."""
        b = lane.backend
        return b.slots_free() <= 0 or b.ledger.short_of_cpus(t.node.opts.resources,
                                                             t.avoid or ())

    @staticmethod
    def _allocate(lane: Lane, t: Task) -> Any:
        """A placement for pool node ``t`` on a free slot of its lane, if one fits now."""
        b = lane.backend
        return (b.ledger.allocate(t.node.opts.resources, avoid=t.avoid or ())
                if b.slots_free() > 0 else None)

    def _forward(self, lease: Lease, t: Task) -> None:
        """Queue behind running ``t`` the dependent that waits for nothing else, and so
        down a chain while ``lease`` has room: its worker runs each with the value it
        just made, with no trip through this thread per hop (the completions still
        come here, one by one, so accounting, cancellation and failures stay exact).
        A forwarded record is ``RUNNING`` while an input is not done (``waiting``)."""
        fn = depth = None  # a chain's hops are mostly calls of one function
        while True:
            j = self._chained(t, lease)
            if j is None:
                return
            if (j.fused or j.node.fn) is not fn:
                fn, depth = j.fused or j.node.fn, self._forward_depth(j)
            if lease.outstanding >= depth:
                return
            lease.outstanding += 1
            t.lane.open_leases[lease.key].note(lease)
            self._start(j, lease, lease.placements)
            lease.tail = t = j

    def _chained(self, t: Task, lease: Lease) -> Optional[Task]:
        """The dependent of running ``t`` that may be forwarded behind it on ``lease``:
        pending, a pool node of the same shared request, waiting for ``t`` alone or
        for calls all queued on ``lease`` since its last flush (a reduction's subtree:
        they reach its worker in the frame that names them)."""
        for j in t.dependents:
            if (j.state == PENDING and j.leased and j.lane is t.lane
                    and not j.group.stopping
                    # a call of t's task shares t's lease key (a shared lease's is its sharing key)
                    and (j.node.opts is t.node.opts or _sharing_key(j.node.opts) == lease.key)
                    # every input not done must be a call of its own on the lease; a
                    # node with more inputs than any lease holds is never read through
                    # (each look would walk its inputs, done ones too)
                    and (j.waiting == 1 or (j.waiting <= lease.outstanding
                                            and len(j.deps) <= MAX_DEPTH
                                            and self._queued_together(j, lease)))):
                return j
        return None

    def _queued_together(self, j: Task, lease: Lease) -> bool:
        """Whether every input of ``j`` not done is a call queued on ``lease`` and not
        sent yet."""
        flushed, inflight = j.lane.flushed, self.inflight
        for d in j.deps:
            if d.state == DONE:
                continue
            if d.state != RUNNING or d.tid <= flushed:
                return False
            attempt = inflight.get(d.tid)
            if attempt is None or attempt.lease is not lease:
                return False
        return True

    def _forward_depth(self, t: Task) -> int:
        """Most calls a lease holds while a chain is forwarded on it: ~2 ms of work,
        at least 2 (the next hop waits on the worker, not on a round trip)."""
        return max(FORWARD_DEPTH, self._by_time(t))

    def _forward_behind(self, j: Task) -> None:
        """``j`` now waits for one running input: forward it behind that input's call
        if that is the last call on a shared lease (a reduction's last step)."""
        for d in j.deps:
            if d.state == RUNNING:
                attempt = self.inflight.get(d.tid)
                if attempt is not None and attempt.lease is not None \
                        and self._chain_end(attempt.lease) is d:
                    self._forward(attempt.lease, d)
                return

    def _chain_end(self, lease: Lease) -> Optional[Task]:
        """The last call queued on shared ``lease``, if it still runs there (a forwarded
        chain may go on behind it)."""
        t = lease.tail
        if t is None or t.state != RUNNING or lease.key is None or lease.executor is None:
            return None
        attempt = self.inflight.get(t.tid)
        return t if attempt is not None and attempt.lease is lease else None

    def _lease_with_room(self, lane: Lane, key: tuple, depth: int,
                         filling: set) -> Optional[Lease]:
        """An open shared lease that may queue a call next, if any (``depth``: what one
        may hold now): the least loaded (the first opened of those) while it is at most
        half full, else the least loaded of those filled in this pass (``filling``)
        that are not full. One on a host that left the ledger (even if it came back) is
        closed instead."""
        shared = lane.open_leases.get(key)
        lease = shared.least() if shared is not None else None
        while lease is not None and not lane.backend.ledger.holds(lease.placement):
            self._close_lease(lane, shared, lease)
            lease = shared.least()
        if lease is None:
            return None
        lease.depth = depth
        outstanding = lease.outstanding
        if outstanding >= depth:
            return None  # every lease of this request is full
        if outstanding <= depth // 2 or lease in filling:
            return lease
        # every lease is more than half full: only one being filled now may take more
        room = [l for l in filling if l.key == key and l.outstanding < depth]
        if not room:
            return None
        lease = min(room, key=lambda l: (l.outstanding, shared.leases[l]))
        lease.depth = depth
        return lease

    @staticmethod
    def _any_lease_room(lane: Lane, filling: set) -> bool:
        return any(l.outstanding < l.depth and (l in filling or l.outstanding <= l.depth // 2)
                   for shared in lane.open_leases.values() for l in shared.leases)

    def _by_time(self, t: Task) -> int:
        """How many calls like ``t`` one shared lease may queue by their measured run
        time (a fused call's: what its nodes' times foretell): the backend's lease
        budget of work (~2 ms: :data:`LEASE_BUDGET`)."""
        seconds = (t.fused.predicted if t.fused is not None
                   else self.seconds.get(id(t.node.fn)))
        if seconds is None:
            return UNKNOWN_DEPTH
        return min(MAX_DEPTH, int(t.lane.budget / max(seconds, 1e-6)))

    def _start(self, t: Task, lease: Optional[Lease], placements: Sequence[Any]) -> None:
        tid = next(_tids)
        t.state = RUNNING
        t.tid = tid
        self.inflight[tid] = Attempt(t, lease, placements, t.futures or self.runlog)
        lane = t.lane
        lane.started += 1
        lane.used = lane.unflushed = True
        node = t.node
        timeout = node.opts.timeout
        # an input still running is named by its call's tid: forwarded (see _forward)
        inputs = [d.payload if d.state == DONE else d.tid for d in t.deps] if t.deps else ()
        lane.backend.submit(Call(tid, node.key, t.prepared, inputs, placements, lease, timeout))
        if timeout is not None:
            deadlines = self.deadlines
            if len(deadlines) > 2 * len(self.inflight) + 64:  # of calls ended since: gone
                deadlines[:] = [d for d in deadlines if d[1] in self.inflight]
                heapq.heapify(deadlines)
            heapq.heappush(deadlines, (time.monotonic() + timeout, tid))
        if t.futures:
            for ref in t.futures:
                fut = ref()
                if fut is not None:
                    fut._start()

    # -- completions ---------------------------------------------------------------------

    def _complete(self, tid: int, status: str, payload: Any, seconds: float,
                  outputs: Optional[Tuple[Any, ...]] = None) -> None:
        """A call has ended; ``outputs``: what each rank printed, ``(stdout, stderr)`` or
        ``None``, where the backend captured it."""
        attempt = self.inflight.pop(tid, None)
        if attempt is not None:
            attempt.task.lane.stopped += 1
        killed = self.killing.get(tid)
        timed = attempt or killed
        if timed is not None and timed.start:  # for a future's `where` and the run log
            timed.ended(seconds)
        if self.runlog is not None:
            try:
                self._log(attempt, killed, status, payload)
            except OSError as e:  # a full or read-only file system: the run goes on
                warn(f"the run log {self.runlog.path} cannot be written ({e}); this "
                     "session writes no more of it, and its nodes go on")
                self.runlog = None
        if attempt is None:
            attempt = self.killing.pop(tid, None)
            if attempt is not None:  # a killed call has ended: now its placements are free
                self._release(attempt)
                if attempt.after is not None:
                    attempt.after()
                self._killed(tid)
            return
        self._release(attempt)
        t = attempt.task
        attempt.outputs = outputs
        if status == OK:
            self._done(t, payload, seconds, attempt)
            lease = attempt.lease
            tail = (self._chain_end(lease) if lease is not None and lease.tail is not None
                    and lease.tail.dependents else None)
            # the chain goes on: top its worker up once half of what it holds is done
            # (one frame per half-depth of hops, not one per hop)
            if tail is not None and lease.outstanding <= self._forward_depth(tail) // 2:
                self._forward(lease, tail)
        elif status in (DROPPED, KILLED):  # never started, or killed by an abort
            if t.group.stopping:
                t.state = READY
                self._cancel_one(t, set())
            elif t.waiting:  # forwarded, and its input returned no value there: wait again
                t.state = PENDING
            else:
                self._push(t)
        else:
            if t.futures:
                t.where = self._where(t, attempt)
            self._fail(t, payload, infrastructure=status == DIED or _killed_program(payload),
                       hosts={p.host for p in attempt.placements})

    def _log(self, attempt: Optional[Attempt], killed: Optional[Attempt], status: str,
             payload: Any) -> None:
        """Write the ended attempt to the run journal (:mod:`.runlog`)."""
        if killed is not None or (attempt is not None and status == KILLED):
            attempt = killed or attempt
            self.runlog.write(attempt.task, attempt, "killed", 0, attempt.why)
        elif attempt is None:
            return
        elif status == OK:
            self.runlog.write(attempt.task, attempt, "done", len(payload))
        elif status == DROPPED:
            self.runlog.write(attempt.task, attempt, "dropped", 0)
        else:
            self.runlog.write(attempt.task, attempt, "died" if status == DIED else "failed", 0,
                              f"{type(payload).__name__}: {payload}")

    @staticmethod
    def _where(t: Task, attempt: Attempt) -> Where:
        return Where(t.backend.name, attempt.placements, t.failures + 1, attempt.start,
                     attempt.end, attempt.outputs)

    def _release(self, attempt: Attempt) -> None:
        lane = attempt.task.lane
        lease = attempt.lease
        if lease is None:
            for p in attempt.placements:
                lane.backend.ledger.release(p)
            return
        lease.outstanding -= 1
        shared = lane.open_leases.get(lease.key) if lease.key is not None else None
        if shared is not None:
            shared.note(lease)
        if lease.outstanding == 0:
            if lease.executor is not None and lease.key is not None:
                lane.drained.append(lease)  # shared: ended after the next dispatch unless reused
            else:
                self._end_lease(lane, lease)

    def _close_lease(self, lane: Lane, shared: Shared, lease: Lease) -> None:
        """A shared lease whose host left (a Dask worker): it takes no more calls, and
        ends once its last call has."""
        del shared.leases[lease]
        lease.key = lease.tail = None
        if lease in lane.drained:
            lane.drained.remove(lease)
        if not lease.outstanding:
            self._end_lease(lane, lease)

    @staticmethod
    def _end_lease(lane: Lane, lease: Lease) -> None:
        lane.backend.ledger.release(lease.placement)
        lane.backend.end_lease(lease)
        if lease.key is not None:
            del lane.open_leases[lease.key].leases[lease]

    def _done(self, t: Task, payload: bytes, seconds: float, attempt: Optional[Attempt]) -> None:
        """``t`` has its value: from its call, or (``attempt`` None) from the journal."""
        t.state = DONE
        t.payload = payload
        if attempt is not None:
            if t.saved is not None:
                self._save(t, payload)
            if t.fused is not None:
                self._refit(t.fused, seconds)
            elif t.leased:  # a pool call: its function's run time sizes leases and fusion
                fid = id(t.node.fn)
                last = self.seconds.get(fid)
                if last is None:
                    self._time(t.node.fn, seconds)
                else:
                    self.seconds[fid] = 0.8 * last + 0.2 * seconds
        for j in t.dependents:
            j.waiting -= 1
            if j.state == PENDING:
                if not j.waiting:
                    self._push(j)
                elif j.waiting == 1 and j.leased and j.lane.forwards:
                    self._forward_behind(j)
        if t.futures:
            if attempt is None:  # reused: it never ran here
                now = time.time()
                where = Where(t.backend.name, (), 0, now, now)
            else:
                where = self._where(t, attempt)
            t.where = where
            for ref in t.futures:
                fut = ref()
                if fut is not None:
                    fut._finish(where)
        self._ended(t)

    def _time(self, fn: Any, seconds: float) -> None:
        """Keep the run time of ``fn``'s first call, and ``fn`` weakly: its entry goes
        when it does (an id is only unique among live objects)."""
        fid, estimates, timed = id(fn), self.seconds, self.timed

        def gone(_: Any) -> None:
            estimates.pop(fid, None)
            timed.pop(fid, None)
        try:
            timed[fid] = weakref.ref(fn, gone)
        except TypeError:  # a builtin: it lives as long as its module
            timed[fid] = fn
        estimates[fid] = seconds

    def _refit(self, fused: Fused, seconds: float) -> None:
        """A fused call took ``seconds``: move each estimate it was planned with
        toward that estimate times how far the call was off, so that a function that
        grew slow stops being fused (the fast ones beside it are measured again
        alone, and come back) and a rare slow call is forgotten by the next ones."""
        ratio = seconds / fused.predicted
        estimates = self.seconds
        for fid, was in fused.functions:  # toward what this call says each one takes
            last = estimates.get(fid)
            if last is not None:
                estimates[fid] = 0.8 * last + 0.2 * was * ratio

    def _save(self, t: Task, payload: bytes) -> None:
        """Put ``t``'s value in its journal. One that cannot be written (a full or
        read-only file system) costs a rerun on resume, not this run: a warning, once."""
        journal, key = t.saved
        try:
            journal.put(key, t.node, payload)
        except Exception as e:  # (on this thread: anything else would stop the session)
            if journal not in self.unsaved:
                self.unsaved.add(journal)
                warn(f"the journal {journal.path} cannot be written ({e}): the value "
                     f"of node {t.node.key!r} (and of any later node it cannot take) is "
                     "not saved, so a resumed run runs it again; this run goes on (this "
                     "warning is given once)")

    def _ended(self, t: Task) -> None:
        """``t`` has ended: free what it held upstream; forget it unless a dependent
        still needs its value."""
        tasks = self.tasks
        for d in t.deps:
            d.needed -= 1
            if not d.needed and d.state in ENDED and tasks.get(d.node) is d:
                self._forget(d)
        t.deps = ()
        t.dependents = ()
        t.futures = None
        t.prepared = None  # its encoded call: a future may keep the record for long
        if (t.state != DONE or not t.needed) and tasks.get(t.node) is t:
            self._forget(t)
        lane = t.lane
        if t.state == DONE:
            lane.done += t.weight
        elif t.state == FAILED:
            lane.failed += t.weight
        else:
            lane.cancelled += t.weight
        self.live -= 1
        group = t.group
        group.live -= 1
        if not group.live and group.ended is not None:
            self.ended.append(group)

    def _forget(self, t: Task) -> None:
        """Drop the ended record ``t`` from ``tasks``. A future may keep it for long: one
        no ``compute()`` waits on keeps its node without the node's inputs from now on
        (else a chain's last future would keep every upstream future, and its value)."""
        del self.tasks[t.node]
        if t.node.deps and t.group.errors is None:
            t.node = t.node.without_inputs()

    def _fail(self, t: Task, exc: BaseException, final: bool = False,
              infrastructure: bool = False, hosts: Collection[str] = ()) -> None:
        node = t.node
        if not final:
            t.failures += 1
            opts = node.opts
            if infrastructure and t.fused is not None:
                add_note(exc, f"the call of node {node.key!r} ran {t.fused.count - 1} nodes "
                              "fused into it (see rhapsody_graph.fusion), any of which may "
                              "have ended its process; a retry runs them all again")
            if infrastructure:  # its process died or was killed: retried by default,
                allowed = max(opts.retries, INFRASTRUCTURE_RETRIES)  # on another host
                if hosts and opts.resources.per_rank is None:
                    avoid = (t.avoid or frozenset()) | hosts
                    if t.backend.inventory.fits_elsewhere(opts.resources, avoid):
                        t.avoid = avoid
            elif opts.retry_on is None or isinstance(exc, opts.retry_on) or (
                    isinstance(exc, RemoteError) and exc.is_a(opts.retry_on)):
                allowed = opts.retries
            else:
                allowed = 0
            why = (f"{'its process died or was killed: ' if infrastructure else ''}"
                   f"{type(exc).__name__}: {exception_text(exc, limit=200)}")
            if t.failures <= allowed and not t.group.stopping:
                if t.tried is None:
                    t.tried = []
                if len(t.tried) < TRIES_NOTED:  # the first few attempts (and the last)
                    t.tried.append(why)
                self._retry(t)
                return
            if t.tried:
                earlier = [f"attempt {i}: {w}" for i, w in enumerate(t.tried, 1)]
                first, last = len(t.tried) + 1, t.failures - 1
                if last > first:
                    earlier.append(f"attempts {first}-{last} left out")
                elif last == first:
                    earlier.append(f"attempt {first} left out")
                add_note(exc, f"node {node.key!r} failed {t.failures} times "
                              f"(retries={opts.retries}; {'; '.join(earlier)}; "
                              f"attempt {t.failures}: {why})")
        dependents = t.dependents
        self._mark_failed(t, exc)
        group = t.group
        if group.errors is not None:
            group.errors.append((t, exc))
        self._ended(t)
        skipped = self._end_downstream(dependents, exc)
        if skipped and not final:
            add_note(exc, f"{skipped} node(s) depending on {node.key!r} did not run")
        if group.on_error in (RAISE, WAIT) and not group.stopping:
            self._stop(group)

    def _retry(self, t: Task) -> None:
        """Ready ``t`` again: now, or after its backoff (``backoff * 2**(failures - 1)``
        seconds, a timer of the completion queue: nothing sleeps)."""
        delay = t.node.opts.backoff * 2.0 ** min(t.failures - 1, 64)  # no float overflow
        if not delay:
            self._push(t)
            return
        t.state = READY  # not on a heap until the timer: cancel() sees it as ready
        if t.futures:
            for ref in t.futures:
                fut = ref()
                if fut is not None:
                    fut._queued()

        def due(out: List[Any]) -> None:
            if t.state == READY:
                self._push(t)
        self.completions.call_at(time.monotonic() + delay, due)

    def _end_downstream(self, dependents: Sequence[Task], exc: Optional[BaseException]) -> int:
        """Fail (``exc``) or cancel (``None``) everything downstream; return how many."""
        count = 0
        stack = list(dependents)
        while stack:
            j = stack.pop()
            if j.state == RUNNING and j.waiting:  # forwarded behind what failed: its call
                attempt = self.inflight.pop(j.tid, None)  # comes back DROPPED, unheeded
                if attempt is not None:
                    j.lane.stopped += 1
                    self._release(attempt)
            elif j.state not in (PENDING, READY):
                continue
            count += j.weight  # a fused record stands for its nodes
            stack.extend(j.dependents)
            if exc is None:
                self._mark_cancelled(j)
            else:
                self._mark_failed(j, exc)
                errors = j.group.errors
                if errors is not None and not errors:  # a compute() group's first failure
                    errors.append((j, exc))
            self._ended(j)
        return count

    def _stop(self, group: Group) -> None:
        """A node of ``group`` failed: start nothing more of it; its running nodes
        finish (``WAIT``) or are killed (``RAISE``)."""
        group.stopping = True
        for lane in self.lanes.values():
            lane.backend.drop_queued()
        members = [t for t in self.tasks.values() if t.group is group and t.state not in ENDED]
        for t in _wanted(members):  # another call waits for it: it goes on, outside
            group.live -= 1  # this call
            t.group = self.adopted
            self.adopted.live += 1
        stop = (PENDING, READY, RUNNING) if group.on_error == RAISE else (PENDING, READY)
        for t in members:
            if t.group is group and t.state in stop:
                self._cancel_one(t, set())
        if not group.live and group.ended is not None and group not in self.ended:
            self.ended.append(group)

    def _expire(self) -> None:
        now = time.monotonic()
        while self.deadlines and self.deadlines[0][0] <= now:
            _, tid = heapq.heappop(self.deadlines)
            attempt = self.inflight.pop(tid, None)
            if attempt is None:
                continue
            t = attempt.task
            t.lane.stopped += 1
            error = NodeTimeoutError.of(t.node.key, t.node.opts.timeout)
            attempt.why = f"{type(error).__name__}: {error}"

            def after(t: Task = t, error: BaseException = error,
                      attempt: Attempt = attempt) -> None:
                if t.state == RUNNING:
                    if t.futures:
                        t.where = self._where(t, attempt)
                    self._fail(t, error)
            self._kill(tid, attempt, after)

    def _kill(self, tid: int, attempt: Attempt, after: Optional[Callable[[], None]]) -> None:
        attempt.after = after
        self.killing[tid] = attempt
        attempt.task.lane.backend.kill(tid)

    def _killed(self, tid: int) -> None:
        for tids, event in self.kill_waits:
            tids.discard(tid)
            if not tids:
                event.set()
        self.kill_waits = [(tids, e) for tids, e in self.kill_waits if tids]

    # -- cancellation --------------------------------------------------------------------

    def _cancel(self, tasks: Optional[List[Task]], done: threading.Event) -> None:
        if tasks is None:
            tasks = [a.task for a in self.inflight.values()] + list(self.tasks.values())
        kills: Set[int] = set()
        for t in tasks:
            self._cancel_one(t, kills)
        kills &= set(self.killing)
        if kills:
            self.kill_waits.append((kills, done))
        else:
            done.set()

    def _cancel_one(self, t: Task, kills: Set[int]) -> None:
        if t.state in ENDED:
            return
        if t.state == RUNNING:
            attempt = self.inflight.pop(t.tid, None)
            if attempt is not None:
                t.lane.stopped += 1
                self._kill(t.tid, attempt, None)
            kills.add(t.tid)
        dependents = t.dependents
        self._mark_cancelled(t)
        self._ended(t)
        self._end_downstream(dependents, None)

    @staticmethod
    def _mark_cancelled(t: Task) -> None:
        t.state = CANCELLED
        for fut in _live(t.futures):
            fut._cancelled()

    @staticmethod
    def _mark_failed(t: Task, exc: BaseException) -> None:
        t.state = FAILED
        t.error = exc
        for fut in _live(t.futures):
            fut._fail(exc, t.where)


def _sharing_key(opts: Any) -> tuple:
    """Which shared leases a node of these options may join: ``(request key, exclusive)``;
    exclusive (a lease of its own): GPUs, a timeout, or a process of its own."""
    res = opts.resources
    return (res.key, res.gpus > 0 or opts.timeout is not None or opts.custom_process)


def _wanted(records: Sequence[Task]) -> Set[Task]:
    """Those of ``records`` (one group's, not ended) that a live future or a record of
    another call waits for, and what they need among them."""
    group = records[0].group if records else None
    wanted: Set[Task] = set()
    stack = [t for t in records if _live(t.futures) or any(
        d.group is not group and d.state not in ENDED for d in t.dependents)]
    while stack:
        t = stack.pop()
        if t not in wanted and t.group is group and t.state not in ENDED:
            wanted.add(t)
            stack.extend(t.deps)
    return wanted


def _live(refs: Optional[List[Any]]) -> List[Any]:
    """The futures still alive among weak references ``refs``."""
    return [f for f in (r() for r in refs or ()) if f is not None]


def _killed_program(exc: Any) -> bool:
    """Whether an executable's failure is its process being killed (a signal, the OOM
    killer's 137, a batch system's 143), not its own error."""
    code = getattr(exc, "returncode", None)
    return (isinstance(exc, ExecutableError) and isinstance(code, int)
            and (code < 0 or code in (128 + 9, 128 + 15)))
