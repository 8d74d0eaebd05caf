"""AI nodes against the plain OpenAI client, same llama.cpp server, same run (issue 5).

* fan-out: 64 prompts through one AI node (bounded concurrent requests) against the
  same 64 requests sent one by one with ``openai.OpenAI``; bar: the AI node is faster;
* single: one one-prompt AI node against one direct request, interleaved in pairs;
  bar: <= 5 % added (``extra_info["added_percent"]``).

The server is started once (SmolLM2, ``--n_threads 2``) and declared to rhapsody_graph by
``url=``, so both sides talk to the very same process; greedy, ``max_tokens=8``.
"""
import statistics
import time

import pytest

import rhapsody_graph as rhapsody
from rhapsody_graph.ai.models import lookup
from rhapsody_graph.ai.service import Service

from conftest import ROUNDS

pytestmark = pytest.mark.timeout(900)
PROMPTS = [f"Name a colour. Number {i}." for i in range(64)]
SAMPLING = {"temperature": 0, "max_tokens": 8}


@pytest.fixture(scope="module")
def served():
    openai = pytest.importorskip("openai")
    rhapsody.model("bench-smollm2", engine="llama_cpp", path=rhapsody.smollm2_path(), cpus=2)
    service = Service(lookup("bench-smollm2", "benchmark"))
    client = service.start()
    rhapsody.model("bench-remote", url=client.base_url, concurrency=8)
    direct = openai.OpenAI(base_url=client.base_url, api_key="none")
    with rhapsody.LocalBackend(cpus=2) as backend:
        yield backend, direct
    service.stop()


def _direct(direct, prompts):
    return [direct.chat.completions.create(model="x", messages=[{"role": "user", "content": p}],
                                           **SAMPLING).choices[0].message.content
            for p in prompts]


def _node(backend, prompts):
    node = rhapsody.ai(prompts if len(prompts) > 1 else prompts[0], model="bench-remote",
                       **SAMPLING)
    out = node.compute(backend=backend)
    return out if len(prompts) > 1 else [out]


@pytest.mark.parametrize("engine", ["rhapsody", "openai-sequential"])
def test_fan_out_64(benchmark, served, engine):
    backend, direct = served
    benchmark.group = "ai fan-out (64 prompts)"
    run = (lambda: _node(backend, PROMPTS)) if engine == "rhapsody" else (
        lambda: _direct(direct, PROMPTS))
    answers = benchmark.pedantic(run, rounds=max(1, ROUNDS // 2), iterations=1, warmup_rounds=1)
    assert len(answers) == 64


def test_single_prompt_overhead(benchmark, served):
    """One-prompt node vs one direct request, interleaved (the two see the same noise)."""
    backend, direct = served
    benchmark.group = "ai single prompt (interleaved pairs)"
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
