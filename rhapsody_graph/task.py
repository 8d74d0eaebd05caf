"""``@task``, ``executable`` and ``map``: how nodes are made, and the option table.

Every option a node accepts is declared once in :data:`OPTIONS` (name → validator).
The same table checks ``@task(...)``, ``f.options(...)``, ``executable(...)`` and
``map(...)``, so a bad value is refused where it is written, with a message that
names the function, the option and the value.

>>> @task(cpus=2)
... def simulate(seed): return seed * 2
>>> simulate.options(gpus=1).opts.resources
Resources(cpus=2, gpus=1, placement='host_name')
>>> simulate.options(cpu=2)
Traceback (most recent call last):
...
TypeError: simulate: unknown option 'cpu' (did you mean 'cpus'?); valid options: backend, backoff, cpu_affinity, cpus, distribution, gpu, gpu_affinity, gpus, host, host_id, memory, name, placement, policy, process_template, process_templates, ranks, retries, retry_on, timeout, version
"""
from __future__ import annotations

import builtins
import functools
import math
import numbers
import os
import re
import types
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from .errors import brief
from .graph import EXECUTABLE, Node, Ref
from .resources import DISTRIBUTIONS, PLACEMENTS, Resources

__all__ = ["task", "Task", "Options", "executable", "map", "ExecResult", "OPTIONS"]


def _count(minimum: int) -> Callable[[str, str, Any], int]:
    def check(who: str, name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            ids = (f"; exact ids go in {name[:-1]}_affinity=[...]"
                   if name in ("cpus", "gpus") and isinstance(value, (list, tuple)) else "")
            raise TypeError(f"{who}: option {name!r} must be an integer >= {minimum}, "
                            f"got {brief(value)} ({type(value).__name__}){ids}")
        if value < minimum:
            raise ValueError(f"{who}: option {name!r} must be >= {minimum}, got {brief(value)}")
        return int(value)  # a numpy integer too
    return check


_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20,
          "mib": 2**20, "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40,
          "tib": 2**40}


def _memory(who: str, name: str, value: Any) -> int:
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", value)
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"{who}: option 'memory' must be bytes or a size like '4GB', "
                             f"got {brief(value)}")
        return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    return _count(0)(who, name, value)


def _seconds(who: str, name: str, value: Any) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{who}: option {name!r} must be a number of seconds, got {brief(value)}")
    if not 0 < value < math.inf:
        raise ValueError(f"{who}: option {name!r} must be a finite number of seconds > 0, "
                         f"got {brief(value)} (leave it out for no timeout)")
    return float(value)


def _exception_types(who: str, name: str, value: Any) -> Optional[Tuple[type, ...]]:
    """An exception class or a tuple of them (``None``: any exception)."""
    if value is None:
        return None
    types_ = value if isinstance(value, tuple) else (value,)
    if not types_ or not all(isinstance(t, type) and issubclass(t, BaseException)
                             for t in types_):
        raise TypeError(f"{who}: option {name!r} must be an exception class or a tuple of "
                        f"them, got {brief(value)}")
    return types_


