"""A worker process on its own (rhapsody_graph.backends.worker): the real
``python -m rhapsody_graph.backends.worker`` on two pipes, driven frame by frame
from the test as the pool drives it."""
import os
import pickle
import subprocess
import sys
import time

import psutil

from rhapsody_graph.backends import wire


def hold(signal_path: str, release_path: str) -> str:
    """Say it started (on one FIFO), then wait until the test says go (on another)."""
    with open(signal_path, "w") as f:
        f.write("started")
    with open(release_path) as f:
        return f.read()


def shout(text: str) -> str:
    print(text)
    return text


def identity(x):
    return x


def add(a, b):
    return a + b


def loaded_slowly(seconds: float):
    """``identity``, after ``seconds``: what unpickling a function costs when its
    module is slow to import (torch, say)."""
    time.sleep(seconds)
    return identity


class SlowToLoad:
    """A function whose first load on a worker takes half a second."""

    def __reduce__(self):
        return loaded_slowly, (0.5,)


class Upstream:
    """An upstream value's place in a call's arguments (any object: slots are by identity)."""


class WorkerProcess:
    def __init__(self, tmp_path):
        task_r, self.task_w = os.pipe()
        self.result_r, result_w = os.pipe()
        self.stdout = open(tmp_path / "worker.out", "w+")  # a file: block-buffered
        buffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rhapsody_graph.backends.worker", str(task_r), str(result_w)],
            pass_fds=(task_r, result_w), stdout=self.stdout, env=buffered)
        os.close(task_r)
        os.close(result_w)
        self.inbox = bytearray()
        self.send(("path", wire.python_path()))
        self.fids = {}

    def send(self, message):
        wire.write_all(self.task_w, wire.frame(message))

    def run(self, *calls):
        """Queue ``(tid, function, args[, inputs])`` calls; a function's bytes go with its
        first call. ``inputs``: what fills each :class:`Upstream` of ``args`` in turn,
        the value's bytes or the tid of an earlier call (forwarded)."""
        tasks = []
        for tid, fn, args, *inputs in calls:
            inputs = list(inputs[0]) if inputs else []
            upstream = [a for a in args if isinstance(a, Upstream)]
            first = fn not in self.fids
            fid = self.fids.setdefault(fn, len(self.fids) + 1)
            tasks.append((tid, fid, wire.dump_callable(fn) if first else None,
                          wire.dump_args(args, {}, upstream), inputs, None))
        self.send(("run", tasks))

    def results(self, n, values=False, timed=False):
        """The next ``n`` results, ``(status, tid)`` each (and the value, or the seconds
        the worker says the call ran, if asked)."""
        out = []
        while len(out) < n:
            data = os.read(self.result_r, 1 << 16)
            assert data, f"the worker ended after {len(out)} of {n} results"
            self.inbox += data
            out += wire.split_results(self.inbox)
        if values:
            return [(status, tid, pickle.loads(payload) if status == wire.OK else None)
                    for status, tid, _, payload in out]
        if timed:
            return [(status, tid, seconds) for status, tid, seconds, _ in out]
        return [(status, tid) for status, tid, _, _ in out]

    def close(self):
        os.close(self.task_w)  # EOF: the worker ends
        self.proc.wait(timeout=30)
        os.close(self.result_r)
        self.stdout.close()
        assert not psutil.pid_exists(self.proc.pid) or \
            psutil.Process(self.proc.pid).status() == psutil.STATUS_ZOMBIE


def test_a_drop_sent_while_a_call_runs_returns_the_calls_queued_behind_it(tmp_path):
    started, release = tmp_path / "started", tmp_path / "release"
    os.mkfifo(started)
    os.mkfifo(release)
    w = WorkerProcess(tmp_path)
    try:
        w.run((1, hold, (str(started), str(release))), (2, identity, (2,)), (3, identity, (3,)))
        with open(started) as f:
            assert f.read() == "started"  # call 1 runs; 2 and 3 wait behind it
        w.send(("drop",))
        with open(release, "w") as f:
            f.write("go")
        assert sorted(w.results(3)) == [(wire.OK, 1), (wire.DROPPED, 2), (wire.DROPPED, 3)]
    finally:
        w.close()



def mark(path):
    with open(path, "w") as f:
        f.write("ran")


def test_calls_queued_behind_a_running_one_never_start_once_the_driver_closes_the_pipe(
        tmp_path):
    """A Dragon function worker cannot be killed: given up (a cancel), it ran the calls
    queued behind its call, which the driver had sent elsewhere (ran twice) or cancelled."""
    started, release = tmp_path / "started", tmp_path / "release"
    os.mkfifo(started)
    os.mkfifo(release)
    w = WorkerProcess(tmp_path)
    behind = [tmp_path / f"behind{i}" for i in range(2)]
    w.run((1, hold, (str(started), str(release))), *[(2 + i, mark, (str(p),))
                                                     for i, p in enumerate(behind)])
    with open(started) as f:
        assert f.read() == "started"
    os.close(w.task_w)  # given up while call 1 runs
    with open(release, "w") as f:
        f.write("go")
    assert w.proc.wait(timeout=30) == 0
    os.close(w.result_r)
    w.stdout.close()
    assert not any(p.exists() for p in behind)

def test_many_quick_calls_each_answer_once_in_order_and_what_one_prints_reaches_the_terminal(
        tmp_path):
    w = WorkerProcess(tmp_path)
    try:
        w.run(*[(tid, identity, (tid,)) for tid in range(1, 501)])
        w.run((501, shout, ("hello from the worker",)))
        assert w.results(501) == [(wire.OK, tid) for tid in range(1, 501)] + \
            [(wire.OK | wire.OUTPUT, 501)]
        w.stdout.seek(0)  # written through at the end of the call, not at the worker's exit
        assert w.stdout.read() == "hello from the worker\n"
    finally:
        w.close()


def test_a_value_that_several_queued_calls_name_is_given_to_each_of_them(tmp_path):
    w = WorkerProcess(tmp_path)
    a, b = Upstream(), Upstream()
    try:
        # 2 and 3 both take 1's value on the worker, 3 takes 2's too (a diamond); 4
        # names 1 again after the calls that named it have taken it: not kept, dropped
        w.run((1, identity, (5,)), (2, add, (a, 1), [1]), (3, add, (a, b), [1, 2]))
        assert w.results(3, values=True) == [(wire.OK, 1, 5), (wire.OK, 2, 6), (wire.OK, 3, 11)]
        w.run((4, add, (a, 1), [1]), (5, add, (a, b), [3, pickle.dumps(1)]))
        assert w.results(2, values=True) == [(wire.DROPPED, 4, None), (wire.OK, 5, 12)]
    finally:
        w.close()


def test_a_calls_run_time_leaves_out_the_one_time_load_of_its_function(tmp_path):
    # the scheduler sizes a lease by its function's run time: a first call timed with
    # the import of the function's module (~0.15 s for a test module, seconds for
    # torch) made it queue that function's calls one at a time for dozens of calls
    w = WorkerProcess(tmp_path)
    try:
        slow = SlowToLoad()
        w.run((1, slow, (7,)), (2, slow, (8,)))
        (ok1, tid1, first), (ok2, tid2, _) = w.results(2, timed=True)
        assert (ok1, tid1, ok2, tid2) == (wire.OK, 1, wire.OK, 2)
        assert 0 < first < 0.5, f"the first call ran {first} s by the worker's clock"
    finally:
        w.close()
