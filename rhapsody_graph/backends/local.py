"""The embedded local backend: a pool of persistent worker processes.

State:

* ``workers``: live worker processes (at most ``max_workers``), each with its two
  pipes, the tids it has been sent and not answered (``queue``, in order: the head
  is the one running), the lease it is bound to (or ``None`` when idle), the GPU
  ids it first ran with, and which functions it already holds.
* ``launches``: executables and multi-rank jobs, each on its own processes (see
  :mod:`.launch`); their threads post completions to the session's
  :class:`~.base.Completions` queue.
* every worker's result pipe (and its task pipe while a write waits for room) is
  watched by that queue, which the session's scheduler thread sleeps on. Never a
  poll, never a sleep.

Policy: a lease binds one idle worker (spawned on demand). CUDA reads
``CUDA_VISIBLE_DEVICES`` once per process, so a worker that has loaded a GPU
runtime is kept for leases on the same GPU ids, and replaced when none other is
free. A worker that dies fails the task at the head of its queue
(``DIED``) and returns the rest (``DROPPED``); a timed-out task's worker is killed
and replaced on demand. Writes never block: each worker has an outbox flushed
when its pipe has room, so a big input can never deadlock against a big result.
"""
from __future__ import annotations

import atexit
import itertools
import os
import pickle
import selectors
import subprocess
import weakref
from collections import deque
from typing import Any, Deque, Dict, List, Optional, Sequence, Set, Tuple

from . import watchdog, wire
from .base import (DIED, DROPPED, ERROR, KILLED, OK, RANKS_KIND, Call, Completion, Completions,
                   Lease)
from .launch import Launch, describe_exit, kill_tree, worker_command
from ..errors import WorkerDiedError
from ..ai.service import Spawn, local_server
from ..graph import EXECUTABLE, FUNCTION, Node
from ..resources import Host, Inventory, Ledger, detect_host

__all__ = ["LocalBackend"]


class _Prepared:
    __slots__ = ("fid", "func", "args")

    def __init__(self, fid: int, func: bytes, args: bytes) -> None:
        self.fid, self.func, self.args = fid, func, args


class _Worker:
    """The driver's view of one worker process."""

    __slots__ = ("proc", "task_w", "result_r", "inbox", "outbox", "pending", "queue", "lease",
                 "place", "gpus", "funcs", "writing")

    def __init__(self, proc: subprocess.Popen, task_w: int, result_r: int) -> None:
        self.proc, self.task_w, self.result_r = proc, task_w, result_r
        self.inbox = bytearray()
        self.outbox = bytearray()
        self.pending: List[tuple] = []  # tasks of this round, not yet framed
        self.queue: Deque[int] = deque()
        self.lease: Optional[Lease] = None
        self.place: Optional[tuple] = None  # the bound lease's placement, as the worker takes it
        self.gpus: Optional[Tuple[int, ...]] = None
        self.funcs: Set[int] = set()
        self.writing = False


