"""A worker process: runs the tasks the driver sends, one after the other.

Started as ``python -m rhapsody_graph.backends.worker TASK_FD RESULT_FD [TRACKER_FD]``
with two private pipes (and the driver's resource tracker's, to share it). It keeps a
queue of tasks; between two tasks it takes any new messages without blocking, at
most once every :data:`LOOK` seconds while tasks run back to back (a ``drop`` is
seen before the next task that starts after that), and blocks on the pipe only when the queue is empty. Every result is written as soon
as it exists, so the driver always knows the task at the head of the queue is the
one running (a ``skip``, a queued call killed, is answered out of turn). An input may
be the tid of an earlier call instead of bytes (a chain forwarded by the
scheduler): the worker keeps the value of a call that queued
calls name (until the last of them takes it), and of its last call, and fills the
input from there without a trip through the driver; if that value is not here (the
call failed, or ran before the one naming it arrived and was not the last) the call
is answered ``DROPPED``. The run time sent with a result leaves out the one-time load
of the call's function (the import of its module, on its first call here).
A placement is applied only when it differs from the last one:
``os.sched_setaffinity`` to the granted cores, then the GPU masks and the
``RANK``/``WORLD_SIZE`` variables in ``os.environ``. EOF on the task pipe (the
driver closed it, or died) ends the process once its running call returns: calls
queued behind it never start (the driver has sent them elsewhere or dropped them). A
rank's one call, and EOF after it, is run: EOF is read only once the queue is empty
or at a look between two calls. SIGINT is ignored: the driver owns
Ctrl-C and kills workers itself.
"""
from __future__ import annotations

import os
import select
import signal
import sys
import time
from collections import deque
from types import CoroutineType
from typing import Any, Deque, Dict, Optional, Tuple

from . import capture, wire
from ..resources import GPU_NAMES, Placement, gpu_names

#: set in every process ``os.fork`` makes from this one (a flag, not a getpid per call)
_FORKED = [False]
os.register_at_fork(after_in_child=lambda: _FORKED.__setitem__(0, True))

#: between two queued tasks, look for new messages again once this many seconds have
#: passed since the last look: a poll per task would be a third of a no-op's cost here
LOOK = 50e-6


