"""Inference services: a real server process per declared model, started on demand.

Lifecycle: :meth:`Service.start` has its *server* (where the process runs) start the
engine's OpenAI-compatible server on a free port, in its own session, with
``HF_HUB_OFFLINE=1`` and the GPU mask of its placement, its output in a log file;
then it polls ``/v1/models`` until the server answers (readiness is the one place
that polls: a server has no other signal). :meth:`Service.stop` kills the server's
whole process group. A service that dies is reported with its exit status and the
last lines of its log.

Where the process runs is the backend's choice: a :class:`LocalServer` is a child of
this driver on loopback; :class:`~rhapsody_graph.backends.dragon_service.DragonServer`
runs it on the host Dragon placed the service on. Both have the same small surface:
``start(argv, env) -> url``, ``pid``, ``returncode()``, ``wait(timeout)``,
``tail(lines)``, ``log`` and ``stop(keep_log)``.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .models import Model
from ..resources import Ledger, Placement, Resources, gpu_masks, gpu_names

__all__ = ["Service", "Services", "LocalServer", "local_server", "fill", "free_port"]

LOOPBACK = "127.0.0.1"
HOST_MARK, PORT_MARK = "{host}", "{port}"  # in a server's argv, until its address is known


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nothing listens on at ``host`` now."""
    import socket
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def fill(argv: Sequence[str], host: str, port: int) -> List[str]:
    """``argv`` with its address marks replaced by ``host`` and ``port``."""
    return [host if a == HOST_MARK else str(port) if a == PORT_MARK else a for a in argv]


class LocalServer:
    """A server process of this process, listening on ``bind``, logging to a temp file.

    ``preexec_fn`` runs in the child before the server starts (the Dragon service
    host makes it die with its keeper). ``stop()`` may come from another thread at
    any time, also during ``start()``: a server stopped before it started is never
    started.
    """

    def __init__(self, name: str, bind: str = LOOPBACK,
                 preexec_fn: Optional[Callable[[], None]] = None) -> None:
        self.name, self.bind, self.preexec_fn = name, bind, preexec_fn
        self.proc: Optional[subprocess.Popen] = None
        self.log: Optional[str] = None
        self.stopped = False
        self.lock = threading.Lock()

    @property
    def pid(self) -> Optional[int]:
        return None if self.proc is None else self.proc.pid

    def start(self, argv: Sequence[str], env: Dict[str, str]) -> str:
        """Start ``argv`` (with its address marks filled in); return the server's URL."""
        from ..backends import watchdog  # not at import: backends import this
        port = free_port(self.bind)
        with self.lock:
            if self.stopped:
                raise RuntimeError(f"the inference service for model {self.name!r} was stopped")
            log = tempfile.NamedTemporaryFile(prefix=f"rhapsody-{self.name}-", suffix=".log",
                                              delete=False)
            self.log = log.name
            watchdog.remove_at_end(self.log)  # if the driver dies first
            env = watchdog.marked({**os.environ, **env})
            with log:
                self.proc = subprocess.Popen(fill(argv, self.bind, port), stdout=log,
                                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             env=env, start_new_session=True,
                                             preexec_fn=self.preexec_fn)
            watchdog.guard(self.proc, env)
        return f"http://{self.bind}:{port}/v1"

    def returncode(self) -> Optional[int]:
        return None if self.proc is None else self.proc.poll()

    def wait(self, timeout: float) -> Optional[int]:
        """The exit status, waiting up to ``timeout`` seconds for it (None: running)."""
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def tail(self, lines: int) -> str:
        """The last ``lines`` lines of the log."""
        try:
            with open(self.log, errors="replace") as f:  # type: ignore[arg-type]
                return "".join(f.readlines()[-lines:])
        except (OSError, TypeError):
            return "(no log)"

    def stop(self, keep_log: bool) -> None:
        """Kill the server's process group, wait for it, delete its log unless kept."""
        from ..backends import watchdog
        with self.lock:
            self.stopped = True
        if self.proc is not None:
            from ..backends.launch import kill_tree  # not at import: backends import this
            kill_tree(self.proc)  # the group even if its leader died: engines fork helpers
            self.proc.wait()
            watchdog.release(self.proc)
        if self.log and not keep_log:
            try:
                os.unlink(self.log)
            except OSError:
                pass
        if self.log:
            watchdog.keep_file(self.log)


