"""RHAPSODY's ``Session``, ``ComputeTask`` and ``AITask``, as nodes of a rhapsody_graph session.

>>> t = ComputeTask(function=abs, args=(-3,), uid="t1")
>>> (t.uid, t.state, t.return_value)
('t1', 'NEW', None)
"""
from __future__ import annotations

import asyncio
import itertools
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence

from ..ai.nodes import ai
from ..errors import ExecutableError, brief
from ..futures import Future
from ..graph import Node
from ..session import Session as _Session
from ..task import executable, task

__all__ = ["Session", "ComputeTask", "AITask", "BaseTask", "TaskState"]


class TaskState:
    """A task's states, as RHAPSODY names them."""
    NEW, SUBMITTED, DONE, FAILED, CANCELED = "NEW", "SUBMITTED", "DONE", "FAILED", "CANCELED"


_uids = itertools.count(1)
#: task_backend_specific_kwargs that map onto node options
BACKEND_KWARGS = ("process_template", "process_templates")


class BaseTask:
    """What every task carries. Awaiting a task waits for it to end and returns the task;
    a failure is on ``state``/``exception`` (it does not raise), as RHAPSODY reports it.

    Attributes: ``uid``, ``state`` (:class:`TaskState`), ``backend`` (the name asked,
    then the name it ran on), ``return_value``, ``stdout``, ``stderr``, ``exit_code``,
    ``exception``, and ``future`` (the :class:`rhapsody_graph.Future`, with ``where``).
    """

    def __init__(self, backend: Optional[str] = None, uid: Optional[str] = None) -> None:
        self.uid = uid if uid is not None else f"task.{next(_uids):06d}"
        self.backend = backend
        self.state = TaskState.NEW
        self.return_value: Any = None
        self.stdout: Optional[str] = None
        self.stderr: Optional[str] = None
        self.exit_code: Optional[int] = None
        self.exception: Optional[BaseException] = None
        self.future: Optional[Future] = None
        self._ended: Optional[asyncio.Future] = None

    def node(self) -> Node:  # pragma: no cover - every task kind defines it
        raise NotImplementedError

    def __await__(self):
        if self._ended is None:
            raise RuntimeError(f"task {self.uid!r} was not submitted: "
                               "await session.submit_tasks([...]) first")
        return asyncio.shield(self._ended).__await__()  # a waiter's timeout leaves it be

    def __getitem__(self, name: str) -> Any:  # RHAPSODY tasks are also read as dicts
        return getattr(self, name)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.uid} {self.state}>"

    def _submitted(self, fut: Future, loop: asyncio.AbstractEventLoop) -> None:
        self.future, self.state = fut, TaskState.SUBMITTED
        self._ended = loop.create_future()

        def ended(f: Future) -> None:  # on the scheduler's thread
            try:
                loop.call_soon_threadsafe(self._record, f)
            except RuntimeError:  # the event loop has closed: nobody awaits it
                pass
        fut.add_done_callback(ended)

    def _record(self, f: Future) -> None:
        """Fill the task's fields from its future (on the event loop)."""
        if f.cancelled():
            self.state = TaskState.CANCELED
        else:
            where = f.where
            if where is not None:
                self.backend = where.backend
                self.stdout, self.stderr = where.stdout, where.stderr
            exc = f.exception()
            if exc is None:
                self.state, self.exit_code = TaskState.DONE, 0
                self._value(f.result())
            else:
                self.state, self.exception = TaskState.FAILED, exc
                self.exit_code = exc.returncode if isinstance(exc, ExecutableError) else 1
                if isinstance(exc, ExecutableError):
                    self.stdout, self.stderr = exc.stdout, exc.stderr
        if not self._ended.done():
            self._ended.set_result(self)

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
    """

    def __init__(self, function: Optional[Callable[..., Any]] = None,
                 executable: Optional[str] = None, args: Sequence[Any] = (),
                 kwargs: Optional[Mapping[str, Any]] = None,
                 arguments: Sequence[Any] = (),
                 task_backend_specific_kwargs: Optional[Mapping[str, Any]] = None,
                 backend: Optional[str] = None, uid: Optional[str] = None) -> None:
        super().__init__(backend, uid)
        if (function is None) == (executable is None):
            raise TypeError(f"ComputeTask {self.uid!r}: give function= or executable=, "
                            "exactly one")
        if function is not None and not callable(function):
            raise TypeError(f"ComputeTask {self.uid!r}: function= must be callable, "
                            f"got {brief(function)}")
        extra = dict(task_backend_specific_kwargs or {})
        bad = sorted(set(extra) - set(BACKEND_KWARGS))
        if bad:
            raise TypeError(f"ComputeTask {self.uid!r}: task_backend_specific_kwargs takes "
                            f"{', '.join(BACKEND_KWARGS)}; got {', '.join(map(repr, bad))}")
        self.function, self.executable = function, executable
        self.args, self.kwargs, self.arguments = tuple(args), dict(kwargs or {}), list(arguments)
        self.options: Dict[str, Any] = {**extra, "name": self.uid}
        if backend is not None:
            self.options["backend"] = backend
        self._node = self._build()  # bad options fail here, before anything runs

    def _build(self) -> Node:
        if self.executable is not None:
            return executable([self.executable, *self.arguments], **self.options)
        return task(self.function).options(**self.options)(*self.args, **self.kwargs)

    def node(self) -> Node:
        return self._node

    def _value(self, value: Any) -> None:
        if self.executable is None:
            self.return_value = value
            return
        ranks = value if isinstance(value, list) else [value]
        self.stdout = "".join(r.stdout for r in ranks)
        self.stderr = "".join(r.stderr for r in ranks)  # return_value stays None


class AITask(BaseTask):
    """A prompt to an inference backend; its answer is ``response`` (and ``return_value``).

    ``model`` defaults to the model of the inference backend it is routed to (by
    ``backend=``, else the session's first one).
    """

    def __init__(self, prompt: str, backend: Optional[str] = None, model: Optional[str] = None,
                 system_prompt: Optional[str] = None, uid: Optional[str] = None,
                 **sampling: Any) -> None:
        super().__init__(backend, uid)
        if not isinstance(prompt, str):
            raise TypeError(f"AITask {self.uid!r}: prompt must be a string, got {brief(prompt)}")
        self.prompt, self.model, self.system_prompt = prompt, model, system_prompt
        self.sampling = sampling
        self.response: Optional[str] = None

    def node(self, model: Optional[str] = None) -> Node:
        literal = self.prompt.replace("{", "{{").replace("}", "}}")  # not a template
        return ai(literal, model=self.model or model, system=self.system_prompt,
                      name=self.uid, backend=self.backend, **self.sampling)

    def _value(self, value: Any) -> None:
        self.response = self.return_value = value


class Session:
    """RHAPSODY's session: an async context manager over named backends.

    Tasks go to their ``backend=`` by name, else to the first backend that can run
    them (AI tasks: the first inference backend).
    """

    def __init__(self, backends: Sequence[Any], uid: Optional[str] = None) -> None:
        if not backends:
            raise ValueError("Session needs at least one backend")
        self.backends = list(backends)
        self.uid = uid or "session"
        self.tasks: List[BaseTask] = []
        self._session: Optional[_Session] = None

    async def _open(self) -> _Session:
        """The session, made on first use. Off the event loop, as is every call that may
        wait on a backend: an asynchronous Dask cluster is served by this very loop."""
        if self._session is None:
            backends = [b.backend for b in self.backends]
            made = await asyncio.get_running_loop().run_in_executor(None, _Session, backends)
            if self._session is None:
                self._session = made
            else:
                made.close()
        return self._session

    async def __aenter__(self) -> "Session":
        await self._open()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def submit_tasks(self, tasks: Iterable[BaseTask]) -> List[BaseTask]:
        """Start ``tasks``; returns them (each is awaitable) at once."""
        tasks = list(tasks)
        session, loop = await self._open(), asyncio.get_running_loop()
        nodes = [t.node(self._model_for(t)) if isinstance(t, AITask) else t.node()
                 for t in tasks]  # every task checked before any starts
        for t, fut in zip(tasks, await loop.run_in_executor(None, session.submit, nodes)):
            t._submitted(fut, loop)
        self.tasks += tasks
        return tasks

    def _model_for(self, t: AITask) -> Optional[str]:
        models = [b.model_name for b in self.backends if getattr(b, "model_name", None)
                  and (t.backend is None or b.name == t.backend)]
        return models[0] if models else None

    async def wait_tasks(self, tasks: Optional[Iterable[BaseTask]] = None,
                         timeout: Optional[float] = None) -> List[BaseTask]:
        """Wait until ``tasks`` (default: every task submitted) have ended."""
        tasks = list(self.tasks if tasks is None else tasks)
        await asyncio.wait_for(asyncio.gather(*tasks), timeout)
        return tasks

    async def close(self) -> None:
        """Stop what still runs and shut the backends down."""
        if self._session is not None:
            session, self._session = self._session, None
            await asyncio.get_running_loop().run_in_executor(None, session.close)
