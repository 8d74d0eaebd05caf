"""The faces users call first: ``compute``, ``submit``, the default session, and
the registry of backend names.

``compute()`` and ``submit()`` run on, in this order: the ``session=`` given, the
session of a ``backend=`` instance (one is made for it on first use and closed
when the backend shuts down, or when a ``Session(backends=[...])`` takes the backend
once that session's work is done: make a backend once, or use it in a ``with`` block;
more than :data:`MANY_OPEN` open at once get a ``RuntimeWarning``), the session of
the innermost ``with Session(...)`` block, or the default session (one
:class:`~rhapsody_graph.LocalBackend`, made on first use, closed at exit).
``backend="local"`` / ``"dragon"`` name the default backend of that kind.

>>> import rhapsody_graph as rhapsody
>>> @rhapsody.task
... def inc(x): return x + 1
>>> rhapsody.compute(inc(1), [inc(2), inc(3)])
(2, [3, 4])
>>> rhapsody.submit(inc(41)).result()
42
"""
from __future__ import annotations

import atexit
import os
import threading
from typing import Any, Callable, Dict, Optional, Tuple

from .errors import brief, warn
from .futures import INSIDE
from .session import Session, current_session

__all__ = ["compute", "submit", "get_session", "get_backend", "BACKENDS"]


def _local() -> Any:
    from .backends.local import LocalBackend
    return LocalBackend()


def _dragon() -> Any:
    from .backends.dragon import DragonBackend
    return DragonBackend()


#: backend names ``backend=`` takes without an instance, and how each is made
BACKENDS: Dict[str, Callable[[], Any]] = {"local": _local, "dragon": _dragon}
#: names the default backend when ``backend=`` is not given (``rhapsody-graph run --backend``)
BACKEND_ENV = "RHAPSODY_GRAPH_BACKEND"
_defaults: Dict[str, Any] = {}  # by name, made on first use
_sessions: Dict[int, Session] = {}  # id(backend) -> the session made for it
_calls: Dict[int, int] = {}  # id(session) -> compute()/submit() calls handing work to it
#: open sessions made for backend instances beyond which compute() warns (each has a
#: thread and workers: a backend made per call and never shut down is a leak)
MANY_OPEN = 16
_lock = threading.Lock()


def get_backend(backend: Any = None) -> Any:
    """The backend to run on: an instance, a name of :data:`BACKENDS`, or ``None``: the
    one named by ``$RHAPSODY_GRAPH_BACKEND`` (``rhapsody-graph run --backend``), else local."""
    name = (os.environ.get(BACKEND_ENV) or "local") if backend is None else backend
    if not isinstance(name, str):
        return backend
    if name not in BACKENDS:
        given = f"backend {name!r}" + (f" (${BACKEND_ENV})" if backend is None else "")
        hint = (" (a Dask cluster is given as DaskBackend(cluster=...) or "
                "DaskBackend(address=...))" if name == "dask" else "")
        raise ValueError(f"{given} is no default backend; name one of "
                         f"{', '.join(map(repr, BACKENDS))}, or pass a backend instance"
                         + hint)
    with _lock:
        if name not in _defaults:
            _defaults[name] = BACKENDS[name]()
        return _defaults[name]


def get_session(backend: Any = None, session: Optional[Session] = None) -> Session:
    """The session ``compute``/``submit`` use for these arguments (see the module docstring)."""
    if session is not None:
        if not isinstance(session, Session):
            raise TypeError(f"session= takes a Session, got {brief(session)}")
        if backend is not None:
            raise TypeError("give backend= or session=, not both (a session has its backends)")
        return session
    if backend is None and current_session() is not None:
        return current_session()
    b = get_backend(backend)
    with _lock:
        s = _sessions.get(id(b))
        if s is None or s._closed:
            for key in [k for k, open_ in _sessions.items() if open_._closed]:
                del _sessions[key]  # their backends were shut down
            s = _sessions[id(b)] = Session([b], _owns=False)
            if len(_sessions) == MANY_OPEN + 1:
                warn(
                    f"{len(_sessions)} backends given to compute()/submit() are open at once; "
                    "each keeps a scheduler thread and its worker processes until its "
                    "shutdown(). Make a backend once and reuse it, or use `with "
                    "LocalBackend(...) as backend:`")
        return s


