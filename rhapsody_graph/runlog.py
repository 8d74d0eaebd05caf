"""The run journal: one JSON line per attempt of a node, for reports and timelines.

``Session(run_log="run.jsonl")`` appends, as each attempt ends, a line with:

=============  ==========================================================
``run``        the session that wrote it (its start, ``YYYYmmdd-HHMMSS``, the
               driver's pid, a count): a log appended by several runs keeps them apart
``node``       the node's key; ``name``: its task's name
``kind``       ``function``, ``executable``, ``job`` (several ranks) or ``ai``
``backend``    the backend's name
``host``       the first rank's host; ``hosts``: every rank's
``cpus``       core ids of every rank; ``gpus``: GPU ids of every rank
``attempt``    1, then 2, ... for retries
``start``      wall-clock seconds (``time.time()``) the attempt began to run: ``end``
               less the run time its executor measured (a pool worker's), else
               when it was started (a process of its own, an AI request)
``end``        when the scheduler learnt that it ended
``outcome``    ``done``, ``failed``, ``died`` (its process died), ``killed``
               (timeout, cancel) or ``dropped`` (never started)
``bytes``      the size of its encoded value (``done`` only, else 0)
``error``      the exception's type and message (``failed``, ``died``; ``killed``
               by its timeout: ``NodeTimeoutError: ...``; absent for a cancel)
=============  ==========================================================

This is not the resume journal (``Session(journal=...)``, :mod:`.journal`): it keeps
no values, only what ran where. :func:`read` loads it; :func:`rhapsody_graph.report`
draws it.

>>> import os, tempfile, rhapsody_graph as rhapsody
>>> path = os.path.join(tempfile.mkdtemp(), "run.jsonl")
>>> with rhapsody.Session(backends=[rhapsody.LocalBackend(cpus=1)], run_log=path) as s:
...     s.submit(rhapsody.task(abs)(-2)).result(timeout=60)
2
>>> [(r["name"], r["outcome"], r["attempt"], r["bytes"] > 0) for r in read(path)]
[('abs', 'done', 1, True)]
"""
from __future__ import annotations

import itertools
import json
import os
import time
from typing import Any, Dict, List

from .backends.base import kind_name

__all__ = ["RunLog", "read"]

_logs = itertools.count(1)  # the run logs this process opened
OUTCOMES = ("done", "failed", "died", "killed", "dropped")


class RunLog:
    """Appends attempt records to ``path`` (a line each, flushed as written)."""

    def __init__(self, path: "str | os.PathLike[str]") -> None:
        self.path = os.fspath(path)
        self._file = open(self.path, "a", buffering=1)
        if self._file.seekable() and self._file.tell() and not _ends_a_line(self.path):
            self._file.write("\n")  # a killed writer's torn line ended: this run's is whole
        self.run = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{next(_logs)}"

    def write(self, task: Any, attempt: Any, outcome: str, nbytes: int,
              error: str = "") -> None:
        """One attempt of ``task`` (a scheduler record, its ``start`` and ``end`` set)
        has ended with ``outcome``."""
        placements = attempt.placements or ()
        record: Dict[str, Any] = {
            "run": self.run, "node": task.node.key, "name": task.node.name,
            "kind": kind_name(task.node), "backend": task.backend.name,
            "host": placements[0].host if placements else "",
            "hosts": [p.host for p in placements],
            "cpus": [list(p.cpus) for p in placements],
            "gpus": [list(p.gpus) for p in placements],
            "attempt": task.failures + 1, "start": attempt.start, "end": attempt.end,
            "outcome": outcome, "bytes": nbytes}
        if error:
            record["error"] = error
        self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._file.close()


def _ends_a_line(path: str) -> bool:
    """Whether the file at ``path`` ends with a newline."""
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


#: what every record has (a run journal's, not any JSON lines), and reports read
FIELDS = ("node", "name", "start", "end", "outcome", "backend", "host", "attempt")


def read(path: "str | os.PathLike[str]") -> List[Dict[str, Any]]:
    """The records of a run journal, in the order they were written. A line that is not
    JSON is skipped: a driver killed while writing it tore it (the next run's log starts
    on a line of its own). Raise ``ValueError`` for a JSON line that is not a record
    (one without a field of :data:`FIELDS`, naming it), and for a file with no record at
    all (an empty one too)."""
    with open(path) as f:
        lines = f.read().splitlines()
    records, torn = [], 0
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            torn = torn or number
            continue
        missing = [k for k in FIELDS if k not in record] if isinstance(record, dict) else FIELDS
        if missing:
            raise ValueError(f"{os.fspath(path)}, line {number}: not a record of a run journal "
                             f"(Session(run_log=...)): no {', '.join(map(repr, missing))}")
        times = [k for k in ("start", "end") if isinstance(record[k], bool)
                 or not isinstance(record[k], (int, float))]
        if times:
            raise ValueError(f"{os.fspath(path)}, line {number}: not a record of a run journal "
                             f"(Session(run_log=...)): {', '.join(times)} not a number")
        records.append(record)
    if not records:
        why = f"no line is a record (line {torn} is not JSON)" if torn else "it is empty"
        raise ValueError(f"{os.fspath(path)}: not a run journal (Session(run_log=...)): {why}")
    return records
