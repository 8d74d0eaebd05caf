"""Executables run as Python calls inside a worker: the body the Dragon and Dask
backends send for an executable node (the local backend starts programs itself,
see :mod:`.launch`)."""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
from typing import Any, Mapping, Optional, Sequence

from ..errors import ExecutableError
from ..resources import current_placement

__all__ = ["run_program", "die_with_parent"]


def run_program(argv: Sequence[Any], cwd: Optional[str],
                env: Optional[Mapping[str, str]]) -> Any:
    """An executable node's body where a worker runs it (Dragon, Dask): run ``argv``
    here, capture its output.

    Upstream values in ``argv`` arrive as values and are passed as text. A
    non-zero exit raises :class:`~rhapsody_graph.errors.ExecutableError`.
    """
    from ..task import ExecResult
    args = [os.fsdecode(a) if isinstance(a, (bytes, os.PathLike)) else str(a) for a in argv]
    done = subprocess.run(args, cwd=cwd, env={**os.environ, **(env or {})},
                          stdin=subprocess.DEVNULL, capture_output=True,
                          preexec_fn=die_with_parent)
    out = done.stdout.decode(errors="replace")
    err = done.stderr.decode(errors="replace")
    if done.returncode != 0:
        raise ExecutableError(done.returncode, args, out, err)
    p = current_placement()
    return ExecResult(args, out, err, 0, p.host, p.cpus, p.gpus, p.rank) if p else \
        ExecResult(args, out, err, 0)


def die_with_parent() -> None:
    """In the program's process before exec: die when the worker dies (it may be
    killed by a timeout, and is never a process-group leader under Dragon)."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
