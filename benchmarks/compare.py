"""Side by side: every workload on every engine in one run, with ratios.

    python benchmarks/compare.py                  # all workloads, 4 repeats
    python benchmarks/compare.py --repeats 6 --workloads independent chain
    python benchmarks/compare.py --quick          # smaller sizes, a smoke run
    python benchmarks/compare.py --chart docs/performance.png   # and draw the bar chart

Prints wall microseconds per task (per node for build/order, per hop for the chain;
seconds for startup), the median of ``--repeats`` runs, and each engine's ratio to
rhapsody_graph (peer / rhapsody: > 1 means rhapsody_graph is faster). The workloads
are the ones in ``workloads.py``, the same code the pytest-benchmark suite times.
Run engines are started and warmed once, before anything is timed, and each workload
gets one untimed warm-up run per engine.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import workloads as w  # noqa: E402

ALL = ("build", "order", "independent", "chain", "reduction", "startup")


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
        graph_input = w.order_input(engine, levels, width) if kind == "order" else None
        for _ in range(repeats):
            if kind == "build":
                dt, value = _time(w.build, engine, levels, width)
                del value
            else:
                dt, n = _time(w.order, engine, graph_input)
                assert n == nodes, (engine, n)
            samples.append(dt / nodes * 1e6)
        del graph_input
        out[engine] = samples
        _progress(kind, engine, samples)
    return out


def measure_runs(workload: str, eng: w.Engines, repeats: int, size: int,
                 engines: List[str]) -> Dict[str, List[float]]:
    fn, expected, _default, _unit = w.RUNS[workload]
    count = w.run_tasks(workload, size)
    out: Dict[str, List[float]] = {}
    for engine in [e for e in w.RUN_ENGINES if not engines or e in engines]:
        assert fn(engine, eng, size) == expected(size)  # untimed warm-up
        samples = []
        for _ in range(repeats):
            dt, value = _time(fn, engine, eng, size)
            assert value == expected(size), (workload, engine)
            samples.append(dt / count * 1e6)
        out[engine] = samples
        _progress(workload, engine, samples)
    return out


def measure_startup(repeats: int, engines: List[str]) -> Dict[str, Dict[str, List[float]]]:
    out: Dict[str, Dict[str, List[float]]] = {}
    for engine in [e for e in w.STARTUP_ENGINES if not engines or e in engines]:
        runs = [w.startup(engine) for _ in range(repeats)]
        out[engine] = {k: [r[k] for r in runs] for k in runs[0]}
        _progress("startup", engine, out[engine]["first_value_s"])
    return out


def _progress(workload: str, engine: str, samples: List[float]) -> None:
    print(f"  .. {workload:<12} {engine:<13} " + " ".join(f"{s:.4g}" for s in samples),
          file=sys.stderr, flush=True)


def _fmt(x: float) -> str:
    if x < 1:
        return f"{x:.3f}"
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def table(results: Dict[str, Dict[str, List[float]]], units: Dict[str, str]) -> str:
    lines = ["| workload | engine | median | min | max | ratio to rhapsody_graph | bar |",
             "|---|---|---:|---:|---:|---:|---|"]
    for workload, per_engine in results.items():
        base = statistics.median(per_engine["rhapsody"]) if "rhapsody" in per_engine else None
        bar = w.BARS.get(workload)
        for engine, samples in per_engine.items():
            med = statistics.median(samples)
            ratio = f"{med / base:.2f}x" if base else "-"
            verdict = ""
            if engine == "rhapsody" and bar is not None:
                unit = "s" if workload == "startup" else "us"
                verdict = f"<= {bar:g} {unit}: {'met' if med <= bar else 'MISSED'}"
            lines.append(f"| {workload} ({units[workload]}) | {engine} | {_fmt(med)} | "
                         f"{_fmt(min(samples))} | {_fmt(max(samples))} | {ratio} | {verdict} |")
    return "\n".join(lines)


def chart(results: Dict[str, Dict[str, List[float]]], units: Dict[str, str], path: str,
          subtitle: str) -> None:
    """One group of bars per workload (its median per engine), log scale: lower is faster."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = [k for k in results if k != "startup"]
    engines = sorted({e for k in workloads for e in results[k]},
                     key=lambda e: (e != "rhapsody", e))
    peers = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#7f7f7f", "#bcbd22"]
    colour = {e: "#d62728" if e == "rhapsody" else peers[i % len(peers)]
              for i, e in enumerate(engines)}
    width = 0.8 / max(len(results[k]) for k in workloads)
    fig, ax = plt.subplots(figsize=(1.6 + 2.2 * len(workloads), 4.2))
    labelled = set()
    for j, k in enumerate(workloads):  # each group: its own engines, centred on its tick
        present = [e for e in engines if e in results[k]]
        for i, e in enumerate(present):
            x = j + (i - (len(present) - 1) / 2) * width
            name = "rhapsody_graph" if e == "rhapsody" else e
            ax.bar(x, statistics.median(results[k][e]), width, color=colour[e],
                   label=None if e in labelled else name)
            labelled.add(e)
    ax.set_yscale("log")
    ax.set_xticks(range(len(workloads)))
    ax.set_xticklabels([f"{k}\n({units[k]})" for k in workloads], fontsize=8)
    ax.set_ylabel("microseconds (log scale; lower is faster)")
    ax.set_title(f"rhapsody_graph beside its peers, one run ({subtitle})", fontsize=10)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=4, help="timed runs per engine (median)")
    p.add_argument("--graph-repeats", type=int, default=None,
                   help="timed runs for build/order (default: --repeats, at most 3)")
    p.add_argument("--workloads", nargs="+", choices=ALL, default=list(ALL))
    p.add_argument("--engines", nargs="+", default=[], choices=w.ALL_ENGINES,
                   help="restrict to these engines (rhapsody is always kept for the ratios)")
    p.add_argument("--workers", type=int, default=w.WORKERS)
    p.add_argument("--quick", action="store_true", help="1/10 sizes: a smoke run")
    p.add_argument("--json", metavar="PATH", help="also write the raw samples here")
    p.add_argument("--chart", metavar="PATH",
                   help="also draw the medians as a bar chart (PNG or SVG, matplotlib)")
    a = p.parse_args(argv)

    engines = sorted(set(a.engines) | {"rhapsody"}) if a.engines else []
    scale = 10 if a.quick else 1
    levels, width = w.LEVELS, w.WIDTH // scale
    sizes = {"independent": w.INDEPENDENT // scale, "chain": w.CHAIN // scale,
             "reduction": w.LEAVES // scale}
    graph_repeats = a.graph_repeats or min(a.repeats, 3)

    units = {"build": f"us/node, {levels * width:,} nodes",
             "order": f"us/node, {levels * width:,} nodes",
             "independent": f"us/task, {sizes['independent']:,} no-ops",
             "chain": f"us/hop, {sizes['chain']:,} steps",
             "reduction": f"us/task, {2 * sizes['reduction'] - 1:,} tasks",
             "startup": "s, import to first value"}
    results: Dict[str, Dict[str, List[float]]] = {}
    extra: Dict[str, Dict[str, Dict[str, List[float]]]] = {}

    for kind in ("build", "order"):
        if kind in a.workloads:
            results[kind] = measure_graph(kind, graph_repeats, levels, width, engines)
    run_kinds = [k for k in ("independent", "chain", "reduction") if k in a.workloads]
    if run_kinds:
        started = [e for e in w.RUN_ENGINES if not engines or e in engines]
        with w.Engines(started, workers=a.workers) as eng:
            for kind in run_kinds:
                results[kind] = measure_runs(kind, eng, a.repeats, sizes[kind], engines)
    if "startup" in a.workloads:
        st = measure_startup(a.repeats, engines)
        results["startup"] = {e: v["first_value_s"] for e, v in st.items()}
        extra["startup"] = st

    print(f"\nrhapsody_graph benchmarks: {platform.python_implementation()} "
          f"{platform.python_version()}, {os.cpu_count()} CPUs, {a.workers} workers, "
          f"median of {a.repeats} (build/order: {graph_repeats})\n{w.describe()}\n")
    print(table(results, units))
    if "startup" in extra:
        print("\nfirst result in a fresh process (medians, seconds):")
        print("| engine | import | import to first value | whole process |")
        print("|---|---:|---:|---:|")
        for e, v in extra["startup"].items():
            print(f"| {e} | {statistics.median(v['import_s']):.3f} | "
                  f"{statistics.median(v['first_value_s']):.3f} | "
                  f"{statistics.median(v['process_s']):.3f} |")
    if a.chart:
        chart(results, units, a.chart, f"{os.cpu_count()} CPUs, {a.workers} workers, "
                                       f"median of {a.repeats}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"results": results, "startup": extra.get("startup"), "units": units,
                       "repeats": a.repeats, "graph_repeats": graph_repeats}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