def _backoff(who: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{who}: option {name!r} must be a number of seconds, got {brief(value)}")
    if not 0 <= value < math.inf:
        raise ValueError(f"{who}: option {name!r} must be a finite number of seconds >= 0, "
                         f"got {brief(value)}")
    return float(value)


def _text(who: str, name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{who}: option {name!r} must be a string, got {brief(value)}")
    if not value:
        raise ValueError(f"{who}: option {name!r} must not be empty")
    return value


def _backend(who: str, name: str, value: Any) -> Optional[str]:
    """A backend's name; which names exist is the session's to say, before anything runs."""
    if value is not None and not isinstance(value, str) and hasattr(value, "submit"):
        raise TypeError(f"{who}: option {name!r} names a backend ('local', 'dragon' or a "
                        f"session backend's name=), got the backend {brief(value)}; to run on "
                        "it, pass it to compute(..., backend=it) or to Session(backends=[...])")
    return None if value is None else _text(who, name, value)


def _distribution(who: str, name: str, value: Any) -> str:
    value = _seed_name(value, {"roundrobin": "round_robin"})
    if value not in DISTRIBUTIONS:
        raise ValueError(f"{who}: option 'distribution' must be one of "
                         f"{', '.join(repr(d) for d in DISTRIBUTIONS)}, got {brief(value)}")
    return value


def _seed_name(value: Any, aliases: Mapping[str, str]) -> Any:
    """A name from the seed's vocabulary (``"HOST_NAME"``, a Dragon enum) in our spelling."""
    value = getattr(value, "name", value)
    if isinstance(value, str):
        value = value.lower()
        return aliases.get(value, value)
    return value


def _placement(who: str, name: str, value: Any) -> str:
    value = _seed_name(value, {"hostname": "host_name", "hostid": "host_id"})
    if value not in PLACEMENTS:
        raise ValueError(f"{who}: option 'placement' must be one of "
                         f"{', '.join(repr(p) for p in PLACEMENTS)}, got {brief(value)}")
    return value


def _ids(who: str, name: str, value: Any) -> tuple:
    ok = (isinstance(value, (list, tuple)) and value
          and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value))
    if not ok:
        raise TypeError(f"{who}: option {name!r} must be a non-empty list of ids >= 0, "
                        f"got {brief(value)}")
    if len(set(value)) != len(value):
        raise ValueError(f"{who}: option {name!r} lists an id twice: {brief(list(value))}")
    return tuple(value)


def _policy(who: str, name: str, value: Any) -> Any:
    if not all(hasattr(value, a) for a in ("placement", "cpu_affinity", "gpu_affinity")):
        raise TypeError(f"{who}: option {name!r} must be a dragon.infrastructure.policy.Policy, "
                        f"got {brief(value)}")
    return value


TEMPLATE_KEYS = ("cwd", "env", "stdin", "stdout", "stderr", "options", "policy")


def _template(who: str, name: str, value: Any) -> Dict[str, Any]:
    if not isinstance(value, Mapping):
        raise TypeError(f"{who}: option {name!r} must be a dict of ProcessTemplate arguments "
                        f"({', '.join(TEMPLATE_KEYS)}), got {brief(value)}")
    bad = sorted(set(value) - set(TEMPLATE_KEYS))
    if bad:
        raise TypeError(f"{who}: option {name!r} does not take {', '.join(repr(b) for b in bad)}; "
                        f"it passes {', '.join(TEMPLATE_KEYS)} to Dragon's ProcessTemplate "
                        "(target and args come from the node)")
    _cwd_env(who, value.get("cwd"), value.get("env"), f"{name} ")
    if value.get("policy") is not None:
        _policy(who, f"{name} policy", value["policy"])
    for stream in ("stdin", "stdout", "stderr"):  # Dragon's Popen constants, or a file
        given = value.get(stream)
        if given is not None and (isinstance(given, bool) or not isinstance(given, (int, str))
                                  or stream == "stdin" and isinstance(given, str)):
            raise TypeError(f"{who}: option {name!r} {stream} must be one of Dragon's "
                            f"Popen constants (PIPE, DEVNULL, STDOUT), got {brief(given)}")
    options = value.get("options")
    if options is not None and not hasattr(options, "make_inf_channels"):
        raise TypeError(f"{who}: option {name!r} options must be a Dragon ProcessOptions, "
                        f"got {brief(options)}")
    return dict(value)


def _cwd_env(who: str, cwd: Any, env: Any, what: str = "") -> None:
    """Refuse a ``cwd`` that is not a path and an ``env`` that does not map str to str."""
    if cwd is not None and not isinstance(cwd, (str, bytes, os.PathLike)):
        raise TypeError(f"{who}: {what}cwd must be a path (str or os.PathLike), got {brief(cwd)}")
    if env is not None and not (isinstance(env, Mapping) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items())):
        raise TypeError(f"{who}: {what}env must map str to str, got {brief(env)}")
    for k, v in (env or {}).items():
        if not k or "=" in k or "\0" in k or "\0" in v:
            raise ValueError(f"{who}: {what}env {k!r}: a variable's name must be non-empty "
                             "without '=' or a null byte, and its value without a null byte")


