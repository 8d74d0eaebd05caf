"""Fusion: short nodes that feed one node run inside that node's call.

Each node a scheduler starts costs the driver about 10 us (its record, its dispatch,
its completion), more than a call of a small function costs in a worker. So when a
``compute()`` starts, a node whose calls are known to be short (their measured run
time, :data:`CALL` at most) and whose value only one node reads is *fused* into
that node: the reader's call runs it first, in the same worker, and its value never
leaves that process. Fusing stops where a call would hold more than :data:`BUDGET`
of measured work, so a fused call stays short and the graph keeps its parallelism.

What is fused, and what it changes:

* only function nodes of plain options (one core, no ``timeout``/``retries``/
  placement: ``Options.fusable``), into a reader on the same backend, one that fuses
  (``backend.fuses``: the local and Dask backends), whose upstream nodes are all plain
  positional arguments, and whose function pickles small (by reference, or by value
  in :data:`SENT` bytes at most); never an output of the ``compute()``, never a node
  read by two nodes, never in ``submit()`` (a later submission may read any node),
  never when the call keeps a journal or the session a run log (each needs every
  node's own record);
* a function's first calls in a session are never fused: its run time is not known
  until one has run alone. The measure is refitted from the fused calls' own times,
  so a function that grew slow stops being fused;
* a node takes every input it could take (fusable and read by it alone) into its
  call, or none when they would not all fit in :data:`BUDGET` (what it took would
  run only after the inputs it could not take, not beside them); a call runs
  :data:`SMALLEST` nodes at least;
* a fused node has no record of its own: progress counts it with its reader (done or
  failed with it), it has no start and end of its own, and what it prints is its
  reader's output. Its reader gets a copy of its value (pickled, as if it had been
  sent), and each step gets its own copy of its arguments and of an input other
  steps read too, as a call of its own would. A ``compute()`` in another thread that reads it meanwhile runs it again
  (as it would once this one has ended). If it raises, its reader's node fails with
  its exception, noted
  ``raised by node '<its key>', which ran inside the call of node '<reader>'``, and
  the part of the call that does not read it still runs, as it would have unfused.
  If the worker dies, the whole call runs again (with its nodes that had ended).

``Session(fuse=False)`` turns it off.

>>> import rhapsody_graph as rg
>>> @rg.task
... def add(a, b): return a + b
>>> with rg.Session(backends=[rg.LocalBackend(cpus=2)], progress=False) as s:
...     first = s.compute(add(add(1, 2), add(3, 4)))   # measures add's run time
...     second = s.compute(add(add(1, 2), add(3, 4)))  # one call: three nodes
>>> first, second
((10,), (10,))
"""
from __future__ import annotations

import pickle
from types import CoroutineType
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple

from .errors import add_note
from .graph import FUNCTION, SCALARS, Node, find_nodes

__all__ = ["CALL", "BUDGET", "SENT", "Fused", "Functions", "plan", "steps", "run_fused"]

#: a function whose calls take longer than this (seconds, measured) is never fused
CALL = 50e-6
#: the measured work one fused call may hold (seconds)
BUDGET = 1e-3
#: the least a call counts for, however fast it was measured
FLOOR = 0.5e-6
#: what a fused call spends per step beyond the calls (seconds): unpickling, filling
STEP = 0.3e-6
#: the most bytes a function pickled by value (a script's, a lambda) may take to be
#: fused: a fused call carries its functions each time
SENT = 4096
#: the most functions a worker keeps for fused calls (see _LOADED)
KEPT = 4096
#: the fewest nodes a fused call runs: one of two saves less than making it costs
SMALLEST = 3

# one step of a fused call: (index of its function, its arguments with None where an
# upstream value goes (or those and its keyword arguments pickled on their own, bytes,
# when they are not all scalars: each step gets its own copy, as a call of its own
# would), ((position, source), ...), keyword arguments or None, the node's key); a
# source >= 0 is an earlier step's value, ~source the fused call's input
Step = Tuple[int, Any, Tuple[Tuple[int, int], ...], Any, str]


