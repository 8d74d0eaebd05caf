"""The Dask backend: calls run on the workers of a real ``distributed`` cluster.

``DaskBackend(client= | cluster= | address=)`` joins a session like any backend. Its
inventory is the cluster's worker list: one host per worker, named by the worker's
address, its threads as core slots and its declared ``GPU`` resource as GPU ids.
The ledger's placement picks the worker; the call goes to exactly that worker
(``workers=[address]``, ``resources={"GPU": n}`` for a GPU node), and there it sets
the GPU masks (``CUDA_VISIBLE_DEVICES``, ``ROCR_VISIBLE_DEVICES``,
``ZE_AFFINITY_MASK``) to the ledger's ids before the body runs. Workers that join
the cluster later are added to the inventory, workers that leave are removed.

Python nodes run under leases, as on the local backend: a lease is one core of one
worker held by the ledger, and the scheduler queues up to its depth (about 50 ms
of measured work: ``lease_budget``) of tiny calls on it at once, so Dask's round trip
is paid per batch, not per call. Executables (run by :func:`.programs.run_program` on the worker) get a
placement of their own. Every call is one Dask task of one function with pickled
arguments, its upstream values filled in on the worker; the value comes back
pickled with the time the body ran, an exception with its remote traceback.
Multi-rank and AI nodes go to other backends of the session. A call whose worker
left the cluster (the scheduler's ``remove-worker`` event, to which the backend
subscribes) completes ``DIED``, so the scheduler retries it as an infrastructure
failure.

Killing a call (a timeout, a cancel) cancels its Dask future, then asks its worker
(``client.run``) what the call is doing: a queued call never starts; an executable's
process group is killed; a Python body running in a worker thread, which no thread
API can stop, is stopped by restarting that worker through its nanny (the other
calls it was running fail over as infrastructure failures). ``KILLED`` is reported
once that is done, so the ledger gets the core back only when the work has stopped.

State: ``_running`` (tid → the Dask future of each call) and ``_where`` (tid → its
worker); each future's done-callback appends it to ``_ended``, which the collector
thread takes whole: it fetches the values of every call that ended since its last
round in one ``gather`` (one round trip per batch, not per call) and posts them to
the session's queue. ``_live``: the workers the scheduler has now; ``_killers``: the
threads stopping killed calls. ``_shared``: an upstream value of ``SHARED`` bytes or
more goes to the cluster once, as a Dask task of its own that the calls reading it
take as an argument (id of the value's bytes → ``[bytes, its Dask future, calls
using it]``; ``_reads``: tid → the ids its call uses), not inline in each call. One
that no call reads now is kept for later readers (``_unread``, oldest first, up to
``SHARED_KEPT`` bytes) until the session goes idle. On a worker, ``_calls`` maps each running
call's key to its thread.

>>> DaskBackend.kinds == frozenset({"function", "executable"})
True
"""
from __future__ import annotations

import os
import threading
import time
from types import CoroutineType
from typing import Any, Dict, List, Optional, Tuple

from . import wire
from .base import (DIED, ERROR, KILLED, OK, Call, Completion, Completions, OwnCalls,
                   close_session, environ, refuse_foreign_abort)
from .pool import encode_arguments, encode_function, encode_program
from .programs import kill_program_of, run_program
from ..errors import WorkerDiedError, brief, warn
from ..graph import EXECUTABLE, FUNCTION
from ..resources import Host, Inventory, Ledger, gpu_masks, gpu_names, placed

__all__ = ["DaskBackend"]

SHARED = 1 << 20  # an upstream value this big is sent once, not with each call reading it
SHARED_KEPT = 1 << 30  # bytes of such values kept while no call reads them (see _read)


class _DaskCall:
    """A node's call, encoded: its function's bytes and its arguments' (with slots)."""

    __slots__ = ("key", "kind", "func", "args")

    def __init__(self, key: str, kind: str, func: bytes, args: wire.Args) -> None:
        self.key, self.kind, self.func, self.args = key, kind, func, args


#: while its cluster has no worker, how often a backend looks whether its client closed
EMPTY_LOOK = 0.5

_calls: Dict[str, int] = {}  # on a worker: the key of each call running there -> its thread


