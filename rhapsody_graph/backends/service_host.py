"""What runs where Dragon places an inference service: the server's keeper on that host.

:class:`~.dragon_service.DragonServer` starts this module as a Dragon process
(``python -m rhapsody_graph.backends.service_host ADDRESS PORT``, the run's token in
``RHAPSODY_SERVICE_TOKEN``) on the service's host, pinned to its cores and GPUs. It
connects back to the driver, proves it belongs to the run, and is sent one
``("start", model_name, argv, env, bind)``. It then starts the server as a
:class:`~rhapsody_graph.ai.service.LocalServer` on a free port of the ``bind``
address, in a session of its own that dies with this process
(``PR_SET_PDEATHSIG``), its output in a log file on this host, and answers
``("started", url, pid, log)`` (``("failed", why)`` if it cannot).

From then on it answers the driver's requests (:mod:`.wire` frames):
``("wait", seconds)`` → the server's exit status or None (still running), and
``("tail", lines)`` → the last lines of its log. ``("stop", keep_log)`` or the socket
closing (the driver stopped or died) kills the server's process group, deletes its
log unless kept, and ends this process.
"""
from __future__ import annotations

import os
import socket
import sys

from . import wire
from .dragon_service import TOKEN_ENV
from .programs import die_with_parent
from ..ai.service import LocalServer


def main(address: str, port: int) -> int:
    """Keep one server for the driver at ``address:port`` until it says stop or goes."""
    token = bytes.fromhex(os.environ.pop(TOKEN_ENV))
    try:
        sock = socket.create_connection((address, port))
        sock.sendall(token)
        _, name, argv, env, bind = wire.recv_message(sock)
    except OSError:
        return 1  # the driver stopped the service before it began
    server = LocalServer(name, bind, preexec_fn=die_with_parent)
    keep = False
    try:
        try:
            url = server.start(argv, env)
        except OSError as exc:
            wire.send_message(sock, ("failed", f"{type(exc).__name__}: {exc}"))
            return 1
        wire.send_message(sock, ("started", url, server.pid, server.log))
        keep = _serve(sock, server)
    except OSError:
        pass  # the driver is gone: nobody needs the server or its log
    finally:
        server.stop(keep)
        sock.close()
    return 0


def _serve(sock: socket.socket, server: LocalServer) -> bool:
    """Answer the driver's requests until it says stop; return whether to keep the log."""
    while True:
        request = wire.recv_message(sock)
        if request[0] == "stop":
            return bool(request[1])
        if request[0] == "wait":
            wire.send_message(sock, server.wait(request[1]))
        elif request[0] == "tail":
            wire.send_message(sock, server.tail(request[1]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
