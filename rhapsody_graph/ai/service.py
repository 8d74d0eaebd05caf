"""Inference services: a real server process per declared model, started on demand.

Lifecycle: :meth:`Service.start` picks a free loopback port, starts the engine's
OpenAI-compatible server in its own session with ``HF_HUB_OFFLINE=1`` and the GPU
mask of its placement, keeps its output in a log file, and polls ``/v1/models`` until
it answers (readiness is the one place that polls: a server has no other signal).
:meth:`Service.stop` kills the whole process group. A service that dies is reported
with its exit status and the last lines of its log.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional

from .models import Model
from ..resources import Ledger, Placement, Resources

__all__ = ["Service"]

HOST = "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Service:
    """One running inference server for ``model`` (or a remote endpoint)."""

    def __init__(self, model: Model, placement: Optional[Placement] = None) -> None:
        self.model, self.placement = model, placement
        self.proc: Optional[subprocess.Popen] = None
        self.log_path: Optional[str] = None
        self.client: Any = None
        self.failed: Optional[BaseException] = None  # a failed start fails every later node
        self.keep_log = False  # set once a failure message points at the log
        self.stopped = False
        self.lock = threading.Lock()  # one start at a time
        self.proc_lock = threading.Lock()  # guards proc and stopped: stop() never waits a start

    def start(self) -> Any:
        """Start the server if it is not running yet (thread-safe); return its client.

        Raises:
            RuntimeError: it could not start (the same error for every later caller).
        """
        with self.lock:
            if self.failed is not None:
                raise self.failed
            if self.client is None:
                try:
                    self.client = self._start()
                except BaseException as exc:
                    self.failed = exc
                    raise
            return self.client

    def _start(self) -> Any:
        from .client import Client, ServerError  # httpx: only with the `ai` extra
        m = self.model
        if m.engine == "remote":
            return Client(m.url, m.api_key, m.timeout, m.retries, m.concurrency, m.name)
        port = _free_port()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               **self._gpu_env()}
        log = tempfile.NamedTemporaryFile(prefix=f"rhapsody-{m.name}-", suffix=".log",
                                          delete=False)
        self.log_path = log.name
        with self.proc_lock:
            if self.stopped:
                log.close()
                raise RuntimeError(f"the inference service for model {m.name!r} was stopped")
            self.proc = subprocess.Popen(self._argv(port), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env,
                                         start_new_session=True)
        log.close()
        client = Client(f"http://{HOST}:{port}/v1", m.api_key, m.timeout, 0, m.concurrency,
                        m.name)
        deadline = time.monotonic() + m.ready_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(self.failure("exited before it was ready"))
            try:
                client.models()
                break
            except ServerError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(self.failure(f"was not ready after {m.ready_timeout:g} s"))
                time.sleep(0.1)
        client.retries = m.retries
        return client

    def _argv(self, port: int) -> List[str]:
        m = self.model
        if m.engine == "llama_cpp":
            argv = [sys.executable, "-m", "llama_cpp.server", "--model", m.path, "--host", HOST,
                    "--port", str(port), "--n_threads", str(max(1, m.cpus))]
            key = ["--api_key", m.api_key] if m.api_key else []
        else:
            argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", m.path,
                    "--served-model-name", m.name, "--host", HOST, "--port", str(port)]
            key = ["--api-key", m.api_key] if m.api_key else []
        return argv + key + list(m.args)

    def _gpu_env(self) -> dict:
        gpus = ",".join(map(str, self.placement.gpus)) if self.placement else ""
        return {"CUDA_VISIBLE_DEVICES": gpus, "ROCR_VISIBLE_DEVICES": gpus,
                "ZE_AFFINITY_MASK": gpus}

    def died(self, grace: float = 0.0) -> bool:
        """Whether the server has exited (waiting up to ``grace`` seconds to see it)."""
        if self.model.engine == "remote" or self.proc is None:
            return False
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            return False
        return True

    def failure(self, what: str) -> str:
        """``what`` happened to the server, with its exit status and last log lines."""
        self.keep_log = True
        status = ""
        if self.proc is not None and self.proc.poll() is not None:
            status = f" (exit status {self.proc.returncode})"
        return (f"the inference service for model {self.model.name!r} {what}{status}; "
                f"last lines of {self.log_path}:\n" + self.log_tail())

    def log_tail(self, lines: int = 15) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except (OSError, TypeError):
            return "(no log)"

    def stop(self) -> None:
        """Kill the server's process group and wait for it."""
        with self.proc_lock:
            self.stopped = True
        if self.client is not None:
            self.client.close()
        if self.proc is not None:
            try:  # the group even if its leader died: engines fork helper processes
                os.killpg(self.proc.pid, 9)
            except (ProcessLookupError, PermissionError):
                pass
            self.proc.wait()
        if self.log_path and not self.keep_log:
            try:
                os.unlink(self.log_path)
            except OSError:
                pass


class Services:
    """The services of one backend: one per model, started on first use, stopped at the
    end of each ``compute()``; GPUs (and cores) they ask for are held in the ledger.
    Clients of remote endpoints (``url=``) are kept across runs: nothing to stop there.

    A service is admitted like a node: :meth:`admit` takes its placement from the
    ledger when the first node that needs it is ready, or says the node must wait.
    ``users`` maps the tid of each running AI node to its service, so
    :meth:`release_idle` knows which services no node is using.
    """

    def __init__(self) -> None:
        self.running: Dict[str, Service] = {}  # model name -> Service
        self.users: Dict[int, Service] = {}  # tid of a running AI node -> its service

    def admit(self, model: Model, ledger: Ledger, request: Optional[Resources]) -> bool:
        """Make sure ``model`` has a service (not started yet if new), placed by
        ``request`` (None: no placement) from ``ledger``; False if that does not fit now."""
        service = self.running.get(model.name)
        if service is not None and service.model is not model:  # declared anew since
            self._stop(service, ledger)
            service = None
        if service is not None:
            return True
        placement = None
        if request is not None:
            placement = ledger.allocate(request)
            if placement is None:
                return False
        self.running[model.name] = Service(model, placement)
        return True

    def begin(self, tid: int, model: Model) -> Service:
        """The admitted service of ``model``, now used by AI node ``tid``."""
        service = self.users[tid] = self.running[model.name]
        return service

    def end(self, tid: int) -> None:
        """AI node ``tid`` is done with its service."""
        self.users.pop(tid, None)

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
        service.stop()
        if ledger is not None and service.placement is not None:
            ledger.release(service.placement)
        del self.running[service.model.name]

    def stop_all(self, ledger: Optional[Ledger], keep_remote: bool = False) -> None:
        """Stop every service (remote clients too, unless ``keep_remote``)."""
        for service in list(self.running.values()):
            if not (keep_remote and service.model.engine == "remote"):
                self._stop(service, ledger)
        self.users.clear()
