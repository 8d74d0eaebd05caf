"""DaskBackend on a real distributed.LocalCluster (2 worker processes, 1 thread each,
2 declared GPUs each): placement and GPU masks seen inside the task, executables,
failures with their tracebacks, edges across a Dask and a local backend, routing of
the kinds Dask does not run, many tiny calls under leases, a killed Dask worker,
cancelling and timing out running calls (their processes are gone after), workers
that join and leave, and errors before anything runs."""
import asyncio
import os
import signal
import threading
import time

import pytest

import rhapsody_graph as rhapsody

from ..conftest import wait_until
from ..test_scheduler import make_lock, still_alive

distributed = pytest.importorskip("distributed")

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  resources={"GPU": 2}, dashboard_address=None) as c:
        yield c


@pytest.fixture(scope="module")
def session(cluster):
    dask = rhapsody.DaskBackend(cluster=cluster, name="dask")
    with rhapsody.Session(backends=[dask, rhapsody.LocalBackend(cpus=2, name="cpu")]) as s:
        yield s


def where_am_i(_=None):
    p = rhapsody.current_placement()
    return p.host, os.environ["CUDA_VISIBLE_DEVICES"], os.getpid()


def double(x):
    return 2 * x


def boom(x):
    raise KeyError(f"no {x}")


both_running = threading.Barrier(2)  # on a worker: two calls of one process meet here


def my_placement_while_another_runs(_):
    both_running.wait(timeout=60)
    p = rhapsody.current_placement()
    return p.host, p.cpus, p.gpus


async def double_later(x):
    await asyncio.sleep(0)
    return 2 * x


def test_inventory_is_the_clusters_workers_with_their_threads_and_gpus(session, cluster):
    dask = session.backends["dask"]
    workers = dask.client.scheduler_info(n_workers=-1)["workers"]
    assert sorted(h.name for h in dask.inventory.hosts) == sorted(workers)
    assert all(len(h.cpus) == 1 and h.gpus == (0, 1) for h in dask.inventory.hosts)


def test_a_gpu_node_runs_on_the_worker_and_gpu_the_ledger_chose(session):
    futures = [session.submit(rhapsody.task(gpus=1, backend="dask")(where_am_i)(i))
               for i in range(4)]
    for fut in futures:
        host, mask, pid = fut.result(timeout=60)
        assert fut.where.backend == "dask" and host == fut.where.host
        assert mask == str(fut.where.gpus[0]) and pid != os.getpid()
    assert {f.result()[0] for f in futures} == {h.name for h in session.backends["dask"].inventory.hosts}


def test_executables_values_failures_and_edges_across_backends(session):
    on_dask = rhapsody.task(backend="dask")(double)(21)
    on_cpu = rhapsody.task(backend="cpu")(double)(on_dask)
    program = rhapsody.executable(["echo", on_cpu], backend="dask")
    result, value = session.compute(program, on_cpu)
    assert result.stdout == "84\n" and value == 84
    with pytest.raises(KeyError, match="no thing") as info:
        session.compute(rhapsody.task(backend="dask")(boom)("thing"))
    assert isinstance(info.value.__cause__, rhapsody.RemoteTraceback)
    assert "in boom" in info.value.__cause__.tb


def test_an_async_def_task_is_awaited_on_the_dask_worker(session):
    assert session.compute(rhapsody.task(backend="dask")(double_later)(21)) == (42,)


def test_a_value_the_dask_worker_cannot_pickle_fails_naming_the_node_and_the_values_type(
        session):
    node = rhapsody.task(backend="dask")(make_lock)()
    with pytest.raises(TypeError, match="the value it returned, lock .*, cannot be pickled to "
                                        "go back to the driver") as info:
        session.compute(node)
    assert f"raised by node {node.key!r}" in "\n".join(info.value.__notes__)


def test_a_multi_rank_node_goes_to_a_backend_that_runs_ranks(session):
    ranks = session.submit(rhapsody.task(ranks=2, cpus=1)(double)(1))
    assert ranks.result(timeout=60) == [2, 2] and ranks.where.backend == "cpu"
    with pytest.raises(rhapsody.NoBackendError, match="does not run ranks nodes"):
        session.submit(rhapsody.task(ranks=2, backend="dask")(double)(1))


def die(path):
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    if len(open(path).read().split()) == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return "survived"


def die_reading(path, value):
    return die(path), len(value)


