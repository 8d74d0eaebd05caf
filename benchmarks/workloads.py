"""The benchmark workloads, shared by the pytest-benchmark files and ``compare.py``.

Every workload is one function per engine with the same shape, so that the
pytest-benchmark suite (``benchmarks/test_*.py``) and the side-by-side script
(``benchmarks/compare.py``) time exactly the same code.

Engines that run tasks (each one small adapter class below, with the same shape; all
with 2 workers, started and warmed before any timing):

* ``rhapsody``: :class:`rhapsody_graph.LocalBackend` with ``cpus=2`` (two persistent
  worker processes), one ``compute()`` of the whole graph;
* ``rhapsody-unfused``: the same with fusion off (``Session(fuse=False)``: one call
  per node; see :mod:`rhapsody_graph.fusion`);
* ``rhapsody-futures``: the same backend in a :class:`rhapsody_graph.Session`, one
  ``submit`` per task as it is made, a future the input of the tasks that read it
  (the futures path);
* ``processpool`` / ``threadpool``: ``concurrent.futures`` executors of 2; the thread
  pool is the floor (no process boundary, no pickling, no graph);
* ``dask-threads`` / ``dask-sync``: ``dask.delayed`` + the threaded scheduler
  (``num_workers=2``) / the synchronous one;
* ``dask-distributed``: ``dask.delayed`` + ``client.compute`` on a
  ``distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True)``;
  ``dask-futures``: ``client.submit`` chains on the same kind of cluster;
* ``ray``: ``ray.init(num_cpus=2)``, remote functions, ``ray.get``;
* ``parsl-threads`` / ``parsl-htex``: Parsl ``python_app`` on its ThreadPoolExecutor (2
  threads) / HighThroughputExecutor (2 workers, local provider);
* ``rhapsody-py-threads`` / ``rhapsody-py-processes``: RHAPSODY (PyPI ``rhapsody-py``),
  a ``Session`` over ``ConcurrentExecutionBackend`` on a thread / process pool of 2;
* ``asyncflow``: RADICAL AsyncFlow's ``WorkflowEngine`` over its local backend on a
  thread pool of 2.

The first four (``RUN_ENGINES``) are the pytest-benchmark suite's; the peers
(``PEER_ENGINES``) are optional installs (``pip install -e ".[bench]"``).

Engines that build / order a graph: ``rhapsody`` (``@task`` calls, ``Graph(*outputs)``),
``dask`` (``dask.delayed`` calls, ``dask.order.order``), ``graphlib``
(``TopologicalSorter.static_order`` on a prebuilt ``{key: deps}`` dict) and ``dict``
(building that plain dict: the floor for construction).

The task bodies are module-level functions here, so every engine sends them by
reference (``workloads.noop``): nothing engine-specific is pickled by value.
"""
from __future__ import annotations

import asyncio
import gc
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from graphlib import TopologicalSorter
from typing import Any, Callable, Dict, List, Sequence, Tuple

import rhapsody_graph as rg

WORKERS = 2

# sizes (the workloads)
LEVELS, WIDTH = 10, 10_000          # 100,000 nodes, 180,000 edges
INDEPENDENT = 5_000                 # independent no-op nodes
CHAIN = 1_000                       # chain length (hops)
LEAVES = 1_024                      # binary reduction: 2,047 tasks
JOIN = 10_000                       # one node reading 10,000 inputs
HOPS = 100                          # chain20ms: hops of 20 ms each
NAP_S = 0.020                       # each chain20ms hop's own sleep

RUN_ENGINES = ("rhapsody", "processpool", "dask-threads", "threadpool")
BUILD_ENGINES = ("rhapsody", "dask", "dict")
ORDER_ENGINES = ("rhapsody", "dask", "graphlib")
STARTUP_ENGINES = ("rhapsody", "rhapsody-fork", "processpool", "dask-threads", "threadpool",
                   "processpool-forkserver", "processpool-spawn")
MEMORY_ENGINES = ("rhapsody", "dask", "ray", "dict")

