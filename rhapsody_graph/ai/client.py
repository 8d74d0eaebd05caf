"""A small client for any OpenAI-compatible server (vLLM, llama.cpp, ...).

Fan-out policy: a list of prompts goes to ``/v1/completions`` as one request when
the server takes lists (vLLM); otherwise (llama.cpp answers HTTP 500 to a list) as
single requests, at most ``concurrency`` at a time. Chat conversations always go one
request each, bounded the same way. A request that fails to connect or gets a 5xx
is retried ``retries`` times; the last error is raised with the server's answer.
A ``deadline`` (the node's timeout, as a ``time.monotonic()`` value) bounds every
request and retry: the client gives up when it passes, so a timed-out node does not
keep a request (and the server) busy.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Sequence

import httpx

__all__ = ["Client", "ServerError", "DeadlinePassed", "Unreachable"]


class ServerError(RuntimeError):
    """The inference server answered with an error, or could not be reached."""


class DeadlinePassed(ServerError):
    """The caller's deadline passed before the server answered."""


class Unreachable(ServerError):
    """The server could not be reached (connection refused or dropped, timed out)."""


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
        self.http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout,
                                 verify=True if tls else False)
        self.timeout, self.retries, self.concurrency = timeout, retries, concurrency

    def models(self) -> List[str]:
        """Ids of the models the server serves."""
        return [m["id"] for m in self._get("/models")["data"]]

    def complete(self, prompts: Sequence[str], takes_lists: bool = False,
                 deadline: Optional[float] = None, **sampling: Any) -> List[str]:
        """One completion text per prompt, in order."""
        if takes_lists and len(prompts) > 1:
            choices = self._post("/completions", {"prompt": list(prompts), **sampling},
                                 deadline)["choices"]
            return [c["text"] for c in sorted(choices, key=lambda c: c["index"])]
        return self._fan_out(lambda p: self._post("/completions", {"prompt": p, **sampling},
                                                  deadline)["choices"][0]["text"], prompts)

    def chat(self, conversations: Sequence[List[Dict[str, str]]],
             deadline: Optional[float] = None, **sampling: Any) -> List[str]:
        """One assistant reply per conversation (a list of ``{"role", "content"}``)."""
        return self._fan_out(lambda m: self._post("/chat/completions", {"messages": m, **sampling},
                                                  deadline)["choices"][0]["message"]["content"],
                             conversations)

    def close(self) -> None:
        self.http.close()

    def _fan_out(self, one: Any, items: Sequence[Any]) -> List[str]:
        if len(items) == 1:
            return [one(items[0])]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(items))) as pool:
            return list(pool.map(one, items))

    def _get(self, path: str) -> Dict[str, Any]:
        return self._request("GET", path, None)

    def _post(self, path: str, body: Dict[str, Any],
              deadline: Optional[float] = None) -> Dict[str, Any]:
        body = {"model": self.model, **body}
        return self._request("POST", path, {k: v for k, v in body.items() if v is not None},
                             deadline)

    def _request(self, method: str, path: str, body: Optional[Dict[str, Any]],
                 deadline: Optional[float] = None) -> Dict[str, Any]:
        error: Exception = ServerError("no attempt made")
        for _ in range(self.retries + 1):
            timeout = self.timeout
            if deadline is not None:
                timeout = min(timeout, deadline - time.monotonic())
                if timeout <= 0:
                    raise DeadlinePassed(f"{method} {self.base_url}{path}: the deadline "
                                         f"passed ({error})")
            try:
                r = self.http.request(method, path, json=body, timeout=timeout)
            except httpx.TransportError as exc:
                error = Unreachable(f"{method} {self.base_url}{path} failed: {exc!r}")
                continue
            if r.status_code < 500:
                if r.status_code >= 400:
                    raise ServerError(f"{method} {self.base_url}{path} -> HTTP {r.status_code}: "
                                      f"{r.text[:500]}")
                return r.json()
            error = ServerError(f"{method} {self.base_url}{path} -> HTTP {r.status_code}: "
                                f"{r.text[:500]}")
        raise error
