"""What a big live graph costs the next run: 5,000 no-ops fresh, then with a
100,000-node graph alive in the driver (built, not run), interleaved.

    python benchmarks/gc_alive.py --repeats 5

Python's cyclic garbage collector walks every tracked object in its oldest
generation now and then; a graph kept alive makes those walks longer. Prints the
median µs per node of each and their ratio (issue 15's bar: <= 1.2x).
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time
from typing import List

import rhapsody_graph as rg
from workloads import INDEPENDENT, r_add, r_noop


def run(backend: rg.LocalBackend) -> float:
    """µs per node of one 5,000 no-op compute()."""
    start = time.perf_counter()
    rg.compute([r_noop(i) for i in range(INDEPENDENT)], backend=backend)
    return (time.perf_counter() - start) / INDEPENDENT * 1e6


def big_graph() -> List[rg.Node]:
    """100,000 nodes: 50,000 leaves and 49,999 pairwise joins."""
    leaves = [r_noop(i) for i in range(50_000)]
    return leaves + [r_add(leaves[i], leaves[i + 1]) for i in range(49_999)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    with rg.LocalBackend(cpus=2) as backend:
        run(backend)  # warm: workers import the bodies
        fresh, alive = [], []
        for _ in range(args.repeats):
            fresh.append(run(backend))
            graph = big_graph()
            alive.append(run(backend))
            del graph
            gc.collect()
    f, a = statistics.median(fresh), statistics.median(alive)
    print(f"5,000 no-ops: fresh {f:.1f} us/node, with a 100,000-node graph alive "
          f"{a:.1f} us/node: {a / f:.2f}x (bar 1.2x)")


if __name__ == "__main__":
    main()
