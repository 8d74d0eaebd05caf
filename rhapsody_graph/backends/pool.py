"""The pool of persistent workers that the local and Dragon backends share.

A *worker* is a process that runs Python calls it is sent, one after the other,
over a byte channel to this driver (:mod:`.worker`, frames of :mod:`.wire`): two
pipes for a local worker, one socket (duplicated) for a Dragon worker that
connected back. :class:`WorkerPool` is the driver's side of all of them.

State (touched only on the scheduler thread):

* ``workers``: every live :class:`Worker`; each has its channel, its ``outbox``
  (bytes not written yet) and ``inbox`` (bytes not parsed yet), ``pending`` (calls
  of this round, not framed yet), ``queue`` (the tids it was sent and has not
  answered, in order: the head is the one running; ``skipped``: those of them it
  was told to skip, see :meth:`WorkerPool.kill`), the lease it is bound to (or
  ``None``), the GPU ids it first loaded a GPU runtime with, and the functions it
  already holds (``funcs``).
* ``bound``: how many leases hold a worker (at most ``size``).
* ``owner`` / ``keys``: tid → the worker that holds the call, and the node key
  (for messages), while the call is queued or running on a worker.
* ``connecting``: workers whose channel is not there yet (a Dragon Batch call
  that has not connected back), by worker id; their outbox waits.
* ``_funcs``: each function pickled once per run (``id(fn)`` → function id and
  bytes); a worker is sent a function's bytes only with its first call there.

Policy: ``queue`` puts a call on its lease's worker; ``flush`` ends a round with
one ``run`` frame per worker. Writes never block: a worker's outbox is written
when its channel has room (the session's :class:`~.base.Completions` queue
watches it only while something waits), so a big input can never deadlock
against a big result. Results are read into completions as they arrive. A
worker that dies fails the call at the head of its queue (``DIED``) and returns
the rest (``DROPPED``). ``end_run`` forgets the functions, here and in every
worker.

Why an object each backend owns: the two backends differ only in how a worker
starts and is bound to a lease (a child process on pipes, chosen GPU-sticky; a
Batch call that connects back), how it is killed and how its end is described.
Those come from the backend: it starts the worker and hands it to
:meth:`WorkerPool.add`, and the worker's ``proc`` (a :class:`WorkerProcess`)
kills it and says how it ended. The pool's state is then one object with one
owner, and neither backend reaches into the other's internals. What is left is
the protocol methods that only forward to the pool (``submit``, ``flush``,
``end_lease``, ...); written twice they would be the same lines, so
:class:`PoolBackend` holds them once: a small base with no state of its own, whose
subclasses supply :meth:`PoolBackend.bind_worker` and :meth:`PoolBackend.launch`.
"""
from __future__ import annotations

import atexit
import itertools
import os
import pickle
import selectors
import time
import weakref
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Set, Tuple

from . import wire
from .base import (DIED, DROPPED, ERROR, KILLED, OK, Completion, Completions, Lease,
                   close_session, refuse_second_session)
from ..errors import WorkerDiedError, brief
from ..graph import EXECUTABLE, FUNCTION
from ..resources import Inventory, Placement

try:
    from typing import Protocol
except ImportError:  # pragma: no cover - Python < 3.8
    Protocol = object  # type: ignore[assignment]

__all__ = ["PoolBackend", "PoolCall", "Worker", "WorkerPool", "WorkerProcess",
           "encode_arguments", "encode_function", "encode_program", "max_workers", "place"]


class PoolCall:
    """A compute node's call as :meth:`WorkerPool.encode` prepares it: self-contained,
    no graph node in it (the ``prepared`` record of a :class:`~.base.Call`).

    ``key``, ``kind`` (function or executable) and ``ranks``: its node's. ``fid`` and
    ``func``: its function's id and pickled bytes (an executable's: the program a
    worker runs it with, ``None`` when the driver starts it itself). ``args``: the
    arguments as :func:`.wire.dump_args` gives them (an executable's: ``(argv, cwd,
    env)``), each upstream value a slot filled from the call's inputs. ``options``:
    what the backend's lowering needs beyond (Dragon's; ``None`` on the local backend).
    """

    __slots__ = ("key", "kind", "ranks", "fid", "func", "args", "options")

    def __init__(self, node: Any, fid: int, func: Optional[bytes], args: wire.Args) -> None:
        self.key, self.kind, self.ranks = node.key, node.kind, node.opts.resources.ranks
        self.fid, self.func, self.args = fid, func, args
        self.options: Any = None


