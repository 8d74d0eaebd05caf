"""Scheduler policy and faults, for real: worker processes, executables and ranks are
started, killed and checked through /proc; nothing is mocked.

What the tasks did is observed through files they write (their pid, a marker, one
line per attempt), since a failing compute() returns no values.
"""
import ctypes
import itertools
import json
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time

import pytest

import rhapsody_graph as rhapsody

from .backends.test_worker import hold as hold_on_fifos
from .conftest import child_pids, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MB = 1 << 20


# -- helpers (run here) ------------------------------------------------------------------

def alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie (a zombie has been killed for good)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def still_alive(pids, seconds: float = 3.0) -> list:
    """The pids still alive after waiting up to ``seconds`` for them to go."""
    deadline = time.monotonic() + seconds
    while True:
        left = [p for p in pids if alive(p)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.02)


def wait_for_files(paths, seconds: float, proc=None) -> None:
    deadline = time.monotonic() + seconds
    while not all(os.path.exists(p) and open(p).read().strip() for p in paths):
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"driver exited early ({proc.returncode}): "
                                 f"{proc.stderr.read().decode(errors='replace')}")
        if time.monotonic() > deadline:
            missing = [p for p in paths if not os.path.exists(p)]
            raise AssertionError(f"not written within {seconds} s: {missing}")
        time.sleep(0.02)


def read_pids(path) -> list:
    return [int(p) for p in open(path).read().split()]


def lines(path) -> list:
    return open(path).read().split() if os.path.exists(path) else []


def warm(backend) -> None:
    """Start every worker of ``backend`` and import this module in each, so a short
    timeout measures the task rather than a worker's start-up."""
    exclusive = rhapsody.task(timeout=60)(whoami)  # a lease, hence a worker, per node
    pids = rhapsody.compute([exclusive(i) for i in range(backend.max_workers)],
                            backend=backend)[0]
    assert len(set(pids)) == backend.max_workers


# -- task bodies (run in workers; module level, so they are sent by reference) ----------

def whoami(*_):
    return os.getpid()


def record_pid(path, *_):
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    return os.getpid()


def record_pid_and_sleep(path, seconds):
    record_pid(path)
    time.sleep(seconds)
    return "finished"


def write_marker(path, *upstream):
    """Write the (system-wide) monotonic time at which it ran."""
    with open(path, "w") as f:
        f.write(repr(time.monotonic()))
    return path


def survivors(marker, *pidfiles):
    """Run after a timed-out node, on the cores it held: write when this ran and which
    of its processes were still alive by then (given 0.5 s for a SIGKILL to land)."""
    pids = [pid for path in pidfiles for pid in read_pids(path)]
    with open(marker, "w") as f:
        json.dump({"t": time.monotonic(), "pids": pids, "alive": still_alive(pids, 0.5)}, f)


def count_attempt(path) -> int:
    """Append this process's pid to ``path``; return how many attempts there were."""
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    return len(lines(path))


def flaky(path, failures):
    n = count_attempt(path)
    if n <= failures:
        raise ValueError(f"attempt {n} fails")
    return n


def die(how):
    if how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif how == "exit":
        os._exit(3)
    elif how == "segfault":
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file to write
        ctypes.string_at(0)
    raise AssertionError(f"still alive after {how}")


def die_first(path, how):
    """Die on the first attempt; return (attempt, pid) on a later one."""
    n = count_attempt(path)
    if n == 1:
        die(how)
    return n, os.getpid()


def die_always(path, how):
    count_attempt(path)
    die(how)


def broken(x):
    raise KeyError(f"broken input {x}")  # <- the remote source line


def fail_once_started(started, seconds=10.0):
    """Raise, but only once the node writing ``started`` is running."""
    deadline = time.monotonic() + seconds
    while not os.path.exists(started) and time.monotonic() < deadline:
        time.sleep(0.01)
    raise RuntimeError("failed while the other branch was running")


def slow_branch(started, finished, seconds):
    write_marker(started)
    time.sleep(seconds)
    write_marker(finished)
    return "slow done"


def step(log, branch, upstream=None):
    """A node of real work (5 ms: over the 2 ms a shared lease may queue), logging its branch."""
    with open(log, "a") as f:
        f.write(f"{branch}\n")
    time.sleep(0.005)
    return branch


