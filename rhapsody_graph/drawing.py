"""Pictures of a graph: Graphviz (``Graph.visualize``) and Mermaid (``Graph.to_mermaid``).

A picture shows *boxes*, not nodes, so that a 100,000-node graph still draws a
readable one. A box is the nodes of one task (same name, kind and request) that
read from the same boxes: a ``map`` fan-out, the hops of a ``map`` over its
output, a wide level of like nodes. Each box is labelled with the task's name, its
request and, for more than one node, the count; edges between boxes carry how many
node-to-node edges they stand for. When that still leaves more than ``max_boxes``
boxes (a long chain, say), the nodes of one task become one box whatever they read
from, and an edge of a box to itself says how many of its nodes read from each other.

Boxes are coloured by kind: function, executable, multi-rank job, AI.

>>> import rhapsody_graph as rhapsody
>>> @rhapsody.task
... def load(i): return i
>>> @rhapsody.task(cpus=2)
... def total(xs): return sum(xs)
>>> print(rhapsody.Graph(total(rhapsody.map(load, range(1000)))).to_mermaid())
flowchart TD
  b0["load ×1,000<br/>function · 1 cpu"]:::function
  b1["total<br/>function · 2 cpus"]:::function
  b0 -->|1,000| b1
  classDef function fill:#cfe2ff,stroke:#3d6fb6
  classDef executable fill:#ffe5c2,stroke:#c27a1a
  classDef job fill:#e6d4f7,stroke:#7a4aa8
  classDef ai fill:#d3f2d9,stroke:#2e8b57
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple

from .backends.base import kind_name

__all__ = ["Box", "boxes", "to_mermaid", "to_dot", "visualize", "MAX_BOXES"]

MAX_BOXES = 200  # more than this and a task's nodes share one box whatever they read
#: (fill, outline) per kind of box
COLOURS = {"function": ("#cfe2ff", "#3d6fb6"), "executable": ("#ffe5c2", "#c27a1a"),
           "job": ("#e6d4f7", "#7a4aa8"), "ai": ("#d3f2d9", "#2e8b57")}
GRAPHVIZ_FORMATS = ("svg", "png", "pdf", "jpg", "jpeg")


class Box:
    """Nodes drawn as one: ``name``, ``kind`` (a key of :data:`COLOURS`), ``request``
    (the label's resources), ``count`` nodes."""

    __slots__ = ("id", "name", "kind", "request", "count")

    def __init__(self, id: int, name: str, kind: str, request: str) -> None:
        self.id, self.name, self.kind, self.request, self.count = id, name, kind, request, 0

    @property
    def label(self) -> str:
        count = f" ×{self.count:,}" if self.count > 1 else ""
        return f"{self.name}{count}\n{self.kind} · {self.request}"


def boxes(graph: Any, max_boxes: int = MAX_BOXES) -> Tuple[List[Box], Dict[Tuple[int, int], int]]:
    """The boxes of ``graph`` and the edges between them (``(from, to)`` → node edges)."""
    return _group(graph, by_inputs=True, limit=max_boxes) or _group(graph, False, None)


def _group(graph: Any, by_inputs: bool, limit: Optional[int]) -> Any:
    """Boxes and edges, nodes grouped by task (and by the boxes they read from if
    ``by_inputs``); ``None`` as soon as there are more than ``limit`` boxes."""
    found: Dict[tuple, Box] = {}
    box_of: Dict[int, Box] = {}
    edges: Dict[Tuple[int, int], int] = {}
    for node in graph:  # dependencies first: their boxes are known
        inputs = [box_of[id(_node(d))].id for d in node.deps if id(_node(d)) in box_of]
        kind, request = _describe(node)
        sig = (node.name, kind, request, frozenset(inputs) if by_inputs else None)
        box = found.get(sig)
        if box is None:
            if limit is not None and len(found) == limit:
                return None
            box = found[sig] = Box(len(found), node.name, kind, request)
        box.count += 1
        box_of[id(node)] = box
        for i in inputs:
            edges[(i, box.id)] = edges.get((i, box.id), 0) + 1
    return list(found.values()), edges


def _node(dep: Any) -> Any:
    """A dependency's node (a future stands for its node)."""
    return getattr(dep, "node", dep)


def _describe(node: Any) -> Tuple[str, str]:
    """(kind, request) of a node, for its box."""
    res = node.opts.resources
    kind = kind_name(node)
    if kind == "ai":
        return "ai", f"model {node.fn.model}"
    parts = [f"{res.cpus} cpu{'s' if res.cpus != 1 else ''}"]
    if res.gpus:
        parts.append(f"{res.gpus} gpu{'s' if res.gpus != 1 else ''}")
    if res.ranks > 1:
        parts.append(f"{res.ranks} ranks")
    return kind, " · ".join(parts)


def to_mermaid(graph: Any, max_boxes: int = MAX_BOXES) -> str:
    """A Mermaid ``flowchart`` of ``graph``'s boxes, for Markdown (see the module doc)."""
    drawn, edges = boxes(graph, max_boxes)
    lines = ["flowchart TD"]
    for b in drawn:
        label = b.label.replace('"', "'").replace("\n", "<br/>")
        lines.append(f'  b{b.id}["{label}"]:::{b.kind}')
    for (a, b), n in edges.items():
        lines.append(f"  b{a} -->|{n:,}| b{b}" if n > 1 else f"  b{a} --> b{b}")
    lines += [f"  classDef {kind} fill:{fill},stroke:{line}"
              for kind, (fill, line) in COLOURS.items()]
    return "\n".join(lines)


def to_dot(graph: Any, max_boxes: int = MAX_BOXES) -> Any:
    """A ``graphviz.Digraph`` of ``graph``'s boxes (needs the ``graphviz`` package)."""
    try:
        import graphviz
    except ImportError:
        raise ImportError('Graph.visualize needs the graphviz package: '
                          'pip install "rhapsody-graph[viz]"') from None
    drawn, edges = boxes(graph, max_boxes)
    dot = graphviz.Digraph("rhapsody_graph", graph_attr={"rankdir": "TB"},
                           node_attr={"shape": "box", "style": "rounded,filled",
                                      "fontname": "Helvetica", "fontsize": "11"},
                           edge_attr={"fontname": "Helvetica", "fontsize": "10"})
    for b in drawn:
        fill, line = COLOURS[b.kind]
        dot.node(f"b{b.id}", b.label.replace("\\", "\\\\"),  # a name's \ is no escape
                 fillcolor=fill, color=line,
                 penwidth="2" if b.count > 1 else "1")
    for (a, b), n in edges.items():
        dot.edge(f"b{a}", f"b{b}", label=f"{n:,}" if n > 1 else None)
    return dot


def visualize(graph: Any, path: "str | os.PathLike[str]", max_boxes: int = MAX_BOXES) -> str:
    """Draw ``graph`` into ``path`` (``.svg``, ``.png``, ``.pdf``; ``.dot``/``.gv``
    writes the Graphviz source); return the path written."""
    path = os.fspath(path)
    fmt = os.path.splitext(path)[1].lstrip(".").lower()
    dot = to_dot(graph, max_boxes)
    if fmt in ("dot", "gv"):
        with open(path, "w") as f:
            f.write(dot.source)
        return path
    if fmt not in GRAPHVIZ_FORMATS:
        raise ValueError(f"visualize({path!r}): unknown picture format {fmt!r}; use one of "
                         f"{', '.join('.' + f for f in GRAPHVIZ_FORMATS + ('dot',))}")
    import graphviz
    try:
        data = dot.pipe(format=fmt)
    except graphviz.ExecutableNotFound:
        raise RuntimeError(
            f"visualize({path!r}) needs Graphviz's `dot` program, which is not on PATH: "
            "install Graphviz (apt-get install graphviz, dnf install graphviz, "
            "brew install graphviz, or conda install -c conda-forge graphviz), or write "
            "the source with a .dot path, or use Graph.to_mermaid()") from None
    with open(path, "wb") as f:
        f.write(data)
    return path
