"""Adaptive sampling with futures: react to results as they arrive.

Submit a batch of simulations, and refine (with more samples) every one whose
first estimate looks promising, while the others still run; then summarise.
Runs on the embedded local backend (no Dragon, no GPU needed):

    python examples/adaptive_sampling.py
"""
import random

import rhapsody_graph as rhapsody


@rhapsody.task(cpus=1)
def simulate(seed: int, samples: int = 2_000) -> float:
    """A Monte Carlo estimate whose quality depends on the seed's region."""
    rng = random.Random(seed)
    bias = (seed % 7) / 7
    return sum(rng.random() < bias for _ in range(samples)) / samples


@rhapsody.task(cpus=1)
def refine(first: float, seed: int) -> float:
    """Ten times the samples, started only for promising seeds."""
    return simulate.func(seed, samples=20_000) if first > 0.5 else first


@rhapsody.task
def best(estimates: list) -> float:
    return max(estimates)


if __name__ == "__main__":
    with rhapsody.Session(backends=[rhapsody.LocalBackend(cpus=2, name="cpu")]) as s:
        sims = {s.submit(simulate(seed)): seed for seed in range(16)}
        refined = []
        for fut in rhapsody.as_completed(sims):        # in the order they finish
            if fut.result() > 0.5:
                refined.append(s.submit(refine(fut, sims[fut])))   # the graph grows
        top = s.submit(best(refined))                  # futures nested in a list
        print(f"{len(refined)} of {len(sims)} seeds refined; best estimate {top.result():.3f}")
        print(f"best ran on {top.where.backend}, host {top.where.host}, cores {list(top.where.cpus)}")
