"""The progress display: nodes done / running / failed / waiting per backend, with
elapsed and estimated time, for everything a session runs.

One display per session, whatever submits (``compute()``, ``submit()`` while the user
iterates ``as_completed``). It runs in its own thread and only reads the counters the
scheduler keeps per backend (:class:`~.scheduler.Lane`), so the scheduler does no
more than a few integer additions per node for it.

Modes (:func:`mode`): ``"live"``, a `rich <https://rich.readthedocs.io>`_ display
redrawn in place (an interactive terminal; ``pip install "rhapsody-graph[progress]"``,
else plain lines); ``"lines"``, a plain line per backend every
:data:`LINE_INTERVAL` seconds and one at the end, for runs that long (batch job logs,
where stderr is not a terminal); ``None``, nothing. ``progress=None`` (the default)
chooses: nothing when ``$CI`` is set, live in a terminal, lines otherwise. The display
goes to stderr, so a program's own output on stdout (a CSV, a pipe) stays its own.

>>> mode(False), mode(None, tty=True, environ={}), mode(None, tty=False, environ={})
(None, 'live', 'lines')
>>> mode(None, tty=True, environ={"CI": "true"}), mode(True, tty=False, environ={"CI": "1"})
(None, 'lines')
>>> mode(None, tty=True, environ={"RHAPSODY_GRAPH_PROGRESS": "0"})
"""
from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, TextIO

__all__ = ["Progress", "mode", "counts", "snapshot", "LINE_INTERVAL", "ENV"]

LIVE_INTERVAL = 0.25  # seconds between redraws of the live display
LINE_INTERVAL = 10.0  # seconds between plain lines (the first comes after this long)
#: ``0``/``off``: no display unless asked for (``progress=True``); ``live``/``lines``: that one
ENV = "RHAPSODY_GRAPH_PROGRESS"


