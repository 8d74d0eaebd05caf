"""Fusion: short nodes that feed one node run inside that node's call.

Each node a scheduler starts costs the driver about 10 us (its record, its dispatch,
its completion), more than a call of a small function costs in a worker. So when a
graph is submitted, a node whose calls are known to be short (their measured run
time, :data:`CALL` at most) and whose value only one node reads is *fused* into
that node: the reader's call runs it first, in the same worker, and its value never
leaves that process. Fusing stops where a call would hold more than :data:`BUDGET`
of measured work, so a fused call stays short and the graph keeps its parallelism.

What is fused, and what it changes:

* only nodes of plain options (one core, no ``timeout``/``retries``/``backend``/
  placement: ``Options.fusable``), function nodes on a backend that fuses
  (``backend.fuses``: the local backend), and whose upstream nodes are all plain
  positional arguments; never an output of the ``compute()`` or ``submit()``, never a
  node read by two nodes; never when the call keeps a journal or the session a run
  log (each needs every node's own record);
* a function's first calls in a session are never fused: its run time is not known
  until one has run alone;
* a fused node has no record of its own: progress counts it, but it has no start
  and end of its own, and its value never leaves the worker (so it need not be
  picklable). If it raises, the fused call's node fails with its exception, noted
  ``raised by node '<its key>'``; the rest of the fused call that does not depend on
  it still runs, as it would have unfused.

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

from types import CoroutineType
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple

from .errors import add_note
from .graph import FUNCTION, SCALARS, Node, find_nodes

__all__ = ["CALL", "BUDGET", "Fused", "plan", "steps", "run_fused"]

#: a function whose calls take longer than this (seconds, measured) is never fused
CALL = 50e-6
#: the measured work one fused call may hold (seconds)
BUDGET = 1e-3
#: the least a call counts for, however fast it was measured
FLOOR = 0.5e-6
#: inputs that no longer fit after which a reader stops looking at the rest
MISSES = 8

# one step of a fused call: (function, arguments with None where an upstream value
# goes, ((position, source), ...), keyword arguments or None, the node's key); a
# source >= 0 is an earlier step's value, ~source the fused call's input
Step = Tuple[Any, tuple, Tuple[Tuple[int, int], ...], Optional[dict], str]


class Fused:
    """What the scheduler keeps of a fused call: how many nodes it runs, the run time
    their estimates predicted, and their functions (to refit those estimates)."""

    __slots__ = ("count", "predicted", "functions")

    def __init__(self, count: int, predicted: float, functions: Tuple[int, ...]) -> None:
        self.count = count
        self.predicted = predicted
        self.functions = functions  # ids of the functions it calls


def plan(order: Sequence[Node], outputs: Sequence[Any], seconds: Mapping[int, float],
         fusable: Callable[[Node], bool]) -> Dict[int, List[Node]]:
    """Which of the new nodes ``order`` (in post-order) run inside another's call.

    Args:
        order: the nodes being submitted, each after its upstream nodes.
        outputs: the nodes asked for (never fused into another).
        seconds: the measured run time of a call, by ``id`` of its function.
        fusable: whether a node's options and backend allow fusing it (asked once
            per task options).
    Returns:
        by ``id`` of each node whose call runs others (a *head*): the nodes its call
        runs, in post-order, itself last. A node in none of them runs on its own.
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
    allowed: Dict[int, bool] = {}  # by id of the options

    def own(n: Node) -> Optional[float]:
        """The measured run time ``n`` counts for, if it may be fused at all."""
        s = seconds.get(id(n.fn))
        if s is None or s > CALL or n.kind != FUNCTION:
            return None
        ok = allowed.get(id(n.opts))
        if ok is None:
            ok = allowed[id(n.opts)] = fusable(n)
        return max(s, FLOOR) if ok and _positional(n) else None

    cost: Dict[Node, float] = {}  # a reader's: its own and what it has taken
    reader: Dict[Node, Node] = {}  # a fused node's: the node whose call runs it
    for n in order:
        if not n.deps:
            continue  # takes nothing; its reader looks at it
        s = own(n)
        if s is None:
            continue
        misses = 0
        for d in n.deps:
            if readers.get(d) != 1:
                continue
            c = cost.get(d)
            if c is None and (d.deps or (c := own(d)) is None):
                continue
            if s + c <= BUDGET:
                s += c
                reader[d] = n
            else:
                misses += 1
                if misses > MISSES:
                    break  # (nearly) full: a join's other inputs run on their own
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
    for nodes in members.values():
        nodes.append(owner[nodes[0]])
    return members


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


def steps(nodes: Sequence[Node], seconds: Mapping[int, float]
          ) -> Tuple[Tuple[Step, ...], Tuple[Any, ...], Fused]:
    """The fused call of ``nodes`` (a head's, from :func:`plan`): its steps, its
    inputs (the upstream nodes outside it, in the order the steps first read them),
    and its :class:`Fused` record."""
    out: List[Step] = []
    inputs: List[Any] = []
    index: Dict[int, int] = {}
    predicted = 0.0
    functions: Dict[int, None] = {}
    for node in nodes:
        args = node.args
        if node.deps:
            template = list(args)
            places = []
            for pos, a in enumerate(args):
                if type(a) is Node:
                    src = index.get(id(a))
                    if src is None:
                        src = index[id(a)] = ~len(inputs)
                        inputs.append(a)
                    places.append((pos, src))
                    template[pos] = None
            args = tuple(template)
            step = (node.fn, args, tuple(places), node.kwargs or None, node.key)
        else:
            step = (node.fn, args, (), node.kwargs or None, node.key)
        index[id(node)] = len(out)
        out.append(step)
        fid = id(node.fn)
        predicted += max(seconds.get(fid, FLOOR), FLOOR)
        functions[fid] = None
    return tuple(out), tuple(inputs), Fused(len(out), predicted, tuple(functions))


class _Skipped:
    """The value of a step that failed, or that reads one that did."""

    __slots__ = ()


_SKIPPED = _Skipped()


def run_fused(pickled: bytes, *inputs: Any) -> Any:
    """In a worker: run the steps of a fused call (pickled: see :func:`steps`) in
    order; return the last one's value.

    A step that raises is noted with its node's key; the steps that do not read its
    value still run, then its exception is raised (the first, if several raise).
    """
    from .backends.wire import load_importing
    steps: Sequence[Step] = load_importing(pickled)
    values: List[Any] = []
    error: Optional[BaseException] = None
    for fn, args, places, kwargs, key in steps:
        if places:
            args = list(args)
            for pos, src in places:
                args[pos] = values[src] if src >= 0 else inputs[~src]
            if error is not None and any(a is _SKIPPED for a in args):
                values.append(_SKIPPED)
                continue
        try:
            value = fn(*args, **kwargs) if kwargs else fn(*args)
            if type(value) is CoroutineType:
                from .backends.wire import await_coroutine
                value = await_coroutine(value)
        except Exception as exc:
            if error is None:
                error = add_note(exc, f"raised by node {key!r}, which ran inside the call "
                                      f"of node {steps[-1][4]!r} (fused: see "
                                      "rhapsody_graph.fusion)")
            values.append(_SKIPPED)
            continue
        values.append(value)
    if error is not None:
        raise error
    return values[-1]
