"""The RHAPSODY resource-placement tutorial on rhapsody_graph, every section in one run.

    dragon python examples/rhapsody/resource_placement.py [--gpus 4]

Only the RHAPSODY imports changed, plus adaptations to the host it runs on: the
tutorial pins cores 0-3 and 4-7 (and 0-7 and 8-15), which become the first and the
second half of this host's cores; its 2 + 2 rank jobs get 1 + 1 ranks on a host of
fewer than 4 cores (Dragon Batch starts a job of at most one rank per core, and
rhapsody_graph refuses, before anything runs, a job that can never start); on a machine where Dragon finds no GPU,
``--gpus N`` declares N GPU ids (so placement shows in CUDA_VISIBLE_DEVICES). The
tutorial makes a backend per section; one backend and one session serve them all here.
Functions print JSON and return it: with rhapsody_graph, ``return_value`` is the value
in every mode and ``stdout`` what was printed.
"""
import argparse
import asyncio
import json
import os

from dragon.infrastructure.policy import Policy
from dragon.native.machine import Node, System

from rhapsody_graph.compat.api import ComputeTask, Session  # was: from rhapsody.api import ...
from rhapsody_graph.compat.backends import DragonExecutionBackendV3  # was: rhapsody.backends


def report():
    """Where this process runs: host, cores, visible GPUs (printed as JSON, and returned)."""
    import socket
    result = {"hostname": socket.gethostname(), "rank": os.environ.get("RANK", "0"),
              "cpu_affinity": sorted(os.sched_getaffinity(0)),
              "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "not set")}
    print(json.dumps(result))
    return result


def discover_gpus(declared):
    """(host name, GPU id) of every GPU Dragon finds; else the ``declared`` ids."""
    found, nodes = [], [Node(huid) for huid in System().nodes]
    for node in nodes:
        found += [(node.hostname, g) for g in node.gpus or ()]
    return found or [(nodes[0].hostname, g) for g in range(declared)]


def halves():
    cores = sorted(os.sched_getaffinity(0))
    half = max(1, len(cores) // 2)
    return cores[:half], cores[half:] or cores[:half]


def on_host(host, **kw):
    return Policy(placement=Policy.Placement.HOST_NAME, host_name=host, **kw)


def on_gpu(gpu, **kw):
    host, gpu_id = gpu
    return on_host(host, gpu_affinity=[gpu_id], **kw)


def templated(policy=None, groups=None, uid=None):
    extra = ({"process_templates": [(n, {"policy": p}) for n, p in groups]} if groups
             else {"process_template": {"policy": policy} if policy else {}})
    return ComputeTask(function=report, task_backend_specific_kwargs=extra, uid=uid)


async def run(session, tasks):
    await session.submit_tasks(tasks)
    await asyncio.gather(*tasks)
    for t in tasks:
        assert t.state == "DONE", (t.uid, t.state, t.exception)
    return tasks


async def main(declared_gpus):
    backend = await DragonExecutionBackendV3(gpus=declared_gpus or None)
    host = Node(list(System().nodes)[0]).hostname
    low, high = halves()
    gpus = discover_gpus(declared_gpus)
    async with Session(backends=[backend]) as session:
        # 1. baseline: no placement control, the value comes back as it is
        (t,) = await run(session, [ComputeTask(function=report)])
        print(f"1 baseline: {type(t.return_value).__name__} from {t.return_value['hostname']}")
        # 2. a single process pinned to a host
        (t,) = await run(session, [templated(on_host(host))])
        print(f"2 process_template: ran on {json.loads(t.stdout)['hostname']} (target {host})")
        # 3. a parallel job of two groups, each with its own policy
        n = max(1, min(2, len(os.sched_getaffinity(0)) // 2))  # Batch: a rank per core
        (t,) = await run(session, [templated(groups=[(n, on_host(host)), (n, on_host(host))])])
        print(f"3 process_templates: {len(t.stdout.splitlines())} ranks reported")
        # 4. cpu affinity: two tasks on disjoint cores, then a job of two pinned groups
        a, b = await run(session, [templated(Policy(cpu_affinity=low)),
                                   templated(Policy(cpu_affinity=high))])
        cores_a, cores_b = (json.loads(x.stdout)["cpu_affinity"] for x in (a, b))
        print(f"4 cpu affinity: A {cores_a} B {cores_b} disjoint={set(cores_a).isdisjoint(cores_b)}")
        (t,) = await run(session, [templated(groups=[(n, Policy(cpu_affinity=low)),
                                                     (n, Policy(cpu_affinity=high))])])
        seen = [json.loads(line)["cpu_affinity"] for line in t.stdout.splitlines()]
        print(f"4 cpu affinity per group: {seen}")
        # 5. gpu affinity: one task per GPU, then 8 tasks round-robin, then a job per GPU group
        one = await run(session, [templated(on_gpu(gpu)) for gpu in gpus])
        print("5 one per gpu: " + " ".join(t.return_value["CUDA_VISIBLE_DEVICES"] for t in one))
        many = await run(session, [templated(on_gpu(gpus[i % len(gpus)])) for i in range(8)])
        print("5 round robin: " + " ".join(t.return_value["CUDA_VISIBLE_DEVICES"] for t in many))
        if len(gpus) >= 2:
            (t,) = await run(session, [templated(groups=[(n, on_gpu(gpus[0])),
                                                         (n, on_gpu(gpus[1]))])])
            print("5 gpu groups: " + " ".join(r["CUDA_VISIBLE_DEVICES"] for r in t.return_value))
        # 6. combined cpu + gpu affinity
        both = await run(session, [templated(on_gpu(gpus[0], cpu_affinity=low))])
        r = both[0].return_value
        print(f"6 combined: cores {r['cpu_affinity']} GPU {r['CUDA_VISIBLE_DEVICES']}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpus", type=int, default=0, help="GPU ids to declare if Dragon finds none")
    asyncio.run(main(parser.parse_args().gpus))
