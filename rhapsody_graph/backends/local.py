"""The embedded local backend: a pool of persistent worker processes on pipes.

State:

* ``pool``: a :class:`~.pool.WorkerPool` of live worker processes (at most
  ``max_workers``), each a child of the driver with two pipes; the pool holds the
  calls queued on each, the leases they are bound to and the functions they hold,
  and its pipes are watched by the session's :class:`~.base.Completions` queue,
  which the session's scheduler thread sleeps on. Never a poll, never a sleep.
* ``_launches``: tid → the :class:`~.launch.Launch` of each executable and
  multi-rank job, each on its own processes; their threads post completions to
  the session's queue. ``_ended_marks``: the watchdog group markers of those that
  ended; what they left running outside their groups (a ``setsid`` daemon) is killed
  when the run ends (``end_run``) or the backend shuts down.

Policy: a lease binds one idle worker (spawned on demand). CUDA reads
``CUDA_VISIBLE_DEVICES`` once per process, so a worker that has loaded a GPU
runtime is kept for leases on the same GPU ids, and replaced when none other is
free. A worker that dies fails the task at the head of its queue (``DIED``) and
returns the rest (``DROPPED``); a timed-out task's worker is killed (its whole
process group) and replaced on demand. Writes never block (see :mod:`.pool`).
"""
from __future__ import annotations

import os
import subprocess
from typing import Any, Dict, FrozenSet, List, Optional, Sequence, Tuple

from . import tracker, watchdog, wire
from .base import KILLED, RANKS_KIND, Call, Completion, on_scheduler, refuse_foreign_abort
from .forks import Forked, Forker, unsafe
from .launch import Launch, describe_exit, kill_tree, worker_command
from .pool import PoolBackend, PoolCall, Worker, WorkerPool, max_workers
from ..ai.service import Spawn, local_server
from ..errors import brief, warn
from ..graph import EXECUTABLE, FUNCTION, Node
from ..resources import Host, Inventory, Ledger, detect_host, gpu_names, names_env

__all__ = ["LocalBackend", "START_METHODS", "START_METHOD_ENV"]

#: how a worker can start (``LocalBackend(start_method=)``)
START_METHODS = ("spawn", "fork")
#: the start method of a ``LocalBackend`` made without ``start_method=``
START_METHOD_ENV = "RHAPSODY_GRAPH_START_METHOD"


class _Process:
    """A worker's child process, as the pool kills and describes it."""

    __slots__ = ("popen", "pidfd")

    def __init__(self, popen: subprocess.Popen) -> None:
        self.popen = popen
        self.pidfd = os.pidfd_open(popen.pid)  # readable once it has ended

    def exit_fd(self) -> int:
        return self.pidfd

    def kill(self) -> None:
        kill_tree(self.popen)  # started in a session of its own: its programs die too

    def wait(self, timeout: Optional[float] = None) -> Optional[int]:
        try:
            code = self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        watchdog.release(self.popen)
        return code

    def exit_reason(self, died: bool) -> str:
        code = self.popen.wait()
        watchdog.release(self.popen)
        return describe_exit(code)

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


