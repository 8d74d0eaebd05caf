"""Dask collections on rhapsody_graph's scheduler beside Dask's own, in one run.

    python benchmarks/dask_compare.py --repeats 3

Workloads: ``dask.compute`` of 5,000 independent ``dask.delayed`` no-ops, and a
``dask.array`` reduction (``(x @ x.T).mean()`` over 400 x 400 in 100 x 100 chunks),
each on ``scheduler=rhapsody.get`` (a ``LocalBackend`` of 2 worker processes, started
and warmed), Dask's threaded scheduler (``num_workers=2``) and its synchronous one.
Prints the median time per task (per graph for the array) and each scheduler's ratio
to rhapsody_graph's. Bar (issue 12): not slower than the threaded scheduler on the
5,000 calls.
"""
from __future__ import annotations

import argparse
import statistics
import time

import dask
import dask.array as da

import rhapsody_graph as rg
from workloads import noop

N = 5_000


def delayed_noops() -> list:
    return [dask.delayed(noop)(i) for i in range(N)]


def array() -> object:
    x = da.random.RandomState(0).random_sample((400, 400), chunks=(100, 100))
    return (x @ x.T).mean()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    backend = rg.LocalBackend(cpus=2).start()
    schedulers = {
        "rhapsody.get": dict(scheduler=rg.get, backend=backend),
        "dask threads": dict(scheduler="threads", num_workers=2),
        "dask sync": dict(scheduler="sync"),
    }
    results = {}
    try:
        for name, kw in schedulers.items():  # warm
            dask.compute(*delayed_noops()[:200], **kw)
            dask.compute(array(), **kw)
        for _ in range(a.repeats):  # interleaved, so noise hits every scheduler alike
            for name, kw in schedulers.items():
                work = delayed_noops()
                t0 = time.perf_counter()
                dask.compute(*work, **kw)
                results.setdefault(("5,000 delayed no-ops", "us/task", name), []).append(
                    (time.perf_counter() - t0) / N * 1e6)
                t0 = time.perf_counter()
                dask.compute(array(), **kw)
                results.setdefault(("array reduction", "ms/graph", name), []).append(
                    (time.perf_counter() - t0) * 1e3)
    finally:
        backend.shutdown()
    print(f"dask {dask.__version__}, rhapsody_graph {rg.__version__}; median of {a.repeats}")
    print("| workload | scheduler | median | ratio to rhapsody.get |")
    print("|---|---|---:|---:|")
    for workload in ("5,000 delayed no-ops", "array reduction"):
        unit = "us/task" if workload.startswith("5") else "ms/graph"
        ours = statistics.median(results[(workload, unit, "rhapsody.get")])
        for name in schedulers:
            m = statistics.median(results[(workload, unit, name)])
            print(f"| {workload} ({unit}) | {name} | {m:.3g} | {m / ours:.2f}x |")


if __name__ == "__main__":
    main()
