"""Fusion on the Dask backend: a binary reduction over 256 no-op leaves (511 nodes) and
a 200-step chain, each run by ``compute()`` on a ``DaskBackend`` over a 2-worker
``distributed.LocalCluster`` (processes), with fusion on and off
(``Session(fuse=False)``) in turn, twice; per node, median of 3 after one untimed run
(which times the functions: their first calls are never fused).

    python benchmarks/dask_fusion.py
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import rhapsody_graph as rg  # noqa: E402
from workloads import add, inc, noop  # noqa: E402

TASKS = {noop: rg.task(noop), add: rg.task(add), inc: rg.task(inc)}


def call(fn: Callable[..., Any], *args: Any) -> Any:
    return TASKS[fn](*args)


def tree(leaves: int = 256) -> Any:
    level = [call(noop, i) for i in range(leaves)]
    while len(level) > 1:
        level = [call(add, level[k], level[k + 1]) for k in range(0, len(level), 2)]
    return level[0]


def chain(hops: int = 200) -> Any:
    x = call(inc, 0)
    for _ in range(hops - 1):
        x = call(inc, x)
    return x


def main() -> None:
    from distributed import LocalCluster
    results: Dict[Tuple[str, bool], List[float]] = {}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster:
        for fuse in (True, False, True, False):
            with rg.Session(backends=[rg.DaskBackend(cluster=cluster)], progress=False,
                            fuse=fuse) as s:
                for name, make, nodes in (("reduction", tree, 511), ("chain", chain, 200)):
                    s.compute(make())
                    samples = []
                    for _ in range(3):
                        graph = make()
                        t0 = time.perf_counter()
                        s.compute(graph)
                        samples.append((time.perf_counter() - t0) / nodes * 1e6)
                    results.setdefault((name, fuse), []).append(statistics.median(samples))
    print("| workload | fused (us/node) | unfused (us/node) | unfused / fused |")
    print("|---|---:|---:|---:|")
    for name in ("reduction", "chain"):
        on = statistics.median(results[(name, True)])
        off = statistics.median(results[(name, False)])
        print(f"| {name} | {on:,.1f} | {off:,.1f} | {off / on:.1f}x |")


if __name__ == "__main__":
    import argparse
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()  # --help
    main()
