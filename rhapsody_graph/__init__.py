"""rhapsody_graph: a lazy task graph with real per-node CPU/GPU placement.

>>> import rhapsody_graph as rhapsody
>>> @rhapsody.task(cpus=1)
... def inc(x): return x + 1
>>> @rhapsody.task
... def total(xs): return sum(xs)
>>> total([inc(i) for i in range(10)]).compute()
55

The names below are imported on first use (PEP 562), so ``import rhapsody_graph`` costs
a few milliseconds and a worker process, which imports one module of the package, does
not import the rest of it.
"""
import importlib
import sys
import types
from typing import TYPE_CHECKING, Any, List

from . import graph

if TYPE_CHECKING:  # what type checkers, IDEs and the API reference see
    from .ai import ai, model, prompt, smollm2_path
    from .api import compute, submit
    from .backends.dask import DaskBackend
    from .backends.dragon import DragonBackend, dragon_hosts
    from .backends.inference import InferenceBackend
    from .backends.local import LocalBackend
    from .backends.simulated import SimulatedBackend
    from .errors import (ExecutableError, NoBackendError, NodeTimeoutError, RemoteError,
                         RemoteTraceback, UnsatisfiableError, WorkerDiedError)
    from .futures import (ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION, Future, Where,
                          as_completed, wait)
    from .graph import Graph, Node
    from .interop.dask import get
    from .journal import explain
    from .resources import Host, Inventory, Ledger, Placement, Resources, current_placement
    from .report import report
    from .session import Session
    from .task import ExecResult, Task, executable, map, task

# what is imported on first use: submodule -> its public names (the same as above; a
# test checks that they agree)
_MODULES = {
    "ai": ("ai", "model", "prompt", "smollm2_path"),
    "api": ("compute", "submit"),
    "backends.dask": ("DaskBackend",),
    "backends.dragon": ("DragonBackend", "dragon_hosts"),
    "backends.inference": ("InferenceBackend",),
    "backends.local": ("LocalBackend",),
    "backends.simulated": ("SimulatedBackend",),
    "errors": ("ExecutableError", "NoBackendError", "NodeTimeoutError", "RemoteError",
               "RemoteTraceback", "UnsatisfiableError", "WorkerDiedError"),
    "futures": ("ALL_COMPLETED", "FIRST_COMPLETED", "FIRST_EXCEPTION", "Future", "Where",
                "as_completed", "wait"),
    "graph": ("Graph", "Node"),
    "interop.dask": ("get",),
    "journal": ("explain",),
    "resources": ("Host", "Inventory", "Ledger", "Placement", "Resources", "current_placement"),
    "report": ("report",),
    "session": ("Session",),
    "task": ("ExecResult", "Task", "executable", "map", "task"),
}
_WHERE = {name: module for module, names in _MODULES.items() for name in names}
__all__ = list(_WHERE)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """Import the submodule that defines ``name`` and keep the name here; a submodule's
    own name (``rhapsody_graph.api``) imports it."""
    where = _WHERE.get(name)
    if where is None:
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f"{__name__}.{where}"), name)
    globals()[name] = value
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """This package's module type: importing a submodule that has the name of a public
    name (``task``, ``ai``, ``report``) leaves that name to mean the function."""

    def __setattr__(self, name: str, value: Any) -> None:
        if (name in _WHERE and isinstance(value, types.ModuleType)
                and value.__name__ == f"{__name__}.{name}"):
            return  # the import system binding the submodule
        super().__setattr__(name, value)

    def __reduce__(self) -> Any:  # pickled by name, as (cloud)pickle does plain modules
        return importlib.import_module, (self.__name__,)


sys.modules[__name__].__class__ = _Package


def _dask_node(obj: Any) -> Any:
    """Dask collections found in a node's arguments become nodes (:mod:`.interop.dask`,
    imported when the first one is met); an object with Dask's methods that is no
    collection now (an xarray object without Dask arrays) stays a value."""
    from dask import is_dask_collection
    from .interop.dask import as_node
    return as_node(obj) if is_dask_collection(obj) else obj


graph.ADAPTERS["__dask_graph__"] = _dask_node
