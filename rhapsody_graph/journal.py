"""The run journal: finished nodes' values on disk, so a crashed run resumes.

``Session(journal="run-dir")`` (or ``compute(..., journal="run-dir")``) keeps, for
every node that finishes with a value, an entry in ``run-dir``; a later run of the
same program reuses the entries of the nodes that have not changed and runs only the
rest. Failures and cancelled nodes are never kept.

What decides reuse (a node's *journal key*, a hash of):

* what it runs: for a function, the byte code, constants, names and default argument
  values of its code object, the values of the module's numbers, strings and
  enumeration members it reads by a global name (``SCALE = 2``), and the same of every
  function of the same module it reads by a global name, and of every method of the
  same module's classes it reads so (``Model().score(x)``; a module's object: its
  class), recursively (a changed helper or method is a change; comments, blank lines
  and moved code are not), and any other global name by the qualified name of what it
  stands for; a ``functools.partial``'s bound
  arguments too (nested ones as well), a callable object's class and pickled state, a
  bound method's object; for an executable its whole spec (argument vector, ``env=``,
  ``cwd=``), for an AI node its prompt and its model as declared (engine, endpoint or
  weights file with its size and time, server arguments);
* its options (resources, ranks, placement...), but not those that cannot change its
  value (:data:`UNKEYED`: where it runs by name, and its timeout and retry policy, so
  a resume with a longer ``timeout=`` reuses what ran), and its ``version=`` if given
  (``@task(version="2")``: bump it when what the code reads changes but not the code,
  a data file or a module-level table);
* its arguments: plain values by their pickled bytes (a class of the user's code, not
  of the standard library or an installed package, an object's too, by its name and
  code hash, as a class a function reads), upstream nodes by *their*
  journal keys (so a change upstream is a change downstream). Every set, at any depth
  (in a list, a dataclass, a namedtuple, an executable's spec, a default value), is
  written as its items in one order, whatever the process's hash seed; what plain
  pickle cannot take (a class defined in a function) counts by its cloudpickle, which
  may differ from run to run (the node then runs again: never a wrong reuse); a node
  whose arguments neither can take has no key: it always runs and is never kept.

An entry is one file ``<key[:2]>/<key>``: a header (magic, length, a BLAKE2b digest
of the payload) and the value's pickled bytes, written to a temporary file and renamed
into place (the entry last), so a killed writer leaves no entry, only a stray
temporary file. An entry whose length or digest does not match (a truncated or corrupt
file) is ignored and the node runs again. Beside each entry, ``<key>.why`` records the
parts of its key (JSON), which :func:`explain` compares with a node's to say what changed.

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

import enum
import functools
import hashlib
import inspect
import io
import json
import numbers
import os
import struct
import sys
import tempfile
import threading
import types
import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .backends import wire
from .graph import SCALARS
from .task import Task

__all__ = ["Journal", "explain", "UNKEYED", "Unkeyable"]

#: options no part of a node's key: they choose where and under which policy it runs,
#: never what it computes
UNKEYED = frozenset(("name", "backend", "timeout", "retries", "retry_on", "backoff"))

MAGIC = b"RGJ1"
HEADER = struct.Struct("<4sQ32s")  # magic, payload length, BLAKE2b-256 of the payload


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=32).digest()


def code_hash(fn: Any) -> str:
    """A hash of what calling ``fn`` runs (see the module docstring)."""
    return _code_hash(fn, {})


def _code_hash(fn: Any, seen: Dict[int, str]) -> str:
    """The hash of ``fn``: a function, a class, a partial, a task, a bound method or a
    callable object; ``seen`` holds the ones hashed (each once, a cycle once)."""
    if id(fn) in seen:
        return seen[id(fn)] or "cycle"
    seen[id(fn)] = ""
    h = hashlib.blake2b(digest_size=16)
    if isinstance(fn, Task):
        h.update(_code_hash(fn.func, seen).encode())
    elif isinstance(fn, functools.partial):  # its function and its bound arguments
        h.update(_code_hash(fn.func, seen).encode()
                 + _stable_bytes((fn.args, fn.keywords), (), seen))
    elif isinstance(fn, types.MethodType):  # its function and the object it is bound to
        h.update(_code_hash(fn.__func__, seen).encode() + _stable_bytes(fn.__self__, (), seen))
    elif isinstance(fn, type):
        _hash_class(fn, h, seen)
    elif isinstance(fn, types.FunctionType):
        _hash_function(fn, h, seen)
    elif callable(fn) and not isinstance(fn, types.BuiltinFunctionType):  # an object
        h.update(_code_hash(type(fn), seen).encode() + _stable_bytes(fn, (), seen))
    else:  # a builtin: its qualified name
        h.update(f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', '')}".encode())
    seen[id(fn)] = h.hexdigest()
    return seen[id(fn)]


def _hash_function(fn: types.FunctionType, h: Any, seen: Dict[int, str]) -> None:
    _hash_code(fn.__code__, h)
    for defaults in (fn.__defaults__, fn.__kwdefaults__):
        if defaults:
            h.update(_stable_bytes(defaults, (), seen))
    module = fn.__module__
    for name in sorted(_global_names(fn.__code__)):
        if name in fn.__globals__:
            h.update(name.encode() + b"=" + _global_part(fn.__globals__[name], module, seen))
    for cell in fn.__closure__ or ():
        try:
            h.update(_stable_bytes(cell.cell_contents, (), seen))
        except ValueError:  # an empty cell
            pass


_CODE = (types.FunctionType, type, functools.partial, Task)  # what _hash_function follows


def _global_part(value: Any, module: str, seen: Dict[int, str]) -> bytes:
    """What a global name a function of ``module`` reads adds to its hash: a constant
    its value; a helper, class or object of the user's code (``module``'s, or another
    module of the user's) its code (an object: its class's); a module of the user's
    its file's text (``cfg.N``); anything else what it is by name (``floor`` from
    ``math`` is not ``ceil``; a library's code is not followed)."""
    constant = _constant(value)
    if constant is not None:  # SCALE = 2, Mode.FAST, np.float64(1.5)
        return constant
    wrapped = getattr(value, "__wrapped__", None)  # functools.cache, a decorator's
    for code in (value, wrapped):
        if isinstance(code, _CODE) and _ours(_module(code), module):
            return _code_hash(code, seen).encode()
    if isinstance(value, types.ModuleType):
        return value.__name__.encode() + (_file_hash(value, seen) if _users(value.__name__)
                                          else b"")
    if not callable(value) and _ours(type(value).__module__, module):  # MODEL = Model()
        return _code_hash(type(value), seen).encode()
    inner = value.func if isinstance(value, (Task, functools.partial)) else value
    return (f"{_module(value)}.{getattr(inner, '__qualname__', type(inner).__qualname__)}"
            .encode())