def _templates(who: str, name: str, value: Any) -> List[Tuple[int, Dict[str, Any]]]:
    if not isinstance(value, (list, tuple)) or not value:
        raise TypeError(f"{who}: option 'process_templates' must be a non-empty list of "
                        f"(ranks, {{ProcessTemplate arguments}}) pairs, got {brief(value)}")
    out = []
    for pair in value:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise TypeError(f"{who}: each entry of 'process_templates' must be a "
                            f"(ranks, dict) pair, got {brief(pair)}")
        out.append((_count(1)(who, "process_templates ranks", pair[0]),
                    _template(who, "process_templates", pair[1])))
    return out


#: Every node option: name -> validator(who, name, value) -> normalised value.
OPTIONS: Dict[str, Callable[[str, str, Any], Any]] = {
    "cpus": _count(0),
    "gpus": _count(0),
    "gpu": _count(0),  # alias of gpus
    "ranks": _count(1),
    "memory": _memory,
    "timeout": _seconds,
    "retries": _count(0),
    "retry_on": _exception_types,  # the node's own exceptions that are retried (default: any)
    "backoff": _backoff,  # seconds before the first retry, doubling for each next one
    "name": _text,
    "backend": _backend,
    "distribution": _distribution,
    "placement": _placement,  # default | anywhere | host_name | host_id
    "host": _text,
    "host_id": _count(0),
    "cpu_affinity": _ids,  # exactly these core ids
    "gpu_affinity": _ids,  # exactly these GPU ids
    "policy": _policy,  # a raw Dragon Policy (the Dragon backend only)
    "process_template": _template,  # Dragon ProcessTemplate arguments for every rank
    "process_templates": _templates,  # [(ranks, arguments), ...]: a job of groups
    "version": _text,  # part of the journal key (see rhapsody_graph.journal)
}
DEFAULTS: Dict[str, Any] = {"cpus": 1, "gpus": 0, "ranks": 1, "memory": 0, "timeout": None,
                            "retries": 0, "retry_on": None, "backoff": 0.0, "backend": None, "distribution": "block",
                            "host": None, "host_id": None, "policy": None,
                            "process_template": None, "process_templates": None}
UNSET_BY_NONE = ("host", "host_id", "version")  # None: as if left out (see validate)
PINNING = ("cpus", "gpus", "host", "host_id", "cpu_affinity", "gpu_affinity", "policy",
           "process_template", "process_templates")


def validate(who: str, options: Mapping[str, Any]) -> Dict[str, Any]:
    """Check ``options`` against :data:`OPTIONS`; return them normalised.

    Raises:
        TypeError: an unknown option or a value of the wrong type.
        ValueError: a value out of range, or ``gpu`` and ``gpus`` together.
    """
    out: Dict[str, Any] = {}
    for name, value in options.items():
        if value is None and name in UNSET_BY_NONE:
            continue  # as if left out: options(host=None) undoes the task's host
        check = OPTIONS.get(name)
        if check is None:
            close = _close_option(name)
            hint = f" (did you mean {close!r}?)" if close else ""
            raise TypeError(f"{who}: unknown option {name!r}{hint}; valid options: "
                            f"{', '.join(sorted(OPTIONS))}")
        out[name] = check(who, name, value)
    if "gpu" in out:
        if "gpus" in out:
            raise ValueError(f"{who}: give 'gpus' or its alias 'gpu', not both "
                             f"(got gpus={out['gpus']!r}, gpu={out['gpu']!r})")
        out["gpus"] = out.pop("gpu")
    return out


def _close_option(name: str) -> Optional[str]:
    """The option ``name`` is likely a typo of, if any."""
    import difflib  # only for a message
    close = difflib.get_close_matches(name, OPTIONS, n=1)
    return close[0] if close else None


def _merge(base: Mapping[str, Any], new: Mapping[str, Any]) -> Dict[str, Any]:
    """``base`` updated by ``new``, where a new ``gpu`` replaces an old ``gpus``."""
    merged = dict(base)
    if "gpu" in new and "gpus" not in new:
        merged.pop("gpus", None)
    merged.update(new)
    return merged