class WorkerProcess(Protocol):
    """What the pool asks of a worker's process; the backend that starts it supplies it."""

    def kill(self) -> None:
        """Stop the process and what it started, now (never waits)."""

    def wait(self, timeout: Optional[float] = None) -> Any:
        """Wait (up to ``timeout`` s) for it to end; never raises."""

    def exit_reason(self, died: bool) -> str:
        """How a killed (``died``: dead on its own) worker ended, for the error; reaps it."""

    def exit_fd(self) -> int:
        """A file descriptor readable once the process has ended (a pidfd), or -1 where
        there is none (a remote process): the pool then learns of a death from its
        channel closing, which a child the worker forked can delay."""

    def close(self) -> None:
        """Release what watching it took (its pidfd); the pool no longer watches it."""


class Worker:
    """The driver's view of one worker (see the module docstring for the fields)."""

    __slots__ = ("proc", "task_w", "result_r", "inbox", "outbox", "pending", "queue", "lease",
                 "place", "gpus", "funcs", "writing", "wid", "skipped")

    def __init__(self, proc: WorkerProcess, task_w: int = -1, result_r: int = -1,
                 wid: int = 0) -> None:
        self.proc = proc
        self.task_w, self.result_r = task_w, result_r  # -1 until connected
        self.wid = wid  # its id while it connects back (0: connected from the start)
        self.inbox = bytearray()
        self.outbox = bytearray(wire.frame(("path", wire.python_path())))
        self.pending: List[tuple] = []  # tasks of this round, not yet framed
        self.queue: Deque[int] = deque()
        self.lease: Optional[Lease] = None
        self.place: Optional[tuple] = None  # the bound lease's placement, as the worker takes it
        self.gpus: Optional[Tuple[int, ...]] = None
        self.funcs: Set[int] = set()
        self.writing = False  # its task channel is watched for room
        self.skipped: Set[int] = set()  # queued calls it was told to skip, not answered yet


def place(p: Placement, pinned: Tuple[int, ...]) -> tuple:
    """Placement ``p`` as a worker takes it with a task: cores to pin itself to, GPUs, rank."""
    return (p.host, p.cpus, pinned, p.gpus, p.rank, p.world_size)


Receive = Callable[[Worker, List[Completion]], None]


