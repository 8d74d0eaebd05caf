"""Exceptions a user can catch.

A node's own exception is re-raised at ``compute()`` with its original type; the
remote traceback is attached as ``__cause__`` (a :class:`RemoteTraceback`) and a
note names the node. The classes below cover what is not the node's own doing.
"""
from __future__ import annotations

import os
import reprlib
import subprocess
import sys
import warnings
from typing import Any, Optional

__all__ = [
    "RemoteTraceback",
    "RemoteError",
    "NodeTimeoutError",
    "WorkerDiedError",
    "ExecutableError",
    "UnsatisfiableError",
    "NoBackendError",
]


class RemoteTraceback(Exception):
    """The formatted traceback of a failure in another process."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return "\n\n" + self.tb


class RemoteError(RuntimeError):
    """Stands for a node's exception that cannot be itself in the driver: it cannot be
    pickled in the worker or unpickled in the driver (a class only the worker imports),
    or it would end or interrupt the driver (``SystemExit``, ``KeyboardInterrupt``).

    Its message is ``"<Type>: <message>"``; ``remote_types`` holds the qualified names of
    that exception's class and of the classes it derives from, its own first, which
    ``retry_on=`` matches as it would the class itself.

    >>> RemoteError("Odd: 1/2", ("app.Odd", "builtins.Exception")).remote_types[0]
    'app.Odd'
    """

    def __init__(self, message: str, remote_types: "tuple[str, ...]" = ()) -> None:
        super().__init__(message)
        self.remote_types = tuple(remote_types)

    def is_a(self, types: "tuple[type, ...]") -> bool:
        """Whether the exception it stands for is an instance of one of ``types``."""
        return any(f"{t.__module__}.{t.__qualname__}" in self.remote_types for t in types)


class NodeTimeoutError(TimeoutError):
    """A node ran past its ``timeout=``; its processes were killed."""

    @classmethod
    def of(cls, key: str, timeout: float) -> "NodeTimeoutError":
        """The error for node ``key`` past its ``timeout`` (the scheduler's and the AI
        client's wording are one)."""
        return cls(f"node {key!r} ran past its timeout of {timeout:g} s and was killed")


class WorkerDiedError(RuntimeError):
    """The process running a node died (signal, ``os._exit``, segfault)."""


class ExecutableError(subprocess.CalledProcessError):
    """An executable node exited non-zero; ``stderr`` holds what it wrote."""

    def __str__(self) -> str:
        tail = (self.stderr or "").strip().splitlines()[-10:]
        msg = super().__str__()
        return msg + ("\nstderr (last lines):\n  " + "\n  ".join(tail) if tail else "")


class UnsatisfiableError(ValueError):
    """A node asks for more than any host of the inventory has."""


class NoBackendError(ValueError):
    """No backend of the session can run a node: an unknown ``backend=`` name, or no
    backend that runs its kind and fits its request. ``node`` is the node's key and
    ``tried`` the backends' names."""

    def __init__(self, message: str, node: str, tried: "list[str]") -> None:
        super().__init__(message)
        self.node, self.tried = node, tried


def exception_text(exc: BaseException, limit: Optional[int] = None) -> str:
    """``str(exc)`` for a message, never raising (as :mod:`traceback` words a failed
    ``__str__``), cut to ``limit`` characters if given.

    >>> exception_text(ValueError("x" * 500), limit=10)
    'xxxxxxxxxx... (500 characters)'
    """
    try:
        text = str(exc)
    except BaseException:
        text = "<exception str() failed>"
    if limit is not None and len(text) > limit:
        text = f"{text[:limit]}... ({len(text)} characters)"
    return text


def unreadable_value(key: str, exc: Exception, what: str = "its value") -> RuntimeError:
    """The error for node ``key`` whose value (``what``) came back, but cannot be
    unpickled in the driver, ``exc`` being why."""
    err = RuntimeError(f"node {key!r} finished, but {what} cannot be unpickled in the "
                       f"driver: {type(exc).__name__}: {exc}; return a value of a type the "
                       "driver can import")
    err.__cause__ = exc
    return err


def note_rank(exc: BaseException, rank: int, ranks: int) -> None:
    """Note on ``exc`` the rank of a multi-rank node that failed first (every backend
    words it alike): its other ranks were stopped."""
    add_note(exc, f"rank {rank} of {ranks} failed; the others were stopped")


def add_note(exc: BaseException, note: str) -> BaseException:
    """``exc.add_note(note)`` once (a no-op before Python 3.11, and for an exception
    that refuses notes: its ``__notes__`` not a list, a class that blocks attributes)."""
    try:
        if hasattr(exc, "add_note") and note not in getattr(exc, "__notes__", ()):
            exc.add_note(note)
    except Exception:
        pass
    return exc


_BRIEF = reprlib.Repr()
_BRIEF.maxstring = _BRIEF.maxother = 80


def brief(value: Any) -> str:
    """A short repr of a user's value for an error message: bounded however big the
    value is, and never raising (a ``__repr__`` that fails gives
    ``<Type instance at 0x…>``), so the message it is in always reaches the user.

    >>> brief("x" * 1000)[:12], len(brief("x" * 1000)) <= 80
    ("'xxxxxxxxxxx", True)
    """
    return _BRIEF.repr(value)


def warn(message: str, category: type = RuntimeWarning) -> None:
    """``warnings.warn``, shown at the caller's line outside this package (the user's
    ``compute()``, however deep inside it the warning is made; the caller's own line
    on the session's thread)."""
    here = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(here):
        frame, level = frame.f_back, level + 1
    if frame is None or frame.f_globals.get("__name__") == "threading":
        level = 2  # made on the session's own thread: no user's line, so the caller's
    warnings.warn(message, category, stacklevel=level)