# The bars, in microseconds per node / hop (startup: seconds).
BARS = {
    "build": 10.0,
    "order": 10.0,
    "independent": 100.0,
    "chain": 150.0,
    "startup": 0.5,
    "memory": 1024.0,  # bytes per pending node
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


def total(*xs: int) -> int:
    return sum(xs)


def nap_inc(x: int) -> int:
    time.sleep(NAP_S)
    return x + 1


BODIES = (noop, inc, add, total, nap_inc)
r_noop = rg.task(noop)
r_inc = rg.task(inc)
r_add = rg.task(add)
_TASKS = {noop: r_noop, inc: r_inc, add: r_add, total: rg.task(total),
          nap_inc: rg.task(nap_inc)}


def r_call(fn: Callable[..., Any], *args: Any) -> Any:
    """The rhapsody_graph node of body ``fn`` on ``args`` (a workload's ``call``, as nodes)."""
    return _TASKS[fn](*args)


# -- engines: one adapter each, with the same shape ------------------------------------
# An adapter is started once (``start``), warmed, and closed once (``close``). A workload
# is a ``build(call)`` function that makes its tasks with ``call(fn, *args)`` (an arg may
# be the handle of another call: the engine's own dependency when it has one, else the
# driver waits for the value and passes it on) and returns the handles whose values it
# wants; ``run(build)`` returns those values.

Build = Callable[[Callable[..., Any]], List[Any]]


def _value(x: Any) -> Any:
    """The value behind a ``concurrent.futures.Future`` (the driver waits), else ``x``."""
    return x.result() if isinstance(x, Future) else x


def _importable_by_workers() -> None:
    """Let worker processes started from now on import this module (by reference)."""
    here = os.path.dirname(os.path.abspath(__file__))
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if here not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([here] + [p for p in paths if p])


class Adapter:
    """One engine. Subclasses set ``call`` and ``run``, and start/close what they own."""

    def start(self, workers: int) -> None:
        pass

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        raise NotImplementedError

    def run(self, build: Build) -> List[Any]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class Rhapsody(Adapter):
    """rhapsody_graph: ``@task`` nodes, one ``compute()`` on a ``LocalBackend``."""

    def start(self, workers: int) -> None:
        self.backend = rg.LocalBackend(cpus=workers).start()

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return r_call(fn, *args)

    def run(self, build: Build) -> List[Any]:
        return rg.compute(build(self.call), backend=self.backend)[0]

    def close(self) -> None:
        self.backend.shutdown()


class RhapsodyUnfused(Adapter):
    """rhapsody_graph with fusion off (``Session(fuse=False)``): one call per node,
    the whole graph in one ``compute()``, as ``rhapsody`` otherwise."""

    def start(self, workers: int) -> None:
        backend = rg.LocalBackend(cpus=workers).start()
        self.session = rg.Session(backends=[backend], progress=False, fuse=False)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return r_call(fn, *args)

    def run(self, build: Build) -> List[Any]:
        return self.session.compute(build(self.call))[0]

    def close(self) -> None:
        self.session.close()


class RhapsodyFutures(Adapter):
    """rhapsody_graph's futures path: one ``Session.submit`` per task, its inputs the
    futures of the tasks it reads (edges the scheduler keeps; no value comes back to
    the driver until the end)."""

    def start(self, workers: int) -> None:
        self.session = rg.Session(backends=[rg.LocalBackend(cpus=workers)], progress=False)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.session.submit(r_call(fn, *args))

    def run(self, build: Build) -> List[Any]:
        return [f.result() for f in build(self.call)]

    def close(self) -> None:
        self.session.close()


class Pool(Adapter):
    """A ``concurrent.futures`` executor: one ``submit`` per task; the driver carries
    each value to the tasks that read it."""

    def __init__(self, executor: Callable[[int], Executor]) -> None:
        self.executor = executor

    def start(self, workers: int) -> None:
        self.ex = self.executor(workers)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.ex.submit(fn, *map(_value, args))

    def run(self, build: Build) -> List[Any]:
        return [_value(h) for h in build(self.call)]

    def close(self) -> None:
        self.ex.shutdown()


class DaskDelayed(Adapter):
    """``dask.delayed`` calls, one ``dask.compute`` with a local scheduler."""

    def __init__(self, scheduler: str) -> None:
        self.scheduler = scheduler

    def start(self, workers: int) -> None:
        from dask import delayed
        self.delayed = delayed
        self.options = {"scheduler": self.scheduler}
        if self.scheduler == "threads":  # its pool is cached per num_workers
            self.options["num_workers"] = workers

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.delayed(fn)(*args)

    def run(self, build: Build) -> List[Any]:
        import dask
        return list(dask.compute(*build(self.call), **self.options))


class DaskDistributed(DaskDelayed):
    """``dask.delayed`` calls computed on a ``distributed.LocalCluster`` of worker
    processes (``client.compute``); ``futures=True``: ``client.submit`` chains instead."""

    def __init__(self, futures: bool = False) -> None:
        super().__init__("distributed")
        self.futures = futures

    def start(self, workers: int) -> None:
        from distributed import Client, LocalCluster
        super().start(workers)
        _importable_by_workers()
        self.cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                    dashboard_address=":0")
        self.client = Client(self.cluster)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self.futures:
            return self.client.submit(fn, *args, pure=False)
        return super().call(fn, *args)

    def run(self, build: Build) -> List[Any]:
        handles = build(self.call)
        return self.client.gather(handles if self.futures else self.client.compute(handles))

    def close(self) -> None:
        self.client.close()
        self.cluster.close()