class WorkerPool:
    """The workers of one backend, the leases bound to them and the calls they hold.

    Args:
        size: most leases bound at once (the backend's ``max_workers``).
        receive: what reads a worker's results when its channel is readable
            (default :meth:`receive`; the Dragon backend gathers job ranks first).
    """

    def __init__(self, size: int, receive: Optional[Receive] = None) -> None:
        self.size = size
        self.workers: List[Worker] = []
        self.bound = 0
        self.owner: Dict[int, Worker] = {}
        self.keys: Dict[int, str] = {}
        self.connecting: Dict[int, Worker] = {}
        self.hub: Optional[Completions] = None  # the session's completion queue
        self._receive = receive or self.receive
        self._dirty: List[Worker] = []
        self._funcs: Dict[int, Tuple[Any, int, bytes]] = {}  # id(fn) -> (fn, fid, bytes)
        self._fids = itertools.count(1)  # encode() may run in several submitting threads
        self._finalizer = weakref.finalize(self, _kill_all, self.workers, os.getpid())
        atexit.register(self._finalizer)

    # -- joining a session ----------------------------------------------------------

    def attach(self, hub: Optional[Completions]) -> None:
        """Have ``hub`` watch every worker from now on (``None``: stop watching)."""
        if hub is None:
            for w in self.workers:
                self._unwatch(w)
        self.hub = hub
        for w in self.workers:
            self._watch(w)

    # -- encoding -------------------------------------------------------------------

    def encode(self, node: Any, program: Optional[bytes] = None) -> PoolCall:
        """A compute node's call (an executable's: run by ``program`` in a worker, else by
        the driver); raise ``TypeError`` naming what cannot be pickled."""
        if node.kind == EXECUTABLE:
            return PoolCall(node, 0, program, encode_program(node))
        entry = self._funcs.get(id(node.fn))
        if entry is None:
            entry = self._funcs[id(node.fn)] = (node.fn, next(self._fids), encode_function(node))
        return PoolCall(node, entry[1], entry[2], encode_arguments(node))

    # -- workers --------------------------------------------------------------------

    def add(self, w: Worker) -> Worker:
        """Take a started worker: a connected one is watched and sent its first frame;
        one with a ``wid`` waits in ``connecting`` for :meth:`connected`."""
        self.workers.append(w)
        if w.task_w < 0:
            self.connecting[w.wid] = w
        else:
            self._watch(w)
            self.send(w)
        return w

    def connected(self, w: Worker, result_r: int, task_w: int) -> None:
        """Worker ``w`` connected back: watch its channel and send what waited."""
        del self.connecting[w.wid]
        w.result_r, w.task_w = result_r, task_w
        self._watch(w)
        self.send(w)

    def idle(self) -> List[Worker]:
        """The workers bound to no lease and holding no call."""
        return [w for w in self.workers if w.lease is None and not w.queue]

    def bind(self, lease: Lease, w: Worker, pinned: Tuple[int, ...]) -> Worker:
        """Bind ``w`` to ``lease``; its calls run pinned to ``pinned`` cores."""
        w.lease = lease
        w.place = place(lease.placement, pinned)
        lease.executor = w
        self.bound += 1
        return w

    def slots_free(self) -> int:
        return self.size - self.bound

    # -- calls ----------------------------------------------------------------------

    def queue(self, call: Any, w: Worker) -> None:
        """Queue ``call`` (a :class:`~.base.Call` of a :class:`PoolCall`) on worker ``w``;
        it is sent at the next :meth:`flush`."""
        tid, prepared = call.tid, call.prepared
        func = None if prepared.fid in w.funcs else prepared.func
        w.funcs.add(prepared.fid)
        if not w.pending:
            self._dirty.append(w)
        w.pending.append((tid, prepared.fid, func, prepared.args, call.inputs, w.place))
        w.queue.append(tid)
        self.owner[tid] = w
        self.keys[tid] = call.key

    def flush(self) -> None:
        """End a round: one ``run`` frame per worker that was queued calls."""
        for w in self._dirty:
            if w.pending:
                w.outbox += wire.frame(("run", w.pending))
                w.pending = []
                self.send(w)
        self._dirty.clear()

    def drop_queued(self) -> None:
        """Have every worker return its calls behind the running one (``DROPPED``)."""
        self.flush()
        for w in self.workers:
            if len(w.queue) > 1:
                w.outbox += wire.frame(("drop",))
                self.send(w)

    def kill(self, tid: int) -> None:
        """Stop call ``tid`` and report it ``KILLED``: one queued behind its worker's
        running call is taken off that worker's queue (``skip``; the call ahead goes on,
        and the worker's answer for it is ignored); a running one is stopped now (its
        worker is killed, the calls behind it ``DROPPED``). A skip reaches the worker
        before its next call starts unless that starts within :data:`.worker.LOOK` of
        the one before; such a call runs, unheeded. What the worker answered already is
        read first: the call ahead may have ended, and ``tid`` be running; or ``tid`` and
        calls behind it may have ended (killing the worker would run those again)."""
        w = self.owner.get(tid)
        if w is not None and w.result_r >= 0:  # (a worker not connected yet answered nothing)
            late: List[Completion] = []
            self._receive(w, late)
            for completion in late:
                self.hub.post(completion)
        w = self.owner.pop(tid, None)
        self.keys.pop(tid, None)
        if w is not None and w.queue[0] != tid:
            self.flush()  # the worker has the call before it is told to skip it
            w.skipped.add(tid)
            w.outbox += wire.frame(("skip", tid))
            self.send(w)
        elif w is not None:
            w.queue.popleft()
            self.retire(w, DROPPED)  # reaped before it returns
        self.hub.post((tid, KILLED, None, 0.0))

    def end_lease(self, lease: Lease) -> Optional[Worker]:
        """Unbind the worker of ``lease`` (returned, if any) so another lease may take it."""
        w = lease.executor
        lease.executor = None
        if w is not None:
            w.lease = None
            self.bound -= 1
        return w

    def end_run(self) -> None:
        """Forget every function, here and in every worker."""
        self._funcs.clear()
        for w in self.workers:
            w.funcs.clear()
            w.outbox += wire.frame(("forget",))
            self.send(w)

    # -- the channels -------------------------------------------------------------------

    def send(self, w: Worker) -> None:
        """Write what ``w``'s channel takes now; watch it for room while more waits."""
        if w.task_w < 0:
            return  # not connected yet: the outbox waits
        if w.outbox:
            try:
                n = os.write(w.task_w, w.outbox)
                del w.outbox[:n]
            except BlockingIOError:
                pass
            except OSError:  # the worker is gone; its EOF will be seen on the result channel
                w.outbox.clear()
        want = bool(w.outbox)
        if want != w.writing and self.hub is not None:
            w.writing = want
            if want:
                self.hub.watch(w.task_w, selectors.EVENT_WRITE, lambda mask, out, w=w: self.send(w))
            else:
                self.hub.unwatch(w.task_w)

    @staticmethod
    def read(w: Worker) -> Optional[List[Tuple[int, int, float, bytes]]]:
        """The complete results worker ``w`` has sent, or ``None`` at EOF or a reset
        connection (it died: a socket whose peer was killed with unread data resets)."""
        try:
            data = os.read(w.result_r, wire.READ)
        except BlockingIOError:
            return []
        except OSError:  # ECONNRESET and the like: the worker is gone
            return None
        if not data:
            return None
        w.inbox += data
        return wire.split_results(w.inbox)

    def receive(self, w: Worker, out: List[Completion]) -> None:
        """Turn the results ``w`` sent into completions; retire it at EOF."""
        results = self.read(w)
        if results is None:
            self.retire(w, DIED)
            return
        keys = self.keys
        for status, tid, seconds, payload in results:
            if status & wire.GPU_RUNTIME:
                status &= ~wire.GPU_RUNTIME
                if w.gpus is None and w.lease is not None:
                    w.gpus = w.lease.placement.gpus
            if w.queue[0] == tid:
                w.queue.popleft()
            else:  # a skipped call answered before the one running ahead of it
                w.queue.remove(tid)
            if w.skipped and tid in w.skipped:  # killed while queued: reported then
                w.skipped.discard(tid)
                continue
            self.owner.pop(tid, None)
            key = keys.pop(tid, "?")
            if status == wire.OK:
                out.append((tid, OK, payload, seconds))
            elif status == wire.ERROR:
                out.append((tid, ERROR, wire.load_error(payload, key), seconds))
            elif status & wire.OUTPUT:  # it printed: (stdout, stderr) come with it
                status, payload, printed = wire.take_output(status, payload)
                value = payload if status == wire.OK else wire.load_error(payload, key)
                out.append((tid, OK if status == wire.OK else ERROR, value, seconds, (printed,)))
            else:
                out.append((tid, DROPPED, None, 0.0))

    # -- ending workers -----------------------------------------------------------------

    def retire(self, w: Worker, status: Optional[str]) -> None:
        """Kill worker ``w``; report its queue (head ``DIED``, rest ``DROPPED``) if asked."""
        w.proc.kill()
        reason = w.proc.exit_reason(status == DIED)
        self.detach(w)
        if w.lease is not None:
            self.end_lease(w.lease)
        if status is None:
            return
        for i, tid in enumerate(w.queue):
            self.owner.pop(tid, None)
            key = self.keys.pop(tid, "?")
            if tid in w.skipped:
                continue  # killed while queued: reported then
            if i == 0 and status == DIED:
                exc = WorkerDiedError(f"the worker process running node {key!r} died ({reason})")
                self.hub.post((tid, DIED, wire.attach(exc, "", key), 0.0))
            else:
                self.hub.post((tid, DROPPED, None, 0.0))
        w.queue.clear()
        w.skipped.clear()

    def detach(self, w: Worker) -> None:
        """Stop watching worker ``w``, close its channel and forget it."""
        if w.wid:
            self.connecting.pop(w.wid, None)
        self._unwatch(w)
        w.proc.close()
        _close(w.result_r)
        _close(w.task_w)
        w.result_r = w.task_w = -1
        if w in self.workers:
            self.workers.remove(w)

    def abort(self) -> None:
        """Kill every worker now, reporting nothing; forget every call."""
        for w in list(self.workers):
            self.retire(w, None)
        self.reset()

    def close(self, grace: float) -> None:
        """Stop every worker: EOF on its channel; what has not ended ``grace`` s later
        (one deadline for all) is killed."""
        for w in self.workers:
            if w.writing and self.hub is not None:  # unwatched while the number is its own
                self.hub.unwatch(w.task_w)
                w.writing = False
            _close(w.task_w)
            w.task_w = -1  # closed: never closed again (another thread may hold the number)
        deadline = time.monotonic() + grace
        for w in list(self.workers):
            w.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            self.retire(w, None)
        self.reset()

    def reset(self) -> None:
        """Forget every call (their workers are gone)."""
        self.owner.clear()
        self.keys.clear()
        self.connecting.clear()
        self._dirty.clear()
        self.bound = 0

    def _watch(self, w: Worker) -> None:
        if self.hub is not None and w.result_r >= 0:
            self.hub.watch(w.result_r, selectors.EVENT_READ,
                           lambda mask, out, w=w: self._receive(w, out))
            exited = w.proc.exit_fd()
            if exited >= 0:  # a death is seen at once, also while a child holds the pipe
                self.hub.watch(exited, selectors.EVENT_READ,
                               lambda mask, out, w=w: self._exited(w, out))

    def _exited(self, w: Worker, out: List[Completion]) -> None:
        """Worker ``w``'s process has ended: take the results it sent, then retire it."""
        if w in self.workers and w.result_r >= 0:
            self._receive(w, out)  # results written before it died; retires it at EOF
        if w in self.workers and w.result_r >= 0:
            self.retire(w, DIED)

    def _unwatch(self, w: Worker) -> None:
        if self.hub is not None and w.result_r >= 0:
            self.hub.unwatch(w.result_r)
            if w.writing:
                self.hub.unwatch(w.task_w)
            exited = w.proc.exit_fd()
            if exited >= 0:
                self.hub.unwatch(exited)
        w.writing = False