def _ours(defined_in: Optional[str], module: str) -> bool:
    """Whether code of module ``defined_in`` counts by its code in a function of
    ``module``'s hash: ``module``'s own, or another module of the user's code."""
    return defined_in is not None and (defined_in == module or _users(defined_in))


def _file_hash(module: types.ModuleType, seen: Dict[int, str]) -> bytes:
    """The hash of the text of a module's file (once per hash: ``seen``)."""
    known = seen.get(id(module))
    if not known:
        try:
            with open(module.__file__, "rb") as f:  # type: ignore[arg-type]
                known = hashlib.blake2b(f.read(), digest_size=16).hexdigest()
        except (OSError, TypeError):
            known = "no file"
        seen[id(module)] = known
    return known.encode()


def _constant(value: Any) -> Optional[bytes]:
    """A number's, string's or enumeration member's ``repr``, and a tuple's of such
    (``W = (1, 2)``); ``None`` for other values."""
    if type(value) in SCALARS or isinstance(value, (numbers.Number, str, bytes, enum.Enum)):
        return repr(value).encode()
    if type(value) is tuple:
        items = [_constant(v) for v in value]
        if all(i is not None for i in items):
            return b"(" + b",".join(items) + b")"  # type: ignore[arg-type]
    return None


def _module(obj: Any) -> Optional[str]:
    """The module that defines ``obj`` (a task's or a partial's: its function's)."""
    return getattr(obj.func if isinstance(obj, (Task, functools.partial)) else obj,
                   "__module__", None)