class Options:
    """The validated options of a task: resources plus run policy."""

    __slots__ = ("values", "resources", "timeout", "retries", "retry_on", "backoff", "name",
                 "backend", "qualname",
                 "policy", "template", "templates", "custom_process", "fusable")

    def __init__(self, values: Dict[str, Any], name: str, qualname: str) -> None:
        policy = _node_policy(name, values)
        merged = {**DEFAULTS, **_from_policy(policy), **values, "policy": policy}
        self.values = values
        self.policy = policy
        self.template: Optional[Dict[str, Any]] = merged["process_template"]
        self.templates: Optional[List[Tuple[int, Dict[str, Any]]]] = merged["process_templates"]
        ranks = _ranks(name, merged, values)
        self.resources = Resources(
            _sized(name, merged, values, "cpus", "cpu_affinity"),
            _sized(name, merged, values, "gpus", "gpu_affinity"),
            merged["memory"], ranks, merged["distribution"], merged["host"],
            merged["host_id"], merged.get("cpu_affinity"), merged.get("gpu_affinity"),
            _mode(merged, values), _per_rank(merged, values, ranks))
        # a raw policy or template arguments: the node's process is its own (no lease sharing)
        self.custom_process = not (self.policy is None and self.template is None
                                   and self.templates is None)
        self.timeout: Optional[float] = merged["timeout"]
        self.retries: int = merged["retries"]
        self.retry_on: Optional[Tuple[type, ...]] = merged["retry_on"]
        self.backoff: float = merged["backoff"]
        self.backend: Optional[str] = merged["backend"]
        self.name: str = values.get("name", name)
        self.qualname = qualname
        # one core, no limits: may run inside another node's call on its backend (fusion)
        self.fusable = all(k in ("name", "version", "backend")
                           or (k in DEFAULTS and v == DEFAULTS[k]) for k, v in values.items())

    def __repr__(self) -> str:
        return f"Options({self.values})"


def _node_policy(who: str, values: Mapping[str, Any]) -> Any:
    """The node's Dragon policy: ``policy=``, or the one inside ``process_template``."""
    policy = values.get("policy")
    inner = (values.get("process_template") or {}).get("policy")
    if policy is not None and inner is not None:
        raise ValueError(f"{who}: give the Dragon policy once, as policy= or inside "
                         "process_template, not both")
    return policy if policy is not None else inner


def _group_policies(merged: Mapping[str, Any], ranks: int) -> List[Tuple[int, Any]]:
    """``(ranks, policy)`` per group of ranks: each ``process_templates`` group with its
    own policy (else the node's), or one group of every rank under the node's policy."""
    groups = merged["process_templates"]
    if groups is None:
        return [(ranks, merged["policy"])]
    return [(k, t.get("policy") if t.get("policy") is not None else merged["policy"])
            for k, t in groups]


def _per_rank(merged: Mapping[str, Any], values: Mapping[str, Any],
              ranks: int) -> Optional[Tuple[Resources, ...]]:
    """One request per rank where Dragon policies pin groups of ranks (``None`` when no
    policy does). A group's ranks run on its policy's host and share what it pins, as
    Dragon starts each of them with that policy: the group's first rank reserves the
    pinned cores and GPUs once (so the ledger holds exactly what each group pins), the
    others reserve none of them; what a group does not pin is asked for per rank."""
    groups = _group_policies(merged, ranks)
    if all(p is None for _, p in groups) or (ranks == 1 and len(groups) == 1):
        return None
    out: List[Resources] = []
    for count, policy in groups:
        group = {**merged, **_from_policy(policy)}
        cpu_ids, gpu_ids = group.get("cpu_affinity"), group.get("gpu_affinity")
        for i in range(count):
            share_cpus = None if cpu_ids is None else (cpu_ids if i == 0 else ())
            share_gpus = None if gpu_ids is None else (gpu_ids if i == 0 else ())
            out.append(Resources(
                merged["cpus"] if share_cpus is None else len(share_cpus),
                merged["gpus"] if share_gpus is None else len(share_gpus),
                merged["memory"], 1, "block", group["host"], group["host_id"],
                share_cpus, share_gpus, _mode(group, {**values, **_from_policy(policy)})))
    return tuple(out)


