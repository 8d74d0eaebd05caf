"""The Dask backend: calls run on the workers of a real ``distributed`` cluster.

``DaskBackend(client= | cluster= | address=)`` joins a session like any backend. Its
inventory is the cluster's worker list: one host per worker, named by the worker's
address, its threads as core slots and its declared ``GPU`` resource as GPU ids.
The ledger's placement picks the worker; the call goes to exactly that worker
(``workers=[address]``, ``resources={"GPU": n}`` for a GPU node), and there it sets
the GPU masks (``CUDA_VISIBLE_DEVICES``, ``ROCR_VISIBLE_DEVICES``,
``ZE_AFFINITY_MASK``) to the ledger's ids before the body runs.

Python nodes and executables (run by :func:`.programs.run_program` on the worker)
are calls of one function with pickled arguments, their upstream values filled in
on the worker; the value comes back pickled, an exception with its remote
traceback. Multi-rank and AI nodes go to other backends of the session. A call
whose worker left the cluster (the scheduler's ``remove-worker`` event, to which the
backend subscribes) completes ``DIED``, so the scheduler retries it as an
infrastructure failure; a call placed on a worker that has left goes to whichever
worker Dask picks. (The inventory is the worker list at construction: workers that
join later are used only that way.)

State: ``_running`` (tid → the Dask future of each call) and ``_where`` (tid → its
worker); each future's done-callback posts its completion to the session's queue;
``_live``: the workers the scheduler has now. Killing a call cancels its future: a
queued call never starts, and its placement is free at once; a call that already
runs in a worker thread finishes there (Dask cannot stop a thread) while its result
is thrown away.

>>> DaskBackend.kinds == frozenset({"function", "executable"})
True
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from . import wire
from .base import (DIED, ERROR, KILLED, OK, Call, Completion, OwnCalls, close_session,
                   environ)
from .pool import encode_arguments, encode_function, encode_program
from .programs import run_program
from ..errors import WorkerDiedError
from ..graph import EXECUTABLE, FUNCTION
from ..resources import Host, Inventory, Ledger

__all__ = ["DaskBackend"]


class _DaskCall:
    """A node's call, encoded: its function's bytes and its arguments' (with slots)."""

    __slots__ = ("key", "kind", "func", "args")

    def __init__(self, key: str, kind: str, func: bytes, args: bytes) -> None:
        self.key, self.kind, self.func, self.args = key, kind, func, args


