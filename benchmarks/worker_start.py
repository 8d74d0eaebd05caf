"""How soon workers are ready, spawned or forked (``LocalBackend(start_method=)``).

Each run is a fresh interpreter: a driver that imports ``--module`` (what its tasks
use), then computes one node per worker (each imports the module, as a task does)
on a ``LocalBackend`` whose workers start one way or the other. Timed: from before
``compute()`` to its values, so the driver's own import is left out; a spawned
worker imports the module itself, a forked one has it already. Median of
``--repeats`` runs per (module, method), after one untimed run per module (it
writes the bytecode caches). ``OPENBLAS_NUM_THREADS=1`` and ``OMP_NUM_THREADS=1``
for both: a driver running a native thread pool is not forked.

    python benchmarks/worker_start.py                     # json and pandas, 2 workers
    python benchmarks/worker_start.py --modules numpy --workers 4
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Dict, List

SCRIPT = """
import sys, time
import rhapsody_graph as rhapsody
import {module}

@rhapsody.task
def use(i):
    import {module}
    return i

if __name__ == "__main__":
    n = int(sys.argv[1])
    with rhapsody.LocalBackend(cpus=n, workers=n, start_method=sys.argv[2]) as backend:
        t0 = time.perf_counter()
        assert rhapsody.compute([use(i) for i in range(n)], backend=backend)[0] == list(range(n))
        print(time.perf_counter() - t0)
        assert backend.start_method == sys.argv[2], "it could not fork"
"""

METHODS = ("spawn", "fork")


def once(module: str, method: str, workers: int) -> float:
    """Seconds from compute() to the values of one node per worker, in a fresh driver."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")  # no pool: the driver can fork
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(module=module), str(workers),
                          method], capture_output=True, text=True, timeout=300, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{module}/{method} failed:\n{out.stderr}")
    return float(out.stdout.split()[-1])


def measure(modules: List[str], workers: int, repeats: int) -> Dict[str, Dict[str, float]]:
    results: Dict[str, Dict[str, float]] = {}
    for module in modules:
        once(module, "spawn", workers)  # writes the bytecode caches
        samples: Dict[str, List[float]] = {m: [] for m in METHODS}
        for _ in range(repeats):
            for method in METHODS:  # in turn, so a noisy spell hits both
                samples[method].append(once(module, method, workers))
        results[module] = {m: statistics.median(v) for m, v in samples.items()}
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modules", nargs="+", default=["json", "pandas"],
                   help="what the driver and every task import")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args()
    results = measure(a.modules, a.workers, a.repeats)
    print(f"{a.workers} workers, median of {a.repeats}, seconds from compute() to the values")
    print("| module | spawn (ms) | fork (ms) | spawn / fork |")
    print("|---|---:|---:|---:|")
    for module, r in results.items():
        print(f"| {module} | {r['spawn'] * 1e3:.1f} | {r['fork'] * 1e3:.1f} | "
              f"{r['spawn'] / r['fork']:.1f}x |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"workers": a.workers, "repeats": a.repeats, "seconds": results}, f,
                      indent=1)


if __name__ == "__main__":
    main()
