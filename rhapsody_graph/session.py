"""Session: named backends, routing, and one scheduler that lives as long as it does.

A session owns one :class:`~.backends.base.Completions` queue that all its backends
post to, and one :class:`~.scheduler.Scheduler` running in a daemon thread.
``submit`` returns :class:`~.futures.Future` s at once; ``compute`` is submit and
gather. Everything that can be checked is checked in the submitting thread before
anything is posted: routing (``backend="name"``, else the first backend that runs
the node's kind and can hold its request), the request against that backend's
inventory, and the encoding of every call.

>>> import rhapsody_graph as rhapsody
>>> @rhapsody.task
... def square(x): return x * x
>>> with rhapsody.Session(backends=[rhapsody.LocalBackend(cpus=2, name="cpu")]) as s:
...     futures = s.submit(*[square(i) for i in range(4)])
...     sorted(f.result() for f in rhapsody.as_completed(futures))
[0, 1, 4, 9]
"""
from __future__ import annotations

import atexit
import copy
import concurrent.futures as cf
import os
import signal
import sys
import threading
import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import fusion
from .ai.nodes import AI
from .backends.base import Completions, kind_of
from .errors import NoBackendError, add_note, brief, exception_text, warn
from .futures import INSIDE, Future, wait_for
from .graph import Node, Ref, adapt, adapted, is_foreign, substitute
from .progress import Progress, mode
from .resources import Ledger
from .scheduler import CONTINUE, DONE, FINISH, ON_ERROR, WAIT, Group, Lane, Scheduler, Task
from .task import Task as TaskFunction

__all__ = ["Session", "stop_on_sigterm"]

CANCEL_TIMEOUT = 60.0  # cancel() waits this long for killed processes to be reaped
ROUTES_KEPT = 10_000  # routes remembered per task options, then forgotten
_sessions: "weakref.WeakSet[Session]" = weakref.WeakSet()  # closed at interpreter exit