def _from_policy(policy: Any) -> Dict[str, Any]:
    """The ledger's view of a raw Dragon ``Policy``: its host and its ids."""
    if policy is None:
        return {}
    mode = _placement("policy", "placement", policy.placement)
    out: Dict[str, Any] = {"placement": mode}
    if mode == "host_name" and getattr(policy, "host_name", ""):
        out["host"] = policy.host_name
    if mode == "host_id" and getattr(policy, "host_id", -1) >= 0:
        out["host_id"] = policy.host_id
    for name in ("cpu_affinity", "gpu_affinity"):
        if getattr(policy, name):
            out[name] = tuple(getattr(policy, name))
    return out


def _sized(who: str, merged: Mapping[str, Any], values: Mapping[str, Any], count: str,
           ids: str) -> int:
    """``cpus``/``gpus``: the number of explicit ids when those are given."""
    given = merged.get(ids)
    if given is None:
        return merged[count]
    if count in values and merged[count] != len(given):
        raise ValueError(f"{who}: {count}={merged[count]} does not match {ids}={list(given)}")
    return len(given)


def _ranks(who: str, merged: Mapping[str, Any], values: Mapping[str, Any]) -> int:
    groups = merged["process_templates"]
    if groups is None:
        return merged["ranks"]
    n = sum(k for k, _ in groups)
    if "ranks" in values and merged["ranks"] != n:
        raise ValueError(f"{who}: ranks={merged['ranks']} does not match process_templates, "
                         f"which make {n} ranks")
    return n


def _mode(merged: Mapping[str, Any], values: Mapping[str, Any]) -> str:
    """The placement mode: as asked, else pinned when any resource or place was named."""
    if "placement" in merged:
        return merged["placement"]
    if merged["host_id"] is not None:
        return "host_id"
    return "host_name" if any(k in values for k in PINNING) else "default"


class Task:
    """A function whose calls build nodes. Made by :func:`task`.

    ``task(x)`` returns a :class:`~rhapsody_graph.graph.Node`; ``task.func(x)`` calls
    the plain function; ``task.options(gpus=1)`` is a copy with other options.
    """

    def __init__(self, func: Callable[..., Any], options: Mapping[str, Any]) -> None:
        if not callable(func):
            raise TypeError(f"@task needs a callable, got {brief(func)}")
        if getattr(func, "makes_ai_nodes", False):
            raise TypeError(f"{func.__name__} is a @prompt function: calling it builds an AI "
                            "node already; it cannot also be a @task")
        #: the shapes of call checked to fit the function: a positional count, or
        #: (count, *keyword names); shared by the copies options() makes
        self._fits: set = set()
        if isinstance(func, Task):
            options = _merge(func.opts.values, options)
            self._fits = func._fits
            func = func.func
        functools.update_wrapper(self, func, updated=())  # not a class's attributes:
        # Model.options would hide Task.options
        self.func = func
        inner = func.func if isinstance(func, functools.partial) else func  # its name
        name = getattr(inner, "__name__", type(inner).__name__)
        qualname = f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', name)}"
        self.opts = Options(validate(name, options), name, qualname)

    def __call__(self, /, *args: Any, **kwargs: Any) -> Node:
        shape = (len(args), *kwargs) if kwargs else len(args)
        if shape not in self._fits:
            self._check_call(shape, args, kwargs)
        return Node(self.func, args, kwargs, self.opts)

    def __get__(self, instance: Any, owner: Optional[type] = None) -> Any:
        """A task in a class body binds as a method does: ``obj.method(x)`` builds the
        node of ``method(obj, x)`` (``obj`` is pickled to its worker with the call)."""
        return self if instance is None else types.MethodType(self, instance)

    def _check_call(self, shape: Any, args: tuple, kwargs: dict) -> None:
        """Refuse now a call the function cannot take, as its own call would, instead of
        failing in a worker after everything upstream ran (as Ray's ``.remote`` does).
        Only a plain function or method is checked, from its own code: a class, a
        builtin or a ``__signature__`` may describe less than it takes (pydantic models
        take unknown keywords and aliases)."""
        code = _own_code(self.func)
        if code is not None and (kwargs or not _fits(code, shape)):
            import inspect  # 3 ms: only for keywords or a call that does not fit
            sig = inspect.signature(self.func, follow_wrapped=False)
            try:
                sig.bind(*args, **kwargs)
            except TypeError as e:
                raise TypeError(f"{self.opts.name}{sig}: {e}") from None
        if len(self._fits) < 64:
            self._fits.add(shape)

    def options(self, **options: Any) -> "Task":
        """A copy of this task with some options replaced; validated now."""
        return Task(self, options)

    def __repr__(self) -> str:
        return f"<Task {self.opts.name} {self.opts.values}>"


