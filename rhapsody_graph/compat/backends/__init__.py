"""RHAPSODY's backend classes, each a rhapsody_graph backend under RHAPSODY's name.

=================================================  =========================================
RHAPSODY                                           runs on
=================================================  =========================================
``ConcurrentExecutionBackend(executor=, name=)``   :class:`~rhapsody_graph.LocalBackend`
                                                   (one worker process per ``max_workers``)
``DragonExecutionBackendV3(num_workers=, name=)``  :class:`~rhapsody_graph.DragonBackend`
``DragonExecutionBackend`` (same)                  :class:`~rhapsody_graph.DragonBackend`
``DaskExecutionBackend(resources, cluster=, …)``   :class:`~rhapsody_graph.DaskBackend`
``DragonVllmInferenceBackend(name=, model=)``      :class:`~rhapsody_graph.InferenceBackend`
=================================================  =========================================

Each is awaitable (``backend = await ConcurrentExecutionBackend()``): awaiting starts
its workers off the event loop. ``.backend`` is the rhapsody_graph backend. RHAPSODY's
``TasksMainStates``, ``StateMapper`` and ``Session`` are importable from here too.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from typing import Any, Optional

from ...ai.models import lookup, model
from ...backends.inference import InferenceBackend
from ...backends.local import LocalBackend
from ...errors import brief
from ..api import Session
from .constants import StateMapper, TasksMainStates

__all__ = ["ConcurrentExecutionBackend", "DragonExecutionBackendV3", "DragonExecutionBackend",
           "DaskExecutionBackend", "DragonVllmInferenceBackend", "Session", "StateMapper",
           "TasksMainStates"]


class _Backend:
    """A rhapsody_graph backend under a RHAPSODY name; awaiting it starts it."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.name: str = backend.name

    def __await__(self):
        return self._started().__await__()

    async def _started(self) -> "_Backend":
        start = getattr(self.backend, "start", None)
        if start is not None:
            await asyncio.get_running_loop().run_in_executor(None, start)
        return self

    def get_task_states_map(self) -> StateMapper:
        """Its task states: RHAPSODY's main ones."""
        return StateMapper(self)

    async def shutdown(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.backend.shutdown)

    def _close(self) -> None:
        """What it started beside its backend, closed once its session has closed."""

    async def __aenter__(self) -> "_Backend":
        return await self._started()

    async def __aexit__(self, *exc: Any) -> None:
        await self.shutdown()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class ConcurrentExecutionBackend(_Backend):
    """Tasks in local worker processes: ``executor``'s ``max_workers`` of them (a
    ``concurrent.futures`` executor is read for its size only), else one per core."""

    def __init__(self, executor: Any = None, name: str = "concurrent") -> None:
        if executor is not None and not isinstance(executor, concurrent.futures.Executor):
            raise TypeError("Executor must be ThreadPoolExecutor or ProcessPoolExecutor, "
                            f"got {brief(executor)}")
        workers = getattr(executor, "_max_workers", None)
        super().__init__(LocalBackend(cpus=workers, name=name))


class DragonExecutionBackendV3(_Backend):
    """Tasks as Dragon Batch calls (run under the ``dragon`` launcher)."""

    def __init__(self, num_workers: Optional[int] = None, name: str = "dragon",
                 **kwargs: Any) -> None:
        from ...backends.dragon import DragonBackend
        super().__init__(DragonBackend(workers=num_workers, name=name, **kwargs))


DragonExecutionBackend = DragonExecutionBackendV3


class DaskExecutionBackend(_Backend):
    """Tasks on a Dask ``distributed`` cluster: ``cluster=`` (also one started with
    ``asynchronous=True``), ``client=`` or ``address=``; none of them, as RHAPSODY: a
    ``LocalCluster(**resources)`` it starts and closes with its session. Its client
    connects off the event loop (when awaited, else when the session opens): an
    asynchronous cluster is served by that loop, which a connection made on it would
    block for good."""

    def __init__(self, resources: Optional[dict] = None, name: str = "dask",
                 cluster: Any = None, client: Any = None, address: Optional[str] = None) -> None:
        if resources is not None and not isinstance(resources, dict):
            raise TypeError("DaskExecutionBackend: resources must be a dict of LocalCluster "
                            f"arguments ({{'n_workers': 2}}), got {brief(resources)}; pass "
                            "a cluster as cluster=")
        given = sum(x is not None for x in (cluster, client, address))
        if resources is not None and given:
            raise TypeError("DaskExecutionBackend: resources= starts a LocalCluster; give "
                            "it, or cluster=, client= or address=, not both")
        if cluster is not None and getattr(cluster, "asynchronous", False):
            cluster, address = None, cluster.scheduler_address  # our client has its own loop
        self.name = name
        self._given = dict(client=client, cluster=cluster, address=address)
        self._resources = (resources or {}) if not given else None
        self._made: Any = None  # the LocalCluster it started
        self._backend: Any = None
        self._lock = threading.Lock()

    @property
    def backend(self) -> Any:
        with self._lock:
            if self._backend is None:
                from ...backends.dask import DaskBackend
                given = dict(self._given)
                if self._resources is not None:
                    from distributed import LocalCluster
                    self._made = given["cluster"] = LocalCluster(**self._resources)
                self._backend = DaskBackend(given["client"], cluster=given["cluster"],
                                            address=given["address"], name=self.name)
            return self._backend

    async def _started(self) -> "_Backend":
        await asyncio.get_running_loop().run_in_executor(None, lambda: self.backend)
        return self

    def _close(self) -> None:
        """Close the cluster it started (its session closed the client already)."""
        with self._lock:
            made, self._made = self._made, None
        if made is not None:
            made.close()

    async def shutdown(self) -> None:
        await super().shutdown()
        await asyncio.get_running_loop().run_in_executor(None, self._close)


class DragonVllmInferenceBackend(_Backend):
    """An inference service for one model. ``model`` names a model declared with
    :func:`rhapsody_graph.model`, or is a path: a ``.gguf`` file (llama.cpp) or a
    model directory (vLLM)."""

    def __init__(self, name: str = "inference", model: str = "", **model_options: Any) -> None:
        declared = _declared(model, model_options)
        self.model_name = declared.name
        super().__init__(InferenceBackend([declared], name=name))

    async def _started(self) -> "_Backend":
        return self  # its server starts with the first task that needs it


def _declared(name: str, options: Any) -> Any:
    if not isinstance(name, str) or not name:
        raise TypeError(f"DragonVllmInferenceBackend: model= must name a model, got {brief(name)}")
    path = os.path.expanduser(name)
    if os.path.exists(path):
        engine = "vllm" if os.path.isdir(path) else "llama_cpp"
        return model(os.path.basename(path.rstrip("/")), engine=engine, path=path, **options)
    try:
        return lookup(name, "DragonVllmInferenceBackend")
    except Exception as exc:
        raise ValueError(f"DragonVllmInferenceBackend: model {name!r} is neither a path to "
                         "weights nor a model declared with rhapsody_graph.model(...)") from exc
