"""A small heterogeneous graph on the embedded local backend.

CPU nodes, GPU nodes (on 4 *declared* GPUs, so it runs on any laptop), a
``map(..., gpus="all")`` and an executable node, each printing where it ran.

    python examples/quickstart.py
"""
import os

import rhapsody_graph as rhapsody


def where() -> str:
    """Where this node runs: host, the cores it is pinned to, the GPUs it sees."""
    p = rhapsody.current_placement()
    return (f"host={p.host} cores={sorted(os.sched_getaffinity(0))} "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}")


@rhapsody.task(cpus=1)
def simulate(seed: int) -> dict:
    value = sum((seed * 7919 + k) % 13 for k in range(10_000))
    return {"seed": seed, "value": value, "ran": where()}


@rhapsody.task(cpus=2, gpus=2)
def train(samples: list) -> dict:
    return {"mean": sum(s["value"] for s in samples) / len(samples), "ran": where()}


@rhapsody.task
def headline(model: dict) -> str:
    return f"{model['mean']:.1f}"


def evaluate(i: int, model: dict) -> dict:
    return {"item": i, "score": model["mean"] * (i + 1) % 97, "ran": where()}


def main() -> None:
    backend = rhapsody.LocalBackend(cpus=2, gpus=4)  # declared: 4 GPU ids on any machine
    sims = [simulate(seed) for seed in range(4)]
    model = train(sims)
    scores = rhapsody.map(evaluate, range(4), [model] * 4, gpus="all")
    report = rhapsody.executable(["echo", "model mean is", headline(model)])

    graph = rhapsody.Graph(sims, model, scores, report)
    print(f"graph: {len(graph)} nodes")
    sims_out, model_out, scores_out, report_out = graph.compute(backend=backend)

    for s in sims_out:
        print(f"simulate({s['seed']}) = {s['value']:<6} {s['ran']}")
    print(f"train          mean={model_out['mean']:.1f} {model_out['ran']}")
    for s in scores_out:
        print(f"evaluate({s['item']}) = {s['score']:<6.1f} {s['ran']}")
    print(f"executable     stdout={report_out.stdout.strip()!r} host={report_out.host} "
          f"cores={list(report_out.cpus)}")
    backend.shutdown()


if __name__ == "__main__":
    main()
