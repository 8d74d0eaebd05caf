"""RHAPSODY's multi-backend programs on rhapsody_graph: only the imports differ.

    dragon python examples/rhapsody/multiple_backends.py

A local CPU pool and Dragon in one session: tasks routed explicitly by backend name,
one routed implicitly (no ``backend=``: the first backend that can run it, here the
pool; a task with a Dragon template can only go to Dragon), and the HPC section's
16 ``hostname`` executables on Dragon with 8 workers.
"""
import asyncio
import platform

from rhapsody_graph.compat.api import ComputeTask, Session  # was: from rhapsody.api import ...
from rhapsody_graph.compat.backends import (  # was: from rhapsody.backends import ...
    ConcurrentExecutionBackend, DragonExecutionBackendV3)


async def compute_function():
    print(f"Running on host: {platform.node()}")
    return platform.node()


async def multi_backend_demo():
    be_local = ConcurrentExecutionBackend(name="local_cpu")
    be_remote = DragonExecutionBackendV3(name="hpc_gpu", num_workers=8)
    await asyncio.gather(be_local, be_remote)
    async with Session(backends=[be_local, be_remote]) as session:
        task1 = ComputeTask(function=compute_function, backend=be_local.name)
        task2 = ComputeTask(function=compute_function, backend=be_remote.name)
        implicit = ComputeTask(function=compute_function)
        placed = ComputeTask(function=compute_function,
                             task_backend_specific_kwargs={"process_template": {}})
        await session.submit_tasks([task1, task2, implicit, placed])
        await asyncio.gather(task1, task2, implicit, placed)
        print(f"Task 1 ran on: {task1.backend}")
        print(f"Task 2 ran on: {task2.backend}")
        print(f"Implicit task ran on: {implicit.backend}; templated task on: {placed.backend}")
        print(f"Task 2 printed: {task2.stdout.strip()!r}")

        tasks = [ComputeTask(executable="hostname", backend=be_remote.name) for _ in range(16)]
        await session.submit_tasks(tasks)
        await asyncio.gather(*tasks)
        done = sum(t.state == "DONE" and t.stdout.strip() == platform.node() for t in tasks)
        print(f"{done} of {len(tasks)} hostname tasks finished on Dragon")


if __name__ == "__main__":
    asyncio.run(multi_backend_demo())