def _own_code(func: Any) -> Optional[Tuple[types.FunctionType, int]]:
    """A plain function (or a method's, with 1 bound argument) whose signature is its
    code's: no ``__signature__`` set on it; else ``None``."""
    bound = 0
    if type(func) is types.MethodType:
        func, bound = func.__func__, 1
    if type(func) is not types.FunctionType or "__signature__" in func.__dict__:
        return None
    return func, bound


def _fits(code: Tuple[types.FunctionType, int], count: int) -> bool:
    """Whether the function takes ``count`` positional arguments and no keyword."""
    func, bound = code
    c = func.__code__
    if c.co_kwonlyargcount > len(func.__kwdefaults__ or ()):
        return False  # a keyword-only argument has no default
    most = c.co_argcount - bound
    least = max(0, most - len(func.__defaults__ or ()))
    return least <= count and (count <= most or bool(c.co_flags & _CO_VARARGS))


_CO_VARARGS = 0x04  # inspect.CO_VARARGS, without importing inspect


def task(func: Optional[Callable[..., Any]] = None, **options: Any) -> Any:
    """Make a function lazy: calling it builds a node instead of running it.

    Use bare (``@task``) or with options (``@task(cpus=2, gpus=1, timeout=60)``);
    see :data:`OPTIONS`.

    >>> @task(cpus=1)
    ... def inc(x): return x + 1
    >>> inc(1).compute()
    2
    """
    if func is None:  # validated when applied, so the message can name the function
        return lambda f: Task(f, options)
    return Task(func, options)


class ExecResult:
    """What an executable node returns: ``stdout``, ``stderr``, ``returncode``."""

    __slots__ = ("argv", "stdout", "stderr", "returncode", "host", "cpus", "gpus", "rank")

    def __init__(self, argv: List[str], stdout: str, stderr: str, returncode: int,
                 host: str = "", cpus: Sequence[int] = (), gpus: Sequence[int] = (),
                 rank: int = 0) -> None:
        self.argv, self.stdout, self.stderr, self.returncode = argv, stdout, stderr, returncode
        self.host, self.cpus, self.gpus, self.rank = host, tuple(cpus), tuple(gpus), rank

    def __getstate__(self):
        return tuple(getattr(self, s) for s in self.__slots__)

    def __setstate__(self, state):
        for s, v in zip(self.__slots__, state):
            setattr(self, s, v)

    def __repr__(self) -> str:
        return (f"ExecResult(returncode={self.returncode}, stdout={self.stdout[:60]!r}, "
                f"host={self.host!r}, cpus={list(self.cpus)}, gpus={list(self.gpus)})")


class ExecSpec:
    """How to start an executable node: argv (may hold nodes), cwd and extra env."""

    __slots__ = ("argv", "cwd", "env")

    def __init__(self, argv: List[Any], cwd: Optional[str], env: Optional[Dict[str, str]]) -> None:
        self.argv, self.cwd, self.env = argv, cwd, env


