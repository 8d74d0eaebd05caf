"""What one ``compute()`` of N no-ops costs the driver: wall time, the driver's CPU
(every thread) and the workers' CPU, per node; median of ``--repeats`` runs.

    python benchmarks/driver_cost.py                      # this checkout
    python benchmarks/driver_cost.py --workload reduction --n 1024   # 2,047 nodes, pairs
    python benchmarks/driver_cost.py --workload futures   # Session.submit + as_completed
    PYTHONPATH=/path/to/other/checkout python benchmarks/driver_cost.py   # another one

Alternate two checkouts in the same minutes to compare them on a noisy box. For a
figure that does not move with the box's load, count the driver's instructions with
callgrind (workers are not traced) and take the difference between 1 and 3 timed
runs, per node:

    valgrind --tool=callgrind --callgrind-out-file=cg.1 python benchmarks/driver_cost.py --valgrind --repeats 1
    valgrind --tool=callgrind --callgrind-out-file=cg.3 python benchmarks/driver_cost.py --valgrind --repeats 3
    # (Ir of cg.3 - Ir of cg.1) / (2 * N), the Ir from "Collected :" on stderr

(the real interpreter, not a pyenv shim script: ``$(python -c 'import sys;
print(sys.executable)')``). Runs on the API every checkout since the first one has:
``rhapsody_graph.compute(nodes, backend=LocalBackend(cpus=2))`` (``--workload futures``:
``Session``, ``submit`` and ``as_completed``, since sessions landed).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5_000, help="no-op nodes per compute()")
    ap.add_argument("--workload", choices=("independent", "reduction", "futures"),
                    default="independent",
                    help="independent: one compute() of --n no-ops; reduction: add "
                         "pairwise over --n no-op leaves (2n - 1 nodes); futures: --n "
                         "no-ops submitted one by one to a Session, consumed with "
                         "as_completed")
    ap.add_argument("--repeats", type=int, default=7, help="timed runs after one warm run")
    ap.add_argument("--valgrind", action="store_true",
                    help="under valgrind, which lacks pidfd_open: a pipe stands in for "
                         "each worker's pidfd (a worker's death is then seen by its EOF)")
    a = ap.parse_args()
    if a.valgrind:
        os.pidfd_open = lambda pid, flags=0: os.pipe()[0]
    import rhapsody_graph as rg
    from workloads import r_call, r_noop, tree

    def nodes() -> list:
        if a.workload == "independent":
            return [r_noop(i) for i in range(a.n)]
        return [tree(r_call, a.n)]
    count = 2 * a.n - 1 if a.workload == "reduction" else a.n

    backend = rg.LocalBackend(cpus=2).start()
    session = rg.Session(backends=[backend]) if a.workload == "futures" else None
    me = psutil.Process()

    def workers_cpu() -> float:
        return sum(sum(c.cpu_times()[:2]) for c in me.children(recursive=True))

    def run() -> None:
        if session is None:
            rg.compute(nodes(), backend=backend)
            return
        futures = [session.submit(r_noop(i)) for i in range(a.n)]
        for f in rg.as_completed(futures):
            f.result()

    try:
        run()
        rows = []
        for _ in range(a.repeats):
            k0, c0, w0 = workers_cpu(), time.process_time(), time.perf_counter()
            run()
            rows.append((time.perf_counter() - w0, time.process_time() - c0, workers_cpu() - k0))
    finally:
        if session is not None:
            session.close()
        backend.shutdown()
    wall, driver, workers = (statistics.median(r[i] for r in rows) / count * 1e6
                             for i in range(3))
    what = {"independent": f"{a.n:,} no-ops", "reduction": f"{count:,}-node reduction",
            "futures": f"{a.n:,} futures"}[a.workload]
    print(f"{rg.__file__}: wall {wall:.1f}, driver CPU {driver:.1f}, workers' CPU "
          f"{workers:.1f} us/node ({what}, median of {a.repeats})")


if __name__ == "__main__":
    main()