class Worker:
    def __init__(self, task_fd: int, result_fd: int) -> None:
        self.task_fd, self.result_fd = task_fd, result_fd
        _FORKED[0] = False  # this process is the worker (a forked one included)
        self.poller = select.poll()  # between two tasks: has the driver sent more?
        self.poller.register(task_fd, select.POLLIN)
        self.inbox = bytearray()
        self.queue: Deque[tuple] = deque()
        self.funcs: Dict[int, Any] = {}
        self.unloaded: Dict[int, bytes] = {}  # functions sent, not unpickled yet
        self.place: Optional[tuple] = None
        self.home = os.sched_getaffinity(0)
        self.gpu_names = gpu_names(os.environ.get(GPU_NAMES, ""))  # this host's UUIDs
        self.open = True
        self.gpu_flag = 0  # wire.GPU_RUNTIME once a GPU runtime is mapped in this process
        self.out, self.err = capture.install()  # what each call prints, kept for its result
        self.wanted: Dict[int, int] = {}  # tid -> how many queued calls take its value
        self.kept: Dict[int, bytes] = {}  # those values, once their calls have returned
        self.last: Optional[Tuple[int, bytes]] = None  # the last call's (tid, value)
        self.looked = 0.0  # when messages were last looked for (perf_counter)
        self.ended = 0.0  # when the last call ended (perf_counter)

    def serve(self) -> None:
        while self.open or self.queue:
            if self.queue:
                if self.ended - self.looked >= LOOK:
                    self.looked = self.ended
                    self.receive(block=False)
                if self.queue:
                    self.run(self.queue.popleft())
            else:
                self.receive(block=True)
                self.looked = time.perf_counter()

    def receive(self, block: bool) -> None:
        """Read what the driver sent: wait for it, or only take what is already there."""
        if not block and not self.poller.poll(0):
            return
        data = os.read(self.task_fd, wire.READ)
        if not data:  # the driver gave this worker up (or died): what is queued here it
            self.open = False  # has sent elsewhere or dropped, so it never runs here
            self.queue.clear()
            return
        self.inbox += data
        for message in wire.split_frames(self.inbox):
            self.handle(message)

    def handle(self, message: tuple) -> None:
        verb = message[0]
        if verb == "run":
            for task in message[1]:
                if task[2] is not None:  # a function comes with the first call sent here
                    self.unloaded[task[1]] = task[2]
                for d in task[4]:
                    if type(d) is int:
                        self.wanted[d] = self.wanted.get(d, 0) + 1
            self.queue.extend(message[1])
        elif verb == "skip":  # a queued call was killed: it never starts here
            tid = message[1]
            for task in self.queue:
                if task[0] == tid:
                    self.queue.remove(task)
                    for d in task[4]:
                        if type(d) is int:
                            self.value_of(d)  # it no longer takes that value
                    wire.write_all(self.result_fd, wire.result_frame(wire.DROPPED, tid, 0.0, b""))
                    break
        elif verb == "drop":
            for task in self.queue:
                wire.write_all(self.result_fd, wire.result_frame(wire.DROPPED, task[0], 0.0, b""))
            self.queue.clear()
            self.forget_values()
        elif verb == "forget":
            self.funcs.clear()
            self.unloaded.clear()
            for cache in wire.PER_RUN:
                cache.clear()
            self.forget_values()
        elif verb == "path":
            sys.path[:0] = [p for p in message[1] if p not in sys.path]

    def forget_values(self) -> None:
        self.wanted.clear()
        self.kept.clear()
        self.last = None

    def value_of(self, tid: int) -> Optional[bytes]:
        """The value of earlier call ``tid`` if it is here (kept until the last queued
        call that names it takes it)."""
        named = self.wanted.pop(tid, 0)
        if named > 1:
            self.wanted[tid] = named - 1
            value = self.kept.get(tid)
        else:
            value = self.kept.pop(tid, None)
        if value is None and self.last is not None and self.last[0] == tid:
            value = self.last[1]
        return value

    def run(self, task: tuple) -> None:
        tid, fid, _, args, deps, place = task
        for i, d in enumerate(deps):
            if type(d) is int:
                value = self.value_of(d)
                if value is None:
                    wire.write_all(self.result_fd, wire.result_frame(wire.DROPPED, tid, 0.0, b""))
                    return
                deps[i] = value
        start = time.perf_counter()
        try:
            if place != self.place:
                self.apply(place)
            fn = self.funcs.get(fid)
            loaded, a, kw = wire.load_call(None if fn is not None else self.unloaded[fid],
                                           args, deps)
            if fn is None:
                fn = self.funcs[fid] = loaded
                del self.unloaded[fid]
                start = time.perf_counter()  # leases are sized by run time (_by_time)
            value = fn(*a, **kw)
            if type(value) is CoroutineType:  # an async def function's call
                value = wire.await_coroutine(value)
            payload, status = wire.dump_result(value), wire.OK
        except BaseException as exc:  # the node's failure, whatever it is, goes back
            payload, status = wire.dump_error(exc), wire.ERROR
            if _FORKED[0]:
                _leave(exc)
        if _FORKED[0]:
            _leave(None)
        self.ended = time.perf_counter()
        seconds = self.ended - start
        if status == wire.OK:
            self.last = (tid, payload)
            if tid in self.wanted:
                self.kept[tid] = payload
        else:
            self.last = None
        out, err = self.out.take(), self.err.take()
        if out or err or sys.stdout is not self.out or sys.stderr is not self.err:
            flush_std()  # it printed, or replaced a stream: what it wrote goes out now
        if place and place[3] and not self.gpu_flag and gpu_runtime_loaded():
            self.gpu_flag = wire.GPU_RUNTIME
        status, payload = wire.with_output(status, payload, out, err)
        wire.write_all(self.result_fd,
                       wire.result_frame(status | self.gpu_flag, tid, seconds, payload))

    def apply(self, place: Optional[tuple]) -> None:
        """Pin to the granted cores and export the GPU/rank environment."""
        self.place = place
        if place is None:
            os.sched_setaffinity(0, self.home)
            return
        host, cpus, pinned, gpus, rank, world = place
        os.sched_setaffinity(0, pinned or self.home)
        os.environ.update(Placement(host, cpus, gpus, 0, rank, world).env(self.gpu_names))


def _leave(exc: Optional[BaseException]) -> None:
    """End a process the call forked that came back into the worker's loop (it never
    answers for the call on the worker's pipe): its ``SystemExit`` code, else 0, or 1
    for another exception."""
    flush_std()
    code = exc.code if isinstance(exc, SystemExit) else 0 if exc is None else 1
    os._exit(code if isinstance(code, int) else 0 if code is None else 1)


def gpu_runtime_loaded() -> bool:
    """True once CUDA, ROCm or Level Zero is mapped: it has read the GPU mask for good."""
    try:
        with open("/proc/self/maps") as maps:
            text = maps.read()
    except OSError:
        return False
    return any(lib in text for lib in ("libcuda.so", "libamdhip64", "libze_loader"))


def flush_std() -> None:
    """Flush the standard streams, and the originals behind them where they were replaced."""
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except Exception:
            pass


def share_resource_tracker(fd: int) -> None:
    """Register what this worker's tasks make (a ``SharedMemory`` segment, a named
    semaphore) with the driver's ``multiprocessing`` resource tracker, on pipe ``fd``,
    as a ``multiprocessing`` child does, instead of a tracker of the worker's own
    (see :mod:`.tracker`)."""
    from multiprocessing import resource_tracker
    resource_tracker._resource_tracker._fd = fd  # what multiprocessing.spawn sets, too


def main(argv: list) -> None:
    """Serve tasks: ``argv[1:]`` are the task and result pipes and, where the driver
    shares its resource tracker, that tracker's pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if len(argv) > 3:
        share_resource_tracker(int(argv[3]))
    Worker(int(argv[1]), int(argv[2])).serve()


if __name__ == "__main__":
    main(sys.argv)
