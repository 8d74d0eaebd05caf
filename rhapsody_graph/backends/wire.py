"""The bytes on the pipes between the driver and a worker process.

Values travel pickled (protocol 5, cloudpickle when plain pickle cannot), and the
driver keeps a result as those bytes: it hands them on to dependents without
ever unpickling them, and decodes only what ``compute()`` returns.

Driver → worker: frames of ``<Q`` length + a pickled message:

* ``("run", [task, ...])`` with ``task = (tid, fid, func_bytes | None, args, deps, place)``;
  ``args`` is, for a call of scalars alone (``f(1, "a")``), its argument tuple;
  for a call whose upstream nodes are all plain positional arguments beside scalars
  (``inc(x)``, ``add(x, 1)``), the pair ``((arguments with None in their places),
  ((position, slot), ...))``: a call with upstream values (both pickled once, with
  the frame: no pickler of our own on either side; and plain tuples of scalars,
  which Python's collector stops tracking while the call waits); else the bytes of
  ``(args, kwargs)`` pickled with every upstream node written as a persistent
  reference (its position in ``deps``, the upstream values' bytes);
* ``("drop",)``: discard queued tasks, answer ``DROPPED`` for each;
* ``("forget",)``: clear the function cache (sent at the end of a run);
* ``("path", sys_path)``: import from the driver's path (sent first).

The same frames carry the requests and answers between the driver and a Dragon
service host (:mod:`.service_host`), over a socket (:func:`send_message`,
:func:`recv_message`).

Worker → driver: a fixed header ``<BQdQ`` (status, tid, seconds, payload length; the
status carries ``GPU_RUNTIME`` once CUDA/ROCm/Level Zero is loaded in that worker) and
the payload: the value's bytes (``OK``) or ``(exception | None, summary, traceback)``
(``ERROR``). The pipes are private to the two processes: nothing listens on a port.
"""
from __future__ import annotations

import functools
import io
import os
import pickle
import struct
import sys
from types import CodeType
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from ..errors import RemoteError, RemoteTraceback, add_note, brief, exception_text
from ..graph import SCALARS

OK, ERROR, DROPPED = 0, 1, 2
IMPORTING = False  # True in a worker while it unpickles a task (and imports its module)
GPU_RUNTIME = 0x80  # or-ed into a status once the worker has loaded a GPU runtime
OUTPUT = 0x40  # or-ed into a status when the payload starts with the call's stdout/stderr
RESULT = struct.Struct("<BQdQ")
OUTPUT_HEAD = struct.Struct("<QQ")  # bytes of stdout, of stderr
LENGTH = struct.Struct("<Q")
PROTOCOL = 5
#: bytes one read of a channel asks for: what a pipe holds. Asking for 128 KiB or more
#: costs an mmap and an munmap per read (~15 us here), whatever arrives
READ = 1 << 16
Args = Union[bytes, tuple]  # a call's arguments as dump_args gives them
MAIN = b"__main__"  # in a plain pickle: a reference to the driver's script (by value instead)
#: in a worker: caches of calls' code kept for a run, emptied when the driver says the
#: run ended (``("forget",)``), as the worker's own function cache is
PER_RUN: List[Dict[Any, Any]] = []
DYNAMIC_CODE = "<dynamic-code>"  # the file cloudpickle 3.1 gives code it sends by value


def dump_value(obj: Any) -> bytes:
    """Pickle ``obj``; cloudpickle when plain pickle cannot (lambdas), or would refer to
    ``__main__`` (a function or class of the driver's script, which no worker has)."""
    try:
        data = pickle.dumps(obj, PROTOCOL)
        if MAIN not in data:
            return data
    except Exception:
        pass
    return _cloud_dumps(obj)


def await_coroutine(value: Any) -> Any:
    """The value of an ``async def`` function's call: its coroutine ``value`` run to its
    end, in an event loop of its own (``asyncio.run``). Executors call it when a call
    returns a coroutine (``type(value) is CoroutineType``: one test per call)."""
    import asyncio
    return asyncio.run(value)


def dump_result(value: Any, to: str = "back to the driver") -> bytes:
    """A call's return value pickled to go ``to`` where it is read; raise ``TypeError``
    naming its type when it cannot be (a lock, an open file, a generator)."""
    try:
        return dump_value(value)
    except Exception as exc:
        raise TypeError(f"the value it returned, {type(value).__name__} {brief(value)}, cannot "
                        f"be pickled to go {to}: {exc}; return plain data instead") from exc