def mode(progress: Optional[bool], tty: Optional[bool] = None,
         environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The display ``progress`` asks for: ``"live"``, ``"lines"`` or ``None``."""
    if progress is False:
        return None
    environ = os.environ if environ is None else environ
    chosen = environ.get(ENV, "").lower()
    if progress is None and chosen in ("0", "off", "false"):
        return None
    if chosen in ("live", "lines"):
        return chosen
    if tty is None:
        tty = sys.stderr.isatty()
    if progress is None and environ.get("CI", "").lower() not in ("", "0", "false"):
        return None
    return "live" if tty else "lines"


_COUNTERS = ("submitted", "done", "failed", "cancelled", "started", "stopped")


def snapshot(lane: Any) -> tuple:
    """A lane's counters now (see :func:`counts`)."""
    return tuple(getattr(lane, name) for name in _COUNTERS)


_ZERO = (0,) * len(_COUNTERS)


def counts(lane: Any, since: tuple = _ZERO) -> Dict[str, int]:
    """One backend's nodes: ``done``, ``running``, ``failed`` (cancelled too), ``waiting``
    and ``total`` submitted (since its counters were ``since``, a :func:`snapshot`)."""
    submitted, done, failed, cancelled, started, stopped = (
        now - then for now, then in zip(snapshot(lane), since))
    failed += cancelled
    running = max(0, started - stopped)
    # what was submitted before `since` and ended after it counts in neither part
    done, failed = min(done, submitted), min(failed, max(0, submitted - done))
    return {"done": done, "running": running, "failed": failed,
            "waiting": max(0, submitted - done - failed - running), "total": submitted}


def _ended(lane: Any) -> int:
    """The lane's records that have ended, however."""
    return lane.done + lane.failed + lane.cancelled


class Progress:
    """Draws the counts of ``lanes`` (one per backend) in ``how`` (``"live"`` or
    ``"lines"``) until :meth:`stop`: what they were given since it began (a session's
    display: all of it; one ``compute(progress=True)`` shows: from that call on)."""

    def __init__(self, lanes: Sequence[Any], how: str, out: Optional[TextIO] = None,
                 interval: Optional[float] = None) -> None:
        self.lanes = list(lanes)
        self._out = out  # None: sys.stderr as it is at each draw
        self.start = time.monotonic()
        self._stop = threading.Event()
        self._live: Any = None
        self._printed = False  # a plain line was written
        self._since = {id(lane): snapshot(lane) for lane in self.lanes}  # counted from
        self._base = {id(lane): _ended(lane) for lane in self.lanes}  # ended when it got busy
        if how == "live":
            self._live = _rich_display(out or sys.stderr)
            how = "live" if self._live is not None else "lines"
        self.how = how
        self.interval = interval or (LIVE_INTERVAL if how == "live" else LINE_INTERVAL)
        self._thread = threading.Thread(target=self._run, name="rhapsody-progress", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        if self._live is not None:
            self._live.start()
        try:
            while not self._stop.wait(self.interval):
                self._draw()
        finally:
            self._draw(final=True)
            if self._live is not None:
                self._live.stop()

    def stop(self) -> None:
        """Draw the last state and end the display."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()

    def lines(self) -> List[str]:
        """A plain line per backend that has had work: counts, elapsed, estimate (by the
        rate since the session last got busy)."""
        elapsed = time.monotonic() - self.start
        out = []
        for lane in self.lanes:
            c = counts(lane, self._since[id(lane)])
            if not c["total"]:
                continue
            ended = c["done"] + c["failed"]
            left = c["total"] - ended
            rate = (_ended(lane) - self._base.get(id(lane), 0)) / max(elapsed, 1e-9)
            eta = f", about {_clock(left / rate)} left" if rate > 0 and left else ""
            out.append(f"[{lane.backend.name}] {c['done']:,}/{c['total']:,} done, "
                       f"{c['running']:,} running, {c['failed']:,} failed, "
                       f"{c['waiting']:,} waiting; {_clock(elapsed)} elapsed{eta}")
        return out

    def _busy(self) -> bool:
        """Whether work is outstanding; an idle session's clock restarts with its next work."""
        busy = any(lane.submitted > _ended(lane) for lane in self.lanes)
        if not busy:
            self.start = time.monotonic()
            self._base = {id(lane): _ended(lane) for lane in self.lanes}
        return busy

    def _draw(self, final: bool = False) -> None:
        if not final and not self._busy():
            return
        if self._live is not None:
            self._live.show(self.lanes, self._since)
            return
        if final and not self._printed:
            return  # a run shorter than LINE_INTERVAL prints nothing
        lines = self.lines()
        if lines:
            out = self._out or sys.stderr
            try:
                out.write("\n".join(lines) + "\n")
                out.flush()
            except (ValueError, OSError):  # stderr closed or gone: the run goes on
                return
            self._printed = True


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class _RichDisplay:
    """A ``rich.progress.Progress`` with a bar per backend."""

    def __init__(self, rich_progress: Any, out: TextIO) -> None:
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)
        self.bars = rich_progress.Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[running]} running, {task.fields[failed]} failed, "
                       "{task.fields[waiting]} waiting"),
            TimeElapsedColumn(), TimeRemainingColumn(),
            console=Console(file=out), auto_refresh=False, transient=False)
        self.ids: Dict[int, Any] = {}

    def start(self) -> None:
        self.bars.start()

    def stop(self) -> None:
        self.bars.stop()

    def show(self, lanes: Sequence[Any], since: Dict[int, tuple]) -> None:
        for lane in lanes:
            c = counts(lane, since[id(lane)])
            if not c["total"]:
                continue
            fields = {k: f"{c[k]:,}" for k in ("running", "failed", "waiting")}
            total, completed = c["total"], c["done"] + c["failed"]
            tid = self.ids.get(id(lane))
            if tid is None:  # with its counts: adding draws a frame (rich's total: 100)
                self.ids[id(lane)] = self.bars.add_task(lane.backend.name, total=total,
                                                        completed=completed, **fields)
            else:
                self.bars.update(tid, total=total, completed=completed, **fields)
        self.bars.refresh()


def _rich_display(out: TextIO) -> Optional[_RichDisplay]:
    try:
        import rich.progress
    except ImportError:
        return None
    return _RichDisplay(rich.progress, out)
