"""The Dragon backend: ready nodes and their placements lowered to Dragon Batch calls.

Programs that use it run under the Dragon launcher (``dragon my_workflow.py``).
The scheduler resolves every edge; Batch only executes (it never sees a
dependency, so a wide join cannot hang it). Lowering, by node:

============================== =====================================================
node                           Batch call
============================== =====================================================
Python, no explicit placement  ``batch.function``: Batch picks the pool worker
Python with ``cpus``/``gpus``  ``batch.process(ProcessTemplate(..., policy=Policy(
                               placement=HOST_NAME, host_name, cpu_affinity,
                               gpu_affinity)))`` with the ledger's ids
``ranks=N``                    ``batch.job([(1, template_r), ...])``, one template
                               per rank with that rank's placement
executable                     ``batch.process`` (``batch.job`` for ranks); the
                               program's stdout, stderr and exit code come back
============================== =====================================================

AI nodes run on an :class:`~rhapsody_graph.InferenceBackend` placed ``on=`` this
backend: its servers are Dragon processes on the hosts the ledger placed their
services on (:meth:`DragonBackend.server_spawner`, :mod:`.dragon_service`).

Every Batch call runs :func:`.dragon_worker.serve`: a worker that connects back to
this driver over a socket (authenticated with the run's secret token) and runs
the calls it is sent, so placed nodes still return values and exceptions carry
their remote traceback. A lease (see :mod:`.base`) is one Batch call: the
scheduler queues a run of tiny nodes on it (fusion: 100 no-op nodes cost a few
Batch calls, not 100) and keeps it open along a chain, so a hop costs one socket
round trip, not one Batch call. ``prepare`` turns a node into a flat
:class:`~.pool.PoolCall` whose ``options`` (a ``_Lowering``) say what its Batch calls
need (placement mode, raw policy, template arguments); nothing after it sees the node.

State: ``pool`` (a :class:`~.pool.WorkerPool`: the workers, leased or running a
rank, with their sockets, queues and leases; ``pool.connecting`` holds those whose
Batch call has not connected yet, each with the time by which it must: a timer of
the queue), ``_jobs`` (tid → the ranks of each executable or multi-rank node,
values gathered as they arrive), ``_batch`` (the Batch client, started on first
use), ``_listener`` (the socket workers connect to, watched by the session's
completion queue) and ``_token``, and ``_stopped`` (killed calls Batch has not
seen end yet). Policy: a worker lives as long as its lease, one-shot workers
(executables, ranks) until their value arrives; a worker that does not connect
within ``start_timeout`` fails its node. A timeout is passed to Batch as
the call's own timeout and enforced here too, by killing the process; Ctrl-C and
failures kill every process worker.
"""
from __future__ import annotations

import hmac
import os
import pickle
import secrets
import selectors
import signal
import socket
import threading
import time
import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import dragon_runtime, watchdog, wire
from .base import (DIED, ERROR, KILLED, LONGEST_WAIT, OK, RANKS_KIND, Call, Completion,
                   Completions, Lease, refuse_foreign_abort)
from .dragon_worker import HELLO, TOKEN_BYTES, serve
from .programs import run_program
from .dragon_service import DragonServer
from .launch import describe_exit
from .pool import PoolBackend, PoolCall, Worker, WorkerPool, max_workers, place
from ..ai.service import LOOPBACK, Spawn
from ..errors import WorkerDiedError, brief, note_rank
from ..graph import EXECUTABLE, FUNCTION, Node
from ..resources import Host, Inventory, Ledger, Placement

__all__ = ["DragonBackend", "dragon_hosts"]

#: every backend whose Batch client runs: shut down when the main thread ends, before
#: Python waits for non-daemon threads (Batch keeps some), so that a program whose
#: backend never joined a session, or failed before closing it, still exits
_started: "weakref.WeakSet[DragonBackend]" = weakref.WeakSet()


def _shut_down_started() -> None:
    for backend in list(_started):
        backend.shutdown()
    dragon_runtime.stop()  # a runtime this process started (python script.py), if any


threading._register_atexit(_shut_down_started)  # the hook concurrent.futures uses too

