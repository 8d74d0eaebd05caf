"""The lazy graph: :class:`Node` (one call that has not run) and :class:`Graph`.

A node records a callable, its arguments and the options it runs with. Any node
found in the arguments, at any depth of lists, tuples, dicts, sets and
frozensets, is an edge: the upstream node runs first and its *value* takes its
place. Nodes are immutable once built, so a graph can never hold a cycle.

A :class:`Graph` is the set of nodes its outputs need, gathered in one pass,
and ordered by an iterative depth-first post-order from the outputs: every
node comes after its dependencies, and a branch is finished before the next
one starts. That order is both the iteration order and the scheduler's
priority (lower index runs first), which keeps few intermediate results alive.
It never recurses, so a 10,000-deep chain is fine.

>>> from rhapsody_graph import task
>>> @task
... def inc(x): return x + 1
>>> g = Graph(inc(inc(1)))
>>> len(g), [n.name for n in g]
(2, ['inc', 'inc'])
"""
from __future__ import annotations

import copy
import itertools
import os
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple

__all__ = ["Node", "Graph", "Ref", "ADAPTERS", "adapt", "adapted", "find_nodes", "is_foreign",
           "substitute"]

_CONTAINERS = (list, tuple, dict, set, frozenset)
SCALARS = frozenset((int, float, str, bytes, bool, type(None), complex))  # hold no node
_seq = itertools.count()  # node keys: the name and the node's number, scrambled (_SCRAMBLE)
_SCRAMBLE = 0x9E3779B97F4B  # odd: n -> n * _SCRAMBLE mod 2**48 is one to one
#: lazy objects of other systems that become nodes where a node finds them in its
#: arguments: the attribute that marks their type -> the function that makes the node
#: (the package registers Dask collections, for :mod:`rhapsody_graph.interop.dask`)
ADAPTERS: Dict[str, Callable[[Any], "Node"]] = {}

FUNCTION = "function"
EXECUTABLE = "executable"


class Ref:
    """Stands for a node's value in arguments, like a node: an edge to ``self.node``.

    A :class:`~rhapsody_graph.futures.Future` is one: passed to a task, it is one of
    the new node's ``deps`` (the graph ends there: what the future's node needed has
    run already, or is running), and the new node gets the future's value.
    Subclasses set ``node``.
    """

    __slots__ = ()
    node: "Node"


def find_nodes(objs: Sequence[Any], foreign: Optional[List[Any]] = None) -> Tuple[Any, ...]:
    """Return the distinct nodes and :class:`Ref` s inside ``objs`` (nested containers
    included), in order; append to ``foreign``, if given, the lazy objects of other
    systems found there (:func:`adapt` makes them nodes)."""
    found: Dict[int, Node] = {}
    walked: Set[int] = set()  # containers: one that holds itself is walked once
    stack = list(reversed(objs))
    while stack:
        obj = stack.pop()
        kind = type(obj)
        if kind is Node:
            found.setdefault(id(obj), obj)
        elif isinstance(obj, Ref):
            found.setdefault(id(obj), obj)
        elif kind in _CONTAINERS or isinstance(obj, _CONTAINERS):
            if id(obj) in walked:
                continue
            walked.add(id(obj))
            if isinstance(obj, dict):
                items = list(obj.keys()) + list(obj.values())
            else:
                items = list(obj)
            stack.extend(reversed(items))
        elif foreign is not None and kind not in SCALARS and is_foreign(kind):
            foreign.append(obj)
    return tuple(found.values())


def is_foreign(kind: type) -> bool:
    """Whether objects of type ``kind`` are lazy objects of another system (:data:`ADAPTERS`)."""
    known = _FOREIGN.get(kind)
    if known is None:
        known = _FOREIGN[kind] = any(hasattr(kind, mark) for mark in ADAPTERS)
    return known


_FOREIGN: Dict[type, bool] = {}  # type -> is_foreign(type), as types are few


def adapt(obj: Any) -> Any:
    """``obj`` with every foreign lazy object in it replaced by its node (``obj`` itself
    when it holds none)."""
    kind = type(obj)
    if kind is Node or isinstance(obj, Ref):
        return obj
    for mark, make in ADAPTERS.items():
        if hasattr(kind, mark):
            return make(obj)
    if isinstance(obj, dict):
        items = [(adapt(k), adapt(v)) for k, v in obj.items()]
        if all(a is k and b is v for (a, b), (k, v) in zip(items, obj.items())):
            return obj
        out = copy.copy(obj)
        out.clear()
        out.update(items)
        return out
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = [adapt(o) for o in obj]
        if all(a is o for a, o in zip(items, obj)):
            return obj
        return kind(*items) if hasattr(obj, "_fields") else kind(items)
    return obj


def adapted(objs: tuple) -> Tuple[tuple, Tuple[Any, ...]]:
    """``objs`` with the lazy objects of other systems in it made nodes (:func:`adapt`,
    only when there are some), and the nodes in it (:func:`find_nodes`)."""
    foreign: Optional[List[Any]] = [] if ADAPTERS else None
    nodes = find_nodes(objs, foreign)
    if foreign:  # Dask collections: their tasks become nodes
        objs = adapt(objs)
        nodes = find_nodes(objs)
    return objs, nodes