#: makes the server of a service: ``spawn(model, placement)``
Spawn = Callable[[Model, Optional[Placement]], Any]


def local_server(model: Model, placement: Optional[Placement] = None) -> LocalServer:
    """The local backend's :data:`Spawn`: a child of the driver on loopback (the
    placement's GPUs reach the server in its environment)."""
    return LocalServer(model.name)


class Service:
    """One running inference server for ``model`` (or a remote endpoint)."""

    def __init__(self, model: Model, placement: Optional[Placement] = None,
                 spawn: Spawn = local_server) -> None:
        self.model, self.placement, self.spawn = model, placement, spawn
        self.server: Any = None
        self.client: Any = None
        self.failed: Optional[BaseException] = None  # a failed start fails every later node
        self.keep_log = False  # set once a failure message points at the log
        self.stopped = False
        self.lock = threading.Lock()  # one start at a time
        self.server_lock = threading.Lock()  # guards server and stopped: stop() never waits a start

    def start(self) -> Any:
        """Start the server if it is not running yet (thread-safe); return its client.

        Raises:
            RuntimeError: it could not start (the same message for every later caller, in
                an exception of its own: each caller's node adds its own note).
        """
        with self.lock:
            if self.failed is not None:
                raise RuntimeError(str(self.failed)) from self.failed.__cause__
            if self.client is None:
                try:
                    self.client = self._start()
                except BaseException as exc:
                    self.failed = exc
                    raise
            return self.client

    def _start(self) -> Any:
        from .client import Client, Deadline, ServerError  # httpx: only with the `ai` extra
        m = self.model
        if m.engine == "remote":
            return Client(m.url, m.api_key, m.timeout, m.retries, m.concurrency, m.name)
        with self.server_lock:
            if self.stopped:
                raise RuntimeError(f"the inference service for model {m.name!r} was stopped")
            server = self.server = self.spawn(m, self.placement)
        env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **self._gpu_env()}
        url = server.start(self._argv(), env)
        client = Client(url, m.api_key, m.timeout, 0, m.concurrency, m.name)
        deadline = Deadline(time.monotonic() + m.ready_timeout)
        error: Optional[ServerError] = None
        while time.monotonic() < deadline.at:
            if server.returncode() is not None:
                raise RuntimeError(self.failure("exited before it was ready"))
            try:
                client.models(deadline)  # each poll waits no longer than the time left
                client.retries = m.retries
                return client
            except ServerError as exc:
                error = exc
            time.sleep(0.1)
        message = self.failure(f"was not ready after {m.ready_timeout:g} s ({error})")
        self.stop()
        raise RuntimeError(message)

    def _argv(self) -> List[str]:
        m = self.model
        if m.engine == "llama_cpp":
            argv = [sys.executable, "-m", "llama_cpp.server", "--model", m.path, "--host",
                    HOST_MARK, "--port", PORT_MARK, "--n_threads", str(max(1, m.cpus))]
            key = ["--api_key", m.api_key] if m.api_key else []
        else:
            argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", m.path,
                    "--served-model-name", m.name, "--host", HOST_MARK, "--port", PORT_MARK]
            key = ["--api-key", m.api_key] if m.api_key else []
        return argv + key + list(m.args)

    def _gpu_env(self) -> Dict[str, str]:
        names = gpu_names() if self.spawn is local_server else {}  # on this host: its UUIDs
        return gpu_masks(self.placement.gpus if self.placement else (), names)

    def died(self, grace: float = 0.0) -> bool:
        """Whether the server has exited (waiting up to ``grace`` seconds to see it)."""
        if self.server is None:
            return False
        return self.server.wait(grace) is not None

    def crashed(self) -> bool:
        """Whether a server that was serving has died (a warning says so, pointing at
        its log, kept): the next node starts a new one."""
        if self.client is None or self.failed is not None or not self.died():
            return False
        from ..errors import warn
        warn(self.failure("died; a new one starts for the next node that needs it"))
        return True

    def failure(self, what: str) -> str:
        """``what`` happened to the server, with its exit status and last log lines."""
        self.keep_log = True
        code = None if self.server is None else self.server.returncode()
        status = "" if code is None else f" (exit status {code})"
        log = None if self.server is None else self.server.log
        tail = "(no log)" if self.server is None else self.server.tail(15)
        return (f"the inference service for model {self.model.name!r} {what}{status}; "
                f"last lines of {log}:\n" + tail)

    def stop(self) -> None:
        """Kill the server's process group and wait for it."""
        with self.server_lock:
            self.stopped = True
            server = self.server
        if self.client is not None:
            self.client.close()
        if server is not None:
            server.stop(self.keep_log)


