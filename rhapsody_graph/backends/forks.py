"""Workers forked from a copy of the driver (``LocalBackend(start_method="fork")``).

A fresh worker interpreter takes tens of milliseconds to start and import; a fork
of a process that has already imported everything takes one. Forking the driver
itself is only safe while it runs one thread, counted by the kernel (a lock another
thread holds at the fork stays locked for good in the child: OpenMP's pool hangs a
forked child that uses it), and a session starts its scheduler thread right after
its backends start their first worker. So the first fork makes
a *template*: a copy of the driver, taken while it runs one thread, that stays
single-threaded and forks every worker of its backend on request. Every worker is
then a copy of the driver as it was at that moment, however late it starts (a
replacement for a worker that timed out or died included).

State: the template (:class:`Forker`) holds one socket to the driver (every other
descriptor it inherited but regular files points at ``/dev/null``). The driver
sends it a request and waits for the answer, one at a time under a lock, each a
length-prefixed message:

* ``F`` + the environment changes since the template was taken and the driver's
  umask, with the worker's two pipe ends, the driver's resource tracker's pipe and
  the driver's working directory as ancillary data: fork a worker, answer
  ``P<pid>`` (or ``E<why>``);
* ``R<pid>``: reap that worker, which has ended, answer ``C<exit code>`` (``X``:
  unknown). The template reaps only when asked, as the driver reaps a child it
  started itself, so a worker's process id is not reused while the driver may
  still signal its group.

A request interrupted before its answer came (a Ctrl-C caught by the program), or
a template that does not answer, is lost for good: its backend spawns from then
on. EOF on the socket (the driver closed it, or died) ends the template. Each worker
is a session of its own, as a spawned worker is, registered with the watchdog by
the driver; the template is too.

What a forked worker differs in: it starts with what the driver had imported and
defined when the template was taken, and with the state of its modules then
(this package's own sessions and default backends are forgotten at every fork;
``random`` is reseeded by Python; other generators, such as NumPy's global one,
are not). The regular files the driver had open stay shared with it, as in any
fork; its pipes, sockets and other descriptors read nothing and write nowhere there
(``/dev/null``). Its standard
streams are the process's descriptors 0 – 2 (input reads nothing), whatever the
driver had pointed ``sys.stdout`` at. Its working directory, umask and environment
are the driver's when it is forked. Its ``/proc/<pid>/environ`` is the driver's, so
a process it forks without ``exec`` and moves out of its group is not found by the
watchdog's marker (one it starts with ``exec`` is: it gets the worker's
``os.environ``). It ends as ``multiprocessing``'s forked children do: it waits for
its non-daemon threads and runs the exit handlers registered in it (and
``logging``'s), never the driver's, and does not tear its modules down, so what a
task left buffered in a file it did not close or flush is lost. A ``logging``
handler the driver made on a stream writes to that stream, not to the worker's
captured output.
"""
from __future__ import annotations

import atexit
import gc
import importlib
import os
import pickle
import select
import signal
import socket
import stat
import struct
import sys
import threading
import traceback
import types
import weakref
from typing import Dict, List, Optional, Sequence, Tuple

from . import watchdog
from .launch import describe_exit, kill_group
from .worker import flush_std, gpu_runtime_loaded

__all__ = ["Forker", "Forked", "unsafe"]

_SIZE = struct.Struct("!I")  # a message's length, before it
#: native threads (by kernel name) that are safe across a fork, and not counted: their
#: library stops them before and restarts them after (jemalloc, which pyarrow and so
#: pandas load, runs one to purge memory)
FORK_SAFE_THREADS = frozenset({"jemalloc_bg_thd"})


