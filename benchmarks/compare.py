"""Side by side: every workload on every engine in one run, with ratios.

    python benchmarks/compare.py                  # all workloads, 4 repeats
    python benchmarks/compare.py --repeats 6 --workloads independent chain
    python benchmarks/compare.py --repeats 2 --rounds 3   # engines in turn, three times
    python benchmarks/compare.py --quick          # smaller sizes, a smoke run
    python benchmarks/compare.py --chart docs/performance.png   # and draw the bar chart
    python benchmarks/compare.py --engines ray parsl-htex --workloads chain20ms --hops 50

Prints wall microseconds per task (per node for build/order, per hop for the chain, per
input for the join, per-hop delay beyond the 20 ms sleep for chain20ms; bytes per
pending node for memory; seconds for startup), the median of ``--repeats`` runs, and
each engine's ratio to rhapsody_graph (peer / rhapsody: > 1 means rhapsody_graph is
faster). The workloads and engines are the ones in ``workloads.py``, the same code the
pytest-benchmark suite times.

Run engines are measured one at a time, all with the same worker count, each in an
interpreter of its own (spawned for it): it is started and warmed, runs every
workload, and is shut down before the next starts, so no engine's idle processes
share the cores with another's timing, and none is timed beside the modules and
objects another engine (or the build, order and memory workloads) left in the
process, which Python's cyclic collector would walk on its full passes (importing
Ray, Dask ``distributed`` and Parsl alone made a thread pool's futures 2.5x slower
here). Each workload gets
untimed warm-up runs, the first at 1/10 size, which estimate its cost: a size whose
``--repeats`` runs would take over ``--budget`` seconds is cut to fit (the table says
"capped at N"), and the last warm-up runs at the size then measured. An
engine that is not installed, fails to start or fails a workload is listed with the
reason. rhapsody_graph is measured again after the peers and the ratio of its two
medians printed (far from 1: the machine's speed changed during the run, and the ratios
with it). With ``--rounds N`` every run engine is measured N times in turn and the
median is taken over all its samples, so a slow spell weighs on each engine's figure
alike. Child processes still alive at the end are listed.
"""
from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import platform
import signal
import statistics
import sys
import time
from typing import Any, Dict, List, Optional, Union

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import workloads as w  # noqa: E402

ALL = ("build", "order", "memory", "independent", "chain", "reduction", "join", "chain20ms",
       "startup")
RUN_KINDS = ("independent", "chain", "reduction", "join", "chain20ms")
Samples = Union[List[float], str]  # the per-unit samples, or why there are none


def _time(fn, *args) -> tuple:
    gc.collect()
    t0 = time.perf_counter()
    value = fn(*args)
    return time.perf_counter() - t0, value


def measure_graph(kind: str, repeats: int, levels: int, width: int,
                  engines: List[str]) -> Dict[str, List[float]]:
    nodes = levels * width
    out: Dict[str, List[float]] = {}
    names = w.BUILD_ENGINES if kind == "build" else w.ORDER_ENGINES
    for engine in [e for e in names if not engines or e in engines]:
        samples = []
        try:
            graph_input = w.order_input(engine, levels, width) if kind == "order" else None
            for _ in range(repeats):
                if kind == "build":
                    dt, value = _time(w.build, engine, levels, width)
                    del value
                else:
                    dt, n = _time(w.order, engine, graph_input)
                    assert n == nodes, (engine, n)
                samples.append(dt / nodes * 1e6)
        except Exception as exc:  # not installed, or failed: reported, never dropped
            out[engine] = w.reason(exc)
            continue
        del graph_input
        out[engine] = samples
        _progress(kind, engine, samples)
    return out


def _timed(workload: str, engine: str, eng: w.Engines, size: int) -> float:
    """Seconds for one run of ``workload`` at ``size``, its value checked."""
    fn, expected, _default, _unit = w.RUNS[workload]
    dt, value = _time(fn, engine, eng, size)
    if value != expected(size):
        raise AssertionError(f"{workload} on {engine} returned a wrong value")
    return dt