class Services:
    """The services of one backend: one per model, started on first use, stopped at the
    end of each ``compute()``; GPUs (and cores) they ask for are held in the ledger.
    Clients of remote endpoints (``url=``) are kept across runs: nothing to stop there.

    A service is admitted like a node: :meth:`admit` takes its placement from the
    ledger when the first node that needs it is ready, or says the node must wait.
    ``users`` maps the tid of each running AI node to its service, so
    :meth:`release_idle` knows which services no node is using.
    """

    def __init__(self, spawn: Spawn = local_server) -> None:
        self.spawn = spawn  # where the backend runs servers
        self.running: Dict[str, Service] = {}  # model name -> Service
        self.users: Dict[int, Service] = {}  # tid of a running AI node -> its service
        #: services of a model declared anew while they served nodes: stopped (and their
        #: placement given back to the ledger) when their last node ends
        self.retired: List[Tuple[Service, Ledger]] = []

    def admit(self, model: Model, ledger: Ledger, request: Optional[Resources]) -> bool:
        """Make sure ``model`` has a service (not started yet if new), placed by
        ``request`` (None: no placement) from ``ledger``; False if that does not fit now."""
        service = self.running.get(model.name)
        if service is not None and (service.model is not model or service.crashed()):
            del self.running[model.name]  # declared anew since, or its server died: anew
            if service in self.users.values():  # its nodes finish on it
                self.retired.append((service, ledger))
            else:
                self._halt(service, ledger)
            service = None
        if service is not None:
            return True
        placement = None
        if request is not None:
            placement = ledger.allocate(request)
            if placement is None:
                return False
        self.running[model.name] = Service(model, placement, self.spawn)
        return True

    def begin(self, tid: int, model: Model) -> Service:
        """The admitted service of ``model``, now used by AI node ``tid``."""
        service = self.users[tid] = self.running[model.name]
        return service

    def end(self, tid: int) -> None:
        """AI node ``tid`` is done with its service (a retired one stops with its last)."""
        service = self.users.pop(tid, None)
        if self.retired and service is not None and service not in self.users.values():
            for i, (old, ledger) in enumerate(self.retired):
                if old is service:
                    del self.retired[i]
                    self._halt(service, ledger)
                    break

    def release_idle(self, ledger: Ledger) -> bool:
        """Stop the services that hold cores or GPUs and serve no running node, so a
        node waiting for those can run; True if any was stopped."""
        busy = {id(s) for s in self.users.values()}
        idle = [s for s in self.running.values()
                if s.placement is not None and id(s) not in busy]
        for service in idle:
            self._stop(service, ledger)
        return bool(idle)

    def _stop(self, service: Service, ledger: Optional[Ledger]) -> None:
        self._halt(service, ledger)
        del self.running[service.model.name]

    @staticmethod
    def _halt(service: Service, ledger: Optional[Ledger]) -> None:
        service.stop()
        if ledger is not None and service.placement is not None:
            ledger.release(service.placement)

    def stop_all(self, ledger: Optional[Ledger], keep_remote: bool = False) -> None:
        """Stop every service (remote clients too, unless ``keep_remote``)."""
        for service in list(self.running.values()):
            if not (keep_remote and service.model.engine == "remote"):
                self._stop(service, ledger)
        for service, _ in self.retired:
            self._halt(service, ledger)
        self.retired.clear()
        self.users.clear()
