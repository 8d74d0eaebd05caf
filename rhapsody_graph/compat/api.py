"""RHAPSODY's ``Session``, ``ComputeTask`` and ``AITask``, as nodes of a rhapsody_graph session.

Tasks are dicts whose keys are also attributes, as RHAPSODY's are, and are checked as
RHAPSODY checks them when made:

>>> t = ComputeTask(function=abs, args=(-3,), uid="t1", tag="mine")
>>> (t.uid, t["state"], t.get("tag"), t.return_value)
('t1', None, 'mine', None)
>>> try:
...     ComputeTask(executable="/bin/echo", arguments="hi", uid="t2")
... except TaskValidationError as e:
...     print(e)
Task 't2' validation failed: arguments must be a list, got str 'hi'
"""
from __future__ import annotations

import asyncio
import collections.abc
import itertools
import os
from typing import Any, Callable, Dict, Iterable, List, Mapping, NoReturn, Optional, Sequence

from ..ai.nodes import ai
from ..errors import ExecutableError, NoBackendError, UnsatisfiableError, brief
from ..futures import Future
from ..graph import Node
from ..resources import Placement
from ..session import Session as _Session, stop_on_sigterm
from ..task import executable, task
from .errors import (BackendError, ResourceError, RhapsodyError, SessionError,
                     TaskExecutionError, TaskValidationError)

__all__ = ["Session", "ComputeTask", "AITask", "BaseTask", "TaskState", "RhapsodyError",
           "BackendError", "TaskValidationError", "TaskExecutionError", "SessionError",
           "ResourceError"]


class TaskState:
    """A task's states, as RHAPSODY names them (``state`` is ``None`` until submitted)."""
    RUNNING, DONE, FAILED, CANCELED = "RUNNING", "DONE", "FAILED", "CANCELED"


_uids = itertools.count(1)
#: task_backend_specific_kwargs that are node options, and those of executables only
OPTION_KWARGS = ("cpus", "gpus", "process_template", "process_templates")
EXEC_KWARGS = ("cwd", "env", "shell")
#: variables rhapsody_graph sets in every placed process (with those named RHAPSODY_*)
_OWN_ENV = frozenset(Placement("", ()).env())


