"""A simulated backend: the real session, scheduler and ledger place every call on a
modelled inventory, and a virtual clock says when each call ends. No user code runs.

``SimulatedBackend(hosts=1000, cpus=64, gpus=8, duration=...)`` joins a session like
any backend and runs Python functions, executables and multi-rank jobs (any node,
Dragon options included). ``prepare`` keeps only the node's modelled duration
(``duration=``: seconds, or a function of the node returning seconds); the
function and its arguments are never pickled, unpickled or called. Every node's
value is ``None``.

The clock: ``clock`` is simulated seconds since the backend was made. A call
submitted at ``clock`` starts then (a call queued on a lease starts when the one
before it on that lease ends) and ends its duration later. Due calls wait on a heap
``_due`` of ``(end, tid)``; while it holds any, a pipe the session's
:class:`~.base.Completions` queue watches is readable, so when the scheduler waits
and nothing else is due, it wakes, the clock jumps to the next end, and every call
ending then completes at once (:meth:`SimulatedBackend._advance`). Nothing sleeps:
a million nodes run in seconds of wall time. Timeouts and retry backoffs stay in
real time (the scheduler's), so they rarely fire here.

What happened is kept: ``records`` holds one :class:`Record` per call that ran
(key, simulated start and end, placements; kept as plain tuples of scalars while the
run goes on, so that Python's cyclic collector does not walk a million of them over
and over, and made into records when read), from which :func:`double_bookings`
checks, without the ledger, that no core or GPU id of any host was held by two calls
at once, and :func:`utilisation` / :func:`timeline` say how busy cores and GPUs were.

>>> import rhapsody_graph as rhapsody
>>> @rhapsody.task(cpus=4, gpus=1)
... def train(x): raise AssertionError("a simulation runs no user code")
>>> sim = SimulatedBackend(hosts=2, cpus=8, gpus=2, duration=10.0)
>>> with rhapsody.Session(backends=[sim]) as s:
...     s.compute([train(i) for i in range(6)])
([None, None, None, None, None, None],)
>>> sim.clock, len(sim.records), sim.double_bookings()
(20.0, 6, [])
>>> sim.utilisation()["gpus"]
0.75
"""
from __future__ import annotations

import heapq
import math
import operator
import os
import pickle
import selectors
import weakref
from collections import defaultdict
from typing import Any, Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, \
    Tuple, Union

from .base import DROPPED, KILLED, OK, RANKS_KIND, Call, Completion, close_session, \
    refuse_foreign_abort, refuse_second_session
from ..errors import add_note, brief, warn
from ..graph import EXECUTABLE, FUNCTION
from ..resources import Host, Inventory, Ledger, Placement

__all__ = ["SimulatedBackend", "Record", "double_bookings", "utilisation", "timeline"]

#: the names of the simulated backends of each session (by its completion queue)
_clocks: "weakref.WeakKeyDictionary[Any, List[str]]" = weakref.WeakKeyDictionary()

_VALUE = pickle.dumps(None)  # every simulated node's value
Duration = Union[float, Callable[[Any], float]]


class Record(NamedTuple):
    """One call that ran: the node's key, its simulated start and end (seconds of the
    backend's clock) and its placements (one per rank)."""

    key: str
    start: float
    end: float
    placements: Sequence[Placement]