def test_a_killed_dask_worker_fails_over_as_an_infrastructure_failure(session, tmp_path):
    path = tmp_path / "attempts"
    node = rhapsody.task(backend="dask")(die)(str(path))
    assert session.compute(node) == ("survived",)
    assert len(path.read_text().split()) == 2  # the lost call ran again
    # one reading a big value shared on the cluster: the lost call's hold on it goes too
    big = rhapsody.task(backend="cpu")(megabytes)(2)
    node = rhapsody.task(backend="dask")(die_reading)(str(tmp_path / "again"), big)
    assert session.compute(node) == (("survived", 2 << 20),)
    dask = session.backends["dask"]
    held = lambda: dask.client.run_on_scheduler(
        lambda dask_scheduler: [k for k in dask_scheduler.tasks if str(k).startswith("input-")])
    assert wait_until(lambda: not held(), 30), f"still held on the cluster: {held()}"


def test_an_unreachable_scheduler_is_refused_naming_its_address():
    with pytest.raises(RuntimeError, match="cannot reach the Dask scheduler at "
                                           "tcp://127.0.0.1:1"):
        rhapsody.DaskBackend(address="tcp://127.0.0.1:1", timeout=2)


def test_bad_arguments_are_refused():
    with pytest.raises(TypeError, match="exactly one of client=, cluster= or address="):
        rhapsody.DaskBackend()


def test_many_tiny_calls_queue_on_leases_and_all_come_back(session):
    dask = session.backends["dask"]
    nodes = [rhapsody.task(backend="dask")(double)(i) for i in range(300)]
    assert session.compute(*nodes) == tuple(2 * i for i in range(300))
    assert dask.ledger.idle()


def test_an_executables_env_cannot_override_its_placements_variables_on_dask(session):
    # env= was laid over the placement's: every rank saw RANK 99 and GPU 7
    program = rhapsody.executable(
        ["sh", "-c", 'echo "$RANK $CUDA_VISIBLE_DEVICES $MINE"'], gpus=1, backend="dask",
        env={"RANK": "99", "CUDA_VISIBLE_DEVICES": "7", "MINE": "kept"})
    fut = session.submit(program)
    assert fut.result(timeout=60).stdout == f"0 {fut.where.gpus[0]} kept\n"


def megabytes(n):
    return b"x" * (n << 20)


def test_a_big_upstream_value_goes_to_the_cluster_once_for_all_its_readers(session):
    dask = session.backends["dask"]
    big = rhapsody.task(backend="cpu")(megabytes)(3)
    readers = [rhapsody.task(backend="dask")(len)(big) for _ in range(4)]
    with distributed.get_task_stream(dask.client) as stream:
        assert rhapsody.compute(*readers, session=session) == (3 << 20,) * 4
    sent = [t for t in stream.data if str(t["key"]).startswith("input-")]
    assert len(sent) == 1, [t["key"] for t in stream.data]
    held = lambda: dask.client.run_on_scheduler(
        lambda dask_scheduler: [k for k in dask_scheduler.tasks if str(k).startswith("input-")])
    assert wait_until(lambda: not held(), 30), f"still held on the cluster: {held()}"


def plus(a, b):
    return a + b


def test_a_reduction_of_short_nodes_runs_fused_on_the_dask_workers(session):
    lane = next(l for l in session._scheduler.lanes.values() if l.backend.name == "dask")

    def tree():
        level = [rhapsody.task(backend="dask")(double)(i) for i in range(32)]
        while len(level) > 1:
            level = [rhapsody.task(backend="dask")(plus)(level[k], level[k + 1])
                     for k in range(0, len(level), 2)]
        return level[0]
    assert session.compute(tree()) == (992,)  # timed: each node a call of its own
    before = lane.started, lane.done
    assert session.compute(tree()) == (992,)
    assert lane.done - before[1] == 63  # every node, counted
    assert lane.started - before[0] < 63  # in fewer calls


def write_pid_and_sleep(path):
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(60)


def test_cancelling_a_running_python_node_restarts_its_worker_and_frees_the_core(
        session, tmp_path):
    dask = session.backends["dask"]
    before = {h.name for h in dask.inventory.hosts}
    path = tmp_path / "pid"
    fut = session.submit(rhapsody.task(backend="dask")(write_pid_and_sleep)(str(path)))
    assert wait_until(lambda: path.exists() and path.read_text(), 60)
    pid = int(path.read_text())
    fut.cancel()
    assert fut.cancelled()
    session.wait()
    assert still_alive([pid], 30) == []  # the worker process running it was restarted
    assert dask.ledger.idle()
    # the restarted worker joins again under a new address: the inventory follows
    assert wait_until(lambda: len(dask.inventory.hosts) == 2
                      and {h.name for h in dask.inventory.hosts} != before, 60)
    assert session.compute(rhapsody.task(backend="dask")(double)(4)) == (8,)



