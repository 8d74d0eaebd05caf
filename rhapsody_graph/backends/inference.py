"""The inference backend: AI nodes answered by the inference services of declared models.

An :class:`InferenceBackend` runs AI nodes (kind ``ai``) and nothing else. It owns
the services' lifecycle (:class:`~rhapsody_graph.ai.service.Services`: one server per
model, started when the first node that needs it runs, stopped when the session goes
idle) and their placements. A service that asks for cores or GPUs
(``model(cpus=, gpus=, host=)``) holds them in the ledger it is placed from:

* ``on=backend``: that compute backend's ledger, so a server and the nodes placed
  beside it never share a core or a GPU, and that backend's way of starting a server
  (its ``server_spawner()``: a child of the driver for :class:`LocalBackend`, a
  Dragon process on the placed host for :class:`DragonBackend`);
* otherwise an inventory of its own (``cpus=``, ``gpus=``, ``hosts=``, as
  :class:`LocalBackend` takes them), servers started as children of the driver.

State: ``services`` (the running ones, by model), ``_requests`` (tid → the request of
each running AI node). A request has no process of its own: it runs in a thread
against its shared server and posts its completion to the session's queue; killing
a node abandons its request (the server goes on for the others).

A session whose backends run no AI node gets one of these, named ``inference``, placed
on its first backend.

>>> import rhapsody_graph as rhapsody
>>> llm = rhapsody.InferenceBackend(name="llm", models=[rhapsody.model("echo", url="http://127.0.0.1:1/v1")])
>>> sorted(llm.kinds), llm.serves("echo"), llm.serves("other")
(['ai'], True, False)
"""
from __future__ import annotations

import threading
import time
from typing import Any, Dict, List, Optional, Sequence

from . import wire
from .base import ERROR, KILLED, OK, Call, Completion, OwnCalls, close_session
from ..ai.models import Model, lookup
from ..ai.nodes import AI, build, run
from ..ai.service import Service, Services
from ..errors import NodeTimeoutError, brief
from ..resources import Host, Inventory, Ledger, Resources, detect_host

__all__ = ["InferenceBackend"]

TIMEOUT_GRACE = 1.0  # an AI node's requests stop this long after its timeout


class _Prompt:
    """An AI node's call as :meth:`InferenceBackend.prepare` makes it: its key, its model,
    its spec (how to build prompts and sample) and its arguments as
    :func:`.wire.dump_args` gives them, each upstream value a slot filled from the
    call's inputs."""

    __slots__ = ("key", "model", "spec", "args")

    def __init__(self, key: str, model: Model, spec: Any, args: wire.Args) -> None:
        self.key, self.model, self.spec, self.args = key, model, spec, args


class _Request:
    """One AI node's request, answered in its own thread; ``abandoned`` once killed
    (then its ``deadline``, cancelled, lets no further prompt of it be sent)."""

    __slots__ = ("tid", "key", "abandoned", "deadline")

    def __init__(self, tid: int, key: str) -> None:
        self.tid, self.key, self.abandoned = tid, key, False
        self.deadline: Any = None  # its client.Deadline, once its thread made it

    def abandon(self) -> None:
        self.abandoned = True
        if self.deadline is not None:
            self.deadline.cancel()