TIMEOUT_GRACE = 5.0  # Batch's own timeout fires this long after ours, as a backstop
JOIN_TIMEOUT = 60.0  # shutdown() terminates a Batch client that takes longer to join
TERMINATE_TIMEOUT = 15.0  # and gives up on a terminate that hangs (a runtime already gone)
SETTLE_TIMEOUT = 10.0  # shutdown() waits this long for killed processes' Batch calls to end


def _dragon() -> Any:
    """Import the Dragon modules, or say what to install and how to launch."""
    try:
        import dragon  # noqa: F401  (sets up the runtime's multiprocessing context)
        from dragon.native import machine
        from dragon.workflows import batch
    except ImportError as exc:
        raise ImportError("DragonBackend needs Dragon: pip install \"rhapsody-graph[dragon]\", "
                          "then run your program with `python your_program.py` or "
                          "`dragon your_program.py`") from exc
    return machine, batch


def dragon_hosts(gpus: "int | Sequence[int] | None" = None) -> List[Host]:
    """The hosts of this Dragon allocation (``System().nodes``): names, core and GPU ids.

    ``gpus`` declares GPU ids per host where Dragon reports none (for tests on a
    machine without GPUs); hosts that report GPUs keep their own.
    """
    machine, _ = _dragon()
    if not dragon_runtime.attached():
        raise RuntimeError("dragon_hosts() needs a Dragon runtime: make a DragonBackend() "
                           "first (it starts one), or run under `dragon your_program.py`")
    hosts = []
    for huid in machine.System().nodes:
        node = machine.Node(huid)
        found = list(node.gpus or [])
        hosts.append(Host(node.hostname, list(node.cpus), found or (gpus or 0), id=huid))
    return hosts


def _declared_hosts(name: str, hosts: Sequence[Host], known: Sequence[Host]) -> List[Host]:
    """Declared hosts, each with Dragon's id for its name; refuse one this allocation does
    not have (its Batch calls would never start, and Dragon's client then breaks for
    every backend of the process)."""
    by_name = {h.name: h for h in known}
    out = []
    for h in hosts:
        if not isinstance(h, Host):
            raise TypeError(f"DragonBackend {name!r}: hosts= takes Host objects, got {brief(h)}")
        ours = by_name.get(h.name)
        if ours is None or h.id not in (None, ours.id):
            raise ValueError(f"DragonBackend {name!r}: host {h.name!r}"
                             + ("" if h.id is None else f" (id {h.id})")
                             + " is not a host of this Dragon allocation; its hosts: "
                             + ", ".join(f"{k.name!r} (id {k.id})" for k in known))
        out.append(h if h.id is not None else Host(h.name, h.cpus, h.gpus, h.memory, id=ours.id))
    return out


KILL_WAIT = 2.0  # seconds a kill waits for a SIGKILLed local process to be gone


def _wait_gone(pid: int, seconds: float) -> None:
    """Wait until process ``pid`` (Dragon's, not a child of ours) has ended, at most
    ``seconds``: its pidfd is readable then."""
    fd = os.pidfd_open(pid)
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            sel.select(seconds)
    finally:
        os.close(fd)