def _per_unit_us(workload: str, seconds: float, size: int) -> float:
    per = seconds / w.run_tasks(workload, size)
    return (per - w.NAP_S if workload == "chain20ms" else per) * 1e6


def fit(workload: str, engine: str, eng: w.Engines, size: int, repeats: int,
        budget: float) -> int:
    """Untimed warm-up runs, from 1/10 size: the size (at most ``size``) whose
    ``repeats`` timed runs fit the budget. A run at each size tried checks the estimate
    (a per-task cost that grows with the graph makes the first one low); the last run is
    at the size returned, so it is that size's warm-up."""
    used = max(2, size // 10)
    seconds = _timed(workload, engine, eng, used)
    for _ in range(4):
        target = max(2, min(size, int(used * budget / (repeats * seconds))))
        if target == used or (target < used and seconds * repeats <= 1.5 * budget):
            break
        used = target
        seconds = _timed(workload, engine, eng, used)
    return used


def measure_run(workload: str, engine: str, eng: w.Engines, size: int, repeats: int,
                budget: float) -> tuple:
    """``(samples or reason, size measured)``: µs per unit, ``repeats`` timed runs."""
    try:
        used = fit(workload, engine, eng, size, repeats, budget)
        samples = [_per_unit_us(workload, _timed(workload, engine, eng, used), used)
                   for _ in range(repeats)]
    except Exception as exc:  # reported in the table, never dropped
        return w.reason(exc), size
    _progress(f"{workload}@{used}", engine, samples)
    return samples, used


def measure_engine(engine: str, kinds: List[str], sizes: Dict[str, int], repeats: int,
                   budget: float, workers: int, out: dict) -> None:
    """Start ``engine``, run every workload of ``kinds`` on it, shut it down. Fills
    ``out``: results, notes (sizes cut to the budget), join linearity, start seconds."""
    with w.Engines([engine], workers=workers, strict=False) as eng:
        if engine in eng.failed:
            for kind in kinds:
                out["results"][kind][engine] = eng.failed[engine]
            print(f"  .. {engine}: {eng.failed[engine]}", file=sys.stderr, flush=True)
            return
        out["start_s"][engine] = eng.start_s[engine]
        for kind in kinds:
            samples, used = measure_run(kind, engine, eng, sizes[kind], repeats, budget)
            out["results"][kind][engine] = samples
            if used < sizes[kind]:
                out["notes"][kind][engine] = f"capped at {used:,} (time budget)"
            if kind == "join" and not isinstance(samples, str):
                quarter, _ = measure_run(kind, engine, eng, max(2, used // 4), repeats,
                                         budget)
                out["linearity"][engine] = (quarter, samples, used)


def measure_engine_apart(engine: str, kinds: List[str], sizes: Dict[str, int], repeats: int,
                         budget: float, workers: int) -> dict:
    """:func:`measure_engine` in a new interpreter; returns what it filled in ``out``."""
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_measure_child,
                        args=(send, engine, kinds, sizes, repeats, budget, workers))
    child.start()
    send.close()
    try:
        part = receive.recv()
    except EOFError:
        child.join()
        part = _empty_part(kinds)
        for kind in kinds:
            part["results"][kind][engine] = f"failed: its process exited {child.exitcode}"
    except BaseException:  # Ctrl-C: the engine is closed in its process, then all of it ends
        _stop(child)
        raise
    child.join()
    return part


def _stop(child: "multiprocessing.process.BaseProcess", grace: float = 60.0) -> None:
    """Stop an engine's process (its own process group, so a terminal's Ctrl-C
    reaches only this one: the engine's own helpers, Parsl's interchange, stay up for
    its close), give it ``grace`` seconds to close the engine, then kill its group."""
    if child.pid is None:
        return
    try:
        os.kill(child.pid, signal.SIGTERM)  # SystemExit there (SIGINT may be ignored)
    except ProcessLookupError:
        pass
    child.join(grace)
    try:
        os.killpg(child.pid, signal.SIGKILL)  # what the engine left in its group
    except (ProcessLookupError, PermissionError):
        pass
    child.join()


def _empty_part(kinds: List[str]) -> dict:
    """What :func:`measure_engine` fills for one engine, before it does."""
    return {"results": {k: {} for k in kinds}, "notes": {k: {} for k in kinds},
            "linearity": {}, "start_s": {}}


def _measure_child(send: "multiprocessing.connection.Connection", engine: str,
                   kinds: List[str], sizes: Dict[str, int], repeats: int, budget: float,
                   workers: int) -> None:
    os.setpgid(0, 0)  # its own group: see _stop
    signal.signal(signal.SIGTERM, _exit_on_signal)  # closes the engine on the way out
    _end_when_parent_dies()
    part = _empty_part(kinds)
    measure_engine(engine, kinds, sizes, repeats, budget, workers, part)
    send.send(part)


def _end_when_parent_dies() -> None:
    """Linux: SIGTERM this process if the one that started it dies (a SIGKILL there
    cannot stop the engine): it closes its engine and exits."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the parent's handlers must do
        return
    if os.getppid() == 1:  # it died already
        os.kill(os.getpid(), signal.SIGTERM)


def _merge(out: dict, part: dict) -> None:
    """Add one engine's measurements (one round) to ``out``: its samples join those of
    earlier rounds; a round that failed leaves the reason, not the other rounds' samples."""
    for kind, per_engine in part["results"].items():
        into = out["results"].setdefault(kind, {})
        for engine, samples in per_engine.items():
            into[engine] = _pool(into.get(engine), samples)
    for kind, per_engine in part["notes"].items():
        out["notes"].setdefault(kind, {}).update(per_engine)
    for engine, (quarter, full, used) in part["linearity"].items():
        earlier = out["linearity"].get(engine)
        if earlier is not None and earlier[2] == used:
            quarter, full = _pool(earlier[0], quarter), _pool(earlier[1], full)
        out["linearity"][engine] = (quarter, full, used)
    for engine, seconds in part["start_s"].items():
        out["start_s"].setdefault(engine, seconds)


def _pool(earlier: Optional[Samples], samples: Samples) -> Samples:
    """The samples of one more round added to the earlier rounds'; a failure's reason,
    once given, is kept."""
    if isinstance(earlier, str):
        return earlier
    if earlier is None or isinstance(samples, str):
        return samples
    return earlier + samples


def measure_startup(repeats: int, engines: List[str]) -> Dict[str, Dict[str, List[float]]]:
    out: Dict[str, Dict[str, List[float]]] = {}
    for engine in [e for e in w.STARTUP_ENGINES if not engines or e in engines]:
        try:
            runs = [w.startup(engine) for _ in range(repeats)]
        except Exception as exc:  # not installed, or failed: reported, never dropped
            out[engine] = w.reason(exc)
            continue
        out[engine] = {k: [r[k] for r in runs] for k in runs[0]}
        _progress("startup", engine, out[engine]["first_value_s"])
    return out


def measure_memory(levels: int, width: int, engines: List[str]) -> Dict[str, Samples]:
    """Bytes per pending node (``workloads.memory``: one measurement, it barely varies)."""
    out: Dict[str, Samples] = {}
    for engine in [e for e in w.MEMORY_ENGINES if not engines or e in engines]:
        try:
            out[engine] = [w.memory(engine, levels, width)]
        except Exception as exc:
            out[engine] = w.reason(exc)
            continue
        _progress("memory", engine, out[engine])
    return out


HELPERS = {"resource_tracker": "multiprocessing's resource tracker",
           "os.killpg": "rhapsody_graph's watchdog"}  # both exit with this process


def leftovers() -> List[str]:
    """Child processes of this one still alive (engines should have stopped theirs);
    the two helpers that end with this process are named as such."""
    try:
        import psutil
    except ImportError as exc:
        return [f"not checked: psutil not installed ({exc})"]
    time.sleep(1.0)  # let exiting workers go
    alive = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
            line = " ".join(child.cmdline())
        except psutil.NoSuchProcess:
            continue
        helper = next((name for key, name in HELPERS.items() if key in line), None)
        alive.append(f"{child.pid} ({helper}, exits with this process)" if helper
                     else f"{child.pid} {line[:100]}")
    return alive


def _progress(workload: str, engine: str, samples: List[float]) -> None:
    print(f"  .. {workload:<12} {engine:<22} " + " ".join(f"{s:.4g}" for s in samples),
          file=sys.stderr, flush=True)


def _fmt(x: float) -> str:
    if x < 1:
        return f"{x:.3f}"
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def table(results: Dict[str, Dict[str, Samples]], units: Dict[str, str],
          notes: Dict[str, Dict[str, str]]) -> str:
    """Markdown: one row per workload and engine; an engine without figures shows why."""
    lines = ["| workload | engine | median | min | max | ratio to rhapsody_graph | bar / note |",
             "|---|---|---:|---:|---:|---:|---|"]
    for workload, per_engine in results.items():
        ours = per_engine.get("rhapsody")
        base = statistics.median(ours) if isinstance(ours, list) else None
        bar = w.BARS.get(workload)
        for engine, samples in per_engine.items():
            note = notes.get(workload, {}).get(engine, "")
            if isinstance(samples, str):
                lines.append(f"| {workload} ({units[workload]}) | {engine} | {samples} "
                             f"| | | - | {note} |")
                continue
            med = statistics.median(samples)
            ratio = f"{med / base:.2f}x" if base else "-"
            if engine == "rhapsody" and bar is not None:
                unit = {"startup": "s", "memory": "B"}.get(workload, "us")
                note = f"<= {bar:g} {unit}: {'met' if med <= bar else 'MISSED'}"
            lines.append(f"| {workload} ({units[workload]}) | {engine} | {_fmt(med)} | "
                         f"{_fmt(min(samples))} | {_fmt(max(samples))} | {ratio} | {note} |")
    return "\n".join(lines)


def drift(first: Dict[str, Dict[str, Samples]], again: Dict[str, Dict[str, Samples]]) -> str:
    """Per workload, rhapsody_graph's median at the end over its median at the start."""
    parts = []
    for kind, per in again.items():
        start, end = first[kind].get("rhapsody"), per.get("rhapsody")
        if isinstance(start, list) and isinstance(end, list):
            parts.append(f"{kind} {statistics.median(end) / statistics.median(start):.2f}")
    return ", ".join(parts)


def linearity_table(linearity: Dict[str, tuple]) -> str:
    """Per-input cost of the join at a quarter of the inputs and at all of them."""
    lines = ["| engine | inputs | us/input at 1/4 | us/input | ratio (1 = linear) |",
             "|---|---:|---:|---:|---:|"]
    for engine, (quarter, full, n) in linearity.items():
        if isinstance(quarter, str):
            lines.append(f"| {engine} | {n:,} | {quarter} | | |")
            continue
        q, f = statistics.median(quarter), statistics.median(full)
        lines.append(f"| {engine} | {n:,} | {_fmt(q)} | {_fmt(f)} | {f / q:.2f} |")
    return "\n".join(lines)


def chart(results: Dict[str, Dict[str, Samples]], units: Dict[str, str], path: str,
          subtitle: str) -> None:
    """One group of bars per workload (its median per engine), log scale: lower is
    better. Engines without figures are left out of the chart (the table says why)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    numbers = {k: {e: statistics.median(v) for e, v in per.items() if isinstance(v, list)}
               for k, per in results.items() if k != "startup"}
    workloads = [k for k in numbers if numbers[k]]
    if not workloads:
        print(f"\nno chart written to {path}: start-up is a table only, and nothing else ran")
        return
    engines = sorted({e for k in workloads for e in numbers[k]},
                     key=lambda e: (e != "rhapsody", e))
    palette = plt.get_cmap("tab20").colors
    peers = [c for i, c in enumerate(palette) if i not in (6, 7)]  # tab20's reds
    colour = {e: "#d62728" if e == "rhapsody" else peers[i % len(peers)]
              for i, e in enumerate(engines)}
    width = 0.85 / max(len(numbers[k]) for k in workloads)
    fig, ax = plt.subplots(figsize=(2.5 + 1.7 * len(workloads), 5.2))
    for j, k in enumerate(workloads):  # each group: its own engines, centred on its tick
        present = [e for e in engines if e in numbers[k]]
        for i, e in enumerate(present):
            x = j + (i - (len(present) - 1) / 2) * width
            ax.bar(x, max(numbers[k][e], 1e-2), width, color=colour[e])
    ax.set_yscale("log")
    ax.set_xticks(range(len(workloads)))
    ax.set_xticklabels([f"{k}\n({units[k]})".replace(", ", ",\n", 1) for k in workloads],
                       fontsize=7)
    ax.set_ylabel("cost per unit under each group (log scale; lower is better)")
    ax.set_title(f"rhapsody_graph beside its peers, one run ({subtitle})", fontsize=10)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colour[e]) for e in engines]
    ax.legend(handles, ["rhapsody_graph" if e == "rhapsody" else e for e in engines],
              fontsize=7, ncol=1, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _exit_on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # an engine's process is stopped on the way out


def main(argv: Optional[List[str]] = None) -> int:
    # the engines run in process groups of their own (see _stop): what ends this one
    # (timeout's SIGTERM, a closed terminal's SIGHUP) stops the engine's first
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) == signal.SIG_DFL:
            signal.signal(sig, _exit_on_signal)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=4, help="timed runs per engine (median)")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure the run engines this many times in turn (a round: each "
                        "engine once, in an interpreter of its own) and pool their samples: "
                        "a slow spell of the machine then falls on every engine, not on the "
                        "one it ran beside")
    p.add_argument("--graph-repeats", type=int, default=None,
                   help="timed runs for build/order (default: --repeats, at most 3)")
    p.add_argument("--workloads", nargs="+", choices=ALL, default=list(ALL))
    p.add_argument("--engines", nargs="+", default=[], choices=w.ALL_ENGINES,
                   help="restrict to these engines (rhapsody is always kept for the ratios)")
    p.add_argument("--workers", type=int, default=w.WORKERS)
    p.add_argument("--hops", type=int, default=None,
                   help=f"chain20ms length (default {w.HOPS}, --quick {w.HOPS // 10})")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds per engine and workload for the timed runs; larger sizes "
                        "are cut to fit (default 15, --quick 3)")
    p.add_argument("--quick", action="store_true", help="1/10 sizes: a smoke run")
    p.add_argument("--json", metavar="PATH", help="also write the raw samples here")
    p.add_argument("--chart", metavar="PATH",
                   help="also draw the medians as a bar chart (PNG or SVG, matplotlib)")
    a = p.parse_args(argv)

    engines = sorted(set(a.engines) | {"rhapsody"}) if a.engines else []
    scale = 10 if a.quick else 1
    budget = a.budget or (3.0 if a.quick else 15.0)
    levels, width = w.LEVELS, w.WIDTH // scale
    sizes = {"independent": w.INDEPENDENT // scale, "chain": w.CHAIN // scale,
             "reduction": w.LEAVES // scale, "join": w.JOIN // scale,
             "chain20ms": a.hops or w.HOPS // scale}
    graph_repeats = a.graph_repeats or min(a.repeats, 3)
    nodes = f"{levels * width:,} nodes"
    units = {"build": f"us/node, {nodes}", "order": f"us/node, {nodes}",
             "memory": f"bytes/node, {nodes} pending",
             "independent": f"us/task, {sizes['independent']:,} no-ops",
             "chain": f"us/hop, {sizes['chain']:,} steps",
             "reduction": f"us/task, {2 * sizes['reduction'] - 1:,} tasks",
             "join": f"us/input, {sizes['join']:,} inputs",
             "chain20ms": f"us/hop over 20 ms, {sizes['chain20ms']:,} hops",
             "startup": "s, import to first value"}
    results: Dict[str, Dict[str, Samples]] = {}
    extra: Dict[str, Dict[str, Dict[str, List[float]]]] = {}
    out = {"results": results, "notes": {k: {} for k in RUN_KINDS}, "linearity": {},
           "start_s": {}}

    for kind in ("build", "order"):
        if kind in a.workloads:
            results[kind] = measure_graph(kind, graph_repeats, levels, width, engines)
    if "memory" in a.workloads:
        results["memory"] = measure_memory(levels, width, engines)
    run_kinds = [k for k in RUN_KINDS if k in a.workloads]
    for kind in run_kinds:
        results[kind] = {}
    if run_kinds:
        run_engines = [e for e in w.ADAPTERS if not engines or e in engines]
        for _ in range(a.rounds):
            for engine in run_engines:
                _merge(out, measure_engine_apart(engine, run_kinds, sizes, a.repeats, budget,
                                                 a.workers))
        if len(run_engines) > 1:  # the machine may have changed while the peers ran
            out["drift"] = measure_engine_apart("rhapsody", run_kinds, sizes, a.repeats,
                                                budget, a.workers)["results"]
    if "startup" in a.workloads:
        st = measure_startup(a.repeats, engines)
        results["startup"] = {e: v if isinstance(v, str) else v["first_value_s"]
                              for e, v in st.items()}
        extra["startup"] = st

    rounds = f" x {a.rounds} rounds" if a.rounds > 1 and run_kinds else ""
    print(f"\nrhapsody_graph benchmarks: {platform.python_implementation()} "
          f"{platform.python_version()}, {os.cpu_count()} CPUs, {a.workers} workers, "
          f"median of {a.repeats}{rounds} (build/order: {graph_repeats}), {budget:g} s budget per "
          f"engine and workload\n{w.describe()}\n")
    print(table(results, units, out["notes"]))
    if out["linearity"]:
        print("\njoin: per-input cost at a quarter of the inputs and at all of them:")
        print(linearity_table(out["linearity"]))
    if out.get("drift"):
        print("\nrhapsody_graph measured again after the peers (median at the end / at the "
              "start; far from 1: the machine's speed changed during the run): " + drift(
                  results, out["drift"]))
    if out["start_s"]:
        print("\nengine start + warm-up (s, before any timing): " + ", ".join(
            f"{e} {s:.2f}" for e, s in out["start_s"].items()))
    if "startup" in extra:
        print("\nfirst result in a fresh process (medians, seconds):")
        print("| engine | import | import to first value | whole process |")
        print("|---|---:|---:|---:|")
        for e, v in extra["startup"].items():
            if isinstance(v, str):
                print(f"| {e} | {v} | | |")
                continue
            print(f"| {e} | {statistics.median(v['import_s']):.3f} | "
                  f"{statistics.median(v['first_value_s']):.3f} | "
                  f"{statistics.median(v['process_s']):.3f} |")
    if a.json:  # first: what was measured is kept whatever fails below
        with open(a.json, "w") as f:
            json.dump({"results": results, "startup": extra.get("startup"), "units": units,
                       "notes": out["notes"], "start_s": out["start_s"],
                       "linearity": out["linearity"], "drift": out.get("drift"),
                       "repeats": a.repeats, "rounds": a.rounds,
                       "graph_repeats": graph_repeats, "budget_s": budget}, f, indent=1)
    alive = leftovers()
    print("\nchild processes left at exit: " + ("; ".join(alive) if alive else "none"))
    if a.chart:
        chart(results, units, a.chart, f"{os.cpu_count()} CPUs, {a.workers} workers, "
                                       f"median of {a.repeats}{rounds}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
