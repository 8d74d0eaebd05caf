"""rhapsody_graph: a lazy task graph with real per-node CPU/GPU placement.

>>> import rhapsody_graph as rhapsody
>>> @rhapsody.task(cpus=1)
... def inc(x): return x + 1
>>> @rhapsody.task
... def total(xs): return sum(xs)
>>> total([inc(i) for i in range(10)]).compute()
55
"""
from .ai import ai, model, prompt, smollm2_path
from .backends.dask import DaskBackend
from .backends.dragon import DragonBackend, dragon_hosts
from .backends.inference import InferenceBackend
from .backends.local import LocalBackend
from .backends.simulated import SimulatedBackend
from .api import compute, submit
from .errors import (ExecutableError, NoBackendError, NodeTimeoutError, RemoteError,
                     RemoteTraceback, UnsatisfiableError, WorkerDiedError)
from .futures import ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION, Future, Where, as_completed, wait
from .graph import Graph, Node
from .interop.dask import get
from .journal import explain
from .report import report
from .resources import Host, Inventory, Ledger, Placement, Resources, current_placement
from .session import Session
from .task import ExecResult, Task, executable, map, task

__all__ = [
    "task", "Task", "executable", "map", "compute", "Graph", "Node", "ExecResult",
    "Session", "submit", "get", "explain", "report", "Future", "Where", "as_completed", "wait", "ALL_COMPLETED",
    "FIRST_COMPLETED", "FIRST_EXCEPTION", "NoBackendError",
    "ai", "prompt", "model", "smollm2_path",
    "LocalBackend", "DragonBackend", "InferenceBackend", "DaskBackend", "SimulatedBackend", "dragon_hosts", "Host", "Inventory", "Ledger", "Placement", "Resources",
    "current_placement", "ExecutableError", "NodeTimeoutError", "RemoteError",
    "RemoteTraceback", "UnsatisfiableError", "WorkerDiedError",
]
__version__ = "0.1.0"