class InferenceBackend(OwnCalls):
    """Answer AI nodes with inference servers it starts and stops itself.

    Args:
        models: the declared models it serves (default: every model declared with
            :func:`rhapsody_graph.model`); an AI node of another model goes elsewhere.
        name: its name in a session (``backend="name"`` on a node routes there).
        on: a compute backend of the same session whose ledger places the services
            and which starts their servers (under Dragon: Dragon processes).
        cpus: with ``gpus`` and ``hosts``, an inventory of its own instead of ``on``'s
            (default: this machine).
        gpus: see ``cpus``.
        hosts: see ``cpus``.
    """

    kinds = frozenset((AI,))

    def __init__(self, models: Optional[Sequence[Model]] = None, *, name: str = "inference",
                 on: Any = None, cpus: "int | Sequence[int] | None" = None,
                 gpus: "int | Sequence[int] | None" = None,
                 hosts: Optional[Sequence[Host]] = None) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"InferenceBackend: name must be a non-empty string, got {brief(name)}")
        if models is not None:
            bad = [m for m in models if not isinstance(m, Model)]
            if bad:
                raise TypeError(f"InferenceBackend {name!r}: models= takes declared models "
                                f"(rhapsody.model(...)), got {brief(bad[0])}")
        if on is not None and (cpus is not None or gpus is not None or hosts is not None):
            raise TypeError(f"InferenceBackend {name!r}: give on=backend or an inventory "
                            "(cpus=/gpus=/hosts=), not both")
        self.name = name
        self.on = on
        # by name: a model declared again (rhapsody.model) replaces the one given here
        self._models = None if models is None else tuple(dict.fromkeys(m.name for m in models))
        self._inventory = None if on is not None else Inventory(
            hosts if hosts is not None else [detect_host(cpus, gpus, None)])
        self._ledger = None if self._inventory is None else Ledger(self._inventory)
        self.services = Services()
        self._requests: Dict[int, _Request] = {}

    @property
    def inventory(self) -> Inventory:
        return self.on.inventory if self.on is not None else self._inventory

    @property
    def ledger(self) -> Ledger:
        """The ledger its services are placed from (``on``'s, which may renew it)."""
        return self.on.ledger if self.on is not None else self._ledger

    def serves(self, model: str) -> bool:
        """Whether AI nodes of ``model`` may run here."""
        return self._models is None or model in self._models

    # -- the backend protocol (see .base) ------------------------------------------------

    def accepts(self, node: Any) -> bool:
        return self.serves(node.fn.model)

    def prepare(self, node: Any) -> _Prompt:
        """The node's call, its model checked: declared here, engine installed, weights
        there, its service's request fits the inventory."""
        who = f"node {node.key!r}"
        name = node.fn.model
        model = lookup(name, who)  # not declared: says so first
        if self._models is not None and name not in self._models:
            raise ValueError(f"{who}: backend {self.name!r} does not serve model {name!r} "
                             f"(it serves: {', '.join(sorted(self._models)) or 'none'})")
        model.check(who)
        request = _request(model)
        if request is not None:
            self.inventory.check(request, f"the inference service of model {model.name!r}")
        try:
            args = wire.dump_args(tuple(node.args), {}, node.deps)
        except Exception as exc:
            raise TypeError(f"{who}: its inputs cannot be pickled: {exc}") from exc
        return _Prompt(node.key, model, node.fn, args)

    def slots_free(self) -> int:
        return 1 << 20  # requests hold no slot: the server queues them

    def admit(self, prepared: _Prompt) -> bool:
        """Have the service of the call's model placed (not started yet); False: the
        node waits."""
        if self.on is not None:
            self.services.spawn = self.on.server_spawner()
        model = prepared.model
        return self.services.admit(model, self.ledger, _request(model))

    def release_idle(self) -> bool:
        return self.services.release_idle(self.ledger)

    def submit(self, call: Call) -> None:
        prompt = call.prepared
        request = self._requests[call.tid] = _Request(call.tid, call.key)
        service = self.services.begin(call.tid, prompt.model)
        inputs, _ = wire.load_args(prompt.args, call.inputs)
        threading.Thread(target=self._answer, name=f"rhapsody-ai-{call.key}", daemon=True,
                         args=(request, prompt.spec, service, list(inputs), call.timeout)).start()

    def kill(self, tid: int) -> None:
        request = self._requests.pop(tid, None)
        if request is not None:
            request.abandon()
        self.services.end(tid)
        self.hub.post((tid, KILLED, None, 0.0))

    def end_run(self) -> None:
        self.services.stop_all(self.ledger, keep_remote=True)

    def abort(self) -> None:
        """Abandon every request and stop every server; the ledger starts afresh."""
        self._abandon_all()
        self.services.stop_all(None)
        if self.on is None:
            self._ledger = Ledger(self._inventory)

    def shutdown(self) -> None:
        """Close the session using it, then stop every server."""
        close_session(self.hub)
        self._abandon_all()
        self.services.stop_all(None)

    def __repr__(self) -> str:
        models = "any model" if self._models is None else ", ".join(self._models)
        where = f"on {self.on.name!r}" if self.on is not None else "own inventory"
        return f"<InferenceBackend {self.name!r}: {models}; {where}>"

    # -- internals -------------------------------------------------------------------------

    def _abandon_all(self) -> None:
        for request in self._requests.values():
            request.abandon()
        self._requests.clear()

    def _answer(self, request: _Request, spec: Any, service: Service, inputs: List[Any],
                timeout: Optional[float]) -> None:
        """In the request's thread: ask the service (started on first use), giving up
        once the node's ``timeout`` has passed; post the completion."""
        from ..ai.client import Deadline, DeadlinePassed, Unreachable  # httpx: `ai` extra
        # the scheduler's own deadline fails the node; this later one only stops requests
        deadline = Deadline(None if timeout is None
                            else time.monotonic() + timeout + TIMEOUT_GRACE)
        request.deadline = deadline
        if request.abandoned:  # killed before its deadline was there to cancel
            return
        try:
            prompts = build(spec, inputs)  # a builder's own error: before any server starts
            client = service.start()
            try:
                value = run(spec, client, service.model.takes_lists, prompts, deadline)
            except DeadlinePassed:
                raise NodeTimeoutError.of(request.key, timeout) from None
            except Exception as exc:
                # a refused connection can come just before a killed server is reaped
                if service.died(grace=2.0 if isinstance(exc, Unreachable) else 0.0):
                    raise RuntimeError(service.failure("died while serving this node")) from exc
                raise
            completion: Completion = (request.tid, OK, wire.dump_value(value), 0.0)
        except BaseException as exc:  # report, never lose, a failure
            completion = (request.tid, ERROR, wire.attach(exc, "", request.key), 0.0)
        if not request.abandoned:
            self.hub.post(lambda out: self._take(request, completion, out))

    def _take(self, request: _Request, completion: Completion, out: List[Completion]) -> None:
        """On the scheduler thread: report a request's end unless it was abandoned."""
        if self._requests.get(request.tid) is request:
            del self._requests[request.tid]
            self.services.end(request.tid)
            out.append(completion)


def _request(model: Model) -> Optional[Resources]:
    """What the service of ``model`` holds in the ledger (None: nothing)."""
    if model.engine == "remote" or not (model.cpus or model.gpus or model.host):
        return None
    return Resources(cpus=model.cpus, gpus=model.gpus, host=model.host)
