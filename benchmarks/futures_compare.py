"""Futures side by side: submit N independent no-ops one by one, consume them with
``as_completed``, on 2 workers each, in one run; prints µs per future and ratios.

    python benchmarks/futures_compare.py --repeats 3 [--n 5000] [--no-distributed]

Engines: rhapsody_graph (a ``Session`` over ``LocalBackend(cpus=2)``), the
``concurrent.futures`` thread pool (floor: no process boundary) and process pool,
and Dask ``distributed`` (``Client.submit`` + ``distributed.as_completed`` on a
``LocalCluster`` of 2 worker processes, 1 thread each) when it is installed.
"""
from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed

import rhapsody_graph as rg
from workloads import noop, r_noop


def rhapsody_run(session: rg.Session, n: int) -> int:
    futures = [session.submit(r_noop(i)) for i in range(n)]
    return sum(f.result() for f in rg.as_completed(futures))


def executor_run(ex, n: int) -> int:
    futures = [ex.submit(noop, i) for i in range(n)]
    return sum(f.result() for f in as_completed(futures))


def distributed_run(client, n: int) -> int:
    from distributed import as_completed as d_as_completed
    futures = [client.submit(noop, i, pure=False) for i in range(n)]
    return sum(f.result() for f in d_as_completed(futures))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-distributed", action="store_true")
    a = ap.parse_args()
    engines = {}
    session = rg.Session(backends=[rg.LocalBackend(cpus=2).start()])
    engines["rhapsody"] = lambda n: rhapsody_run(session, n)
    threads, procs = ThreadPoolExecutor(2), ProcessPoolExecutor(2)
    engines["threadpool"] = lambda n: executor_run(threads, n)
    engines["processpool"] = lambda n: executor_run(procs, n)
    cluster = client = None
    if not a.no_distributed:
        try:
            from distributed import Client, LocalCluster
            cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                   dashboard_address=None)
            client = Client(cluster)
            engines["distributed"] = lambda n: distributed_run(client, n)
        except Exception as exc:  # reported, never silently dropped
            print(f"distributed: not measured ({type(exc).__name__}: {exc})")
    expected = sum(range(a.n))
    results = {}
    try:
        for name, run in engines.items():
            assert run(200) == sum(range(200))  # warm
        for _ in range(a.repeats):  # interleaved, so noise hits every engine alike
            for name, run in engines.items():
                t0 = time.perf_counter()
                assert run(a.n) == expected
                results.setdefault(name, []).append((time.perf_counter() - t0) / a.n * 1e6)
    finally:
        session.close()
        threads.shutdown()
        procs.shutdown()
        if client is not None:
            client.close()
            cluster.close()
    ours = statistics.median(results["rhapsody"])
    print(f"{a.n:,} futures submitted one by one, consumed with as_completed; "
          f"median of {a.repeats}")
    for name, samples in results.items():
        med = statistics.median(samples)
        print(f"  {name:<12} {med:9.1f} us/future   {med / ours:7.2f}x rhapsody_graph's")


if __name__ == "__main__":
    main()