def substitute(obj: Any, values: Dict[int, Any]) -> Any:
    """Rebuild ``obj`` with every node (or :class:`Ref`) replaced by ``values[id(node)]``."""
    kind = type(obj)
    if kind is Node:
        return values[id(obj)]
    if isinstance(obj, Ref):
        return values[id(obj)]
    if isinstance(obj, dict):
        items = [(substitute(k, values), substitute(v, values)) for k, v in obj.items()]
        if kind is dict:
            return dict(items)
        out = copy.copy(obj)  # keeps a subclass's state (defaultdict's factory, ...)
        out.clear()
        out.update(dict(items))  # a mapping: Counter.update would count a list's pairs
        return out
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = [substitute(o, values) for o in obj]
        return kind(*items) if hasattr(obj, "_fields") else kind(items)
    return obj


class _Released(tuple):
    """The arguments of a node that let its inputs go (see :meth:`Node.without_inputs`)."""

    __slots__ = ()


RELEASED = _Released()


class _Fields:
    """A node's fields (:class:`Node` is this, frozen; :class:`_Open` is this, being built)."""

    __slots__ = ("key", "name", "fn", "args", "kwargs", "deps", "opts", "kind", "__weakref__")


class _Open(_Fields):
    """A node while it is built: its fields are set plainly (``object.__setattr__`` on a
    frozen class costs ten times more), then its class becomes :class:`Node`."""

    __slots__ = ()


class Node(_Fields):
    """One call, not yet run. Build it by calling a task; run it with :meth:`compute`.

    Attributes:
        key: a readable id, unique in this process and the same in every run of the
            same program: the name and 12 hex digits.
        name: the task's name.
        deps: the distinct upstream nodes (and futures) found in the arguments.
        kind: ``"function"`` or ``"executable"``.
    """

    __slots__ = ()

    def __new__(cls, fn: Any, args: tuple, kwargs: dict, opts: Any, kind: str = FUNCTION,
                name: Optional[str] = None) -> "Node":
        self = object.__new__(_Open)  # frozen once built (see __setattr__)
        self.fn = fn
        self.opts = opts
        self.kind = kind
        self.name = name = name or opts.name
        # fast path: plain positional nodes, futures and scalars need no deep walk
        deps: Dict[int, Node] = {}
        deep = False
        for a in args:
            t = type(a)
            if t is Node:
                deps.setdefault(id(a), a)
            elif t in SCALARS:
                continue
            elif isinstance(a, Ref):  # a future: an edge, as a node is
                deps.setdefault(id(a), a)
            elif t in _CONTAINERS or isinstance(a, _CONTAINERS) or is_foreign(t):
                deep = True
                break
        if deep or kwargs:
            (args, kwargs), self.deps = adapted((args, kwargs))
        else:
            self.deps = tuple(deps.values())
        self.args = args
        self.kwargs = kwargs
        self.key = f"{name}-{next(_seq) * _SCRAMBLE & 0xFFFFFFFFFFFF:012x}"
        self.__class__ = Node
        return self

    @classmethod
    def standing_for(cls, node: "Node", fn: Any, args: tuple, deps: Tuple[Any, ...]) -> "Node":
        """A node with ``node``'s key, name, options and kind that calls ``fn(*args)``,
        whose upstream nodes are ``deps`` (given: ``args`` are not walked). The
        scheduler runs it in ``node``'s place (see :mod:`rhapsody_graph.fusion`)."""
        self = object.__new__(_Open)
        self.key, self.name, self.opts, self.kind = node.key, node.name, node.opts, node.kind
        self.fn, self.args, self.kwargs, self.deps = fn, args, {}, deps
        self.__class__ = cls
        return self

    def without_inputs(self) -> "Node":
        """A node with this one's key, name, options, kind and function that holds none
        of its inputs (what a forgotten record keeps: nothing upstream stays alive for
        it). It cannot run: its arguments are gone (:attr:`released`).

        >>> from rhapsody_graph import task
        >>> @task
        ... def inc(x): return x + 1
        >>> n = inc(inc(1))
        >>> bare = n.without_inputs()
        >>> (bare.key, bare.deps, bare.released, n.released) == (n.key, (), True, False)
        True
        """
        return Node.standing_for(self, self.fn, RELEASED, ())

    @property
    def released(self) -> bool:
        """Whether its arguments were let go (:meth:`without_inputs`): it cannot run."""
        return self.args is RELEASED

    def __setattr__(self, name: str, value: Any) -> None:
        """Refused: an edited node could close a cycle or disagree with its key."""
        raise AttributeError(f"node {self.key!r} cannot be changed ({name!r}); build a new "
                             "one instead: call the task again, or task.options(...)(...)")

    def compute(self, **kwargs: Any) -> Any:
        """Run this node and everything it needs; return its value.

        Takes the keyword arguments of :func:`rhapsody_graph.compute`.
        """
        from .api import compute
        return compute(self, **kwargs)[0]

    def __repr__(self) -> str:
        return f"<Node {self.key} ({len(self.deps)} deps)>"

    def __reduce__(self):
        raise TypeError(
            f"node {self.key!r} cannot be pickled: pass it as an argument of another task "
            "(it becomes an edge), as itself or inside a list, tuple, dict, set or frozenset; "
            "inside any other object (a closure, a global, a deque, a dataclass) it is not "
            "found; nor is one put into a list after that list was passed (edges are found "
            "when a node is built: pass a copy, list(xs), of a list you keep adding to); a "
            "task cannot return a node: return plain data, or its value (node.compute() "
            "inside the task)")

    def __bool__(self) -> bool:
        raise TypeError(f"node {self.key!r} has no truth value until it has run: branch on "
                        "its value (node.compute(), or inside a task that takes it)")


