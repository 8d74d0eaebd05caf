"""A Dragon runtime of this process's own, for ``python script.py`` outside ``dragon``.

Under the ``dragon`` launcher a program is already attached to a runtime and this
module does nothing. A plain Python process that makes a
:class:`~rhapsody_graph.DragonBackend` gets a single-host runtime started for it
(dragonhpc's ``dragon.workflows.runtime.LocalRuntime.start``: the launcher in a
child process, this process attached to it), shared by every Dragon backend of the
process and stopped when the last of them shuts down (or at exit).

State: ``_runtime`` (the running ``LocalRuntime``, or ``None``) and ``_users`` (the
backends that use it). The runtime's processes carry this driver's run marker
(:mod:`.watchdog`), so they die with the driver even when it is SIGKILLed; only
Dragon's shared-memory files can remain then (``dragon-cleanup`` removes them).

>>> from rhapsody_graph.backends import dragon_runtime
>>> dragon_runtime.running()
False
"""
from __future__ import annotations

import contextlib
import io
import os
import threading
import weakref
from typing import Any, Optional

from . import watchdog
from .base import environ

__all__ = ["START_TIMEOUT", "attached", "ensure", "release", "running", "stop"]

START_TIMEOUT = 120.0  # seconds the runtime may take to start (~8 s on an idle 2-core VM)
STOP_TIMEOUT = 30.0

_lock = threading.Lock()
_runtime: Optional[Any] = None
_users: "weakref.WeakSet[Any]" = weakref.WeakSet()


def attached() -> bool:
    """Whether this process runs under a Dragon runtime (the launcher's or its own)."""
    return "DRAGON_MY_PUID" in os.environ or "DRAGON_DEFAULT_PD" in os.environ


def running() -> bool:
    """Whether this process started a runtime that is still running."""
    return _runtime is not None


def ensure(user: Any) -> None:
    """Make sure this process is attached to a Dragon runtime; start one for ``user``
    (a backend, until it calls :func:`release`) when it is not."""
    global _runtime
    with _lock:
        if _runtime is None and attached():
            return  # under the launcher: its runtime is ours
        if _runtime is None:
            _runtime = _start()
        _users.add(user)


def release(user: Any) -> None:
    """``user`` is done with the runtime; the last one to go stops it."""
    with _lock:
        _users.discard(user)
        if _users:
            return
    stop()


def stop() -> None:
    """Stop the runtime this process started, if any (its processes end with it)."""
    global _runtime
    with _lock:
        runtime, _runtime = _runtime, None
    if runtime is not None:
        runtime.stop(timeout=STOP_TIMEOUT)


def _start() -> Any:
    """Start a single-host runtime and attach to it; its processes carry the run marker."""
    from dragon.workflows.runtime import LocalRuntime
    try:
        # start_local_runtime gives the launcher a copy of os.environ; it prints the
        # runtime's description, auth token included: not for the user's output
        with environ(watchdog.marked({})), contextlib.redirect_stdout(io.StringIO()):
            return LocalRuntime.start(timeout=START_TIMEOUT)
    except Exception as exc:
        raise RuntimeError(f"could not start a Dragon runtime for this process ({exc}); "
                           "run the program under the launcher instead: "
                           "`dragon your_program.py`") from exc