class BaseTask(dict):
    """What every task carries, as fields (``t.uid`` is ``t["uid"]``): ``uid``, ``backend``
    (the name asked, then the name it ran on), ``state`` (:class:`TaskState`),
    ``return_value``, ``stdout``, ``stderr``, ``exit_code``, ``exception``, ``future`` (the
    :class:`rhapsody_graph.Future`, with ``where``), and any extra field given. A task
    equals only itself.

    Awaiting a task waits for it to end and returns the task; a failure is on
    ``state``/``exception`` (it does not raise).
    """

    __eq__, __ne__, __hash__ = object.__eq__, object.__ne__, object.__hash__

    def __init__(self, uid: Optional[str] = None, backend: Optional[str] = None,
                 **fields: Any) -> None:
        super().__init__(uid=f"task.{next(_uids):06d}" if uid is None else uid,
                         backend=backend, state=None, stdout=None, stderr=None, exit_code=None,
                         return_value=None, response=None, exception=None, future=None,
                         **fields)
        self._ended: Optional[asyncio.Future] = None
        self.validate()

    def __getattr__(self, name: str) -> Any:
        if not name.startswith("_") and name in self:
            return self[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        else:
            self[name] = value

    def validate(self) -> None:
        """Check the fields as RHAPSODY does; raises :class:`TaskValidationError`."""
        self._check()

    def _check(self) -> None:
        uid = self.get("uid")
        if not isinstance(uid, str) or not uid:
            raise TaskValidationError(None, f"uid must be a non-empty string, got {brief(uid)}")

    def _invalid(self, message: str) -> NoReturn:
        raise TaskValidationError(self.uid, message)

    def _need(self, field: str, value: Any, kind: Any, what: str) -> None:
        if not isinstance(value, kind):
            self._invalid(f"{field} must be {what}, got {type(value).__name__} {brief(value)}")

    def node(self) -> Node:
        """The task as a node, checked first."""
        self._check()
        return self._build()

    def _build(self) -> Node:  # pragma: no cover - every task kind defines it
        raise NotImplementedError

    def __await__(self):
        return asyncio.shield(self._waiter()).__await__()  # a waiter's timeout leaves it be

    def _waiter(self) -> asyncio.Future:
        if self._ended is None:
            raise RuntimeError(f"task {self.uid!r} was not submitted: "
                               "await session.submit_tasks([...]) first")
        return self._ended

    def _handed(self) -> asyncio.Future:
        """A future of its own for whoever submitted it, resolved with it: cancelling
        that one (a timed-out ``asyncio.wait_for``) leaves the task awaitable."""
        ended = self._waiter()
        fut = ended.get_loop().create_future()

        def resolve(_: asyncio.Future) -> None:
            if not fut.done():
                fut.set_result(self)
        ended.add_done_callback(resolve)
        return fut

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.uid} {self.state}>"

    def _submitted(self, fut: Future, loop: asyncio.AbstractEventLoop, folder: str) -> None:
        """Handed to the backend: ``RUNNING`` from now, as RHAPSODY's backends report it
        (a task submitted again drops what its earlier run left on it)."""
        self.update(stdout=None, stderr=None, exit_code=None, return_value=None,
                    response=None, exception=None)
        self.future, self.state = fut, TaskState.RUNNING
        if self.backend is None:
            self.backend = fut.backend  # where the session routed it
        self._ended = loop.create_future()

        def ended(f: Future) -> None:  # on the scheduler's thread
            try:
                loop.call_soon_threadsafe(self._record, f, folder)
            except RuntimeError:  # the event loop has closed: nobody awaits it
                pass
        fut.add_done_callback(ended)

    def _record(self, f: Future, folder: str) -> None:
        """Fill the task's fields from its future (on the event loop), unless the task
        was submitted again since (the newer run's fields are its own)."""
        if f is not self.future:
            return
        if f.cancelled():
            self.state = TaskState.CANCELED
        else:
            self._ran(f, folder)
        if not self._ended.done():
            self._ended.set_result(self)

    def _ran(self, f: Future, folder: str) -> None:
        where = f.where
        if where is not None:
            self.backend = where.backend
            self.stdout, self.stderr = where.stdout, where.stderr
        exc = f.exception()
        if exc is None:
            self.state, self.exit_code = TaskState.DONE, 0
            self._value(f.result())
        elif isinstance(exc, ExecutableError):  # as RHAPSODY's: an exit code, no exception
            self.state, self.exit_code = TaskState.FAILED, exc.returncode
            self.stdout, self.stderr = exc.stdout, exc.stderr
        else:  # stderr ends with str(exc), as RHAPSODY's is str(exc)
            self.state, self.exception, self.exit_code = TaskState.FAILED, exc, 1
            self.stderr = "\n".join(s for s in ((self.stderr or "").rstrip("\n"), str(exc)) if s)

    def _value(self, value: Any) -> None:
        self.return_value = value


