"""The scheduler: one loop, the whole policy.

State of a run, per node index ``i`` (the graph's post-order, which is also the
priority: lower runs first, so a branch finishes before the next one starts):

* ``deps[i]`` / ``dependents[i]``: edges as index lists;
* ``waiting[i]``: upstream nodes not yet done; falls to 0, then ``i`` is pushed on
  the ``ready`` heap;
* ``state[i]``: ``PENDING`` → ``READY`` → ``RUNNING`` → ``DONE`` (or back to
  ``READY`` for a retry or a dropped call), or ``FAILED`` / ``SKIPPED`` (an upstream
  failed);
* ``results[i]``: the value's bytes, kept while a dependent still needs them
  (``remaining[i]`` counts those) or ``i`` is an output, then released;
* ``inflight``: tid → attempt (node, lease or placements); ``deadlines``: a heap of
  (time, tid) for nodes with a ``timeout``.

One loop: ``dispatch`` admits ready nodes against the :class:`~.resources.Ledger`
and submits them; ``backend.wait(next deadline)`` blocks until something finishes;
``complete`` records each completion and wakes dependents. Nothing polls or sleeps.

Admission: a Python node with one rank runs under a :class:`~.backends.base.Lease`
(a placement held by one worker). Tiny nodes with the same request share a lease:
up to ``depth`` of them are queued on one worker, ``depth`` sized so a lease holds
about 2 ms of work by the function's measured run time (1 until it is measured);
nodes with GPUs, a timeout, or a process of their own (a raw ``policy=`` or template
arguments) get a lease of their own. So the priority order holds
exactly for nodes that take 2 ms or more, and within 2 ms of queued work for tinier
ones, where batching is what makes them cheap. Executables and multi-rank nodes get one
placement per rank from the ledger; an AI node's inference service is admitted by
the backend (``backend.admit``) from the same ledger when its first node is ready.
A node whose request does not fit now waits; when nothing runs and a ready node still
waits, idle services give back what they hold (``backend.release_idle``). A node that
can never fit is refused before anything runs.

Failure: a node that raises is retried up to ``retries`` times on a fresh placement;
then its dependents are skipped and, with ``fail_fast`` (the default), nothing
new starts while running nodes finish. ``compute()`` then raises the first error,
with its remote traceback. Any exception that ends the loop (Ctrl-C included) kills
every process of the backend before it propagates.
"""
from __future__ import annotations

import heapq
import itertools
import time
from typing import Any, Dict, List, Optional, Tuple

from .backends.base import DROPPED, OK, Call, Lease
from .errors import NodeTimeoutError, add_note
from .graph import Graph, substitute
from .resources import Ledger

__all__ = ["compute", "run", "get_backend"]

PENDING, READY, RUNNING, DONE, FAILED, SKIPPED = range(6)
LEASE_BUDGET = 0.002  # seconds of queued work a shared lease may hold
MAX_DEPTH = 64
UNKNOWN_DEPTH = 1  # before a function's run time has been measured: strict priority

_tids = itertools.count(1)
_default_backends: Dict[str, Any] = {}  # by name, made on first use


def get_backend(backend: Any = None) -> Any:
    """The backend to run on: an instance, ``"local"``, ``"dragon"``, or ``None`` (local)."""
    name = "local" if backend is None else backend
    if not isinstance(name, str):
        return backend
    if name not in ("local", "dragon"):
        raise ValueError(f"backend {backend!r} is not available in this build; "
                         "use 'local' or 'dragon', or pass a backend instance")
    if name not in _default_backends:
        if name == "dragon":
            from .backends.dragon import DragonBackend
            _default_backends[name] = DragonBackend()
        else:
            from .backends.local import LocalBackend
            _default_backends[name] = LocalBackend()
    return _default_backends[name]


def compute(*outputs: Any, backend: Any = None, fail_fast: bool = True) -> Tuple[Any, ...]:
    """Run everything ``outputs`` need, once; return their values as a tuple.

    Args:
        outputs: nodes, or containers of nodes (returned with values in place).
        backend: where to run (default: the embedded :class:`LocalBackend`).
        fail_fast: on the first failure start nothing new (running nodes finish);
            ``False`` runs every node that does not depend on a failure first.
    Returns:
        one value per output.
    Raises:
        the first failing node's own exception, with its remote traceback as
        ``__cause__``; ``ValueError``/``TypeError`` for bad input, before anything runs.

    >>> from rhapsody_graph import task
    >>> @task
    ... def inc(x): return x + 1
    >>> compute(inc(1), [inc(2), inc(3)])
    (2, [3, 4])
    """
    return run(Graph(*outputs), backend=backend, fail_fast=fail_fast)