def _hash_class(cls: type, h: Any, seen: Dict[int, str]) -> None:
    """The code of ``cls``'s methods (and properties), its constants, and the same of its
    base classes of its module."""
    for name, attr in sorted(vars(cls).items()):
        if isinstance(attr, (staticmethod, classmethod)):
            attr = attr.__func__
        functions = (attr.fget, attr.fset, attr.fdel) if isinstance(attr, property) else (attr,)
        for f in functions:  # not attrs' generated ones (its __hash__ holds a seeded hash)
            if isinstance(f, types.FunctionType) and not f.__code__.co_filename.startswith(
                    _GENERATED):
                h.update(name.encode() + _code_hash(f, seen).encode())
        constant = _constant(attr)
        if constant is not None and not name.startswith("__"):
            h.update(name.encode() + constant)
    for base in cls.__bases__:
        if _ours(base.__module__, cls.__module__):
            h.update(_code_hash(base, seen).encode())


#: the file name attrs gives the methods it generates: its ``__hash__`` holds a constant
#: made by ``hash()`` of a string, which changes with the process's hash seed
_GENERATED = "<attrs generated"


def _hash_code(code: types.CodeType, h: Any) -> None:
    h.update(code.co_code)
    h.update(repr(code.co_names).encode())
    # the parameters by name and kind: swapping two changes what a keyword binds to
    params = code.co_argcount + code.co_kwonlyargcount + bool(code.co_flags & _STARS[0]) + bool(
        code.co_flags & _STARS[1])
    h.update(repr((code.co_varnames[:params], code.co_posonlyargcount, code.co_argcount,
                   code.co_flags & (_STARS[0] | _STARS[1]))).encode())
    h.update(_stable_bytes(tuple(c for c in code.co_consts if not isinstance(c, types.CodeType))))
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _hash_code(const, h)


_STARS = (inspect.CO_VARARGS, inspect.CO_VARKEYWORDS)


def _global_names(code: types.CodeType) -> set:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


class _KeyPickling:
    """wire's argument pickler (an upstream node as its slot) that writes a set as its
    items' pickles in order (a set of strings iterates in an order that changes with
    each process's hash seed), a function as its code hash (its name would hide an
    edit; a lambda has none), and a class of the user's code (an object's class, too)
    as its name and code hash. Sets and functions at any depth (in a dataclass, an AI
    node's ``parse=``) come here: pickle asks ``persistent_id`` of every object,
    ``reducer_override`` not of sets. ``seen``: the code hashes made in this key."""

    cloud = False  # cloudpickle's (for what plain pickle cannot take), else plain pickle's

    def __init__(self, file: io.BytesIO, slots: Dict[int, int], seen: Dict[int, str],
                 codes: Dict[int, Tuple[Any, str]]) -> None:
        super().__init__(file, slots)  # type: ignore[call-arg]
        self.seen, self.codes = seen, codes

    def persistent_id(self, obj: Any) -> Any:
        t = type(obj)
        if t in SCALARS:  # most objects: no slot, no set (pickle asks of each)
            return None
        if t is types.FunctionType:
            if id(obj) in self.seen:  # being hashed: a cycle, its hash partial (not kept)
                return "code", _code_hash(obj, self.seen)
            return "code", self._known(obj)
        if isinstance(obj, type) and _users(str(obj.__module__)):
            return "class", f"{obj.__module__}.{obj.__qualname__}", self._known(obj)
        if not isinstance(obj, (set, frozenset)):
            return self.slots.get(id(obj))  # an upstream node: its slot
        kinds = {type(o) for o in obj}
        if len(kinds) == 1 and kinds <= _SORTABLE:  # as they are: no pickle per item
            items: tuple = tuple(sorted(obj))
        else:
            items = tuple(sorted(_pickled(o, self.slots, self.seen, self.codes, self.cloud) for o in obj))
        if t is set or t is frozenset:
            return t.__name__, items
        state = getattr(obj, "__dict__", None)  # a subclass: its type and attributes too
        return f"{t.__module__}.{t.__qualname__}", items, _pickled(
            state, self.slots, self.seen, self.codes, self.cloud) if state else b""

    def _known(self, obj: Any) -> str:
        """The whole code hash of a function or class met in an argument, made once. One
        met again while its own hash is being made (a cycle through closures, defaults,
        a class's methods) stands as "cycle" there, and what contains it is not kept."""
        name = _library_name(obj)
        if name is not None:  # a library's (math.floor, dask's getter): by its name
            return name
        known = self.codes.get(id(obj))
        if known is not None and known[0] is obj:
            return known[1]
        making = _MAKING.__dict__.setdefault("ids", {})  # id -> whether a cycle met it
        if not making:  # the outermost: the whole hashes made under it are kept for it
            _MAKING.made = {}
        made: Dict[int, Tuple[Any, str]] = _MAKING.made
        known = made.get(id(obj))
        if known is not None and known[0] is obj:  # met again down another path
            return known[1]
        if id(obj) in making:
            for k in making:  # every hash being made holds this partial one
                making[k] = True
            return "cycle"
        making[id(obj)] = False
        try:
            made_hash = _code_hash(obj, {})  # of its own: not this key's partial ones
        finally:
            partial = making.pop(id(obj))
        if not partial:
            self.codes[id(obj)] = made[id(obj)] = (obj, made_hash)
        return made_hash


