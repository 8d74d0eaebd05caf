"""Processes started for one node: executables and multi-rank jobs.

Each call gets one launcher thread. Before starting rank *r* the thread pins
*itself* to that rank's cores (``sched_setaffinity`` acts on the calling thread
on Linux) so the child inherits the mask from its first instruction: no race,
no ``preexec_fn``. Every process gets its own session, so a kill takes its whole
process tree. Output goes to temporary files, not pipes, so ranks that wait on
each other can never block on a full pipe. The thread reports one completion
through ``post``, also when it was killed (then once its processes are reaped).
"""
from __future__ import annotations

import errno
import os
import pickle
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
from typing import Any, Callable, List, Mapping, Sequence

from . import tracker, watchdog, wire
from .base import DIED, ERROR, KILLED, OK, Completion
from ..errors import ExecutableError, WorkerDiedError, note_rank, unreadable_value
from ..resources import Placement, names_env
from ..task import ExecResult

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER_BOOT = ("import sys; sys.path.insert(0, {!r}); "
               "from rhapsody_graph.backends.worker import main; main(sys.argv)").format(PACKAGE_ROOT)


def worker_command(task_fd: int, result_fd: int, tracker_fd: int) -> List[str]:
    """argv of a worker process reading tasks on ``task_fd`` (see :func:`.worker.main`)."""
    return [sys.executable, "-c", WORKER_BOOT, str(task_fd), str(result_fd), str(tracker_fd)]


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process started with its own session, its group, and what it started
    outside the group (by the marker :func:`.watchdog.guard` gave it)."""
    kill_group(proc)
    watchdog.kill_marked(proc)


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class Launch:
    """One node's processes; ``kill()`` stops them all, from any thread."""

    def __init__(self, tid: int, key: str, pin: Callable[[Sequence[int]], Sequence[int]],
                 post: Callable[[Completion], None], gpu_names: Mapping[int, str]) -> None:
        self.tid, self.key, self.pin, self.post = tid, key, pin, post
        self.gpu_names = gpu_names  # its backend's GPU UUIDs by id
        self.procs: List[subprocess.Popen] = []
        self.killed = False
        self.lock = threading.Lock()
        self.home = os.sched_getaffinity(0)  # for ranks that ask for no cores

    def kill(self) -> None:
        with self.lock:
            self.killed = True
            for p in self.procs:
                if p.returncode is None:
                    kill_tree(p)
                else:  # reaped (a rank that ended): its id, and group's, may be another's
                    watchdog.kill_marked(p)

    def _start(self, placement: Placement, argv: List[str], **kw: Any) -> subprocess.Popen:
        os.sched_setaffinity(0, self.pin(placement.cpus) or self.home)
        names = self.gpu_names
        env = watchdog.marked({**os.environ, **(kw.pop("env", None) or {}),
                               **placement.env(names), **names_env(names)})
        with self.lock:
            if self.killed:
                raise _Killed()
            proc = subprocess.Popen(argv, env=env, start_new_session=True, **kw)
            watchdog.guard(proc, env)
            self.procs.append(proc)
        return proc

    def run_in_thread(self, target: Callable[..., Completion], *args: Any) -> None:
        def body() -> None:
            try:
                completion = target(*args)
            except _Killed:  # killed before all its processes started; none is left
                completion = (self.tid, KILLED, None, 0.0)
            except BaseException as exc:  # report, never lose, a launcher failure
                completion = (self.tid, ERROR, wire.attach(exc, "", self.key), 0.0)
            self.post(completion)
        threading.Thread(target=body, name=f"rhapsody-launch-{self.key}", daemon=True).start()

    def executable(self, argv: List[str], cwd: Any, env: Any,
                   placements: List[Placement]) -> Completion:
        """Run ``argv`` once per placement; the first rank to exit non-zero fails the node."""
        started: list = []
        files: list = []
        try:
            room_for(len(placements), self.key)
            for p in placements:
                files += (tempfile.TemporaryFile(), tempfile.TemporaryFile())
                started.append((self._start(p, argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                            stdout=files[-2], stderr=files[-1]), *files[-2:], p))
            with selectors.DefaultSelector() as sel:
                try:
                    for rank, (proc, *_) in enumerate(started):
                        sel.register(os.pidfd_open(proc.pid), selectors.EVENT_READ, rank)
                    failed = None
                    while failed is None and sel.get_map():
                        for key, _ in sel.select():
                            sel.unregister(key.fd)
                            os.close(key.fd)
                            proc = started[key.data][0]
                            kill_group(proc)
                            if proc.wait() != 0 and failed is None:
                                failed = key.data
                finally:
                    _close_registered(sel)
        except BaseException:
            for f in files:  # (a failed start's traceback would keep them open)
                f.close()
            raise
        finally:
            _stop([proc for proc, *_ in started])
        results = [ExecResult(argv, _read(out), _read(err), proc.returncode, p.host, p.cpus,
                              p.gpus, p.rank) for proc, out, err, p in started]
        if failed is not None:
            bad = results[failed]
            exc = ExecutableError(bad.returncode, argv, bad.stdout, bad.stderr)
            if len(results) > 1:
                note_rank(exc, failed, len(results))
            return (self.tid, ERROR, wire.attach(exc, "", self.key), 0.0)
        value = results if len(placements) > 1 else results[0]
        return (self.tid, OK, wire.dump_value(value), 0.0)

    def ranks(self, task: tuple, placements: List[Placement]) -> Completion:
        """Run a Python node as ``len(placements)`` rank processes; value: per-rank list.

        Results are read as they come, in any order; the first rank that fails or dies
        fails the node, and the other ranks are killed.
        """
        procs: List[subprocess.Popen] = []
        room_for(len(placements), self.key)
        with selectors.DefaultSelector() as sel:
            try:
                for rank, p in enumerate(placements):
                    self._start_rank(sel, procs, rank, p, task)
                return self._gather(sel, procs)
            finally:
                _stop(procs)
                _close_registered(sel)

    def _start_rank(self, sel: selectors.BaseSelector, procs: List[subprocess.Popen], rank: int,
                    p: Placement, task: tuple) -> None:
        task_r, task_w = os.pipe()
        result_r, result_w = os.pipe()
        try:
            pipes = (task_r, result_w, tracker.worker_end())
            procs.append(self._start(p, worker_command(*pipes), pass_fds=pipes,
                                     stdin=subprocess.DEVNULL))
            # its exit too: a child it forked may hold the pipe open after it died
            exited = os.pidfd_open(procs[-1].pid)
        except BaseException:
            os.close(result_r)
            os.close(task_w)
            raise
        finally:
            os.close(task_r)
            os.close(result_w)
        os.set_blocking(result_r, False)
        buf = bytearray()  # both belong to the selector now (closed with it, once)
        sel.register(result_r, selectors.EVENT_READ, (rank, buf, None))
        sel.register(exited, selectors.EVENT_READ, (rank, buf, result_r))
        try:
            wire.write_all(task_w, wire.frame(("path", wire.python_path()))
                           + wire.frame(("run", [task])))
        finally:
            os.close(task_w)  # EOF: the rank runs its one task and exits

    def _gather(self, sel: selectors.BaseSelector, procs: List[subprocess.Popen]) -> Completion:
        values: List[Any] = [None] * len(procs)
        outputs: List[Any] = [None] * len(procs)
        ended = set()
        while sel.get_map():
            for key, _ in sel.select():
                rank, buf, pipe = key.data
                if rank in ended:  # its other descriptor, in the same batch: closed now
                    continue
                if pipe is None and _drain(key.fd, buf) and not wire.holds_result(buf):
                    continue  # more may come (once its value is in, its threads are not
                    # waited for: the rank is stopped, as its exit would)
                if pipe is not None:  # the rank exited: what it wrote is in its pipe now
                    _drain(pipe, buf)
                ended.add(rank)
                kill_group(procs[rank])  # what it left running in its group (a forked child)
                for k in list(sel.get_map().values()):  # its pipe and its exit: both done
                    if k.data[0] == rank:
                        sel.unregister(k.fd)
                        os.close(k.fd)
                got = wire.split_results(buf)
                if not got:
                    exc = WorkerDiedError(f"rank {rank} of node {self.key!r} died "
                                          f"({describe_exit(procs[rank].wait())}) "
                                          "before returning a value")
                    return (self.tid, DIED, wire.attach(exc, "", self.key), 0.0)
                status, _, _, payload = got[0]
                status, payload, outputs[rank] = wire.take_output(
                    status & ~wire.GPU_RUNTIME, payload)
                if status == wire.ERROR:
                    exc = wire.load_error(payload, self.key)
                    note_rank(exc, rank, len(procs))
                    return (self.tid, ERROR, exc, 0.0, tuple(outputs))
                try:
                    values[rank] = pickle.loads(payload)
                except Exception as exc:  # a class only the rank imports
                    err = unreadable_value(self.key, exc, f"the value of rank {rank} of "
                                                          f"{len(procs)}")
                    return (self.tid, ERROR, err, 0.0, tuple(outputs))
        return (self.tid, OK, wire.dump_value(values), 0.0, tuple(outputs))


