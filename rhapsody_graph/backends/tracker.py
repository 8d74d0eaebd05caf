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
what a task made lives until it is unlinked or the driver has exited and its workers
have ended, however they ended. Where the driver has no tracker yet, the pipe is
made here and its tracker is started only once something is written to it (a
thread, :data:`WATCHER`, waits for that in ``poll``): a run whose tasks never use
one starts no process, and no start-up pays for one. That tracker runs in a session
of its own (a Ctrl-C or SIGTERM sent to the driver's group does not end it before
it has cleaned up) and ends by itself at its pipe's EOF.

Uses the private ``ResourceTracker._fd`` of ``multiprocessing.resource_tracker``, as
``multiprocessing.spawn`` does in a child, and its ``main(fd)``.
"""
from __future__ import annotations

import os
import select
import subprocess
import sys
import threading

__all__ = ["FORK_LOCK", "WATCHER", "tracker_pid", "worker_end"]

#: held while the driver forks (its template, see :mod:`.forks`) and while the watcher
#: starts the tracker: a fork never copies the watcher in the middle of a start
FORK_LOCK = threading.Lock()
#: the name of the thread that starts the tracker; it waits in ``poll``, holding no
#: lock, so a fork of the driver is safe while it runs
WATCHER = "rhapsody-tracker"

_started: list = []  # the tracker started here (a Popen), once it is


def tracker_pid() -> "int | None":
    """The process id of the tracker started here, if it has been."""
    return _started[0].pid if _started else None


def worker_end() -> int:
    """The write end of the driver's resource tracker's pipe, for a worker to share;
    where the driver has none yet, a pipe whose tracker starts once it is written to."""
    from multiprocessing import resource_tracker
    tracker = resource_tracker._resource_tracker
    with tracker._lock:
        if tracker._fd is None:
            read, tracker._fd = os.pipe()
            threading.Thread(target=_start_when_written, args=(read,), name=WATCHER,
                             daemon=True).start()
        return tracker._fd


def _start_when_written(read: int) -> None:
    """Wait until something is written to the pipe, then start its tracker."""
    try:
        ready = select.poll()
        ready.register(read, select.POLLIN)
        ready.poll()
        with FORK_LOCK:
            _started[:] = [subprocess.Popen([sys.executable, "-c", "from multiprocessing.resource_tracker "
                              f"import main; main({read})"],
                             pass_fds=(read,), stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, start_new_session=True)]
    finally:  # without a tracker, a worker's write fails: it starts one of its own
        os.close(read)