_MAKING = threading.local()  # the whole hashes _KeyPickling._known is making, per thread


def _library_name(obj: Any) -> Optional[str]:
    """``module.qualname`` of a function or class of a library (not the user's code)
    that this name finds again; ``None`` for any other (the user's, or one a library
    made at run time, a closure or generated code, which counts by its code)."""
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not (isinstance(module, str) and isinstance(qualname, str)) or _users(module):
        return None
    found: Any = sys.modules.get(module)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    return f"{module}.{qualname}" if found is obj else None


@functools.lru_cache(maxsize=None)
def _users(module: str) -> bool:
    """Whether ``module`` is the user's code (``__main__``, or a file outside the
    standard library and the installed packages): its classes in an argument count by
    their code, others' by their name only."""
    if module == "__main__":
        return True
    if module.partition(".")[0] in sys.stdlib_module_names:
        return False
    path = getattr(sys.modules.get(module), "__file__", None)
    if not path:
        return False
    path = os.path.realpath(path)
    return not any(path.startswith(d) for d in _library_dirs())


@functools.lru_cache(maxsize=None)
def _library_dirs() -> Tuple[str, ...]:
    """Where the standard library and installed packages live, ending in a separator."""
    import site
    import sysconfig
    dirs = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    dirs.update(site.getsitepackages())
    dirs.add(site.getusersitepackages())
    return tuple(os.path.join(os.path.realpath(d), "") for d in dirs if d)


class _KeyPickler(_KeyPickling, wire.PlainArgPickler):  # type: ignore[misc, valid-type]
    """The key pickler on plain pickle."""


@functools.lru_cache(maxsize=None)
def _cloud_key_pickler() -> type:
    """The key pickler on cloudpickle (made on first need): a class of the driver's
    script, or one defined in a function, by value, state included."""
    class CloudKeyPickler(_KeyPickling, wire.cloud_args_pickler()):  # type: ignore[misc]
        cloud = True
    return CloudKeyPickler


class Unkeyable(Exception):
    """A node's arguments (or its function's bound state) cannot be pickled to a key."""


_SORTABLE = {str, int, bytes}  # items of one of these types sort the same in any process


def _pickled(obj: Any, slots: Dict[int, int], seen: Dict[int, str],
             codes: Dict[int, Tuple[Any, str]], cloud: bool = False) -> bytes:
    buf = io.BytesIO()
    (_cloud_key_pickler() if cloud else _KeyPickler)(buf, slots, seen, codes).dump(obj)
    return buf.getvalue()


