"""The ``multiprocessing`` resource tracker a driver shares with its workers.

A task that makes a ``SharedMemory`` segment or a named semaphore registers it with a
resource tracker: a process that reads a pipe and, once every process holding the
pipe's write end has ended, unlinks what is still registered (with a warning).
``multiprocessing``'s children share their parent's. A worker with one of its own
would lose it to the kill of its process group when it ends, and what a task left
would stay in ``/dev/shm`` for good; a tracker that ended with its worker would
unlink a segment the task handed to the driver by name.

So the driver's tracker is shared: every worker writes to the driver's pipe
(:func:`worker_end`; the worker side is :func:`.worker.share_resource_tracker`), and
what a task made lives until it is unlinked, or until the driver has exited and its
workers have ended, however they ended. Where the driver has no tracker yet, its
pipe is one the watchdog (:mod:`.watchdog`) reads the other end of: the watchdog
starts the tracker once something is first written, even if the driver has died
since, so a run whose tasks never register anything starts no process for it, and
no start-up pays for one.

Uses the private ``ResourceTracker._fd`` and ``_lock`` of
``multiprocessing.resource_tracker``, as ``multiprocessing.spawn`` does in a child.
"""
from __future__ import annotations

from . import watchdog

__all__ = ["worker_end"]


def worker_end() -> int:
    """The write end of the driver's resource tracker's pipe, for a worker to share;
    where the driver has none yet, one whose tracker starts once it is written to."""
    from multiprocessing import resource_tracker
    tracker = resource_tracker._resource_tracker
    with tracker._lock:
        if tracker._fd is None:
            tracker._fd = watchdog.tracker_end()
        return tracker._fd
