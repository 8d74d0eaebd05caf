"""What a Python node prints, kept per call in the process that runs it.

A worker replaces ``sys.stdout`` and ``sys.stderr`` once with a :class:`Tee`: every
write still goes where it went before (the driver's terminal for a local worker,
Dragon's output for a Batch call) and is also kept, up to :data:`LIMIT` characters
with the tail kept, until the call ends and :meth:`Tee.take` hands it over with the
call's result. Writes made below Python (C code, ``os.system``, child processes)
reach the file descriptor directly and are not kept: run those as executables.

>>> import io
>>> tee = Tee(io.StringIO(), limit=8)
>>> _ = tee.write("hello "); _ = tee.write("world\\n")
>>> tee.take()
'...o world\\n'
"""
from __future__ import annotations

import sys
from typing import Any, List, TextIO, Tuple

LIMIT = 1 << 20  # characters kept per stream and call (the tail)
CUT = "..."  # marks where the head of a longer output was dropped


class Tee:
    """A text stream that writes through to ``stream`` and keeps what was written."""

    def __init__(self, stream: TextIO, limit: int = LIMIT) -> None:
        self.stream, self.limit = stream, limit
        self._parts: List[str] = []
        self._size = 0
        self._cut = False

    def write(self, text: str) -> int:
        n = self.stream.write(text)
        if text:
            self._parts.append(text)
            self._size += len(text)
            if self._size > 2 * self.limit:  # bounded memory: trim as it grows
                self._trim()
        return n

    def _trim(self) -> None:
        text = "".join(self._parts)
        if len(text) > self.limit:
            text, self._cut = text[-self.limit:], True
        self._parts, self._size = [text], len(text)

    def take(self) -> str:
        """What was written since the last call (its tail, marked, if it was longer)."""
        if not self._parts:
            return ""
        self._trim()
        text = CUT + self._parts[0] if self._cut else self._parts[0]
        self._parts, self._size, self._cut = [], 0, False
        return text

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:  # fileno, encoding, isatty, ...
        return getattr(self.stream, name)


def install() -> Tuple[Tee, Tee]:
    """Replace ``sys.stdout``/``sys.stderr`` with tees (once per process); return them."""
    if not isinstance(sys.stdout, Tee):
        sys.stdout = Tee(sys.stdout)
    if not isinstance(sys.stderr, Tee):
        sys.stderr = Tee(sys.stderr)
    return sys.stdout, sys.stderr
