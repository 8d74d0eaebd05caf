"""DaskBackend's cost per task beside plain ``Client.submit`` on the same cluster, one run.

    python benchmarks/dask_backend_overhead.py --repeats 3 [--n 2000]

One ``distributed.LocalCluster`` (2 worker processes, 1 thread each) serves both:
``Client.submit(noop, i, pure=False)`` for every item, then ``client.gather``; and
``rhapsody.compute`` of the same no-ops on a ``DaskBackend(client=...)`` over that
client (every call placed by the ledger on a named worker). Interleaved, median of
``--repeats``; prints µs per task and the ratio (what rhapsody_graph's graph, ledger
and placement add on top of Dask's own per-task cost). Issue 12's benchmark.
"""
from __future__ import annotations

import argparse
import statistics
import time

from distributed import Client, LocalCluster

import rhapsody_graph as rg
from workloads import noop, r_noop


def plain(client: Client, n: int) -> int:
    return sum(client.gather([client.submit(noop, i, pure=False) for i in range(n)]))


def ours(backend: rg.DaskBackend, n: int) -> int:
    return sum(rg.compute([r_noop(i) for i in range(n)], backend=backend)[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                           dashboard_address=None)
    client = Client(cluster)
    backend = rg.DaskBackend(client=client)
    engines = {"Client.submit": lambda n: plain(client, n),
               "rhapsody DaskBackend": lambda n: ours(backend, n)}
    samples = {name: [] for name in engines}
    try:
        for run in engines.values():  # warm: workers import the task module
            assert run(200) == sum(range(200))
        for _ in range(a.repeats):
            for name, run in engines.items():
                t0 = time.perf_counter()
                assert run(a.n) == sum(range(a.n))
                samples[name].append((time.perf_counter() - t0) / a.n * 1e6)
    finally:
        backend.shutdown()
        client.close()
        cluster.close()
    base = statistics.median(samples["Client.submit"])
    print(f"{a.n:,} no-ops on a LocalCluster of 2 worker processes; median of {a.repeats}")
    print("| engine | us/task | ratio to Client.submit |")
    print("|---|---:|---:|")
    for name, s in samples.items():
        m = statistics.median(s)
        print(f"| {name} | {m:.0f} | {m / base:.2f}x |")


if __name__ == "__main__":
    main()