def test_a_worker_dask_fails_to_restart_to_stop_a_node_is_warned_of_simulated_failure(
        tmp_path, monkeypatch):
    """The failed restart is simulated (restart_workers answers "timed out"): Dask loses
    a worker restarted while busy on its third such restart, which takes minutes to
    provoke. The failure was silent, and later nodes waited for ever."""
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                  dashboard_address=":0") as cluster:
        dask = rhapsody.DaskBackend(cluster=cluster)
        with rhapsody.Session(backends=[dask], progress=False) as s:
            monkeypatch.setattr(dask.client, "restart_workers",
                                lambda workers, **kw: {w: "timed out" for w in workers})
            node = rhapsody.task(write_pid_and_sleep).options(timeout=1)(str(tmp_path / "p"))
            with pytest.warns(RuntimeWarning, match=r"Dask did not restart worker \S+ to stop "
                                                    r"node call .* \(timed out\)"):
                with pytest.raises(rhapsody.NodeTimeoutError):
                    s.compute(node)

def test_an_executable_that_times_out_on_dask_is_killed_with_its_children(session, tmp_path):
    path = tmp_path / "pids"
    script = f"sleep 60 & echo $! > {path}; echo $$ >> {path}; wait"
    node = rhapsody.executable(["sh", "-c", script], backend="dask", timeout=2)
    with pytest.raises(rhapsody.NodeTimeoutError):
        session.compute(node)
    assert wait_until(lambda: path.exists() and len(path.read_text().split()) == 2, 10)
    assert still_alive([int(p) for p in path.read_text().split()], 30) == []
    assert session.backends["dask"].ledger.idle()


def test_workers_that_join_and_leave_change_the_inventory(session, cluster):
    dask = session.backends["dask"]
    cluster.scale(3)
    dask.client.wait_for_workers(3, timeout=60)
    assert wait_until(lambda: len(dask.inventory.hosts) == 3, 60)
    workers = dask.client.scheduler_info(n_workers=-1)["workers"]
    assert {h.name for h in dask.inventory.hosts} == set(workers)
    nodes = [rhapsody.task(backend="dask", gpus=1)(where_am_i)(i) for i in range(6)]
    assert {host for host, _, _ in session.compute(*nodes)} == set(workers)
    cluster.scale(2)
    assert wait_until(lambda: len(dask.inventory.hosts) == 2, 60)
    assert {h.name for h in dask.inventory.hosts} == \
        set(dask.client.scheduler_info(n_workers=-1)["workers"])


def test_calls_running_at_once_on_one_worker_each_see_their_own_placement_and_a_warning():
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=True,
                                  resources={"GPU": 2}, dashboard_address=":0") as cluster:
        with pytest.warns(RuntimeWarning, match=r"runs 2 threads and has 2 GPUs(?s:.*)"
                                                r"threads_per_worker=1"):
            dask = rhapsody.DaskBackend(cluster=cluster, name="threads")
        with rhapsody.Session(backends=[dask]) as s:
            meet = rhapsody.task(gpus=1)(my_placement_while_another_runs)
            (a, b), = s.compute([meet(0), meet(1)])
    assert a[0] == b[0] and a[1] != b[1] and sorted(a[2] + b[2]) == [0, 1]  # before: one None


def exit_now():
    os._exit(3)


def test_nodes_wait_for_a_worker_while_every_worker_of_the_cluster_restarts():
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                  dashboard_address=":0") as cluster:
        with rhapsody.Session(backends=[rhapsody.DaskBackend(cluster=cluster)]) as s:
            with pytest.raises(rhapsody.WorkerDiedError):  # it kills the only worker, twice
                s.compute(rhapsody.task(exit_now)())
            # the nanny restarts the worker: before, this failed as "the scheduler stalled"
            assert s.compute(rhapsody.task(double)(21)) == (42,)


def test_a_worker_whose_gpus_are_named_by_uuid_shows_each_call_its_gpus_uuid(monkeypatch):
    """The worker's own CUDA_VISIBLE_DEVICES names its GPUs by UUID (Slurm, MIG): a call
    got the bare id ('0'), which CUDA reads as the machine's GPU 0, maybe not the worker's."""
    uuids = ["GPU-11111111-aaaa", "GPU-22222222-bbbb"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", ",".join(uuids))  # the workers inherit it
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                  resources={"GPU": 2}, dashboard_address=":0") as cluster:
        with rhapsody.Session(backends=[rhapsody.DaskBackend(cluster=cluster, name="ids")]) as s:
            futures = [s.submit(rhapsody.task(gpus=1)(where_am_i)(i)) for i in range(2)]
            for fut in futures:
                assert fut.result(timeout=120)[1] == uuids[fut.where.gpus[0]]


DRIVER = """
import os, sys, time
import rhapsody_graph as rhapsody

@rhapsody.task
def mine(x):
    time.sleep(1)
    return x

if __name__ == "__main__":
    with rhapsody.Session(backends=[rhapsody.DaskBackend(address=sys.argv[1])]) as s:
        print(s.compute(mine(int(sys.argv[2])))[0])
"""


