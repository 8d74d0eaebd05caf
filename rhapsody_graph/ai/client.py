"""A small client for any OpenAI-compatible server (vLLM, llama.cpp, ...).

Fan-out policy: a list of prompts goes to ``/v1/completions`` as one request when
the server takes lists (vLLM); otherwise (llama.cpp answers HTTP 500 to a list) as
single requests. Chat conversations always go one request each. At most
``concurrency`` requests are in flight to one server, from all the nodes that share its
client; the others wait in the client, so a request's ``timeout`` starts when it is
sent, not while the server works through the ones before it. A server on this host
is reached directly, whatever ``HTTP_PROXY`` says.

Retries: a request that could not connect, or got a 5xx, is sent again up to
``retries`` times. One that was sent and got no whole answer within ``timeout`` (its
connection is closed then, however slowly the server was sending), or whose
connection dropped, is not: the server may still be working on it. A 200 answer that
is not what was asked for (not JSON, no ``choices``, no text) is a :class:`ServerError`.
A :class:`Deadline` (the node's timeout, and whether it was cancelled) bounds every
request and retry: the client gives up when it passes, and a cancel closes the
connections of its requests in flight and sends no further request, so a timed-out or
cancelled node does not keep the server busy.
"""
from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, TypeVar

import httpx

__all__ = ["Client", "Deadline", "ServerError", "DeadlinePassed", "Unreachable"]

T = TypeVar("T")


class ServerError(RuntimeError):
    """A request failed: an error answer, an answer that is not what was asked for, no
    answer in time, or no connection."""


class DeadlinePassed(ServerError):
    """The caller's deadline passed before the server answered."""


class Unreachable(ServerError):
    """The server could not be reached (connection refused or dropped)."""


class _Connection:
    """One request's connection, which another thread may close: at the request's time
    limit, or when its node is cancelled (``why``). Shutting its socket down wakes the
    thread that waits for the answer."""

    __slots__ = ("sock", "why", "lock")

    def __init__(self) -> None:
        self.sock: Optional[socket.socket] = None
        self.why = ""
        self.lock = threading.Lock()

    def trace(self, event: str, info: Dict[str, Any]) -> None:
        """httpcore's trace hook: the socket, once connected."""
        if event == "connection.connect_tcp.complete":
            with self.lock:
                self.sock = info["return_value"].get_extra_info("socket")
                if self.why:
                    self._shut()

    def close(self, why: str) -> None:
        with self.lock:
            if not self.why:
                self.why = why
                self._shut()

    def _shut(self) -> None:
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class Deadline:
    """When the requests of one node must stop: at ``at`` (a ``time.monotonic()``
    value; ``None``: never), or at once after :meth:`cancel` (from any thread), which
    also closes the connections of its requests in flight."""

    __slots__ = ("at", "cancelled", "flying")

    def __init__(self, at: Optional[float] = None) -> None:
        self.at, self.cancelled = at, False
        self.flying: Set[_Connection] = set()

    def cancel(self) -> None:
        self.cancelled = True
        for conn in list(self.flying):
            conn.close("cancelled")

    def left(self, where: str) -> Optional[float]:
        """Seconds left (``None``: no limit).

        Raises:
            DeadlinePassed: it was cancelled.
        """
        if self.cancelled:
            raise DeadlinePassed(f"{where}: not sent, its node was cancelled")
        return None if self.at is None else self.at - time.monotonic()