class _BatchProc:
    """A worker's Batch call, as the pool kills and describes it (a
    :class:`~.pool.WorkerProcess`), and which job rank it runs, if any."""

    def __init__(self, wid: int, host: str, own_process: bool, local: bool,
                 stopped: List["_BatchProc"]) -> None:
        self.wid, self.host, self.own_process, self.local = wid, host, own_process, local
        self.stopped = stopped  # the backend's list of killed calls not yet settled
        self.handle: Any = None  # the Batch task
        self.pid: Optional[int] = None  # known once connected
        self.deadline = 0.0  # connect by then
        self.job: Optional[_Job] = None
        self.rank = 0
        self.killed = False
        self.reason = ""  # why the driver gave up on it, for the error
        self.mark: Optional[str] = None  # its watchdog group marker (a process worker's)

    def kill(self) -> None:
        """Stop the worker's process tree (process workers only: a function worker is
        a Batch pool worker, which ends its call when its socket closes)."""
        if not self.own_process or self.killed:
            return
        self.killed = True
        self.stopped.append(self)
        if self.local and self.pid:
            try:
                os.kill(self.pid, signal.SIGKILL)
                _wait_gone(self.pid, KILL_WAIT)  # a cancel returns once it is gone
            except ProcessLookupError:
                pass
            watchdog.kill_marked(self)  # what it started: a program, its children
        elif self.handle is not None:
            try:
                self.handle.cancel()
            except Exception:
                pass

    def ended(self) -> bool:
        """Whether Batch has seen this killed call end (never waits)."""
        if self.handle is None:
            return True
        try:
            self.handle.get(block=False)
        except Exception as exc:  # its result may be an error: it ended all the same
            return type(exc).__name__ != "TaskNotReadyError"
        return True

    def settle(self) -> None:
        """Wait for Batch to see this killed call end (``Task.get`` may ignore its
        timeout: callers bound the wait)."""
        if self.handle is not None:
            try:
                self.handle.get()
            except Exception:
                pass

    def wait(self, timeout: Optional[float] = None) -> Optional[int]:
        """The Batch call's exit code (-9 when the driver killed it; see :meth:`code`)."""
        if self.killed:
            return -signal.SIGKILL
        return self.code(timeout)

    def code(self, timeout: Optional[float] = None) -> Optional[int]:
        """The exit code Batch reports for the call, ``None`` if not known within
        ``timeout`` s (a Batch call whose worker was SIGKILLed may never report, and
        ``Task.get`` blocks past its own timeout, so the wait is bounded here)."""
        code: List[Optional[int]] = [None]

        def get() -> None:
            try:
                got = self.handle.get()
            except Exception:
                return
            code[0] = got if isinstance(got, int) else 0
        _bounded(get, 2.0 if timeout is None else timeout)
        return code[0]

    def exit_reason(self, died: bool) -> str:
        """Why the driver gave up on it, else (if it died) its Batch call's own exit code
        (the pool killed it since: that kill is not how it ended)."""
        if self.reason or not died:
            return self.reason
        code = self.code(timeout=2.0)
        return "its exit status is not known" if code is None else describe_exit(code)

    def exit_fd(self) -> int:
        return -1  # a Batch call, maybe on another host: its socket's end tells

    def close(self) -> None:
        pass


class _Lowering:
    """What a node's options say about its Batch calls (a prepared call's ``options``)."""

    __slots__ = ("mode", "policy", "template", "templates", "custom")

    def __init__(self, opts: Any) -> None:
        self.mode = opts.resources.placement  # default, anywhere, host_name, host_id
        self.policy = opts.policy  # a raw Dragon Policy, used as it is
        self.template, self.templates = opts.template, opts.templates
        self.custom = opts.custom_process  # a process of its own: no shared lease

    def pinned(self, p: Placement) -> tuple:
        """The cores the worker pins itself to: those its rank's raw policy pins (shared
        by the ranks of its group), else the ledger's, unless Dragon chooses."""
        policy = self.raw_policy(p.rank)
        if policy is not None and policy.cpu_affinity:
            return tuple(policy.cpu_affinity)
        if self.mode in ("default", "anywhere") and policy is None:
            return ()
        return p.cpus

    def seen(self, p: Placement) -> Placement:
        """What rank ``p.rank`` runs with: the cores and GPUs its raw policy pins (shared
        by its group's ranks, reserved once by the first of them), else its own."""
        policy = self.raw_policy(p.rank)
        if policy is None or not (policy.cpu_affinity or policy.gpu_affinity):
            return p
        return Placement(p.host, tuple(policy.cpu_affinity) or p.cpus,
                         tuple(policy.gpu_affinity) or p.gpus, p.memory, p.rank,
                         p.world_size, p.local_rank)

    def raw_policy(self, rank: int) -> Any:
        """The user's Dragon policy for rank ``rank``: its group's, else the node's."""
        group = self.template_arguments(rank).get("policy")
        return group if group is not None else self.policy

    def template_arguments(self, rank: int) -> Dict[str, Any]:
        """``process_template=`` for every rank, or rank ``rank``'s group of
        ``process_templates=``."""
        if self.templates is None:
            return self.template or {}
        for count, arguments in self.templates:
            if rank < count:
                return arguments
            rank -= count
        raise AssertionError("process_templates make fewer ranks than the node has")


