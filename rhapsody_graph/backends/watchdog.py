"""The watchdog: what a driver started dies with it, however the driver dies.

Workers, executables, ranks and inference servers each run in a session of their
own (their own process group), so one ``killpg`` reaches a process and whatever it
forked inside its group. Those kills come from the driver; when the driver itself is
killed (SIGKILL from a batch system or the OOM killer) nothing of it runs any more.
So the first process a driver starts is a watchdog: one small process per driver
(``python -S``, no imports beyond ``os`` and ``select``), in a session of its own so
that a Ctrl-C to the terminal's group does not stop it first.

State, in the watchdog: the groups the driver started and has not reaped, each with
its leader's start time, and the files to remove at the driver's end (an inference
server's log). The driver tells it ``+ pgid start`` after starting a group and
``- pgid`` after reaping one, ``f path`` and ``k path`` (hex) for a file to remove or
keep, over a pipe whose only write end the driver holds.
When that pipe reaches EOF, or the driver's pidfd says it has ended (a process it
forked, which holds a copy of the pipe, may outlive it), the driver exited (cleanly,
by SIGTERM, by SIGKILL): the watchdog SIGKILLs every group still registered, then every process whose
environment carries this driver's run marker (``RHAPSODY_RUN``, given to every
process the driver starts and inherited by what they start, so a grandchild that
left its group with ``setsid`` is found too; looked for again over a third of a
second, as a process forked just before the driver died carries the marker only once
it has exec'd), removes the files still registered, and exits.

A group id is not reused while its group has members, and a leader alive with
another start time is a reused pid: that group is skipped.

It also holds the read end of a second pipe, the resource tracker's that
:mod:`.tracker` gives the workers where the driver has none: once something is
written to it, the watchdog starts ``multiprocessing``'s resource tracker on it, in
a session of its own and without the markers (it ends by itself at EOF, after it
has unlinked what is still registered), and at the driver's end it does so for what
was written just before.

Each process the driver starts also carries a marker of its own (``RHAPSODY_GROUP``),
so that killing it (a timeout, a cancel) reaches what it started outside its group:
:func:`kill_marked` kills every process that carries the marker. A process a marked
process starts through rhapsody_graph (a node that runs a graph itself) gets the
marker extended (``outer/inner``), so killing the outer one reaches it too. The
watchdog itself carries neither marker: a kill aimed at its driver spares it.

>>> from rhapsody_graph.backends import watchdog
>>> env = watchdog.marked({})
>>> sorted(env) == [watchdog.GROUP, watchdog.MARKER]
True
"""
from __future__ import annotations

import itertools
import os
import signal
import sys
import threading
from typing import Any, Callable, Dict, Iterable, Optional

__all__ = ["MARKER", "GROUP", "marked", "guard", "release", "remove_at_end", "keep_file",
           "kill_marked", "kill_marks", "tracker_end", "watchdog_pid"]

MARKER = "RHAPSODY_RUN"  # environment variable that marks the processes of one driver
GROUP = "RHAPSODY_GROUP"  # and the processes of one process the driver started
GROUP_ITEM = f"{GROUP}=".encode()

WATCHDOG = r"""
import os, select, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGHUP, signal.SIG_IGN)
fd, mark, tracker, driver = int(sys.argv[1]), sys.argv[2].encode(), int(sys.argv[3]), int(sys.argv[4])
def start_tracker():
    try:  # in a session of its own, without the markers: it ends by itself at EOF
        os.posix_spawn(sys.executable, [sys.executable, "-S", "-c", "from multiprocessing."
                       f"resource_tracker import main; main({tracker})"], os.environ,
                       file_actions=[(os.POSIX_SPAWN_CLOSE, fd)], setsid=True)
    except OSError:
        pass  # a worker's next write fails, and it starts a tracker of its own
    os.close(tracker)
groups, files, buf = {}, set(), b""
ready = select.poll()
ready.register(fd, select.POLLIN)
ready.register(tracker, select.POLLIN)
try:  # the driver's end, also while a process it forked holds the pipe open
    ended = os.pidfd_open(driver)
    ready.register(ended, select.POLLIN)
except (AttributeError, OSError):  # no pidfd here (Linux < 5.3), or the driver is gone
    ended = -1
def take(data):
    global buf
    *lines, buf = (buf + data).split(b"\n")
    for line in lines:
        sign, what, *start = line.split()
        if sign == b"+":
            groups[int(what)] = start[0] if start else b""
        elif sign == b"-":
            groups.pop(int(what), None)
        elif sign == b"f":
            files.add(bytes.fromhex(what.decode()))
        else:
            files.discard(bytes.fromhex(what.decode()))
while os.getppid() == driver:  # else the driver ended before its pidfd was opened
    woken = dict(ready.poll())
    if tracker in woken:  # written to (POLLIN), or every writer has ended (POLLHUP alone)
        ready.unregister(tracker)
        if woken[tracker] & select.POLLIN:
            start_tracker()
        else:
            os.close(tracker)
        tracker = -1
    if fd in woken:  # what the driver wrote comes before its end
        data = os.read(fd, 65536)
        if not data:
            break
        take(data)
    elif ended in woken:
        break
last = select.poll()  # what the driver wrote just before it ended
last.register(fd, select.POLLIN)
while last.poll(0):
    data = os.read(fd, 65536)
    if not data:
        break
    take(data)
def start_of(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None
for pgid, start in groups.items():
    now = start_of(pgid)
    if now is None or now == start:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass
me = os.getpid()
def sweep():
    found = False
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                marked = mark in f.read().split(b"\0")
        except OSError:
            continue
        if marked:
            found = True
            try:
                os.kill(int(name), signal.SIGKILL)
            except OSError:
                pass
    return found
# a process forked just before the driver died carries the marker only once it has
# exec'd (and was not registered yet): looked for again a few times, a while apart
for pause in (0.0, 0.05, 0.1, 0.2):
    select.select([], [], [], pause)
    for _ in range(3):
        if not sweep():
            break
for path in files:
    try:
        os.unlink(path)
    except OSError:
        pass
if tracker >= 0:
    ready = select.poll()
    ready.register(tracker, select.POLLIN)
    if any(event & select.POLLIN for _, event in ready.poll(0)):
        start_tracker()  # written to just before the driver died
"""

