"""What runs inside a Dragon Batch call: a worker that connects back to the driver.

:class:`~.dragon.DragonBackend` lowers a lease (or one rank of a job) to one Batch
call whose target is :func:`serve`. It connects to the driver's listening socket,
proves it belongs to this run (the run's secret token, then its worker id and
pid), and from then on is an ordinary :class:`~.worker.Worker` on that socket: it
runs the tasks it is sent, one after the other, and writes every value or
exception (with its traceback) back as soon as it exists. That socket is the side
channel that brings back the values Batch itself does not return for
``batch.process`` and ``batch.job``. EOF on the socket ends the worker.

In a ``batch.process`` (``own_process=True``) the process is the worker's own: the
driver may kill it, and programs it starts die with it. In a ``batch.function`` it
runs inside a Batch pool worker, so it puts back the environment and core mask it
found when it is done. (It never calls ``setsid``: Dragon's local services would
then no longer reap the process, and ``Batch.join`` would wait for it forever.)
"""
from __future__ import annotations

import os
import signal
import socket
import struct
from typing import Tuple

from .worker import Worker

HELLO = struct.Struct("<QQ")  # worker id, pid; sent after the run's token
TOKEN_BYTES = 32


def serve(address: Tuple[str, int], token: bytes, wid: int, own_process: bool) -> int:
    """Connect to the driver at ``address`` and run tasks until it closes the socket."""
    env, home = dict(os.environ), os.sched_getaffinity(0)
    if own_process:  # as a local worker: a SIGINT (Dragon's ProcessGroup stop sends one to
        try:  # a killed job's ranks) must not become the node's KeyboardInterrupt
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        except ValueError:  # not the main thread: leave it
            pass
    sock = socket.create_connection(address)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(token + HELLO.pack(wid, os.getpid()))
        Worker(sock.fileno(), sock.fileno()).serve()
    finally:
        sock.close()
        if not own_process:  # a Batch pool worker lives on: leave it as it was
            os.environ.clear()
            os.environ.update(env)
            os.sched_setaffinity(0, home)
    return 0
