"""The run journal: finished nodes' values on disk, so a crashed run resumes.

``Session(journal="run-dir")`` (or ``compute(..., journal="run-dir")``) keeps, for
every node that finishes with a value, an entry in ``run-dir``; a later run of the
same program reuses the entries of the nodes that have not changed and runs only the
rest. Failures and cancelled nodes are never kept.

What decides reuse (a node's *journal key*, a hash of):

* its function: the byte code, constants, names and default argument values of its
  code object, the values of the module's numbers and strings it reads by a global
  name (``SCALE = 2``), and the same of every function of the same module it calls by
  a global name, recursively (a changed helper is a change; comments, blank lines and
  moved code are not), or the program's argument vector for an executable, the prompt
  for an AI node;
* its options (resources, timeout, retries...) and its ``version=`` if given
  (``@task(version="2")``: bump it when what the code reads changes but not the code,
  a data file or a module-level table);
* its arguments: plain values by their pickled bytes (a set's items in one order,
  whatever the process's hash seed), upstream nodes by *their* journal keys (so a
  change upstream is a change downstream).

An entry is one file ``<key[:2]>/<key>``: a header (magic, length, a BLAKE2b digest
of the payload) and the value's pickled bytes, written to a temporary file and renamed
into place (the entry last), so a killed writer leaves no entry, only a stray
temporary file. An entry
whose length or digest does not match (a truncated or corrupt file) is ignored and
the node runs again. Beside each entry, ``<key>.why`` records the parts of its key
(JSON), which :func:`explain` compares with a node's to say what changed.

>>> import tempfile, rhapsody_graph as rhapsody
>>> @rhapsody.task
... def square(x): return x * x
>>> journal = Journal(tempfile.mkdtemp())
>>> node = square(3)
>>> journal.get(journal.key(node)) is None
True
>>> journal.put(journal.key(node), node, b"payload")
>>> journal.get(journal.key(square(3)))
b'payload'
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import struct
import tempfile
import types
from typing import Any, Dict, List, Optional, Tuple

from .backends import wire
from .graph import SCALARS, Node

__all__ = ["Journal", "explain"]

MAGIC = b"RGJ1"
HEADER = struct.Struct("<4sQ32s")  # magic, payload length, BLAKE2b-256 of the payload


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=32).digest()


def code_hash(fn: Any) -> str:
    """A hash of ``fn``'s code and the code of the same-module functions it calls."""
    seen: Dict[int, str] = {}
    return _code_hash(getattr(fn, "func", fn), seen)


def _code_hash(fn: Any, seen: Dict[int, str]) -> str:
    if id(fn) in seen:
        return seen[id(fn)] or "cycle"
    seen[id(fn)] = ""
    code = getattr(fn, "__code__", None)
    if code is None:  # a builtin, a class, a callable object: its qualified name
        text = f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', repr(fn))}"
        seen[id(fn)] = text
        return text
    h = hashlib.blake2b(digest_size=16)
    _hash_code(code, h)
    for defaults in (getattr(fn, "__defaults__", None), getattr(fn, "__kwdefaults__", None)):
        if defaults:
            h.update(_stable_bytes(defaults))
    module = getattr(fn, "__module__", None)
    globals_ = getattr(fn, "__globals__", {})
    for name in sorted(_global_names(code)):
        called = globals_.get(name)
        if isinstance(called, types.FunctionType) and called.__module__ == module:
            h.update(name.encode() + _code_hash(called, seen).encode())
        elif hasattr(called, "func") and getattr(called.func, "__module__", None) == module:
            h.update(name.encode() + _code_hash(called.func, seen).encode())  # a task
        elif type(called) in SCALARS:  # a constant of the module: SCALE = 2
            h.update(name.encode() + repr(called).encode())
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            h.update(_stable_bytes(cell.cell_contents))
        except ValueError:  # an empty cell
            pass
    seen[id(fn)] = h.hexdigest()
    return seen[id(fn)]


def _hash_code(code: types.CodeType, h: Any) -> None:
    h.update(code.co_code)
    h.update(repr(code.co_names).encode())
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _hash_code(const, h)
        else:
            h.update(repr(const).encode())


def _global_names(code: types.CodeType) -> set:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


_SET = "\x00set"  # marks a set's items in _ordered


def _ordered(obj: Any) -> Any:
    """``obj`` with every set (in lists, tuples and dicts) as its items in one order:
    a set of strings iterates in an order that changes with each process's hash seed."""
    t = type(obj)
    if t in (list, tuple):
        return t(_ordered(o) for o in obj)
    if t is dict:
        return {_ordered(k): _ordered(v) for k, v in obj.items()}
    if t in (set, frozenset):
        return (_SET, t.__name__, tuple(sorted((_ordered(o) for o in obj), key=_stable_bytes)))
    return obj


def _stable_bytes(obj: Any) -> bytes:
    """Bytes that stand for ``obj`` across runs: its pickle, else its repr without the
    memory addresses that change from run to run (``<function <lambda> at 0x7f...>``)."""
    try:
        return pickle.dumps(obj, 4)
    except Exception:
        return _ADDRESS.sub("", repr(obj)).encode()


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