class LocalBackend:
    """Run nodes in persistent worker processes on this machine.

    Args:
        cpus: cores to use (default: every core this process may run on). More cores
            than the machine has are allowed; they are pinned onto the real ones in turn.
        gpus: GPU count or ids (default: ``CUDA_VISIBLE_DEVICES`` or ``nvidia-smi``).
            Declared GPUs get real ids in ``CUDA_VISIBLE_DEVICES`` on any machine.
        hosts: several declared :class:`~rhapsody_graph.resources.Host` s instead,
            to exercise multi-host placement on one machine.
        workers: most worker processes at once (default: the number of cores).

    >>> with LocalBackend(cpus=2, gpus=4) as backend:
    ...     backend.inventory.total_gpus
    4
    """

    takes_dragon_options = False  # policy=, process_template(s)=
    kinds = frozenset((FUNCTION, EXECUTABLE, RANKS_KIND))

    def __init__(self, cpus: "int | Sequence[int] | None" = None,
                 gpus: "int | Sequence[int] | None" = None, *,
                 hosts: Optional[Sequence[Host]] = None, workers: Optional[int] = None,
                 memory: Optional[int] = None, name: str = "local") -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"{type(self).__name__}: name must be a non-empty string, got {name!r}")
        self.name = name
        if hosts is not None and (cpus is not None or gpus is not None or memory is not None):
            raise TypeError("LocalBackend: give either hosts=[Host(...), ...] or "
                            "cpus=/gpus=/memory=, not both (declare memory on each Host)")
        self.inventory = Inventory(hosts if hosts is not None else [detect_host(cpus, gpus, memory)])
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int)
                                    or workers < 1):
            raise ValueError(f"LocalBackend: workers must be an integer >= 1, got {workers!r}")
        self.max_workers = workers or self.inventory.total_cpus
        self.ledger = Ledger(self.inventory)  # kept across runs: GPUs go round-robin throughout
        self._real = sorted(os.sched_getaffinity(0))
        self._workers: List[_Worker] = []
        self._bound = 0
        self._owner: Dict[int, Any] = {}  # tid -> _Worker or Launch
        self._keys: Dict[int, str] = {}
        self._dirty: List[_Worker] = []
        self._funcs: Dict[int, Tuple[Any, int, bytes]] = {}  # id(fn) -> (fn, fid, bytes)
        self._fids = itertools.count(1)  # prepare() may run in several submitting threads
        self._hub: Optional[Completions] = None  # the session's completion queue
        self._finalizer = weakref.finalize(self, _kill_all, self._workers, self._kill)
        atexit.register(self._finalizer)

    # -- joining a session ------------------------------------------------------------

    def attach(self, completions: Optional[Completions]) -> None:
        """Post every completion to ``completions`` (the session's queue) from now on;
        ``None``: leave the session."""
        if completions is not None and self._hub is not None:
            raise RuntimeError(f"backend {self.name!r} already belongs to a session; close "
                               "that session first, or make another backend")
        if completions is None:
            for w in self._workers:
                self._unwatch(w)
        self._hub = completions
        for w in self._workers:
            self._watch(w)

    def accepts(self, node: Node) -> bool:
        """True unless ``node`` has Dragon pass-through options this backend cannot honour."""
        return self.takes_dragon_options or not node.opts.custom_process

    # -- encoding -----------------------------------------------------------------

    def uses_lease(self, node: Node) -> bool:
        """Python nodes with one rank run on pool workers, under leases."""
        return node.kind == FUNCTION and node.opts.resources.ranks == 1

    def admit(self, node: Node, prepared: Any) -> bool:
        """Every node's needs are its placements: nothing else to take."""
        return True

    def release_idle(self) -> bool:
        """Nothing is held beyond running calls."""
        return False

    def server_spawner(self) -> Spawn:
        """How an inference service placed on this backend starts its server: a child
        of the driver (see :class:`~rhapsody_graph.InferenceBackend`)."""
        return local_server

    def prepare(self, node: Node) -> Any:
        """Encode a node's call; raise ``TypeError`` naming what cannot be sent."""
        self._check_options(node)
        if node.kind == EXECUTABLE:
            for arg in node.fn.argv:
                if not isinstance(arg, (str, bytes, int, float, os.PathLike, Node)):
                    raise TypeError(f"node {node.key!r}: executable arguments must be text, "
                                    f"numbers, paths or nodes; got {arg!r}")
            return node.fn
        entry = self._funcs.get(id(node.fn))
        if entry is None:
            try:
                data = wire.dump_callable(node.fn)
            except Exception as exc:
                raise TypeError(f"node {node.key!r}: its function {node.fn!r} cannot be "
                                f"pickled to send to a worker: {exc}") from exc
            entry = self._funcs[id(node.fn)] = (node.fn, next(self._fids), data)
        try:
            args = wire.dump_args(node.args, node.kwargs, node.deps)
        except Exception as exc:
            raise _unpicklable_argument(node, exc) from exc
        return _Prepared(entry[1], entry[2], args)

    def _check_options(self, node: Node) -> None:
        """Refuse options this backend cannot honour (Dragon's pass-throughs)."""
        opts = node.opts
        if self.takes_dragon_options:
            return
        for name, value in (("policy", opts.policy), ("process_template", opts.template),
                            ("process_templates", opts.templates)):
            if value is not None:
                raise ValueError(f"node {node.key!r}: option {name!r} is passed to Dragon and only "
                                 f"the Dragon backend takes it; compute() runs on {self.name!r}")

    def decode(self, payload: bytes) -> Any:
        return pickle.loads(payload)

    # -- running --------------------------------------------------------------------

    def slots_free(self) -> int:
        return self.max_workers - self._bound

    def submit(self, call: Call) -> None:
        self._keys[call.tid] = call.node.key
        lease = call.lease
        if lease is None:
            self._launch(call)
            return
        w = lease.executor or self._bind(lease, call.node)
        prepared = call.prepared
        func = None if prepared.fid in w.funcs else prepared.func
        w.funcs.add(prepared.fid)
        if not w.pending:
            self._dirty.append(w)
        w.pending.append((call.tid, prepared.fid, func, prepared.args, call.inputs, w.place))
        w.queue.append(call.tid)
        self._owner[call.tid] = w

    def flush(self) -> None:
        for w in self._dirty:
            if w.pending:
                w.outbox += wire.frame(("run", w.pending))
                w.pending = []
                self._send(w)
        self._dirty.clear()

    def drop_queued(self) -> None:
        self.flush()
        for w in self._workers:
            if len(w.queue) > 1:
                w.outbox += wire.frame(("drop",))
                self._send(w)

    def kill(self, tid: int) -> None:
        owner = self._owner.get(tid)
        if isinstance(owner, Launch):
            owner.kill()  # its thread reaps the processes, then reports KILLED
            return
        self._owner.pop(tid, None)
        self._keys.pop(tid, None)
        if isinstance(owner, _Worker):
            owner.queue.remove(tid)
            self._retire(owner, DROPPED)  # reaped before it returns
        self._hub.post((tid, KILLED, None, 0.0))

    def end_lease(self, lease: Lease) -> None:
        w = lease.executor
        lease.executor = None
        if w is not None:
            w.lease = None
            self._bound -= 1

    def end_run(self) -> None:
        self._funcs.clear()
        for w in self._workers:
            w.funcs.clear()
            w.outbox += wire.frame(("forget",))
            self._send(w)

    def pin(self, cpus: Sequence[int]) -> Tuple[int, ...]:
        """Real core ids for logical ones (declared cores beyond the machine wrap around)."""
        real = self._real
        return tuple(sorted({c if c in real else real[c % len(real)] for c in cpus}))

    # -- lifecycle ----------------------------------------------------------------------

    def start(self, n: Optional[int] = None) -> "LocalBackend":
        """Start ``n`` workers now (default: all), rather than on first use."""
        for _ in range(max(0, (n or self.max_workers) - len(self._workers))):
            self._spawn()
        return self

    def abort(self) -> None:
        """Kill every worker and every launched process now."""
        for owner in list(self._owner.values()):
            if isinstance(owner, Launch):
                owner.kill()
        for w in list(self._workers):
            self._retire(w, None)
        self._reset()
        self.ledger = Ledger(self.inventory)

    def shutdown(self) -> None:
        """Close the session using it, then stop the workers (EOF, then SIGKILL after
        2 s) and any launched process."""
        if self._hub is not None and self._hub.closer is not None:
            self._hub.closer()
        for owner in list(self._owner.values()):
            if isinstance(owner, Launch):
                owner.kill()
        for w in self._workers:
            _close(w.task_w)
        for w in list(self._workers):
            try:
                w.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass
            self._retire(w, None)
        self._reset()

    def __enter__(self) -> "LocalBackend":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def _reset(self) -> None:
        self._owner.clear()
        self._keys.clear()
        self._dirty.clear()
        self._bound = 0

    # -- internals ------------------------------------------------------------------------

    def _unwatch(self, w: _Worker) -> None:
        if self._hub is not None and w.result_r >= 0:
            self._hub.unwatch(w.result_r)
            if w.writing:
                self._hub.unwatch(w.task_w)
        w.writing = False

    def _watch(self, w: _Worker) -> None:
        """Have the session's queue call back when worker ``w`` sends results."""
        if self._hub is not None and w.result_r >= 0:
            self._hub.watch(w.result_r, selectors.EVENT_READ,
                            lambda mask, out, w=w: self._receive(w, out))

    def _spawn(self) -> _Worker:
        if wire.IMPORTING:
            raise RuntimeError(
                "compute() ran while a worker was importing the module that defines a task: "
                "module-level code runs again in every worker. Put the code that builds and "
                "computes the graph under `if __name__ == \"__main__\":`.")
        task_r, task_w = os.pipe()
        result_r, result_w = os.pipe()
        env = watchdog.marked(dict(os.environ))
        proc = subprocess.Popen(worker_command(task_r, result_w), pass_fds=(task_r, result_w),
                                stdin=subprocess.DEVNULL, start_new_session=True, env=env)
        watchdog.guard(proc, env)
        os.close(task_r)
        os.close(result_w)
        os.set_blocking(task_w, False)
        os.set_blocking(result_r, False)
        w = _Worker(proc, task_w, result_r)
        w.outbox += wire.frame(("path", wire.python_path()))
        self._watch(w)
        self._workers.append(w)
        self._send(w)
        return w

    def _bind(self, lease: Lease, node: Node) -> _Worker:
        gpus = lease.placement.gpus
        idle = [w for w in self._workers if w.lease is None and not w.queue]
        w = None
        if gpus:
            w = (next((w for w in idle if w.gpus == gpus), None)
                 or next((w for w in idle if w.gpus is None), None))
            if w is None and len(self._workers) >= self.max_workers and idle:
                self._retire(idle[0], None)  # it holds a CUDA context on other GPUs
        else:
            w = next((w for w in idle if w.gpus is None), None) or (idle[0] if idle else None)
        if w is None:
            w = self._spawn()
        w.lease = lease
        p = lease.placement
        w.place = (p.host, p.cpus, self.pin(p.cpus), p.gpus, 0, 1)
        lease.executor = w
        self._bound += 1
        return w

    @staticmethod
    def _kill(proc: Any) -> None:
        """Kill a worker's process and everything it started."""
        kill_tree(proc)

    def _send(self, w: _Worker) -> None:
        if w.outbox:
            try:
                n = os.write(w.task_w, w.outbox)
                del w.outbox[:n]
            except BlockingIOError:
                pass
            except OSError:  # the worker is gone; its EOF will be seen on the result pipe
                w.outbox.clear()
        want = bool(w.outbox)
        if want != w.writing and self._hub is not None:
            w.writing = want  # watch the task pipe for room only while there is more to send
            if want:
                self._hub.watch(w.task_w, selectors.EVENT_WRITE, lambda mask, out, w=w: self._send(w))
            else:
                self._hub.unwatch(w.task_w)

    @staticmethod
    def _read(w: _Worker) -> Optional[List[Tuple[int, int, float, bytes]]]:
        """The complete results worker ``w`` has sent, or ``None`` at EOF (it died)."""
        try:
            data = os.read(w.result_r, 1 << 20)
        except BlockingIOError:
            return []
        if not data:
            return None
        w.inbox += data
        return wire.split_results(w.inbox)

    def _receive(self, w: _Worker, out: List[Completion]) -> None:
        results = self._read(w)
        if results is None:
            self._retire(w, DIED)
            return
        keys = self._keys
        for status, tid, seconds, payload in results:
            if status & wire.GPU_RUNTIME:
                status &= ~wire.GPU_RUNTIME
                if w.gpus is None and w.lease is not None:
                    w.gpus = w.lease.placement.gpus
            w.queue.popleft()
            self._owner.pop(tid, None)
            key = keys.pop(tid, "?")
            if status == wire.OK:
                out.append((tid, OK, payload, seconds))
            elif status == wire.ERROR:
                out.append((tid, ERROR, wire.load_error(payload, key), seconds))
            else:
                out.append((tid, DROPPED, None, 0.0))

    def _retire(self, w: _Worker, status: Optional[str]) -> None:
        """Kill worker ``w``; report its queue (head ``DIED``, rest ``DROPPED``) if asked."""
        self._kill(w.proc)
        reason = self._exit_reason(w, status == DIED)
        self._detach(w)
        if w.lease is not None:
            w.lease.executor = None
            w.lease = None
            self._bound -= 1
        if status is None:
            return
        for i, tid in enumerate(w.queue):
            self._owner.pop(tid, None)
            key = self._keys.pop(tid, "?")
            if i == 0 and status == DIED:
                exc = WorkerDiedError(f"the worker process running node {key!r} died ({reason})")
                self._hub.post((tid, DIED, wire.attach(exc, "", key), 0.0))
            else:
                self._hub.post((tid, DROPPED, None, 0.0))
        w.queue.clear()

    def _exit_reason(self, w: _Worker, died: bool) -> str:
        """How a killed or dead worker ended (and reap it)."""
        code = w.proc.wait()
        watchdog.release(w.proc)
        return describe_exit(code)

    def _detach(self, w: _Worker) -> None:
        """Stop watching worker ``w``, close its pipes and forget it."""
        self._unwatch(w)
        _close(w.result_r)
        _close(w.task_w)
        w.result_r = w.task_w = -1
        if w in self._workers:
            self._workers.remove(w)

    def _launch(self, call: Call) -> None:
        node = call.node
        launch = Launch(call.tid, node.key, self.pin, self._post)
        self._owner[call.tid] = launch
        if node.kind == FUNCTION:
            p = call.prepared
            task = (call.tid, p.fid, p.func, p.args, call.inputs, None)
            launch.run_in_thread(launch.ranks, task, call.placements)
            return
        values = {id(d): pickle.loads(b) for d, b in zip(node.deps, call.inputs)}
        spec = call.prepared
        argv = [str(values[id(a)]) if isinstance(a, Node) else os.fsdecode(a)
                if isinstance(a, (bytes, os.PathLike)) else str(a) for a in spec.argv]
        launch.run_in_thread(launch.executable, argv, spec.cwd, spec.env, call.placements)

    def _post(self, completion: Completion) -> None:
        """Called from launcher threads: hand the completion to the scheduler thread."""
        self._hub.post(lambda out: self._take_posted(completion, out))

    def _take_posted(self, completion: Completion, out: List[Completion]) -> None:
        """On the scheduler thread: report a launch's end (``KILLED`` if it was killed)."""
        tid = completion[0]
        owner = self._owner.get(tid)
        if not isinstance(owner, Launch):
            return  # aborted: already reported
        del self._owner[tid]
        self._keys.pop(tid, None)
        out.append((tid, KILLED, None, 0.0) if owner.killed else completion)


def _unpicklable_argument(node: Node, exc: Exception) -> TypeError:
    """Name the argument of ``node`` that cannot be pickled."""
    named = [(f"argument {i}", a) for i, a in enumerate(node.args)]
    named += [(f"keyword {k!r}", v) for k, v in node.kwargs.items()]
    for label, value in named:
        try:
            wire.dump_args((value,), {}, node.deps)
        except Exception as inner:
            return TypeError(f"node {node.key!r}: {label} {value!r:.80} cannot be pickled to "
                             f"send to a worker: {inner}")
    return TypeError(f"node {node.key!r}: its arguments cannot be pickled: {exc}")


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _kill_all(workers: List[_Worker], kill: Any) -> None:
    for w in list(workers):
        kill(w.proc)
        try:
            w.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
