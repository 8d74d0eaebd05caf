"""What waiting costs the scheduler: N executables (and N pool nodes, for comparison)
of one request queue for the 8 cores of one simulated host, at N and 4N.

    python benchmarks/waiting_nodes.py --nodes 2000 --repeats 3

A dispatch pass runs after every batch of completions. It should look once at a
request that cannot be placed, not at every node waiting with it: then the cost per
node stays flat as N grows (ratio ~1), where a pass over every waiting node makes it
grow with N (ratio ~4). Prints the median µs per node of ``compute()`` wall for each
kind and size, and the ratio of 4N to N. The backend is a
:class:`~rhapsody_graph.SimulatedBackend` (no user code runs; the session, scheduler
and ledger are the real ones).
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, List

import rhapsody_graph as rg

KINDS = {
    "executable": lambda i: rg.executable(["never-run", str(i)], cpus=1),
    "pool node": lambda i: rg.task(cpus=1)(abs)(i),
}


def run(make: Callable[[int], rg.Node], n: int) -> float:
    """µs per node of one compute() of ``n`` nodes made by ``make``."""
    sim = rg.SimulatedBackend(hosts=1, cpus=8, gpus=0, duration=1.0, record=False)
    nodes = [make(i) for i in range(n)]
    with rg.Session(backends=[sim], progress=False) as s:
        start = time.perf_counter()
        s.compute(nodes)
        return (time.perf_counter() - start) / n * 1e6


def main(argv: "List[str] | None" = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=2000, help="N (default 2,000)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per figure (median)")
    args = ap.parse_args(argv)
    print("| nodes | kind | us/node | ratio to N |\n|---:|---|---:|---:|")
    for kind, make in KINDS.items():
        base = None
        for n in (args.nodes, 4 * args.nodes):
            us = statistics.median(run(make, n) for _ in range(args.repeats))
            base = base or us
            print(f"| {n:,} | {kind} | {us:.1f} | {us / base:.2f} |")


if __name__ == "__main__":
    main()