class Session:
    """Backends by name and the scheduler that runs nodes on them.

    Args:
        backends: the backends, each with a distinct ``name``, or one backend
            (default: one :class:`~rhapsody_graph.LocalBackend`). The session shuts
            them down when it closes.
        journal: a directory that keeps every finished node's value, so that a run
            of the same program after a crash reuses what finished (see
            :mod:`rhapsody_graph.journal`).
        run_log: a file to which every attempt of a node is appended as a JSON line
            (node, backend, host, cores, GPUs, attempt, start, end, outcome, bytes: see
            :mod:`rhapsody_graph.runlog`), for :func:`rhapsody_graph.report`.
        progress: show nodes done / running / failed / waiting per backend while the
            session runs (``None``: in a terminal, or as a line every 10 s in a long
            batch run, unless ``$CI`` is set; see :mod:`rhapsody_graph.progress`).
        fuse: let a short node whose value one node reads run inside that node's
            call, once its function's run time is known (see :mod:`rhapsody_graph.fusion`).

    A node with ``backend="name"`` runs there; any other goes to the first backend
    that runs its kind (function, executable, multi-rank, AI) and can hold it. When
    no backend runs AI nodes, the session adds an
    :class:`~rhapsody_graph.InferenceBackend` named ``inference`` placed on its
    first backend (its servers take cores and GPUs from that backend's ledger).
    """

    def __init__(self, backends: Any = None, *,
                 journal: "str | os.PathLike[str] | None" = None,
                 run_log: "str | os.PathLike[str] | None" = None,
                 progress: Optional[bool] = None, fuse: bool = True,
                 _owns: bool = True) -> None:
        _check_progress(progress)
        if backends is None:
            from .backends.local import LocalBackend
            backends = [LocalBackend()]
        backends = _backend_list(backends)
        self.backends: Dict[str, Any] = {}
        for b in backends:
            if b.name in self.backends:
                raise ValueError(f"Session: two backends are named {b.name!r}; give each "
                                 "a distinct name=")
            self.backends[b.name] = b
        for b in backends:
            on = getattr(b, "on", None)
            if on is not None and self.backends.get(on.name) is not on:
                raise ValueError(f"Session: backend {b.name!r} is placed on backend {on.name!r}, "
                                 "which is not in this session; add it to backends=[...]")
        self._implicit: List[Any] = []  # backends the session added, shut down with it
        if not any(AI in b.kinds for b in backends) and "inference" not in self.backends:
            from .backends.inference import InferenceBackend
            inference = InferenceBackend(name="inference", on=backends[0])
            self.backends[inference.name] = inference
            self._implicit.append(inference)
            backends.append(inference)
        self._owns = _owns
        self._fuse = fuse
        self._checked: Dict[Tuple[int, tuple], None] = {}
        self._routes: Dict[int, Tuple[Any, str, Lane]] = {}  # id(opts) -> (opts, kind, lane)
        self._lock = threading.RLock()  # submitting (see _hand) and closing
        self._closed = False
        self._users: "weakref.WeakSet[threading.Thread]" = weakref.WeakSet()  # submitters
        self._futures = Group(FINISH, waited=False)  # shared by all submit() calls
        self._futures.journal = _journal(journal)
        self._runlog: Any = None
        if run_log is not None:  # opened before any backend joins: a bad path leaves none
            from .runlog import RunLog  # json only for a session that writes one
            self._runlog = RunLog(run_log)
        how = mode(progress)
        self._completions = Completions()
        # weakly: the queue (its backends, the scheduler's thread) keeps no session alive
        self._completions.closer = weakref.WeakMethod(self.close)
        joined: List[Any] = []
        from .api import release  # (api imports this module)
        try:
            for b in backends:
                if _owns:  # a session of the user's: it takes b from the session
                    release(b)  # compute(backend=b) made, if that one is done
                b.attach(self._completions)
                joined.append(b)
        except BaseException:  # one is in another session: the others stay free to join one
            for b in joined:
                b.attach(None)
            self._completions.close()
            if self._runlog is not None:
                self._runlog.close()
            raise
        self._scheduler = Scheduler(backends, self._completions)
        self._kept = self._scheduler.kept  # futures with a done-callback, until they end
        self._sharing = _share_machines(backends)  # given their own ledgers back at close
        self._scheduler.runlog = self._runlog
        self._progress = Progress(self._scheduler.lanes.values(), how) if how else None
        self._thread = threading.Thread(target=self._scheduler.run, name="rhapsody-scheduler",
                                        daemon=True)
        self._completions.owner = self._thread
        self._thread.start()
        # dropped unclosed (nothing refers to it, its futures included): closed then
        self._finalizer = weakref.finalize(self, _abandoned, self._scheduler, self._thread,
                                           self._parts())
        self._finalizer.atexit = False  # close_all() closes it at exit
        _sessions.add(self)
        stop_on_sigterm()

    # -- submitting ----------------------------------------------------------------------

    def submit(self, *nodes: Any) -> Any:
        """Start running ``nodes`` (and what they need); return at once.

        Returns:
            one :class:`~rhapsody_graph.futures.Future` for one node, else a list
            of them (one per node, also for a single list of nodes).
        Raises:
            ``NoBackendError``, ``UnsatisfiableError``, ``TypeError``/``ValueError``
            naming the node, before anything runs.
        """
        self._users.add(threading.current_thread())  # see in_use()
        if len(nodes) == 1:
            node = nodes[0]
            if type(node) is Node:
                fut = self._submit_one(node)
                if fut is not None:
                    return fut
        one_list = len(nodes) == 1 and isinstance(nodes[0], (list, tuple))
        flat = list(nodes[0] if one_list else nodes)
        for i, n in enumerate(flat):
            if not isinstance(n, (Node, Ref)) and is_foreign(type(n)):  # a Dask collection
                flat[i] = n = adapt(n)
            if not isinstance(n, (Node, Ref)):
                hint = ""
                if callable(n):
                    name = getattr(n, "__name__", "f")
                    hint = (f"; a node is a task's call: submit({name}(...)) of a @task "
                            f"function, or submit(rhapsody_graph.task({name})(...))")
                raise TypeError(f"submit() takes nodes (or futures), got {brief(n)}{hint}")
        futures = self._submit(flat)
        return futures[0] if len(nodes) == 1 and not one_list else futures

    def compute(self, *outputs: Any, on_error: Optional[str] = None,
                fail_fast: Optional[bool] = None,
                journal: "str | os.PathLike[str] | None" = None,
                progress: Optional[bool] = None) -> Tuple[Any, ...]:
        """Run everything ``outputs`` need; return their values (see :func:`rhapsody_graph.compute`)."""
        with INSIDE:  # see api._shut_down_at_exit
            return self._computed(outputs, on_error, fail_fast, journal, progress)

    def _computed(self, outputs: Sequence[Any], on_error: Optional[str],
                  fail_fast: Optional[bool], journal: "str | os.PathLike[str] | None",
                  progress: Optional[bool]) -> Tuple[Any, ...]:
        policy = _on_error(on_error, fail_fast)
        _check_progress(progress)
        _refuse_uncalled(outputs)
        outputs, roots = adapted(tuple(outputs))  # Dask collections among them: as nodes
        if not roots:
            return tuple(outputs)
        how = mode(progress) if progress and self._progress is None else None
        shown = Progress(self._scheduler.lanes.values(), how) if how else None
        try:
            return self._compute(outputs, roots, policy, journal)
        finally:
            if shown is not None:
                shown.stop()

    def _compute(self, outputs: Sequence[Any], roots: Sequence[Any], policy: str,
                 journal: "str | os.PathLike[str] | None") -> Tuple[Any, ...]:
        if threading.current_thread() is self._thread:
            raise RuntimeError("compute() in a done-callback, which runs on the session's "
                               "scheduler thread, would wait for ever; submit() the work "
                               "instead (it returns at once)")
        group = Group(policy, waited=True)
        group.journal = _journal(journal) if journal is not None else self._futures.journal
        if journal is None and group.journal is not None:
            group.journal.new_run()  # the session's: code may have changed since its last run
        handles = self._submit(roots, group)
        try:
            wait_for(group.ended)
            if group.errors and policy != CONTINUE:
                raise _first_error(group, roots, handles)
            values = {id(r): _outcome(h) for r, h in zip(roots, handles)}
            if policy != CONTINUE:  # an output without a value, yet no error of this call:
                _raise_lost(roots, handles, values)  # cancelled, or a future's own failure
            if group.errors:
                _warn_failed(group)
        except BaseException:
            if not group.ended.is_set():  # Ctrl-C, or another thread's exception
                self.cancel()
            if self._thread.is_alive():
                self._scheduler.abort_idle().wait(CANCEL_TIMEOUT)
            raise
        try:
            return tuple(substitute(o, values) for o in outputs)
        except RecursionError:
            raise TypeError("compute(): an output holds itself (a list or dict inside "
                            "itself) or is nested deeper than Python's recursion limit, "
                            "so it cannot be rebuilt with its nodes' values (they ran); "
                            "pass the nodes themselves") from None

    def _submit_one(self, node: Node) -> Optional[Future]:
        """``submit(node)`` of a new node whose inputs are all known here (futures of
        this session, nodes it runs, or none: a stream of submissions): its record and
        future, handed over without a graph walk. ``None`` if the node is known already
        or an input is new."""
        with self._lock:  # see _hand
            self._check_open()
            if self._known(node) is not None:
                return None  # submitted meanwhile: its record gets this future too
            t = self._reused(node, self._futures)
            if t is None:
                deps = []
                for d in node.deps:
                    record = self._own(d)._task if isinstance(d, Ref) else self._known(d)
                    if record is None:
                        return None  # it needs the walk
                    deps.append(record)
                t = self._record(node, self._futures, deps or ())
            fut = Future(node, t, self)
            t.futures = [weakref.ref(fut)]
            self._hand((t,), (), self._futures)
        return fut

    def _submit(self, roots: Sequence[Any], computing: Optional[Group] = None) -> List[Any]:
        """Hand ``roots`` to the scheduler; one future per root (for ``compute``'s group
        ``computing``: the record itself for a root this call added: it needs no handle)."""
        futures = computing is None
        group = self._futures if futures else computing
        with self._lock:  # see _hand
            self._check_open()
            new: List[Task] = []
            records = self._records(roots, group, new)
            added = set(new)  # records no other thread sees yet (they hash by identity)
            handles, attach = [], []
            for root in roots:
                if isinstance(root, Ref):
                    handles.append(self._own(root))
                    continue
                t = records[root]
                new_here = t in added
                if new_here and not futures:
                    handles.append(t)
                    continue
                fut = Future(root, t, self)
                handles.append(fut)
                if new_here:
                    if t.futures is None:
                        t.futures = []
                    t.futures.append(weakref.ref(fut))
                else:
                    attach.append((t, fut))
            self._hand(new, attach, group)
        return handles

    def _hand(self, new: Sequence[Task], attach: Sequence[Tuple[Task, Any]],
              group: Group) -> None:
        """Give ``new`` records and ``attach`` futures to the scheduler. Called under the
        session's lock, from the look-up of known records (:meth:`_known`) on: the new
        records are known at once (a node submitted again before the scheduler thread
        took it gets its record, not a second run), and close() (which takes the lock)
        comes after."""
        handed = self._scheduler.handed
        for t in new:
            handed[t.node] = t
        self._scheduler.take(new, attach, group)

    def _known(self, node: Any) -> Optional[Task]:
        """The record of ``node`` in this session, if it has one: handed over (and maybe
        not taken yet), then taken (the scheduler moves it in that order)."""
        t = self._scheduler.handed.get(node)
        return t if t is not None else self._scheduler.tasks.get(node)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this session is closed; make a new Session")

    def _records(self, roots: Sequence[Any], group: Group, new: List[Task]) -> Dict[Any, Task]:
        """Records for ``roots`` and what they need, made (in post-order) where unknown."""
        records: Dict[Any, Task] = {}  # by node or future (both hash by identity)

        def record_of(dep: Any) -> Optional[Task]:
            t = records.get(dep)
            if t is None:
                if isinstance(dep, Ref):
                    t = self._own(dep)._task
                else:
                    t = self._known(dep)
                if t is not None:
                    records[dep] = t
            return t

        def reused(node: Any) -> bool:
            """A record of ``node`` whose value the journal has: its upstream is not needed."""
            t = self._reused(node, group)
            if t is not None:
                records[node] = t
                new.append(t)
            return t is not None

        journal = group.journal
        order: List[Node] = []  # the nodes without a record, in post-order
        for root in roots:
            if isinstance(root, Ref) or record_of(root) is not None or (
                    journal is not None and reused(root)):
                continue
            if not root.deps:  # a leaf: no walk
                records[root] = _WALKED
                order.append(root)
                continue
            stack = [(root, iter(root.deps))]
            while stack:
                node, deps = stack[-1]
                for d in deps:
                    if record_of(d) is None and (journal is None or not reused(d)):
                        stack.append((d, iter(d.deps)))
                        break
                else:
                    stack.pop()
                    if node not in records:
                        records[node] = _WALKED
                        order.append(node)
        fused: Dict[int, List[Node]] = {}
        inner: Any = ()
        if (self._fuse and group.ended is not None and journal is None
                and self._runlog is None and len(order) > 1):  # a compute(): see .fusion
            functions = fusion.Functions()  # pickled now: globals as they are now
            fused, inner = fusion.plan(order, roots, self._scheduler.seconds,
                                       self._fusable, functions)
        for node in order:
            if node in inner:
                continue
            nodes = fused.get(id(node))
            t = None if nodes is None else self._fused_record(nodes, group, records, functions)
            if t is not None:
                records[node] = t
                new.append(t)
                continue
            # alone, or in a call that cannot be encoded: each its own record (so the
            # node whose argument cannot be sent is the one named)
            for n in nodes or (node,):
                records[n] = t = self._record(n, group, [records[d] for d in n.deps]
                                              if n.deps else ())
                new.append(t)
        return records

    def _record(self, node: Node, group: Group, deps: Sequence[Task]) -> Task:
        """A new record of ``node``: routed, its call encoded, its journal entry named."""
        if node.released:
            raise ValueError(
                f"node {node.key!r} cannot run again: its future ended and let go of the "
                "node's inputs (a finished future keeps no upstream value alive); keep the "
                "node itself to submit it again")
        lane = self._lane(node)
        t = Task(node, lane, lane.backend.prepare(node), group, deps)
        if group.journal is not None and lane.runs_code:
            key = group.journal.key(node)
            if key is not None:  # else its value is not kept: no stable key for it
                t.saved = (group.journal, key)
        return t

    def _fusable(self, node: Node) -> Optional[Lane]:
        """The lane of ``node`` if its options and backend let it run inside another
        node's call there (see :mod:`.fusion`), else ``None``."""
        if not node.opts.fusable:
            return None
        try:
            lane = self._lane(node)
        except Exception:  # no backend takes it: its own record says so
            return None
        return lane if lane.fuses else None

    def _fused_record(self, nodes: List[Node], group: Group, records: Dict[Any, Any],
                      functions: fusion.Functions) -> Optional[Task]:
        """The record of one call that runs ``nodes`` (the last is the node it stands
        for); ``None`` when that call cannot be encoded."""
        head = nodes[-1]
        lane = self._lane(head)
        try:
            steps, inputs, fused = fusion.steps(nodes, self._scheduler.seconds, functions)
            stand_in = Node.standing_for(head, fusion.run_fused, (steps,) + inputs, inputs)
            prepared = lane.backend.prepare(stand_in)
        except Exception:
            return None
        # the record is the head's (known by its node, named by its key) with the call
        # that runs them all, which reads the inputs of them all
        t = Task(head, lane, prepared, group, [records[d] for d in inputs])
        t.fused = fused
        t.weight = fused.count
        return t

    def _reused(self, node: Node, group: Group) -> Optional[Task]:
        """A done record of ``node`` from the group's journal, if it has the value."""
        journal = group.journal
        if journal is None:
            return None
        key = journal.key(node)
        payload = None if key is None else journal.get(key)
        if payload is None:
            return None
        lane = self._lane(node)
        if not lane.runs_code:  # a simulation: its nodes are modelled, never reused
            return None
        t = Task(node, lane, None, group, ())
        t.payload = payload  # the scheduler ends it DONE as it takes it (see Scheduler._take)
        return t

    def _own(self, fut: Any) -> Any:
        if getattr(fut, "_session", None) is not self:
            raise ValueError(f"future {fut.key!r} belongs to another session; pass its "
                             ".result() instead")
        return fut

    # -- routing -------------------------------------------------------------------------

    def _lane(self, node: Node) -> Lane:
        """The scheduler's lane of the backend that runs ``node`` (its ``backend=``, else
        the first that can); remembered per task options, which all calls of one task share."""
        hit = self._routes.get(id(node.opts))
        if hit is not None and hit[0] is node.opts and hit[1] == node.kind:
            return hit[2]
        lane = self._scheduler.lanes[id(self._choose(node))]
        if len(self._routes) > ROUTES_KEPT:
            self._routes.clear()
        self._routes[id(node.opts)] = (node.opts, node.kind, lane)
        return lane

    def _choose(self, node: Node) -> Any:
        kind = kind_of(node)
        res = node.opts.resources
        name = node.opts.backend
        who = f"node {node.key!r}"
        if name is not None:
            b = self.backends.get(name)
            if b is None or kind not in b.kinds or not b.accepts(node):
                why = (f"this session has no backend named {name!r}" if b is None else
                       f"backend {name!r} does not run {kind} nodes with these options"
                       + _refusal(b, node))
                raise NoBackendError(f"{who} asks for backend {name!r}, but {why}; the "
                                     f"session's backends: {self._names()}",
                                     node.key, list(self.backends))
            self._check(b, res, who)
            return b
        capable = [b for b in self.backends.values() if kind in b.kinds and b.accepts(node)]
        for b in capable:
            if (id(b), res.key) in self._checked or b.inventory.ranks_that_fit(res) >= res.ranks:
                self._checked[(id(b), res.key)] = None
                return b
        if capable:
            self._check(capable[0], res, who)  # raises, naming what the largest host has
        for b in self.backends.values():
            if kind in b.kinds:
                b.prepare(node)  # raises, naming the options it cannot honour
        raise NoBackendError(f"{who} is a {kind} node and no backend of this session runs it "
                             f"with these options; tried: {self._names()}",
                             node.key, list(self.backends))

    def _names(self) -> str:
        """Its backends' names, saying which the session added itself."""
        return ", ".join(f"{n} (added for AI nodes)" if b in self._implicit else n
                         for n, b in self.backends.items())

    def _check(self, backend: Any, res: Any, who: str) -> None:
        if (id(backend), res.key) not in self._checked:
            backend.inventory.check(res, who)
            self._checked[(id(backend), res.key)] = None

    # -- cancelling and closing ----------------------------------------------------------

    def cancel(self) -> None:
        """Cancel everything submitted; return once every killed process is gone."""
        self._cancel(None)

    def _cancel(self, tasks: Optional[List[Task]]) -> None:
        if threading.current_thread() is self._thread:  # from a done-callback
            self._scheduler._cancel(tasks, threading.Event())
            return
        if not self._thread.is_alive():
            return
        self._scheduler.cancel(tasks).wait(CANCEL_TIMEOUT)

    def wait(self) -> None:
        """Wait until the session is idle: everything submitted has ended, including
        what other threads and done-callbacks submit meanwhile."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("Session.wait() in a done-callback, which runs on the "
                               "session's scheduler thread, would wait for ever")
        if self._thread.is_alive():
            wait_for(self._scheduler.when_idle())

    def close(self) -> None:
        """Cancel what still runs, stop the scheduler, and shut the backends down
        (a session made for one backend only lets go of it).

        Raises:
            RuntimeError: in a done-callback (the scheduler's own thread, which close()
                stops): ``cancel()`` there, or close from another thread.
        """
        if threading.current_thread() is self._thread and not self._closed:
            raise RuntimeError("close() (or a backend's shutdown()) in a done-callback, "
                               "which runs on the session's scheduler thread, cannot stop "
                               "that thread; cancel() there, or close from another thread")
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._finalizer.detach()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._scheduler.close()
            self._scheduler.closed.wait(CANCEL_TIMEOUT)
        _release(*self._parts())

    def _parts(self) -> Tuple[Any, ...]:
        """What :func:`_release` lets go of, once the scheduler has stopped."""
        return (self._progress, list(self.backends.values()),
                [b for b in self.backends.values() if self._owns or b in self._implicit],
                self._sharing, self._completions, self._runlog, self._scheduler)

    def __enter__(self) -> "Session":
        _current.append(self)
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        try:
            if exc_type is None:
                self.wait()  # still current: what done-callbacks submit comes here
        finally:
            try:
                _current.remove(self)
            except ValueError:
                pass
            self.close()

    def __repr__(self) -> str:
        return f"<Session {', '.join(self.backends)}{' (closed)' if self._closed else ''}>"


_current: List[Session] = []  # sessions of open `with` blocks, innermost last


_WALKED = object()  # in _records: a node seen by the walk, its record not made yet


def _check_progress(progress: Any) -> None:
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be True, False or None, got {brief(progress)}")


def current_session() -> Optional[Session]:
    """The session of the innermost open ``with Session(...)`` block, if any."""
    return _current[-1] if _current else None


def _refusal(backend: Any, node: Node) -> str:
    """Why ``backend`` refuses ``node``, as its ``prepare`` says it (else nothing)."""
    if kind_of(node) not in backend.kinds:
        return ""
    try:
        backend.prepare(node)
    except (TypeError, ValueError) as exc:
        return f" ({exc})"
    return ""


def _journal(path: "str | os.PathLike[str] | None") -> Any:
    """The journal kept at ``path`` (:mod:`.journal`, imported when one is asked for)."""
    if path is None:
        return None
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"journal= takes a directory's path, got {brief(path)}")
    from .journal import Journal
    try:
        return Journal(path)
    except OSError as e:  # "", a file, a folder that cannot be made
        raise ValueError(f"journal={os.fspath(path)!r} cannot be used as the journal's "
                         f"directory: {e.strerror or e}") from e


def _refuse_uncalled(outputs: Sequence[Any]) -> None:
    """Refuse a decorated function given as an output: ``compute(f)`` for ``compute(f(x))``."""
    for i, out in enumerate(outputs):
        if isinstance(out, TaskFunction):
            raise TypeError(f"output {i} of compute() is the task {out.opts.name!r} itself, "
                            f"not a node: call it ({out.opts.name}(...)) to make one")


def _on_error(on_error: Optional[str], fail_fast: Optional[bool]) -> str:
    """The failure policy of a ``compute()``: ``on_error``, or the older ``fail_fast``."""
    if fail_fast is not None and not isinstance(fail_fast, bool):
        raise TypeError(f"fail_fast must be True, False or None, got {brief(fail_fast)}")
    if on_error is None:
        return FINISH if fail_fast is False else WAIT
    if fail_fast is not None:
        raise TypeError("give on_error= or fail_fast=, not both")
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {', '.join(map(repr, ON_ERROR))}, "
                         f"got {brief(on_error)}")
    return on_error


def _backend_list(backends: Any) -> List[Any]:
    """``Session(backends=...)``, checked: a non-empty list of backend instances (one
    backend alone stands for a list of it)."""
    what = ("Session(backends=[...]) takes backend instances (LocalBackend(), "
            "DragonBackend(), DaskBackend(...), InferenceBackend(...))")
    if hasattr(backends, "attach") and not hasattr(backends, "__iter__"):
        backends = [backends]
    if isinstance(backends, (str, bytes)) or not hasattr(backends, "__iter__"):
        raise TypeError(f"{what}, got {brief(backends)}")
    backends = list(backends)
    if not backends:
        raise ValueError("Session(backends=[...]) needs at least one backend")
    for b in backends:
        if not (isinstance(getattr(b, "name", None), str) and hasattr(b, "attach")
                and hasattr(b, "kinds")):
            name = (f"; compute(backend={b!r}) names the default one, a Session takes an "
                    "instance" if isinstance(b, str) else "")
            raise TypeError(f"{what}, got {brief(b)}{name}")
    return backends


def _outcome(handle: Any) -> Any:
    """The value of a future or of a record; the exception of a failed one (a
    ``CancelledError`` for one that never ran) under ``on_error="continue"``."""
    if isinstance(handle, Task):
        if handle.state == DONE:
            return handle.value()
        return handle.error if handle.error is not None else cf.CancelledError(
            f"node {handle.node.key!r} did not run: an upstream node failed")
    exc = handle.exception()
    return handle.result() if exc is None else exc


def _raise_lost(roots: Sequence[Any], handles: Sequence[Any], values: Dict[int, Any]) -> None:
    """Raise for the first output of ``roots`` that has no value: a failed future's own
    exception, else a ``CancelledError`` (another thread's ``cancel()`` or ``close()``)."""
    for r, h in zip(roots, handles):
        if not _has_value(h):
            exc = values[id(r)]
            if (isinstance(h, Task) and h.error is None) or isinstance(exc, cf.CancelledError):
                raise cf.CancelledError(
                    f"node {r.key!r} was cancelled before it could give its value "
                    "(Session.cancel() or close(), from another thread)")
            raise exc


def _warn_failed(group: Group) -> None:
    """Summarise the failures of an ``on_error="continue"`` run as a warning."""
    lines = [f"{t.node.key}: {type(exc).__name__}: {exception_text(exc, limit=300)}"
             for t, exc in group.errors[:10]]
    more = f" (and {len(group.errors) - 10} more)" if len(group.errors) > 10 else ""
    warn(f"{len(group.errors)} node(s) failed{more}; their outputs hold their exceptions:"
         "\n  " + "\n  ".join(lines))


def _has_value(handle: Any) -> bool:
    if isinstance(handle, Task):
        return handle.state == DONE
    return handle.done() and not handle.cancelled() and handle.exception() is None


def _first_error(group: Group, roots: Sequence[Any], handles: Sequence[Any]) -> BaseException:
    """The first failure of ``group``, noting the others and the outputs not computed
    on a copy: the error itself may be a future's, or shared by dependents (and their
    futures) that other calls need."""
    t, exc = group.errors[0]
    exc = _with_notes(exc, len(getattr(exc, "__notes__", ())))
    if len(group.errors) > 1:
        others = ", ".join(o.node.key for o, _ in group.errors[1:6])
        add_note(exc, f"{len(group.errors) - 1} other node(s) failed too: {others}")
    unfinished = [r.key for r, h in zip(roots, handles)
                  if r is not t.node and not _has_value(h)]
    if unfinished and isinstance(exc, Exception):
        more = f" and {len(unfinished) - 5} more" if len(unfinished) > 5 else ""
        add_note(exc, "outputs not computed: " + ", ".join(unfinished[:5]) + more)
    return exc


def _with_notes(exc: BaseException, keep: int) -> BaseException:
    """A copy of ``exc`` with its first ``keep`` notes, its cause and traceback; ``exc``
    itself where no copy reads as it does (its notes then pile up)."""
    dup = _copied(exc)
    if dup is None:
        return exc
    if hasattr(exc, "__notes__"):
        dup.__notes__ = list(exc.__notes__[:keep])
    dup.__cause__, dup.__context__ = exc.__cause__, exc.__context__
    dup.__suppress_context__ = exc.__suppress_context__
    return dup.with_traceback(exc.__traceback__)


def _copied(exc: BaseException) -> Optional[BaseException]:
    """A copy of ``exc`` whose text is the same, or ``None``: made as ``copy.copy``
    makes one (the class's own ``__reduce__``: a builtin's fields, an ``OSError``'s
    file name, are set again by its ``__init__``), else as unpickling with a class
    whose ``__init__`` takes other arguments than its ``args`` (no ``__init__``)."""
    cls = type(exc)
    for make in (copy.copy, _made_bare):
        try:
            dup = make(exc)
            if dup is exc or type(dup) is not cls:  # a class that interns its instances
                continue
            if vars(dup) is vars(exc):  # (tblib's reducer, which Dask installs, shares it)
                dup.__dict__ = dict(vars(exc))
            for klass in cls.__mro__:  # attributes in __slots__ too
                slots = klass.__dict__.get("__slots__", ())
                for name in (slots,) if isinstance(slots, str) else slots:
                    if name not in ("__dict__", "__weakref__") and hasattr(exc, name):
                        setattr(dup, name, getattr(exc, name))
            if str(dup) == str(exc):
                return dup
        except Exception:
            continue
    return None


def _made_bare(exc: BaseException) -> BaseException:
    cls = type(exc)
    dup = cls.__new__(cls, *exc.args)
    vars(dup).update(vars(exc))
    return dup


def stop_on_sigterm() -> None:
    """Make SIGTERM (a batch system's walltime) stop the program as Ctrl-C does: it
    raises ``SystemExit(143)`` in the main thread, so a waiting ``compute()`` cancels
    its run and every session closes at exit. Only where SIGTERM has no handler yet."""
    if (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL):
        signal.signal(signal.SIGTERM, _terminated)


def _share_machines(backends: Sequence[Any]) -> List[Any]:
    """Local backends of one machine with equal inventories (see ``LocalBackend.machine``)
    place their nodes (and services placed on them) from one ledger, the first one's:
    no core or GPU of the machine goes to two at once. Those that share cores or GPUs
    otherwise are warned of: each places its nodes from its own ledger. Returns the
    backends now using another's ledger."""
    local = [(b, b.machine) for b in backends if getattr(b, "machine", None) is not None]
    sharing = []
    for i, (b, mb) in enumerate(local):
        for a, ma in local[:i]:
            if ma == mb:
                b.ledger = a.ledger
                sharing.append(b)
                break
            cores, gpus = ma[0] & mb[0], ma[1] & mb[1]
            if cores or gpus:
                shared = " and ".join(f"{what} {sorted(ids)}" for what, ids in
                                      (("cores", cores), ("GPUs", gpus)) if ids)
                warn(f"Session: backends {a.name!r} and {b.name!r} both place nodes on "
                     f"{shared} of this machine, each from its own ledger, so their nodes "
                     "may share them; give each its own (cpus=[...], gpus=[...]), or make "
                     "them alike (the same cpus=/gpus=): then they share one ledger")
    return sharing


def _release(progress: Any, backends: List[Any], owned: List[Any], sharing: List[Any],
             completions: Any, runlog: Any, scheduler: Scheduler) -> None:
    """A closed session's last steps: stop its display, give backends that shared a
    ledger their own, detach its backends and shut down those it owns, close its queue
    and its run log."""
    if progress is not None:
        progress.stop()
    for b in sharing:
        b.ledger = Ledger(b.inventory)
    # backends placed on another go first: their servers may need it to stop
    for b in sorted(backends, key=lambda b: getattr(b, "on", None) is None):
        b.attach(None)
        if b in owned:
            b.shutdown()
    completions.close()
    if runlog is not None and scheduler.runlog is not None:
        runlog.close()  # (one that failed a write was warned of, and is left)


def _abandoned(scheduler: Scheduler, thread: threading.Thread, parts: Tuple[Any, ...]) -> None:
    """A session dropped unclosed is closed: its scheduler cancels what runs and stops,
    then the rest is let go of, here (as close() does), or on the scheduler's thread
    once it stops, where that thread dropped it (in a done-callback)."""
    if threading.current_thread() is thread:
        scheduler.after = lambda: _release(*parts)
        scheduler.close()
        return
    if thread.is_alive():
        scheduler.close()
        scheduler.closed.wait(CANCEL_TIMEOUT)
    _release(*parts)


_signalled: List[int] = []  # the SIGTERM stop_on_sigterm() turned into SystemExit


def _terminated(signum: int, frame: Any) -> None:
    _signalled.append(signum)
    raise SystemExit(128 + signum)


@atexit.register
def close_all() -> None:
    """Close every open session (at interpreter exit), warning of the work this cancels."""
    sessions = list(_sessions)
    unfinished = sum(s._scheduler.live + sum(len(new) for new, _, _ in list(s._scheduler.intake))
                     for s in sessions if not s._closed and s._thread.is_alive())
    # (not where the program was stopped: Ctrl-C or another uncaught error, or SIGTERM;
    # an interactive session keeps the last error it showed, which stopped nothing)
    interactive = hasattr(sys, "ps1") or sys.flags.interactive or "IPython" in sys.modules
    stopped = _signalled or (getattr(sys, "last_type", None) is not None and not interactive)
    if unfinished and not stopped:
        warn(f"{unfinished} submitted node(s) had not finished when the program ended: "
             "they are cancelled; to let them finish, wait for their futures "
             "(rhapsody.wait(futures)) or submit inside a `with Session():` block, whose "
             "end waits")
    for s in sessions:
        s.close()


def in_use(here: threading.Thread) -> List[Session]:
    """The open sessions with work in flight that a live non-daemon thread other than
    ``here`` submitted to (futures it may still wait for)."""
    return [s for s in list(_sessions)
            if not s._closed and s._thread.is_alive()  # (else its work never ends)
            and (s._scheduler.tasks or s._scheduler.intake)
            and any(t is not here and not t.daemon and t.is_alive() for t in list(s._users))]


def _forget_sessions() -> None:
    """In a forked child: the parent's sessions are not this process's to use or close
    (their threads and workers stayed with the parent)."""
    for s in list(_sessions):
        s._finalizer.detach()
    _current.clear()
    _sessions.clear()


os.register_at_fork(after_in_child=_forget_sessions)
