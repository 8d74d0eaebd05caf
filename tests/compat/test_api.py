"""RHAPSODY's API on rhapsody_graph: sessions, tasks and their fields, routing, errors."""
import asyncio
import os
import subprocess
import sys

import pytest

from rhapsody_graph.compat.api import ComputeTask, Session, TaskState
from rhapsody_graph.compat.backends import ConcurrentExecutionBackend

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


async def _async_double(x):
    await asyncio.sleep(0)
    print("doubling", x)
    return 2 * x


def _fail():
    raise KeyError("missing input")


def test_tasks_report_state_value_output_exit_code_and_backend():
    async def main():
        cpu = await ConcurrentExecutionBackend(name="cpu")
        async with Session(backends=[cpu]) as session:
            ok = ComputeTask(function=_async_double, args=(21,), uid="double")
            bad = ComputeTask(function=_fail)
            exe = ComputeTask(executable="/bin/sh", arguments=["-c", "echo out; echo err >&2"])
            exit3 = ComputeTask(executable="/bin/sh", arguments=["-c", "echo no >&2; exit 3"])
            submitted = await session.submit_tasks([ok, bad, exe, exit3])
            assert submitted == [ok, bad, exe, exit3]
            assert await ok is ok  # awaiting a task returns it
            await session.wait_tasks()
            return ok, bad, exe, exit3

    ok, bad, exe, exit3 = asyncio.run(main())
    assert (ok.uid, ok.state, ok.return_value, ok.stdout, ok.exit_code, ok.backend) == \
        ("double", TaskState.DONE, 42, "doubling 21\n", 0, "cpu")
    assert bad.state == TaskState.FAILED and isinstance(bad.exception, KeyError)
    assert bad.exit_code == 1 and bad["state"] == "FAILED"
    assert (exe.state, exe.return_value, exe.stdout, exe.stderr) == ("DONE", None, "out\n", "err\n")
    assert (exit3.state, exit3.exit_code, exit3.stderr) == ("FAILED", 3, "no\n")



def test_a_wait_that_times_out_leaves_the_task_to_be_awaited_again():
    async def main():
        cpu = await ConcurrentExecutionBackend(name="cpu")
        async with Session(backends=[cpu]) as session:
            slow = ComputeTask(executable="/bin/sh", arguments=["-c", "sleep 0.5; echo done"])
            await session.submit_tasks([slow])
            with pytest.raises(asyncio.TimeoutError):
                await session.wait_tasks([slow], timeout=0.01)
            assert await slow is slow  # before: CancelledError, its awaitable cancelled
            await session.wait_tasks([slow])
            return slow

    slow = asyncio.run(main())
    assert (slow.state, slow.stdout) == (TaskState.DONE, "done\n")

def test_tasks_go_to_the_backend_they_name_else_to_the_first_one():
    async def main():
        a, b = ConcurrentExecutionBackend(name="a"), ConcurrentExecutionBackend(name="b")
        await asyncio.gather(a, b)
        async with Session(backends=[a, b]) as session:
            tasks = [ComputeTask(function=abs, args=(-1,), backend="b"),
                     ComputeTask(function=abs, args=(-2,))]
            await session.submit_tasks(tasks)
            await asyncio.gather(*tasks)
            return [(t.backend, t.return_value) for t in tasks]

    assert asyncio.run(main()) == [("b", 1), ("a", 2)]


def test_bad_tasks_are_refused_when_made_naming_the_task():
    with pytest.raises(TypeError, match="ComputeTask 'x': give function= or executable="):
        ComputeTask(uid="x")
    with pytest.raises(TypeError, match="'x': task_backend_specific_kwargs takes .*'bogus'"):
        ComputeTask(function=abs, uid="x", task_backend_specific_kwargs={"bogus": 1})
    with pytest.raises(RuntimeError, match="was not submitted"):
        asyncio.run(_await(ComputeTask(function=abs, args=(1,))))


async def _await(task):
    return await task


def test_a_dragon_template_on_a_local_backend_is_refused_before_anything_runs():
    async def main():
        async with Session(backends=[ConcurrentExecutionBackend(name="cpu")]) as session:
            t = ComputeTask(function=abs, args=(1,), uid="placed",
                            task_backend_specific_kwargs={"process_template": {}})
            await session.submit_tasks([t])

    with pytest.raises(ValueError, match=r"node 'placed-\w+': option 'process_template' is passed "
                                         "to Dragon"):
        asyncio.run(main())


@pytest.mark.parametrize("example, shows", [
    ("baseline.py", ["task.000001: DONE on local_cpu", "return_value=49",
                     "return_value=None stdout='hello rhapsody\\n'"]),
    ("mixed_ai.py", ["Simulation DONE (exit code 0): step 3 energy 7",
                     "AI Summary DONE on vllm_service: '"]),
    ("dask_cluster.py", ["squares [0, 1, 4, 9] on ", "none of them this one: True",
                         "executable DONE: 'from a worker' exit code 0 on dask"]),
])
def test_converted_seed_example_runs(example, shows):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "rhapsody", example)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    for text in shows:
        assert text in done.stdout, done.stdout
    assert "CRITICAL" not in done.stderr and "Traceback" not in done.stderr, done.stderr[-3000:]