class Fused:
    """What the scheduler keeps of a fused call: how many nodes it runs, the run time
    their estimates predicted, and its functions with the estimate each had then (to
    refit them)."""

    __slots__ = ("count", "predicted", "functions")

    def __init__(self, count: int, predicted: float,
                 functions: Tuple[Tuple[int, float], ...]) -> None:
        self.count = count
        self.predicted = predicted
        self.functions = functions  # (id of a function it calls, its estimate), ...


class Functions:
    """Functions pickled for the fused calls of one ``compute()`` (as
    :func:`~.backends.wire.dump_callable` sends a call's: by reference where
    importable, a ``@task``'s too, else by value, with the values of its globals as
    they are now). ``get(fn)`` is ``None`` for one that cannot be pickled."""

    def __init__(self) -> None:
        # id(fn) -> (fn, its pickle): fn kept, so that its id stays its own meanwhile
        self.by_id: Dict[int, Tuple[Any, Optional[bytes]]] = {}

    def get(self, fn: Any) -> Optional[bytes]:
        hit = self.by_id.get(id(fn))
        if hit is None:
            from .backends.wire import dump_callable
            try:
                data: Optional[bytes] = dump_callable(fn)
            except Exception:
                data = None
            hit = self.by_id[id(fn)] = (fn, data)
        return hit[1]


def plan(order: Sequence[Node], outputs: Sequence[Any], seconds: Mapping[int, float],
         fusable: Callable[[Node], Any], functions: Functions
         ) -> Tuple[Dict[int, List[Node]], Mapping[Node, Node]]:
    """Which of the new nodes ``order`` (in post-order) run inside another's call.

    Args:
        order: the nodes being submitted, each after its upstream nodes.
        outputs: the nodes asked for (never fused into another).
        seconds: the measured run time of a call, by ``id`` of its function.
        fusable: where a node runs (its backend's lane), or ``None`` when its
            options or backend do not let it be fused (asked once per task options):
            a node is fused only into a reader that runs where it does.
        functions: the pickles of the functions (a big one is not fused).
    Returns:
        ``(calls, fused)``: by ``id`` of each node whose call runs others (a *head*),
        the nodes its call runs, in an order where each comes after those it reads,
        itself last; and the fused nodes (each mapped to the node that reads it). A
        node in neither runs on its own.
    """
    readers: Dict[Any, int] = dict.fromkeys(order, 0)  # new nodes (hash by identity)
    for n in order:
        for d in n.deps:
            r = readers.get(d)
            if r is not None:
                readers[d] = r + 1
    for o in outputs:
        if o in readers:
            readers[o] = 2  # asked for: its value must come back
    allowed: Dict[int, Any] = {}  # where, by id of the options (a task's nodes share its kind)
    timed: Dict[int, Optional[float]] = {}  # by id of the function

    def own(n: Node) -> Optional[float]:
        """What ``n`` counts for in a fused call (its measured run time, at least
        :data:`FLOOR`, and :data:`STEP`), if it may be fused at all."""
        s = timed.get(id(n.fn), -1.0)
        if s == -1.0:
            s = seconds.get(id(n.fn))
            if s is not None:
                data = functions.get(n.fn) if s <= CALL else None
                s = (max(s, FLOOR) + STEP if data is not None and len(data) <= SENT
                     else None)
            timed[id(n.fn)] = s
        if s is None:
            return None
        where = allowed.get(id(n.opts), allowed)
        if where is allowed:
            where = allowed[id(n.opts)] = fusable(n) if n.kind == FUNCTION else None
        return s if where is not None and _positional(n) else None

    cost: Dict[Node, float] = {}  # a fusable reader's: its own and what it has taken
    reader: Dict[Node, Node] = {}  # a fused node's: the node whose call runs it
    for n in order:
        if not n.deps:
            continue  # takes nothing; its reader looks at it
        s = own(n)
        if s is None:
            continue
        mine = s
        took = []
        for d in n.deps:
            if readers.get(d) != 1:
                continue  # read by others too, asked for, or not new: an input
            c = cost.get(d)
            if c is None and (d.deps or (c := own(d)) is None):
                continue
            if allowed[id(d.opts)] is not allowed[id(n.opts)]:
                continue  # runs on another backend
            s += c
            if s > BUDGET:  # all it could take or none: what it took would run only
                took = []   # after the ones it could not, not beside them
                s = mine
                break
            took.append(d)
        for d in took:
            reader[d] = n
        cost[n] = s
    # a node is fused after those it took (they were taken as it was looked at), so
    # from the last taken back, a reader's head is known before what it took
    owner: Dict[Node, Node] = {}
    for d, r in reversed(reader.items()):
        owner[d] = owner.get(r, r)
    members: Dict[int, List[Node]] = {}
    for d in reader:  # in the order they were taken: each after what it took
        h = owner[d]
        nodes = members.get(id(h))
        if nodes is None:
            nodes = members[id(h)] = []
        nodes.append(d)
    for h, nodes in list(members.items()):
        if len(nodes) + 1 < SMALLEST:  # saves less than making its call costs
            del members[h]
            for d in nodes:
                del reader[d]
        else:
            nodes.append(owner[nodes[0]])
    return members, reader