@functools.lru_cache(maxsize=None)
def _cloud_pickler() -> type:
    """cloudpickle's pickler, imported on first need (a worker whose calls pickle plainly,
    an importable function and plain values, starts without it: pickle imports it to
    load what it wrote), keeping the source file of the code it sends by value:
    cloudpickle 3.1 writes ``<dynamic-code>`` there, so a remote traceback through a
    script's function would show neither its file nor its lines."""
    import cloudpickle
    reduce_code = getattr(cloudpickle.cloudpickle, "_code_reduce", None)

    class FileKeepingPickler(cloudpickle.Pickler):  # type: ignore[misc, valid-type]
        def reducer_override(self, obj: Any) -> Any:
            if type(obj) is CodeType and reduce_code is not None:
                make, args = reduce_code(obj)
                return make, tuple(obj.co_filename if type(a) is str and a == DYNAMIC_CODE
                                   else a for a in args)
            return super().reducer_override(obj)
    return FileKeepingPickler


def _cloud_dumps(obj: Any) -> bytes:
    buf = io.BytesIO()
    _cloud_pickler()(buf, PROTOCOL).dump(obj)
    return buf.getvalue()


class _TaskFunctionRef:
    """Pickles as "import module, take attribute ``qualname``, use its ``.func``"."""

    def __init__(self, module: str, qualname: str) -> None:
        self.module, self.qualname = module, qualname

    def __reduce__(self):
        return (load_task_function, (self.module, self.qualname))


def load_task_function(module: str, qualname: str) -> Any:
    import importlib
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return getattr(obj, "func", obj)


def dump_callable(fn: Any) -> bytes:
    """Pickle a task's function: by reference when importable, else by value."""
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", "")
    if module and module != "__main__" and "<" not in qualname:
        try:
            if load_task_function(module, qualname) is fn:
                return pickle.dumps(_TaskFunctionRef(module, qualname), PROTOCOL)
        except Exception:
            pass
    return _cloud_dumps(fn)


def _pickler_for(base: type) -> type:
    class ArgPickler(base):  # type: ignore[misc, valid-type]
        """Writes each upstream node as a reference to its slot in ``deps``."""

        def __init__(self, file: io.BytesIO, slots: Dict[int, int]) -> None:
            super().__init__(file, PROTOCOL)
            self.slots = slots

        def persistent_id(self, obj: Any) -> Optional[int]:
            # ids are unique among live objects and every dep is alive here
            return self.slots.get(id(obj))
    return ArgPickler


#: plain pickle's argument pickler: ``PlainArgPickler(file, {id(dep): slot}).dump(obj)``
#: writes each upstream node in ``obj`` as its slot (the journal's keys build on it)
PlainArgPickler = _pickler_for(pickle.Pickler)


@functools.lru_cache(maxsize=None)
def cloud_args_pickler() -> type:
    """cloudpickle's argument pickler, made on first need."""
    return _pickler_for(_cloud_pickler())


def _picklers() -> Iterator[type]:
    """Plain pickle's argument pickler, then (if it cannot) cloudpickle's."""
    yield PlainArgPickler
    yield cloud_args_pickler()



def dump_args(args: tuple, kwargs: dict, deps: Sequence[Any]) -> Args:
    """A call's arguments for a worker, upstream nodes replaced by references: a tuple
    of scalars as it is, a flat pair, or pickled bytes (see the module docstring)."""
    if not deps:
        if not kwargs:
            for a in args:
                if type(a) not in SCALARS:
                    break
            else:
                return args
        return dump_value((args, kwargs))
    if not kwargs and len(args) == len(deps):
        for a, d in zip(args, deps):
            if a is not d:
                break
        else:  # the inputs themselves, in order (``add(x, y)``): one pair per arity
            return _inputs_in_order(len(args))
    slots = {id(d): i for i, d in enumerate(deps)}
    if not kwargs:
        flat = _flat(args, slots)
        if flat is not None:
            return flat
    for pickler in _picklers():
        buf = io.BytesIO()
        try:
            pickler(buf, slots).dump((args, kwargs))
            data = buf.getvalue()
            if pickler is not PlainArgPickler or MAIN not in data:
                return data
        except Exception:
            if pickler is not PlainArgPickler:
                raise
    raise AssertionError("unreachable")


@functools.lru_cache(maxsize=64)
def _inputs_in_order(n: int) -> tuple:
    """What :func:`_flat` makes of ``n`` arguments that are the ``n`` inputs in order."""
    return (None,) * n, tuple((i, i) for i in range(n))


