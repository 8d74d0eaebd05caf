"""Reports of a run, drawn from its run journal (:mod:`rhapsody_graph.runlog`).

``report(journal, out)`` writes, by the suffix of ``out``:

* ``.html``: one self-contained page (inline SVG and CSS, no script, nothing fetched:
  it opens from a cluster file system, offline): the run's totals, a timeline with a
  row per core and per GPU of every host (each attempt a bar, coloured by outcome,
  its node named on hover), each row's utilisation, the slowest nodes and the failures;
  a log that several runs appended (a resumed program's) is drawn run after run, the
  time between them left out of the timeline (a dashed line marks where) and of the
  utilisation (a row's busy time over the time the runs ran);
* ``.png`` (or ``.svg``/``.pdf`` by matplotlib): the same timeline as a picture
  (``pip install "rhapsody-graph[report]"``);
* ``.json``: a Chrome trace (``chrome://tracing``, https://ui.perfetto.dev): a process
  per host, a thread per core and per GPU.

>>> import os, tempfile, rhapsody_graph as rhapsody
>>> d = tempfile.mkdtemp()
>>> with rhapsody.Session(backends=[rhapsody.LocalBackend(cpus=2)],
...                       run_log=os.path.join(d, "run.jsonl")) as s:
...     _ = [f.result() for f in s.submit([rhapsody.task(abs)(-i) for i in range(4)])]
>>> os.path.basename(rhapsody.report(os.path.join(d, "run.jsonl"), os.path.join(d, "run.html")))
'run.html'
"""
from __future__ import annotations

import bisect
import html
import itertools
import json
import os
from collections import defaultdict
from typing import Any, Dict, List, Sequence, Tuple

from .runlog import read

__all__ = ["report", "rows", "chrome_trace"]

COLOURS = {"done": "#3d8b5a", "failed": "#c0392b", "died": "#8e2c20", "killed": "#b9770e",
           "dropped": "#999999"}
SLOWEST = 10
Row = Tuple[str, str]  # (host, "cpu 3" | "gpu 1" | "unplaced")


def report(journal: "str | os.PathLike[str] | Sequence[Dict[str, Any]]",
           out: "str | os.PathLike[str]") -> str:
    """Write the report of ``journal`` (a run journal's path, or its records) to ``out``
    (``.html``, ``.json``, or a matplotlib picture: ``.png``, ``.svg``, ``.pdf``);
    return the path written."""
    records = read(journal) if isinstance(journal, (str, os.PathLike)) else list(journal)
    out = os.fspath(out)
    suffix = os.path.splitext(out)[1].lower()
    if suffix in (".html", ".htm"):
        text = _html(records)
    elif suffix == ".json":
        text = json.dumps(chrome_trace(records))
    elif suffix in (".png", ".svg", ".pdf"):
        _picture(records, out)
        return out
    else:
        raise ValueError(f"report(..., {out!r}): unknown report type {suffix!r}; use .html, "
                         ".json (Chrome trace), or .png/.svg/.pdf (a timeline picture)")
    with open(out, "w") as f:
        f.write(text)
    return out


def rows(records: Sequence[Dict[str, Any]]) -> Dict[Row, List[Dict[str, Any]]]:
    """The attempts on each timeline row: a row per (host, core) and (host, GPU) that an
    attempt held; attempts placed on no core (the runtime chose) on ``(host, "unplaced")``."""
    out: Dict[Row, List[Dict[str, Any]]] = defaultdict(list)
    for r in records:
        hosts = r.get("hosts") or [r.get("host", "")]
        for host, cpus, gpus in zip(hosts, r.get("cpus") or [[]], r.get("gpus") or [[]]):
            for c in cpus:
                out[(host, f"cpu {c}")].append(r)
            for g in gpus:
                out[(host, f"gpu {g}")].append(r)
            if not cpus and not gpus:
                out[(host, "unplaced")].append(r)
    return dict(sorted(out.items(), key=lambda kv: _row_order(kv[0])))


def _row_order(row: Row) -> Tuple[str, int, int]:
    host, lane = row
    kind, _, n = lane.partition(" ")
    return host, {"cpu": 0, "gpu": 1}.get(kind, 2), int(n) if n.isdigit() else 0


