"""The ``rhapsody-graph`` command line (stdlib ``argparse``: the core stays light).

    rhapsody-graph info [--json]
    rhapsody-graph run [--backend dragon] script.py [ARGS...]
    rhapsody-graph visualize script.py:graph out.svg [--max-boxes N]
    rhapsody-graph report run.jsonl run.html

Exit codes: 0 done; 1 the work failed (the script raised, a picture or report could
not be drawn); 2 a usage error (a missing file, an unknown name), said in one line.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import inspect
import json
import os
import runpy
import shutil
import sys
import traceback
from typing import Any, Dict, Optional, Sequence

from .api import BACKEND_ENV

__all__ = ["main"]

#: what ``info`` reports: (what, distribution, the extra that installs it)
COMPONENTS = (("Dragon backend", "dragonhpc", "dragon"), ("Dask backend", "distributed", "dask"),
              ("llama.cpp inference", "llama-cpp-python", "ai"), ("vLLM inference", "vllm", None),
              ("graph pictures", "graphviz", "viz"), ("timeline pictures", "matplotlib", "report"))


class UsageError(Exception):
    """A command line that cannot be carried out as given (exit code 2)."""


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); return its exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.command(args)
    except UsageError as exc:
        parser.exit(2, f"rhapsody-graph {args.name}: error: {exc}\n")
    except (RuntimeError, ImportError, ValueError, OSError) as exc:
        parser.exit(1, f"rhapsody-graph {args.name}: error: {exc}\n")
    return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rhapsody-graph", description="Task graphs and futures on Dragon, Dask and "
        "local processes: inspect this machine, run a script, draw a graph, report a run.")
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s {_version('rhapsody-graph') or 'unknown'}")
    sub = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    info = sub.add_parser("info", help="hosts, cores, GPUs and installed backends and engines",
                          description="What rhapsody_graph finds here: this host's cores and "
                          "GPUs, and which backends and inference engines are installed.")
    info.add_argument("--json", action="store_true", help="print it as JSON")
    info.set_defaults(command=_info, name="info")

    run = sub.add_parser("run", help="run a Python script on a chosen default backend",
                         description="Run SCRIPT as __main__, its compute()/submit() calls "
                         "without a backend going to BACKEND. With --backend dragon outside "
                         "a Dragon runtime, the script runs under the dragon launcher.")
    run.add_argument("script", help="the Python file to run")
    run.add_argument("--backend", default="local", choices=("local", "dragon"),
                     help="the default backend (default: local)")
    run.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    run.set_defaults(command=_run, name="run")

    vis = sub.add_parser("visualize", help="draw a script's graph (svg, png, pdf, dot)",
                         description="Load SCRIPT (not as __main__) and draw its NAME: a "
                         "Graph, a node, a list of nodes, or a function returning one.")
    vis.add_argument("target", metavar="SCRIPT:NAME", help="e.g. flow.py:graph")
    vis.add_argument("out", help="the picture to write: .svg, .png, .pdf or .dot")
    vis.add_argument("--max-boxes", type=_positive, default=200,
                     help="past this many boxes a task is one box (default: 200)")
    vis.set_defaults(command=_visualize, name="visualize")

    rep = sub.add_parser("report", help="a run journal as HTML, a Chrome trace or a picture",
                         description="Draw the run journal JOURNAL (Session(run_log=...)) "
                         "into OUT: .html (offline page), .json (Chrome trace), .png/.svg/.pdf.")
    rep.add_argument("journal", help="the run journal (JSON lines)")
    rep.add_argument("out", help="the report to write")
    rep.set_defaults(command=_report, name="report")
    return parser


# -- info -------------------------------------------------------------------------------

def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def facts() -> Dict[str, Any]:
    """What ``info`` shows, as data."""
    from .resources import detect_host
    host = detect_host()
    found: Dict[str, Any] = {
        "rhapsody-graph": _version("rhapsody-graph"), "python": sys.version.split()[0],
        "host": host.name, "cores": list(host.cpus), "gpus": list(host.gpus),
        "memory_bytes": host.memory, "components": {}}
    for what, dist, extra in COMPONENTS:
        version = _version(dist)
        hint = f'pip install "rhapsody-graph[{extra}]"' if extra else f"pip install {dist}"
        found["components"][what] = {"package": dist, "version": version,
                                     "install": None if version else hint}
    found["graphviz dot"] = shutil.which("dot")
    return found


def _info(args: argparse.Namespace) -> int:
    found = facts()
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    gpus = found["gpus"]
    print(f"rhapsody-graph {found['rhapsody-graph']} on Python {found['python']}")
    print(f"host {found['host']}: {len(found['cores'])} cores {found['cores']}, "
          f"{len(gpus)} GPUs {gpus if gpus else '(none found)'}")
    print("local backend: built in")
    for what, c in found["components"].items():
        state = c["version"] or f"not installed ({c['install']})"
        print(f"{what}: {c['package']} {state}")
    print(f"graphviz dot: {found['graphviz dot'] or 'not found (apt-get install graphviz)'}")
    return 0


# -- run --------------------------------------------------------------------------------

def _run(args: argparse.Namespace) -> int:
    script = _script(args.script)
    script_args = args.args[1:] if args.args[:1] == ["--"] else args.args
    os.environ[BACKEND_ENV] = args.backend
    if args.backend == "dragon" and not _in_dragon():
        launcher = shutil.which("dragon")
        if launcher is None:
            raise UsageError('--backend dragon needs the dragon launcher: '
                             'pip install "rhapsody-graph[dragon]"')
        os.execv(launcher, [launcher, script, *script_args])
    sys.argv = [script, *script_args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:  # as python does: sys.exit("fatal: ...") prints it, exits 1
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    except Exception:
        traceback.print_exc()
        return 1
    return 0


def _in_dragon() -> bool:
    try:
        import dragon
    except ImportError:
        return False
    return bool(dragon.in_dragon())


def _script(path: str) -> str:
    if not os.path.isfile(path):
        raise UsageError(f"no such script: {path}")
    return path


# -- visualize ----------------------------------------------------------------------------

GIVE = "give a Graph, a node, a list of nodes, or a function returning one"


def _positive(text: str) -> int:
    """``--max-boxes``: a whole number above 0 (argparse's usage error otherwise)."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number above 0, got {text!r}")
    return n


RUN_NAME = "rhapsody_graph_visualize"  # the __name__ visualize loads a script under


def _visualize(args: argparse.Namespace) -> int:
    from .errors import brief
    from .graph import Graph, Node
    from .task import Task
    script, sep, name = args.target.rpartition(":")
    if not sep or not script or not name:
        raise UsageError(f"give SCRIPT:NAME (e.g. flow.py:graph), got {args.target!r}")
    sys.path.insert(0, os.path.dirname(os.path.abspath(_script(script))))
    try:
        namespace = runpy.run_path(script, run_name=RUN_NAME)
    except Exception:  # the script raised: its traceback, as `run` prints it
        traceback.print_exc()
        return 1
    except SystemExit as exited:  # sys.exit() at its top level: nothing to draw
        raise UsageError(f"{script} exited (sys.exit({exited.code!r})) while it was loaded, "
                         f"so {name!r} was not drawn: put what runs it under "
                         "`if __name__ == \"__main__\":`") from None
    if name not in namespace:
        graphs = [k for k, v in namespace.items() if isinstance(v, (Graph, Node)) or (
            inspect.isfunction(v) and v.__module__ == RUN_NAME and not k.startswith("_"))]
        raise UsageError(f"{script} has no {name!r}; graphs, nodes and functions there: "
                         f"{', '.join(graphs) or 'none'}")
    obj = namespace[name]
    if isinstance(obj, Task):
        raise UsageError(f"{script}:{name} is a task (calling it makes a node): NAME must "
                         f"hold nodes; {GIVE}")
    if callable(obj) and not isinstance(obj, (Graph, Node)):
        try:
            inspect.signature(obj).bind()
        except TypeError as e:
            raise UsageError(f"{script}:{name} cannot be called without arguments ({e}); "
                             f"{GIVE}") from None
        except ValueError:  # no signature to read (a builtin): call it and see
            pass
        try:
            obj = obj()
        except Exception:
            traceback.print_exc()
            return 1
    graph = obj if isinstance(obj, Graph) else Graph(obj)
    if not len(graph):
        raise UsageError(f"{script}:{name} holds no node: {brief(obj)}; {GIVE}")
    path = graph.visualize(args.out, max_boxes=args.max_boxes)
    print(f"{len(graph):,} nodes drawn into {path}")
    return 0


# -- report -------------------------------------------------------------------------------

def _report(args: argparse.Namespace) -> int:
    from .report import report
    if os.path.isdir(args.journal):
        raise UsageError(f"{args.journal} is a directory (a resume journal, Session(journal=)?); "
                         "report reads a run log, the file of Session(run_log=...)")
    if not os.path.isfile(args.journal):
        raise UsageError(f"no such run journal: {args.journal}")
    print(f"wrote {report(args.journal, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