#: descriptors each rank holds while it runs (two output files or pipes, its pidfd),
#: and those left for the rest of the driver
PER_RANK, SPARE = 3, 64


def room_for(ranks: int, key: str) -> None:
    """Make room for ``ranks`` ranks' descriptors under this process's open-file limit
    (its soft limit raised toward the hard one if need be), or raise ``OSError``
    saying what limit to raise."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = len(os.listdir("/proc/self/fd")) + PER_RANK * ranks + SPARE
    if need <= soft or soft == resource.RLIM_INFINITY:
        return
    if hard == resource.RLIM_INFINITY or need <= hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
        return
    raise OSError(errno.EMFILE, f"node {key!r} runs {ranks:,} ranks, which need about "
                  f"{need:,} open files in the driver, over its limit of {hard:,} "
                  "(`ulimit -Hn`): raise that limit, or run fewer ranks per node")


def _drain(fd: int, buf: bytearray) -> bool:
    """Read what pipe ``fd`` holds into ``buf``; False at its end (EOF)."""
    while True:
        try:
            data = os.read(fd, wire.READ)
        except BlockingIOError:
            return True
        if not data:
            return False
        buf += data


def _close_registered(sel: selectors.BaseSelector) -> None:
    """Close the file descriptors still registered with ``sel``."""
    for key in list(sel.get_map().values()):
        sel.unregister(key.fd)
        os.close(key.fd)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group ``proc`` leads. Once it has exited (not yet reaped, so
    its id is not reused): what it left running there (``cmd &``), as a batch system
    ends a job step."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _stop(procs: List[subprocess.Popen]) -> None:
    """Kill the processes still running, and reap them all."""
    for proc in procs:
        if proc.poll() is None:
            kill_tree(proc)
    for proc in procs:
        proc.wait()
        watchdog.release(proc)


class _Killed(Exception):
    """The call was killed before all its processes started."""


def _read(f: Any) -> str:
    f.seek(0)
    data = f.read().decode(errors="replace")
    f.close()
    return data