class ComputeTask(BaseTask):
    """A Python function (sync or ``async def``) or an executable, as one node.

    Execution modes, as in RHAPSODY: a function without a template runs in a pooled
    worker; with ``process_template`` in a process of its own, with
    ``process_templates`` as a job (one value per rank); an executable as a process,
    or as a job with ``process_templates``. Unlike RHAPSODY, a function's
    ``return_value`` is always its value (a job's: the list of its ranks' values), and
    its ``stdout``/``stderr`` are what it printed. An executable's output is on
    ``stdout``/``stderr`` and its ``return_value`` is ``None``, as in RHAPSODY (its
    :class:`~rhapsody_graph.ExecResult` per rank is ``task.future.result()``).

    ``task_backend_specific_kwargs`` takes ``gpus`` (a GPU count, as the node option),
    ``process_template(s)``, and for executables ``shell`` (``/bin/sh -c`` runs the
    executable and arguments joined by spaces), ``cwd`` and ``env`` (the environment it
    gets, instead of the driver's: RHAPSODY's). ``capture_stdio=True`` writes an
    executable's output to ``<work_dir>/<session uid>/<uid>.stdout`` (and ``.stderr``),
    whose paths ``stdout``/``stderr`` then hold. ``input_files``, ``output_files`` and
    extra keyword arguments are kept as fields.
    """

    def __init__(self, executable: Optional[str] = None,
                 function: Optional[Callable[..., Any]] = None,
                 arguments: Optional[List[Any]] = None, args: Optional[Sequence[Any]] = None,
                 kwargs: Optional[Dict[str, Any]] = None, uid: Optional[str] = None,
                 input_files: Optional[List[str]] = None,
                 output_files: Optional[List[str]] = None, capture_stdio: bool = False,
                 task_backend_specific_kwargs: Optional[Dict[str, Any]] = None,
                 backend: Optional[str] = None, **extra: Any) -> None:
        super().__init__(
            uid, backend, executable=executable, function=function,
            arguments=[] if arguments is None else arguments, args=() if args is None else args,
            kwargs={} if kwargs is None else kwargs, input_files=input_files,
            output_files=output_files, capture_stdio=capture_stdio,
            task_backend_specific_kwargs={} if task_backend_specific_kwargs is None
            else task_backend_specific_kwargs, **extra)

    def validate(self) -> None:
        """Check the fields as RHAPSODY does and that the node can be built: raises
        :class:`TaskValidationError`, naming the task (a bad option value included)."""
        self.node()

    def _check(self) -> None:
        super()._check()
        exe, function = self.executable, self.function
        if exe is None and function is None:
            self._invalid("ComputeTask requires either 'executable' or 'function' to be specified")
        if exe is not None and function is not None:
            self._invalid("ComputeTask cannot have both 'executable' and 'function' specified")
        if exe is not None:
            self._need("executable", exe, str, "a string")
            self._need("arguments", self.arguments, list, "a list")
        else:
            self._need("function", function, collections.abc.Callable, "callable")
            self._need("args", self.args, (tuple, list), "a tuple or list")
            self._need("kwargs", self.kwargs, dict, "a dict")
        extra = self.task_backend_specific_kwargs
        self._need("task_backend_specific_kwargs", extra, dict, "a dict")
        takes = OPTION_KWARGS + (EXEC_KWARGS if exe is not None else ())
        bad = [k for k in extra if k not in takes]
        if bad:
            only = ("; cwd, env and shell are for executable tasks only"
                    if set(bad) & set(EXEC_KWARGS) else "")
            self._invalid(f"task_backend_specific_kwargs takes {', '.join(sorted(takes))}; "
                          f"got {', '.join(map(repr, bad))}{only}")
        if extra.get("env") is not None:
            self._need("env", extra["env"], dict, "a dict")
            for name, value in extra["env"].items():  # checked here: env(1) runs the task
                if not isinstance(name, str) or not name or "=" in name or "\0" in name \
                        or not isinstance(value, str) or "\0" in value:
                    self._invalid(f"env must map variable names (no '=') to strings, got "
                                  f"{brief(name)}: {brief(value)}")

    def _build(self) -> Node:
        extra = self.task_backend_specific_kwargs
        options = {k: extra[k] for k in OPTION_KWARGS if k in extra}
        options["name"] = self.uid
        if self.backend is not None:
            options["backend"] = self.backend
        try:  # a bad option value, or args the function cannot take
            if self.function is not None:
                return task(self.function).options(**options)(*self.args, **self.kwargs)
            argv = [self.executable, *self.arguments]
            if extra.get("shell"):
                argv = ["/bin/sh", "-c", " ".join(map(str, argv))]
            env = extra.get("env")
            if env is not None:
                argv = ["/usr/bin/env", *_unsetting(env), *argv]
            return executable(argv, cwd=extra.get("cwd"), env=env, **options)
        except (TypeError, ValueError) as e:
            self._invalid(str(e))

    def _ran(self, f: Future, folder: str) -> None:
        super()._ran(f, folder)
        if self.capture_stdio and self.executable is not None and \
                isinstance(self.exception, (type(None), ExecutableError)):
            try:
                self._to_files(folder)
            except OSError as exc:
                self.state, self.exception = TaskState.FAILED, exc

    def _to_files(self, folder: str) -> None:
        """Write ``stdout``/``stderr`` to ``<folder>/<uid>.stdout|.stderr``, the fields
        becoming the paths (RHAPSODY's ``capture_stdio``)."""
        os.makedirs(folder, exist_ok=True)
        for field in ("stdout", "stderr"):
            path = os.path.join(folder, f"{self.uid}.{field}")
            with open(path, "w") as out:
                out.write(self[field] or "")
            self[field] = path

    def _value(self, value: Any) -> None:
        if self.executable is None:
            self.return_value = value
            return
        ranks = value if isinstance(value, list) else [value]
        self.stdout = "".join(r.stdout for r in ranks)
        self.stderr = "".join(r.stderr for r in ranks)  # return_value stays None