class PoolBackend:
    """The backend protocol (see :mod:`.base`) for a backend whose Python calls run on
    a :class:`WorkerPool`: every method that forwards to ``self.pool``.

    A subclass sets ``pool`` and ``name`` and supplies :meth:`bind_worker` and
    :meth:`launch`; it extends ``attach``, ``kill``, ``end_lease`` and ``end_run``
    for what it holds beyond the pool (and calls these).
    """

    pool: WorkerPool
    name: str
    forwards = True  # a worker keeps the value a later call on its lease takes as input

    def bind_worker(self, call: Any) -> Worker:
        """A worker for ``call.lease``, which has none yet (started or reused), bound to it."""
        raise NotImplementedError

    def launch(self, call: Any) -> None:
        """Start a call under no lease (executables, multi-rank nodes) on processes of its own."""
        raise NotImplementedError

    def attach(self, completions: Optional[Completions]) -> None:
        """Post every completion to ``completions`` (the session's queue) from now on;
        ``None``: leave the session."""
        refuse_second_session(self.name, self.pool.hub, completions)
        self.pool.attach(completions)

    def uses_lease(self, prepared: PoolCall) -> bool:
        """Python nodes with one rank run on pool workers, under leases."""
        return prepared.kind == FUNCTION and prepared.ranks == 1

    def admit(self, prepared: PoolCall) -> bool:
        """Every node's needs are its placements: nothing else to take."""
        return True

    def release_idle(self) -> bool:
        """Nothing is held beyond running calls."""
        return False

    def decode(self, payload: bytes) -> Any:
        return pickle.loads(payload)

    def slots_free(self) -> int:
        return self.pool.slots_free()

    def submit(self, call: Any) -> None:
        """Queue a leased call on its lease's worker (binding one first); launch the rest."""
        lease = call.lease
        if lease is None:
            self.launch(call)
        else:
            self.pool.queue(call, lease.executor or self.bind_worker(call))

    def flush(self) -> None:
        self.pool.flush()

    def drop_queued(self) -> None:
        self.pool.drop_queued()

    def kill(self, tid: int) -> None:
        """Stop pool call ``tid`` (see :meth:`WorkerPool.kill`)."""
        self.pool.kill(tid)

    def end_lease(self, lease: Lease) -> None:
        self.pool.end_lease(lease)

    def end_run(self) -> None:
        self.pool.end_run()

    def close_session(self) -> None:
        """Close the session this backend belongs to, if any (which detaches it)."""
        close_session(self.pool.hub)

    def __enter__(self) -> Any:
        return self


