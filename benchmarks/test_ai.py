"""AI nodes against the plain OpenAI client, same server, same run (issue 5).

* fan-out: 64 prompts through one AI node against the same 64 requests sent one by one
  with ``openai.OpenAI``; bar: the AI node is faster. Chat prompts go as bounded
  concurrent requests (8 in flight); plain completions on vLLM go as one list request;
* single: one one-prompt AI node against one direct request, interleaved in pairs;
  bar: <= 5 % added (``extra_info["added_percent"]``).

The server is started once per engine and declared to rhapsody_graph by ``url=``, so
both sides talk to the very same process; greedy, ``max_tokens=8``. The engines:
llama.cpp (SmolLM2 GGUF, ``--n_threads 2``; it answers one request at a time, so only
the client's own overhead can be saved) and, in the ``vllm`` tier (``-m vllm``, the
environment of tests/ai/test_vllm.py), vLLM on CPU, which batches what arrives together.
"""
import statistics
import time

import pytest

import rhapsody_graph as rhapsody
from rhapsody_graph.ai.models import lookup
from rhapsody_graph.ai.service import Service

from conftest import ROUNDS

pytestmark = pytest.mark.timeout(1800)
PROMPTS = [f"Name a colour. Number {i}." for i in range(64)]
SAMPLING = {"temperature": 0, "max_tokens": 8}
VLLM_ARGS = ["--dtype", "float32", "--max-model-len", "2048", "--gpu-memory-utilization", "0.3"]


def _declare(engine: str) -> None:
    if engine == "llama_cpp":
        rhapsody.model("bench-smollm2", engine="llama_cpp", path=rhapsody.smollm2_path(), cpus=2)
        return
    pytest.importorskip("vllm")
    from tests.ai.vllm_weights import smollm2_hf_dir
    rhapsody.model("bench-smollm2", engine="vllm", path=smollm2_hf_dir(), cpus=2,
                   args=VLLM_ARGS, ready_timeout=900)


@pytest.fixture(scope="module", params=["llama_cpp", pytest.param("vllm", marks=pytest.mark.vllm)])
def served(request):
    openai = pytest.importorskip("openai")
    _declare(request.param)
    service = Service(lookup("bench-smollm2", "benchmark"))
    client = service.start()
    takes_lists = service.model.takes_lists
    # the same name, now for the running server (vLLM answers only to its served name)
    rhapsody.model("bench-smollm2", url=client.base_url, concurrency=8, lists=takes_lists)
    direct = openai.OpenAI(base_url=client.base_url, api_key="none")
    with rhapsody.LocalBackend(cpus=2) as backend:
        yield backend, direct, request.param, takes_lists
    service.stop()


def _direct(direct, prompts, chat=True):
    if not chat:
        return [direct.completions.create(model="bench-smollm2", prompt=p, **SAMPLING)
                .choices[0].text for p in prompts]
    return [direct.chat.completions.create(model="bench-smollm2",
                                           messages=[{"role": "user", "content": p}],
                                           **SAMPLING).choices[0].message.content
            for p in prompts]


def _node(backend, prompts, chat=True):
    node = rhapsody.ai(prompts if len(prompts) > 1 else prompts[0], model="bench-smollm2",
                       chat=chat, **SAMPLING)
    out = node.compute(backend=backend)
    return out if len(prompts) > 1 else [out]


@pytest.mark.parametrize("mode", ["chat", "completion"])
@pytest.mark.parametrize("side", ["rhapsody", "openai-sequential"])
def test_fan_out_64(benchmark, served, side, mode):
    backend, direct, engine, takes_lists = served
    chat = mode == "chat"
    if not chat and not takes_lists:
        pytest.skip(f"{engine} takes no list of prompts: completions go as chat does")
    benchmark.group = f"ai fan-out (64 prompts, {engine}, {mode})"
    run = (lambda: _node(backend, PROMPTS, chat)) if side == "rhapsody" else (
        lambda: _direct(direct, PROMPTS, chat))
    answers = benchmark.pedantic(run, rounds=max(1, ROUNDS // 2), iterations=1, warmup_rounds=1)
    assert len(answers) == 64 and all(isinstance(a, str) for a in answers)


def test_single_prompt_overhead(benchmark, served):
    """One-prompt node vs one direct request, interleaved (the two see the same noise)."""
    backend, direct, engine, _ = served
    benchmark.group = f"ai single prompt (interleaved pairs, {engine})"
    node_s, direct_s = [], []

    def pairs():
        for _ in range(ROUNDS * 3):
            t = time.perf_counter()
            _direct(direct, PROMPTS[:1])
            direct_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            _node(backend, PROMPTS[:1])
            node_s.append(time.perf_counter() - t)

    benchmark.pedantic(pairs, rounds=1, iterations=1, warmup_rounds=0)
    node, plain = statistics.median(node_s), statistics.median(direct_s)
    benchmark.extra_info.update({"node_ms": node * 1e3, "direct_ms": plain * 1e3,
                                 "added_percent": (node / plain - 1) * 100})
    assert len(node_s) == len(direct_s) == ROUNDS * 3