class _Job:
    """The ranks of one node (or one executable): values gathered as they arrive."""

    def __init__(self, tid: int, key: str, ranks: int, many: bool) -> None:
        self.tid, self.key, self.many = tid, key, many
        self.values: List[Any] = [None] * ranks
        self.outputs: List[Optional[Tuple[str, str]]] = [None] * ranks  # what each printed
        self.workers: List[Worker] = []
        self.left = ranks


class DragonBackend(PoolBackend):
    """Run nodes as Dragon Batch calls, placed by the ledger on Dragon's hosts.

    Args:
        gpus: GPU ids (or a count) to declare on every host where Dragon finds none,
            so GPU placement is testable on a machine without GPUs.
        hosts: declare the inventory yourself (names must be Dragon host names).
        workers: most leases running at once (default: every core of every host).
        start_timeout: seconds a Batch call may take to start before its node fails.

    Run as ``python program.py`` (a single-host Dragon runtime is started for the
    process and stopped with its last Dragon backend: see :mod:`.dragon_runtime`) or
    under the launcher, ``dragon program.py`` (needed for several hosts)::

        backend = rhapsody.DragonBackend()
        print(backend.describe())
        result = rhapsody.compute(*nodes, backend=backend)
    """

    kinds = frozenset((FUNCTION, EXECUTABLE, RANKS_KIND))

    def __init__(self, gpus: "int | Sequence[int] | None" = None, *,
                 hosts: Optional[Sequence[Host]] = None, workers: Optional[int] = None,
                 start_timeout: float = 120.0, name: str = "dragon") -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"DragonBackend: name must be a non-empty string, got {brief(name)}")
        if isinstance(start_timeout, bool) or not isinstance(start_timeout, (int, float)) \
                or not 0 < start_timeout < float("inf"):
            raise ValueError(f"DragonBackend {name!r}: start_timeout must be a finite number "
                             f"of seconds > 0, got {brief(start_timeout)}")
        self._machine, self._batch_module = _dragon()
        dragon_runtime.ensure()  # outside the launcher: a runtime of this process's own
        self.name = name
        known = dragon_hosts(gpus)
        self.inventory = Inventory(_declared_hosts(name, hosts, known) if hosts else known)
        # the most ranks a Batch job can have here: dragonhpc 0.15 packs a job one rank
        # per core and waits forever for hosts it lacks (no timeout starts)
        per_host = len(self.inventory.hosts[0].cpus) // (2 if _threads_per_core() > 1 else 1)
        self._job_ranks = max(1, per_host) * len(self.inventory.hosts)
        self.max_workers = max_workers(workers, self.inventory, "DragonBackend")
        self.ledger = Ledger(self.inventory)
        self.pool = WorkerPool(self.max_workers, receive=self._receive)
        self._here = self._machine.current().hostname
        self.start_timeout = start_timeout
        self._jobs: Dict[int, _Job] = {}
        self._batch: Any = None
        self._token = secrets.token_bytes(TOKEN_BYTES)
        self._listener: Optional[socket.socket] = None
        self._address: Any = None
        self._stopped: List[_BatchProc] = []
        self._next_wid = 0
        self._program = wire.dump_callable(run_program)

    def describe(self) -> str:
        """A table of the hosts, core ids and GPU ids the ledger places work on."""
        rows = [f"{'host':<24} {'cores':>5}  core ids / gpu ids"]
        for h in self.inventory.hosts:
            rows.append(f"{h.name:<24} {len(h.cpus):>5}  {list(h.cpus)} / {list(h.gpus)}")
        return "\n".join(rows)

    # -- joining a session -------------------------------------------------------------

    def attach(self, completions: Optional[Completions]) -> None:
        """As :meth:`PoolBackend.attach`, and the listening socket is watched there too."""
        hub = self.pool.hub
        if completions is None and self._listener is not None and hub is not None:
            hub.unwatch(self._listener.fileno())
        super().attach(completions)
        if completions is not None and self._listener is not None:
            self._watch_listener()

    def _watch_listener(self) -> None:
        self.pool.hub.watch(self._listener.fileno(), selectors.EVENT_READ,
                            lambda mask, out: self._accept(out))

    def accepts(self, node: Node) -> bool:
        """Every option of a compute node (Dragon's pass-throughs too), and jobs of no
        more ranks than Batch can start here (see :meth:`prepare`)."""
        return node.opts.resources.ranks <= self._job_ranks

    # -- encoding ------------------------------------------------------------------

    def prepare(self, node: Node) -> PoolCall:
        """Encode a node's call (an executable: :func:`.programs.run_program` on its
        argv) with what its options say about its Batch call; raise ``TypeError``
        naming what cannot be sent, ``ValueError`` for a job too big for Batch."""
        ranks = node.opts.resources.ranks
        if ranks > self._job_ranks:
            raise ValueError(
                f"node {node.key!r} is a job of {ranks} ranks, but Dragon Batch runs a job "
                f"of at most one rank per core, {self._job_ranks} on this allocation "
                f"(ranks that share a policy's cores still count one each); ask for fewer "
                f"ranks or run on more hosts")
        lowering = _Lowering(node.opts)
        if len(self.inventory.hosts) == 1 and self.inventory.hosts[0].name == self._here:
            for arguments in [lowering.template or {}] + [a for _, a in lowering.templates or ()]:
                cwd = arguments.get("cwd")  # a process there would never start
                if cwd is not None and not os.path.isdir(cwd):
                    raise ValueError(f"node {node.key!r}: its process template's cwd "
                                     f"{os.fsdecode(cwd)!r} is not a directory here")
        prepared = self.pool.encode(node, program=self._program)
        prepared.options = lowering
        return prepared

    # -- running (see PoolBackend for the rest) ----------------------------------------

    def kill(self, tid: int) -> None:
        job = self._jobs.get(tid)
        if job is None:
            super().kill(tid)
            return
        self._end_job(job)  # SIGKILLed (or cancelled in Batch); not waited for
        self.pool.hub.post((tid, KILLED, None, 0.0))

    def end_lease(self, lease: Lease) -> None:
        w = self.pool.end_lease(lease)
        if w is not None and not w.queue:
            self.pool.detach(w)  # its Batch call ends and frees its pool slot

    def end_run(self) -> None:
        super().end_run()
        # forget the killed calls Batch has seen end (the rest wait for shutdown)
        self._stopped[:] = [proc for proc in self._stopped if not proc.ended()]

    def start(self, n: Optional[int] = None) -> "DragonBackend":
        """Start the Batch client now, rather than with the first node."""
        if self._batch is None:
            self._start_batch()
        return self

    # -- starting workers ------------------------------------------------------------

    def bind_worker(self, call: Call) -> Worker:
        """A new worker for the call's lease: a Batch call (a process of its own when
        placed, timed or templated) that connects back."""
        lease, lowering = call.lease, call.prepared.options
        p = lease.placement
        as_process = lowering.mode != "default" or call.timeout is not None or lowering.custom
        w = self._new_worker(p.host, own_process=as_process)
        args = (self._address, self._token, w.proc.wid, as_process)
        batch = self._options(call.timeout)
        if as_process:
            w.proc.handle = batch.process(self._template(lowering, p, args, w.proc))
        else:
            w.proc.handle = batch.function(serve, *args)
        return self.pool.bind(lease, w, lowering.pinned(p))

    def launch(self, call: Call) -> None:
        """An executable or a multi-rank node: one Batch process (or job), a worker per rank."""
        placements, p0 = call.placements, call.prepared
        lowering = p0.options
        job = self._jobs[call.tid] = _Job(call.tid, call.key, len(placements), p0.ranks > 1)
        templates = []
        for rank, granted in enumerate(placements):
            p = lowering.seen(granted)
            w = self._new_worker(p.host, own_process=True)
            w.proc.job, w.proc.rank = job, rank
            job.workers.append(w)
            task = (call.tid, p0.fid, p0.func, p0.args, call.inputs, place(p, lowering.pinned(p)))
            w.outbox += wire.frame(("run", [task]))
            w.queue.append(call.tid)
            args = (self._address, self._token, w.proc.wid, True)
            templates.append((1, self._template(lowering, p, args, w.proc)))
        batch = self._options(call.timeout)
        handle = batch.process(templates[0][1]) if len(templates) == 1 else batch.job(templates)
        for w in job.workers:
            w.proc.handle = handle

    def _new_worker(self, host: str, own_process: bool) -> Worker:
        """A worker whose Batch call is about to start; it must connect back in time."""
        self.start()
        self._next_wid += 1
        proc = _BatchProc(self._next_wid, host, own_process, host == self._here, self._stopped)
        proc.deadline = time.monotonic() + self.start_timeout
        w = self.pool.add(Worker(proc, wid=proc.wid))
        self.pool.hub.call_at(proc.deadline, self._expire_starts)
        return w

    def _options(self, timeout: Optional[float]) -> Any:
        if timeout is None or timeout > LONGEST_WAIT:  # ours alone (see LONGEST_WAIT)
            return self._batch
        return self._batch.options(timeout=timeout + TIMEOUT_GRACE)

    def policy(self, node: Node, p: Placement) -> Any:
        """The Dragon ``Policy`` for ``node``'s process at placement ``p``.

        ``host_name``/``host_id`` carry the ledger's host, cores and GPUs;
        ``default``/``anywhere`` leave the choice to Dragon; a raw ``policy=`` is
        used as it is.
        """
        return self._policy(_Lowering(node.opts), p)

    def _policy(self, lowering: "_Lowering", p: Placement) -> Any:
        raw = lowering.raw_policy(p.rank if p is not None else 0)
        if raw is not None:
            return raw
        from dragon.infrastructure.policy import Policy
        mode = lowering.mode
        if mode in ("default", "anywhere"):
            return Policy(placement=getattr(Policy.Placement, mode.upper()))
        pinned = dict(cpu_affinity=list(p.cpus), gpu_affinity=list(p.gpus))
        if mode == "host_id":
            host = next(h for h in self.inventory.hosts if h.name == p.host)
            return Policy(placement=Policy.Placement.HOST_ID, host_id=host.id, **pinned)
        return Policy(placement=Policy.Placement.HOST_NAME, host_name=p.host, **pinned)

    def _template(self, lowering: "_Lowering", p: Placement, args: tuple,
                  proc: _BatchProc) -> Any:
        """The ``ProcessTemplate`` of one rank: our worker, the user's template arguments."""
        from dragon.native.process import ProcessTemplate
        extra = dict(lowering.template_arguments(p.rank))
        extra.pop("policy", None)  # the rank's policy comes from _policy
        # the run marker: the driver's watchdog ends the process if the driver dies; its
        # group marker: killing the node kills what the process started too
        env = watchdog.marked({**(extra.pop("env", None) or {}), **p.env()})
        proc.mark = env[watchdog.GROUP]
        return ProcessTemplate(target=serve, args=args, env=env,
                               policy=self._policy(lowering, p), **extra)

    def _start_batch(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind((self._reachable(), 0))
        listener.listen(256)
        listener.setblocking(False)
        self._address = listener.getsockname()
        self._listener = listener
        if self.pool.hub is not None:
            self._watch_listener()
        self._batch = _start_batch_client(self._batch_module, self._machine)
        _started.add(self)

    def _reachable(self) -> str:
        """This driver's address as processes on every host of the inventory reach it."""
        if len(self.inventory.hosts) == 1:
            return LOOPBACK
        return socket.gethostbyname(socket.gethostname())

    def server_spawner(self) -> Spawn:
        """How an inference service placed on this backend starts its server: a Dragon
        process on the service's host. Called on the scheduler thread, before a request
        thread starts one: it starts Batch first, as the first use of Dragon's channels
        in a process is not thread-safe (0.15: DRAGON_LOCK_ALREADY_INITD when Batch()
        starts at the same time)."""
        self.start()
        return self._spawn_server

    def _spawn_server(self, model: Any, placement: Optional[Placement]) -> DragonServer:
        """An inference service's server: a Dragon process on the host of its placement
        (the driver's without one), pinned to its cores and GPUs."""
        from dragon.infrastructure.policy import Policy
        host = placement.host if placement is not None else self._here
        pinned = {} if placement is None else dict(cpu_affinity=list(placement.cpus),
                                                   gpu_affinity=list(placement.gpus))
        policy = Policy(placement=Policy.Placement.HOST_NAME, host_name=host, **pinned)
        bind = LOOPBACK if host == self._here else self._ip(host)
        # server_spawner() started Batch, and with it the listener whose address workers reach
        return DragonServer(model.name, host, bind, self._address[0], policy, self.start_timeout)

    def _ip(self, host: str) -> str:
        """The address Dragon reports for ``host`` (else what its name resolves to)."""
        machine = self._machine
        for huid in machine.System().nodes:
            node = machine.Node(huid)
            if node.hostname == host and node.ip:
                return node.ip[0] if isinstance(node.ip, (list, tuple)) else node.ip
        return socket.gethostbyname(host)

    # -- the loop ---------------------------------------------------------------------

    def _expire_starts(self, out: List[Completion]) -> None:
        """Fail the workers whose Batch call has not connected by its deadline."""
        now = time.monotonic()
        for w in [w for w in self.pool.connecting.values() if w.proc.deadline <= now]:
            w.proc.reason = (f"Dragon did not start its Batch call within {self.start_timeout:g} s "
                             "(start_timeout=); is the allocation busy?")
            self._fail_worker(w, out)

    def _accept(self, out: List[Completion]) -> None:
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        try:
            conn.settimeout(10)
            hello = wire.recv_exactly(conn, TOKEN_BYTES + HELLO.size)
        except OSError:
            conn.close()
            return
        wid, pid = HELLO.unpack(hello[TOKEN_BYTES:])
        w = self.pool.connecting.get(wid)
        if w is None or not hmac.compare_digest(hello[:TOKEN_BYTES], self._token):
            conn.close()  # not one of ours, or given up on
            return
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.setblocking(False)
        fd = conn.detach()
        w.proc.pid = pid
        self.pool.connected(w, fd, os.dup(fd))

    def _receive(self, w: Worker, out: List[Completion]) -> None:
        """A worker's results: a leased call's are reported, a job rank's gathered."""
        if w.proc.job is None:
            self.pool.receive(w, out)
        else:
            self._gather(w, w.proc.job, out)

    def _gather(self, w: Worker, job: "_Job", out: List[Completion]) -> None:
        """Keep a rank's value until every rank has sent one; its error ends the job."""
        results = self.pool.read(w)
        if results is None:
            self._fail_worker(w, out)
            return
        for status, _, _, payload in results:
            w.queue.clear()
            self.pool.detach(w)
            status, payload, job.outputs[w.proc.rank] = wire.take_output(
                status & ~wire.GPU_RUNTIME, payload)
            if status == wire.OK:
                job.values[w.proc.rank] = payload
                job.left -= 1
                if not job.left:
                    self._finish(job, out)
            else:
                exc = wire.load_error(payload, job.key)
                if job.many:
                    note_rank(exc, w.proc.rank, len(job.values))
                self._end_job(job)
                out.append((job.tid, ERROR, exc, 0.0, tuple(job.outputs)))

    def _finish(self, job: _Job, out: List[Completion]) -> None:
        self._end_job(job)
        if job.many:
            payload = wire.dump_value([pickle.loads(v) for v in job.values])
        else:
            payload = job.values[0]
        out.append((job.tid, OK, payload, 0.0, tuple(job.outputs)))

    def _fail_worker(self, w: Worker, out: List[Completion]) -> None:
        """A worker died or never started: fail what it held."""
        job = w.proc.job
        if job is None:
            self.pool.retire(w, DIED)
            return
        reason = w.proc.exit_reason(True)
        exc = WorkerDiedError(f"rank {w.proc.rank} of node {job.key!r} died ({reason}) "
                              "before returning a value" if job.many else
                              f"the process running node {job.key!r} died ({reason})")
        self._end_job(job)
        out.append((job.tid, DIED, wire.attach(exc, "", job.key), 0.0))

    def _end_job(self, job: _Job) -> None:
        self._jobs.pop(job.tid, None)
        for w in job.workers:
            if w in self.pool.workers:
                w.proc.kill()
                self.pool.detach(w)

    # -- ending ------------------------------------------------------------------------

    def _end_jobs(self) -> None:
        """End every job (their workers still starting are given up on)."""
        for job in list(self._jobs.values()):
            self._end_job(job)

    def abort(self) -> None:
        """Kill every process worker and end every Batch call now."""
        refuse_foreign_abort(self, self.pool.hub)
        self._end_jobs()
        self.pool.abort()
        self.ledger = Ledger(self.inventory)

    def __exit__(self, *exc: Any) -> None:
        self.shutdown(graceful=exc[0] is None)

    def shutdown(self, graceful: bool = True) -> None:
        """Stop every worker, then end the Batch client (and with it the pool).

        ``graceful=False`` (on an exception or Ctrl-C) terminates the Batch client
        instead of joining it, as ``with Batch()`` does.
        """
        self.close_session()  # the session using it stops first
        self._end_jobs()
        self.pool.abort()  # process workers killed; every socket closed
        if self._listener is not None:
            if self.pool.hub is not None:
                self.pool.hub.unwatch(self._listener.fileno())
            self._listener.close()
            self._listener = None
        if self._batch is not None:
            batch, self._batch = self._batch, None
            settled = False
            try:
                self._settle()
                settled = True
            finally:  # a second Ctrl-C while settling still terminates
                if not (settled and graceful and _joined(batch)):
                    _bounded(batch.terminate, TERMINATE_TIMEOUT)

    def _settle(self) -> None:
        """Wait for the Batch calls of killed processes to end before Batch is stopped.

        Dragon's global services crash the whole runtime ("Abnormal Termination ...
        fatal exception", dragonhpc 0.15) when a process exits after the Batch worker
        joining it is gone, which a terminate right after a kill brings about.
        """
        stopped, self._stopped[:] = list(self._stopped), []
        # the ranks of a job share one handle
        calls = list({id(proc.handle): proc for proc in stopped}.values())
        _bounded(lambda: [proc.settle() for proc in calls], SETTLE_TIMEOUT)


def _threads_per_core() -> int:
    """Hardware threads per core of this host (1 on most cloud VMs)."""
    try:
        with open("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list") as f:
            text = f.read().strip()
    except OSError:
        return 2
    count = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        count += int(hi or lo) - int(lo) + 1
    return max(1, count)


def _start_batch_client(batch_module: Any, machine: Any) -> Any:
    """``Batch()``, told the true core count of hosts without hyperthreads.

    dragonhpc 0.15's Batch takes half of a node's CPUs as its cores (it assumes two
    hardware threads per core). On a host with one thread per core that halves its
    pool, and a job of more ranks than that half is treated as a multi-node job that
    waits forever for nodes the allocation does not have (its timeout never starts).
    While ``Batch()`` reads the node list, report twice the CPUs there so the halving
    yields the real count.
    """
    if _threads_per_core() != 1:
        return batch_module.Batch()
    real = machine.Node.num_cpus
    machine.Node.num_cpus = property(lambda node: 2 * real.fget(node))
    try:
        return batch_module.Batch()
    finally:
        machine.Node.num_cpus = real


def _joined(batch: Any) -> bool:
    """Join the Batch client (its pool ends once every call has); False if that fails
    or takes longer than :data:`JOIN_TIMEOUT` (``Batch.join`` may wait forever for a
    client request after a worker was SIGKILLed, whatever its ``timeout=``)."""
    failed = []

    def join() -> None:
        try:
            batch.join(timeout=JOIN_TIMEOUT)
        except Exception as exc:
            failed.append(exc)
    return _bounded(join, JOIN_TIMEOUT) and not failed


def _bounded(fn: Any, seconds: float) -> bool:
    """Call ``fn`` in a daemon thread; stop waiting for it after ``seconds``; True if
    it returned by then.

    After a Ctrl-C that reached the whole process group, Dragon's own services may be
    gone, and ``Batch.terminate`` then waits for an answer forever; a Batch
    ``Task.get(timeout=)`` or ``Batch.join(timeout=)`` can block past its timeout
    (dragonhpc 0.15).
    """
    import threading
    t = threading.Thread(target=fn, name="rhapsody-dragon-bounded", daemon=True)
    t.start()
    t.join(seconds)
    return not t.is_alive()