_lock = threading.Lock()
_groups = itertools.count(1)
_state: Dict[str, object] = {}  # "pid": the driver that started it, "fd", "token", "child",
#                                "tracker" (the write end of the pipe of tracker_end)


def _token() -> str:
    """This driver's run marker, starting its watchdog on first use (again after a fork)."""
    with _lock:
        if _state.get("pid") != os.getpid():
            token = os.urandom(8).hex()  # a marker, not a secret (no secrets/hmac import)
            read, write = os.pipe()
            tracker_read, tracker_write = os.pipe()
            os.set_inheritable(read, True)
            os.set_inheritable(tracker_read, True)
            try:  # posix_spawn, not Popen: nothing to reap or warn about while we live
                child = os.posix_spawn(sys.executable,
                               [sys.executable, "-S", "-c", WATCHDOG, str(read), f"{MARKER}={token}",
                                str(tracker_read), str(os.getpid())],
                               {k: v for k, v in os.environ.items() if k not in (MARKER, GROUP)},
                               file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)],
                               setsid=True)
            finally:
                os.close(read)
                os.close(tracker_read)
            _state.update(pid=os.getpid(), fd=write, token=token, child=child,
                          tracker=tracker_write)
        return _state["token"]  # type: ignore[return-value]


def tracker_end() -> int:
    """The write end of a resource tracker's pipe, whose tracker the watchdog starts
    once something is written to it (see :mod:`.tracker`); starts the watchdog on
    first use."""
    _token()
    return _state["tracker"]  # type: ignore[return-value]


def watchdog_pid() -> Optional[int]:
    """The pid of this driver's watchdog, if it has started one (it lives as long as
    the driver: a child that is meant to be there)."""
    return _state.get("child") if _state.get("pid") == os.getpid() else None  # type: ignore[return-value]


def marked(env: Dict[str, str]) -> Dict[str, str]:
    """``env`` with this driver's run marker and a fresh group marker (starts the
    watchdog on first use)."""
    token = _token()
    mark = f"{token}.{next(_groups)}"
    outer = os.environ.get(GROUP)  # inside a process a driver marked: keep the chain
    return {**env, MARKER: token, GROUP: f"{outer}/{mark}" if outer else mark}


def kill_marked(proc: Any) -> None:
    """SIGKILL every process that carries the group marker ``proc`` was started with
    (see :func:`guard`): what it started, ``setsid`` or not."""
    mark = getattr(proc, "mark", None)
    if mark:
        kill_marks([mark])


def kill_marks(marks: Iterable[str]) -> None:
    """SIGKILL every process that carries one of the group markers ``marks`` (or one
    extended from it: a graph run inside), in one look at ``/proc``."""
    items = {f"{GROUP}={m}".encode() for m in marks}
    if items:
        kill_carrying(lambda v: v.startswith(GROUP_ITEM) and _within(v, items))


def _within(item: bytes, marks: set) -> bool:
    """Whether the group marker ``item`` (``b"GROUP=a/b/c"``) is one of ``marks`` or
    extends one (``GROUP=a``, ``GROUP=a/b``: a graph run inside a marked process)."""
    at = item.find(b"/")
    while at >= 0:
        if item[:at] in marks:
            return True
        at = item.find(b"/", at + 1)
    return item in marks


def kill_carrying(test: Callable[[bytes], bool]) -> None:
    """SIGKILL every other process of this user with an environment item (``b"K=V"``)
    that passes ``test``."""
    me = os.getpid()
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != me:
            try:
                with open(f"/proc/{name}/environ", "rb") as f:
                    if not any(test(v) for v in f.read().split(b"\0")):
                        continue
                os.kill(int(name), signal.SIGKILL)
            except OSError:
                pass


def _tell(line: str) -> None:
    fd: Optional[int] = _state.get("fd") if _state.get("pid") == os.getpid() else None  # type: ignore[assignment]
    if fd is not None:
        try:
            os.write(fd, line.encode())
        except OSError:
            pass  # the watchdog is gone: nothing to tell


def guard(proc: Any, env: Dict[str, str]) -> None:
    """Have the watchdog kill the group ``proc`` leads if the driver dies first;
    ``env``: what :func:`marked` gave it (its marker is kept on ``proc.mark``)."""
    proc.mark = env.get(GROUP)
    try:
        with open(f"/proc/{proc.pid}/stat", "rb") as f:
            start = f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return  # already gone
    _tell(f"+ {proc.pid} {start}\n")


def release(proc: Any) -> None:
    """``proc`` has been reaped: nothing left to guard."""
    _tell(f"- {proc.pid}\n")


def remove_at_end(path: str) -> None:
    """Have the watchdog remove file ``path`` if the driver dies before
    :func:`keep_file` (starts the watchdog on first use)."""
    _token()
    _tell(f"f {os.fsencode(path).hex()}\n")


def keep_file(path: str) -> None:
    """The driver has dealt with ``path`` (removed or kept it): leave it be."""
    _tell(f"k {os.fsencode(path).hex()}\n")