#: on a Dask worker, its host's GPU UUIDs by id, read when this module loads there (before
#: any call sets the masks): a placement's GPU ids are shown to its call as those UUIDs
_HOST_GPUS = gpu_names()

#: id(client) -> (client, the handlers of its "all" topic): a client keeps one handler
#: per topic, so the backends that share a client share one that calls each of theirs
_listeners: Dict[int, Tuple[Any, List[Any]]] = {}
_listeners_lock = threading.Lock()


def _listen(client: Any, handler: Any) -> None:
    """Have ``handler`` get the scheduler's events (workers that leave or join)."""
    with _listeners_lock:
        entry = _listeners.get(id(client))
        if entry is None:
            handlers: List[Any] = []
            entry = _listeners[id(client)] = (client, handlers)
            client.subscribe_topic("all", lambda event: [h(event) for h in list(handlers)])
        entry[1].append(handler)


def _unlisten(client: Any, handler: Any) -> None:
    """``handler`` gets no more events; the client's last one unsubscribes."""
    with _listeners_lock:
        entry = _listeners.get(id(client))
        if entry is None:
            return
        if handler in entry[1]:
            entry[1].remove(handler)
        if entry[1]:
            return
        del _listeners[id(client)]
    if client.status == "running":  # else the scheduler logs that it could not
        client.unsubscribe_topic("all")  # tell this closing client it left


def _run(key: str, func: bytes, args: bytes, inputs: List[bytes], env: Dict[str, str]) -> tuple:
    """On a Dask worker: run one call in the environment of its placement (GPU masks,
    ``current_placement()``), then put the worker's back; never raises. Returns
    ``(status, payload, seconds the body ran)``. Calls that run at once on one worker
    (its threads) each see their own ``current_placement()``, but share one process
    environment: its GPU masks are the last call's (docs/dask.md)."""
    _calls[key] = threading.get_ident()
    start = time.perf_counter()
    if _HOST_GPUS and env.get("RHAPSODY_GPUS"):
        env = {**env, **gpu_masks([int(g) for g in env["RHAPSODY_GPUS"].split(",")],
                                  _HOST_GPUS)}
    with environ(env), placed(env):
        try:
            fn, a, kw = wire.load_call(func, args, inputs)
            start = time.perf_counter()  # not the import of fn's module, on its first call
            value = fn(*a, **kw)
            if type(value) is CoroutineType:  # an async def function's call
                value = wire.await_coroutine(value)
            result = ("ok", wire.dump_result(value))
        except BaseException as exc:  # the driver raises it, with this traceback
            result = ("error", wire.dump_error(exc))
        finally:
            del _calls[key]
    return result + (time.perf_counter() - start,)


def _value(value: bytes) -> bytes:
    """On a worker: an upstream value sent once, for the calls that read it."""
    return value


def _stop(key: str) -> str:
    """On a worker (``client.run``): stop call ``key`` if its body runs a program (its
    process group is killed); say what was found: ``"program"``, ``"thread"`` (a
    Python body is running) or ``"absent"`` (it is not running here)."""
    ident = _calls.get(key)
    if ident is None:
        return "absent"
    return "program" if kill_program_of(ident) else "thread"