def _stable_bytes(obj: Any, deps: Sequence[Any] = (), seen: Optional[Dict[int, str]] = None,
                  codes: Optional[Dict[int, Tuple[Any, str]]] = None) -> bytes:
    """Bytes that stand for ``obj`` across runs: its plain pickle (sets in one order,
    functions by their code, each of ``deps`` as its slot), else its cloudpickle (a class
    pickle cannot name goes by value: such a key may differ from run to run, never
    stand for another value); ``seen`` as :func:`_code_hash`'s, ``codes`` the functions'
    hashes known (a journal's, kept across its keys). Raise :class:`Unkeyable` if
    neither can take it (a repr would hide state: two values, one key)."""
    slots = {id(d): i for i, d in enumerate(deps)}
    seen = {} if seen is None else seen
    codes = {} if codes is None else codes
    try:
        return _pickled(obj, slots, seen, codes)
    except Exception:
        pass
    try:
        return _pickled(obj, slots, seen, codes, cloud=True)
    except Exception as e:
        raise Unkeyable(f"{type(e).__name__}: {e}") from None


class Journal:
    """The entries of one journal directory (see the module docstring)."""

    def __init__(self, path: "str | os.PathLike[str]") -> None:
        self.path = os.fspath(path)
        os.makedirs(self.path, exist_ok=True)
        # node -> its key ("": none, see key()), while the node lives
        self._keys: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()
        self._parts: Dict[str, Dict[str, Any]] = {}  # key -> its parts, until put()
        self._code: Dict[int, Tuple[Any, str]] = {}  # id(fn) -> (fn, its code hash)

    # -- keys ------------------------------------------------------------------------

    def new_run(self) -> None:
        """Forget the code hashes and keys made so far: a session's next ``compute()`` or
        ``submit()`` may follow an edit made meanwhile (a notebook's cell, a module
        constant changed), which they would hide. New tables, not cleared ones: a key
        being made in another thread finishes with the tables it began with."""
        self._keys, self._code, self._parts = weakref.WeakKeyDictionary(), {}, {}

    def key(self, node: Any) -> Optional[str]:
        """The journal key of ``node`` (upstream nodes' keys computed first); None when
        it has none: its arguments (or its function's bound state) cannot be pickled,
        or an upstream node has none. Such a node always runs and is never kept."""
        keys = self._keys
        known = keys.get(node)
        if known is None:
            stack = [node]
            while stack:
                n = stack[-1]
                todo = [d for d in _nodes_of(n) if d not in keys]
                if todo:
                    stack.extend(todo)
                    continue
                stack.pop()
                if n not in keys:
                    keys[n] = self._new_key(n, keys)
            known = keys[node]
        return known or None

    def _new_key(self, node: Any, keys: Any) -> str:
        try:
            parts = self.parts(node, keys)
        except Unkeyable:
            return ""
        key = hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(),
                              digest_size=20).hexdigest()
        self._parts[key] = parts
        return key

    def parts(self, node: Any, keys: Any = None) -> Dict[str, Any]:
        """What ``node``'s key is made of (its upstream nodes' keys must be in ``keys``,
        by default the journal's); raise :class:`Unkeyable` where it has no key."""
        keys = self._keys if keys is None else keys
        if node.released:  # a finished future's node, gone: what it took is not known
            raise Unkeyable("its inputs were let go")
        inputs = [keys[d] for d in _nodes_of(node)]
        if not all(inputs):
            raise Unkeyable("an upstream node has no journal key")
        args = _hash((node.args, node.kwargs), node.deps, self._code)  # upstream: "inputs"
        opts = node.opts
        options = {k: repr(v) for k, v in sorted(opts.values.items())
                   if k not in UNKEYED}
        return {"name": node.name, "kind": node.kind, "code": self._fn_hash(node),
                "options": options, "args": args, "inputs": inputs}

    def _fn_hash(self, node: Any) -> str:
        """The hash of what ``node`` runs, once per function (many nodes share one)."""
        known = self._code.get(id(node.fn))
        if known is None or known[0] is not node.fn:
            known = self._code[id(node.fn)] = (node.fn, _fn_hash(node, self._code))
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
        why = self._parts.pop(key, None)
        if why is None:  # a second node of that key, its parts made in an earlier run
            try:
                why = self.parts(node)
            except (KeyError, Unkeyable):  # (of tables new_run() has replaced since)
                why = {}
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
        if key is None:
            return (f"node {node.key!r} runs every time and is never kept: its arguments, "
                    "its function's bound state or an upstream node's cannot be pickled "
                    "to a journal key, or it takes a finished future that let go of its "
                    "node's inputs (keep that node, or give the session a journal=)")
        if self.get(key) is not None:
            return f"node {node.key!r} is reused: its entry {key} is in {self.path}"
        if os.path.exists(self._file(key)):
            return (f"node {node.key!r} runs again: its entry {key} is damaged (truncated or "
                    "corrupt), so it is not trusted")
        mine = self._parts.get(key) or self.parts(node)
        best = None
        for root, _, files in os.walk(self.path):
            for name in files:
                if name.endswith(".why"):
                    try:
                        with open(os.path.join(root, name)) as f:
                            theirs = json.load(f)
                    except (OSError, ValueError):
                        continue
                    if not isinstance(theirs, dict):  # not a record of ours
                        continue
                    if theirs.get("name") == mine["name"] and theirs.get("kind") == mine["kind"]:
                        changed = [p for p in ("code", "options", "args", "inputs")
                                   if theirs.get(p) != mine[p]]
                        if best is None or len(changed) < len(best):
                            best = changed
        if best is None:
            return (f"node {node.key!r} runs: no entry of a node named {mine['name']!r} is in "
                    f"{self.path}")
        what = {"code": "its function's code (or a function or class it uses; an "
                        "executable's command, env or cwd) changed",
                "options": "its options changed",
                "args": "its arguments changed",
                "inputs": "an upstream node changed"}
        return f"node {node.key!r} runs again: " + "; ".join(what[p] for p in best)


