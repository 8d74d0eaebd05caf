"""Executables run as Python calls inside a worker: the body the Dragon and Dask
backends send for an executable node (the local backend starts programs itself,
see :mod:`.launch`)."""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import threading
from typing import Any, Dict, Mapping, Optional, Sequence

from ..errors import ExecutableError
from ..resources import current_placement, placement_env

__all__ = ["run_program", "kill_program_of", "die_with_parent"]

_programs: Dict[int, int] = {}  # thread ident -> pid (and group) of the program it runs


def run_program(argv: Sequence[Any], cwd: Optional[str],
                env: Optional[Mapping[str, str]]) -> Any:
    """An executable node's body where a worker runs it (Dragon, Dask): run ``argv``
    here, capture its output. Its environment: the worker's, ``env``, then the
    placement's variables (which ``env`` cannot override, as on the local backend).

    Upstream values in ``argv`` arrive as values and are passed as text. A
    non-zero exit raises :class:`~rhapsody_graph.errors.ExecutableError`.
    """
    from ..task import ExecResult
    args = [os.fsdecode(a) if isinstance(a, (bytes, os.PathLike)) else str(a) for a in argv]
    env = {**os.environ, **(env or {}), **placement_env()}
    proc = subprocess.Popen(args, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, preexec_fn=die_with_parent)
    me = threading.get_ident()
    _programs[me] = proc.pid
    try:
        stdout, stderr = proc.communicate()
    finally:
        del _programs[me]
    out = stdout.decode(errors="replace")
    err = stderr.decode(errors="replace")
    if proc.returncode != 0:
        raise ExecutableError(proc.returncode, args, out, err)
    p = current_placement()
    return ExecResult(args, out, err, 0, p.host, p.cpus, p.gpus, p.rank) if p else \
        ExecResult(args, out, err, 0)


def kill_program_of(thread: int) -> bool:
    """Kill the process group of the program that ``thread`` runs now, if any
    (what a backend does to stop an executable call); True if there was one."""
    pid = _programs.get(thread)
    if pid is None:
        return False
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return True


def die_with_parent() -> None:
    """In the program's process before exec: die when the worker dies (it may be
    killed by a timeout); the program leads a process group of its own, which
    :func:`kill_program_of` kills."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