class SimulatedBackend:
    """Model calls on a declared inventory on a virtual clock (see the module docstring).

    Args:
        hosts: how many hosts (named ``<name>0``, ``<name>1``, ...; each ``cpus`` cores,
            ``gpus`` GPUs, ``memory`` bytes), or the :class:`~rhapsody_graph.Host` s.
        cpus: cores per host (default 64), with ``hosts`` a count.
        gpus: GPUs per host (default 8), with ``hosts`` a count.
        memory: bytes per host (default 256 GiB), with ``hosts`` a count.
        name: the backend's name in a session.
        duration: each call's simulated seconds: a number, or a function of the node
            (``lambda node: node.args[0]``) called once per node by ``prepare``.
        record: keep a :class:`Record` of every call (``records``); ``False`` saves
            the memory in very long runs (no double-booking check, no utilisation).
    Raises:
        TypeError: ``hosts`` neither a count nor hosts, or counts given with hosts.
        ValueError: a count below 1, or a duration that is not a finite number >= 0.
    """

    kinds = frozenset((FUNCTION, EXECUTABLE, RANKS_KIND))
    forwards = False
    runs_code = False  # its values (None) are never journaled

    def __init__(self, hosts: "int | Sequence[Host]" = 1, *, cpus: Optional[int] = None,
                 gpus: Optional[int] = None, memory: Optional[int] = None, name: str = "sim",
                 duration: Duration = 1.0, record: bool = True) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"SimulatedBackend: name must be a non-empty string, got {brief(name)}")
        self.name = name
        self.inventory = Inventory(_declared(name, hosts, cpus, gpus, memory))
        self.ledger = Ledger(self.inventory)
        if not callable(duration):
            _seconds(duration, f"SimulatedBackend {name!r}: duration")
        self._duration = duration
        self.record = record
        # per call that ran: (key, start, end, (a placement's fields, ...)); see `records`
        self._rows: List[tuple] = []
        self.clock = 0.0
        self.hub: Any = None
        self._slots = self.inventory.total_cpus  # leases it takes at most (the ledger decides)
        self._due: List[Tuple[float, int]] = []  # (end, tid) of calls not yet completed
        # tid -> (key, start, end, placements, lease) of a call not yet ended; a lease's
        # executor here is a number: when the last call queued on the lease ends
        self._running: Dict[int, Tuple[str, float, float, Sequence[Placement], Any]] = {}
        self._wake_r = self._wake_w = -1  # a pipe readable while _due holds a call
        self._readable = False

    # -- the backend protocol (see .base) ------------------------------------------------

    def attach(self, completions: Any) -> None:
        refuse_second_session(self.name, self.hub, completions)
        if completions is None and self.hub is not None:
            self.hub.unwatch(self._wake_r)
        elif completions is not None:
            clocks = _clocks.setdefault(completions, [])
            if clocks:
                warn(f"SimulatedBackend {self.name!r} joins a session with simulated "
                     f"backend(s) {', '.join(map(repr, clocks))}: each keeps its own clock, "
                     "so a node on one may start before its input on another has ended "
                     "(in simulated time); model them as one SimulatedBackend of several "
                     "hosts (hosts=[Host(...), ...])")
            clocks.append(self.name)
            if self._wake_r < 0:  # first session, or the next after a shutdown
                self._wake_r, self._wake_w = os.pipe()
                os.set_blocking(self._wake_r, False)
            completions.watch(self._wake_r, selectors.EVENT_READ, self._advance)
        self.hub = completions

    def accepts(self, node: Any) -> bool:
        return True  # nothing runs: any options are fine

    def prepare(self, node: Any) -> Tuple[float, bool]:
        """``(modelled seconds, whether it runs under a lease)``: a plain tuple of two
        scalars, which Python's cyclic collector stops tracking (a million pending
        nodes cost it nothing). Raise ``ValueError`` naming the node when ``duration``
        gives no finite number >= 0 for it."""
        seconds = self._duration
        if callable(seconds):
            try:
                seconds = seconds(node)
            except Exception as exc:
                add_note(exc, f"raised by the duration= of SimulatedBackend {self.name!r} "
                              f"for node {node.key!r}")
                raise
            seconds = _seconds(seconds, f"node {node.key!r}: the duration modelled for it")
        return float(seconds), node.kind == FUNCTION and node.opts.resources.ranks == 1

    def uses_lease(self, prepared: Tuple[float, bool]) -> bool:
        return prepared[1]

    def slots_free(self) -> int:
        return self._slots

    def admit(self, prepared: Any) -> bool:
        return True

    def release_idle(self) -> bool:
        return False

    def submit(self, call: Call) -> None:
        """Plan the call: it starts now (or after the calls before it on its lease)
        and ends its modelled seconds later."""
        start = self.clock
        lease = call.lease
        if lease is not None and lease.executor is not None and lease.executor > start:
            start = lease.executor
        end = start + call.prepared[0]
        if lease is not None:
            lease.executor = end
        self._running[call.tid] = (call.key, start, end, call.placements, lease)
        heapq.heappush(self._due, (end, call.tid))
        if not self._readable:
            self._readable = True
            os.write(self._wake_w, b"x")

    def flush(self) -> None:
        pass  # every call was planned at submit()

    def drop_queued(self) -> None:
        """Calls queued on a lease that have not started by the clock come back ``DROPPED``."""
        queued = [tid for tid, (_, start, _, _, lease) in self._running.items()
                  if lease is not None and start > self.clock]
        leases = {id(self._running[tid][4]): self._running[tid][4] for tid in queued}
        for tid in queued:
            del self._running[tid]
            self.hub.post((tid, DROPPED, None, 0.0))
        for lease in leases.values():  # free once the call still running there ends
            lease.executor = self.clock
        for _, _, end, _, lease in self._running.values():
            if lease is not None and id(lease) in leases:
                lease.executor = max(lease.executor, end)

    def kill(self, tid: int) -> None:
        """End the call at the clock (what it ran so far is recorded); report ``KILLED``."""
        entry = self._running.pop(tid, None)
        if entry is not None:
            key, start, planned, placements, lease = entry
            end = max(start, self.clock)
            if self.record and end > start:
                self._rows.append(_row(key, start, end, placements))
            if lease is not None and lease.executor == planned:
                lease.executor = end
        self.hub.post((tid, KILLED, None, 0.0))

    def end_lease(self, lease: Any) -> None:
        pass  # its executor is a number here: nothing to stop

    def decode(self, payload: bytes) -> Any:
        return pickle.loads(payload)

    def end_run(self) -> None:
        pass  # the records and the clock outlive a run: read them after compute()

    def abort(self) -> None:
        """Forget every call not yet ended; the ledger starts afresh."""
        refuse_foreign_abort(self, self.hub)
        self._running.clear()
        self._due.clear()
        self._quiet()
        self.ledger = Ledger(self.inventory)

    def shutdown(self) -> None:
        close_session(self.hub)
        self.abort()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1  # closed: never closed again, nor used

    def __enter__(self) -> "SimulatedBackend":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        return (f"<SimulatedBackend {self.name!r}: {len(self.inventory.hosts)} hosts, "
                f"clock {self.clock:g} s>")

    # -- what happened ----------------------------------------------------------------------

    @property
    def records(self) -> List[Record]:
        """One :class:`Record` per call that ran, in the order they ended (made anew
        on each read)."""
        return [Record(key, start, end, [Placement(*fields) for fields in held])
                for key, start, end, held in self._rows]

    def double_bookings(self) -> List[Tuple[Tuple[str, str, int], tuple, tuple]]:
        """Every core or GPU id held by two calls at once (see :func:`double_bookings`)."""
        return double_bookings(self._recorded("double_bookings"))

    def utilisation(self) -> Dict[str, float]:
        """How busy cores and GPUs were from 0 to the clock (see :func:`utilisation`)."""
        return utilisation(self._recorded("utilisation"), self.inventory, 0.0, self.clock)

    def _recorded(self, what: str) -> List[tuple]:
        if not self.record:
            raise RuntimeError(f"SimulatedBackend {self.name!r} keeps no records "
                               f"(record=False): {what}() has nothing to read; make it "
                               "with record=True")
        return self._rows

    # -- the clock --------------------------------------------------------------------------

    def _advance(self, mask: int, out: List[Completion]) -> None:
        """The scheduler waits and nothing else is due: move the clock to the next
        end and complete every call that ends then (on the scheduler thread)."""
        due, running = self._due, self._running
        while due and due[0][1] not in running:  # killed or dropped meanwhile
            heapq.heappop(due)
        if due:
            now = due[0][0]
            self.clock = max(self.clock, now)
            keep = self._rows.append if self.record else None
            while due and due[0][0] <= now:
                tid = heapq.heappop(due)[1]
                entry = running.pop(tid, None)
                if entry is None:
                    continue
                key, start, end, placements, _ = entry
                if keep is not None:
                    keep(_row(key, start, end, placements))
                out.append((tid, OK, _VALUE, end - start))
        if not due:
            self._quiet()

    def _quiet(self) -> None:
        """Nothing is due: the pipe stops being readable."""
        if self._readable:
            self._readable = False
            try:
                os.read(self._wake_r, 64)
            except OSError:  # BlockingIOError, or closed (-1) by a shutdown
                pass


