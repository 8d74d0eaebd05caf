"""Run a command as a child subreaper and report every process of it that outlives it.

    python tests/reaper.py GRACE_SECONDS COMMAND [ARG ...]

Linux hands an orphan to its nearest living ancestor marked ``PR_SET_CHILD_SUBREAPER``,
so every process the command starts, however it detaches (a session of its own, a
double fork, an environment of its own), becomes a child of this one once its parent
is gone: which processes are the command's is known by ancestry, never by name, and
another job's processes on the same machine are never counted (nor touched).

Once the command has exited, this process waits up to ``GRACE_SECONDS`` for those
children to exit (woken by their pidfds, not by polling), then prints one line::

    reaper: none left
    reaper: left behind: 4242 (python -m ...), 4243 (sleep 600)

kills what is left (SIGKILL, by pid: they are this command's), reaps it and exits with
the command's status (``128 + N`` when signal N ended it). SIGINT and SIGTERM do not
stop it (a test sends them to the command's whole process group); SIGUSR1 kills the
command and everything it started at once (a test's clean-up after a failure).

A test runs a command this way with :func:`run` (or :func:`start`, to act on it while
it runs, and :func:`stop` to clean up after a failure) and reads the report with
:func:`left_behind`.
"""
import ctypes
import os
import select
import signal
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

PR_SET_CHILD_SUBREAPER = 36
REPORT = "reaper: "
NONE_LEFT = REPORT + "none left"


def children(pid: int) -> List[int]:
    """The live child processes of ``pid`` (every thread's), from /proc."""
    kids: List[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return kids
    for t in tasks:
        try:
            with open(f"/proc/{pid}/task/{t}/children") as f:
                kids += [int(k) for k in f.read().split()]
        except FileNotFoundError:
            pass
    return kids


def descendants(pid: int) -> Set[int]:
    """Every live process below ``pid``, from /proc."""
    found: Set[int] = set()
    todo = [pid]
    while todo:
        for k in children(todo.pop()):
            if k not in found:
                found.add(k)
                todo.append(k)
    return found


def start(command: Sequence[str], grace: float, **popen: Any) -> subprocess.Popen:
    """Start ``command`` under a reaper (this file, run as a script); its output and the
    reaper's report come on one text pipe, ``proc.stdout``."""
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), str(grace), *command],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **popen)


def run(command: Sequence[str], grace: float, timeout: float,
        **popen: Any) -> Tuple[Optional[int], str]:
    """Run ``command`` under a reaper: its exit status and output, the reaper's report
    last. Past ``timeout`` seconds (and the grace), everything it started is killed
    (:func:`stop`) and the status is ``None``."""
    proc = start(command, grace, **popen)
    try:
        output, _ = proc.communicate(timeout=timeout + grace)
    except subprocess.TimeoutExpired:
        stop(proc)
        return None, proc.communicate()[0]
    return proc.returncode, output


def stop(proc: subprocess.Popen) -> None:
    """Kill a reaped command and everything it started (the reaper does, by pid), and
    wait for the reaper."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGUSR1)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def left_behind(output: str) -> str:
    """The reaper's report in a command's ``output`` (what it says is left, if anything)."""
    lines = [line for line in output.splitlines() if line.startswith(REPORT)]
    return lines[-1] if lines else "no report from the reaper (it was killed?)"


def _describe(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        argv = "?"
    return f"{pid} ({argv[:100]})"


def _reap() -> None:
    """Collect every child that has exited (orphans handed over included)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _living() -> List[int]:
    _reap()
    return children(os.getpid())


def _wait_for_none(seconds: float) -> List[int]:
    """Wait until no child is left or ``seconds`` have passed; the children left."""
    deadline = time.monotonic() + seconds
    while True:
        kids = _living()
        left = deadline - time.monotonic()
        if not kids or left <= 0:
            return kids
        fds: Dict[int, int] = {}
        try:
            for k in kids:
                try:
                    fds[os.pidfd_open(k)] = k
                except ProcessLookupError:
                    pass  # exited and reaped between the listing and now
            if len(fds) == len(kids):  # else look again at once
                select.select(list(fds), [], [], left)  # a child exited, or time is up
        finally:
            for fd in fds:
                os.close(fd)


def _kill_all() -> None:
    """SIGKILL every descendant, by pid, until none is left (orphans come back here)."""
    while _living():
        for pid in descendants(os.getpid()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _wait_for_none(5.0)


def main(argv: List[str]) -> int:
    grace, command = float(argv[1]), argv[2:]
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")

    def clean_up(signum: int, frame: object) -> None:
        _kill_all()
        os._exit(128 + signal.SIGUSR1)

    signal.signal(signal.SIGUSR1, clean_up)  # a handler is not inherited across exec
    proc = subprocess.Popen(command)  # SIGINT and SIGTERM as this process got them
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)  # for the command, not for this process
    code = proc.wait()
    left = _wait_for_none(grace)
    print(REPORT + "left behind: " + ", ".join(_describe(p) for p in left) if left else NONE_LEFT,
          flush=True)
    _kill_all()
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main(sys.argv))