def release(backend: Any) -> None:
    """Close the session ``compute``/``submit`` made for ``backend``, so that a
    :class:`Session` may take the backend (it stays open).

    Raises:
        RuntimeError: that session still has work (it goes on).
    """
    with _lock:
        s = _sessions.get(id(backend))
        if s is None or s._closed:
            return
        if _calls.get(id(s)) or not s._scheduler._at_rest():
            raise RuntimeError(
                f"backend {backend.name!r} already belongs to a session: the one that "
                f"compute()/submit() with backend= made for it, which still has work; wait "
                "for that work to end (its compute() to return, its futures to finish), "
                "then this Session takes the backend over; or make another backend")
        del _sessions[id(backend)]
    s.close()


def _call(backend: Any, session: Optional[Session], method: str, *args: Any,
          **kwargs: Any) -> Any:
    """``get_session(backend, session).method(*args, **kwargs)``; while it hands its
    work over, no :class:`Session` takes the backend from that session (see
    :func:`release`)."""
    with INSIDE:  # from its start: the session may be made here (see _shut_down_at_exit)
        for again in (False, True):  # (once more if a Session took the backend meanwhile)
            s = get_session(backend, session)
            with _lock:
                if again or not s._closed:
                    _calls[id(s)] = _calls.get(id(s), 0) + 1
                    break
        try:
            return getattr(s, method)(*args, **kwargs)
        finally:
            with _lock:
                left = _calls.pop(id(s)) - 1
                if left:
                    _calls[id(s)] = left


def compute(*outputs: Any, backend: Any = None, session: Optional[Session] = None,
            on_error: Optional[str] = None, fail_fast: Optional[bool] = None,
            journal: Any = None, progress: Optional[bool] = None) -> Tuple[Any, ...]:
    """Run everything ``outputs`` need, once; return their values as a tuple.

    Args:
        outputs: nodes, futures, or containers of them (returned with values in place).
        backend: a backend instance or name (default: the current or default session).
        session: the :class:`Session` to run on.
        on_error: when a node fails, ``"wait"`` (default) starts nothing new of this
            call, lets running nodes finish and raises; ``"raise"`` raises at once and
            kills the running nodes; ``"continue"`` runs every node that does not depend
            on the failure and returns, each failed output holding its exception (a
            ``RuntimeWarning`` lists them).
        fail_fast: the older spelling: ``True`` is ``"wait"``; ``False`` runs every
            node that does not depend on the failure, then raises.
        journal: a directory that keeps finished nodes' values; a later call with the
            same journal reuses those of unchanged nodes (see :mod:`rhapsody_graph.journal`).
        progress: ``True`` shows this call's progress (live in a terminal, else a line
            every 10 s) when its session shows none; ``False``/``None`` add nothing to
            the session's own display (see :mod:`rhapsody_graph.progress`).
    Returns:
        one value per output.
    Raises:
        Exception: the first failing node's own exception, with its remote traceback
            as ``__cause__``.
        ValueError: for bad input (also ``TypeError``), before anything runs.
    """
    return _call(backend, session, "compute", *outputs, on_error=on_error,
                 fail_fast=fail_fast, journal=journal, progress=progress)


def submit(*nodes: Any, backend: Any = None, session: Optional[Session] = None) -> Any:
    """Start ``nodes`` on the current (or default) session; see :meth:`Session.submit`."""
    return _call(backend, session, "submit", *nodes)



def _shut_down_at_exit() -> None:
    """Close every session and shut the default backends down when the main thread
    ends, before Python waits for the other non-daemon threads: Dragon's Batch client
    keeps some, so a program that never closed its backend (``backend="dragon"``) would
    never exit. First, as Python would, the non-daemon threads the program left
    running are let finish what they wait for: their calls in progress (a
    ``compute()``, a ``result()``), and the work they submitted (closing first
    cancelled it). Threads that wait for nothing of ours (an idle executor's) are not
    waited for."""
    from .futures import Inside
    from .session import close_all, in_use
    here = threading.current_thread()
    try:
        while True:
            Inside.wait_for_others(here)
            busy = in_use(here)
            if not busy:
                break
            for session in busy:
                session.wait()
    finally:
        close_all()
    with _lock:
        defaults = list(_defaults.values())
        _defaults.clear()
    for backend in defaults:
        backend.shutdown()


try:
    threading._register_atexit(_shut_down_at_exit)  # the hook concurrent.futures uses too
except RuntimeError:  # first imported after the main thread ended (by a thread it left):
    atexit.register(_shut_down_at_exit)  # after the threads, then


def _forget_defaults() -> None:
    """In a forked child: the parent's default backends and their sessions are not
    this process's (their workers are the parent's); it makes its own on first use."""
    global _lock
    _lock = threading.Lock()
    _defaults.clear()
    _sessions.clear()


os.register_at_fork(after_in_child=_forget_defaults)