class Ray(Adapter):
    """Ray remote functions (an ``ObjectRef`` argument is a dependency), ``ray.get``."""

    def start(self, workers: int) -> None:
        import ray
        _importable_by_workers()
        self.ray = ray
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        self.remote = {fn: ray.remote(fn) for fn in BODIES}

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.remote[fn].remote(*args)

    def run(self, build: Build) -> List[Any]:
        return self.ray.get(build(self.call))

    def close(self) -> None:
        self.ray.shutdown()


class Parsl(Adapter):
    """Parsl ``python_app`` calls (an ``AppFuture`` argument is a dependency) on one
    executor: ``threads`` or ``htex`` (HighThroughputExecutor, local provider)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def start(self, workers: int) -> None:
        import parsl
        from parsl.config import Config
        if self.kind == "threads":
            from parsl.executors import ThreadPoolExecutor as Threads
            executor = Threads(label="threads", max_threads=workers)
        else:
            from parsl.executors import HighThroughputExecutor
            from parsl.providers import LocalProvider
            _importable_by_workers()
            executor = HighThroughputExecutor(
                label="htex", max_workers_per_node=workers, cores_per_worker=1,
                address="127.0.0.1",
                provider=LocalProvider(init_blocks=1, min_blocks=1, max_blocks=1))
        self.rundir = tempfile.mkdtemp(prefix="parsl-bench-")
        self.dfk = parsl.load(Config(executors=[executor], run_dir=self.rundir,
                                     strategy="none"))
        self.apps = {fn: parsl.python_app(fn, data_flow_kernel=self.dfk) for fn in BODIES}

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.apps[fn](*args)

    def run(self, build: Build) -> List[Any]:
        return [_value(h) for h in build(self.call)]

    def close(self) -> None:
        import parsl
        self.dfk.cleanup()
        parsl.clear()
        shutil.rmtree(self.rundir, ignore_errors=True)


class _AsyncAdapter(Adapter):
    """An engine driven from asyncio: one event loop of its own, entered per ``run``
    (handles are asyncio futures, made inside the loop)."""

    def start(self, workers: int) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self.astart(workers))

    async def astart(self, workers: int) -> None:
        raise NotImplementedError

    def run(self, build: Build) -> List[Any]:
        async def gather() -> List[Any]:
            return list(await asyncio.gather(*build(self.call)))
        return self.loop.run_until_complete(gather())

    def close(self) -> None:
        self.loop.run_until_complete(self.aclose())
        self.loop.close()

    async def aclose(self) -> None:
        pass


class RhapsodyPy(_AsyncAdapter):
    """RHAPSODY (PyPI ``rhapsody-py``): a ``Session`` over its ``ConcurrentExecutionBackend``
    on a thread or process pool. It has no task dependencies: a task whose argument is
    another's handle awaits that task first (in the driver's event loop), then is
    submitted with the value, one ``ComputeTask`` per ``submit_tasks``."""

    def __init__(self, executor: Callable[[int], Executor]) -> None:
        self.executor = executor

    async def astart(self, workers: int) -> None:
        from rhapsody.api import ComputeTask, Session
        from rhapsody.backends import ConcurrentExecutionBackend
        self.task = ComputeTask
        backend = await ConcurrentExecutionBackend(self.executor(workers))
        self.work_dir = tempfile.mkdtemp(prefix="rhapsody-py-bench-")  # its session's files
        self.session = Session(backends=[backend], work_dir=self.work_dir)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return asyncio.ensure_future(self._one(fn, args))

    async def _one(self, fn: Callable[..., Any], args: Tuple[Any, ...]) -> Any:
        values = [await a if isinstance(a, asyncio.Future) else a for a in args]
        task = self.task(function=fn, args=tuple(values))
        await self.session.submit_tasks([task])
        return (await task)["return_value"]

    async def aclose(self) -> None:
        await self.session.close()
        shutil.rmtree(self.work_dir, ignore_errors=True)


class AsyncFlow(_AsyncAdapter):
    """RADICAL AsyncFlow (PyPI ``radical-asyncflow``): ``WorkflowEngine.function_task``
    (async bodies; a future argument is a dependency) over its ``LocalExecutionBackend``
    on a ``ThreadPoolExecutor`` (its default executor)."""

    async def astart(self, workers: int) -> None:
        from radical.asyncflow import LocalExecutionBackend, WorkflowEngine
        backend = await LocalExecutionBackend(ThreadPoolExecutor(workers))
        self.work_dir = tempfile.mkdtemp(prefix="asyncflow-bench-")  # its session's files
        self.flow = await WorkflowEngine.create(backend=backend, work_dir=self.work_dir)
        self.apps = {fn: self.flow.function_task(_async_twin(fn)) for fn in BODIES}

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.apps[fn](*args)

    async def aclose(self) -> None:
        await self.flow.shutdown()
        shutil.rmtree(self.work_dir, ignore_errors=True)


def _async_twin(fn: Callable[..., Any]) -> Callable[..., Any]:
    async def twin(*args: Any) -> Any:
        return fn(*args)
    twin.__name__ = twin.__qualname__ = fn.__name__
    return twin


ADAPTERS: Dict[str, Callable[[], Adapter]] = {
    "rhapsody": Rhapsody,
    "rhapsody-futures": RhapsodyFutures,
    "rhapsody-unfused": RhapsodyUnfused,
    "processpool": lambda: Pool(ProcessPoolExecutor),
    "dask-threads": lambda: DaskDelayed("threads"),
    "threadpool": lambda: Pool(ThreadPoolExecutor),
    "dask-sync": lambda: DaskDelayed("sync"),
    "dask-distributed": DaskDistributed,
    "dask-futures": lambda: DaskDistributed(futures=True),
    "ray": Ray,
    "parsl-threads": lambda: Parsl("threads"),
    "parsl-htex": lambda: Parsl("htex"),
    "rhapsody-py-threads": lambda: RhapsodyPy(ThreadPoolExecutor),
    "rhapsody-py-processes": lambda: RhapsodyPy(ProcessPoolExecutor),
    "asyncflow": AsyncFlow,
}
PEER_ENGINES = tuple(e for e in ADAPTERS if e not in RUN_ENGINES)
ALL_ENGINES = tuple(sorted(set(ADAPTERS) | set(BUILD_ENGINES + ORDER_ENGINES + MEMORY_ENGINES
                                               + STARTUP_ENGINES)))


def _warm(build_call: Callable[..., Any], n: int) -> List[Any]:
    return [build_call(add, build_call(inc, 0), 1)] + [build_call(noop, i) for i in range(4 * n)]


def reason(exc: BaseException) -> str:
    """One line for the table: 'not installed (...)' or 'failed: ...'."""
    if isinstance(exc, ImportError):
        return f"not installed ({exc})"
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"failed: {type(exc).__name__}: {text[:160]}"


class Engines:
    """Starts and warms run engines once; use as a context manager.

    ``only`` restricts which engines are started (default: RUN_ENGINES, the
    pytest-benchmark suite's). With ``strict=False`` an engine that cannot be imported
    or started is recorded in ``failed`` (engine -> reason) instead of raising;
    ``start_s`` holds each started engine's start + warm-up seconds.
    """

    def __init__(self, only: Sequence[str] = RUN_ENGINES, workers: int = WORKERS,
                 strict: bool = True) -> None:
        self.only = tuple(only)
        self.workers = workers
        self.strict = strict
        self.adapters: Dict[str, Adapter] = {}
        self.failed: Dict[str, str] = {}
        self.start_s: Dict[str, float] = {}

    def __enter__(self) -> "Engines":
        for name in self.only:
            t0 = time.perf_counter()
            adapter = self.adapters[name] = ADAPTERS[name]()
            try:
                adapter.start(self.workers)
                assert adapter.run(lambda call: _warm(call, self.workers)) \
                    == [2] + list(range(4 * self.workers))
            except Exception as exc:
                if self.strict:
                    raise
                self.failed[name] = reason(exc)
                self._close(name)
                continue
            self.start_s[name] = time.perf_counter() - t0
        return self

    def __exit__(self, *exc: Any) -> None:
        for name in list(self.adapters):
            self._close(name)

    def _close(self, name: str) -> None:
        adapter = self.adapters.pop(name, None)
        try:
            adapter.close()
        except Exception as exc:  # a half-started engine: report, close the others
            print(f"{name}: close failed: {reason(exc)}", file=sys.stderr)

    def run(self, engine: str, build: Build) -> List[Any]:
        """The values of the handles ``build`` returns, computed on ``engine``."""
        adapter = self.adapters.get(engine)
        if adapter is None:
            raise ValueError(f"engine {engine!r} is not started: "
                             f"{self.failed.get(engine, 'not in only=')}")
        return adapter.run(build)


# -- run workloads: each returns the value, checked by the caller ------------------------
# End to end = building the engine's graph (or submitting) + running + the values back.

def independent(engine: str, eng: Engines, n: int = INDEPENDENT) -> List[int]:
    """``n`` independent no-op tasks; returns their values."""
    return eng.run(engine, lambda call: [call(noop, i) for i in range(n)])


def chain(engine: str, eng: Engines, n: int = CHAIN, body: Callable[[int], int] = inc) -> int:
    """``n`` tasks, each reading the previous one's value; returns ``n``. Executors
    without dependencies carry each value through the driver to the next submit."""
    def build(call: Callable[..., Any]) -> List[Any]:
        x = call(body, 0)
        for _ in range(n - 1):
            x = call(body, x)
        return [x]
    return eng.run(engine, build)[0]


def chain20ms(engine: str, eng: Engines, hops: int = HOPS) -> int:
    """A chain of ``hops`` tasks that each sleep 20 ms: wall / hops - 20 ms is the
    per-hop delay of waking the next task (a polling engine shows its period)."""
    return chain(engine, eng, hops, body=nap_inc)


def tree(call: Callable[..., Any], leaves: int = LEAVES) -> Any:
    """A binary tree made with ``call(fn, *args)``: ``leaves`` no-op leaves, pairwise
    ``add`` up to one root, returned."""
    level = [call(noop, i) for i in range(leaves)]
    while len(level) > 1:
        level = [call(add, level[k], level[k + 1]) for k in range(0, len(level) - 1, 2)] \
            + ([level[-1]] if len(level) % 2 else [])
    return level[0]


def reduction(engine: str, eng: Engines, leaves: int = LEAVES) -> int:
    """A binary tree (:func:`tree`): ``2 * leaves - 1`` tasks; returns
    ``sum(range(leaves))``. Executors without dependencies wait for each pair's values
    before submitting its ``add``.
    """
    return eng.run(engine, lambda call: [tree(call, leaves)])[0]


def join(engine: str, eng: Engines, n: int = JOIN) -> int:
    """``n`` independent no-ops feeding one node that sums them (one node, ``n``
    inputs); returns ``sum(range(n))``."""
    return eng.run(engine, lambda call: [call(total, *[call(noop, i) for i in range(n)])])[0]


RUNS: Dict[str, Tuple[Callable[..., Any], Callable[[int], Any], int, str]] = {
    # name: (function, expected value for a size, default size, unit)
    "independent": (independent, lambda n: list(range(n)), INDEPENDENT, "task"),
    "chain": (chain, lambda n: n, CHAIN, "hop"),
    "reduction": (reduction, lambda n: n * (n - 1) // 2, LEAVES, "task"),
    "join": (join, lambda n: n * (n - 1) // 2, JOIN, "input"),
    "chain20ms": (chain20ms, lambda n: n, HOPS, "hop"),
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
    elif engine == "ray":  # a Ray DAG: .bind() builds, nothing runs
        import ray
        leaf, join = ray.remote(noop).bind, ray.remote(add).bind
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


def pending(engine: str, levels: int = LEVELS, width: int = WIDTH) -> Any:
    """What an engine holds in the driver for a graph it was handed but has not run:
    rhapsody_graph, the ``@task`` nodes and the ``Graph`` made of them (what ``compute``
    orders and schedules); Dask, the ``delayed`` objects and their materialized task
    graph (``collections_to_expr(...).__dask_graph__()``, as ``dask.persist`` makes);
    Ray, a DAG of
    ``.bind()`` nodes; the floor, a plain ``{key: (func, dep keys)}`` dict."""
    outputs = build(engine, levels, width)
    if engine == "rhapsody":
        return outputs, rg.Graph(*outputs)
    if engine == "dask":
        from dask.base import collections_to_expr
        return outputs, collections_to_expr(outputs).__dask_graph__()
    return outputs


def memory(engine: str, levels: int = LEVELS, width: int = WIDTH) -> float:
    """Peak bytes per node that the driver allocates (``tracemalloc``, Python's own
    allocator, from zero) while it builds ``levels * width`` pending nodes with
    :func:`pending`, after a small untimed build has done the imports and caches.
    The same graph and the same counter for every engine; worker processes are not
    counted (none is started)."""
    pending(engine, 2, 8)
    gc.collect()
    tracemalloc.start()
    try:
        held = pending(engine, levels, width)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    del held
    return peak / (levels * width)


# -- first result after import, in a fresh interpreter ---------------------------------------
# Each script prints two numbers: seconds for the import alone, and seconds from before
# the import to the first value in hand. The process's whole wall time (interpreter start
# and exit, worker shutdown included) is measured outside.

_EXECUTOR_STARTUP = """
import time
t0 = time.perf_counter()
{imports}
t1 = time.perf_counter()
def f(x):
    return x + 1
ex = {pool}
assert ex.submit({call}).result() == 2
print(t1 - t0, time.perf_counter() - t0)
ex.shutdown()
"""


def _executor_startup(executor: str, method: str = "") -> str:
    """The start-up script of a ``concurrent.futures`` pool of 2. With a multiprocessing
    start ``method`` ("forkserver", Python 3.14's default on Linux; "spawn", macOS's and
    Windows') its workers are fresh interpreters, as rhapsody_graph's are; those cannot
    import a function of a ``python -c`` script, so the task is then the builtin ``abs``,
    sent by reference."""
    if not method:
        return _EXECUTOR_STARTUP.format(imports=f"from concurrent.futures import {executor}",
                                        pool=f"{executor}(2)", call="f, 1")
    return _EXECUTOR_STARTUP.format(
        imports=f"import multiprocessing\nfrom concurrent.futures import {executor}",
        pool=f'{executor}(2, mp_context=multiprocessing.get_context("{method}"))',
        call="abs, -2")


_RHAPSODY_STARTUP = """
import time
t0 = time.perf_counter()
import rhapsody_graph as r
t1 = time.perf_counter()
@r.task
def f(x):
    return x + 1
assert f(1).compute({backend}) == 2
print(t1 - t0, time.perf_counter() - t0)
"""

_STARTUP = {
    "rhapsody": _RHAPSODY_STARTUP.format(backend=""),
    "rhapsody-fork": _RHAPSODY_STARTUP.format(
        backend='backend=r.LocalBackend(start_method="fork")'),
    "processpool": _executor_startup("ProcessPoolExecutor"),
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
    "threadpool": _executor_startup("ThreadPoolExecutor"),
    "processpool-forkserver": _executor_startup("ProcessPoolExecutor", "forkserver"),
    "processpool-spawn": _executor_startup("ProcessPoolExecutor", "spawn"),
}


_STARTED: set = set()  # engines whose script has run once here: their bytecode is cached


def startup(engine: str, timeout: float = 60.0) -> Dict[str, float]:
    """Run the engine's one-node script in a fresh ``python -c``, with the bytecode
    caches an installed package has: without ``PYTHONDONTWRITEBYTECODE`` (a checkout
    installed in editable mode under it compiles its modules on every start, which
    an installed wheel never does), after one untimed run that writes them.

    Returns ``{"import_s", "first_value_s", "process_s"}``: the import alone, import to
    first value (the bar), and the whole process from spawn to exit.
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    run = [sys.executable, "-c", _STARTUP[engine]]
    here = os.path.dirname(os.path.abspath(__file__))
    if engine not in _STARTED:
        subprocess.run(run, capture_output=True, timeout=timeout, cwd=here, env=env)
        _STARTED.add(engine)
    t0 = time.perf_counter()
    out = subprocess.run(run, capture_output=True, text=True, timeout=timeout, cwd=here, env=env)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"{engine} startup script failed ({out.returncode}):\n{out.stderr}")
    imp, first = (float(x) for x in out.stdout.split()[-2:])
    return {"import_s": imp, "first_value_s": first, "process_s": wall}
