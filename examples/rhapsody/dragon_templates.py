"""A RHAPSODY Dragon program on rhapsody_graph: only the imports differ.

    dragon python examples/rhapsody/dragon_templates.py

Native, single-process and parallel-job functions and executables on Dragon, and a job
whose two groups of ranks each run on the cores of their own Dragon policy (group A on
the first core, group B on the last: the seed pins cores 0-3 and 4-7; this adapts the
ids to the host it finds). Each task prints its state and what it returned or printed.
"""
import asyncio
import os

from dragon.infrastructure.policy import Policy
from dragon.native.machine import System, Node

from rhapsody_graph.compat.api import ComputeTask, Session  # was: from rhapsody.api import ...
from rhapsody_graph.compat.backends import DragonExecutionBackendV3  # was: rhapsody.backends


async def where():
    import socket
    print("rank", os.environ.get("RANK", "0"), "cores", sorted(os.sched_getaffinity(0)))
    return socket.gethostname()


def group_policies():
    node = Node(System().nodes[0])
    cores = sorted(os.sched_getaffinity(0))
    first, last = cores[0], cores[-1]
    pin = dict(placement=Policy.Placement.HOST_NAME, host_name=node.hostname)
    return Policy(cpu_affinity=[first], **pin), Policy(cpu_affinity=[last], **pin)


async def main():
    backend = await DragonExecutionBackendV3(name="hpc")
    policy_a, policy_b = group_policies()
    tasks = [
        ComputeTask(function=where),
        ComputeTask(executable="/bin/bash", arguments=["-c", "echo $HOSTNAME"],
                    task_backend_specific_kwargs={"process_template": {}}),
        ComputeTask(executable="/bin/bash", arguments=["-c", "echo rank $RANK"],
                    task_backend_specific_kwargs={"process_templates": [(1, {}), (1, {})]}),
        ComputeTask(function=where, task_backend_specific_kwargs={"process_template": {}}),
        ComputeTask(function=where, uid="groups", task_backend_specific_kwargs={
            "process_templates": [(1, {"policy": policy_a}), (1, {"policy": policy_b})]}),
    ]
    async with Session(backends=[backend]) as session:
        await session.submit_tasks(tasks)
        await asyncio.gather(*tasks)
        for t in tasks:
            shown = t.stdout.strip() if t.stdout else t.return_value
            print(f"Task {t.uid}: {t.state} (output: {shown!r})")


if __name__ == "__main__":
    asyncio.run(main())
