"""Futures side by side: submit N independent no-ops one by one, consume them with
``as_completed``, on 2 workers each, in one run; prints µs per future and ratios.

    python benchmarks/futures_compare.py --repeats 3 [--n 5000] [--no-distributed]

Engines: rhapsody_graph (a ``Session`` over ``LocalBackend(cpus=2)``), the
``concurrent.futures`` thread pool (floor: no process boundary) and process pool,
and Dask ``distributed`` (``Client.submit`` + ``distributed.as_completed`` on a
``LocalCluster`` of 2 worker processes, 1 thread each) when it is installed.

Two phases of one run: first the local engines, interleaved, with no Dask cluster
alive; then the Dask cluster is started, Dask and rhapsody_graph are measured
interleaved while it lives, and it is shut down. A live ``Client`` runs an event-loop
thread in this process, and its scheduler and workers share the cores, so every
engine measured beside it slows down; both ratios to Dask are printed.
"""
from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from typing import Callable, Dict, List

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


def measure(engines: Dict[str, Callable[[int], int]], n: int,
            repeats: int) -> Dict[str, List[float]]:
    """µs per future of each engine, warmed once, then interleaved ``repeats`` times
    (so noise hits every engine alike)."""
    for run in engines.values():
        assert run(200) == sum(range(200))
    results: Dict[str, List[float]] = {name: [] for name in engines}
    for _ in range(repeats):
        for name, run in engines.items():
            t0 = time.perf_counter()
            assert run(n) == sum(range(n))
            results[name].append((time.perf_counter() - t0) / n * 1e6)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-distributed", action="store_true")
    a = ap.parse_args()
    session = rg.Session(backends=[rg.LocalBackend(cpus=2).start()])
    threads, procs = ThreadPoolExecutor(2), ProcessPoolExecutor(2)
    try:
        local = measure({"rhapsody": lambda n: rhapsody_run(session, n),
                         "threadpool": lambda n: executor_run(threads, n),
                         "processpool": lambda n: executor_run(procs, n)}, a.n, a.repeats)
        beside = {} if a.no_distributed else measure_distributed(session, a.n, a.repeats)
    finally:
        session.close()
        threads.shutdown()
        procs.shutdown()
    ours = statistics.median(local["rhapsody"])
    print(f"{a.n:,} futures submitted one by one, consumed with as_completed; "
          f"median of {a.repeats}")
    for name, samples in local.items():
        med = statistics.median(samples)
        print(f"  {name:<12} {med:9.1f} us/future   {med / ours:7.2f}x rhapsody_graph's")
    if beside:
        alive = statistics.median(beside["rhapsody"])
        dask = statistics.median(beside["distributed"])
        print(f"  distributed  {dask:9.1f} us/future   {dask / ours:7.2f}x rhapsody_graph's "
              f"(measured alone above)")
        print(f"  with the Dask cluster alive: rhapsody {alive:.1f} us/future, distributed "
              f"{dask / alive:.2f}x that")


def measure_distributed(session: rg.Session, n: int, repeats: int) -> Dict[str, List[float]]:
    """Dask ``distributed`` and rhapsody_graph, interleaved while a cluster lives."""
    try:
        from distributed import Client, LocalCluster
    except ImportError as exc:  # reported, never silently dropped
        print(f"distributed: not measured ({exc})")
        return {}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        return measure({"rhapsody": lambda n: rhapsody_run(session, n),
                        "distributed": lambda n: distributed_run(client, n)}, n, repeats)


if __name__ == "__main__":
    main()