def _flat(args: tuple, slots: Dict[int, int]) -> Optional[tuple]:
    """``(args with None for each upstream node, ((position, slot), ...))`` when every
    upstream node is a positional argument and every other argument a scalar."""
    template, places = [], []
    for i, a in enumerate(args):
        slot = slots.get(id(a))
        if slot is not None:
            places.append((i, slot))
            template.append(None)
        elif type(a) in SCALARS:
            template.append(a)
        else:
            return None  # it may hold a node: the general way
    if len({slot for _, slot in places}) != len(slots):
        return None  # an upstream node is not among them (unpicklable_argument tries one)
    return tuple(template), tuple(places)


class _ArgUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, deps: Sequence[bytes]) -> None:
        super().__init__(io.BytesIO(data))
        self.deps = deps
        self.values: Dict[int, Any] = {}

    def persistent_load(self, slot: int) -> Any:
        if slot not in self.values:
            self.values[slot] = pickle.loads(self.deps[slot])
        return self.values[slot]


def load_call(func_bytes: bytes, args: Args, deps: Sequence[bytes]) -> Tuple[Any, tuple, dict]:
    """In a worker: the function (``None`` if not sent) and its arguments, marked as importing."""
    global IMPORTING
    IMPORTING = True
    try:
        fn = None if func_bytes is None else pickle.loads(func_bytes)
        a, kw = load_args(args, deps)
        return fn, a, kw
    finally:
        IMPORTING = False


def load_importing(data: bytes) -> Any:
    """In a worker: unpickle ``data`` that may import the modules of functions (the
    steps of a fused call), marked as importing, as :func:`load_call` does."""
    global IMPORTING
    IMPORTING = True
    try:
        return pickle.loads(data)
    finally:
        IMPORTING = False


def load_args(data: Args, deps: Sequence[bytes]) -> Tuple[tuple, dict]:
    """Unpickle ``(args, kwargs)``, filling references with upstream values."""
    if not deps:
        if type(data) is tuple:
            return data, {}  # scalars, unpickled with their frame
        return pickle.loads(data)
    if type(data) is tuple:  # flat, unpickled with its frame
        template, places = data
        args = list(template)
        values: Dict[int, Any] = {}  # one object per upstream value, as persistent_load
        for i, slot in places:
            if slot not in values:
                values[slot] = pickle.loads(deps[slot])
            args[i] = values[slot]
        return tuple(args), {}
    return _ArgUnpickler(data, deps).load()


def dump_error(exc: BaseException) -> bytes:
    """Pickle an exception for :func:`load_error`: itself (where it survives a pickle
    round trip), its summary, formatted traceback, notes and class names. Never
    raises for what the exception does (a ``__str__``, ``__getattr__`` or
    ``__reduce__`` that raises, even ``SystemExit``): the worker reports it and goes on."""
    import traceback  # only on this path: a worker starts without it
    names = tuple(f"{t.__module__}.{t.__qualname__}" for t in type(exc).__mro__)
    try:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    except BaseException:
        tb = f"{names[0]} (its traceback could not be formatted)\n"
    try:
        notes = exc.__dict__.get("__notes__", ())  # a fused node's name among them
        notes = [n for n in notes if isinstance(n, str)] if isinstance(notes, list) else []
    except BaseException:
        notes = []
    try:
        itself: Optional[bytes] = dump_value(exc)
        pickle.loads(itself)  # an exception whose __init__ rejects its args fails here
    except BaseException:
        itself = None
    return dump_value((itself, f"{type(exc).__qualname__}: {exception_text(exc)}", tb,
                       notes, names))


# a node's exceptions of these types would end or interrupt the driver where it re-raises them
_CONTROL = (SystemExit, KeyboardInterrupt, GeneratorExit)


def load_error(data: bytes, key: str) -> BaseException:
    """The node's exception, its remote traceback as ``__cause__``, a note naming the
    node; a :class:`.RemoteError` with the same message where it cannot be itself here,
    with a note that says why."""
    itself, summary, tb, notes, names = pickle.loads(data)
    exc: Optional[BaseException] = None
    why = "pickling it, or rebuilding it from its pickle, failed in the worker"
    if itself is not None:
        try:
            exc = pickle.loads(itself)
            # a traceback pickled with it (tblib's, as Dask installs it) is rebuilt on top
            # of this thread's frames, which it would keep alive with what they hold (a
            # call's Dask future): the remote traceback is in ``tb`` (its __cause__)
            exc.__traceback__ = exc.__context__ = None
        except BaseException as failed:  # a class only the worker imports, a __reduce__
            # that raises (SystemExit included: this is the scheduler's thread)
            why = (f"it cannot be unpickled in the driver ({type(failed).__name__}: "
                   f"{str(failed)[:200]})")
    if isinstance(exc, _CONTROL):
        exc, why = None, "raised as itself, it would end or interrupt the driver"
    if exc is None:
        exc = RemoteError(summary, names)
        for note in notes:
            add_note(exc, note)
        name = names[0].removeprefix("builtins.")
        add_note(exc, f"RemoteError stands for the node's {name}: {why}")
    return attach(exc, tb, key)


