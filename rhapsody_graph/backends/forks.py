"""Workers forked from a copy of the driver (``LocalBackend(start_method="fork")``).

A fresh worker interpreter takes tens of milliseconds to start and import; a fork
of a process that has already imported everything takes one. Forking the driver
itself is only safe while it runs one thread (a lock another thread holds at the
fork stays locked for good in the child), and a session starts its scheduler
thread right after its backends start their first worker. So the first fork makes
a *template*: a copy of the driver, taken while it runs one thread, that stays
single-threaded and forks every worker of its backend on request. Every worker is
then a copy of the driver as it was at that moment, however late it starts (a
replacement for a worker that timed out or died included).

State: the template (:class:`Forker`) holds one socket to the driver and nothing
else (it closed every other file descriptor it inherited). The driver sends it a
request and waits for the answer, one at a time under a lock:

* ``F`` + the environment changes since the template was taken, with the worker's
  two pipe ends as ancillary data: fork a worker, answer ``P<pid>`` (or
  ``E<why>``);
* ``R<pid>``: reap that worker, which has ended, answer ``C<exit code>``. The
  template reaps only when asked, as the driver reaps a child it started itself,
  so a worker's process id is never reused while the driver may still signal it.

EOF on the socket (the driver closed it, or died) ends the template. Each worker
is a session of its own, as a spawned worker is, registered with the watchdog by
the driver; the template is too.

What a forked worker differs in: it starts with what the driver had imported and
defined when the template was taken, and with the state of its modules then
(this package's own sessions and default backends are forgotten at every fork;
``random`` is reseeded by Python; other generators, such as NumPy's global one,
are not). The files and sockets the driver had open are closed in it. Its
``/proc/<pid>/environ`` is the driver's, so a process it forks without ``exec``
and moves out of its group is not found by the watchdog's marker (one it starts
with ``exec`` is: it gets the worker's ``os.environ``).
"""
from __future__ import annotations

import gc
import importlib
import os
import pickle
import select
import signal
import socket
import sys
import threading
import traceback
from typing import Dict, List, Optional, Sequence, Tuple

from . import watchdog
from .launch import describe_exit, kill_group

__all__ = ["Forker", "Forked", "unsafe"]


def unsafe() -> Optional[str]:
    """Why the driver cannot be forked now (``None``: it can)."""
    from .worker import gpu_runtime_loaded
    threads = threading.active_count()
    if threads > 1:
        return (f"the driver runs {threads} Python threads, and a fork can inherit a lock "
                "another thread holds")
    if gpu_runtime_loaded():
        return "the driver has loaded a GPU runtime, which a forked process cannot use"
    return None


class Forker:
    """The template process of one backend: a fork of the driver that forks workers.

    Made while the driver runs one thread (see :func:`unsafe`). Thread-safe.
    """

    def __init__(self) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.environ = dict(os.environ)  # the template's, to send only what changed
        _flush_std()
        pid = os.fork()
        if pid == 0:  # the template: never returns
            mine.close()
            _template(theirs)
        theirs.close()
        self.pid, self.sock = pid, mine
        self.mark: Optional[str] = None  # set by watchdog.guard
        self.lock = threading.Lock()
        self.alive = True

    def fork(self, fds: Tuple[int, int], env: Dict[str, str]) -> Optional["Forked"]:
        """A worker reading tasks on ``fds[0]`` and writing results on ``fds[1]``, with
        environment ``env``; ``None`` when the template cannot make one (it is gone)."""
        changed = {k: v for k, v in env.items() if self.environ.get(k) != v}
        removed = [k for k in self.environ if k not in env]
        reply = self._ask(b"F" + pickle.dumps((changed, removed)), fds)
        if reply is None or not reply.startswith(b"P"):
            return None
        return Forked(int(reply[1:]), self)

    def reap(self, pid: int) -> Optional[int]:
        """Reap worker ``pid`` (it has ended); its exit code, ``None`` if unknown."""
        reply = self._ask(b"R%d" % pid)
        return int(reply[1:]) if reply is not None and reply.startswith(b"C") else None

    def _ask(self, request: bytes, fds: Sequence[int] = ()) -> Optional[bytes]:
        with self.lock:
            if not self.alive:
                return None
            try:
                socket.send_fds(self.sock, [request], list(fds))
                reply = self.sock.recv(4096)
            except OSError:
                reply = b""
            if not reply:  # it died, or the request was too big for one message
                self.alive = False
                return None
            return reply

    def close(self) -> None:
        """End the template (its workers must have been reaped) and reap it."""
        with self.lock:
            if self.pid <= 0:
                return
            self.alive = False
            self.sock.close()
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(self.pid, 0)
            watchdog.release(self)
            self.pid = 0