class Journal:
    """The entries of one journal directory (see the module docstring)."""

    def __init__(self, path: "str | os.PathLike[str]") -> None:
        self.path = os.fspath(path)
        os.makedirs(self.path, exist_ok=True)
        self._keys: Dict[int, str] = {}  # id(node) -> its key, for the nodes seen
        self._nodes: List[Node] = []  # keeps those ids alive and unique
        self._parts: Dict[str, Dict[str, Any]] = {}
        self._code: Dict[int, Tuple[Any, str]] = {}  # id(fn) -> (fn, its code hash)

    # -- keys ------------------------------------------------------------------------

    def key(self, node: Any) -> str:
        """The journal key of ``node`` (upstream nodes' keys computed first)."""
        known = self._keys.get(id(node))
        if known is not None:
            return known
        stack = [node]
        while stack:
            n = stack[-1]
            todo = [d for d in _nodes_of(n) if id(d) not in self._keys]
            if todo:
                stack.extend(todo)
                continue
            stack.pop()
            if id(n) not in self._keys:
                parts = self.parts(n)
                key = hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(),
                                      digest_size=20).hexdigest()
                self._keys[id(n)] = key
                self._nodes.append(n)
                self._parts[key] = parts
        return self._keys[id(node)]

    def parts(self, node: Any) -> Dict[str, Any]:
        """What ``node``'s key is made of (its upstream nodes' keys must be known)."""
        deps = _nodes_of(node)
        try:  # upstream nodes and futures as their slots: their keys come in "inputs"
            args = hashlib.blake2b(wire.dump_plain(_ordered((node.args, node.kwargs)),
                                                   node.deps), digest_size=16).hexdigest()
        except Exception:
            args = hashlib.blake2b(repr((node.args, node.kwargs)).encode(),
                                   digest_size=16).hexdigest()
        opts = node.opts
        options = {k: repr(v) for k, v in sorted(opts.values.items())
                   if k not in ("name", "backend")}  # where it runs is no part of its value
        return {"name": node.name, "kind": node.kind, "code": self._fn_hash(node),
                "options": options, "args": args,
                "inputs": [self._keys[id(d)] for d in deps]}

    def _fn_hash(self, node: Any) -> str:
        """The hash of what ``node`` runs, once per function (many nodes share one)."""
        known = self._code.get(id(node.fn))
        if known is None or known[0] is not node.fn:
            known = self._code[id(node.fn)] = (node.fn, _fn_hash(node))
        return known[1]

    # -- entries -----------------------------------------------------------------------

    def _file(self, key: str) -> str:
        return os.path.join(self.path, key[:2], key)

    def get(self, key: str) -> Optional[bytes]:
        """The value bytes kept for ``key``; None if none, or if the entry is damaged."""
        try:
            with open(self._file(key), "rb") as f:
                data = f.read()
        except OSError:
            return None
        if len(data) < HEADER.size:
            return None
        magic, length, digest = HEADER.unpack_from(data)
        payload = data[HEADER.size:]
        if magic != MAGIC or length != len(payload) or digest != _digest(payload):
            return None
        return payload

    def put(self, key: str, node: Any, payload: bytes) -> None:
        """Keep ``payload`` (a finished node's value bytes) under ``key``, atomically."""
        directory = os.path.dirname(self._file(key))
        os.makedirs(directory, exist_ok=True)
        why = self._parts.get(key) or self.parts(node)
        for path, data in ((self._file(key) + ".why", json.dumps(why).encode()),
                           (self._file(key),
                            HEADER.pack(MAGIC, len(payload), _digest(payload)) + payload)):
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as f:  # no fsync: a lost write fails its digest
                    f.write(data)
                os.replace(tmp, path)
            except BaseException:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                raise

    def explain(self, node: Any) -> str:
        """Whether ``node`` would be reused from this journal, and if not, why."""
        key = self.key(node)
        if self.get(key) is not None:
            return f"node {node.key!r} is reused: its entry {key} is in {self.path}"
        if os.path.exists(self._file(key)):
            return (f"node {node.key!r} runs again: its entry {key} is damaged (truncated or "
                    "corrupt), so it is not trusted")
        mine = self._parts[key]
        best = None
        for root, _, files in os.walk(self.path):
            for name in files:
                if name.endswith(".why"):
                    try:
                        with open(os.path.join(root, name)) as f:
                            theirs = json.load(f)
                    except (OSError, ValueError):
                        continue
                    if theirs.get("name") == mine["name"] and theirs.get("kind") == mine["kind"]:
                        changed = [p for p in ("code", "options", "args", "inputs")
                                   if theirs.get(p) != mine[p]]
                        if best is None or len(changed) < len(best):
                            best = changed
        if best is None:
            return (f"node {node.key!r} runs: no entry of a node named {mine['name']!r} is in "
                    f"{self.path}")
        what = {"code": "its function's code (or a function it calls) changed",
                "options": "its options changed",
                "args": "its arguments changed",
                "inputs": "an upstream node changed"}
        return f"node {node.key!r} runs again: " + "; ".join(what[p] for p in best)


def _nodes_of(node: Any) -> List[Any]:
    """The upstream nodes of ``node`` (a future stands for its node)."""
    return [getattr(d, "node", d) for d in node.deps]


def _fn_hash(node: Any) -> str:
    if node.kind == "function":
        return code_hash(node.fn)
    return hashlib.blake2b(_stable_bytes(node.fn), digest_size=16).hexdigest()


def explain(node: Any, journal: "str | os.PathLike[str]") -> str:
    """Say whether ``node`` would be reused from the journal at ``journal``, or why not.

    >>> import tempfile, rhapsody_graph as rhapsody
    >>> rhapsody.explain(rhapsody.task(abs)(-1), tempfile.mkdtemp())  # doctest: +ELLIPSIS
    "node 'abs-...' runs: no entry of a node named 'abs' is in ..."
    """
    return Journal(journal).explain(node)