class Client:
    """Talk to ``base_url`` (ending in ``/v1``).

    >>> Client("http://127.0.0.1:9/v1", timeout=1).base_url
    'http://127.0.0.1:9/v1'
    """

    def __init__(self, base_url: str, api_key: Optional[str] = None, timeout: float = 120.0,
                 retries: int = 2, concurrency: int = 8, model: Optional[str] = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model  # sent as "model" (servers that serve several need it)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # plain http (our loopback servers) needs no TLS context: building one costs ~30 ms
        tls = self.base_url.startswith("https:")
        # a server on this host is reached directly, whatever HTTP_PROXY says
        # a connection per request (none kept alive): one that is closed to stop its
        # request (a cancel, its time limit) is never the next one's
        self.http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout,
                                 verify=True if tls else False,
                                 trust_env=not _loopback(self.base_url),
                                 limits=httpx.Limits(max_keepalive_connections=0))
        self.timeout, self.retries, self.concurrency = timeout, retries, concurrency
        # requests in flight to this server, from every node that shares the client: the
        # others wait here (their timeout starts when sent), not in the server's queue
        self.slots = threading.BoundedSemaphore(concurrency)

    def models(self, deadline: Optional[Deadline] = None) -> List[str]:
        """Ids of the models the server serves."""
        return self._request("GET", "/models", None, deadline, "a model list", _model_ids)

    def complete(self, prompts: Sequence[str], takes_lists: bool = False,
                 deadline: Optional[Deadline] = None, **sampling: Any) -> List[str]:
        """One completion text per prompt, in order."""
        if takes_lists and len(prompts) > 1:
            return self._post("/completions", {"prompt": list(prompts), **sampling}, deadline,
                              partial(_texts, chat=False, count=len(prompts)))
        one = partial(_texts, chat=False, count=1)
        return self._fan_out(lambda p: self._post("/completions", {"prompt": p, **sampling},
                                                  deadline, one)[0], prompts)

    def chat(self, conversations: Sequence[List[Dict[str, str]]],
             deadline: Optional[Deadline] = None, **sampling: Any) -> List[str]:
        """One assistant reply per conversation (a list of ``{"role", "content"}``)."""
        one = partial(_texts, chat=True, count=1)
        return self._fan_out(lambda m: self._post("/chat/completions", {"messages": m, **sampling},
                                                  deadline, one)[0], conversations)

    def close(self) -> None:
        self.http.close()

    def _fan_out(self, one: Callable[[Any], str], items: Sequence[Any]) -> List[str]:
        if len(items) == 1:
            return [one(items[0])]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(items))) as pool:
            return list(pool.map(one, items))

    def _post(self, path: str, body: Dict[str, Any], deadline: Optional[Deadline],
              read: Callable[[Any], T]) -> T:
        body = {"model": self.model, **body}
        return self._request("POST", path, {k: v for k, v in body.items() if v is not None},
                             deadline, "a completion", read)

    def _request(self, method: str, path: str, body: Optional[Dict[str, Any]],
                 deadline: Optional[Deadline], expected: str, read: Callable[[Any], T]) -> T:
        """Send the request (again, if it could not connect or got a 5xx) and return what
        ``read`` makes of its JSON answer, ``expected`` (for messages).

        Raises:
            ServerError: an error answer, one ``read`` cannot read, or no answer in time.
            Unreachable: no connection (after the retries), or a dropped one.
            DeadlinePassed: ``deadline`` passed first.
        """
        where = f"{method} {self.base_url}{path}"
        error: Optional[ServerError] = None
        for _ in range(self.retries + 1):
            left = None if deadline is None else deadline.left(where)
            if not self.slots.acquire(timeout=None if left is None else max(0.0, left)):
                raise DeadlinePassed(f"{where}: the deadline passed while {self.concurrency} "
                                     "other request(s) to this server were in flight")
            conn, limit = _Connection(), None
            try:
                timeout = self.timeout
                left = None if deadline is None else deadline.left(where)  # (waited: again)
                if left is not None:
                    timeout = min(timeout, left)
                    if timeout <= 0:
                        raise DeadlinePassed(f"{where}: the deadline passed"
                                             + (f" ({error})" if error else ""))
                # the whole answer within `timeout`, however slowly the server sends it
                limit = threading.Timer(timeout, conn.close, ("timed out",))
                limit.daemon = True
                limit.start()
                if deadline is not None:
                    deadline.flying.add(conn)
                    if deadline.cancelled:
                        conn.close("cancelled")
                r = self.http.request(method, path, json=body, timeout=timeout,
                                      extensions={"trace": conn.trace})
            except httpx.HTTPError as exc:
                if conn.why == "cancelled":
                    raise DeadlinePassed(f"{where}: stopped, its node was cancelled") from None
                if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)) \
                        and not conn.why:  # not sent: send again
                    error = Unreachable(f"{where} failed: {exc!r}")
                    continue
                if conn.why or isinstance(exc, httpx.TimeoutException):
                    if timeout < self.timeout:
                        raise DeadlinePassed(f"{where}: no answer before the deadline "
                                             f"({timeout:.3g} s)") from None
                    raise ServerError(f"{where} timed out after {timeout:g} s waiting for the "
                                      "answer (not sent again: the server may still be "
                                      "working on it)") from None
                if isinstance(exc, httpx.TransportError):
                    raise Unreachable(f"{where} failed: {exc!r}") from None
                raise
            finally:
                if limit is not None:
                    limit.cancel()
                if deadline is not None:
                    deadline.flying.discard(conn)
                self.slots.release()
            if r.status_code >= 500:
                error = ServerError(_failure(where, r))
                continue
            if r.status_code >= 400:
                raise ServerError(_failure(where, r))
            try:
                return read(r.json())
            except (ValueError, LookupError, TypeError, AttributeError):
                raise ServerError(_failure(where, r, f", not {expected}")) from None
        assert error is not None  # retries >= 0: at least one attempt
        raise error


def _loopback(url: str) -> bool:
    """Whether ``url`` names this host (``localhost``, ``127.x``, ``::1``)."""
    host = (httpx.URL(url).host or "").lower()
    return host == "localhost" or host.startswith("127.") or host == "::1"


def _model_ids(answer: Any) -> List[str]:
    """The model ids of a ``/v1/models`` answer."""
    return [m["id"] for m in answer["data"]]


def _texts(answer: Any, chat: bool, count: int) -> List[str]:
    """The ``count`` texts of a completion answer, in the order of their ``index``.

    Raises:
        LookupError, TypeError, AttributeError: the answer has no such texts.
    """
    choices = answer["choices"]
    if count > 1:
        choices = sorted(choices, key=lambda c: c["index"])
    texts = [c["message"]["content"] if chat else c["text"] for c in choices]
    if len(texts) != count or not all(isinstance(t, str) for t in texts):
        raise TypeError(f"not {count} text(s)")
    return texts


def _failure(where: str, r: httpx.Response, what: str = "") -> str:
    """The message for answer ``r`` to ``where``: its status, ``what`` is wrong with it, the
    server's error message if it gives one, and the first 500 characters of the body."""
    try:
        said = r.json()["error"]
        said = said.get("message", said) if isinstance(said, dict) else said
    except (ValueError, LookupError, TypeError):
        said = None
    told = "" if said is None or not str(said).strip() else f" (the server says: {said})"
    return f"{where} -> HTTP {r.status_code}{what}{told}: {r.text[:500]}"
