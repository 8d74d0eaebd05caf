"""Watch a run: a live display per backend while futures are consumed as they finish.

    pip install ".[progress]" && python examples/progress.py

400 short simulations on a 2-core pool and 40 on a second backend of the same cores
(alike backends share one ledger: never two nodes on one core), a few of which fail,
consumed with ``as_completed``. In a terminal the display is redrawn in place
(done / running / failed / waiting, elapsed and estimated time per backend); in a batch
job log it is a line per backend every 10 s.
"""
import time

import rhapsody_graph as rhapsody


@rhapsody.task
def simulate(i):
    time.sleep(0.01)
    if i % 97 == 13:
        raise ValueError(f"simulation {i} diverged")
    return i


if __name__ == "__main__":
    backends = [rhapsody.LocalBackend(cpus=2, name="cpu"), rhapsody.LocalBackend(cpus=2, name="aux")]
    with rhapsody.Session(backends=backends, progress=True) as session:
        futures = session.submit([simulate(i) for i in range(400)]
                                 + [simulate.options(backend="aux")(i) for i in range(40)])
        best, failed = 0, 0
        for fut in rhapsody.as_completed(futures):
            if fut.exception() is None:
                best = max(best, fut.result())
            else:
                failed += 1
    print(f"best {best}, {failed} failed")