class LocalBackend(PoolBackend):
    """Run nodes in persistent worker processes on this machine.

    Args:
        cpus: cores to use (default: every core this process may run on). More cores
            than the machine has are allowed; they are pinned onto the real ones in turn.
        gpus: GPU count or ids (default: ``CUDA_VISIBLE_DEVICES`` or ``nvidia-smi``).
            Declared GPUs get real ids in ``CUDA_VISIBLE_DEVICES`` on any machine.
        hosts: several declared :class:`~rhapsody_graph.resources.Host` s instead,
            to exercise multi-host placement on one machine.
        workers: most worker processes at once (default: the number of cores).
        start_method: how a worker starts (default: ``$RHAPSODY_GRAPH_START_METHOD``,
            else ``"spawn"``, so a program's default backend can fork without a change
            to the program). ``"spawn"``: a fresh interpreter
            that imports what its calls need. ``"fork"``: a copy of the driver, made by
            a template process forked while the driver runs one thread (see
            :mod:`.forks` for what a copy inherits); the first value comes several
            times sooner. Where the driver cannot be forked (it runs other threads, or
            has loaded a GPU runtime) workers are spawned, with a warning that says why.

    >>> with LocalBackend(cpus=2, gpus=4) as backend:
    ...     backend.inventory.total_gpus
    4
    """

    kinds = frozenset((FUNCTION, EXECUTABLE, RANKS_KIND))
    fuses = True  # see rhapsody_graph.fusion

    def __init__(self, cpus: "int | Sequence[int] | None" = None,
                 gpus: "int | Sequence[int] | None" = None, *,
                 hosts: Optional[Sequence[Host]] = None, workers: Optional[int] = None,
                 memory: Optional[int] = None, name: str = "local",
                 start_method: Optional[str] = None) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"{type(self).__name__}: name must be a non-empty string, "
                            f"got {brief(name)}")
        given = ""
        if start_method is None:
            start_method, given = os.environ.get(START_METHOD_ENV) or "spawn", \
                f" (${START_METHOD_ENV})"
        if start_method not in START_METHODS:
            raise ValueError(f"{type(self).__name__}: start_method must be one of "
                             f"{', '.join(map(repr, START_METHODS))}, got "
                             f"{brief(start_method)}{given}")
        self.name = name
        self.start_method = start_method
        self._forker: Optional[Forker] = None  # the template workers are forked from
        if hosts is not None and (cpus is not None or gpus is not None or memory is not None):
            raise TypeError("LocalBackend: give either hosts=[Host(...), ...] or "
                            "cpus=/gpus=/memory=, not both (declare memory on each Host)")
        self.inventory = Inventory(hosts if hosts is not None else [detect_host(cpus, gpus, memory)])
        self.gpu_names = gpu_names()  # its GPU ids' UUIDs, read with its inventory
        self.max_workers = max_workers(workers, self.inventory, "LocalBackend")
        self.ledger = Ledger(self.inventory)  # kept across runs: GPUs go round-robin throughout
        self.pool = WorkerPool(self.max_workers)
        self._pins = _pins(self.inventory, sorted(os.sched_getaffinity(0)))
        self._launches: Dict[int, Launch] = {}
        # the group markers of launches that ended: what they started and left (a
        # `setsid` daemon) is killed when the run ends
        self._ended_marks: List[str] = []

    # -- joining a session (see PoolBackend for the rest) ------------------------------

    def attach(self, completions: Any) -> None:
        """Join a session (see :class:`PoolBackend`), starting one worker now if none
        runs: its interpreter boots while the driver builds and encodes the first
        calls, instead of after them."""
        super().attach(completions)
        if completions is not None and not wire.IMPORTING:
            try:
                self.start(1)
            except BaseException:  # a Ctrl-C, a warning made an error: it stays free
                super().attach(None)
                raise

    def accepts(self, node: Node) -> bool:
        """True unless ``node`` has Dragon pass-through options this backend cannot honour."""
        return not node.opts.custom_process

    @property
    def machine(self) -> Tuple[FrozenSet[int], FrozenSet[int], tuple]:
        """What its nodes run on, of this machine: the real core ids it pins them to,
        the GPU ids it hands out, and its inventory's shape (hosts' names, core ids,
        GPU ids, memory). A session holding two local backends of equal ``machine``
        places both's nodes from one ledger (see :class:`~rhapsody_graph.Session`)."""
        shape = tuple((h.name, h.cpus, h.gpus, h.memory) for h in self.inventory.hosts)
        gpus = frozenset(g for h in self.inventory.hosts for g in h.gpus)
        return frozenset(self._pins.values()), gpus, shape

    # -- encoding -----------------------------------------------------------------

    def server_spawner(self) -> Spawn:
        """How an inference service placed on this backend starts its server: a child
        of the driver (see :class:`~rhapsody_graph.InferenceBackend`)."""
        return local_server

    def prepare(self, node: Node) -> PoolCall:
        """Encode a node's call; raise ``TypeError`` naming what cannot be sent."""
        if node.opts.custom_process:
            _refuse_dragon_options(node, self.name)
        return self.pool.encode(node)

    # -- running (see PoolBackend for the rest) ----------------------------------------

    def kill(self, tid: int) -> None:
        launch = self._launches.get(tid)
        if launch is not None:
            launch.kill()  # its thread reaps the processes, then reports KILLED
        else:
            super().kill(tid)

    def pin(self, cpus: Sequence[int]) -> Tuple[int, ...]:
        """Real core ids for logical ones (see :func:`_pins`)."""
        pins = self._pins
        return tuple(sorted({pins[c] for c in cpus}))

    # -- lifecycle ----------------------------------------------------------------------

    def start(self, n: Optional[int] = None) -> "LocalBackend":
        """Start ``n`` workers now (default: all), rather than on first use (on the
        scheduler thread of an open session that runs the backend, which owns them)."""
        if not on_scheduler(self.pool.hub, lambda: self._start_workers(n)):
            self._start_workers(n)
        return self

    def _start_workers(self, n: Optional[int]) -> None:
        for _ in range(max(0, (n or self.max_workers) - len(self.pool.workers))):
            self._spawn()

    def abort(self) -> None:
        """Kill every worker and every launched process now."""
        refuse_foreign_abort(self, self.pool.hub)
        self._kill_launches()
        self.pool.abort()
        self.ledger.reset()  # in place: a session may share it (Session._share_machines)

    def shutdown(self) -> None:
        """Close the session using it, then stop the workers (EOF, then SIGKILL after
        2 s) and any launched process."""
        self.close_session()
        self._kill_launches()
        self._sweep()
        self.pool.close(grace=2.0)
        if self._forker is not None:
            self._forker.close()
            self._forker = None

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    # -- internals ------------------------------------------------------------------------

    def end_run(self) -> None:
        super().end_run()
        self._sweep()

    def _sweep(self) -> None:
        """Kill what ended launches left running outside their groups (one look at
        ``/proc`` for all of them)."""
        if self._ended_marks:
            watchdog.kill_marks(self._ended_marks)
            self._ended_marks.clear()

    def _kill_launches(self) -> None:
        """Kill every launched process; their completions are no longer reported."""
        for launch in self._launches.values():
            launch.kill()
        self._launches.clear()

    def _spawn(self) -> Worker:
        if wire.IMPORTING:
            raise RuntimeError(
                "compute() ran while a worker was importing the module that defines a task: "
                "module-level code runs again in every worker. Put the code that builds and "
                "computes the graph under `if __name__ == \"__main__\":`.")
        task_r, task_w = os.pipe()
        result_r, result_w = os.pipe()
        env = watchdog.marked({**os.environ, **names_env(self.gpu_names)})
        proc: Any = None
        try:
            pipes = (task_r, result_w, tracker.worker_end())
            proc = self._fork(pipes, env)
            if proc is None:
                proc = _Process(subprocess.Popen(
                    worker_command(*pipes), pass_fds=pipes,
                    stdin=subprocess.DEVNULL, start_new_session=True, env=env))
                watchdog.guard(proc.popen, env)
            else:
                watchdog.guard(proc, env)
        except BaseException:  # a Ctrl-C included: the worker started is not left
            if proc is not None:
                proc.kill()
                proc.wait()
                proc.close()
            os.close(task_w)
            os.close(result_r)
            raise
        finally:
            os.close(task_r)
            os.close(result_w)
        os.set_blocking(task_w, False)
        os.set_blocking(result_r, False)
        return self.pool.add(Worker(proc, task_w, result_r))

    def _fork(self, pipes: Tuple[int, int, int], env: Dict[str, str]) -> Optional[Forked]:
        """A worker forked from this backend's template, made on first use; ``None``
        where workers are spawned (by choice, or because the driver cannot be forked)."""
        if self.start_method != "fork":
            return None
        if self._forker is None:
            why = unsafe()
            if why is None:
                try:
                    self._forker = Forker()
                except OSError as exc:
                    why = f"the driver could not be forked ({exc})"
            if why is not None:
                self.start_method = "spawn"
                warn(f"LocalBackend(start_method='fork'): its workers are spawned instead, "
                     f"because {why}. Make the backend and start it (`backend.start()`) "
                     "before any thread or other session starts, and before a GPU runtime "
                     "is loaded.")
                return None
            watchdog.guard(self._forker, {})
        forked = self._forker.fork(pipes, env)
        if forked is None:
            if self._forker.alive:
                warn(f"LocalBackend(start_method='fork'): a worker could not be forked "
                     f"({self._forker.failure}); this one is spawned")
            else:
                self.start_method = "spawn"
                warn(f"LocalBackend(start_method='fork'): {self._forker.failure}; its "
                     "workers are spawned from now on")
        return forked

    def bind_worker(self, call: Call) -> Worker:
        """An idle worker for the call's lease, GPU-sticky (CUDA reads its GPU ids once),
        or a new one."""
        lease = call.lease
        gpus = lease.placement.gpus
        idle = self.pool.idle()
        w = None
        if gpus:
            w = (next((w for w in idle if w.gpus == gpus), None)
                 or next((w for w in idle if w.gpus is None), None))
            if w is None and len(self.pool.workers) >= self.max_workers and idle:
                self.pool.retire(idle[0], None)  # it holds a CUDA context on other GPUs
        else:
            w = next((w for w in idle if w.gpus is None), None) or (idle[0] if idle else None)
        if w is None:
            w = self._spawn()
        return self.pool.bind(lease, w, self.pin(lease.placement.cpus))

    def launch(self, call: Call) -> None:
        """An executable or a multi-rank node: its own processes, started by a thread."""
        p = call.prepared
        launch = self._launches[call.tid] = Launch(call.tid, call.key, self.pin, self._post,
                                                   self.gpu_names)
        if p.kind == FUNCTION:
            task = (call.tid, p.fid, p.func, p.args, call.inputs, None)
            launch.run_in_thread(launch.ranks, task, call.placements)
            return
        (argv, cwd, env), _ = wire.load_args(p.args, call.inputs)  # upstream values as text
        argv = [os.fsdecode(a) if isinstance(a, (bytes, os.PathLike)) else str(a) for a in argv]
        launch.run_in_thread(launch.executable, argv, cwd, env, call.placements)

    def _post(self, completion: Completion) -> None:
        """Called from launcher threads: hand the completion to the scheduler thread."""
        self.pool.hub.post(lambda out: self._take_posted(completion, out))

    def _take_posted(self, completion: Completion, out: List[Completion]) -> None:
        """On the scheduler thread: report a launch's end (``KILLED`` if it was killed)."""
        tid = completion[0]
        launch = self._launches.pop(tid, None)
        if launch is None:
            return  # aborted: already reported
        self._ended_marks.extend(p.mark for p in launch.procs if getattr(p, "mark", None))
        out.append((tid, KILLED, None, 0.0) if launch.killed else completion)


def _pins(inventory: Inventory, real: Sequence[int]) -> Dict[int, int]:
    """The real core each declared core id runs on: itself where this process may run
    on it, else the real cores in turn, in the order of those other ids (declared
    cores 5 and 7 of a 2-core machine run on cores 0 and 1, not both on 1)."""
    declared = sorted({c for host in inventory.hosts for c in host.cpus})
    mine = set(real)
    pins = {c: c for c in declared if c in mine}
    pins.update((c, real[i % len(real)]) for i, c in enumerate(c for c in declared
                                                                 if c not in mine))
    return pins


def _refuse_dragon_options(node: Node, backend: str) -> None:
    """Refuse the options only Dragon honours (its pass-throughs), naming the node."""
    opts = node.opts
    for name, value in (("policy", opts.policy), ("process_template", opts.template),
                        ("process_templates", opts.templates)):
        if value is not None:
            raise ValueError(f"node {node.key!r}: option {name!r} is passed to Dragon and only "
                             f"the Dragon backend takes it; it was routed to {backend!r}")
