"""The contract between the scheduler and a backend.

The scheduler decides *what* runs *where* (a ready node and its placements from
the ledger); a backend only *runs* it and reports back. One loop, no polling:

1. ``prepare(node)`` for every node before anything runs: encode the call, and
   raise ``TypeError`` naming the node if it cannot be sent (unpicklable).
2. ``admit(node, prepared)`` before a node that runs on its own placements is
   placed: the backend takes what the node needs beyond them (an AI node's
   inference service) or answers False, and the node waits; ``release_idle()``
   frees what such admissions hold for no running node, when nothing else can run.
3. ``submit(call)`` then ``flush()``: start the calls of one dispatch round.
   Calls that share a :class:`Lease` run one after the other in submission order
   on one executor holding the lease's placement (this is how tiny nodes are
   batched); ``slots_free()`` says how many more leases can be started.
4. ``wait(timeout)`` blocks until at least one :data:`Completion` is ready (or the
   timeout, the next deadline, passes) and returns them.
5. ``drop_queued()`` (stop starting queued calls: they come back ``DROPPED``),
   ``kill(tid)`` (stop one call now; nothing more is reported for it),
   ``end_lease(lease)``, ``end_run()``, ``abort()`` (kill everything) and
   ``shutdown()``.

A completion is ``(tid, status, payload, seconds)``: ``OK`` with the value's
bytes (``decode`` turns them into the value), ``ERROR`` and ``DIED`` with the
exception to raise, ``DROPPED`` with ``None`` (it never started).
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

from ..resources import Inventory, Ledger, Placement

try:
    from typing import Protocol
except ImportError:  # pragma: no cover - Python < 3.8
    Protocol = object  # type: ignore[assignment]

OK, ERROR, DIED, DROPPED = "ok", "error", "died", "dropped"

Completion = Tuple[int, str, Any, float]


class Lease:
    """A placement held for a run of calls on one executor (see module docstring)."""

    __slots__ = ("placement", "outstanding", "depth", "key", "executor")

    def __init__(self, placement: Placement, depth: int, key: Optional[tuple] = None) -> None:
        self.placement = placement
        self.key = key  # the scheduler's sharing key; None for a lease of its own
        self.outstanding = 0  # calls submitted and not yet completed
        self.depth = depth  # most calls the scheduler queues on it at once
        self.executor: Any = None  # set by the backend when it binds the lease


class Call:
    """One submission: node ``tid`` with its encoded form, inputs and placements."""

    __slots__ = ("tid", "node", "prepared", "inputs", "placements", "lease")

    def __init__(self, tid: int, node: Any, prepared: Any, inputs: Sequence[bytes],
                 placements: List[Placement], lease: Optional[Lease]) -> None:
        self.tid, self.node, self.prepared = tid, node, prepared
        self.inputs, self.placements, self.lease = inputs, placements, lease


class Backend(Protocol):
    """What every backend provides (see the module docstring for the protocol)."""

    name: str
    inventory: Inventory
    ledger: Ledger  # the backend's, so what it holds outside a run (services) is accounted

    def uses_lease(self, node: Any) -> bool: ...
    def prepare(self, node: Any) -> Any: ...
    def slots_free(self) -> int: ...
    def admit(self, node: Any, prepared: Any) -> bool: ...
    def release_idle(self) -> bool: ...
    def submit(self, call: Call) -> None: ...
    def flush(self) -> None: ...
    def wait(self, timeout: Optional[float]) -> List[Completion]: ...
    def drop_queued(self) -> None: ...
    def kill(self, tid: int) -> None: ...
    def end_lease(self, lease: Lease) -> None: ...
    def decode(self, payload: bytes) -> Any: ...
    def end_run(self) -> None: ...
    def abort(self) -> None: ...
    def shutdown(self) -> None: ...