def max_workers(workers: Optional[int], inventory: Inventory, who: str) -> int:
    """A backend's ``workers=``, checked (default: every core of its inventory)."""
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int)
                                or workers < 1):
        raise ValueError(f"{who}: workers must be an integer >= 1, got {brief(workers)}")
    return workers or inventory.total_cpus


def encode_program(node: Any) -> wire.Args:
    """An executable node's ``(argv, cwd, env)``, pickled for a worker that runs it
    (upstream values as slots); raise ``TypeError`` naming the node."""
    spec = node.fn
    try:
        return wire.dump_args((spec.argv, spec.cwd, spec.env), {}, node.deps)
    except Exception as exc:
        raise TypeError(f"node {node.key!r}: its arguments cannot be pickled: {exc}") from exc


def encode_function(node: Any) -> bytes:
    """A Python node's function, pickled for a worker; raise ``TypeError`` naming it."""
    try:
        return wire.dump_callable(node.fn)
    except Exception as exc:
        raise TypeError(f"node {node.key!r}: its function {node.fn!r} cannot be "
                        f"pickled to send to a worker: {exc}") from exc


def encode_arguments(node: Any) -> wire.Args:
    """A Python node's arguments (see :func:`.wire.dump_args`), upstream values as slots; raise
    ``TypeError`` naming the argument that cannot be sent."""
    try:
        return wire.dump_args(node.args, node.kwargs, node.deps)
    except Exception as exc:
        raise unpicklable_argument(node, exc) from exc


def unpicklable_argument(node: Any, exc: Exception) -> TypeError:
    """Name the argument of ``node`` that cannot be pickled."""
    named = [(f"argument {i}", a) for i, a in enumerate(node.args)]
    named += [(f"keyword {k!r}", v) for k, v in node.kwargs.items()]
    for label, value in named:
        try:
            wire.dump_args((value,), {}, node.deps)
        except Exception as inner:
            return TypeError(f"node {node.key!r}: {label} {brief(value)} cannot be pickled to "
                             f"send to a worker: {inner}")
    return TypeError(f"node {node.key!r}: its arguments cannot be pickled: {exc}")


def _close(fd: int) -> None:
    if fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass


def _kill_all(workers: List[Worker], pid: int) -> None:
    """At exit, or when the pool is collected: kill every worker still there (in the
    driver ``pid`` only: a forked child's copy of the pool is not its own)."""
    if os.getpid() != pid:
        return
    for w in list(workers):
        w.proc.kill()
        w.proc.wait(timeout=5)
