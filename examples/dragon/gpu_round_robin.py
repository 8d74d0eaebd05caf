"""One task per GPU, spread round-robin over every GPU of every Dragon host.

    dragon examples/dragon/gpu_round_robin.py            # the GPUs Dragon finds
    dragon examples/dragon/gpu_round_robin.py --gpus 4   # declare 4 per host (no GPU here)

What the tutorial writes by hand (a loop over ``System()`` x ``Node(h).gpus`` building
one ``Policy`` each) is one ``map(..., gpus="all")``: the ledger hands out the GPU ids,
each task runs as a Batch process with that ``Policy``, and its value comes back.
"""
import argparse
import os

import rhapsody_graph as rhapsody


def report(i):
    p = rhapsody.current_placement()
    return i, p.host, os.environ["CUDA_VISIBLE_DEVICES"], sorted(os.sched_getaffinity(0))


def main() -> None:
    parser = argparse.ArgumentParser(description="round-robin GPU placement on Dragon")
    parser.add_argument("--gpus", type=int, default=None, help="GPUs to declare per host")
    parser.add_argument("--tasks", type=int, default=8)
    args = parser.parse_args()
    with rhapsody.DragonBackend(gpus=args.gpus) as backend:
        print(backend.describe())
        if not backend.inventory.total_gpus:
            raise SystemExit("no GPUs found: declare some with --gpus N")
        for i, host, gpu, cores in rhapsody.compute(
                rhapsody.map(report, range(args.tasks), gpus="all"), backend=backend)[0]:
            print(f"task {i}: host {host}, CUDA_VISIBLE_DEVICES={gpu}, cores {cores}")


if __name__ == "__main__":
    main()