class DaskBackend(OwnCalls):
    """Run Python nodes and executables on a Dask ``distributed`` cluster.

    Args:
        client: a ``distributed.Client`` to use (kept open at shutdown).
        cluster: a cluster object (``LocalCluster``, a dask-jobqueue cluster); a client
            is made for it and closed at shutdown.
        address: a scheduler address (``"tcp://host:8786"``); likewise.
        name: the backend's name in a session.
        timeout: seconds to wait for the scheduler to answer.
    Raises:
        ImportError: without ``distributed`` (the ``dask`` extra).
        TypeError: not exactly one of ``client``, ``cluster``, ``address``.
        RuntimeError: the scheduler at ``address`` cannot be reached, or has no worker.
    """

    kinds = frozenset((FUNCTION, EXECUTABLE))
    fuses = True  # see rhapsody_graph.fusion
    #: a Dask round trip costs milliseconds: a lease queues up to 50 ms of measured work
    lease_budget = 0.05

    def __init__(self, client: Any = None, *, cluster: Any = None, address: Optional[str] = None,
                 name: str = "dask", timeout: float = 10.0) -> None:
        try:
            from distributed import Client
        except ImportError as exc:
            raise ImportError('DaskBackend needs Dask distributed: '
                              'pip install "rhapsody-graph[dask]"') from exc
        if sum(x is not None for x in (client, cluster, address)) != 1:
            raise TypeError("DaskBackend: give exactly one of client=, cluster= or address=")
        if not isinstance(name, str) or not name:
            raise TypeError(f"DaskBackend: name must be a non-empty string, got {brief(name)}")
        self.name = name
        self._own = client is None
        if client is None:
            try:
                client = Client(cluster if cluster is not None else address, timeout=timeout,
                                set_as_default=False)
            except (OSError, TimeoutError) as exc:
                where = address if address is not None else repr(cluster)
                raise RuntimeError(f"DaskBackend {name!r}: cannot reach the Dask scheduler at "
                                   f"{where} within {timeout:g} s: {exc}") from exc
        self.client = client
        try:
            self.inventory = Inventory(self._hosts())
        except BaseException:  # a client it made is not left connected
            if self._own:
                client.close()
            raise
        # in every Dask key: another driver's calls on the same scheduler are other keys
        self._token = os.urandom(6).hex()
        self.ledger = Ledger(self.inventory)
        self._program = wire.dump_callable(run_program)
        self._running: Dict[int, Any] = {}  # tid -> its Dask future
        self._where: Dict[int, str] = {}  # tid -> the worker it was sent to
        self._live = {h.name for h in self.inventory.hosts}  # workers the scheduler has now
        self._killers: List[threading.Thread] = []  # stopping killed calls (see kill)
        self._shared: Dict[int, List[Any]] = {}  # big upstream values sent once (see above)
        self._reads: Dict[int, List[int]] = {}  # tid -> the shared values its call reads
        self._unread: Dict[int, int] = {}  # shared values no call reads now -> their size
        self._ended: List[Tuple[int, Any]] = []  # (tid, future) of calls that ended, not fetched
        self._ended_cv = threading.Condition()
        self._open = False
        self._start()

    def _start(self) -> None:
        """Collect results and hear of workers that leave or join (again, after a
        shutdown)."""
        self._open = True
        self._collector = threading.Thread(target=self._collect, daemon=True,
                                           name=f"rhapsody-dask-{self.name}-results")
        self._collector.start()
        _listen(self.client, self._event)

    def _hosts(self) -> List[Host]:
        workers = self.client.scheduler_info(n_workers=-1)["workers"]
        if not workers:
            raise RuntimeError(f"DaskBackend {self.name!r}: the cluster has no worker yet; "
                               "start its workers first (cluster.scale(n), or wait_for_workers)")
        hosts = [_host(address, w) for address, w in sorted(workers.items())]
        for h in hosts:
            self._warn_shared(h)
        return hosts

    def _warn_shared(self, host: Host) -> None:
        """Warn of a worker of several threads with GPUs (at the start, or once it joins)."""
        if host.gpus and len(host.cpus) > 1:
            warn(f"DaskBackend {self.name!r}: worker {host.name} runs "
                 f"{len(host.cpus)} threads and has {len(host.gpus)} GPUs: calls "
                 "running at once there share one process environment, so a call's "
                 "CUDA_VISIBLE_DEVICES may be another's (its current_placement() is its own); "
                 "give GPU workers one thread (threads_per_worker=1, or dask-cuda's worker "
                 "per GPU)")

    # -- the backend protocol (see .base) ------------------------------------------------

    def attach(self, completions: Optional[Completions]) -> None:
        if completions is not None and not self._open:  # a session after a shutdown
            if self.client.status != "running":
                raise RuntimeError(f"DaskBackend {self.name!r} was shut down and its Dask "
                                   f"client is {self.client.status}: make a new DaskBackend")
            self.inventory = Inventory(self._hosts())
            self.ledger = Ledger(self.inventory)
            self._live = {h.name for h in self.inventory.hosts}
            self._start()
        super().attach(completions)

    def accepts(self, node: Any) -> bool:
        return not node.opts.custom_process  # Dragon's policy= and templates

    def uses_lease(self, prepared: Any) -> bool:
        return prepared.kind == FUNCTION

    def end_lease(self, lease: Any) -> None:
        pass  # its calls are Dask tasks: nothing is held on the worker

    def prepare(self, node: Any) -> _DaskCall:
        """The node's call, pickled now; raise ``TypeError`` naming what cannot be sent,
        ``RuntimeError`` once its client is closed (its cluster or scheduler is gone)."""
        if self.client.status in ("closing", "closed"):
            raise RuntimeError(f"node {node.key!r}: {self.lost}")
        if node.kind == EXECUTABLE:
            return _DaskCall(node.key, node.kind, self._program, encode_program(node))
        return _DaskCall(node.key, node.kind, encode_function(node), encode_arguments(node))

    def slots_free(self) -> int:
        return self.inventory.total_cpus

    def admit(self, prepared: Any) -> bool:
        return True

    def release_idle(self) -> bool:
        return False

    def submit(self, call: Call) -> None:
        p = call.placements[0]
        tid, prepared = call.tid, call.prepared
        if call.lease is not None:
            call.lease.executor = p.host  # the worker its calls queue on
        here = p.host in self._live  # else its worker left: Dask picks another
        key = f"{call.key}-{tid}-{self._token}"
        future = self.client.submit(
            _run, key, prepared.func, prepared.args, self._inputs(tid, call.inputs), p.env(),
            key=key, workers=[p.host] if here else None, pure=False,
            resources={"GPU": len(p.gpus)} if p.gpus else None)
        self._running[tid] = future
        self._where[tid] = p.host
        future.add_done_callback(lambda f: self._call_ended(tid, f))

    def _inputs(self, tid: int, inputs: Any) -> List[Any]:
        """The call's upstream values, each big one as the Dask future that holds it
        (sent to the cluster by its first reader)."""
        values = list(inputs)
        for i, value in enumerate(values):
            if len(value) >= SHARED:
                shared = self._shared.get(id(value))
                if shared is None:
                    held = self.client.submit(_value, value, pure=False,
                                              key=f"input-{tid}-{i}-{self._token}")
                    shared = self._shared[id(value)] = [value, held, 0]
                elif not shared[2]:
                    del self._unread[id(value)]
                shared[2] += 1
                self._reads.setdefault(tid, []).append(id(value))
                values[i] = shared[1]
        return values

    def _drop(self, tid: int) -> Tuple[Any, Optional[str]]:
        """Forget call ``tid`` (it ended, was killed, or its worker left); its Dask
        future and worker (``None`` if it was forgotten already)."""
        self._read(tid)
        return self._running.pop(tid, None), self._where.pop(tid, None)

    def _read(self, tid: int) -> None:
        """The call ``tid`` has ended: the shared values no other call reads are kept
        for later readers (calls of a later dispatch), the oldest released past
        ``SHARED_KEPT`` bytes; the rest go when the session is idle (:meth:`end_run`)."""
        unread = self._unread
        for ident in self._reads.pop(tid, ()):
            shared = self._shared[ident]
            shared[2] -= 1
            if not shared[2]:
                unread[ident] = len(shared[0])
        while unread and sum(unread.values()) > SHARED_KEPT:
            oldest = next(iter(unread))
            del unread[oldest], self._shared[oldest]

    def kill(self, tid: int) -> None:
        """Cancel the call's future; in a thread of its own, stop what it runs on its
        worker (see the module docstring), then report ``KILLED``."""
        future, worker = self._drop(tid)
        hub = self.hub
        if future is None or worker is None:
            hub.post((tid, KILLED, None, 0.0))
            return
        future.cancel()

        def stop() -> None:
            try:
                self._stop_on(worker, future.key)
            finally:
                hub.post((tid, KILLED, None, 0.0))
        self._killers = [k for k in self._killers if k.is_alive()]
        killer = threading.Thread(target=stop, name=f"rhapsody-dask-kill-{tid}", daemon=True)
        self._killers.append(killer)
        killer.start()

    def _stop_on(self, worker: str, key: str) -> None:
        """Stop call ``key`` on ``worker``: kill its program, or restart the worker if a
        Python body runs there (a worker without a nanny cannot be restarted: the
        body runs on, and only its result is thrown away)."""
        if worker not in self._live or self.client.status != "running":
            return
        try:
            found = self.client.run(_stop, key, workers=[worker], on_error="return")
        except Exception:  # the worker left meanwhile: nothing of the call is left there
            return
        if found.get(worker) == "thread":
            try:
                said = self.client.restart_workers([worker], raise_for_error=False)
            except Exception as exc:
                said = {worker: f"{type(exc).__name__}: {exc}"}
            if said.get(worker) != "OK":  # (Dask may lose a worker restarted while busy)
                warn(f"Dask did not restart worker {worker} to stop node call {key!r} "
                     f"({said.get(worker)}): if it does not come back, nodes wait for a "
                     "worker; restart the cluster's workers, or give nodes you may time "
                     "out or cancel an executable (killed without a restart)")

    def end_run(self) -> None:
        for ident in self._unread:
            del self._shared[ident]
        self._unread.clear()

    def abort(self) -> None:
        """Cancel every call; the ledger starts afresh."""
        refuse_foreign_abort(self, self.hub)
        for future in self._running.values():
            future.cancel()
        self._running.clear()
        self._where.clear()
        self._shared.clear()
        self._reads.clear()
        self._unread.clear()
        self.ledger = Ledger(self.inventory)

    def shutdown(self) -> None:
        """Close the session using it, cancel what runs, close a client it made."""
        close_session(self.hub)
        self.abort()
        for killer in self._killers:
            killer.join()
        with self._ended_cv:
            self._open = False
            self._ended_cv.notify()
        self._collector.join()
        _unlisten(self.client, self._event)
        if self._own:
            self.client.close()

    def __enter__(self) -> "DaskBackend":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        return f"<DaskBackend {self.name!r}: {len(self.inventory.hosts)} workers>"

    @property
    def waits_for_hosts(self) -> bool:
        """Every worker left (a nanny restarts them; a cluster scales up again): nodes
        wait for the next one to join, as Dask's own tasks do."""
        return not self.inventory.hosts and self.client.status == "running"

    @property
    def lost(self) -> Optional[str]:
        """Why it can run nothing more (its client closed), else ``None``."""
        if self.client.status == "running":
            return None
        return (f"the Dask client of backend {self.name!r} is {self.client.status} (its "
                "cluster or scheduler is gone); make a new DaskBackend for a running cluster")

    # -- internals -------------------------------------------------------------------------

    def _event(self, event: Any) -> None:
        """In the client's thread: a scheduler event; a worker that left or joined is
        handed to the scheduler thread (a joined one's threads and resources are asked
        for on a thread of its own: the client's blocking calls must not run on the
        client's event loop, nor stall the scheduler thread)."""
        message = event[1] if isinstance(event, tuple) and len(event) > 1 else None
        hub = self.hub
        if not isinstance(message, dict) or hub is None:
            return
        worker = message.get("worker")
        if message.get("action") == "add-worker":
            hub.post(lambda out: self._live.add(worker))
            threading.Thread(target=self._ask_worker, args=(worker, hub), daemon=True,
                             name=f"rhapsody-dask-{worker}").start()
        elif message.get("action") == "remove-worker":
            hub.post(lambda out: self._worker_left(worker, out))

    def _watch_empty(self, hub: Completions) -> None:
        """On a thread of its own while the cluster has no worker: once one joins, or the
        client closes, wake the scheduler (no event says that a client closed)."""
        while not self.inventory.hosts and self.client.status == "running" and self._open:
            time.sleep(EMPTY_LOOK)
        hub.post(lambda out: None)

    def _ask_worker(self, worker: str, hub: Completions) -> None:
        """On a thread of its own: worker ``worker`` joined; post its host to the scheduler."""
        try:
            info = self.client.scheduler_info(n_workers=-1)["workers"].get(worker)
        except Exception:  # the client closed meanwhile: nothing joins
            return
        if info is not None:
            hub.post(lambda out: self._worker_joined(worker, info))

    def _worker_joined(self, worker: str, info: Dict[str, Any]) -> None:
        """Its threads and GPUs join the inventory, unless it left meanwhile."""
        if worker in self._live and all(h.name != worker for h in self.inventory.hosts):
            host = _host(worker, info)
            self._warn_shared(host)
            self.ledger.add_host(host)

    def _worker_left(self, worker: str, out: List[Completion]) -> None:
        """It leaves the inventory; its calls fail ``DIED`` (the scheduler retries them).
        Once none is left, nodes wait for one to join, unless the client closes (the
        cluster is gone): then the session is woken, and fails them saying so."""
        self._live.discard(worker)
        self.ledger.remove_host(worker)
        if not self.inventory.hosts and self.hub is not None:
            threading.Thread(target=self._watch_empty, args=(self.hub,), daemon=True,
                             name=f"rhapsody-dask-{self.name}-empty").start()
        for tid in [t for t, w in self._where.items() if w == worker]:
            future, _ = self._drop(tid)
            future.cancel()
            key = _node_key(future.key)
            exc = WorkerDiedError(f"the Dask worker {worker} running node {key!r} left the "
                                  "cluster")
            out.append((tid, DIED, wire.attach(exc, "", key), 0.0))

    def _call_ended(self, tid: int, future: Any) -> None:
        """In Dask's callback thread: a call's future is done; the collector fetches it."""
        with self._ended_cv:
            self._ended.append((tid, future))
            self._ended_cv.notify()

    def _collect(self) -> None:
        """The collector thread: fetch the values of the calls that ended, all of them
        in one ``gather`` (one round trip per batch, not per call), and hand the batch
        to the scheduler thread. Sleeps on a condition while nothing ended."""
        while True:
            with self._ended_cv:
                while self._open and not self._ended:
                    self._ended_cv.wait()
                if not self._open:
                    return
                batch, self._ended = self._ended, []
            values = self._gather([f for _, f in batch if f.status == "finished"])
            hub = self.hub
            if hub is not None:
                hub.post(lambda out, b=batch, v=values: self._take(b, v, out))
            batch = values = None  # no Dask future kept here: its result leaves the worker

    def _gather(self, futures: List[Any]) -> Dict[str, tuple]:
        """The results of finished futures by key (one lost meanwhile is left out)."""
        if not futures:
            return {}
        try:
            return dict(zip([f.key for f in futures], self.client.gather(futures)))
        except Exception:  # one was lost or cancelled meanwhile: the others one by one
            values = {}
            for f in futures:
                try:
                    values[f.key] = f.result(timeout=0)
                except Exception:
                    pass
            return values

    def _take(self, batch: List[Tuple[int, Any]], values: Dict[str, tuple],
              out: List[Completion]) -> None:
        """On the scheduler thread: report the calls' ends (not those killed already)."""
        for tid, future in batch:
            if self._running.get(tid) is not future:
                continue
            self._drop(tid)
            key = _node_key(future.key)
            value = values.get(future.key)
            if value is not None:
                status, payload, seconds = value
                if status == "ok":
                    out.append((tid, OK, payload, seconds))
                else:
                    out.append((tid, ERROR, wire.load_error(payload, key), seconds))
                continue
            try:
                reason = repr(future.exception(timeout=0))
            except Exception as exc:  # cancelled by Dask itself (a lost client)
                reason = repr(exc)
            exc = WorkerDiedError(f"the Dask worker running node {key!r} was lost ({reason})")
            out.append((tid, DIED, wire.attach(exc, "", key), 0.0))


def _node_key(dask_key: str) -> str:
    """The node's key in a Dask key ``<node key>-<tid>-<token>``."""
    return dask_key.rsplit("-", 2)[0]


def _host(address: str, info: Dict[str, Any]) -> Host:
    """A worker of the scheduler's list as a host: its threads, its declared GPUs, its
    memory limit (none set: this machine's memory)."""
    limit = info.get("memory_limit")
    return Host(address, int(info.get("nthreads", 1)) or 1,
                int((info.get("resources") or {}).get("GPU", 0)),
                int(limit) if limit else None)