def executable(argv: Sequence[Any], *, cwd: Optional[str] = None,
               env: Optional[Mapping[str, str]] = None, **options: Any) -> Node:
    """A node that runs a program: ``argv`` may hold upstream nodes (their values, as text).

    Its value is an :class:`ExecResult` (a list of them for ``ranks > 1``); a non-zero
    exit raises :class:`~rhapsody_graph.errors.ExecutableError` with stderr's tail.

    >>> executable(["echo", "hi"]).compute().stdout
    'hi\\n'
    """
    if isinstance(argv, (str, bytes)) or not isinstance(argv, Sequence) or not argv:
        raise TypeError(f"executable() needs a non-empty list of arguments, got {brief(argv)}")
    prog = str(argv[0]) if not isinstance(argv[0], Node) else "executable"
    who = f"executable {prog!r}"
    for i, arg in enumerate(argv):
        if not isinstance(arg, (str, bytes, int, float, os.PathLike, Node, Ref)):
            raise TypeError(f"{who}: argument {i} must be text, a number, a path, a node or "
                            f"a future; got {brief(arg)}")
        if isinstance(arg, str) and "\0" in arg or isinstance(arg, bytes) and b"\0" in arg:
            raise ValueError(f"{who}: argument {i} {brief(arg)} holds a null byte, which no "
                             "program can be given")
    _cwd_env(who, cwd, env)
    values = validate(who, options)
    opts = Options(values, prog.rsplit("/", 1)[-1], f"executable:{prog}")
    spec = ExecSpec(list(argv), cwd, dict(env) if env else None)
    return Node(spec, (spec.argv,), {}, opts, kind=EXECUTABLE)


def map(func: Union[Callable[..., Any], Task], *iterables: Iterable[Any],
        gpus: Union[int, str, None] = None, **options: Any) -> List[Node]:
    """One node per item (``zip`` of several iterables), as the builtin ``map``.

    ``gpus="all"`` gives each node one GPU; the ledger hands GPUs out round-robin
    over every GPU of every host, never two running nodes on one GPU.

    >>> def square(x): return x * x
    >>> tuple(n.compute() for n in map(square, range(3)))
    (0, 1, 4)
    """
    if not iterables:
        raise TypeError("map() needs at least one iterable of items")
    for i, items in enumerate(iterables):
        if not hasattr(items, "__iter__"):
            name = getattr(func, "__name__", type(func).__name__)
            raise TypeError(f"map({name}, ...): argument {i + 1} must be an iterable of "
                            f"items, got {brief(items)}")
    if getattr(func, "makes_ai_nodes", False):  # a @prompt function: its options are its own
        if options or gpus is not None:
            raise TypeError(f"map({func.__name__}, ...): a @prompt function's options are "
                            f"set by @prompt, got {sorted(options) or ['gpus']}")
        return [func(*items) for items in builtins.zip(*iterables)]
    name = getattr(func, "__name__", "f")
    if gpus is not None and options.get("gpu") is not None:
        raise ValueError(f"map({name}, ...): give gpus= or its alias gpu=, not both (got "
                         f"gpus={gpus!r}, gpu={options['gpu']!r})")
    if gpus is None and isinstance(options.get("gpu"), str):
        gpus = options.pop("gpu")
    if gpus == "all":
        options["gpus"] = 1
    elif isinstance(gpus, str):
        raise ValueError(f"map({name}, ...): gpus= takes \"all\" (one GPU per node, over "
                         f"every GPU) or a count, got {gpus!r}")
    elif gpus is not None:
        options["gpus"] = gpus
    unknown = [k for k in options if k not in OPTIONS]
    if unknown:  # Dask's client.map hands such keywords to the function: here, options
        close = _close_option(unknown[0])
        guess = f" (did you mean {close!r}?)" if close else ""
        raise TypeError(f"map({name}, ...): {unknown[0]!r} is no option{guess}; map's "
                        f"keywords are the nodes' options (cpus=, gpus=, ...): to give {name} "
                        f"a keyword argument, map functools.partial({name}, {unknown[0]}=...)")
    base = func if isinstance(func, Task) else Task(func, {})
    t = base.options(**options) if options else base
    return [t(*items) for items in builtins.zip(*iterables)]
