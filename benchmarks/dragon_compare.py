"""rhapsody_graph on Dragon beside raw Dragon Batch, in one run, with ratios::

    dragon benchmarks/dragon_compare.py --repeats 5

Prints the median wall time of each workload on each engine (``dragon_workloads.py``)
and the ratios the bars are about: throughput on the no-op set (Batch time / ours:
bar >= 3) and per-hop latency on the chain (ours / Batch-native: bar <= 0.3). Runs
alternate between the engines so that drift on a noisy machine hits both.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dragon  # noqa: E402,F401

import dragon_workloads as dw  # noqa: E402
import rhapsody_graph as rhapsody  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the samples here")
    args = parser.parse_args()
    multiprocessing.set_start_method("dragon", force=True)
    backend = rhapsody.DragonBackend().start()
    samples = {}
    try:
        for workload, (size, expected, runs) in dw.WORKLOADS.items():
            for engine, run in runs.items():  # one untimed warm-up each
                assert run(backend, size) == expected
            for _ in range(args.repeats):
                for engine, run in runs.items():
                    t0 = time.perf_counter()
                    assert run(backend, size) == expected
                    samples.setdefault((workload, engine), []).append(time.perf_counter() - t0)
    finally:
        backend.shutdown()
    median = {k: statistics.median(v) for k, v in samples.items()}
    print(f"{'workload':<8} {'engine':<16} {'median s':>9} {'per unit ms':>12}  (of {args.repeats})")
    for (workload, engine), m in sorted(median.items()):
        size = dw.WORKLOADS[workload][0]
        print(f"{workload:<8} {engine:<16} {m:>9.3f} {m / size * 1e3:>12.2f}")
    noops = median[("noops", "dragon-batch")] / median[("noops", "rhapsody-dragon")]
    chain = median[("chain", "rhapsody-dragon")] / median[("chain", "dragon-batch")]
    print(f"no-op throughput, rhapsody / Batch: {noops:.1f}x (bar >= 3)")
    print(f"chain per-hop latency, rhapsody / Batch-native: {chain:.3f}x (bar <= 0.3)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"/".join(k): v for k, v in samples.items()}, f, indent=1)


if __name__ == "__main__":
    main()