def _positional(n: Node) -> bool:
    """Whether every upstream node of ``n`` is a plain positional argument (and no
    other argument holds one): its step can take the values by position."""
    if not n.deps:
        return True
    distinct: Set[int] = set()
    others = []
    for a in n.args:
        if type(a) is Node:
            distinct.add(id(a))
        elif type(a) not in SCALARS:
            others.append(a)
    if len(distinct) != len(n.deps):
        return False  # a future, or a node inside a container or a keyword
    return not ((others or n.kwargs) and find_nodes((others, n.kwargs)))


def steps(nodes: Sequence[Node], seconds: Mapping[int, float], functions: Functions
          ) -> Tuple[bytes, Tuple[Any, ...], Fused]:
    """The fused call of ``nodes`` (a head's, from :func:`plan`): its pickled
    ``(functions, steps)`` for :func:`run_fused`, its inputs (the upstream nodes
    outside it, in the order the steps first read them), and its :class:`Fused`
    record. Raises what pickling an argument raises."""
    from .backends.wire import dump_value
    out: List[Step] = []
    inputs: List[Any] = []
    index: Dict[int, int] = {}
    predicted = 0.0
    fns: Dict[int, int] = {}  # id(fn) -> its index in codes
    codes: List[Tuple[int, Optional[bytes]]] = []
    estimates: List[Tuple[int, float]] = []
    readers: Dict[int, int] = {}  # steps that read each input
    for node in nodes:
        fid = id(node.fn)
        fi = fns.get(fid)
        estimate = max(seconds.get(fid, FLOOR), FLOOR)
        if fi is None:
            fi = fns[fid] = len(codes)
            codes.append((fid, functions.get(node.fn)))
            estimates.append((fid, estimate))
            predicted += STEP
        args: Any = node.args
        places: Tuple[Tuple[int, int], ...] = ()
        if node.deps:
            template = list(args)
            found = []
            for pos, a in enumerate(args):
                if type(a) is Node:
                    src = index.get(id(a))
                    if src is None:
                        src = index[id(a)] = ~len(inputs)
                        inputs.append(a)
                    found.append((pos, src))
                    template[pos] = None
            args, places = tuple(template), tuple(found)
            for src in {src for _, src in found if src < 0}:
                readers[~src] = readers.get(~src, 0) + 1
        kwargs: Any = node.kwargs or None
        if kwargs is not None or not SCALARS.issuperset(map(type, args)):
            args, kwargs = dump_value((args, kwargs)), None  # a copy of its own
        index[id(node)] = len(out)
        out.append((fi, args, places, kwargs, node.key))
        predicted += estimate + STEP
    shared = tuple(i for i, count in readers.items() if count > 1)
    return (pickle.dumps((tuple(codes), tuple(out), shared), 5), tuple(inputs),
            Fused(len(out), predicted, tuple(estimates)))