def _unsetting(env: Mapping[str, str]) -> List[str]:
    """``env -u`` arguments that drop the driver's variables ``env`` does not set, so that
    ``env`` replaces the environment as in RHAPSODY (rhapsody_graph's own stay)."""
    return [arg for name in sorted(os.environ) if name not in env and name not in _OWN_ENV
            and not name.startswith("RHAPSODY_") for arg in ("-u", name)]


class AITask(BaseTask):
    """A prompt to an inference backend; its answer is ``response`` (and ``return_value``).

    RHAPSODY's fields, each ``None`` unless given: ``model`` (default: the model of the
    inference backend it is routed to, by ``backend=``, else the session's first one),
    ``system_prompt``, ``temperature``, ``max_tokens``, ``top_p``, ``top_k`` and
    ``stop_sequences`` (sent as the server's ``stop``), checked when made as RHAPSODY
    checks them. Other keyword arguments are kept as fields.
    """

    def __init__(self, prompt: str, model: Optional[str] = None,
                 inference_endpoint: Optional[str] = None, system_prompt: Optional[str] = None,
                 temperature: Optional[float] = None, max_tokens: Optional[int] = None,
                 top_p: Optional[float] = None, top_k: Optional[int] = None,
                 stop_sequences: Optional[List[str]] = None, uid: Optional[str] = None,
                 backend: Optional[str] = None, **extra: Any) -> None:
        super().__init__(uid, backend, prompt=prompt, model=model,
                         inference_endpoint=inference_endpoint, system_prompt=system_prompt,
                         temperature=temperature, max_tokens=max_tokens, top_p=top_p,
                         top_k=top_k, stop_sequences=stop_sequences, **extra)

    def _check(self) -> None:
        super()._check()
        self._need("prompt", self.prompt, str, "a string")
        if not self.prompt:
            self._invalid("prompt is required")
        if self.inference_endpoint is not None:
            self._invalid("inference_endpoint is not provided: declare the server's model "
                          "with a DragonVllmInferenceBackend and route to it by backend=")
        if not (self.model or self.backend):
            self._invalid("AITask requires either 'model' or 'backend' to be specified")
        if self.model is not None:
            self._need("model", self.model, str, "a string")
        for field, ok, what in (
                ("temperature", lambda v: _number(v) and v >= 0, "a non-negative number"),
                ("max_tokens", lambda v: _integer(v) and v >= 1, "a positive integer"),
                ("top_p", lambda v: _number(v) and 0 <= v <= 1, "a number between 0 and 1"),
                ("top_k", lambda v: _integer(v) and v >= 1, "a positive integer"),
                ("stop_sequences", lambda v: isinstance(v, list), "a list")):
            value = self[field]
            if value is not None and not ok(value):
                self._invalid(f"{field} must be {what}, got {brief(value)}")

    def _build(self) -> Node:
        literal = self.prompt.replace("{", "{{").replace("}", "}}")  # not a template
        sampling = {k: self[k] for k in ("temperature", "max_tokens", "top_p", "top_k")
                    if self[k] is not None}
        if self.stop_sequences is not None:
            sampling["stop"] = self.stop_sequences
        try:  # a sampling value out of its range
            return ai(literal, model=self.model, system=self.system_prompt, name=self.uid,
                      backend=self.backend, **sampling)
        except (TypeError, ValueError) as e:
            self._invalid(str(e))

    def _value(self, value: Any) -> None:
        self.response = self.return_value = value


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _refused(exc: Exception, tasks: Sequence[BaseTask], nodes: Sequence[Node]) -> RhapsodyError:
    """RHAPSODY's error for a batch the session refused before anything ran, naming the
    task: no backend for it (``SessionError``), more than any host has
    (``ResourceError``), what cannot be sent to a worker (``TaskValidationError``)."""
    uid = next((t.uid for t, n in zip(tasks, nodes) if repr(n.key) in str(exc)), None)
    if isinstance(exc, NoBackendError):
        return SessionError(str(exc))
    if isinstance(exc, UnsatisfiableError):
        return ResourceError(uid, "cpus/gpus", f"{exc} (a ConcurrentExecutionBackend has a "
                             "core per worker of its executor: executor=ThreadPoolExecutor("
                             "max_workers=N); GPUs are found from CUDA_VISIBLE_DEVICES or "
                             "nvidia-smi)")
    return TaskValidationError(uid, str(exc))