def attach(exc: BaseException, tb: str, key: str) -> BaseException:
    """Set ``exc.__cause__`` to the remote traceback and note which node raised it."""
    if tb:
        exc.__cause__ = RemoteTraceback(tb)
    inside = f"inside the call of node {key!r}"
    if any(isinstance(n, str) and inside in n for n in getattr(exc, "__notes__", ())):
        return exc  # a node fused into this one's call raised it, and says so
    return add_note(exc, f"raised by node {key!r}")


def frame(message: Any) -> bytes:
    """One driver → worker frame."""
    body = pickle.dumps(message, PROTOCOL)
    return LENGTH.pack(len(body)) + body


def result_frame(status: int, tid: int, seconds: float, payload: bytes) -> bytes:
    """One worker → driver result."""
    return RESULT.pack(status, tid, seconds, len(payload)) + payload


def with_output(status: int, payload: bytes, out: str, err: str) -> Tuple[int, bytes]:
    """A result's status and payload carrying the call's captured ``out``/``err`` too."""
    if not (out or err):
        return status, payload
    o, e = out.encode(errors="replace"), err.encode(errors="replace")
    return status | OUTPUT, OUTPUT_HEAD.pack(len(o), len(e)) + o + e + payload


def take_output(status: int, payload: bytes) -> Tuple[int, bytes, Optional[Tuple[str, str]]]:
    """Undo :func:`with_output`: the status without ``OUTPUT``, the value's payload, and
    ``(stdout, stderr)`` (``None`` when the call printed nothing)."""
    if not status & OUTPUT:
        return status, payload, None
    n_out, n_err = OUTPUT_HEAD.unpack_from(payload)
    start = OUTPUT_HEAD.size
    out = payload[start:start + n_out].decode(errors="replace")
    err = payload[start + n_out:start + n_out + n_err].decode(errors="replace")
    return status & ~OUTPUT, payload[start + n_out + n_err:], (out, err)


def holds_result(buf: bytearray) -> bool:
    """Whether ``buf`` begins with a whole result."""
    return len(buf) >= RESULT.size and len(buf) >= RESULT.size + RESULT.unpack_from(buf)[3]


def split_results(buf: bytearray) -> List[Tuple[int, int, float, bytes]]:
    """Cut the complete results off the front of ``buf`` (leaves a partial tail)."""
    out = []
    pos, n, size = 0, len(buf), RESULT.size
    unpack = RESULT.unpack_from
    while n - pos >= size:
        status, tid, seconds, length = unpack(buf, pos)
        end = pos + size + length
        if end > n:
            break
        out.append((status, tid, seconds, bytes(buf[pos + size:end])))
        pos = end
    del buf[:pos]
    return out


def split_frames(buf: bytearray) -> List[Any]:
    """Cut the complete driver → worker messages off the front of ``buf``."""
    out = []
    pos, n, size = 0, len(buf), LENGTH.size
    while n - pos >= size:
        (length,) = LENGTH.unpack_from(buf, pos)
        end = pos + size + length
        if end > n:
            break
        out.append(pickle.loads(buf[pos + size:end]))
        pos = end
    del buf[:pos]
    return out


def send_message(sock: Any, message: Any) -> None:
    """Send one frame on a blocking socket."""
    sock.sendall(frame(message))


def recv_message(sock: Any) -> Any:
    """Receive one frame from a blocking socket; ``ConnectionError`` if it closed."""
    (length,) = LENGTH.unpack(recv_exactly(sock, LENGTH.size))
    return pickle.loads(recv_exactly(sock, length))


def recv_exactly(sock: Any, n: int) -> bytes:
    """``n`` bytes from a blocking socket; ``ConnectionError`` if it closes first."""
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the other side closed the connection")
        data += chunk
    return bytes(data)


def write_all(fd: int, data: bytes) -> None:
    """Write every byte of ``data`` to a blocking ``fd``."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def python_path() -> List[str]:
    """The driver's import path, so workers import the same modules."""
    return [p for p in sys.path if p]
