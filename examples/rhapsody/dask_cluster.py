"""RHAPSODY's preconfigured Dask cluster program on rhapsody_graph: only the imports differ.

    python examples/rhapsody/dask_cluster.py

An asynchronous ``LocalCluster`` made outside the session (two single-threaded
workers), handed to ``DaskExecutionBackend(cluster=...)``: functions and an executable
run on its workers, which report their own process id.
"""
import asyncio
import os

from dask.distributed import LocalCluster

from rhapsody_graph.compat.api import ComputeTask, Session  # was: from rhapsody.api import ...
from rhapsody_graph.compat.backends.execution import DaskExecutionBackend  # was: rhapsody...


def on_worker(x):
    return {"square": x * x, "pid": os.getpid()}


async def custom_cluster_demo():
    cluster = await LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                 asynchronous=True, dashboard_address=None)
    try:
        backend = await DaskExecutionBackend(cluster=cluster)
        async with Session(backends=[backend]) as session:
            tasks = [ComputeTask(function=on_worker, args=(i,)) for i in range(4)]
            tasks.append(ComputeTask(executable="/bin/echo", arguments=["from", "a", "worker"]))
            await session.submit_tasks(tasks)
            await asyncio.gather(*tasks)
            squares = [t.return_value["square"] for t in tasks[:4]]
            pids = {t.return_value["pid"] for t in tasks[:4]}
            print(f"squares {squares} on {len(pids)} worker process(es), "
                  f"none of them this one: {os.getpid() not in pids}")
            print(f"executable {tasks[-1].state}: {tasks[-1].stdout.strip()!r} "
                  f"exit code {tasks[-1].exit_code} on {tasks[-1].backend}")
    finally:
        await cluster.close()


if __name__ == "__main__":
    asyncio.run(custom_cluster_demo())