def unsafe() -> Optional[str]:
    """Why the driver cannot be forked now (``None``: it can)."""
    others = [t.name for t in threading.enumerate() if t is not threading.current_thread()]
    native = sum(_thread_name(t) not in FORK_SAFE_THREADS
                 for t in os.listdir("/proc/self/task")) - 1 - len(others)
    if others or native > 0:
        told = [f"{len(others)} other Python thread(s) ({', '.join(others)}; a session's "
                "own are named rhapsody-*)"] if others else []
        told += [f"{native} thread(s) the threading module does not know (a native "
                 "library's pool, as OpenMP's, OpenBLAS's or MKL's: set OMP_NUM_THREADS=1 "
                 "or OPENBLAS_NUM_THREADS=1 before it loads)"] if native > 0 else []
        return (f"the driver runs {' and '.join(told)}, and a fork can inherit a lock one of "
                "them holds")
    if gpu_runtime_loaded():
        return "the driver has loaded a GPU runtime, which a forked process cannot use"
    return None


def _thread_name(tid: str) -> str:
    try:
        with open(f"/proc/self/task/{tid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""  # ended since it was listed


class Forker:
    """The template process of one backend: a fork of the driver that forks workers.

    Made while the driver runs one thread (see :func:`unsafe`). Thread-safe.
    ``alive``: it answers requests; ``failure``: why it stopped, or why the last
    worker could not be forked.
    """

    def __init__(self) -> None:
        _prefetch()
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.environ = dict(os.environ)  # the template's, to send only what changed
        flush_std()
        # no signal handler may run in the template before it has set its own
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        try:
            pid = os.fork()
            if pid == 0:  # the template: never returns
                mine.close()
                _template(theirs, blocked)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        theirs.close()
        self.pid, self.sock = pid, mine
        self.mark: Optional[str] = None  # set by watchdog.guard
        self.lock = threading.Lock()
        self.alive = True
        self.failure = ""
        self._end = weakref.finalize(self, _end_template, pid, mine, os.getpid())

    def fork(self, fds: Tuple[int, int, int], env: Dict[str, str]) -> Optional["Forked"]:
        """A worker reading tasks on ``fds[0]``, writing results on ``fds[1]`` and
        sharing the driver's resource tracker on ``fds[2]`` (see :func:`.worker.main`), with
        environment ``env`` and the driver's working directory and umask; ``None``
        when the template could not make one (``failure`` says why)."""
        changed = {k: v for k, v in env.items() if self.environ.get(k) != v}
        removed = [k for k in self.environ if k not in env]
        cwd = os.open(".", os.O_PATH | os.O_DIRECTORY)  # no read right needed
        try:
            reply = self._ask(b"F" + pickle.dumps((changed, removed, _umask())), (*fds, cwd))
        finally:
            os.close(cwd)
        if reply is None:
            return None
        if not reply.startswith(b"P"):
            self.failure = reply[1:].decode(errors="replace")
            return None
        return Forked(int(reply[1:]), self)

    def reap(self, pid: int) -> Optional[int]:
        """Reap worker ``pid`` (it has ended); its exit code, ``None`` if unknown."""
        reply = self._ask(b"R%d" % pid)
        return int(reply[1:]) if reply is not None and reply.startswith(b"C") else None

    def _ask(self, request: bytes, fds: Sequence[int] = ()) -> Optional[bytes]:
        """Send one request and take its answer; ``None`` once the template is lost."""
        with self.lock:
            if not self.alive:
                return None
            try:
                _send(self.sock, request, fds)
                reply, _ = _receive(self.sock)
            except OSError as exc:
                reply, why = None, f"its template process could not be reached ({exc})"
            except BaseException:  # its answer would be read as the next request's
                self._lose("a request to its template process was interrupted")
                raise
            else:
                why = "its template process ended"
            if reply is None:
                self._lose(why)
            return reply

    def _lose(self, why: str) -> None:
        """Stop asking the template (it ends at EOF); what it forked is reaped by init."""
        self.alive = False
        self.failure = why
        self.sock.close()

    def close(self) -> None:
        """End the template (its workers should have been reaped) and reap it."""
        with self.lock:
            self.alive = False
            self._end()


def _end_template(pid: int, sock: socket.socket, driver: int) -> None:
    """Close the template's socket, kill it and reap it (in the driver that made it)."""
    if os.getpid() != driver:
        return
    sock.close()
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass
    watchdog.release(types.SimpleNamespace(pid=pid))


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
        if self.pidfd >= 0:  # the pidfd names this process, even once its id is reused
            try:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if not self.reaped and self.forker.alive:  # its id is not reused before then
            kill_group(self)
        watchdog.kill_marked(self)

    def wait(self, timeout: Optional[float] = None) -> Optional[int]:
        if not self.reaped:
            if self.pidfd >= 0:
                ended = select.poll()  # any descriptor number (select() stops at 1024)
                ended.register(self.pidfd, select.POLLIN)
                if not ended.poll(None if timeout is None else timeout * 1e3):
                    return None
            if self.forker.alive:  # what it left in its group goes with it, as a spawned
                kill_group(self)   # worker's does; unreaped, its group id is not reused
            self.code = self.forker.reap(self.pid)
            self.reaped = True
            watchdog.release(self)
        return self.code

    def exit_reason(self, died: bool) -> str:
        code = self.wait()
        if code is None:
            return f"its exit status was lost: {self.forker.failure}"
        return describe_exit(code)

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


def _send(sock: socket.socket, payload: bytes, fds: Sequence[int] = ()) -> None:
    data = _SIZE.pack(len(payload)) + payload
    sent = socket.send_fds(sock, [data], list(fds))  # the descriptors go with its first byte
    if sent < len(data):
        sock.sendall(data[sent:])


def _receive(sock: socket.socket) -> Tuple[Optional[bytes], List[int]]:
    """One message and the descriptors that came with it; ``None`` at EOF."""
    data, fds, _, _ = socket.recv_fds(sock, 1 << 16, 4)
    while data and len(data) < _SIZE.size + (_SIZE.unpack_from(data)[0]
                                             if len(data) >= _SIZE.size else 0):
        more = sock.recv(1 << 20)
        if not more:
            break
        data += more
    if len(data) < _SIZE.size or len(data) < _SIZE.size + _SIZE.unpack_from(data)[0]:
        for fd in fds:
            os.close(fd)
        return None, []
    return bytes(data[_SIZE.size:]), fds


def _umask() -> int:
    """This process's umask, read without setting it (another thread may create files)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


def _template(sock: socket.socket, blocked: "set[int]") -> None:
    """The template's life: fork a worker or reap one per request, until EOF."""
    code = 0
    try:
        os.setsid()
        gc.freeze()  # the driver's objects are never collected here: no finalizer runs
        _clean_signals()
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C sent before its setsid
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        _own_streams()
        _blank_inherited(sock.fileno())
        _forget_exit_handlers()
        while True:
            request, fds = _receive(sock)
            if request is None:
                break
            if request[:1] == b"R":
                try:
                    _, status = os.waitpid(int(request[1:]), 0)
                except ChildProcessError:
                    _send(sock, b"X")  # reaped already: its status is not known here
                else:
                    _send(sock, b"C%d" % os.waitstatus_to_exitcode(status))
                continue
            changed, removed, umask = pickle.loads(request[1:])
            try:
                pid = os.fork()
            except OSError as exc:
                _send(sock, b"E" + str(exc).encode())
            else:
                if pid == 0:
                    sock.close()
                    _worker(fds, changed, removed, umask)
                _send(sock, b"P%d" % pid)
            for fd in fds:
                os.close(fd)
    except OSError:
        pass  # the driver went away
    except BaseException:
        _report("the template that forks workers")
        code = 1
    finally:
        os._exit(code)


def _worker(fds: List[int], changed: Dict[str, str], removed: List[str], umask: int) -> None:
    """A forked worker's life: its own session, the driver's working directory, umask
    and environment, then serve tasks."""
    code = 0
    try:
        os.setsid()
        *pipes, cwd = fds
        os.fchdir(cwd)
        os.close(cwd)
        os.umask(umask)
        os.environ.update(changed)
        for k in removed:
            os.environ.pop(k, None)
        from .worker import main
        main(["", *map(str, pipes)])
        threading._shutdown()  # type: ignore[attr-defined]  # as an interpreter's exit:
        atexit._run_exitfuncs()  # waits for non-daemon threads, runs its own handlers
    except BaseException:
        _report("a forked worker")
        code = 1
    finally:
        flush_std()
        os._exit(code)


def _report(what: str) -> None:
    try:
        sys.stderr.write(f"rhapsody_graph: {what} failed:\n")
        traceback.print_exc()
    except Exception:
        pass


def _prefetch() -> None:
    """Import in the driver, before the template is taken, what every worker needs:
    once, not once per worker, and not in the template while the driver waits for its
    first worker (the driver imports cloudpickle anyway to send a script's functions,
    which go pickled by value; the worker's module is this one's import)."""
    try:
        importlib.import_module("cloudpickle")
    except ImportError:  # then a call that needs it says so
        pass


def _clean_signals() -> None:
    """Every signal the driver handled in Python goes back to its default action."""
    for sig in signal.valid_signals():
        try:
            if callable(signal.getsignal(sig)):
                signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError):
            pass