class Forked:
    """A worker the template forked, as the pool kills and describes it."""

    __slots__ = ("pid", "forker", "pidfd", "mark", "code", "reaped")

    def __init__(self, pid: int, forker: Forker) -> None:
        self.pid, self.forker = pid, forker
        self.pidfd = os.pidfd_open(pid)  # readable once it has ended (any process's)
        self.mark: Optional[str] = None  # set by watchdog.guard
        self.code: Optional[int] = None
        self.reaped = False

    def exit_fd(self) -> int:
        return self.pidfd

    def kill(self) -> None:
        if not self.reaped:  # its id is not reused before then
            kill_group(self)
            try:  # also before it has made its session
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        watchdog.kill_marked(self)

    def wait(self, timeout: Optional[float] = None) -> Optional[int]:
        if not self.reaped:
            if self.pidfd >= 0:
                ready, _, _ = select.select([self.pidfd], [], [], timeout)
                if not ready:
                    return None
            self.code = self.forker.reap(self.pid)
            self.reaped = True
            watchdog.release(self)
        return self.code

    def exit_reason(self, died: bool) -> str:
        code = self.wait()
        return describe_exit(code) if code is not None else "its exit status was lost"

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


def _template(sock: socket.socket) -> None:
    """The template's life: fork a worker or reap one per request, until EOF."""
    code = 0
    try:
        os.setsid()
        gc.freeze()  # the driver's objects are never collected here: no finalizer runs
        _clean_signals()
        _keep_only(sock.fileno())
        _prefetch()
        while True:
            request, fds, _, _ = socket.recv_fds(sock, 1 << 16, 2)
            if not request:
                break
            if request[:1] == b"R":
                try:
                    _, status = os.waitpid(int(request[1:]), 0)
                except ChildProcessError:
                    sock.send(b"X")  # reaped already: its status is not known here
                else:
                    sock.send(b"C%d" % os.waitstatus_to_exitcode(status))
                continue
            changed, removed = pickle.loads(request[1:])
            try:
                pid = os.fork()
            except OSError as exc:
                sock.send(b"E" + str(exc).encode()[:4000])
            else:
                if pid == 0:
                    sock.close()
                    _worker(fds, changed, removed)
                sock.send(b"P%d" % pid)
            for fd in fds:
                os.close(fd)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        os._exit(code)


def _worker(fds: List[int], changed: Dict[str, str], removed: List[str]) -> None:
    """A forked worker's life: its own session and environment, then serve tasks."""
    code = 0
    try:
        os.setsid()
        os.environ.update(changed)
        for k in removed:
            os.environ.pop(k, None)
        from .worker import main
        main(["", str(fds[0]), str(fds[1])])
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        _flush_std()
        os._exit(code)


def _prefetch() -> None:
    """Import what every worker needs (the driver may not have yet): once here, not once
    per worker."""
    for name in ("rhapsody_graph.backends.worker", "cloudpickle"):  # cloudpickle: a
        importlib.import_module(name)  # script's functions come pickled by value


def _clean_signals() -> None:
    """Every signal the driver handled in Python goes back to its default action."""
    for sig in signal.valid_signals():
        try:
            if callable(signal.getsignal(sig)):
                signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError):
            pass


def _keep_only(fd: int) -> None:
    """Close every file descriptor but ``fd`` and the three standard ones; standard
    input reads nothing, as a spawned worker's does."""
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    for name in os.listdir("/proc/self/fd"):
        n = int(name)
        if n > 2 and n != fd:
            try:
                os.close(n)
            except OSError:
                pass


def _flush_std() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
