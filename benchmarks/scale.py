"""Scale without the hardware: the real Session, scheduler and ledger on a simulated
inventory (:class:`~rhapsody_graph.SimulatedBackend`: a virtual clock, no user code).

    python benchmarks/scale.py                        # 1,000 hosts x 64 cores x 8 GPUs, 1,000,000 nodes
    python benchmarks/scale.py --nodes 200000         # fewer nodes
    python benchmarks/scale.py --quick                # 100 hosts, 20,000 nodes, a short curve
    python benchmarks/scale.py --curve-only           # the ledger alone, 1 to 1,000 hosts
    python benchmarks/scale.py --plot docs/scaling.png --curve-plot docs/scaling-curve.png
    python benchmarks/scale.py --no-curve --nodes 200000 --profile /tmp/scheduler.prof
    git show 5f2e793:rhapsody_graph/resources.py > /tmp/old.py       # the ledger before the index
    python benchmarks/scale.py --curve-only --ledger-from /tmp/old.py   # time that one instead
    python benchmarks/scale.py --curve-only --baseline /tmp/old.py --curve-plot docs/scaling-curve.png

Two measurements:

* The ledger alone (``--curve``): the cost of one placement decision as hosts grow
  (1, 10, 100, 1,000 hosts of 64 cores and 8 GPUs): 1-core asks filling the ledger,
  4-core + 1-GPU asks (round-robin over GPUs), 8-GPU asks, 64-rank jobs, asks that fail
  on a full ledger, and releases. Microseconds per call, best of ``--repeats``.
* The whole system: a graph of mixed nodes (blocks of 10,000: 7,000 one-core
  simulations, 1,500 trainers of 4 cores + 1 GPU each fed by 4 simulations, 20 nodes of
  8 GPUs fed by trainers, 50 jobs of 64 one-core ranks, block and round-robin, and a
  ``rhapsody.map(evaluate, ..., gpus="all")`` wave of 1,430 items, one per trainer and
  more), every node's simulated seconds its first argument. Reported: wall time to
  build and to run, the scheduler thread's CPU per node, the ledger's time per
  placement decision (timed inside the run), utilisation of cores and GPUs over
  simulated time, and a double-booking check made from the backend's records alone.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import random
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import rhapsody_graph as rhapsody  # noqa: E402
from rhapsody_graph.backends.simulated import SimulatedBackend, timeline  # noqa: E402

CORES, GPUS = 64, 8
BLOCK = {"simulate": 7000, "train": 1500, "whole": 20, "solve": 50, "evaluate": 1430}


# -- the ledger alone -------------------------------------------------------------------

def ledger_module(path: Optional[str]) -> Any:
    """``rhapsody_graph.resources``, or the module in file ``path`` (an older ledger)."""
    if path is None:
        from rhapsody_graph import resources
        return resources
    spec = importlib.util.spec_from_file_location("rhapsody_graph._resources_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _per_call(fn: Callable[[], Any], calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def ledger_case(res: Any, hosts: int) -> Dict[str, float]:
    """Microseconds per placement decision on ``hosts`` hosts, for each kind of ask."""
    ledger = res.Ledger(res.Inventory([res.Host(f"n{i}", cpus=CORES, gpus=GPUS, memory=0)
                                       for i in range(hosts)]))
    R = res.Resources
    one, train, whole = R(cpus=1), R(cpus=4, gpus=1), R(cpus=1, gpus=8)
    job = R(cpus=1, ranks=64, distribution="round_robin")
    out: Dict[str, float] = {}

    def fill(req: Any, take: Callable[[Any], Any], key: str) -> List[Any]:
        """Fill the ledger with ``req`` (again, until 2,000 asks were timed); keep the
        last fill held."""
        asks, seconds = 0, 0.0
        while True:
            held: List[Any] = []
            t0 = time.perf_counter()
            while True:
                p = take(req)
                if p is None:
                    break
                held.append(p)
            seconds += time.perf_counter() - t0
            asks += len(held)
            if asks >= 2000:
                break
            for p in held:
                for one_rank in (p if isinstance(p, list) else [p]):
                    ledger.release(one_rank)
        out[key] = seconds / asks * 1e6
        return held

    held = fill(one, ledger.allocate, "1 core (fill)")
    out["1 core, full (refused)"] = _per_call(lambda: ledger.allocate(one), 2000)
    out["1 GPU, no core free (refused)"] = _per_call(lambda: ledger.allocate(train), 2000)
    out["64 ranks, full (refused)"] = _per_call(lambda: ledger.allocate_ranks(job), 500)
    t0 = time.perf_counter()
    for p in held:
        ledger.release(p)
    out["release"] = (time.perf_counter() - t0) / len(held) * 1e6
    held = fill(train, ledger.allocate, "4 cores + 1 GPU (fill)")
    out["1 GPU, every GPU held (refused)"] = _per_call(lambda: ledger.allocate(train), 2000)
    for p in held:
        ledger.release(p)
    held = fill(whole, ledger.allocate, "8 GPUs (fill)")
    for p in held:
        ledger.release(p)
    jobs = fill(job, ledger.allocate_ranks, "64 ranks (fill), per job")
    for placements in jobs:
        for p in placements:
            ledger.release(p)
    return out


def ledger_curve(res: Any, host_counts: Sequence[int], repeats: int) -> Dict[int, Dict[str, float]]:
    ledger_case(res, 1)  # warm up: the first case timed would pay for it
    curve = {}
    for hosts in host_counts:
        runs = [ledger_case(res, hosts) for _ in range(repeats)]
        curve[hosts] = {k: min(r[k] for r in runs) for k in runs[0]}
    return curve


def print_curve(curve: Dict[int, Dict[str, float]], where: str) -> None:
    counts = list(curve)
    kinds = list(curve[counts[0]])
    print(f"\nOne placement decision, microseconds (best of runs), ledger {where}:\n")
    print("| ask | " + " | ".join(f"{h:,} host{'s' if h > 1 else ''}" for h in counts) + " |")
    print("|---|" + "---:|" * len(counts))
    for k in kinds:
        print(f"| {k} | " + " | ".join(f"{curve[h][k]:.1f}" for h in counts) + " |")


# -- the whole system --------------------------------------------------------------------

def simulate(seconds, seed):
    raise AssertionError("simulated: never run")


def train(seconds, samples):
    raise AssertionError("simulated: never run")


def whole(seconds, models):
    raise AssertionError("simulated: never run")


def solve(seconds, net):
    raise AssertionError("simulated: never run")


def evaluate(seconds, model):
    raise AssertionError("simulated: never run")


def build(nodes: int, seed: int = 0) -> List[Any]:
    """``nodes`` nodes of the mix in :data:`BLOCK` (scaled down below one block)."""
    rng = random.Random(seed)
    scale = min(1.0, nodes / sum(BLOCK.values()))
    per = {k: max(1, round(v * scale)) for k, v in BLOCK.items()}
    sim = rhapsody.task(cpus=1)(simulate)
    trainer = rhapsody.task(cpus=4, gpus=1)(train)
    big = rhapsody.task(cpus=1, gpus=8)(whole)
    jobs = [rhapsody.task(cpus=1, ranks=64, distribution=d)(solve) for d in ("block", "round_robin")]
    out: List[Any] = []
    while len(out) < nodes:
        sims = [sim(rng.randint(60, 600), i) for i in range(per["simulate"])]
        trains = [trainer(rng.randint(300, 900), sims[4 * i % len(sims):4 * i % len(sims) + 4])
                  for i in range(per["train"])]
        bigs = [big(rng.randint(900, 1500), trains[i::per["whole"]][:4]) for i in range(per["whole"])]
        solves = [jobs[i % 2](rng.randint(300, 900), bigs[i % len(bigs)]) for i in range(per["solve"])]
        wave = rhapsody.map(evaluate, [rng.randint(60, 180) for _ in range(per["evaluate"])],
                            [trains[i % len(trains)] for i in range(per["evaluate"])], gpus="all")
        out += sims + trains + bigs + solves + wave
    return out[:nodes]


class Timed:
    """Wraps a ledger's ``allocate``/``allocate_ranks``/``release`` on the instance and
    adds up the CPU time spent in them per kind of ask (an inner call is counted in the
    outer one): ``asks[label] = [calls, refused, seconds]``."""

    def __init__(self, ledger: Any) -> None:
        self.asks: Dict[str, List[Any]] = {}
        self._inside = False
        for name in ("allocate", "allocate_ranks", "release"):
            setattr(ledger, name, self._wrap(getattr(ledger, name), name == "release"))

    def _wrap(self, fn: Callable[..., Any], release: bool) -> Callable[..., Any]:
        clock = time.thread_time  # CPU of the scheduler thread: a GIL switch adds nothing
        asks = self.asks

        def timed(what: Any, *args: Any, **kwargs: Any) -> Any:
            if self._inside:
                return fn(what, *args, **kwargs)
            self._inside = True
            t0 = clock()
            try:
                result = fn(what, *args, **kwargs)
            finally:
                seconds = clock() - t0
                self._inside = False
            label = "release" if release else (
                f"{what.cpus} core(s), {what.gpus} GPU(s)"
                + (f" x {what.ranks} ranks ({what.distribution})" if what.ranks > 1 else ""))
            entry = asks.get(label)
            if entry is None:
                entry = asks[label] = [0, 0, 0.0]
            entry[0] += 1
            entry[1] += result is None and not release
            entry[2] += seconds
            return result
        return timed

    def total(self, release: bool) -> Tuple[int, int, float]:
        rows = [v for k, v in self.asks.items() if (k == "release") == release]
        return (sum(r[0] for r in rows), sum(r[1] for r in rows), sum(r[2] for r in rows))


def thread_cpu(thread: Any) -> float:
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


def profiled(path: str) -> Callable[[], None]:
    """Profile the scheduler thread of sessions made from now on (cProfile, written to
    ``path``); returns the undo."""
    import cProfile
    from rhapsody_graph.scheduler import Scheduler
    plain = Scheduler.run

    def run(self: Any) -> None:
        profile = cProfile.Profile()
        profile.enable()
        try:
            plain(self)
        finally:
            profile.disable()
            profile.dump_stats(path)
    Scheduler.run = run

    def undo() -> None:
        Scheduler.run = plain
    return undo


def print_profile(path: str, top: int = 20) -> None:
    import pstats
    print(f"\nThe scheduler thread, by cumulative time (cProfile, {path}):\n")
    pstats.Stats(path).sort_stats("cumulative").print_stats(top)


def run(hosts: int, nodes: int, profile: Optional[str] = None) -> Dict[str, Any]:
    undo = profiled(profile) if profile else None
    t0 = time.perf_counter()
    graph = build(nodes)
    built = time.perf_counter() - t0
    sim = SimulatedBackend(hosts=hosts, cpus=CORES, gpus=GPUS,
                           duration=lambda node: node.args[0])
    timed = Timed(sim.ledger)
    gc.collect()
    gc.freeze()  # a million live nodes: keep the collector from walking them over and over
    with rhapsody.Session(backends=[sim], progress=False) as session:
        cpu0 = thread_cpu(session._thread)
        t0 = time.perf_counter()
        values, = session.compute(graph)
        wall = time.perf_counter() - t0
        cpu = thread_cpu(session._thread) - cpu0
    gc.unfreeze()
    if undo is not None:
        undo()
    assert len(values) == nodes and set(values) == {None}, "every node's value is None"
    t0 = time.perf_counter()
    clashes = sim.double_bookings()
    checked = time.perf_counter() - t0
    return {"hosts": hosts, "nodes": nodes, "build": built, "wall": wall, "cpu": cpu,
            "timed": timed, "sim": sim, "clashes": clashes, "checked": checked,
            "utilisation": sim.utilisation(), "idle": sim.ledger.idle()}


def report(r: Dict[str, Any]) -> None:
    t, u, n = r["timed"], r["utilisation"], r["nodes"]
    calls, refused, seconds = t.total(release=False)
    released, _, release_seconds = t.total(release=True)
    print(f"\n{n:,} nodes on {r['hosts']:,} hosts x {CORES} cores x {GPUS} GPUs "
          f"(simulated), one Session, one compute():\n")
    print("| measure | value |\n|---|---:|")
    print(f"| nodes built (wall) | {r['build']:.1f} s ({r['build'] / n * 1e6:.1f} us/node) |")
    print(f"| compute() wall, submit to last value | {r['wall']:.1f} s "
          f"({r['wall'] / n * 1e6:.1f} us/node) |")
    print(f"| scheduler thread CPU | {r['cpu']:.1f} s ({r['cpu'] / n * 1e6:.1f} us/node) |")
    print(f"| ledger placement decisions | {calls:,} ({refused:,} refused), "
          f"{seconds / max(1, calls) * 1e6:.2f} us each, {seconds / n * 1e6:.2f} us/node |")
    print(f"| ledger releases | {released:,}, {release_seconds / max(1, released) * 1e6:.2f} us each |")
    print(f"| simulated time | {u['seconds']:,.0f} s ({u['seconds'] / 3600:.1f} h) |")
    print(f"| utilisation: cores, GPUs | {u['cores']:.1%}, {u['gpus']:.1%} |")
    print(f"| double bookings (from the backend's records) | {len(r['clashes'])} "
          f"(checked in {r['checked']:.1f} s) |")
    print(f"| ledger idle after | {r['idle']} |")
    print("\n| ledger call in the run | calls | refused | us each |\n|---|---:|---:|---:|")
    for label, (k, no, sec) in sorted(t.asks.items()):
        print(f"| {label} | {k:,} | {no:,} | {sec / max(1, k) * 1e6:.2f} |")


def plot(r: Dict[str, Any], curve: Optional[Dict[int, Dict[str, float]]], path: str,
         curve_path: Optional[str]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sim = r["sim"]
    rows = timeline(sim.records, 0.0, sim.clock, bins=300)
    hours = [t / 3600 for t, _, _ in rows]
    fig, ax = plt.subplots(figsize=(9, 3.6))
    ax.plot(hours, [c / sim.inventory.total_cpus * 100 for _, c, _ in rows], label="cores")
    ax.plot(hours, [g / sim.inventory.total_gpus * 100 for _, _, g in rows], label="GPUs")
    ax.set_xlabel("simulated time (hours)")
    ax.set_ylabel("busy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"{r['nodes']:,} nodes on {r['hosts']:,} simulated hosts "
                 f"({sim.inventory.total_cpus:,} cores, {sim.inventory.total_gpus:,} GPUs)")
    ax.legend(loc="lower center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"\nwrote {path}")
    if curve and curve_path:
        draw_curve(curve, curve_path)


def draw_curve(curve: Dict[int, Dict[str, float]], path: str,
               older: Optional[Dict[int, Dict[str, float]]] = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    counts = list(curve)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, k in enumerate(curve[counts[0]]):
        color = f"C{i}"
        ax.plot(counts, [curve[h][k] for h in counts], marker="o", color=color, label=k)
        if older:
            ax.plot(counts, [older[h][k] for h in counts], ls="--", marker="x", color=color,
                    alpha=0.6)
    if older:
        ax.plot([], [], ls="--", marker="x", color="grey", label="(dashed: the ledger before the index)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("hosts (64 cores, 8 GPUs each)")
    ax.set_ylabel("microseconds per call")
    ax.set_title("One ledger placement decision as hosts grow")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hosts", type=int, default=1000, help="simulated hosts (default 1,000)")
    ap.add_argument("--nodes", type=int, default=1_000_000, help="nodes (default 1,000,000)")
    ap.add_argument("--quick", action="store_true", help="100 hosts, 20,000 nodes, short curve")
    ap.add_argument("--curve-only", action="store_true", help="only the ledger alone")
    ap.add_argument("--no-curve", action="store_true", help="skip the ledger alone")
    ap.add_argument("--curve-hosts", default="1,10,100,1000", help="host counts of the curve")
    ap.add_argument("--repeats", type=int, default=3, help="runs of the curve (best taken)")
    ap.add_argument("--ledger-from", help="time the ledger of this resources.py file instead")
    ap.add_argument("--baseline", help="also time the ledger of this resources.py file "
                                       "(once), print it and draw it dashed")
    ap.add_argument("--profile", help="profile the scheduler thread into this file (cProfile) "
                                      "and print its top items")
    ap.add_argument("--plot", help="write utilisation over simulated time here (PNG)")
    ap.add_argument("--curve-plot", help="write the cost curve here (PNG)")
    args = ap.parse_args(argv)
    if args.quick:
        args.hosts, args.nodes, args.curve_hosts, args.repeats = 100, 20_000, "1,10,100", 1
    curve = None
    if not args.no_curve:
        res = ledger_module(args.ledger_from)
        counts = [int(h) for h in args.curve_hosts.split(",")]
        curve = ledger_curve(res, counts, args.repeats)
        print_curve(curve, args.ledger_from or "rhapsody_graph.resources")
        older = None
        if args.baseline:
            older = ledger_curve(ledger_module(args.baseline), counts, 1)
            print_curve(older, args.baseline)
        if args.curve_only and args.curve_plot:
            draw_curve(curve, args.curve_plot, older)
    if args.curve_only:
        return
    r = run(args.hosts, args.nodes, args.profile)
    report(r)
    if args.profile:
        print_profile(args.profile)
    if args.plot:
        plot(r, curve, args.plot, args.curve_plot)
    if r["clashes"]:
        raise SystemExit(f"double bookings found: {r['clashes'][:3]}")


if __name__ == "__main__":
    main()
