"""The benchmark workloads, shared by the pytest-benchmark files and ``compare.py``.

Every workload is one function per engine with the same shape, so that the
pytest-benchmark suite (``benchmarks/test_*.py``) and the side-by-side script
(``benchmarks/compare.py``) time exactly the same code.

Engines that run tasks:

* ``rhapsody``: :class:`rhapsody_graph.LocalBackend` with ``cpus=2`` (two persistent
  worker processes), started and warmed before any timing;
* ``processpool``: ``concurrent.futures.ProcessPoolExecutor(2)``, warmed;
* ``dask-threads``: ``dask.delayed`` + the threaded scheduler, ``num_workers=2``;
* ``threadpool``: ``concurrent.futures.ThreadPoolExecutor(2)``, the floor (no
  process boundary, no pickling).

Engines that build / order a graph: ``rhapsody`` (``@task`` calls, ``Graph(*outputs)``),
``dask`` (``dask.delayed`` calls, ``dask.order.order``), ``graphlib``
(``TopologicalSorter.static_order`` on a prebuilt ``{key: deps}`` dict) and ``dict``
(building that plain dict: the floor for construction).

The task bodies are module-level functions here, so every engine sends them by
reference (``workloads.noop``): nothing engine-specific is pickled by value.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from graphlib import TopologicalSorter
from typing import Any, Callable, Dict, List, Sequence, Tuple

import rhapsody_graph as rg

WORKERS = 2

# sizes (the workloads)
LEVELS, WIDTH = 10, 10_000          # 100,000 nodes, 180,000 edges
INDEPENDENT = 5_000                 # independent no-op nodes
CHAIN = 1_000                       # chain length (hops)
LEAVES = 1_024                      # binary reduction: 2,047 tasks

RUN_ENGINES = ("rhapsody", "processpool", "dask-threads", "threadpool")
BUILD_ENGINES = ("rhapsody", "dask", "dict")
ORDER_ENGINES = ("rhapsody", "dask", "graphlib")
STARTUP_ENGINES = ("rhapsody", "processpool", "dask-threads", "threadpool")
ALL_ENGINES = tuple(sorted(set(RUN_ENGINES + BUILD_ENGINES + ORDER_ENGINES + STARTUP_ENGINES)))

# The bars, in microseconds per node / hop (startup: seconds).
BARS = {
    "build": 10.0,
    "order": 10.0,
    "independent": 100.0,
    "chain": 150.0,
    "startup": 0.5,
}


def describe() -> str:
    """Which code is measured: rhapsody_graph's location and version, dask's version."""
    try:
        import dask
        dask_version = dask.__version__
    except ImportError:
        dask_version = "not installed"
    where = os.path.dirname(os.path.dirname(os.path.abspath(rg.__file__)))
    return (f"rhapsody_graph {rg.__version__} from {where}, dask {dask_version}, "
            f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs")


# -- task bodies (plain functions: every engine calls the same code) -----------------

def noop(i: Any) -> Any:
    return i


def inc(x: int) -> int:
    return x + 1


def add(a: int, b: int) -> int:
    return a + b


r_noop = rg.task(noop)
r_inc = rg.task(inc)
r_add = rg.task(add)


# -- engines ---------------------------------------------------------------------

class Engines:
    """Starts and warms every run engine once; use as a context manager.

    ``only`` restricts which engines are started (default: all of RUN_ENGINES).
    """

    def __init__(self, only: Sequence[str] = RUN_ENGINES, workers: int = WORKERS) -> None:
        self.only = tuple(only)
        self.workers = workers
        self.rhapsody: Any = None
        self.processpool: Any = None
        self.threadpool: Any = None

    def __enter__(self) -> "Engines":
        n = self.workers
        if "rhapsody" in self.only:
            self.rhapsody = rg.LocalBackend(cpus=n).start()
            # warm-up: every worker imports this module and caches the functions
            assert rg.compute([r_noop(i) for i in range(4 * n)], backend=self.rhapsody)[0] \
                == list(range(4 * n))
            assert rg.compute(r_add(r_inc(0), r_noop(1)), backend=self.rhapsody)[0] == 2
        if "processpool" in self.only:
            self.processpool = ProcessPoolExecutor(n)
            _warm_pool(self.processpool, n)
        if "threadpool" in self.only:
            self.threadpool = ThreadPoolExecutor(n)
            _warm_pool(self.threadpool, n)
        if "dask-threads" in self.only:
            import dask
            from dask import delayed
            # the threaded scheduler caches its pool per num_workers: build it now
            assert dask.compute(delayed(add)(delayed(inc)(0), 1), scheduler="threads",
                                num_workers=n)[0] == 2
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.rhapsody is not None:
            self.rhapsody.shutdown()
        if self.processpool is not None:
            self.processpool.shutdown()
        if self.threadpool is not None:
            self.threadpool.shutdown()


def _warm_pool(ex: Any, n: int) -> None:
    futs = [ex.submit(noop, i) for i in range(8 * n)]
    assert [f.result() for f in futs] == list(range(8 * n))
    assert ex.submit(add, ex.submit(inc, 0).result(), 1).result() == 2


# -- run workloads: each returns the value, checked by the caller ------------------------
# End to end = building the engine's graph (or submitting) + running + the values back.

def independent(engine: str, eng: Engines, n: int = INDEPENDENT) -> List[int]:
    """``n`` independent no-op tasks; returns their values."""
    if engine == "rhapsody":
        return rg.compute([r_noop(i) for i in range(n)], backend=eng.rhapsody)[0]
    if engine == "dask-threads":
        import dask
        from dask import delayed
        return list(dask.compute(*[delayed(noop)(i) for i in range(n)],
                                 scheduler="threads", num_workers=eng.workers))
    ex = _executor(engine, eng)
    futs = [ex.submit(noop, i) for i in range(n)]
    return [f.result() for f in futs]


def chain(engine: str, eng: Engines, n: int = CHAIN) -> int:
    """``n`` tasks, each depending on the previous one; returns ``n``."""
    if engine == "rhapsody":
        x = r_inc(0)
        for _ in range(n - 1):
            x = r_inc(x)
        return x.compute(backend=eng.rhapsody)
    if engine == "dask-threads":
        from dask import delayed
        x = delayed(inc)(0)
        for _ in range(n - 1):
            x = delayed(inc)(x)
        return x.compute(scheduler="threads", num_workers=eng.workers)
    ex = _executor(engine, eng)
    v = 0
    for _ in range(n):  # the driver carries each value to the next submit
        v = ex.submit(inc, v).result()
    return v


def reduction(engine: str, eng: Engines, leaves: int = LEAVES) -> int:
    """A binary tree: ``leaves`` no-op leaves, pairwise ``add`` up to one root.

    ``2 * leaves - 1`` tasks; returns ``sum(range(leaves))``. Executors run it level by
    level (each level's values come back to the driver before the next is submitted).
    """
    if engine in ("rhapsody", "dask-threads"):
        if engine == "rhapsody":
            level = [r_noop(i) for i in range(leaves)]
            join = r_add
        else:
            from dask import delayed
            level = [delayed(noop)(i) for i in range(leaves)]
            join = delayed(add)
        while len(level) > 1:
            level = [join(level[k], level[k + 1]) for k in range(0, len(level) - 1, 2)] \
                + ([level[-1]] if len(level) % 2 else [])
        if engine == "rhapsody":
            return level[0].compute(backend=eng.rhapsody)
        return level[0].compute(scheduler="threads", num_workers=eng.workers)
    ex = _executor(engine, eng)
    vals = [f.result() for f in [ex.submit(noop, i) for i in range(leaves)]]
    while len(vals) > 1:
        futs = [ex.submit(add, vals[k], vals[k + 1]) for k in range(0, len(vals) - 1, 2)]
        vals = [f.result() for f in futs] + ([vals[-1]] if len(vals) % 2 else [])
    return vals[0]


def _executor(engine: str, eng: Engines) -> Any:
    ex = {"processpool": eng.processpool, "threadpool": eng.threadpool}.get(engine)
    if ex is None:
        raise ValueError(f"engine {engine!r} is not started (or unknown)")
    return ex


RUNS: Dict[str, Tuple[Callable[..., Any], Callable[[int], Any], int, str]] = {
    # name: (function, expected value for a size, default size, unit)
    "independent": (independent, lambda n: list(range(n)), INDEPENDENT, "task"),
    "chain": (chain, lambda n: n, CHAIN, "hop"),
    "reduction": (reduction, lambda n: n * (n - 1) // 2, LEAVES, "task"),
}


def run_tasks(workload: str, size: int) -> int:
    """How many tasks (the divisor of the per-task figure) a run workload has."""
    return 2 * size - 1 if workload == "reduction" else size


# -- graph construction and ordering ------------------------------------------------------

def build(engine: str, levels: int = LEVELS, width: int = WIDTH) -> List[Any]:
    """``levels`` x ``width`` nodes; node j of level l > 0 reads nodes j and j+1 (mod width)
    of level l-1. Returns the last level (the outputs)."""
    if engine == "rhapsody":
        leaf, join = r_noop, r_add
    elif engine == "dask":
        from dask import delayed
        leaf, join = delayed(noop), delayed(add)
    elif engine == "dict":
        return _build_dict(levels, width)
    else:
        raise ValueError(f"unknown build engine {engine!r}")
    prev = [leaf(j) for j in range(width)]
    for _ in range(1, levels):
        prev = [join(prev[j], prev[(j + 1) % width]) for j in range(width)]
    return prev


def _build_dict(levels: int, width: int) -> List[Any]:
    """The floor: a plain ``{key: (func, dep keys)}`` dict; returns ``[dict]``."""
    g: Dict[Tuple[int, int], Any] = {}
    for j in range(width):
        g[(0, j)] = (noop, ())
    for lv in range(1, levels):
        for j in range(width):
            g[(lv, j)] = (add, ((lv - 1, j), (lv - 1, (j + 1) % width)))
    return [g]


def deps_dict(levels: int = LEVELS, width: int = WIDTH) -> Dict[str, Tuple[str, ...]]:
    """The same graph as ``{key: dependency keys}`` (what graphlib is given)."""
    d: Dict[str, Tuple[str, ...]] = {f"n-0-{j}": () for j in range(width)}
    for lv in range(1, levels):
        for j in range(width):
            d[f"n-{lv}-{j}"] = (f"n-{lv - 1}-{j}", f"n-{lv - 1}-{(j + 1) % width}")
    return d


def dask_graph(levels: int = LEVELS, width: int = WIDTH) -> Dict[str, Any]:
    """The same graph as a dask task graph (``dask._task_spec`` tasks when this dask has
    them, else legacy tuples), converted outside any timing."""
    legacy: Dict[str, Any] = {f"n-0-{j}": (noop, j) for j in range(width)}
    for lv in range(1, levels):
        for j in range(width):
            legacy[f"n-{lv}-{j}"] = (add, f"n-{lv - 1}-{j}", f"n-{lv - 1}-{(j + 1) % width}")
    try:
        from dask._task_spec import convert_legacy_graph
    except ImportError:  # older dask: order() takes legacy tuples directly
        return legacy
    return convert_legacy_graph(legacy)


def order_input(engine: str, levels: int = LEVELS, width: int = WIDTH) -> Any:
    """What each ordering engine is given (built once, outside the timing)."""
    if engine == "rhapsody":
        return build("rhapsody", levels, width)
    if engine == "dask":
        return dask_graph(levels, width)
    if engine == "graphlib":
        return deps_dict(levels, width)
    raise ValueError(f"unknown order engine {engine!r}")


def order(engine: str, graph_input: Any) -> int:
    """Gather + order the graph; returns the number of nodes ordered."""
    if engine == "rhapsody":
        return len(rg.Graph(*graph_input))
    if engine == "dask":
        from dask.order import order as dask_order
        return len(dask_order(graph_input))
    if engine == "graphlib":
        return sum(1 for _ in TopologicalSorter(graph_input).static_order())
    raise ValueError(f"unknown order engine {engine!r}")


# -- first result after import, in a fresh interpreter ---------------------------------------
# Each script prints two numbers: seconds for the import alone, and seconds from before
# the import to the first value in hand. The process's whole wall time (interpreter start
# and exit, worker shutdown included) is measured outside.

_EXECUTOR_STARTUP = """
import time
t0 = time.perf_counter()
from concurrent.futures import {executor}
t1 = time.perf_counter()
def f(x):
    return x + 1
ex = {executor}(2)
assert ex.submit(f, 1).result() == 2
print(t1 - t0, time.perf_counter() - t0)
ex.shutdown()
"""

_STARTUP = {
    "rhapsody": """
import time
t0 = time.perf_counter()
import rhapsody_graph as r
t1 = time.perf_counter()
@r.task
def f(x):
    return x + 1
assert f(1).compute() == 2
print(t1 - t0, time.perf_counter() - t0)
""",
    "processpool": _EXECUTOR_STARTUP.format(executor="ProcessPoolExecutor"),
    "dask-threads": """
import time
t0 = time.perf_counter()
import dask
from dask import delayed
t1 = time.perf_counter()
def f(x):
    return x + 1
assert delayed(f)(1).compute(scheduler="threads", num_workers=2) == 2
print(t1 - t0, time.perf_counter() - t0)
""",
    "threadpool": _EXECUTOR_STARTUP.format(executor="ThreadPoolExecutor"),
}


def startup(engine: str, timeout: float = 60.0) -> Dict[str, float]:
    """Run the engine's one-node script in a fresh ``python -c``.

    Returns ``{"import_s", "first_value_s", "process_s"}``: the import alone, import to
    first value (the bar), and the whole process from spawn to exit.
    """
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _STARTUP[engine]], capture_output=True,
                         text=True, timeout=timeout, cwd=os.path.dirname(os.path.abspath(__file__)))
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"{engine} startup script failed ({out.returncode}):\n{out.stderr}")
    imp, first = (float(x) for x in out.stdout.split()[-2:])
    return {"import_s": imp, "first_value_s": first, "process_s": wall}