def run(graph: Graph, backend: Any = None, fail_fast: bool = True) -> Tuple[Any, ...]:
    """Run a :class:`Graph`; return one value per output (see :func:`compute`)."""
    b = get_backend(backend)
    r = _Run(graph, b, fail_fast)
    try:
        r.loop()
        r.raise_first_error()
        values = {id(n): b.decode(r.results[graph.index(n)]) for n in graph.roots}
    except BaseException:
        b.abort()
        raise
    finally:
        b.end_run()
    return tuple(substitute(o, values) for o in graph.outputs)


class _Attempt:
    __slots__ = ("index", "lease", "placements")

    def __init__(self, index: int, lease: Optional[Lease], placements: List[Any]) -> None:
        self.index, self.lease, self.placements = index, lease, placements


class _Run:
    def __init__(self, graph: Graph, backend: Any, fail_fast: bool) -> None:
        self.graph, self.backend, self.fail_fast = graph, backend, fail_fast
        nodes = self.nodes = graph.nodes
        n = len(nodes)
        index = {node: i for i, node in enumerate(nodes)}
        self.deps = [[index[d] for d in node.deps] for node in nodes]
        self.dependents: List[List[int]] = [[] for _ in range(n)]
        for i, ds in enumerate(self.deps):
            for d in ds:
                self.dependents[d].append(i)
        self.waiting = [len(ds) for ds in self.deps]
        self.remaining = [len(ds) for ds in self.dependents]
        self.state = bytearray(n)
        self.results: List[Any] = [None] * n
        self.attempts = [0] * n
        self.is_output = bytearray(n)
        for root in graph.roots:
            self.is_output[index[root]] = 1
        self.ledger: Ledger = backend.ledger
        self.prepared = self.validate()
        self.leased = [backend.uses_lease(node) for node in nodes]
        # ready heaps: pool nodes (under leases) and nodes on their own processes
        self.ready: List[int] = []
        self.ready_own: List[int] = []
        for i in range(n):
            if not self.waiting[i]:
                self.push(i)
        self.inflight: Dict[int, _Attempt] = {}
        self.deadlines: List[Tuple[float, int]] = []
        self.open_leases: Dict[tuple, List[Lease]] = {}  # shared leases by request
        self.drained: List[Lease] = []  # shared leases with nothing queued
        self.seconds: Dict[int, float] = {}  # id(fn) -> moving average of run time
        self.slots = max(1, backend.slots_free())
        self.errors: List[Tuple[int, BaseException]] = []
        self.stopping = False

    # -- before anything runs ---------------------------------------------------------

    def validate(self) -> List[Any]:
        """Refuse bad input before anything runs: backend, resources, picklability."""
        b, inventory = self.backend, self.backend.inventory
        checked = set()
        prepared = []
        for node in self.nodes:
            opts = node.opts
            if opts.backend is not None and opts.backend != b.name:
                raise ValueError(f"node {node.key!r} asks for backend {opts.backend!r}, but "
                                 f"compute() runs on {b.name!r}; pass backend=... or drop the option")
            res = opts.resources
            if res.key not in checked:
                inventory.check(res, f"node {node.key!r}")
                checked.add(res.key)
            prepared.append(b.prepare(node))
        return prepared

    # -- the loop -------------------------------------------------------------------------

    def loop(self) -> None:
        b = self.backend
        while True:
            if self.stopping:
                self.end_drained()
            else:
                self.dispatch()
            if not self.inflight:
                if self.ready_own and not self.stopping and b.release_idle():
                    continue  # an idle inference service held what a ready node needs
                if (self.ready or self.ready_own) and not self.stopping:
                    raise RuntimeError("scheduler stalled with ready nodes and nothing "
                                       "running; please report this")
                return
            timeout = None
            if self.deadlines:
                timeout = max(0.0, self.deadlines[0][0] - time.monotonic())
            for tid, status, payload, seconds in b.wait(timeout):
                self.complete(tid, status, payload, seconds)
            if self.deadlines:
                self.expire()

    def push(self, i: int) -> None:
        self.state[i] = READY
        heapq.heappush(self.ready if self.leased[i] else self.ready_own, i)

    def dispatch(self) -> None:
        while True:
            if self.ready_own:
                # their placements (and an AI node's service) come fresh from the ledger:
                # drained leases must not hold cores against them
                self.end_drained()
                self.dispatch_own()
            if self.ready:
                self.dispatch_leased()
            # drained leases stay open through one pass, so a chain reuses its worker;
            # the ones not reused are ended, and what they held may admit more nodes
            if not (self.end_drained() and (self.ready or self.ready_own)):
                break
        self.backend.flush()

    def end_drained(self) -> bool:
        """End the shared leases left with nothing queued; True if any was ended."""
        ended = [lease for lease in self.drained if not lease.outstanding]
        self.drained.clear()
        for lease in ended:
            self.end_lease(lease)
        return bool(ended)

    def dispatch_own(self) -> None:
        """Executables, multi-rank and AI nodes: one placement per rank, if they fit now
        (and, for an AI node, its inference service: see ``backend.admit``)."""
        ready, blocked, deferred = self.ready_own, set(), []
        while ready:
            i = heapq.heappop(ready)
            res = self.nodes[i].opts.resources
            if not self.backend.admit(self.nodes[i], self.prepared[i]):
                deferred.append(i)  # its service does not fit now
                continue
            placements = None if res.key in blocked else self.ledger.allocate_ranks(res)
            if placements is None:
                blocked.add(res.key)
                deferred.append(i)
            else:
                self.submit(i, None, placements)
        for i in deferred:
            heapq.heappush(ready, i)

    def dispatch_leased(self) -> None:
        """Pool nodes: top up shared leases, or open a lease on a free slot."""
        ready, b = self.ready, self.backend
        blocked: set = set()
        deferred: List[int] = []
        filling: set = set()
        while ready and len(deferred) < 32:
            i = heapq.heappop(ready)
            node = self.nodes[i]
            opts = node.opts
            res = opts.resources
            exclusive = res.gpus > 0 or opts.timeout is not None or opts.custom_process
            key = (res.key, exclusive)
            lease = None if exclusive else self.lease_with_room(key, i, filling)
            if lease is None:
                placement = None
                if key not in blocked and b.slots_free() > 0:
                    placement = self.ledger.allocate(res)
                if placement is None:
                    blocked.add(key)
                    deferred.append(i)
                    if b.slots_free() <= 0 and not self.any_lease_room(filling):
                        break
                    continue
                if exclusive:
                    lease = Lease(placement, 1)
                else:
                    lease = Lease(placement, self.depth(i), key)
                    self.open_leases.setdefault(key, []).append(lease)
            filling.add(lease)
            lease.outstanding += 1
            self.submit(i, lease, [lease.placement])
        for i in deferred:
            heapq.heappush(ready, i)

    def lease_with_room(self, key: tuple, i: int, filling: set) -> Optional[Lease]:
        """An open shared lease that may queue node ``i`` next, if any."""
        leases = self.open_leases.get(key)
        if not leases:
            return None
        depth = self.depth(i)
        for lease in sorted(leases, key=lambda l: l.outstanding) if len(leases) > 1 else leases:
            lease.depth = depth
            if lease.outstanding < depth and (lease in filling or lease.outstanding <= depth // 2):
                return lease
        return None

    def any_lease_room(self, filling: set) -> bool:
        return any(l.outstanding < l.depth and (l in filling or l.outstanding <= l.depth // 2)
                   for leases in self.open_leases.values() for l in leases)

    def depth(self, i: int) -> int:
        """How many calls one shared lease may queue: ~2 ms of work, spread over slots."""
        seconds = self.seconds.get(id(self.nodes[i].fn))
        by_time = UNKNOWN_DEPTH if seconds is None else int(LEASE_BUDGET / max(seconds, 1e-6))
        by_spread = 1 + len(self.ready) // self.slots
        return max(1, min(MAX_DEPTH, by_time, by_spread))

    def submit(self, i: int, lease: Optional[Lease], placements: List[Any]) -> None:
        tid = next(_tids)
        node = self.nodes[i]
        self.state[i] = RUNNING
        self.inflight[tid] = _Attempt(i, lease, placements)
        inputs = [self.results[d] for d in self.deps[i]]
        self.backend.submit(Call(tid, node, self.prepared[i], inputs, placements, lease))
        if node.opts.timeout is not None:
            heapq.heappush(self.deadlines, (time.monotonic() + node.opts.timeout, tid))

    # -- completions ----------------------------------------------------------------------

    def complete(self, tid: int, status: str, payload: Any, seconds: float) -> None:
        attempt = self.inflight.pop(tid, None)
        if attempt is None:
            return  # a call already failed by its deadline
        self.release(attempt)
        i = attempt.index
        if status == OK:
            self.done(i, payload, seconds)
        elif status == DROPPED:
            self.push(i)
        else:
            self.fail(i, payload)

    def release(self, attempt: _Attempt) -> None:
        lease = attempt.lease
        if lease is None:
            for p in attempt.placements:
                self.ledger.release(p)
            return
        lease.outstanding -= 1
        if lease.outstanding == 0:
            if lease.executor is not None and lease.key is not None:
                self.drained.append(lease)  # shared: ended after the next dispatch unless reused
            else:
                self.end_lease(lease)

    def end_lease(self, lease: Lease) -> None:
        self.ledger.release(lease.placement)
        self.backend.end_lease(lease)
        if lease.key is not None:
            self.open_leases[lease.key].remove(lease)

    def done(self, i: int, payload: bytes, seconds: float) -> None:
        self.state[i] = DONE
        self.results[i] = payload
        fid = id(self.nodes[i].fn)
        last = self.seconds.get(fid)
        self.seconds[fid] = seconds if last is None else 0.8 * last + 0.2 * seconds
        remaining, results, is_output = self.remaining, self.results, self.is_output
        for d in self.deps[i]:
            remaining[d] -= 1
            if not remaining[d] and not is_output[d]:
                results[d] = None
        waiting, state = self.waiting, self.state
        for j in self.dependents[i]:
            waiting[j] -= 1
            if not waiting[j] and state[j] == PENDING:
                self.push(j)

    def fail(self, i: int, exc: BaseException) -> None:
        node = self.nodes[i]
        self.attempts[i] += 1
        if self.attempts[i] <= node.opts.retries and not self.stopping:
            self.push(i)
            return
        if node.opts.retries:
            add_note(exc, f"node {node.key!r} failed {self.attempts[i]} times "
                          f"(retries={node.opts.retries})")
        self.state[i] = FAILED
        self.errors.append((i, exc))
        skipped = self.skip_dependents(i)
        if skipped:
            add_note(exc, f"{skipped} node(s) depending on {node.key!r} did not run")
        if self.fail_fast and not self.stopping:
            self.stopping = True
            self.backend.drop_queued()

    def skip_dependents(self, i: int) -> int:
        """Mark everything downstream of ``i`` as not to run; return how many."""
        skipped = 0
        stack = list(self.dependents[i])
        while stack:
            j = stack.pop()
            if self.state[j] in (PENDING, READY):
                self.state[j] = SKIPPED
                skipped += 1
                stack.extend(self.dependents[j])
        for ready in (self.ready, self.ready_own):
            ready[:] = [j for j in ready if self.state[j] == READY]
            heapq.heapify(ready)
        return skipped

    def expire(self) -> None:
        now = time.monotonic()
        while self.deadlines and self.deadlines[0][0] <= now:
            _, tid = heapq.heappop(self.deadlines)
            attempt = self.inflight.pop(tid, None)
            if attempt is None:
                continue
            node = self.nodes[attempt.index]
            self.backend.kill(tid)
            self.release(attempt)
            self.fail(attempt.index, NodeTimeoutError.of(node.key, node.opts.timeout))

    def raise_first_error(self) -> None:
        if not self.errors:
            return
        i, exc = self.errors[0]
        node = self.nodes[i]
        if len(self.errors) > 1:
            others = ", ".join(self.nodes[j].key for j, _ in self.errors[1:6])
            add_note(exc, f"{len(self.errors) - 1} other node(s) failed too: {others}")
        unfinished = [n for n in self.graph.roots
                      if self.state[self.graph.index(n)] != DONE and n is not node]
        if unfinished and isinstance(exc, Exception):
            add_note(exc, "outputs not computed: " + ", ".join(n.key for n in unfinished[:5]))
        raise exc
