"""Dragon without its launcher: ``python`` starts a runtime for the program and stops it.

    python examples/dragon/without_launcher.py

The first ``DragonBackend()`` of a plain Python process starts a single-host Dragon
runtime and attaches the process to it (under ``dragon`` it would use the launcher's);
it runs until the program ends, so a backend made after the first shut down uses it
too, and no Dragon process is left. A chain of nodes runs on Dragon Batch with its
values, then the same graph on the local backend for comparison, then on Dragon again.
"""
import os

import dragon

import rhapsody_graph as rhapsody


@rhapsody.task
def step(x):
    return x + 1


@rhapsody.task
def where(x):
    return f"value {x} from process {os.getpid()} on {rhapsody.current_placement().host}"


if __name__ == "__main__":
    print("under a Dragon runtime before:", dragon.in_dragon())
    x = 0
    for _ in range(5):
        x = step(x)
    with rhapsody.DragonBackend() as backend:
        print("under a Dragon runtime now:", dragon.in_dragon())
        print(backend.describe())
        print("on Dragon:", rhapsody.compute(where(x), backend=backend)[0])
    print("on the local backend:", rhapsody.compute(where(x))[0])
    with rhapsody.DragonBackend() as again:  # the same runtime: one per program
        print("on Dragon again:", rhapsody.compute(step(x), backend=again)[0])