def _run(func: bytes, args: bytes, inputs: List[bytes], env: Dict[str, str]) -> tuple:
    """On a Dask worker: run one call in the environment of its placement (GPU masks,
    ``current_placement()``), then put the worker's back; never raises."""
    with environ(env):
        try:
            fn, a, kw = wire.load_call(func, args, inputs)
            return ("ok", wire.dump_value(fn(*a, **kw)))
        except BaseException as exc:  # the driver raises it, with this traceback
            return ("error", wire.dump_error(exc))


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
            raise TypeError(f"DaskBackend: name must be a non-empty string, got {name!r}")
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
        self.inventory = Inventory(self._hosts())
        self.ledger = Ledger(self.inventory)
        self._program = wire.dump_callable(run_program)
        self._running: Dict[int, Any] = {}  # tid -> its Dask future
        self._where: Dict[int, str] = {}  # tid -> the worker it was sent to
        self._live = {h.name for h in self.inventory.hosts}  # workers the scheduler has now
        self.client.subscribe_topic("all", self._event)  # workers that leave or join

    def _hosts(self) -> List[Host]:
        workers = self.client.scheduler_info(n_workers=-1)["workers"]
        if not workers:
            raise RuntimeError(f"DaskBackend {self.name!r}: the cluster has no worker yet; "
                               "start its workers first (cluster.scale(n), or wait_for_workers)")
        return [Host(address, int(w.get("nthreads", 1)) or 1,
                     int((w.get("resources") or {}).get("GPU", 0)))
                for address, w in sorted(workers.items())]

    # -- the backend protocol (see .base) ------------------------------------------------

    def accepts(self, node: Any) -> bool:
        return not node.opts.custom_process  # Dragon's policy= and templates

    def prepare(self, node: Any) -> _DaskCall:
        """The node's call, pickled now; raise ``TypeError`` naming what cannot be sent."""
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
        here = p.host in self._live  # else its worker left: Dask picks another
        future = self.client.submit(
            _run, prepared.func, prepared.args, list(call.inputs), p.env(),
            key=f"{call.key}-{tid}", workers=[p.host] if here else None, pure=False,
            resources={"GPU": len(p.gpus)} if p.gpus else None)
        self._running[tid] = future
        self._where[tid] = p.host
        hub = self.hub
        future.add_done_callback(lambda f: hub.post(lambda out: self._take(tid, f, out)))

    def kill(self, tid: int) -> None:
        future = self._running.pop(tid, None)
        self._where.pop(tid, None)
        if future is not None:
            future.cancel()
        self.hub.post((tid, KILLED, None, 0.0))

    def end_run(self) -> None:
        pass

    def abort(self) -> None:
        """Cancel every call; the ledger starts afresh."""
        for future in self._running.values():
            future.cancel()
        self._running.clear()
        self._where.clear()
        self.ledger = Ledger(self.inventory)

    def shutdown(self) -> None:
        """Close the session using it, cancel what runs, close a client it made."""
        close_session(self.hub)
        self.abort()
        if self.client.status == "running":  # else the scheduler logs that it could not
            self.client.unsubscribe_topic("all")  # tell this closing client it left
        if self._own:
            self.client.close()

    def __enter__(self) -> "DaskBackend":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        return f"<DaskBackend {self.name!r}: {len(self.inventory.hosts)} workers>"

    # -- internals -------------------------------------------------------------------------

    def _event(self, event: Any) -> None:
        """In the client's thread: a scheduler event; a worker that left or joined is
        handed to the scheduler thread."""
        message = event[1] if isinstance(event, tuple) and len(event) > 1 else None
        if isinstance(message, dict) and message.get("action") in ("remove-worker",
                                                                    "add-worker"):
            hub = self.hub
            if hub is not None:
                hub.post(lambda out: self._worker_changed(message, out))

    def _worker_changed(self, message: Dict[str, Any], out: List[Completion]) -> None:
        """A worker left (its calls fail ``DIED``: the scheduler retries them) or joined."""
        worker = message.get("worker")
        if message["action"] == "add-worker":
            self._live.add(worker)
            return
        self._live.discard(worker)
        for tid in [t for t, w in self._where.items() if w == worker]:
            future = self._running.pop(tid)
            del self._where[tid]
            future.cancel()
            exc = WorkerDiedError(f"the Dask worker {worker} running node "
                                  f"{future.key.rsplit('-', 1)[0]!r} left the cluster")
            out.append((tid, DIED, wire.attach(exc, "", future.key.rsplit("-", 1)[0]), 0.0))

    def _take(self, tid: int, future: Any, out: List[Completion]) -> None:
        """On the scheduler thread: report a call's end (not one killed already)."""
        if self._running.get(tid) is not future:
            return
        del self._running[tid]
        del self._where[tid]
        key = future.key.rsplit("-", 1)[0]
        if future.status == "finished":
            status, payload = future.result()
            if status == "ok":
                out.append((tid, OK, payload, 0.0))
            else:
                out.append((tid, ERROR, wire.load_error(payload, key), 0.0))
            return
        try:
            reason = repr(future.exception(timeout=0))
        except Exception as exc:  # cancelled by Dask itself (a lost client)
            reason = repr(exc)
        exc = WorkerDiedError(f"the Dask worker running node {key!r} was lost ({reason})")
        out.append((tid, DIED, wire.attach(exc, "", key), 0.0))
