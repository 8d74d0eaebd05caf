"""A multi-rank job as one graph node: ranks placed by the ledger, every rank's value back.

    dragon examples/dragon/multi_rank_job.py

``ranks=N`` lowers to one ``batch.job`` with a ``ProcessTemplate`` (and ``Policy``) per
rank; each rank sees ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` and its own cores, and the
node's value is the list of the ranks' return values, in rank order. The job's
upstream and downstream are ordinary nodes; an executable job works the same way.
"""
import os

import rhapsody_graph as rhapsody


@rhapsody.task
def make_work(n):
    return list(range(n))


@rhapsody.task(ranks=2, cpus=1, distribution="ROUNDROBIN")
def solve(work):
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    mine = work[rank::world]
    return {"rank": rank, "cores": sorted(os.sched_getaffinity(0)), "partial": sum(mine)}


@rhapsody.task
def combine(parts):
    return sum(p["partial"] for p in parts)


def main() -> None:
    with rhapsody.DragonBackend() as backend:
        parts = solve(make_work(100))
        echo = rhapsody.executable(["sh", "-c", "echo rank $RANK of $WORLD_SIZE"], ranks=2)
        ranks, total, echoes = rhapsody.compute(parts, combine(parts), echo, backend=backend)
        for r in ranks:
            print(f"rank {r['rank']} on cores {r['cores']}: partial sum {r['partial']}")
        print("total", total, "(expected", sum(range(100)), ")")
        print("executable ranks:", [e.stdout.strip() for e in echoes])


if __name__ == "__main__":
    main()