#: in a worker: the functions fused calls brought, by the driver's id of each and its
#: pickle, for the run (the worker empties it when the driver says the run ended, as
#: it forgets the functions of its own calls): a function loaded once keeps its state
#: from call to call, and two functions never share one
_LOADED: Dict[Tuple[int, bytes], Any] = {}


def _load(code: Tuple[int, bytes]) -> Any:
    from .backends import wire
    if not any(cache is _LOADED for cache in wire.PER_RUN):
        wire.PER_RUN.append(_LOADED)
    if len(_LOADED) >= KEPT:  # a run that never ends, of ever new functions
        _LOADED.clear()
    fn = _LOADED[code] = wire.load_importing(code[1])
    return fn


class _Skipped:
    """The value of a step that failed, or that reads one that did."""

    __slots__ = ()


_SKIPPED = _Skipped()


def run_fused(pickled: bytes, *inputs: Any) -> Any:
    """In a worker: run the steps of a fused call (see :func:`steps`) in order; return
    the last one's value.

    A step that raises is noted with its node's key; the steps that do not read its
    value still run, then its exception is raised (the first, if several raise).
    """
    from .backends.wire import dump_result
    codes, steps, shared = pickle.loads(pickled)
    fns = [_LOADED[code] if code in _LOADED else _load(code) for code in codes]
    # an input several steps read: each after the first gets a copy of it as it came
    pristine = {i: dump_result(inputs[i]) for i in shared
                if type(inputs[i]) not in SCALARS}
    seen: Set[int] = set()
    values: List[Any] = []
    error: Optional[BaseException] = None
    later: List[str] = []  # the nodes that failed after the first, for its note
    head = steps[-1][4]
    for fi, args, places, kwargs, key in steps:
        if type(args) is bytes:
            args, kwargs = pickle.loads(args)
        if places:
            args = list(args)
            here: Optional[Dict[int, Any]] = None  # this step's copies (f(x, x): one)
            for pos, src in places:
                if src >= 0:
                    args[pos] = values[src]
                elif ~src not in pristine:
                    args[pos] = inputs[~src]
                else:
                    if here is None:
                        here = {}
                    value = here.get(~src, _SKIPPED)
                    if value is _SKIPPED:
                        value = (pickle.loads(pristine[~src]) if ~src in seen
                                 else inputs[~src])
                        here[~src] = value
                        seen.add(~src)
                    args[pos] = value
            if error is not None and any(a is _SKIPPED for a in args):
                values.append(_SKIPPED)
                continue
        try:
            value = fns[fi](*args, **kwargs) if kwargs else fns[fi](*args)
            if type(value) is CoroutineType:
                from .backends.wire import await_coroutine
                value = await_coroutine(value)
            if type(value) not in SCALARS and key != head:  # its reader gets a copy, as
                value = pickle.loads(dump_result(value, "to the node that reads it"))
        except BaseException as exc:  # as a worker reports any exception of a call
            if error is None:
                error = exc
                if key != head:
                    add_note(exc, f"raised by node {key!r}, which ran inside the call of "
                                  f"node {head!r} (fused: see rhapsody_graph.fusion)")
            else:  # as a compute() names the nodes that failed after its first
                later.append(f"{key} ({type(exc).__name__}: {exc})")
            values.append(_SKIPPED)
            continue
        values.append(value)
    if error is not None:
        if later:
            add_note(error, f"{len(later)} other node(s) of the same call failed too: "
                            + "; ".join(later))
        raise error
    return values[-1]
