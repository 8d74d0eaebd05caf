"""A run journal and its reports: where every node ran, at a glance.

    pip install ".[report]" && python examples/run_report.py [OUT_DIR]

Runs 24 simulations on 2 cores and 2 declared GPUs (one of them fails), keeping a run
journal, then writes from it ``run.html`` (one offline page: timeline per core and GPU,
utilisation, slowest nodes, failures), ``trace.json`` (chrome://tracing, Perfetto) and
``timeline.png``.
"""
import os
import sys
import time

import rhapsody_graph as rhapsody


@rhapsody.task
def simulate(i):
    time.sleep(0.01 * (i % 5))
    if i == 13:
        raise ValueError("simulation 13 diverged")
    return i * 0.5


@rhapsody.task(gpus=1)
def train(i):
    time.sleep(0.05)
    return i


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "."
    os.makedirs(out, exist_ok=True)
    journal = os.path.join(out, "run.jsonl")
    if os.path.exists(journal):
        os.remove(journal)  # a run journal appends: start this one afresh
    with rhapsody.Session(backends=[rhapsody.LocalBackend(cpus=2, gpus=2)],
                          run_log=journal) as session:
        futures = session.submit([simulate(i) for i in range(24)] + [train(i) for i in range(4)])
        done, _ = rhapsody.wait(futures)
        failed = [f for f in done if f.exception() is not None]
    print(f"{len(done)} nodes ran, {len(failed)} failed: {failed[0].exception()}")
    for name in ("run.html", "trace.json", "timeline.png"):
        print("wrote", rhapsody.report(journal, os.path.join(out, name)))
