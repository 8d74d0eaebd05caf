"""The Dragon workloads: rhapsody_graph on Dragon against raw Dragon Batch, same Batch.

Both sides use one Batch runtime (the one the :class:`DragonBackend` started), so
they share its pool and its start-up cost is paid once, before anything is timed:

* ``noops``: N independent no-op nodes; raw Batch submits N ``batch.function`` calls
  and gets every value; rhapsody_graph computes N nodes (fused into a few calls).
* ``chain``: an N-step chain ``inc(inc(...inc(0)))``; raw Batch passes each task as
  the next one's argument (a Batch-native edge); rhapsody_graph resolves the edges.

Run under ``dragon`` (``benchmarks/test_dragon.py``, ``benchmarks/dragon_compare.py``).
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Dict, Tuple

import cloudpickle

import rhapsody_graph as rhapsody

# Batch cloudpickles its targets; its pool workers cannot import this file, so send
# the raw side's functions by value (as a user script's own functions would go)
cloudpickle.register_pickle_by_value(sys.modules[__name__])

NOOPS, CHAIN = 100, 20


def noop(i: int) -> int:
    return i


def inc(x: int) -> int:
    return x + 1


noop_task = rhapsody.task(noop)
inc_task = rhapsody.task(inc)


def batch_noops(backend: Any, n: int) -> int:
    batch = backend.start()._batch
    tasks = [batch.function(noop, i) for i in range(n)]
    return sum(t.get() for t in tasks)


def ours_noops(backend: Any, n: int) -> int:
    return sum(rhapsody.compute([noop_task(i) for i in range(n)], backend=backend)[0])


def batch_chain(backend: Any, n: int) -> int:
    batch = backend.start()._batch
    t = batch.function(inc, 0)
    for _ in range(n - 1):
        t = batch.function(inc, t)  # a Batch-native dependency
    return t.get()


def ours_chain(backend: Any, n: int) -> int:
    x: Any = 0
    for _ in range(n):
        x = inc_task(x)
    return rhapsody.compute(x, backend=backend)[0]


#: workload -> (size, expected value, {engine: run(backend, size)})
WORKLOADS: Dict[str, Tuple[int, int, Dict[str, Callable[[Any, int], int]]]] = {
    "noops": (NOOPS, NOOPS * (NOOPS - 1) // 2, {"dragon-batch": batch_noops,
                                                "rhapsody-dragon": ours_noops}),
    "chain": (CHAIN, CHAIN, {"dragon-batch": batch_chain, "rhapsody-dragon": ours_chain}),
}
