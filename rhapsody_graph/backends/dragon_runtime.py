"""A Dragon runtime of this process's own, for ``python script.py`` outside ``dragon``.

Under the ``dragon`` launcher a program is already attached to a runtime and this
module does nothing. A plain Python process that makes a
:class:`~rhapsody_graph.DragonBackend` gets a single-host runtime started for it
(dragonhpc's ``dragon.workflows.runtime.LocalRuntime.start``: the launcher in a
child process, this process attached to it), shared by every Dragon backend of the
process and stopped at exit (not when the last of them shuts down: dragonhpc cannot
start a second runtime in a process whose first has stopped).

Under the launcher, the driver watches the launcher (its parent) and stops as on a
SIGTERM when it exits, then ends its runtime's processes: a SIGTERM to the launcher
alone would leave them all running.

State: ``_runtime`` (the running ``LocalRuntime``, or ``None``) and ``_watching``
(the launcher is watched). The runtime's
processes carry this driver's run marker (:mod:`.watchdog`), so they die with the driver even when it is SIGKILLed; only
Dragon's shared-memory files can remain then (``dragon-cleanup`` removes them).

>>> from rhapsody_graph.backends import dragon_runtime
>>> dragon_runtime.running()
False
"""
from __future__ import annotations

import contextlib
import io
import os
import select
import signal
import threading
from typing import Any, Optional

from . import watchdog
from .base import environ

__all__ = ["START_TIMEOUT", "attached", "ensure", "running", "stop"]

START_TIMEOUT = 120.0  # seconds the runtime may take to start (~8 s on an idle 2-core VM)
STOP_TIMEOUT = 30.0
LAUNCHER_GRACE = 10.0  # after the launcher died: seconds for a clean stop, then exit

_lock = threading.Lock()
_runtime: Optional[Any] = None
_watching = False  # the launcher is watched (see _watch_launcher)


def attached() -> bool:
    """Whether this process runs under a Dragon runtime (the launcher's or its own)."""
    return "DRAGON_MY_PUID" in os.environ or "DRAGON_DEFAULT_PD" in os.environ


def running() -> bool:
    """Whether this process started a runtime that is still running."""
    return _runtime is not None


def ensure() -> None:
    """Make sure this process is attached to a Dragon runtime; start one (until the
    program ends) when it is not."""
    global _runtime
    with _lock:
        if _runtime is None and attached():
            _watch_launcher()
            return  # under the launcher: its runtime is ours
        if _runtime is None:
            _runtime = _start()


def _watch_launcher() -> None:
    """Under the launcher (once per process): SIGTERM this driver when its parent, the
    launcher, exits. A SIGTERM to the launcher is not passed on to the driver, which
    would then run on under init with the runtime gone; this way it stops as on any
    SIGTERM (its sessions close). Dragon's threads can keep it from exiting then, and
    the runtime's processes spin on without it: after :data:`LAUNCHER_GRACE` seconds
    the driver kills the processes of its runtime (by ``DRAGON_RT_UID``) and exits;
    its watchdog ends what carries its run marker."""
    global _watching
    if _watching:
        return
    _watching = True
    try:
        parent = os.pidfd_open(os.getppid())
    except (AttributeError, OSError):  # Linux < 5.3, or the parent is already gone
        return

    runtime = f"DRAGON_RT_UID={os.environ.get('DRAGON_RT_UID', '')}".encode()

    def watch() -> None:
        select.select([parent], [], [])
        os.kill(os.getpid(), signal.SIGTERM)  # a clean stop, while the grace lasts
        threading.Event().wait(LAUNCHER_GRACE)
        # the runtime is gone and its processes spin on: end this runtime's (by its
        # id, never another launch's), then this driver (its watchdog ends the rest)
        if runtime != b"DRAGON_RT_UID=":
            watchdog.kill_carrying(runtime.__eq__)
        os._exit(128 + signal.SIGTERM)
    threading.Thread(target=watch, name="rhapsody-launcher-watch", daemon=True).start()


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
