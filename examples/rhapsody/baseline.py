"""A RHAPSODY program on rhapsody_graph: only the imports differ from RHAPSODY's.

    python examples/rhapsody/baseline.py

Async and plain functions and an executable on a local CPU pool; each task reports
its state, value, output and the backend it ran on.
"""
import asyncio
import platform

from rhapsody_graph.compat.api import ComputeTask, Session  # was: from rhapsody.api import ...
from rhapsody_graph.compat.backends import ConcurrentExecutionBackend  # was: rhapsody.backends


async def hostname():
    print(f"running on {platform.node()}")
    return platform.node()


def square(x):
    return x * x


async def main():
    backend = await ConcurrentExecutionBackend(name="local_cpu")
    async with Session(backends=[backend]) as session:
        tasks = [ComputeTask(function=hostname),
                 ComputeTask(function=square, args=(7,)),
                 ComputeTask(executable="/bin/echo", arguments=["hello", "rhapsody"])]
        await session.submit_tasks(tasks)
        await asyncio.gather(*tasks)
        for t in tasks:
            print(f"{t.uid}: {t.state} on {t.backend}: return_value={t.return_value!r} "
                  f"stdout={t.stdout!r}")


if __name__ == "__main__":
    asyncio.run(main())