def chrome_trace(records: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """A Chrome trace: a complete event (``ph: X``) per attempt and row it held."""
    events: List[Dict[str, Any]] = []
    pids: Dict[str, int] = {}
    tids: Dict[Row, int] = {}
    for (host, lane), attempts in rows(records).items():
        pid = pids.setdefault(host, len(pids) + 1)
        tid = tids.setdefault((host, lane), len(tids) + 1)
        events.append({"ph": "M", "name": "process_name", "pid": pid, "args": {"name": host}})
        events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid,
                       "args": {"name": lane}})
        for r in attempts:
            events.append({"ph": "X", "name": r["name"], "cat": r["outcome"], "pid": pid,
                           "tid": tid, "ts": r["start"] * 1e6,
                           "dur": max(0.0, r["end"] - r["start"]) * 1e6,
                           "args": {k: r[k] for k in ("node", "backend", "attempt", "outcome",
                                                      "bytes") if k in r}})
    return {"traceEvents": events, "displayTimeUnit": "ms"}


class _Axis:
    """Seconds of running: wall-clock time with the gaps between runs left out. A run
    spans its first start to its last end (runs that overlap in time, one span); a log
    that several runs appended is drawn as their spans side by side."""

    def __init__(self, records: Sequence[Dict[str, Any]]) -> None:
        runs: Dict[Any, List[float]] = {}
        for r in records:
            span = runs.setdefault(r.get("run"), [r["start"], r["end"]])
            span[0], span[1] = min(span[0], r["start"]), max(span[1], r["end"])
        spans: List[List[float]] = []
        for start, end in sorted(runs.values()):
            if spans and start <= spans[-1][1]:
                spans[-1][1] = max(spans[-1][1], end)
            else:
                spans.append([start, end])
        self.starts = [s for s, _ in spans]
        self.offsets = list(itertools.accumulate((e - s for s, e in spans), initial=0.0))
        running = self.offsets.pop()
        self.length = max(running, 1e-6)  # seconds of running in all
        self.gaps = spans[-1][1] - spans[0][0] - running if spans else 0.0  # left out

    def __call__(self, t: float) -> float:
        """``t`` (wall-clock seconds in a span) as seconds of running since the first start."""
        i = bisect.bisect_right(self.starts, t) - 1
        return self.offsets[i] + t - self.starts[i]

    def breaks(self) -> List[float]:
        """Where one span ends and the next begins, in seconds of running."""
        return self.offsets[1:]


def _busy(attempts: Sequence[Dict[str, Any]]) -> float:
    """Seconds a row was held (overlapping attempts, such as a shared lease's, once)."""
    total, until = 0.0, float("-inf")
    for start, end in sorted((r["start"], r["end"]) for r in attempts):
        if end > until:
            total += end - max(start, until)
            until = end
    return total