def _nodes_of(node: Any) -> List[Any]:
    """The upstream nodes of ``node`` (a future stands for its node)."""
    return [getattr(d, "node", d) for d in node.deps]


def _fn_hash(node: Any, codes: Dict[int, Tuple[Any, str]]) -> str:
    """A function's code hash; an executable's or AI node's whole spec (argv, env and cwd;
    the prompt), upstream nodes in it as their slots; ``codes``: as :func:`_stable_bytes`'s."""
    if node.kind == "function":
        return code_hash(node.fn)
    if node.kind == "ai":  # and the model it asks, as declared now
        from .ai.models import lookup
        try:
            model = lookup(node.fn.model, f"node {node.key!r}").identity()
        except ValueError:  # not declared (yet): it fails, or is keyed, when it runs
            raise Unkeyable(f"model {node.fn.model!r} is not declared") from None
        return _hash((node.fn, model), node.deps, codes)
    return _hash(node.fn, node.deps, codes)


def _hash(obj: Any, deps: Sequence[Any], codes: Dict[int, Tuple[Any, str]]) -> str:
    return hashlib.blake2b(_stable_bytes(obj, deps, None, codes), digest_size=16).hexdigest()


def explain(node: Any, journal: "str | os.PathLike[str]") -> str:
    """Say whether ``node`` would be reused from the journal at ``journal``, or why not.

    >>> import tempfile, rhapsody_graph as rhapsody
    >>> rhapsody.explain(rhapsody.task(abs)(-1), tempfile.mkdtemp())  # doctest: +ELLIPSIS
    "node 'abs-...' runs: no entry of a node named 'abs' is in ..."
    """
    if not os.path.isdir(journal):  # never made here: a typo is not a journal
        return f"node {node.key!r} runs: there is no journal at {os.fspath(journal)!r}"
    return Journal(journal).explain(node)
