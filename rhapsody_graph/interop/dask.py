"""Dask collections on rhapsody_graph: :func:`get` is a Dask scheduler.

``dask.compute(x, scheduler=rhapsody.get)`` (or ``dask.config.set(scheduler=rhapsody.get)``)
runs Dask's graph on a rhapsody_graph session: every Dask task becomes one
:class:`~rhapsody_graph.Node` whose edges are the task's dependencies, so the
session's scheduler orders, places and runs it like any node (on the default
session's :class:`~rhapsody_graph.LocalBackend` unless told otherwise). Aliases and
literals (``Alias``, ``DataNode``) become no node at all: they stand for the node or
value they name. The graph is taken as the installed Dask hands it over: a mapping
of keys to ``dask._task_spec`` nodes (dask 2024.12 and later), a legacy dict of
tuples, or a collection (``__dask_graph__``), which ``convert_legacy_graph`` brings to
one form, as ``dask.local.get_async`` does. Values come back nested like ``keys``
(lists become tuples), and a failing task raises its own exception with its remote
traceback, as Dask's schedulers do.

The other way round, a ``dask.delayed`` object or a Dask collection passed to a
rhapsody_graph node is an edge like a node (:func:`as_node`): its tasks join the graph.

>>> import dask
>>> import rhapsody_graph as rhapsody
>>> total = dask.delayed(sum)([dask.delayed(abs)(-i) for i in range(4)])
>>> dask.compute(total, scheduler=rhapsody.get)
(6,)
"""
from __future__ import annotations

import threading
import weakref
from collections.abc import Mapping, MutableMapping
from typing import Any, Dict, List, Optional

from ..errors import brief
from ..graph import Node
from ..task import task

__all__ = ["get", "as_node"]

_lock = threading.Lock()
_pools: Dict[int, Any] = {}  # num_workers -> the LocalBackend that get() runs on


def _run(graph_node: Any, data: Dict[Any, Any]) -> Any:
    """One Dask task, given its dependencies' values by key."""
    return graph_node(data)


_OPTIONS = task(_run).opts


def get(dsk: Any, keys: Any, *, num_workers: Optional[int] = None, session: Any = None,
        backend: Any = None, **kwargs: Any) -> Any:
    """Run the Dask graph ``dsk`` on rhapsody_graph; return the values of ``keys``.

    Args:
        dsk: a Dask graph (mapping of keys to tasks) or a Dask collection.
        keys: a key, or a (nested) list of keys; the result has the same nesting,
            lists as tuples.
        num_workers: worker processes of a :class:`~rhapsody_graph.LocalBackend`
            kept for this count (default: the current or default session).
        session: run on this session instead (as :func:`rhapsody_graph.compute` takes it).
        backend: run on this backend instead (likewise).
        kwargs: other Dask scheduler options (``cache``, callbacks...) are accepted and
            not used.
    Raises:
        Exception: the first failing task's own exception.
        ImportError: without dask.
    """
    from ..api import compute
    if backend is None and session is None and num_workers is not None:
        backend = _pool(num_workers)
    (values,) = compute(_Nodes(dsk).nested(keys), backend=backend, session=session)
    return _tuples(values, keys)


def as_node(collection: Any) -> Node:
    """A Dask collection or ``dask.delayed`` object as a rhapsody_graph node: its tasks
    become nodes, and the returned node's value is what ``collection.compute()`` gives.
    Nodes find these anywhere in their arguments (see :data:`rhapsody_graph.graph.ADAPTERS`).

    A Dask task is one node however many collections hold it, while any node needs it
    (Dask keys name values: ``x`` passed twice, or ``x + 1`` and ``x * 2`` passed
    together, run ``x``'s tasks once); a key named again for another task is another
    node."""
    from dask.delayed import single_key
    finalize, extra = collection.__dask_postcompute__()
    keys = collection.__dask_keys__()
    parts = _Nodes(collection, _SHARED).nested(keys)
    if finalize is single_key and not extra and isinstance(parts[0], Node):
        return parts[0]  # a delayed call: its value is its one task's
    return Node(_finalize, (finalize, parts, extra), {}, _FINALIZE, name=_name(_first(keys)))


def _finalize(finalize: Any, parts: Any, extra: tuple) -> Any:
    """A collection's value from its keys' values, as Dask's ``compute`` makes it."""
    return finalize(parts, *extra)


_FINALIZE = task(_finalize).opts


#: Dask key -> the node made for its task, while a node needs it (see :func:`as_node`)
_SHARED: "weakref.WeakValueDictionary[Any, Node]" = weakref.WeakValueDictionary()


