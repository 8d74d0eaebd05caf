"""Pin tasks by hand: exact cores, exact GPUs, and both together for NUMA locality.

    dragon examples/dragon/cpu_gpu_affinity.py --gpus 4

``cpu_affinity=`` / ``gpu_affinity=`` ask for exactly those ids; the ledger reserves
them (so nothing else is placed there meanwhile) and Dragon's ``Policy`` pins the
process. A task that gives only counts (``cpus=2, gpus=1``) gets ids from the ledger.
"""
import argparse
import os

import rhapsody_graph as rhapsody


def where(label):
    return (label, sorted(os.sched_getaffinity(0)), os.environ.get("CUDA_VISIBLE_DEVICES"),
            rhapsody.current_placement())


def main() -> None:
    parser = argparse.ArgumentParser(description="CPU and GPU affinity on Dragon")
    parser.add_argument("--gpus", type=int, default=None, help="GPUs to declare per host")
    args = parser.parse_args()
    with rhapsody.DragonBackend(gpus=args.gpus) as backend:
        host = backend.inventory.hosts[0]
        last_core, gpus = host.cpus[-1], list(host.gpus)
        task = rhapsody.task(where)
        nodes = [task.options(cpu_affinity=[last_core])("cores only"),
                 task.options(cpus=1, gpus=1)("counts from the ledger")]
        if gpus:
            nodes += [task.options(gpu_affinity=[gpus[-1]])("gpu only"),
                      task.options(host=host.name, cpu_affinity=[host.cpus[0]],
                                   gpu_affinity=gpus[:1])("cores + gpu (one NUMA domain)")]
        for label, cores, cuda, placement in rhapsody.compute(nodes, backend=backend)[0]:
            print(f"{label:<32} cores {cores}  CUDA_VISIBLE_DEVICES={cuda}  ledger: {placement}")


if __name__ == "__main__":
    main()
