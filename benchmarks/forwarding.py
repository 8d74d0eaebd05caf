"""Dependents run where their inputs are: wall time per node of graphs whose nodes
wait on values a worker just made, and how many calls were sent naming their inputs
(forwarded: the worker fills them) instead of carrying the values; median of
``--repeats`` runs in one session on ``LocalBackend(cpus=2)``.

    python benchmarks/forwarding.py                  # this checkout
    PYTHONPATH=/path/to/other/checkout python benchmarks/forwarding.py

Graphs (no-op ``noop``/``add`` nodes of :mod:`workloads`):

* ``chain``: ``x = noop(x)``, ``--steps`` times (one input per node);
* ``diamond``: ``x = add(x, noop(x))``, ``--steps`` times: each ``add`` waits on two
  calls that run on one worker, one after the other;
* ``reduction``: ``add`` pairwise over ``--leaves`` no-op leaves.

Alternate two checkouts in the same minutes to compare them on a noisy box.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List

import rhapsody_graph as rg

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from workloads import r_add, r_call, r_noop, tree  # noqa: E402


def graphs(steps: int, leaves: int) -> Dict[str, Callable[[], Any]]:
    def chain() -> Any:
        x = r_noop(0)
        for _ in range(steps):
            x = r_noop(x)
        return x

    def diamond() -> Any:
        x = r_noop(0)
        for _ in range(steps):
            x = r_add(x, r_noop(x))
        return x
    return {"chain": chain, "diamond": diamond, "reduction": lambda: tree(r_call, leaves)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--leaves", type=int, default=1_024)
    ap.add_argument("--repeats", type=int, default=7, help="timed runs after one warm run")
    a = ap.parse_args()
    backend = rg.LocalBackend(cpus=2)
    named: List[int] = []
    submit = backend.submit

    def counting(call: Any) -> None:  # the real submit, after counting the named inputs
        named.append(sum(type(i) is int for i in call.inputs))
        submit(call)
    backend.submit = counting  # type: ignore[method-assign]
    print(f"{rg.__file__}: LocalBackend(cpus=2), median of {a.repeats}")
    with rg.Session(backends=[backend]) as s:
        for name, build in graphs(a.steps, a.leaves).items():
            walls = []
            for i in range(a.repeats + 1):
                root = build()
                del named[:]
                t0 = time.perf_counter()
                s.compute(root)
                if i:
                    walls.append((time.perf_counter() - t0) / len(named) * 1e6)
            forwarded = sum(1 for k in named if k)
            print(f"  {name:10} {statistics.median(walls):7.1f} us/node   {len(named):6,} "
                  f"calls, {forwarded:,} naming an input, {named.count(2):,} naming two")


if __name__ == "__main__":
    main()