def driver_rss() -> int:
    """Resident memory of the driver (this worker's parent), in bytes."""
    with open(f"/proc/{os.getppid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def grow(upstream, size):
    """Take the previous big value, note the driver's memory, return a new big value."""
    readings = list(upstream[0]) if upstream else []
    readings.append(driver_rss())
    return readings, os.urandom(size)


class LockedCallable:
    """A callable that cannot be pickled: it holds a lock."""

    def __init__(self):
        self.lock = threading.Lock()

    def __call__(self, path):
        return write_marker(path)


@pytest.fixture(scope="module")
def backend():
    with rhapsody.LocalBackend(cpus=2) as b:
        yield b


# -- timeouts ----------------------------------------------------------------------------

def test_timeout_on_python_node_kills_its_worker_names_the_node_and_frees_the_ledger(
        backend, tmp_path):
    warm(backend)
    pidfile, after = tmp_path / "pid", tmp_path / "after"
    # both need every core: `follow` can start only once the timed-out node is released
    slow = rhapsody.task(cpus=2, timeout=0.5)(record_pid_and_sleep)(str(pidfile), 30)
    follow = rhapsody.task(cpus=2)(survivors)(str(after), str(pidfile))
    t0 = time.monotonic()
    with pytest.raises(rhapsody.NodeTimeoutError, match=re.escape(repr(slow.key))):
        rhapsody.compute(slow, follow, backend=backend, fail_fast=False)
    assert time.monotonic() - t0 < 0.5 + 1.0
    [pid] = read_pids(pidfile)
    seen = json.loads(after.read_text())
    assert seen["t"] >= t0 + 0.5, "the follow-up ran while the cores were held"
    assert seen["alive"] == [], "the timed-out node's worker was still running after it"
    assert not alive(pid)
    assert backend.slots_free() == backend.max_workers
    # later computes run on a replacement worker, with every core
    pids = rhapsody.compute([rhapsody.task(whoami)(i) for i in range(4)],
                            rhapsody.task(cpus=2)(whoami)(), backend=backend)
    assert pid not in pids[0] and pids[1] != pid


@pytest.mark.parametrize("seconds", [30 * 24 * 3600, 1e12])
def test_timeout_and_retry_backoff_of_many_days_are_waited_for_not_a_scheduler_crash(
        tmp_path, seconds):
    # poll() takes at most ~24.8 days: a longer wait crashed the scheduler, failing
    # every node of the session with "OverflowError: timeout is too large"
    backend = rhapsody.LocalBackend(cpus=2)
    with rhapsody.Session(backend) as s:
        patient = s.submit(rhapsody.task(timeout=seconds)(whoami)())
        retried = s.submit(rhapsody.task(retries=1, backoff=seconds)(flaky)(
            str(tmp_path / "attempts"), 1))
        assert patient.result(timeout=60) == patient.result()
        assert isinstance(patient.result(), int)
        # the failed first attempt waits for its backoff; the session goes on meanwhile
        wait_for_files([tmp_path / "attempts"], 60)
        assert s.compute(rhapsody.task(whoami)()) != 0
        assert len(lines(tmp_path / "attempts")) == 1
        assert not retried.done()
        # no call of it runs while it waits out its backoff
        assert wait_until(lambda: not retried.running(), 30)
        assert retried.cancel() and retried.cancelled()
        assert backend.ledger.idle()


def test_the_deadlines_of_nodes_that_ended_are_not_kept_until_their_time():
    # an hour's timeout on every node of a long-lived session: the heap of deadlines
    # grew by one entry per node ended until its hour was up
    with rhapsody.Session(rhapsody.LocalBackend(cpus=2)) as s:
        patient = rhapsody.task(timeout=3600)(inc)
        for _ in range(3):
            assert s.compute(*[patient(i) for i in range(2000)]) == tuple(range(1, 2001))
        assert len(s._scheduler.deadlines) < 1000


def test_timeout_on_executable_kills_its_process_tree_and_frees_the_ledger(backend, tmp_path):
    pidfile, after = tmp_path / "pids", tmp_path / "after"
    # the shell and a child of its own: both must go
    slow = rhapsody.executable(["sh", "-c", f'sleep 30 & echo $$ $! > "{pidfile}"; wait'],
                               cpus=2, timeout=0.5)
    follow = rhapsody.task(cpus=2)(survivors)(str(after), str(pidfile))
    t0 = time.monotonic()
    with pytest.raises(rhapsody.NodeTimeoutError, match=re.escape(repr(slow.key))):
        rhapsody.compute(slow, follow, backend=backend, fail_fast=False)
    assert time.monotonic() - t0 < 0.5 + 1.0
    seen = json.loads(after.read_text())
    assert seen["t"] >= t0 + 0.5, "the follow-up ran while the cores were held"
    assert len(seen["pids"]) == 2
    assert seen["alive"] == [], "the executable's processes were still running after it"
    assert not still_alive(seen["pids"], 2.0)
    assert rhapsody.task(cpus=2)(whoami)().compute(backend=backend) > 0


def test_timeout_on_multi_rank_node_kills_every_rank_and_frees_the_ledger(backend, tmp_path):
    after = tmp_path / "after"

    def hold(directory):  # a closure: sent by value, ranks start without importing tests
        import os
        import time
        with open(os.path.join(directory, "rank" + os.environ["RANK"]), "w") as f:
            f.write(str(os.getpid()))
        time.sleep(30)

    timeout = 3.0  # two fresh rank processes must start (and write their pid) first
    slow = rhapsody.task(ranks=2, cpus=1, timeout=timeout)(hold)(str(tmp_path))
    follow = rhapsody.task(cpus=2)(survivors)(
        str(after), *(str(tmp_path / f"rank{r}") for r in range(2)))
    t0 = time.monotonic()
    with pytest.raises(rhapsody.NodeTimeoutError, match=re.escape(repr(slow.key))):
        rhapsody.compute(slow, follow, backend=backend, fail_fast=False)
    assert time.monotonic() - t0 < 20  # killed at its timeout, not after its 30 s sleep
    seen = json.loads(after.read_text())
    assert seen["t"] >= t0 + timeout, "the follow-up ran while the ranks held their cores"
    assert len(set(seen["pids"])) == 2
    assert seen["alive"] == [], "rank processes were still running after the timeout"
    assert not still_alive(seen["pids"], 2.0)
    assert rhapsody.task(cpus=2)(whoami)().compute(backend=backend) > 0


# -- retries and dying workers -------------------------------------------------------------

def test_retries_rerun_a_failing_node_until_it_returns_its_value(backend, tmp_path):
    count = tmp_path / "attempts"
    node = rhapsody.task(retries=2)(flaky)(str(count), 2)
    assert node.compute(backend=backend) == 3
    assert len(lines(count)) == 3


def test_retries_exhausted_raise_the_last_error_after_n_plus_one_attempts(backend, tmp_path):
    count = tmp_path / "attempts"
    node = rhapsody.task(retries=2)(flaky)(str(count), 100)
    with pytest.raises(ValueError, match="attempt 3 fails") as info:
        node.compute(backend=backend)
    assert len(lines(count)) == 3
    notes = "\n".join(info.value.__notes__)
    assert node.key in notes and "failed 3 times" in notes


def test_timed_out_node_is_retried_and_each_attempt_is_killed(backend, tmp_path):
    warm(backend)
    count = tmp_path / "attempts"

    def hang(path):
        earlier = read_pids(path) if os.path.exists(path) else []
        with open(path + ".alive", "a") as f:  # earlier attempts still running now
            f.write("".join(f"{p}\n" for p in still_alive(earlier, 0.1)))
        count_attempt(path)
        time.sleep(30)

    node = rhapsody.task(timeout=0.5, retries=1)(hang)(str(count))
    t0 = time.monotonic()
    with pytest.raises(rhapsody.NodeTimeoutError, match=re.escape(repr(node.key))) as info:
        node.compute(backend=backend)
    assert time.monotonic() - t0 < 2 * 0.5 + 1.5
    pids = read_pids(count)
    assert len(pids) == 2 and "failed 2 times" in "\n".join(info.value.__notes__)
    assert lines(f"{count}.alive") == [], "the retry started beside the timed-out attempt"
    assert not [p for p in pids if alive(p)]


DEATHS = {"sigkill": "SIGKILL", "exit": "exit code 3", "segfault": "SIGSEGV"}


@pytest.mark.parametrize("how", sorted(DEATHS))
def test_node_whose_worker_dies_is_retried_on_a_replacement_worker(how, tmp_path):
    count = tmp_path / "attempts"
    with rhapsody.LocalBackend(cpus=1) as b:
        attempt, pid = rhapsody.task(retries=1)(die_first)(str(count), how).compute(backend=b)
    first, second = read_pids(count)
    assert (attempt, pid) == (2, second) and first != second
    assert not alive(first)


@pytest.mark.parametrize("how", sorted(DEATHS))
def test_worker_death_fails_its_node_and_independent_nodes_complete_on_a_replacement(
        how, tmp_path):
    count = tmp_path / "attempts"
    with rhapsody.LocalBackend(cpus=1) as b:  # one worker: the others must use a new one
        bad = rhapsody.task(die_always)(str(count), how)
        others = [rhapsody.task(record_pid)(str(tmp_path / f"other{i}")) for i in range(6)]
        with pytest.raises(rhapsody.WorkerDiedError) as info:
            rhapsody.compute(bad, others, backend=b, fail_fast=False)
        message = str(info.value)
        assert "worker" in message and "died" in message and DEATHS[how] in message
        assert bad.key in message and "failed 2 times" in "".join(info.value.__notes__)
        dead = read_pids(count)  # an infrastructure failure is retried once by default
        assert len(dead) == 2 and not [p for p in dead if alive(p)]
        ran_on = {read_pids(tmp_path / f"other{i}")[0] for i in range(6)}
        assert not ran_on & set(dead)
        # the replacement is a working pool worker
        assert rhapsody.task(whoami)().compute(backend=b) != dead


# -- errors -------------------------------------------------------------------------------

def test_failing_node_raises_its_own_type_with_remote_traceback_and_skips_dependents(
        backend, tmp_path):
    bad = rhapsody.task(broken)(7)
    child = rhapsody.task(write_marker)(str(tmp_path / "child"), bad)
    grandchild = rhapsody.task(write_marker)(str(tmp_path / "grandchild"), child)
    with pytest.raises(KeyError, match="broken input 7") as info:
        grandchild.compute(backend=backend)
    exc = info.value
    assert isinstance(exc.__cause__, rhapsody.RemoteTraceback)
    remote = str(exc.__cause__)
    assert 'raise KeyError(f"broken input {x}")' in remote and "in broken" in remote
    notes = "\n".join(exc.__notes__)
    assert f"raised by node {bad.key!r}" in notes
    assert f"2 node(s) depending on {bad.key!r} did not run" in notes
    assert not (tmp_path / "child").exists() and not (tmp_path / "grandchild").exists()


def test_fail_fast_lets_a_running_independent_node_finish_and_starts_nothing_new(
        backend, tmp_path):
    warm(backend)
    started, finished, never = (str(tmp_path / n) for n in ("started", "finished", "never"))
    bad = rhapsody.task(fail_once_started)(started)
    slow = rhapsody.task(slow_branch)(started, finished, 1.0)
    later = rhapsody.task(write_marker)(never)  # ready, but both cores are busy
    with pytest.raises(RuntimeError, match="failed while the other branch was running"):
        rhapsody.compute(bad, slow, later, backend=backend)
    assert os.path.exists(finished), "compute() raised before the running node finished"
    assert not os.path.exists(never), "a new node started after the failure (fail_fast)"


def test_node_error_ending_compute_leaves_no_child_process(tmp_path):
    before = child_pids()
    backend = rhapsody.LocalBackend(cpus=5)
    try:
        nodes = [rhapsody.task(whoami)(i) for i in range(4)]
        nodes.append(rhapsody.executable(["sleep", "0.3"]))
        nodes.append(rhapsody.task(ranks=2)(whoami)())
        nodes.append(rhapsody.task(broken)(1))
        with pytest.raises(KeyError):
            rhapsody.compute(nodes, backend=backend)
        assert child_pids() - before == set()
    finally:
        backend.shutdown()


# -- priority and memory --------------------------------------------------------------------

def test_independent_branches_run_one_after_the_other(tmp_path):
    log = str(tmp_path / "log")
    tails = []
    for branch in range(4):
        node = None
        for _ in range(5):
            node = rhapsody.task(step)(log, branch, node)
        tails.append(node)
    with rhapsody.LocalBackend(cpus=1) as b:
        assert rhapsody.compute(*tails, backend=b) == (0, 1, 2, 3)
    order = [int(x) for x in lines(log)]
    assert sorted(order) == sorted(list(range(4)) * 5)
    runs = [branch for branch, _ in itertools.groupby(order)]
    assert len(runs) == 4, f"a branch started before the previous one finished: {order}"



@pytest.mark.parametrize("options", [{"gpus": 1}, {"timeout": 60}])
def test_a_node_of_another_shape_starts_in_priority_order_not_after_every_ready_one(
        tmp_path, options):
    # each prep's follow-up comes before the next prep; the follow-ups have a request
    # (or a timeout) of their own, so they never share the preps' lease. The preps'
    # idle lease kept the only core and every prep ran first (a GPU stage idle for the
    # whole CPU stage, every intermediate kept)
    log = str(tmp_path / "log")
    follow = rhapsody.task(step, **options)
    tails = [follow(log, f"g{i}", rhapsody.task(step)(log, f"s{i}")) for i in range(4)]
    with rhapsody.LocalBackend(cpus=1, gpus=1) as b:
        rhapsody.compute(tails, backend=b)
    assert lines(log) == ["s0", "g0", "s1", "g1", "s2", "g2", "s3", "g3"]


def chain_driver_growth(size, length, keep_all):
    """Driver memory at the start of each step of a chain of big values."""
    nodes = [rhapsody.task(grow)(None, size)]
    for _ in range(length - 1):
        nodes.append(rhapsody.task(grow)(nodes[-1], size))
    with rhapsody.LocalBackend(cpus=1) as b:
        values = rhapsody.compute(nodes if keep_all else nodes[-1], backend=b)[0]
    readings = values[-1][0] if keep_all else values[0]
    assert len(readings) == length
    return readings


@pytest.mark.timeout(30)  # a big value once hung the pipes forever
def test_results_no_longer_needed_are_released_from_driver_memory():
    size, length = 10 * MB, 10
    # control: every step is an output, so every result is kept: the driver grows per step
    kept = chain_driver_growth(size, length, keep_all=True)
    assert kept[-1] - kept[length // 2] > 2 * size  # 4 steps: about 4 * size
    # only the last step is an output: each result goes once its one dependent is done,
    # so the driver's memory levels off
    released = chain_driver_growth(size, length, keep_all=False)
    late = released[-1] - released[length // 2]
    # one value's worth of slack: the allocator may keep a freed 10 MB buffer mapped
    # (a run under load once grew exactly 10 MB), while keeping them all grows ~40 MB
    assert late < 2 * size, f"the driver grew by {late / MB:.0f} MB over the last steps"


def test_scheduler_forgets_intermediate_results_and_futures_keep_their_own():
    """The same contract seen in the scheduler's records (with small values): once
    the outputs are done the scheduler holds no record, and each output's future
    holds its own value's bytes."""
    inc = rhapsody.task(lambda x: x + 1)
    a = inc(0)
    b = inc(a)
    c = inc(b)  # output
    d = inc(a)  # output; `a` is needed by b and d, then released
    with rhapsody.Session(backends=[rhapsody.LocalBackend(cpus=1)]) as s:
        fc, fd = s.submit(c, d)
        assert [fc.result(timeout=60), fd.result(timeout=60)] == [3, 2]
        s.wait()
        assert s._scheduler.tasks == {}
        assert fc._task.payload is not None and fc._task.deps == ()


# -- Ctrl-C ----------------------------------------------------------------------------

DRIVER = """
import os, sys, time
sys.path.insert(0, {root!r})
import rhapsody_graph as rhapsody

D = {directory!r}

def hold(name):
    with open(os.path.join(D, name), "w") as f:
        f.write(str(os.getpid()))
    time.sleep(30)

def hold_rank():
    hold("rank" + os.environ["RANK"])

if __name__ == "__main__":
    python = [rhapsody.task(hold)("py%d" % i) for i in range(2)]
    exe = rhapsody.executable(["sh", "-c", 'echo $$ > "$0"; exec sleep 30',
                               os.path.join(D, "exe")])
    ranks = rhapsody.task(ranks=2)(hold_rank)()
    rhapsody.compute(python, exe, ranks, backend=rhapsody.LocalBackend(cpus=6))
    print("compute returned")
"""


def test_ctrl_c_in_the_driver_stops_promptly_and_kills_workers_executables_and_ranks(
        tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(root=ROOT, directory=str(tmp_path)))
    names = ["py0", "py1", "exe", "rank0", "rank1"]
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_for_files([str(tmp_path / n) for n in names], 20.0, proc)
        pids = [int((tmp_path / n).read_text()) for n in names]
        assert set(pids) <= child_pids(proc.pid)
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends
        out, err = proc.communicate(timeout=5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert time.monotonic() - t0 < 5
    assert b"KeyboardInterrupt" in err and b"compute returned" not in out
    assert not still_alive(pids, 2.0), "processes outlived the driver's Ctrl-C"


# -- bad input, refused before anything runs -----------------------------------------------

def test_unpicklable_argument_is_refused_before_anything_runs_naming_node_and_object(
        backend, tmp_path):
    marker = tmp_path / "ran"
    early = rhapsody.task(write_marker)(str(marker))
    bad = rhapsody.task(whoami)({"lock": threading.Lock()})
    with pytest.raises(TypeError) as info:
        rhapsody.compute(early, bad, backend=backend)
    message = str(info.value)
    assert bad.key in message and "_thread.lock" in message
    assert not marker.exists()


class LockWithBrokenRepr:
    """Cannot be pickled (it holds a lock), and its ``repr`` raises."""

    def __init__(self):
        self.lock = threading.Lock()

    def __repr__(self):
        raise RuntimeError("repr is broken")


def test_an_unpicklable_argument_whose_repr_raises_is_still_refused_naming_its_type(backend):
    bad = rhapsody.task(whoami)(LockWithBrokenRepr())
    with pytest.raises(TypeError, match=f"node {bad.key!r}: argument 0 <LockWithBrokenRepr "
                                        "instance at 0x[0-9a-f]+> cannot be pickled"):
        bad.compute(backend=backend)


def test_unpicklable_function_is_refused_before_anything_runs_naming_the_node(
        backend, tmp_path):
    marker = tmp_path / "ran"
    early = rhapsody.task(write_marker)(str(marker))
    bad = rhapsody.task(LockedCallable())(str(tmp_path / "bad"))
    with pytest.raises(TypeError, match="cannot be pickled") as info:
        rhapsody.compute(early, bad, backend=backend)
    assert bad.key in str(info.value)
    assert not marker.exists() and not (tmp_path / "bad").exists()


def test_node_for_another_backend_is_refused_before_anything_runs(backend, tmp_path):
    marker = tmp_path / "ran"
    early = rhapsody.task(write_marker)(str(marker))
    bad = rhapsody.task(backend="dask")(whoami)()
    with pytest.raises(ValueError, match="dask") as info:
        rhapsody.compute(early, bad, backend=backend)
    assert bad.key in str(info.value)
    assert not marker.exists()


class _Unloadable:
    """Pickles fine in the worker; rebuilding it in the driver fails."""

    def __reduce__(self):
        return (_refuse, ())


def _refuse():
    raise ImportError("no such module here")


def make_unloadable():
    return _Unloadable()


def test_a_value_the_driver_cannot_unpickle_fails_naming_the_node(backend):
    node = rhapsody.task(make_unloadable)()
    with pytest.raises(RuntimeError, match=f"node {node.key!r} finished, but its value cannot "
                                           "be unpickled in the driver: ImportError"):
        node.compute(backend=backend)


ONLY_HERE = """
class OnlyHere(ValueError):
    pass

def fail(message):
    raise OnlyHere(message)

def make(n):
    return OnlyHere(n)
"""


def worker_only_module(tmp_path) -> str:
    """A folder holding the module ``only_here``, which the driver never imports."""
    (tmp_path / "only_here.py").write_text(ONLY_HERE)
    return str(tmp_path)


def call_worker_only_module(folder, name, *args):
    sys.path.insert(0, folder)
    import only_here
    return getattr(only_here, name)(*args)


def test_an_exception_only_the_worker_can_unpickle_fails_its_node_alone_as_a_remote_error(
        backend, tmp_path):
    bad = rhapsody.task(call_worker_only_module)(worker_only_module(tmp_path), "fail", "bad input")
    with pytest.warns(RuntimeWarning, match="1 node\\(s\\) failed"):
        good, err = rhapsody.compute(rhapsody.task(add)(1, 2), bad, backend=backend,
                                     on_error="continue")
    assert good == 3  # the session went on: only the node that raised failed
    assert isinstance(err, rhapsody.RemoteError) and str(err) == "OnlyHere: bad input"
    assert err.remote_types[:2] == ("only_here.OnlyHere", "builtins.ValueError")
    notes = "\n".join(err.__notes__)
    assert "stands for the node's only_here.OnlyHere: it cannot be unpickled in the driver " \
           "(ModuleNotFoundError: No module named 'only_here')" in notes
    assert f"raised by node {bad.key!r}" in notes
    assert "raise OnlyHere(message)" in err.__cause__.tb  # the remote traceback


def test_a_rank_value_only_the_worker_can_unpickle_fails_naming_the_node_and_rank(
        backend, tmp_path):
    node = rhapsody.task(ranks=2)(call_worker_only_module)(worker_only_module(tmp_path), "make", 1)
    with pytest.raises(RuntimeError, match=f"node {node.key!r} finished, but the value of rank "
                                           "[01] of 2 cannot be unpickled in the driver: "
                                           "ModuleNotFoundError"):
        node.compute(backend=backend)


class TwoArgError(Exception):
    """Pickles, but cannot be rebuilt from its args: it comes back as a RemoteError."""

    def __init__(self, code, where):
        super().__init__(f"{code} at {where}")


def fail_two_args(path):
    count_attempt(path)
    raise TwoArgError(503, "server")


def test_retry_on_matches_the_type_a_remote_error_stands_for(backend, tmp_path):
    retried = rhapsody.task(retries=2, retry_on=TwoArgError)(fail_two_args)(str(tmp_path / "a"))
    with pytest.raises(rhapsody.RemoteError, match="TwoArgError: 503 at server"):
        retried.compute(backend=backend)
    assert len(lines(tmp_path / "a")) == 3
    not_retried = rhapsody.task(retries=2, retry_on=KeyError)(fail_two_args)(str(tmp_path / "b"))
    with pytest.raises(rhapsody.RemoteError):
        not_retried.compute(backend=backend)
    assert len(lines(tmp_path / "b")) == 1


def exit_with(code):
    sys.exit(code)


def test_a_node_calling_sys_exit_fails_as_a_remote_error_instead_of_ending_the_driver(backend):
    node = rhapsody.task(exit_with)("bad input")
    with pytest.raises(rhapsody.RemoteError, match="SystemExit: bad input") as info:
        node.compute(backend=backend)
    assert info.value.remote_types[0] == "builtins.SystemExit"
    assert "it would end or interrupt the driver" in "\n".join(info.value.__notes__)
    assert "sys.exit(code)" in info.value.__cause__.tb


class TupleNotesError(Exception):
    pass


def raise_with_tuple_notes():
    exc = TupleNotesError("odd notes")
    exc.__notes__ = ("a tuple",)  # add_note() refuses such an exception
    raise exc


class ExitOnRebuild(Exception):
    def __reduce__(self):
        return (sys.exit, (3,))


def raise_exit_on_rebuild(path):
    count_attempt(path)
    raise ExitOnRebuild("x")


def test_exceptions_that_refuse_notes_or_exit_when_rebuilt_fail_their_node_alone_once(
        backend, tmp_path):
    odd = rhapsody.task(raise_with_tuple_notes)()
    exits = rhapsody.task(raise_exit_on_rebuild)(str(tmp_path / "n"))
    with pytest.warns(RuntimeWarning):
        good, first, second = rhapsody.compute(rhapsody.task(add)(1, 2), odd, exits,
                                               backend=backend, on_error="continue")
    assert good == 3 and isinstance(first, TupleNotesError) and first.__notes__ == ("a tuple",)
    assert isinstance(second, rhapsody.RemoteError) and str(second) == "ExitOnRebuild: x"
    assert len(lines(tmp_path / "n")) == 1  # the worker reported it: not died, not run again


class UnprintableError(Exception):
    def __str__(self):
        raise RuntimeError("no str")


def raise_unprintable(path):
    count_attempt(path)
    raise UnprintableError()


def test_an_exception_whose_str_raises_comes_back_as_itself_and_runs_once(backend, tmp_path):
    node = rhapsody.task(raise_unprintable)(str(tmp_path / "n"))
    with pytest.raises(UnprintableError) as info:
        node.compute(backend=backend)
    assert "raise UnprintableError()" in info.value.__cause__.tb
    assert len(lines(tmp_path / "n")) == 1  # not taken for a dead worker and run again


def make_lock():
    return threading.Lock()


def test_a_value_the_worker_cannot_pickle_fails_naming_the_node_and_the_values_type(backend):
    node = rhapsody.task(make_lock)()
    with pytest.raises(TypeError, match="the value it returned, lock .*, cannot be pickled to "
                                        "go back to the driver") as info:
        node.compute(backend=backend)
    assert f"raised by node {node.key!r}" in "\n".join(info.value.__notes__)
    assert "cannot pickle '_thread.lock' object" in str(info.value.__cause__)  # the remote traceback


def make_unpicklable_with_broken_repr():
    return LockWithBrokenRepr()


def test_a_returned_value_whose_repr_raises_still_fails_naming_its_type(backend):
    node = rhapsody.task(make_unpicklable_with_broken_repr)()
    with pytest.raises(TypeError, match="the value it returned, LockWithBrokenRepr <LockWithBroken"
                                        "Repr instance at 0x[0-9a-f]+>, cannot be pickled"):
        node.compute(backend=backend)


def slow_then(path, seconds):
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(seconds)
    return seconds


def fail_now(started=None):
    """Fail, once the file ``started`` exists (its writer runs)."""
    deadline = time.monotonic() + 60
    while started is not None and not os.path.exists(started) and time.monotonic() < deadline:
        time.sleep(0.01)
    raise ValueError("failed at once")


def add(a, b):
    return a + b


def test_on_error_raise_raises_at_once_and_kills_the_running_siblings(backend, tmp_path):
    path = tmp_path / "pid"
    slow = rhapsody.task(slow_then)(str(path), 60)
    bad = rhapsody.task(fail_now)(str(path))
    start = time.monotonic()
    with pytest.raises(ValueError, match="failed at once"):
        rhapsody.compute(slow, rhapsody.task(add)(bad, 1), backend=backend, on_error="raise")
    assert time.monotonic() - start < 50  # a 60 s sibling would make it wait
    assert not still_alive([int(path.read_text())], 10), "the running sibling was not killed"
    assert backend.ledger.idle()


def test_on_error_continue_returns_what_succeeded_and_the_exceptions_in_place(backend):
    bad = rhapsody.task(fail_now)()
    with pytest.warns(RuntimeWarning, match=rf"1 node\(s\) failed.*\n  {bad.key}: ValueError"):
        good, failed, downstream = rhapsody.compute(rhapsody.task(add)(1, 2), bad,
                                                    rhapsody.task(add)(bad, 1),
                                                    backend=backend, on_error="continue")
    assert good == 3 and isinstance(failed, ValueError) and isinstance(downstream, ValueError)


def fail_at_length(n):
    raise ValueError("x" * n)


def test_the_on_error_continue_warning_cuts_each_failure_message_short(backend):
    with pytest.warns(RuntimeWarning) as warned:
        rhapsody.compute(*[rhapsody.task(fail_at_length)(10**6 + i) for i in range(3)],
                         backend=backend, on_error="continue")
    message = str(warned[0].message)
    assert len(message) < 2000 and "(1000001 characters)" in message


def test_a_bad_on_error_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="on_error must be one of 'raise', 'wait', 'continue'"):
        rhapsody.compute(rhapsody.task(add)(1, 2), on_error="ignore")


@pytest.mark.parametrize("kwargs, text", [
    ({"session": "s"}, "session= takes a Session, got 's'"),
    ({"journal": 3}, "journal= takes a directory's path, got 3"),
    ({"fail_fast": "no"}, "fail_fast must be True, False or None, got 'no'"),
    ({"progress": "yes"}, "progress must be True, False or None, got 'yes'"),
])
def test_bad_compute_arguments_are_refused_naming_the_argument(kwargs, text, tmp_path):
    marker = tmp_path / "ran"
    with pytest.raises(TypeError, match=re.escape(text)):
        rhapsody.compute(rhapsody.task(write_marker)(str(marker)), **kwargs)
    assert not marker.exists()


def test_a_task_given_to_compute_uncalled_is_refused_saying_to_call_it():
    with pytest.raises(TypeError, match=r"output 0 of compute\(\) is the task 'add' itself, "
                                        r"not a node: call it \(add\(...\)\)"):
        rhapsody.compute(rhapsody.task(add))


def test_map_over_something_not_iterable_is_refused_naming_map_and_the_value():
    with pytest.raises(TypeError, match=r"map\(add, ...\): argument 2 must be an iterable "
                                        "of items, got 5"):
        rhapsody.map(add, [1], 5)


def fail_with(path, kind):
    """Raise ``kind`` on the first two attempts; return the attempt count then."""
    n = count_attempt(path)
    if n <= 2:
        raise {"value": ValueError, "key": KeyError}[kind](f"attempt {n}")
    return n


def test_retry_on_retries_only_the_named_exceptions(backend, tmp_path):
    retried = rhapsody.task(retries=3, retry_on=ValueError)(fail_with)(str(tmp_path / "a"), "value")
    assert retried.compute(backend=backend) == 3
    not_retried = rhapsody.task(retries=3, retry_on=(ValueError,))(fail_with)(
        str(tmp_path / "b"), "key")
    with pytest.raises(KeyError, match="attempt 1"):
        not_retried.compute(backend=backend)
    assert len(lines(tmp_path / "b")) == 1


def dies_then_raises(path):
    if count_attempt(path) == 1:
        os._exit(9)
    raise ValueError("second attempt")


def test_a_node_that_failed_several_times_says_why_each_attempt_failed(backend, tmp_path):
    # the note said only "failed 2 times (retries=0)": why a retries=0 node ran twice
    # (its first process died) was lost
    node = rhapsody.task(dies_then_raises)(str(tmp_path / "attempts"))
    with pytest.raises(ValueError, match="second attempt") as info:
        node.compute(backend=backend)
    note = [n for n in info.value.__notes__ if "failed 2 times" in n]
    assert note and "(retries=0; attempt 1: its process died or was killed: WorkerDiedError: " \
        in note[0] and note[0].endswith("attempt 2: ValueError: second attempt)"), note


def test_the_note_of_a_node_retried_many_times_names_the_first_attempts_and_the_last(backend):
    node = rhapsody.task(retries=9)(int)("not a number")  # fails every time
    with pytest.raises(ValueError) as info:
        node.compute(backend=backend)
    note = [n for n in info.value.__notes__ if "failed 10 times" in n][0]
    assert "attempt 5: " in note and "attempt 6: " not in note
    assert "attempts 6-9 left out; attempt 10: ValueError" in note
    with pytest.raises(ValueError) as info:
        rhapsody.task(retries=6)(int)("not a number").compute(backend=backend)
    assert "; attempt 6 left out; attempt 7: ValueError" in "".join(info.value.__notes__)


def test_backoff_waits_before_each_retry_without_holding_the_scheduler(backend, tmp_path):
    node = rhapsody.task(retries=2, backoff=0.5)(fail_with)(str(tmp_path / "c"), "value")
    other = rhapsody.task(add)(1, 2)
    start = time.monotonic()
    with rhapsody.Session(backends=[rhapsody.LocalBackend(cpus=1)]) as s:
        slow, fast = s.submit(node, other)
        assert fast.result(timeout=30) == 3 and not slow.done()  # others run meanwhile
        assert slow.result(timeout=30) == 3
    assert time.monotonic() - start >= 0.5 + 1.0  # 0.5 s, then 1 s


def test_a_killed_program_is_retried_as_an_infrastructure_failure(backend, tmp_path):
    count = tmp_path / "count"
    program = rhapsody.executable(
        ["sh", "-c", f'echo x >> {count}; [ $(wc -l < {count}) -ge 2 ] || kill -9 $$; echo ok'])
    assert program.compute(backend=backend).stdout == "ok\n"
    own_error = rhapsody.executable(["sh", "-c", f"echo x >> {tmp_path / 'own'}; exit 3"])
    with pytest.raises(rhapsody.ExecutableError):
        own_error.compute(backend=backend)
    assert len(lines(tmp_path / "own")) == 1  # its own error: not retried without retries=


def test_bad_retry_options_are_refused_where_written():
    with pytest.raises(TypeError, match="'retry_on' must be an exception class"):
        rhapsody.task(retry_on="ValueError")(add)
    with pytest.raises(ValueError, match="'backoff' must be a finite number of seconds >= 0"):
        rhapsody.task(backoff=-1)(add)


# -- chains run where their values are (forwarded) ---------------------------------------

def hop(upstream, log=None):
    """One hop of a chain: ``(hops so far, pids that ran them)``; logs its count."""
    count, pids = upstream
    if log:
        with open(log, "a") as f:
            f.write(f"{count + 1}\n")
    return count + 1, pids + [os.getpid()]


def hop_flaky(upstream, path):
    count_attempt(path)
    if len(lines(path)) == 1:
        raise ValueError("the first attempt of this hop fails")
    return hop(upstream)


def hop_broken(upstream):
    raise KeyError(f"hop {upstream[0] + 1} is broken")


def test_a_chain_runs_hop_after_hop_on_one_worker_with_the_values_it_made(backend):
    x = (0, [])
    for _ in range(300):
        x = rhapsody.task(hop)(x)
    count, pids = x.compute(backend=backend)
    assert count == 300 and len(set(pids)) == 1  # forwarded: no hop moved to another worker
    assert backend.ledger.idle()


def test_a_failure_inside_a_forwarded_chain_fails_what_follows_and_runs_none_of_it(
        backend, tmp_path):
    log = str(tmp_path / "log")
    x = (0, [])
    for i in range(60):
        x = rhapsody.task(hop_broken)(x) if i == 30 else rhapsody.task(hop)(x, log=log)
    with pytest.raises(KeyError, match="hop 31 is broken"):
        x.compute(backend=backend)
    assert lines(log) == [str(i) for i in range(1, 31)]  # nothing after the failure ran
    assert backend.ledger.idle()


def test_a_retried_hop_inside_a_forwarded_chain_lets_the_chain_finish(backend, tmp_path):
    log, attempts = str(tmp_path / "log"), str(tmp_path / "attempts")
    x = (0, [])
    for i in range(60):
        x = (rhapsody.task(hop_flaky, retries=1)(x, attempts) if i == 30
             else rhapsody.task(hop)(x, log=log))
    count, _ = x.compute(backend=backend)
    assert count == 60 and len(lines(attempts)) == 2
    # every other hop ran exactly once, in order, although the ones after the flaky
    # hop were queued behind it on its worker when it failed
    assert lines(log) == [str(i) for i in range(1, 61) if i != 31]
    assert backend.ledger.idle()


def inputs_named(backend) -> list:
    """A list that gets, for each call ``backend`` is sent from now on, how many of its
    inputs it names (forwarded) instead of carrying; the real ``submit`` then runs."""
    named = []
    submit = backend.submit

    def noting(call):
        named.append(sum(type(i) is int for i in call.inputs))
        submit(call)
    backend.submit = noting
    return named


def inc(x):
    return x + 1


def plus(a, b):
    return a + b


def test_a_node_whose_inputs_are_all_queued_on_one_worker_runs_there_with_their_values():
    # y = inc(x); x = plus(x, y), 200 times: each plus is sent behind both its inputs,
    # naming them; the worker fills them with the values it made (and keeps a value
    # two queued calls name for both), with no round trip through the driver per step
    backend = rhapsody.LocalBackend(cpus=2)
    named = inputs_named(backend)
    x, expected = rhapsody.task(inc)(0), 1
    for _ in range(200):
        x = rhapsody.task(plus)(x, rhapsody.task(inc)(x))
        expected = 2 * expected + 1
    with rhapsody.Session(backends=[backend]) as s:
        assert s.compute(x) == (expected,)
        assert len(named) == 401  # one call per node: no forwarded call came back unrun
        assert named.count(2) >= 50  # joins forwarded behind both of their inputs
        assert backend.ledger.idle()


def test_a_reduction_runs_its_pairs_where_their_leaves_ran(monkeypatch, tmp_path):
    # a shared lease, once chosen, takes a run of neighbours in priority order
    # (post-order: two leaves, then their join), so a pair's leaves share a worker and
    # their join is queued behind them there, naming both. Looked at in one dispatch
    # pass (no completion interleaves with it), with both workers' leases open and
    # held by a running call, and run times known (the warm-up; a lease budget that
    # lets each lease take MAX_DEPTH calls whatever the load): each lease takes a run
    # of 63. Picking the least loaded lease per record (before ecc7021) alternated
    # between the two, and sent no join in that pass
    from rhapsody_graph import scheduler
    monkeypatch.setattr(scheduler, "IDLE_GRACE", 3600.0)  # the run times stay known
    backend = rhapsody.LocalBackend(cpus=2)
    backend.lease_budget = 60.0
    fifos = [str(tmp_path / name) for name in ("started1", "release1", "started2", "release2")]
    for path in fifos:
        os.mkfifo(path)
    passes, passed = [], threading.Event()
    dispatch = scheduler.Scheduler._dispatch

    def noting_passes(self):  # the real pass, after noting which calls it sent
        before = len(named)
        dispatch(self)
        if len(named) > before:
            passes.append(named[before:])
            passed.set()
    level = [rhapsody.task(inc)(i) for i in range(256)]
    while len(level) > 1:
        level = [rhapsody.task(plus)(level[k], level[k + 1]) for k in range(0, len(level), 2)]
    with rhapsody.Session(backends=[backend], fuse=False) as s:
        warm_up = [rhapsody.task(inc)(-i) for i in range(8)]
        assert s.submit(rhapsody.task(plus)(warm_up[0], warm_up[1])).result() == 1
        assert [f.result() for f in s.submit(warm_up)] == [1, 0, -1, -2, -3, -4, -5, -6]
        holds = s.submit([rhapsody.task(hold_on_fifos)(*fifos[:2]),
                          rhapsody.task(hold_on_fifos)(*fifos[2:])])
        for started in fifos[::2]:  # one on each worker
            with open(started) as f:
                assert f.read() == "started"
        named = inputs_named(backend)
        monkeypatch.setattr(scheduler.Scheduler, "_dispatch", noting_passes)
        top = s.submit(level[0])
        assert passed.wait(timeout=300)
        for release in fifos[1::2]:
            with open(release, "w") as f:
                f.write("go")
        assert [h.result() for h in holds] == ["go", "go"]
        assert top.result() == sum(range(1, 257))
    assert len(named) == 511  # one call per node
    first = passes[0]
    assert len(first) == 2 * (scheduler.MAX_DEPTH - 1)
    # every join whose inputs are both in one lease's run, which is all but a few
    assert first.count(2) >= 58, f"{first.count(2)} joins named both inputs in {first}"
    assert backend.ledger.idle()


def test_a_join_over_thousands_of_inputs_costs_the_forwarding_check_nothing(monkeypatch):
    # whether a join may be forwarded behind its inputs was asked as each input
    # started, over every input started so far: quadratic in the inputs (a 10,000-input
    # join took 164 us per input instead of 23). Now a join waiting on more calls than
    # the lease holds is not looked at
    from rhapsody_graph import scheduler
    looked = [0]
    queued_together = scheduler.Scheduler._queued_together

    def counting(self, j, lease):  # the real check, after counting the inputs it may read
        looked[0] += len(j.deps)
        return queued_together(self, j, lease)
    monkeypatch.setattr(scheduler.Scheduler, "_queued_together", counting)
    n = 3000
    leaves = [rhapsody.task(inc)(i) for i in range(n)]
    joined = rhapsody.task(lambda *xs: sum(xs))(*leaves)
    with rhapsody.Session(backends=[rhapsody.LocalBackend(cpus=2)]) as s:
        assert s.compute(joined) == (sum(range(1, n + 1)),)
    assert looked[0] < 20 * n, f"{looked[0]} inputs read for a join of {n}"


def inc_logged(x, log):
    with open(log, "a") as f:
        f.write(f"{x}\n")
    return x + 1


def inc_flaky(x, path):
    if count_attempt(path) == 1:
        raise ValueError("the first attempt of this step fails")
    return x + 1


def inc_broken(x):
    raise KeyError(f"the step after {x} is broken")


@pytest.mark.parametrize("retries", [0, 1])
def test_a_failing_input_of_joins_queued_behind_it_fails_them_or_lets_them_finish_on_retry(
        backend, tmp_path, retries):
    log, attempts = str(tmp_path / "log"), str(tmp_path / "attempts")
    x, expected = rhapsody.task(inc)(0), 1
    for i in range(60):
        y = (rhapsody.task(inc_flaky if retries else inc_broken, retries=retries)(
                 x, *([attempts] if retries else [])) if i == 30
             else rhapsody.task(inc_logged)(x, log))
        x = rhapsody.task(plus)(x, y)
        expected = 2 * expected + 1
    if retries:
        assert x.compute(backend=backend) == expected and len(lines(attempts)) == 2
        assert len(lines(log)) == 59  # every other step ran once
    else:
        with pytest.raises(KeyError, match="is broken"):
            x.compute(backend=backend)
        assert len(lines(log)) == 30  # nothing after the failure ran
    assert backend.ledger.idle()


def hold_until(started, release):
    with open(started, "w") as f:
        f.write(str(os.getpid()))
    deadline = time.monotonic() + 60
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.01)
    return "released"


def test_a_chain_submitted_future_by_future_queues_the_next_hop_behind_the_running_one(tmp_path):
    go, release = tmp_path / "go", tmp_path / "release"
    with rhapsody.Session(backends=[rhapsody.LocalBackend(cpus=2)]) as s:
        first = s.submit(rhapsody.task(hold_until)(str(go), str(release)))
        wait_for_files([str(go)], 30)
        futures = [s.submit(rhapsody.task(hop)((0, [first])))]
        for _ in range(2):
            futures.append(s.submit(rhapsody.task(hop)(futures[-1])))
        deadline = time.monotonic() + 30
        while not futures[0].running() and time.monotonic() < deadline:
            time.sleep(0.01)
        # started while the first still holds its worker: queued there behind it (the
        # lease holds the next hop; the ones after it follow as hops end)
        assert futures[0].running() and not first.done()
        release.touch()
        count, pids = futures[-1].result(timeout=60)
        assert count == 3 and set(pids[1:]) == {int(go.read_text())}  # its worker ran them
        s.wait()
        assert s.backends["local"].ledger.idle()


def test_cancelling_a_hop_forwarded_behind_a_running_one_cancels_the_rest_of_the_chain(
        tmp_path):
    backend = rhapsody.LocalBackend(cpus=1)
    go = tmp_path / "go"
    with rhapsody.Session(backends=[backend]) as s:
        first = rhapsody.task(hold_until)(str(go), str(tmp_path / "release"))
        chain = [rhapsody.task(hop)((0, [first]))]
        for _ in range(5):
            chain.append(rhapsody.task(hop)(chain[-1]))
        futures = s.submit(first, *chain)
        wait_for_files([str(go)], 30)  # the first runs; the next is queued behind it
        assert futures[1].cancel()
        assert all(f.cancelled() for f in futures[1:])
        (tmp_path / "release").touch()
        assert futures[0].result(timeout=60) == "released"
        s.wait()
        assert backend.ledger.idle()


# -- retries go to another host ----------------------------------------------------------

def die_first_on_its_host(path):
    """Log the host of this attempt; the first attempt's process dies."""
    host = os.environ["RHAPSODY_HOST"]
    with open(path, "a") as f:
        f.write(host + "\n")
    if len(lines(path)) == 1:
        os._exit(3)
    return host


@pytest.mark.parametrize("kind", ["function", "executable"])
def test_a_node_whose_process_died_is_retried_on_another_host(tmp_path, kind):
    log = str(tmp_path / "hosts")
    backend = rhapsody.LocalBackend(hosts=[rhapsody.Host("n0", 1), rhapsody.Host("n1", 1)])
    if kind == "function":
        node = rhapsody.task(die_first_on_its_host)(log)
    else:  # a program killed by a signal is an infrastructure failure too
        script = ("import os, signal\nh = os.environ['RHAPSODY_HOST']\n"
                  f"open({log!r}, 'a').write(h + '\\n')\n"
                  f"if len(open({log!r}).read().split()) == 1: os.kill(os.getpid(), 9)\n")
        node = rhapsody.executable([sys.executable, "-c", script])
    node.compute(backend=backend)
    first, second = lines(log)
    assert first != second  # the host where it died is avoided while another can take it
    assert backend.ledger.idle()


def test_a_multi_rank_job_whose_rank_died_is_retried_on_other_hosts(tmp_path):
    marker = str(tmp_path / "killed")
    backend = rhapsody.LocalBackend(hosts=[rhapsody.Host(f"n{i}", 2) for i in range(4)])
    script = ("import os\ntry:\n"
              f"    os.close(os.open({marker!r}, os.O_CREAT | os.O_EXCL))\n"
              "    os.kill(os.getpid(), 9)  # the first rank to get here, once\n"
              "except FileExistsError:\n    print(os.environ['RHAPSODY_HOST'])\n")
    job = rhapsody.executable([sys.executable, "-c", script], ranks=4, cpus=1)
    with rhapsody.Session(backends=[backend]) as s:
        fut = s.submit(job)
        ran = fut.result(timeout=120)
        s.wait()
    # the first attempt had the block n0, n0, n1, n1; the retry avoids both hosts
    assert [r.stdout.strip() for r in ran] == ["n2", "n2", "n3", "n3"]
    assert fut.where.attempts == 2 and [p.host for p in fut.where.placements] == \
        ["n2", "n2", "n3", "n3"]
    assert backend.ledger.idle()


def test_a_retry_stays_on_the_only_host_that_can_take_it(tmp_path):
    log = str(tmp_path / "hosts")
    backend = rhapsody.LocalBackend(hosts=[rhapsody.Host("n0", 1), rhapsody.Host("n1", 2)])
    node = rhapsody.task(die_first_on_its_host, cpus=2)(log)  # only n1 has 2 cores
    assert node.compute(backend=backend) == "n1"
    assert lines(log) == ["n1", "n1"]


def test_a_shape_that_cannot_be_placed_does_not_hold_back_ready_nodes_of_other_shapes():
    """100 GPU nodes queue for the one GPU; a one-core node submitted after them starts
    at once on the free core (the old dispatch looked at 32 blocked nodes, then stopped),
    and the GPU nodes still run in submission order."""
    from rhapsody_graph.backends.simulated import SimulatedBackend
    sim = SimulatedBackend(hosts=1, cpus=2, gpus=1, duration=lambda node: node.args[0])
    on_gpu = rhapsody.task(cpus=1, gpus=1)(abs)
    on_core = rhapsody.task(cpus=1)(abs)
    gpu_nodes = [on_gpu(10) for _ in range(100)]
    core_node = on_core(1)
    with rhapsody.Session(backends=[sim], progress=False) as s:
        s.compute(gpu_nodes + [core_node])
    start = {r.key: r.start for r in sim.records}
    assert start[core_node.key] == 0.0
    assert [start[n.key] for n in gpu_nodes] == [10.0 * i for i in range(100)]
    assert sim.double_bookings() == [] and sim.ledger.idle()


def test_waiting_executables_cost_the_dispatcher_a_look_per_request_not_per_node(
        monkeypatch):
    """3,000 executables of one request wait for 4 cores: a dispatch pass looks at the
    request once, so the scheduler's heap operations grow with the nodes, not with
    nodes x passes (it used to pop and push back every waiting node in every pass)."""
    import heapq
    import types
    from rhapsody_graph import scheduler
    from rhapsody_graph.backends.simulated import SimulatedBackend
    ops = [0]

    def counted(fn):
        def wrapper(*args):
            ops[0] += 1
            return fn(*args)
        return wrapper

    shim = types.SimpleNamespace(**{k: v for k, v in vars(heapq).items()
                                    if not k.startswith("__")})
    shim.heappush, shim.heappop = counted(heapq.heappush), counted(heapq.heappop)
    monkeypatch.setattr(scheduler, "heapq", shim)
    sim = SimulatedBackend(hosts=1, cpus=4, gpus=0, duration=1.0)
    n = 3000
    nodes = [rhapsody.executable(["never-run", str(i)], cpus=1) for i in range(n)]
    with rhapsody.Session(backends=[sim], progress=False) as s:
        s.compute(nodes)
    assert len(sim.records) == n and sim.double_bookings() == [] and sim.ledger.idle()
    assert sim.clock == n / 4
    assert ops[0] < 20 * n, f"{ops[0]} heap operations for {n} nodes"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_graphs_of_many_shapes_all_run_in_dependency_order_without_double_booking(
        seed):
    """Pool nodes, executables and multi-rank jobs of random requests and run times,
    with random inputs, on a small simulated inventory: every node runs once, after
    its inputs ended, nothing is double-booked and the ledger is idle after (shapes
    that wait, give way to better ones and come back lose nothing)."""
    import random
    from rhapsody_graph.backends.simulated import SimulatedBackend
    rng = random.Random(seed)
    seconds_of = {}
    sim = SimulatedBackend(hosts=2, cpus=4, gpus=2, duration=lambda node: seconds_of[node.key])
    kinds = [rhapsody.task(cpus=c, gpus=g)(max) for c in (1, 2, 4) for g in (0, 1, 2)]
    kinds.append(rhapsody.task(cpus=1, ranks=3)(max))  # never run: takes (i, inputs)
    nodes = []
    for i in range(300):
        inputs = rng.sample(nodes, k=min(len(nodes), rng.randrange(3)))
        seconds = rng.randrange(1, 20)
        if rng.random() < 0.2:
            nodes.append(rhapsody.executable(["never-run", str(i), *inputs],
                                             cpus=rng.choice((1, 3))))
        else:
            nodes.append(rng.choice(kinds)(i, inputs))
        seconds_of[nodes[-1].key] = seconds
    with rhapsody.Session(backends=[sim], progress=False) as s:
        s.compute(nodes)
    span = {r.key: (r.start, r.end) for r in sim.records}
    assert len(sim.records) == len(span) == len(nodes)
    for n in nodes:
        assert all(span[d.key][1] <= span[n.key][0] for d in n.deps), n.key
    assert sim.double_bookings() == [] and sim.ledger.idle()


def test_a_journal_that_cannot_be_written_warns_once_and_the_run_goes_on(tmp_path):
    """A full or read-only file system under the journal used to leave the node's future
    unfinished for ever (its save raised on the scheduler thread after it was DONE)."""
    journal = tmp_path / "journal"
    journal.mkdir()
    for i in range(256):  # every entry directory's name is taken: each save fails
        (journal / f"{i:02x}").write_text("")
    inc = rhapsody.task(lambda x: x + 1)
    with rhapsody.Session(backends=[rhapsody.LocalBackend(cpus=1)], journal=journal,
                          progress=False) as s:
        with pytest.warns(RuntimeWarning, match="journal .* cannot be written") as caught:
            assert s.submit(inc(1)).result(timeout=60) == 2
            assert s.compute(inc(inc(5))) == (7,)
    assert len([w for w in caught if "journal" in str(w.message)]) == 1


def test_a_run_log_that_cannot_be_written_warns_and_the_nodes_keep_their_values():
    """/dev/full fails every write: the nodes used to fail with its OSError, and the
    session's exit raised it again."""
    inc = rhapsody.task(lambda x: x + 1)
    with pytest.warns(RuntimeWarning, match="run log /dev/full cannot be written"):
        with rhapsody.Session(backends=[rhapsody.LocalBackend(cpus=1)], run_log="/dev/full",
                              progress=False) as s:
            assert s.submit(inc(1)).result(timeout=60) == 2
            assert s.compute(inc(2), on_error="raise") == (3,)