def test_two_drivers_on_one_scheduler_each_get_their_own_values(cluster, tmp_path):
    import subprocess
    import sys
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    drivers = [subprocess.Popen([sys.executable, str(script), cluster.scheduler_address, str(x)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for x in (1, 2)]  # the same node and call keys in both processes
    outs = [d.communicate(timeout=150) for d in drivers]
    assert [d.returncode for d in drivers] == [0, 0], [err[-2000:] for _, err in outs]
    assert [out.split()[-1] for out, _ in outs] == ["1", "2"]


def test_a_failed_start_closes_the_client_it_made():
    with distributed.LocalCluster(n_workers=0, processes=False, dashboard_address=":0") as empty:
        with pytest.raises(RuntimeError, match="the cluster has no worker yet"):
            rhapsody.DaskBackend(cluster=empty)
        assert wait_until(lambda: set(empty.scheduler.clients) <= {"fire-and-forget"}, 30), \
            empty.scheduler.clients  # (the scheduler's own)



def test_a_workers_memory_limit_is_its_hosts_memory_in_the_ledger():
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                  memory_limit="300MiB", dashboard_address=None) as cluster:
        dask = rhapsody.DaskBackend(cluster=cluster)
        try:  # was this machine's memory: a node of memory="8GiB" was placed there
            assert [h.memory for h in dask.inventory.hosts] == [300 * 2**20]
            with pytest.raises(rhapsody.UnsatisfiableError, match="memory"):
                rhapsody.compute(rhapsody.task(memory="8GiB")(double)(1), backend=dask)
        finally:
            dask.shutdown()


def test_a_backend_on_a_users_client_serves_a_second_session_and_one_it_closed_says_so():
    # the second session's nodes waited for ever: the first session's end had stopped
    # the backend's result collector
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        with distributed.Client(cluster, set_as_default=False) as client:
            dask = rhapsody.DaskBackend(client=client)
            for x in (1, 2):
                with rhapsody.Session(backends=[dask], progress=False) as s:
                    assert s.submit(rhapsody.task(double)(x)).result(timeout=60) == 2 * x
        own = rhapsody.DaskBackend(cluster=cluster, name="own")
        with rhapsody.Session(backends=[own], progress=False) as s:
            assert s.compute(rhapsody.task(double)(3)) == (6,)
        with pytest.raises(RuntimeError, match="'own' was shut down and its Dask client is "
                                               "closed: make a new DaskBackend"):
            rhapsody.Session(backends=[own])


def where_after(seconds):
    time.sleep(seconds)
    return rhapsody.current_placement().host


def test_no_node_goes_to_a_worker_that_left_and_one_waiting_fails_once_the_cluster_is_gone():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        dask = rhapsody.DaskBackend(cluster=cluster)
        with rhapsody.Session(backends=[dask], progress=False) as s:
            nap = rhapsody.task(where_after)
            backlog = s.submit(*[nap(0.2) for _ in range(30)])
            gone, pid = sorted(dask.client.run(os.getpid).items())[0]
            wait_until(lambda: sum(f.done() for f in backlog) >= 4, 60)
            os.kill(pid, signal.SIGKILL)
            assert wait_until(lambda: gone not in {h.name for h in dask.inventory.hosts}, 60)
            left = time.time()
            rhapsody.wait(backlog, timeout=120)
            later = [f for f in backlog if f.where.start > left]
            assert later, "the backlog ended before the worker left"
            # the lease on the gone worker took new calls (sent anywhere, `where` wrong)
            assert gone not in {f.result() for f in later}
            assert gone not in {f.where.host for f in later}
            waiting = s.submit(nap(30))
            assert wait_until(waiting.running, 60)
            cluster.close()  # it waited for ever for a worker to join
            with pytest.raises((RuntimeError, rhapsody.WorkerDiedError)):
                waiting.result(timeout=60)


def test_two_backends_on_one_client_both_see_workers_join_and_leave():
    """A client keeps one handler per event topic: the second backend's replaced the
    first's, and the first shut down took the second's with it."""
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        first = rhapsody.DaskBackend(client=client, name="first")
        second = rhapsody.DaskBackend(client=client, name="second")
        with rhapsody.Session(backends=[second], progress=False):
            with rhapsody.Session(backends=[first], progress=False):
                cluster.scale(2)
                client.wait_for_workers(2, timeout=60)
                assert wait_until(lambda: len(first.inventory.hosts) == 2
                                  and len(second.inventory.hosts) == 2, 60)
            cluster.scale(1)  # the first is shut down: the second still hears
            assert wait_until(lambda: len(second.inventory.hosts) == 1, 60)
