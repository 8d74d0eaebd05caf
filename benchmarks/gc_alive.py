"""What a big live graph costs the next run: 5,000 no-ops fresh, then with a
100,000-node graph alive in the driver (built, not run), interleaved.

    python benchmarks/gc_alive.py --repeats 5
    python benchmarks/gc_alive.py --repeats 5 --futures   # submitted one by one instead

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


def run(session: rg.Session, futures: bool) -> float:
    """µs per node of one 5,000 no-op compute() (``futures``: 5,000 ``submit()`` calls,
    then every result)."""
    start = time.perf_counter()
    if futures:
        for f in [session.submit(r_noop(i)) for i in range(INDEPENDENT)]:
            f.result()
    else:
        session.compute([r_noop(i) for i in range(INDEPENDENT)])
    return (time.perf_counter() - start) / INDEPENDENT * 1e6


def big_graph() -> List[rg.Node]:
    """100,000 nodes: 50,000 leaves and 49,999 pairwise joins."""
    leaves = [r_noop(i) for i in range(50_000)]
    return leaves + [r_add(leaves[i], leaves[i + 1]) for i in range(49_999)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--futures", action="store_true",
                   help="submit the no-ops one by one and take each result (the futures "
                        "path) instead of one compute()")
    args = p.parse_args()
    with rg.Session(backends=[rg.LocalBackend(cpus=2)], progress=False) as session:
        run(session, args.futures)  # warm: workers import the bodies
        fresh, alive = [], []
        for _ in range(args.repeats):
            fresh.append(run(session, args.futures))
            graph = big_graph()
            alive.append(run(session, args.futures))
            del graph
            gc.collect()
    f, a = statistics.median(fresh), statistics.median(alive)
    how = "submitted one by one" if args.futures else "one compute()"
    print(f"5,000 no-ops, {how}: fresh {f:.1f} us/node, with a 100,000-node graph alive "
          f"{a:.1f} us/node: {a / f:.2f}x (bar 1.2x)")


if __name__ == "__main__":
    main()