class _Nodes:
    """A Dask graph's tasks as nodes, made on demand (dependencies first); with
    ``shared``, a task already made for a key there is that node."""

    def __init__(self, dsk: Any, shared: Optional[MutableMapping[Any, Node]] = None) -> None:
        self.shared = shared
        try:
            from dask._task_spec import Alias, DataNode, convert_legacy_graph
        except ImportError as exc:  # pragma: no cover - the dask extra is missing
            raise ImportError('Dask interop needs Dask: pip install "rhapsody-graph[dask]"') \
                from exc
        self.alias, self.data = Alias, DataNode
        self.graph = convert_legacy_graph(_graph(dsk))
        self.made: Dict[Any, Any] = {}  # key -> its Node, or the literal value it stands for

    def nested(self, keys: Any) -> Any:
        """The nodes (or literals) of ``keys``, nested as they are."""
        if isinstance(keys, list):
            return [self.nested(k) for k in keys]
        self.build(keys)
        return self.made[keys]

    def build(self, root: Any) -> None:
        """Make ``root``'s node and those it needs. Raise ``ValueError`` for a key the
        graph lacks (a result held on a ``distributed`` cluster) or a cycle."""
        made, graph = self.made, self.graph
        stack: List[Any] = [root]
        walking: set = set()  # keys whose dependencies are being made: on the stack
        needed_by: Dict[Any, Any] = {}  # key -> the first key found to need it
        while stack:
            key = stack[-1]
            if key in made:
                stack.pop()
                continue
            item = graph.get(key)
            if item is None:
                needed = f" (needed by {needed_by[key]!r})" if key in needed_by else ""
                raise ValueError(
                    f"Dask key {key!r}{needed} is not in the graph: a result held on a "
                    "distributed cluster (a persisted collection, a Client future) cannot "
                    "be read here; compute it on that Client, or run on a DaskBackend")
            missing = [d for d in item.dependencies if d not in made]
            if missing:
                if key in walking:
                    raise ValueError(f"the Dask graph has a cycle through key {key!r}")
                walking.add(key)
                for d in missing:
                    needed_by.setdefault(d, key)
                stack.extend(missing)
                continue
            stack.pop()
            walking.discard(key)
            if isinstance(item, self.data):
                made[key] = item.value
            elif isinstance(item, self.alias):
                made[key] = made[item.target]
            elif self.shared is None:
                made[key] = self._node(key, item)
            else:
                with _lock:  # built by one thread at a time: one node per key
                    node = self.shared.get(key)
                    if node is None or not _same(node.args[0], item):  # (a key named
                        node = self.shared[key] = self._node(key, item)  # again: another)
                made[key] = node

    def _node(self, key: Any, item: Any) -> Node:
        """Task ``item`` as a node, its dependencies' nodes (or values) made already."""
        made = self.made
        deps = sorted(item.dependencies, key=str)  # (a set: one order whatever the hash seed)
        return Node(_run, (item, {d: made[d] for d in deps}), {}, _OPTIONS,
                    name=_name(key))


def _same(a: Any, b: Any) -> bool:
    """Whether Dask tasks ``a`` and ``b`` are one (their function and arguments equal;
    arguments that cannot say so, arrays, count as different)."""
    try:
        return bool(a == b)
    except Exception:
        return False


def _graph(dsk: Any) -> Mapping:
    """The tasks of what Dask hands a scheduler: a mapping, a collection, or (dask 2025
    and later) an expression of graph groups, each optimized as Dask's own schedulers
    get them, except ``dask.delayed`` groups: Dask's delayed optimizer only culls (each
    of the N calls' layers against every key: quadratic, 95 % of 5,000 calls' time),
    and :meth:`_Nodes.build` culls as it walks from the keys. Fusing delayed calls
    (``optimization.fuse.delayed``) still goes through it."""
    if isinstance(dsk, Mapping):
        return dsk
    try:
        from dask._expr import Expr
    except ImportError:  # an older dask: no expressions
        return dsk.__dask_graph__()
    groups = dsk.operands if isinstance(dsk, Expr) else None
    if not groups or not all(hasattr(g, "hlg") and hasattr(g, "low_level_optimizer")
                             for g in groups):
        return dsk.__dask_graph__()
    from dask import config
    from dask.delayed import optimize as delayed_optimize
    from dask.utils import ensure_dict
    graph: Dict[Any, Any] = {}
    for group in groups:
        tasks, optimize = group.hlg, group.low_level_optimizer
        if optimize is not None and (optimize is not delayed_optimize
                                     or config.get("optimization.fuse.delayed")):
            tasks = optimize(tasks, group.__dask_keys__())
        graph.update(ensure_dict(tasks))
    return graph


def _first(keys: Any) -> Any:
    while isinstance(keys, list) and keys:
        keys = keys[0]
    return keys



def _tuples(values: Any, keys: Any) -> Any:
    """``values`` with the lists that ``keys`` has turned into tuples, as Dask returns them."""
    if isinstance(keys, list):
        return tuple(_tuples(v, k) for v, k in zip(values, keys))
    return values


def _name(key: Any) -> str:
    """A readable node name from a Dask key (``('sum-agg-1f3c', 0)`` -> ``sum-agg``)."""
    from dask.utils import key_split
    return key_split(key) or "dask"


def _pool(num_workers: int) -> Any:
    """The LocalBackend kept for ``num_workers`` worker processes."""
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"rhapsody_graph.get: num_workers must be an integer >= 1, "
                         f"got {brief(num_workers)}")
    from ..backends.local import LocalBackend
    with _lock:
        if num_workers not in _pools:
            _pools[num_workers] = LocalBackend(workers=num_workers, name=f"dask-{num_workers}",
                                               start_method="spawn")  # made as threads run
        return _pools[num_workers]
