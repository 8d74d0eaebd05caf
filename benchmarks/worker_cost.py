"""What a worker's loop costs per call, with no driver and no other process: the
CPU time of :meth:`rhapsody_graph.backends.worker.Worker.serve` over ``--calls``
no-op calls queued in one ``run`` frame, read from a pipe and answered into another
(both sized to hold everything, so nothing waits), in this process; median of
``--repeats``.

    python benchmarks/worker_cost.py                 # this checkout
    PYTHONPATH=/path/to/other/checkout python benchmarks/worker_cost.py

The figure is the worker's share of a no-op node's cost (unpickling its call,
running it, pickling and writing its result, looking for new messages); on a box
where workers and the driver share the cores, it is CPU the driver does not get.
"""
from __future__ import annotations

import argparse
import fcntl
import os
import statistics
import sys
import time

import rhapsody_graph
from rhapsody_graph.backends import wire, worker

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from workloads import noop  # noqa: E402

F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ, named from Python 3.10 on Linux only


def _pipe(size: int) -> tuple:
    r, w = os.pipe()
    fcntl.fcntl(w, F_SETPIPE_SZ, size)
    return r, w


def serve_once(calls: int) -> float:
    """µs of CPU per call for one worker serving ``calls`` queued no-ops."""
    size = int(open("/proc/sys/fs/pipe-max-size").read())
    task_r, task_w = _pipe(size)
    result_r, result_w = _pipe(size)
    fid_bytes = wire.dump_callable(noop)
    tasks = [(i, 1, fid_bytes if i == 0 else None, wire.dump_args((i,), {}, ()), [], None)
             for i in range(calls)]
    data = wire.frame(("run", tasks))
    if len(data) > size:
        raise SystemExit(f"{calls:,} calls take {len(data):,} bytes, more than a pipe "
                         f"holds here ({size:,}): pass a smaller --calls")
    wire.write_all(task_w, data)
    os.close(task_w)  # EOF after the frame: the worker ends once it has answered all
    w = worker.Worker(task_r, result_w)
    t0 = time.thread_time()
    w.serve()
    cpu = time.thread_time() - t0
    for fd in (task_r, result_w):
        os.close(fd)
    answered = bytearray()
    while True:
        chunk = os.read(result_r, size)
        if not chunk:
            break
        answered += chunk
    os.close(result_r)
    assert len(wire.split_results(answered)) == calls
    return cpu / calls * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=10_000)
    p.add_argument("--repeats", type=int, default=7)
    a = p.parse_args()
    samples = [serve_once(a.calls) for _ in range(a.repeats)]
    print(f"{rhapsody_graph.__file__}: worker CPU {statistics.median(samples):.2f} us per "
          f"no-op call (min {min(samples):.2f}; {a.calls:,} calls, median of {a.repeats})")


if __name__ == "__main__":
    main()
