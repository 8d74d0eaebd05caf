"""DaskBackend on a real distributed.LocalCluster (2 worker processes, 1 thread each,
2 declared GPUs each): placement and GPU masks seen inside the task, executables,
failures with their tracebacks, edges across a Dask and a local backend, routing of
the kinds Dask does not run, a killed Dask worker, and errors before anything runs."""
import os
import signal

import pytest

import rhapsody_graph as rhapsody

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


def test_a_killed_dask_worker_fails_over_as_an_infrastructure_failure(session, tmp_path):
    path = tmp_path / "attempts"
    node = rhapsody.task(backend="dask")(die)(str(path))
    assert session.compute(node) == ("survived",)
    assert len(path.read_text().split()) == 2  # the lost call ran again


def test_an_unreachable_scheduler_is_refused_naming_its_address():
    with pytest.raises(RuntimeError, match="cannot reach the Dask scheduler at "
                                           "tcp://127.0.0.1:1"):
        rhapsody.DaskBackend(address="tcp://127.0.0.1:1", timeout=2)


def test_bad_arguments_are_refused():
    with pytest.raises(TypeError, match="exactly one of client=, cluster= or address="):
        rhapsody.DaskBackend()