class Graph:
    """The nodes that ``outputs`` need, merged once and ordered.

    ``outputs`` are nodes or containers of nodes; :meth:`compute` returns the same
    shape with values in place of nodes (a single output is returned bare).

    >>> from rhapsody_graph import task
    >>> @task
    ... def add(a, b): return a + b
    >>> x = add(1, 2)
    >>> g = Graph(add(x, x), x)
    >>> len(g), g.dependencies(g.outputs[0]) == (x,)
    (2, True)
    """

    def __init__(self, *outputs: Any) -> None:
        if not outputs:
            raise ValueError("Graph() needs at least one output node")
        self.outputs = outputs
        self.roots = find_nodes(outputs)
        for r in self.roots:
            if isinstance(r, Ref):
                raise TypeError(f"Graph() takes nodes, got {r!r}: a future's node was "
                                "submitted already; compute() takes futures, or use "
                                "future.result()")
        self._order, self._index = _post_order(self.roots)
        self._dependents: Optional[List[List[int]]] = None
        self._by_key: Optional[Dict[str, Node]] = None

    def __len__(self) -> int:
        return len(self._order)

    def __iter__(self) -> Iterator[Node]:
        return iter(self._order)

    def __contains__(self, node: object) -> bool:
        return node in self._index

    def __getitem__(self, key: str) -> Node:
        if self._by_key is None:
            self._by_key = {n.key: n for n in self._order}
        return self._by_key[key]

    @property
    def nodes(self) -> List[Node]:
        """All nodes in execution order (dependencies first)."""
        return self._order

    def index(self, node: Node) -> int:
        """The node's position in the order (its scheduling priority)."""
        return self._index[node]

    def dependencies(self, node: Node) -> Tuple[Node, ...]:
        """The nodes ``node`` reads from."""
        self._check(node)
        return node.deps

    def dependents(self, node: Node) -> Tuple[Node, ...]:
        """The nodes of this graph that read from ``node``."""
        self._check(node)
        if self._dependents is None:
            out: List[List[int]] = [[] for _ in self._order]
            index = self._index
            for i, n in enumerate(self._order):
                for d in n.deps:
                    if type(d) is Node:
                        out[index[d]].append(i)
            self._dependents = out
        return tuple(self._order[i] for i in self._dependents[self._index[node]])

    def _check(self, node: Node) -> None:
        if node not in self._index:
            raise KeyError(f"{node!r} is not in this graph")

    def compute(self, **kwargs: Any) -> Any:
        """Run the graph; return the outputs' values (one output: its value alone).

        Takes the keyword arguments of :func:`rhapsody_graph.compute`.
        """
        from .api import compute
        values = compute(*self.outputs, **kwargs)
        return values[0] if len(values) == 1 else values

    def visualize(self, path: "str | os.PathLike[str]", max_boxes: int = 200) -> str:
        """Draw the graph with Graphviz into ``path`` (``.svg``, ``.png``, ``.pdf``, or
        ``.dot`` for the source); return the path. Like nodes are drawn as one box with
        a count (see :mod:`rhapsody_graph.drawing`). Needs ``pip install
        "rhapsody-graph[viz]"`` and Graphviz's ``dot`` (a clear error says so)."""
        from .drawing import visualize
        return visualize(self, path, max_boxes)

    def to_mermaid(self, max_boxes: int = 200) -> str:
        """The graph as a Mermaid ``flowchart`` for Markdown, boxes as in :meth:`visualize`."""
        from .drawing import to_mermaid
        return to_mermaid(self, max_boxes)

    def __repr__(self) -> str:
        return f"<Graph {len(self)} nodes, {len(self.outputs)} outputs>"


def _post_order(roots: Sequence[Node]) -> Tuple[List[Node], Dict[Node, int]]:
    """Iterative DFS post-order over ``roots`` and everything they depend on."""
    order: List[Node] = []
    index: Dict[Node, int] = {}
    for root in roots:
        if root in index:
            continue
        stack = [(root, iter(root.deps))]
        on_stack = {root}
        while stack:
            node, deps = stack[-1]
            for d in deps:
                if type(d) is Node and d not in index and d not in on_stack:
                    on_stack.add(d)
                    stack.append((d, iter(d.deps)))
                    break
            else:
                stack.pop()
                index[node] = len(order)
                order.append(node)
    return order, index
