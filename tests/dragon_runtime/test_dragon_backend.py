"""The Dragon backend on the real Dragon runtime: each test one small scenario.

Run by tests/backends/test_dragon.py as ``dragon python -m pytest tests/dragon_runtime``.
"""
import os
import signal
import time

import pytest
from dragon.native.machine import Node, System

import rhapsody_graph as rhapsody

pytestmark = pytest.mark.timeout(120)


@rhapsody.task
def inc(x):
    return x + 1


@rhapsody.task
def total(xs):
    return sum(xs)


def seen():
    """What a node sees of its placement, from inside its process."""
    return {"pid": os.getpid(), "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "affinity": sorted(os.sched_getaffinity(0)), "rank": os.environ.get("RANK"),
            "placement": rhapsody.current_placement()}


def test_inventory_is_the_dragon_allocation_with_declared_gpus(dragon_backend):
    names = [Node(h).hostname for h in System().nodes]
    hosts = dragon_backend.inventory.hosts
    assert [h.name for h in hosts] == names
    assert all(h.gpus == (0, 1, 2, 3) for h in hosts)
    assert list(hosts[0].cpus) == list(Node(System().nodes[0]).cpus)
    table = dragon_backend.describe()
    assert names[0] in table and "[0, 1, 2, 3]" in table


def test_unplaced_function_node_returns_its_value(dragon_backend):
    assert rhapsody.compute(inc(41), backend=dragon_backend) == (42,)


def test_placed_node_gets_the_ledgers_cores_and_gpus_in_policy_and_environment(dragon_backend):
    where = rhapsody.task(seen).options(cpus=1, gpus=1)
    nodes = [where() for _ in range(3)]
    views = rhapsody.compute(nodes, backend=dragon_backend)[0]
    gpus = [g for v in views for g in v["placement"].gpus]
    assert len(set(gpus)) == 3  # round-robin: a GPU each
    for node, v in zip(nodes, views):
        p = v["placement"]
        assert v["cuda"] == ",".join(map(str, p.gpus))
        assert v["affinity"] == list(p.cpus)  # Dragon pinned the process to the ledger's core
        policy = dragon_backend.policy(node, p)
        assert (policy.host_name, policy.cpu_affinity, policy.gpu_affinity) == \
            (p.host, list(p.cpus), list(p.gpus))


def test_two_rank_job_returns_every_ranks_value(dragon_backend):
    job = rhapsody.task(seen).options(ranks=2, cpus=1)
    ranks = rhapsody.compute(job(), backend=dragon_backend)[0]
    assert [r["rank"] for r in ranks] == ["0", "1"]
    assert len({r["pid"] for r in ranks}) == 2
    assert ranks[0]["affinity"] != ranks[1]["affinity"]  # one core each
    echo = rhapsody.executable(["sh", "-c", "echo $RANK/$WORLD_SIZE"], ranks=2)
    outs = rhapsody.compute(echo, backend=dragon_backend)[0]
    assert [o.stdout for o in outs] == ["0/2\n", "1/2\n"] and [o.rank for o in outs] == [0, 1]


def test_executable_output_and_failing_exit_code(dragon_backend):
    ok = rhapsody.executable(["sh", "-c", "echo out $CUDA_VISIBLE_DEVICES; echo err >&2"], gpus=1)
    res = rhapsody.compute(ok, backend=dragon_backend)[0]
    assert res.returncode == 0 and res.stderr == "err\n"
    assert res.stdout == f"out {res.gpus[0]}\n"
    bad = rhapsody.executable(["sh", "-c", "echo oops >&2; exit 3"])
    with pytest.raises(rhapsody.ExecutableError) as info:
        rhapsody.compute(bad, backend=dragon_backend)
    assert info.value.returncode == 3 and "oops" in str(info.value)


def test_exception_comes_back_with_its_remote_traceback(dragon_backend):
    @rhapsody.task
    def boom(x):
        raise KeyError(f"missing {x}")

    with pytest.raises(KeyError, match="missing 7") as info:
        rhapsody.compute(total([boom(7)]), backend=dragon_backend)
    assert isinstance(info.value.__cause__, rhapsody.RemoteTraceback)
    assert "in boom" in info.value.__cause__.tb
    assert any("did not run" in n for n in info.value.__notes__)


def test_dependency_chain_and_join_are_resolved_by_the_scheduler(dragon_backend):
    x = 0
    for _ in range(10):
        x = inc(x)
    placed = rhapsody.task(inc.func).options(cpus=1)
    out = total([x, placed(x), *[inc(i) for i in range(20)]])
    assert rhapsody.compute(out, backend=dragon_backend) == (10 + 11 + 210,)