def _html(records: Sequence[Dict[str, Any]]) -> str:
    axis = _Axis(records)
    span = axis.length
    by_row = rows(records)
    nodes = {(r.get("run"), r["node"]) for r in records}  # a key is a node in each run
    runs = len({r.get("run") for r in records})
    failed = [r for r in records if r["outcome"] in ("failed", "died")
              or (r["outcome"] == "killed" and r.get("error"))]  # killed by its timeout
    counts: Dict[str, int] = defaultdict(int)
    for r in records:
        counts[r["outcome"]] += 1
    backends = sorted({r["backend"] for r in records})
    width, row_h, label_w = 900, 16, 170
    bars = []
    for i, ((host, lane), attempts) in enumerate(by_row.items()):
        y = i * row_h
        use = _busy(attempts) / span
        bars.append(f'<text x="0" y="{y + 12}">{html.escape(host)} {lane}</text>'
                    f'<text x="{label_w + width + 8}" y="{y + 12}">{use:.0%}</text>')
        for r in attempts:
            x = label_w + axis(r["start"]) / span * width
            w = max(0.5, (r["end"] - r["start"]) / span * width)
            tip = html.escape(f'{r["name"]} ({r["node"]}) on {r["backend"]}: {r["outcome"]}, '
                              f'attempt {r["attempt"]}, {r["end"] - r["start"]:.3f} s')
            bars.append(f'<rect x="{x:.2f}" y="{y + 2}" width="{w:.2f}" height="{row_h - 4}" '
                        f'fill="{COLOURS.get(r["outcome"], "#555")}"><title>{tip}</title></rect>')
    height = max(1, len(by_row)) * row_h
    for b in axis.breaks():  # where the gap between two runs is left out
        x = label_w + b / span * width
        bars.append(f'<line x1="{x:.2f}" y1="0" x2="{x:.2f}" y2="{height}" stroke="#333" '
                    'stroke-dasharray="4 3"/>')
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_w + width + 60}" '
           f'height="{height}" font-size="11" font-family="sans-serif">{"".join(bars)}</svg>')
    slow = sorted(records, key=lambda r: r["end"] - r["start"], reverse=True)[:SLOWEST]
    slow_rows = "".join(
        f"<tr><td>{html.escape(r['name'])}</td><td>{html.escape(r['node'])}</td>"
        f"<td>{html.escape(r['backend'])}</td><td>{html.escape(r['host'])}</td>"
        f"<td>{r['end'] - r['start']:.3f}</td><td>{r['outcome']}</td></tr>" for r in slow)
    fail_rows = "".join(
        f"<tr><td>{html.escape(r['name'])}</td><td>{html.escape(r['node'])}</td>"
        f"<td>{r['attempt']}</td><td>{html.escape(r['host'])}</td>"
        f"<td><code>{html.escape(r.get('error', ''))}</code></td></tr>" for r in failed)
    legend = " ".join(f'<span style="color:{c}">&#9632;</span> {o}' for o, c in COLOURS.items())
    totals = ", ".join(f"{n} {o}" for o, n in sorted(counts.items()))
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>rhapsody_graph run report</title>
<style>body{{font-family:sans-serif;margin:1.5em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:left}}code{{white-space:pre-wrap}}</style>
</head><body>
<h1>Run report</h1>
<p>{_count(runs, "run") + ": " if runs > 1 else ""}{_count(len(nodes), "node")}, {_count(len(records), "attempt")} ({totals}) on {", ".join(map(html.escape, backends))};
{_duration(axis)}; {len(by_row)} timeline rows.</p>
<h2>Timeline</h2>
<p>A row per core and per GPU of each host, with its utilisation (the time it was busy over
the time the runs ran) on the right. {legend}</p>
{svg}
<h2>Slowest nodes</h2>
<table><tr><th>task</th><th>node</th><th>backend</th><th>host</th><th>seconds</th><th>outcome</th></tr>
{slow_rows}</table>
<h2>Failures</h2>
{"<table><tr><th>task</th><th>node</th><th>attempt</th><th>host</th><th>error</th></tr>" + fail_rows + "</table>" if failed else "<p>None.</p>"}
</body></html>
"""


def _duration(axis: _Axis) -> str:
    if not axis.breaks():
        return f"{axis.length:.3f} s from the first start to the last end"
    return (f"{axis.length:.3f} s of running; the {axis.gaps:.3f} s between runs are left out "
            "of the timeline (a dashed line marks where) and of the utilisation")


def _count(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def _picture(records: Sequence[Dict[str, Any]], out: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError('a timeline picture needs matplotlib: '
                          'pip install "rhapsody-graph[report]"') from None
    axis = _Axis(records)
    by_row = rows(records)
    fig, ax = plt.subplots(figsize=(10, 1 + 0.3 * max(1, len(by_row))))
    for i, attempts in enumerate(by_row.values()):
        ax.broken_barh([(axis(r["start"]), max(r["end"] - r["start"], 1e-6)) for r in attempts],
                       (i - 0.4, 0.8), facecolors=[COLOURS.get(r["outcome"], "#555")
                                                   for r in attempts])
    ax.set_yticks(range(len(by_row)), [f"{h} {lane}" for h, lane in by_row])
    ax.invert_yaxis()
    for b in axis.breaks():
        ax.axvline(b, color="#333", linestyle="--", linewidth=0.8)
    ax.set_xlabel("seconds of running since the first start"
                  + (" (dashed: the gap between two runs, left out)" if axis.breaks() else ""))
    ax.set_title("rhapsody_graph run timeline")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