class Session:
    """RHAPSODY's session: an async context manager over named backends.

    Tasks go to their ``backend=`` by name, else to the first backend that can run
    them (AI tasks: the first inference backend). ``work_dir`` (default: the current
    directory) holds ``<uid>/``, where ``capture_stdio`` files go.
    """

    def __init__(self, backends: Sequence[Any], uid: Optional[str] = None,
                 work_dir: Optional[str] = None) -> None:
        if not backends:
            raise ValueError("Session needs at least one backend")
        self.backends: Dict[str, Any] = {b.name: b for b in backends}  # by name, as RHAPSODY's
        if len(self.backends) < len(backends):
            raise ValueError("Session: backends need distinct names, got "
                             f"{[b.name for b in backends]}; give each its own name=")
        self.uid = uid or f"rhapsody.session.{os.urandom(4).hex()}"
        self.work_dir = work_dir or os.getcwd()
        self.tasks: List[BaseTask] = []
        self._session: Optional[_Session] = None
        self._opening = asyncio.Lock()  # coroutines that use it first make one session
        self._closed = False

    async def _open(self) -> _Session:
        """The session, made on first use. Off the event loop, as is every call that may
        wait on a backend: an asynchronous Dask cluster is served by this very loop."""
        async with self._opening:
            if self._closed:
                raise SessionError(f"session {self.uid!r} is closed; make a new Session")
            if self._session is None:
                backends = [b.backend for b in self.backends.values()]
                stop_on_sigterm()  # here, in the loop's thread: the session is made off it
                self._session = await asyncio.get_running_loop().run_in_executor(
                    None, _Session, backends)
            return self._session

    async def __aenter__(self) -> "Session":
        await self._open()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def submit_tasks(self, tasks: Iterable[BaseTask]) -> List[asyncio.Future]:
        """Start ``tasks``; returns at once one ``asyncio`` future per task, as RHAPSODY
        does, which resolves to the task once it has ended (a failure does not raise:
        it is on the task's ``state`` and ``exception``)."""
        if isinstance(tasks, (BaseTask, str, bytes)) \
                or not isinstance(tasks, collections.abc.Iterable):
            raise TypeError(f"submit_tasks() takes a list of tasks, got {brief(tasks)}")
        tasks = list(tasks)
        for t in tasks:
            if not isinstance(t, BaseTask):
                raise TypeError(f"submit_tasks() takes tasks (ComputeTask, AITask), got "
                                f"{brief(t)}: make a dict a task with ComputeTask(**fields)")
        session, loop = await self._open(), asyncio.get_running_loop()
        for t in tasks:
            if isinstance(t, AITask) and t.model is None:
                t.model = self._model_for(t)
        nodes = [t.node() for t in tasks]  # every task checked before any starts
        folder = os.path.join(self.work_dir, self.uid)
        try:
            futures = await loop.run_in_executor(None, session.submit, nodes)
        except (NoBackendError, UnsatisfiableError, TypeError) as exc:
            raise _refused(exc, tasks, nodes) from exc
        for t, fut in zip(tasks, futures):
            t._submitted(fut, loop, folder)
        self.tasks += tasks
        return [t._handed() for t in tasks]

    def _model_for(self, t: AITask) -> Optional[str]:
        models = [b.model_name for b in self.backends.values() if getattr(b, "model_name", None)
                  and (t.backend is None or b.name == t.backend)]
        return models[0] if models else None

    async def wait_tasks(self, tasks: Optional[Iterable[BaseTask]] = None,
                         timeout: Optional[float] = None) -> List[BaseTask]:
        """Wait until ``tasks`` (default: every task submitted) have ended; past
        ``timeout`` seconds raise ``asyncio.TimeoutError`` saying how many have."""
        tasks = list(self.tasks if tasks is None else tasks)
        waiters = [asyncio.shield(t._waiter()) for t in tasks]
        try:
            await asyncio.wait_for(asyncio.gather(*waiters), timeout)
        except asyncio.TimeoutError:
            ended = sum(t._ended.done() for t in tasks)
            raise asyncio.TimeoutError(
                f"Timeout after {timeout}s: {ended}/{len(tasks)} tasks completed") from None
        return tasks

    async def close(self) -> None:
        """Stop what still runs and shut the backends down."""
        self._closed = True
        if self._session is not None:
            session, self._session = self._session, None
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, session.close)
            for b in self.backends.values():
                await loop.run_in_executor(None, b._close)