def _forget_exit_handlers() -> None:
    """The driver's exit handlers and finalizers are its own (one may delete a directory
    it made): none runs when a worker ends, which runs those made in it. Two of the
    driver's modules are made this process's own again: ``logging`` flushes its
    handlers at exit, and ``multiprocessing`` ends the children made here at exit and
    has a resource tracker of its own (the driver's pipe to its tracker points at
    ``/dev/null`` here; a worker is given the driver's to share)."""
    atexit._clear()
    weakref.finalize._registry.clear()  # type: ignore[attr-defined]
    weakref.finalize._registered_with_atexit = False  # type: ignore[attr-defined]
    logging = sys.modules.get("logging")
    if logging is not None:
        atexit.register(logging.shutdown)
    process, util = (sys.modules.get(f"multiprocessing.{m}") for m in ("process", "util"))
    if process is not None:  # as multiprocessing sets up a child it forks itself
        process._children = set()  # the driver's children are not this process's
    if util is not None:
        util._finalizer_registry.clear()
        util._run_after_forkers()
        atexit.register(util._exit_function)  # ends the children a task left
    tracker = sys.modules.get("multiprocessing.resource_tracker")
    if tracker is not None:
        tracker._resource_tracker = tracker.ResourceTracker()
        for name in ("ensure_running", "register", "unregister", "getfd"):
            setattr(tracker, name, getattr(tracker._resource_tracker, name))


def _own_streams() -> None:
    """Standard streams on descriptors 0 – 2, as a fresh interpreter has them (the
    driver may have pointed ``sys.stdout`` at a file of its own); input reads nothing."""
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    for name in ("stdin", "stdout", "stderr"):
        original = getattr(sys, f"__{name}__")
        if original is not None:
            setattr(sys, name, original)


def _blank_inherited(keep: int) -> None:
    """Point every inherited descriptor above 2 but ``keep`` and regular files at
    ``/dev/null``: the driver's pipes, sockets and the like, copied here, read nothing
    and write nowhere (a worker holding another one's pipe would keep it from seeing
    EOF), and no descriptor opened here later takes a number one of them holds. A
    regular file stays shared with the driver, as in any fork (a log file the driver
    opened at import, which a spawned worker would open again)."""
    null = os.open(os.devnull, os.O_RDWR)
    for name in os.listdir("/proc/self/fd"):
        n = int(name)
        if n <= 2 or n in (keep, null):
            continue
        try:
            if not stat.S_ISREG(os.fstat(n).st_mode):
                os.dup2(null, n, inheritable=False)
        except OSError:
            pass
    os.close(null)
