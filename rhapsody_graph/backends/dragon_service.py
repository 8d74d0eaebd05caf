"""Inference servers on the host Dragon placed their service on.

Under :class:`~.dragon.DragonBackend` the ledger may place a model's service (its
``gpus=``/``cpus=``) on any host. :class:`DragonServer` starts a Dragon process
there, :mod:`.service_host`, with ``Policy(HOST_NAME, cpu_affinity, gpu_affinity)``
from the placement, so the server runs on the granted cores and sees the granted
GPUs. The service host connects back to a listening socket of this driver (one per
service, authenticated with a fresh token) and keeps the server: it starts it,
reports its address, answers for its exit status and log, and kills its process
group when told to stop or when the driver's socket closes.

The server listens on loopback when it runs on the driver's host, and on the host's
address (Dragon's ``Node.ip``) otherwise; the driver polls readiness over the
network like any other server (:class:`~rhapsody_graph.ai.service.Service`).
"""
from __future__ import annotations

import hmac
import os
import secrets
import socket
import sys
import threading
import time
from typing import Any, Dict, Optional, Sequence

from . import wire

__all__ = ["DragonServer"]

TOKEN_BYTES = 32
TOKEN_ENV = "RHAPSODY_SERVICE_TOKEN"  # how the service host gets its token
ACCEPT_TICK = 0.5  # while waiting for the service host, check this often that it lives
STOP_TIMEOUT = 10.0  # stop() kills a service host that takes longer to end
ANSWER_TIMEOUT = 30.0  # a service host that takes longer to answer is given up on


class DragonServer:
    """A model's server on ``host``, kept by a :mod:`.service_host` Dragon process.

    Args:
        name: the model, for messages.
        host: the Dragon host name the service was placed on.
        bind: the address the server listens on (loopback on the driver's host).
        listen: this driver's address the service host can reach.
        policy: the Dragon ``Policy`` of the service host process.
        start_timeout: seconds the service host may take to connect.
    """

    def __init__(self, name: str, host: str, bind: str, listen: str, policy: Any,
                 start_timeout: float) -> None:
        self.name, self.host, self.bind, self.listen = name, host, bind, listen
        self.policy, self.start_timeout = policy, start_timeout
        self.pid: Optional[int] = None  # the server's, on its host
        self.log: Optional[str] = None  # "host:path"
        self.gone: Optional[str] = None  # why the service host can no longer be asked
        self.code: Optional[int] = None  # the server's exit status, once known
        self.stopped = False
        self.proc: Any = None  # the service host's dragon.native.process.Process
        self.listener: Optional[socket.socket] = None
        self.sock: Optional[socket.socket] = None
        self.lock = threading.Lock()  # guards stopped, proc, listener, sock
        self.talk = threading.Lock()  # one request at a time on sock

    def start(self, argv: Sequence[str], env: Dict[str, str]) -> str:
        """Start the service host, then the server; return the server's URL."""
        from dragon.native.process import Process
        token = secrets.token_bytes(TOKEN_BYTES)
        listener = socket.create_server((self.listen, 0))
        child_env = {TOKEN_ENV: token.hex(), "PYTHONPATH": os.pathsep.join(wire.python_path())}
        args = ["-m", "rhapsody_graph.backends.service_host", self.listen,
                str(listener.getsockname()[1])]
        with self.lock:
            if self.stopped:
                listener.close()
                raise self._error("was stopped")
            self.listener = listener
            self.proc = Process(target=sys.executable, args=args, env=child_env,
                                policy=self.policy)
            self.proc.start()
        conn = self._accept(listener, token)
        with self.lock:
            if self.stopped:
                conn.close()
                raise self._error("was stopped")
            self.sock = conn
        with self.talk:
            wire.send_message(conn, ("start", self.name, list(argv), env, self.bind))
            answer = wire.recv_message(conn)
        if answer[0] == "failed":
            raise self._error(f"could not start its server on host {self.host!r}: {answer[1]}")
        _, url, self.pid, log = answer
        self.log = f"{self.host}:{log}"
        return url

    def _accept(self, listener: socket.socket, token: bytes) -> socket.socket:
        """The service host's authenticated connection."""
        deadline = time.monotonic() + self.start_timeout
        listener.settimeout(ACCEPT_TICK)
        while True:
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                if self.stopped:
                    raise self._error("was stopped") from None
                if not self.proc.is_alive:
                    raise self._error(f"lost its service host on {self.host!r} (exit status "
                                      f"{self.proc.returncode}) before it connected") from None
                if time.monotonic() > deadline:
                    raise self._error(f"got no service host on {self.host!r} within "
                                      f"{self.start_timeout:g} s") from None
                continue
            except OSError:  # closed by stop()
                raise self._error("was stopped") from None
            conn.settimeout(10)
            try:
                ok = hmac.compare_digest(wire.recv_exactly(conn, TOKEN_BYTES), token)
            except OSError:
                ok = False
            if ok:
                conn.settimeout(ANSWER_TIMEOUT)
                listener.close()
                return conn
            conn.close()  # not our service host

    def _error(self, what: str) -> RuntimeError:
        return RuntimeError(f"the inference service for model {self.name!r} {what}")

    def _ask(self, request: tuple, seconds: float = 0.0) -> Any:
        """The service host's answer (None once it is gone); it answers within
        ``seconds`` plus ``ANSWER_TIMEOUT``, or counts as gone (its host may be down)."""
        with self.talk:
            if self.gone is None and self.sock is not None:
                try:
                    self.sock.settimeout(seconds + ANSWER_TIMEOUT)
                    wire.send_message(self.sock, request)
                    return wire.recv_message(self.sock)
                except OSError as exc:
                    self.gone = f"its service host on {self.host!r} is gone ({exc})"
            return None

    def returncode(self) -> Optional[int]:
        return self.wait(0.0)

    def wait(self, timeout: float) -> Optional[int]:
        """The server's exit status, waiting up to ``timeout`` s for it (None: running)."""
        if self.code is None and self.sock is not None:
            self.code = self._ask(("wait", timeout), timeout)
            if self.gone is not None:
                self.code = -9  # the keeper died, and the server with it
        return self.code

    def tail(self, lines: int) -> str:
        text = self._ask(("tail", lines))
        return f"({self.gone}; no log)" if text is None else text

    def stop(self, keep_log: bool) -> None:
        """End the server and its service host; keep the server's log if asked."""
        with self.lock:
            self.stopped = True
            listener, proc = self.listener, self.proc
        if listener is not None:
            listener.close()
        with self.talk:
            if self.sock is not None:
                try:
                    wire.send_message(self.sock, ("stop", keep_log))
                except OSError:
                    pass
                self.sock.close()
        if proc is not None and proc.join(timeout=STOP_TIMEOUT) is None:
            proc.kill()
            proc.join(timeout=STOP_TIMEOUT)
