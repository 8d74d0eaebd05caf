"""What the progress display costs: 5,000 no-op nodes with and without a live display,
interleaved, on one session of 2 workers; prints µs per node and the ratio of medians.

    python benchmarks/progress_overhead.py [--repeats 7] [--n 5000]

The display is the rich one (``rhapsody_graph.progress``), drawn every 0.25 s into a
buffer, so the terminal's own speed is not measured. The bar (issue 14): at most 1.05.
"""
import argparse
import io
import statistics
import time

import rhapsody_graph as rg
from rhapsody_graph.progress import Progress
from workloads import r_noop


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    session = rg.Session(backends=[rg.LocalBackend(cpus=2).start()], progress=False)

    def run(n: int) -> float:
        t0 = time.perf_counter()
        session.compute([r_noop(i) for i in range(n)])
        return (time.perf_counter() - t0) / n * 1e6

    try:
        run(500)
        off, on = [], []
        for _ in range(a.repeats):
            off.append(run(a.n))
            shown = Progress(session._scheduler.lanes.values(), "live", out=io.StringIO())
            on.append(run(a.n))
            shown.stop()
    finally:
        session.close()
    print(f"{a.n:,} no-op nodes, median of {a.repeats}: without display "
          f"{statistics.median(off):.1f} µs/node, with {statistics.median(on):.1f} µs/node; "
          f"ratio {statistics.median(on) / statistics.median(off):.3f}")


if __name__ == "__main__":
    main()