def test_timeout_kills_the_process_and_the_backend_goes_on(dragon_backend, tmp_path):
    pidfile = tmp_path / "pid"

    @rhapsody.task(timeout=8)  # from submission: a Batch process takes 1-5 s to start here
    def hang(path):
        with open(path, "w") as f:
            f.write(str(os.getpid()))
        time.sleep(120)

    start = time.monotonic()
    with pytest.raises(rhapsody.NodeTimeoutError, match="timeout of 8 s"):
        rhapsody.compute(hang(str(pidfile)), backend=dragon_backend)
    assert time.monotonic() - start < 60
    pid = int(pidfile.read_text())
    for _ in range(50):  # killed by the driver: gone within moments
        if not os.path.exists(f"/proc/{pid}") or _zombie(pid):
            break
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{pid}") or _zombie(pid)
    for _ in range(20):  # each run's end forgets the killed calls Batch has seen end
        assert rhapsody.compute(inc(1), backend=dragon_backend) == (2,)
        if not dragon_backend._stopped:
            break
        time.sleep(0.5)
    assert not dragon_backend._stopped, "the killed call is still kept after it ended"


def test_a_timed_out_executable_takes_what_its_program_started_along(dragon_backend, tmp_path):
    """Only the worker was killed: `cmd &` of the program lived until the driver exited."""
    pidfile = tmp_path / "pid"
    program = rhapsody.executable(["sh", "-c", f"sleep 300 & echo $! > {pidfile}; sleep 300"],
                                  timeout=10)
    with pytest.raises(rhapsody.NodeTimeoutError, match="timeout of 10 s"):
        rhapsody.compute(program, backend=dragon_backend)
    pid = int(pidfile.read_text())
    for _ in range(50):
        if _zombie(pid):
            break
        time.sleep(0.1)
    assert _zombie(pid), f"the program's child {pid} outlived its node"


def test_cancel_of_a_running_placed_node_returns_once_its_process_is_gone(dragon_backend,
                                                                          tmp_path):
    """As api.md says of cancel(): it returned at once, the process gone ~0.4 s later."""
    pidfile = tmp_path / "pid"

    @rhapsody.task(cpus=1)
    def hang(path):
        with open(path, "w") as f:
            f.write(str(os.getpid()))
        time.sleep(300)

    fut = rhapsody.api.get_session(dragon_backend).submit(hang(str(pidfile)))
    deadline = time.monotonic() + 120
    while not pidfile.exists() or not pidfile.read_text():
        assert time.monotonic() < deadline, "the node never started"
        time.sleep(0.1)
    assert fut.cancel()
    assert _zombie(int(pidfile.read_text()))



def test_a_cancelled_unplaced_node_runs_none_of_the_calls_queued_behind_it(dragon_backend,
                                                                           tmp_path):
    """Its Batch pool worker cannot be killed, so the call runs to its end; the worker
    then ran the calls queued behind it: its cancelled dependent, and calls the driver
    had sent elsewhere (run twice)."""
    started, ended, after = tmp_path / "started", tmp_path / "ended", tmp_path / "after"

    @rhapsody.task
    def slow(start, end):
        open(start, "w").close()
        time.sleep(3)
        open(end, "w").close()
        return 1

    @rhapsody.task
    def dependent(x, path):
        open(path, "w").close()
        return x

    session = rhapsody.api.get_session(dragon_backend)
    up = session.submit(slow(str(started), str(ended)))
    down = session.submit(dependent(up, str(after)))
    deadline = time.monotonic() + 60
    while not started.exists():
        assert time.monotonic() < deadline, "the node never started"
        time.sleep(0.05)
    assert up.cancel() and down.cancelled()
    while not ended.exists():  # the abandoned call runs to its end
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(2)  # a call queued behind it would have run by now
    assert not after.exists(), "the cancelled dependent ran"

def test_a_sigint_to_a_rank_is_no_keyboard_interrupt_of_its_node(dragon_backend):
    """Dragon's ProcessGroup stop sends SIGINT to a killed job's ranks: a rank that got it
    first raised KeyboardInterrupt as the node's error, not NodeTimeoutError (1 run in 4)."""
    @rhapsody.task(ranks=2, cpus=1)
    def poked():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)
        return "went on"

    assert rhapsody.compute(poked(), backend=dragon_backend) == (["went on", "went on"],)


def test_map_gpus_all_spreads_one_node_per_gpu(dragon_backend):
    def gpu(i):
        return os.environ["CUDA_VISIBLE_DEVICES"]

    got = rhapsody.compute(rhapsody.map(gpu, range(4), gpus="all"), backend=dragon_backend)[0]
    assert sorted(got) == ["0", "1", "2", "3"]


def test_a_dying_process_fails_its_node_with_worker_died(dragon_backend):
    @rhapsody.task(cpus=1)
    def die():
        os._exit(9)

    with pytest.raises(rhapsody.WorkerDiedError, match="died"):
        rhapsody.compute(die(), backend=dragon_backend)
    assert rhapsody.compute(inc(2), backend=dragon_backend) == (3,)


def _zombie(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True