# a placement's fields, in the order Placement() takes them: host, cpus and gpus first
_held = operator.attrgetter("host", "cpus", "gpus", "memory", "rank", "world_size", "local_rank")


def _row(key: str, start: float, end: float, placements: Sequence[Placement]) -> tuple:
    """A call that ran, as a tuple of scalars and tuples (see ``records``)."""
    return key, start, end, tuple(map(_held, placements))


def _seconds(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not 0 <= value < math.inf:
        raise ValueError(f"{what} must be a finite number of seconds >= 0, got {brief(value)}")
    return float(value)


def _declared(name: str, hosts: "int | Sequence[Host]", cpus: Optional[int],
              gpus: Optional[int], memory: Optional[int]) -> List[Host]:
    """The hosts to simulate: ``hosts`` of the given counts, or the hosts given."""
    if isinstance(hosts, int) and not isinstance(hosts, bool):
        if hosts < 1:
            raise ValueError(f"SimulatedBackend {name!r}: hosts must be >= 1, got {brief(hosts)}")
        cpus = 64 if cpus is None else cpus
        gpus = 8 if gpus is None else gpus
        memory = 256 * 2**30 if memory is None else memory
        return [Host(f"{name}{i}", cpus, gpus, memory) for i in range(hosts)]
    if (not isinstance(hosts, (list, tuple)) or not hosts
            or not all(isinstance(h, Host) for h in hosts)):
        raise TypeError(f"SimulatedBackend {name!r}: hosts must be a count or a list of "
                        f"Host, got {brief(hosts)}")
    if cpus is not None or gpus is not None or memory is not None:
        raise TypeError(f"SimulatedBackend {name!r}: give hosts=[Host(...), ...] or "
                        "hosts=N with cpus=/gpus=/memory=, not both")
    return list(hosts)


# -- checks over records (they read the records only, never a ledger) -----------------------

def double_bookings(records: Iterable[Record]) -> List[Tuple[Tuple[str, str, int], tuple, tuple]]:
    """Every ``((host, "cpu" | "gpu", id), (start, end, key), (start, end, key))`` where
    two calls held one core or GPU id at the same simulated time (``[]``: none did).

    >>> p = Placement("n0", (0, 1), (3,))
    >>> double_bookings([Record("a", 0, 5, [p]), Record("b", 5, 9, [p])])
    []
    >>> double_bookings([Record("a", 0, 5, [p]), Record("b", 4, 9, [Placement("n0", (1,))])])
    [(('n0', 'cpu', 1), (0, 5, 'a'), (4, 9, 'b'))]
    """
    held: Dict[Tuple[str, str, int], List[tuple]] = defaultdict(list)
    for key, start, end, placements in _rows(records):
        if end <= start:
            continue  # held for no time
        span = (start, end, key)
        for p in placements:
            host = p[0]
            for c in p[1]:
                held[(host, "cpu", c)].append(span)
            for g in p[2]:
                held[(host, "gpu", g)].append(span)
    clashes = []
    for where, spans in held.items():
        spans.sort()
        last = spans[0]
        for span in spans[1:]:
            if span[0] < last[1]:
                clashes.append((where, last, span))
            if span[1] > last[1]:
                last = span
    return clashes


def _rows(records: Iterable[Any]) -> Iterator[tuple]:
    """Each record as ``(key, start, end, (a placement's fields, ...))`` (see
    :func:`_row`); the backend's own rows (plain tuples) pass as they are."""
    for r in records:
        yield r if type(r) is tuple else _row(r.key, r.start, r.end, r.placements)


def _busy(records: Iterable[Record]) -> List[Tuple[float, int, int]]:
    """``(time, change in busy cores, change in busy GPUs)``, in time order."""
    changes = []
    for _, start, end, placements in _rows(records):
        cpus = gpus = 0
        for p in placements:
            cpus += len(p[1])
            gpus += len(p[2])
        changes.append((start, cpus, gpus))
        changes.append((end, -cpus, -gpus))
    changes.sort()
    return changes


def timeline(records: Iterable[Record], start: float, end: float,
             bins: int = 200) -> List[Tuple[float, float, float]]:
    """Busy cores and GPUs over simulated time: ``(bin start, mean busy cores, mean busy
    GPUs)`` for ``bins`` equal bins from ``start`` to ``end``.

    >>> timeline([Record("a", 0, 5, [Placement("n0", (0, 1), (0,))])], 0, 10, bins=2)
    [(0.0, 2.0, 1.0), (5.0, 0.0, 0.0)]
    """
    if bins < 1 or not end > start:
        raise ValueError(f"timeline needs bins >= 1 and end > start, got bins={bins!r}, "
                         f"start={start!r}, end={end!r}")
    width = (end - start) / bins
    area = [[0.0, 0.0] for _ in range(bins)]
    cpus = gpus = 0
    at, b = start, 0  # the level is spread from `at`, in bin `b`
    for t, dc, dg in _busy(records) + [(end, 0, 0)]:
        t = min(max(t, start), end)
        while at < t:  # spread the level held since `at` over the bins it spans
            edge = end if b == bins - 1 else start + (b + 1) * width
            upto = min(t, edge)
            area[b][0] += cpus * (upto - at)
            area[b][1] += gpus * (upto - at)
            at = upto
            if upto == edge and b < bins - 1:  # the next bin (stepped, not divided
                b += 1                         # for: a quotient rounds down at an edge)
        cpus += dc
        gpus += dg
    return [(start + b * width, c / width, g / width) for b, (c, g) in enumerate(area)]


def utilisation(records: Iterable[Record], inventory: Inventory, start: float,
                end: float) -> Dict[str, float]:
    """The share of core-seconds and GPU-seconds held by calls between ``start`` and
    ``end`` (of the inventory's cores and GPUs), and ``seconds``: ``end - start``."""
    span = end - start
    cores = gpus = 0.0
    for _, began, ended, placements in _rows(records):
        held = min(ended, end) - max(began, start)
        if held > 0:
            for p in placements:
                cores += len(p[1]) * held
                gpus += len(p[2]) * held
    total_cpus, total_gpus = inventory.total_cpus, inventory.total_gpus
    return {"cores": cores / (total_cpus * span) if span > 0 and total_cpus else 0.0,
            "gpus": gpus / (total_gpus * span) if span > 0 and total_gpus else 0.0,
            "seconds": span}
