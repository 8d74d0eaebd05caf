"""RHAPSODY's API on rhapsody_graph: sessions, tasks and their fields, routing, errors."""
import asyncio
import os
import subprocess
import sys

import pytest

from rhapsody_graph.compat.api import (ComputeTask, Session, SessionError, TaskState,
                                       TaskValidationError)
from rhapsody_graph.compat.backends import ConcurrentExecutionBackend

from ..conftest import wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


async def _async_double(x):
    await asyncio.sleep(0)
    print("doubling", x)
    return 2 * x


def _fail():
    raise KeyError("missing input")


def test_tasks_report_state_value_output_exit_code_backend_and_a_failures_error_on_stderr():
    async def main():
        cpu = await ConcurrentExecutionBackend(name="cpu")
        async with Session(backends=[cpu]) as session:
            ok = ComputeTask(function=_async_double, args=(21,), uid="double")
            bad = ComputeTask(function=_fail)
            exe = ComputeTask(executable="/bin/sh", arguments=["-c", "echo out; echo err >&2"])
            exit3 = ComputeTask(executable="/bin/sh", arguments=["-c", "echo no >&2; exit 3"])
            missing = ComputeTask(executable="/no/such/program")
            submitted = await session.submit_tasks([ok, bad, exe, exit3, missing])
            assert all(isinstance(f, asyncio.Future) for f in submitted)  # as RHAPSODY's
            assert await ok is ok  # awaiting a task returns it
            done, pending = await asyncio.wait(submitted, timeout=60)
            assert not pending and [f.result() for f in submitted] == [ok, bad, exe, exit3,
                                                                      missing]
            await session.wait_tasks()
            return ok, bad, exe, exit3, missing

    ok, bad, exe, exit3, missing = asyncio.run(main())
    assert (ok.uid, ok.state, ok.return_value, ok.stdout, ok.exit_code, ok.backend) == \
        ("double", TaskState.DONE, 42, "doubling 21\n", 0, "cpu")
    assert bad.state == TaskState.FAILED and isinstance(bad.exception, KeyError)
    assert (bad.exit_code, bad["state"], bad.stderr) == (1, "FAILED", "'missing input'")
    assert (exe.state, exe.return_value, exe.stdout, exe.stderr) == ("DONE", None, "out\n", "err\n")
    assert (exit3.state, exit3.exit_code, exit3.stderr) == ("FAILED", 3, "no\n")
    assert exit3.exception is None  # as RHAPSODY's: an exit code is not an exception
    assert (missing.state, missing.exit_code, missing.stderr) == \
        ("FAILED", 1, "[Errno 2] No such file or directory: '/no/such/program'")


def _visible_gpus():
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def test_executables_take_rhapsodys_shell_cwd_and_env_which_replaces_the_environment(
        tmp_path, monkeypatch):
    monkeypatch.setenv("DRIVER_ONLY", "1")
    show = 'echo "$FOO/${DRIVER_ONLY-unset}"'

    def run(**kwargs):
        return ComputeTask(executable=kwargs.pop("executable", "/bin/sh"),
                           task_backend_specific_kwargs=kwargs.pop("extra"), **kwargs)

    async def main():
        async with Session(backends=[await ConcurrentExecutionBackend()]) as session:
            tasks = [run(executable="echo $((6*7)) | tr 4 X", extra={"shell": True}),
                     run(executable="echo", arguments=["$FOO", "|", "tr", "b", "c"],
                         extra={"shell": True, "env": {"FOO": "bar", "PATH": "/bin"}}),
                     run(executable="/bin/pwd", extra={"cwd": str(tmp_path)}),
                     run(arguments=["-c", show], extra={"env": {"FOO": "bar"}}),
                     run(arguments=["-c", show], extra={})]
            await session.submit_tasks(tasks)
            await session.wait_tasks(tasks)
            return [t.stdout for t in tasks]

    assert asyncio.run(main()) == ["X2\n", "car\n", f"{tmp_path}\n", "bar/unset\n", "/1\n"]


def test_compute_task_keeps_rhapsodys_fields_and_capture_stdio_writes_output_to_files(tmp_path):
    async def main():
        async with Session(backends=[await ConcurrentExecutionBackend()], uid="s",
                           work_dir=str(tmp_path)) as session:
            t = ComputeTask(executable="/bin/sh", arguments=["-c", "echo out; echo err >&2"],
                            uid="cap", capture_stdio=True, input_files=["in.txt"],
                            output_files=["out.txt"], tag="mine")
            await session.submit_tasks([t])
            return await t

    t = asyncio.run(main())
    assert (t.input_files, t.output_files, t["tag"], t.state) == (["in.txt"], ["out.txt"],
                                                                 "mine", "DONE")
    assert (t.stdout, t.stderr) == (str(tmp_path / "s" / "cap.stdout"),
                                    str(tmp_path / "s" / "cap.stderr"))
    assert (open(t.stdout).read(), open(t.stderr).read()) == ("out\n", "err\n")


def test_the_gpus_backend_kwarg_gives_a_task_gpus_and_a_task_without_sees_none(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # the backend's GPUs are these two

    async def main():
        async with Session(backends=[await ConcurrentExecutionBackend()]) as session:
            tasks = [ComputeTask(function=_visible_gpus,
                                 task_backend_specific_kwargs={"gpus": 1}),
                     ComputeTask(function=_visible_gpus),
                     ComputeTask(executable="/bin/sh",
                                 arguments=["-c", "echo $CUDA_VISIBLE_DEVICES"],
                                 task_backend_specific_kwargs={"gpus": 2})]
            await session.submit_tasks(tasks)
            await session.wait_tasks(tasks)
            return tasks

    one, none, two = asyncio.run(main())
    assert one.return_value in ("0", "1") and none.return_value == ""
    assert two.stdout == "0,1\n"


def test_tasks_are_dicts_and_rhapsodys_public_names_are_there():
    import rhapsody_graph.compat as rhapsody
    from rhapsody_graph.compat.backends import StateMapper, TasksMainStates

    t = ComputeTask(function=abs, args=(-1,), uid="d")
    t.update(note="n")
    t.state = "RUNNING"
    assert (t["uid"], t.get("state"), t.note, dict(t.items())["args"]) == ("d", "RUNNING", "n",
                                                                          (-1,))
    assert {"uid", "state", "function", "task_backend_specific_kwargs"} <= set(t.keys())
    assert rhapsody.__version__ == "0.6.0"
    for name in ("BackendError", "TaskValidationError", "TaskExecutionError", "SessionError",
                 "ResourceError"):
        assert issubclass(getattr(rhapsody, name), rhapsody.RhapsodyError), name
    assert str(rhapsody.TaskExecutionError("t", "boom", 2)) == \
        "Task 't' failed with exit code 2: boom"
    mapper = ConcurrentExecutionBackend().get_task_states_map()
    assert isinstance(mapper, StateMapper) and mapper.terminal_states == ("DONE", "FAILED",
                                                                          "CANCELED")
    assert [s.value for s in TasksMainStates] == ["DONE", "FAILED", "CANCELED", "RUNNING"]


def test_a_task_is_running_until_it_ends_and_a_timed_out_wait_says_how_many_completed():
    async def main():
        cpu = await ConcurrentExecutionBackend(name="cpu")
        async with Session(backends=[cpu]) as session:
            quick = ComputeTask(executable="/bin/true")
            slow = ComputeTask(executable="/bin/sh", arguments=["-c", "sleep 1; echo done"])
            assert slow.state is None and slow.get("state") is None  # RHAPSODY's: not yet
            await session.submit_tasks([quick, slow])
            assert slow.state == TaskState.RUNNING
            await quick
            with pytest.raises(asyncio.TimeoutError,
                               match=r"^Timeout after 0.2s: 1/2 tasks completed$"):
                await session.wait_tasks([quick, slow], timeout=0.2)
            assert slow["state"] == "RUNNING"
            assert await slow is slow  # the wait's timeout left it to be awaited again
            await session.wait_tasks([slow])
            return slow

    slow = asyncio.run(main())
    assert (slow.state, slow.stdout) == (TaskState.DONE, "done\n")



def test_a_timed_out_wait_for_on_the_submitted_futures_leaves_the_tasks_awaitable():
    # submit_tasks handed out each task's own future: a wait_for's timeout cancelled it,
    # and `await task` and wait_tasks() raised CancelledError for ever after
    async def main():
        cpu = await ConcurrentExecutionBackend(name="cpu")
        async with Session(backends=[cpu]) as session:
            tasks = [ComputeTask(executable="/bin/sh", arguments=["-c", "sleep 0.5"])
                     for _ in range(2)]
            futures = await session.submit_tasks(tasks)
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.gather(*futures), timeout=0.05)
            assert await tasks[0] is tasks[0]
            assert await session.wait_tasks(tasks, timeout=60) == tasks
            return [t.state for t in tasks]

    assert asyncio.run(main()) == [TaskState.DONE, TaskState.DONE]


def test_coroutines_using_a_new_session_at_once_share_it_and_a_closed_one_refuses_tasks():
    async def pipeline(session, i):
        t = ComputeTask(executable="/bin/echo", arguments=[f"pipeline {i}"])
        await session.submit_tasks([t])
        await t
        return t.stdout

    async def main():
        session = Session(backends=[await ConcurrentExecutionBackend()])  # no async with
        try:  # each first use made a session: "already belongs to a session"
            outputs = await asyncio.gather(*(pipeline(session, i) for i in range(3)))
        finally:
            await session.close()
        with pytest.raises(SessionError, match="is closed; make a new Session"):
            await session.submit_tasks([ComputeTask(executable="/bin/true")])
        return outputs

    assert asyncio.run(main()) == [f"pipeline {i}\n" for i in range(3)]


def test_what_is_not_a_list_of_tasks_is_refused_saying_what_to_pass():
    async def main():
        async with Session(backends=[await ConcurrentExecutionBackend()]) as session:
            with pytest.raises(TypeError, match="takes tasks .*got {.*'uid': 'd1'}.*ComputeTask"):
                await session.submit_tasks([{"uid": "d1", "executable": "/bin/echo"}])
            with pytest.raises(TypeError, match="takes a list of tasks, got "):
                await session.submit_tasks(ComputeTask(executable="/bin/echo"))
    asyncio.run(main())
    with pytest.raises(TaskValidationError, match="'sim' .*env must map variable names .*'A': 1"):
        ComputeTask(executable="/opt/sim", task_backend_specific_kwargs={"env": {"A": 1}},
                    uid="sim")  # was reported against /usr/bin/env


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
    with pytest.raises(TaskValidationError, match="^Task 'x' validation failed: ComputeTask "
                                                  "requires either 'executable' or 'function'"):
        ComputeTask(uid="x")
    with pytest.raises(TaskValidationError, match="'x' .*cannot have both"):
        ComputeTask(function=abs, executable="/bin/true", uid="x")
    with pytest.raises(TaskValidationError, match="'x' .*function must be callable, got int 3"):
        ComputeTask(function=3, uid="x")
    with pytest.raises(RuntimeError, match="was not submitted"):
        asyncio.run(_await(ComputeTask(function=abs, args=(1,))))


@pytest.mark.parametrize("fields, message", [
    (dict(executable="/bin/echo", arguments="hello"), "arguments must be a list, got str 'hello'"),
    (dict(executable="/bin/echo", arguments=("a",)), "arguments must be a list, got tuple"),
    (dict(executable=["/bin/echo", "x"]), "executable must be a string, got list"),
    (dict(executable="/bin/echo", arguments=[None]), "executable '/bin/echo': argument 1 must "
                                                     "be text, a number, a path"),
    (dict(function=abs, args="abc"), "args must be a tuple or list, got str 'abc'"),
    (dict(function=abs, args=5), "args must be a tuple or list, got int 5"),
    (dict(function=abs, kwargs=[1]), r"kwargs must be a dict, got list \[1\]"),
])
def test_wrong_field_types_raise_task_validation_error_and_strings_are_never_split(
        fields, message):
    with pytest.raises(TaskValidationError, match=f"^Task 'bad' validation failed: {message}"):
        ComputeTask(uid="bad", **fields)


@pytest.mark.parametrize("uid", ["", 5])
def test_a_bad_uid_is_reported_as_the_uid_not_as_a_node_option(uid):
    for fields in (dict(function=abs), dict(executable="/bin/true")):
        with pytest.raises(TaskValidationError, match="^Task validation failed: uid must be a "
                                                      f"non-empty string, got {uid!r}$"):
            ComputeTask(uid=uid, **fields)


def test_unknown_or_misplaced_backend_kwargs_are_refused_naming_the_task_the_key_and_the_choice():
    with pytest.raises(TaskValidationError,
                       match="^Task 'x' validation failed: task_backend_specific_kwargs takes "
                             "cpus, cwd, env, gpus, process_template, process_templates, shell; "
                             "got 'bogus'$"):
        ComputeTask(executable="/bin/true", uid="x", task_backend_specific_kwargs={"bogus": 1})
    with pytest.raises(TaskValidationError,
                       match="'f' .* takes cpus, gpus, process_template, process_templates; got "
                             "'cwd'; "
                             "cwd, env and shell are for executable tasks only"):
        ComputeTask(function=abs, uid="f", task_backend_specific_kwargs={"cwd": "/tmp"})
    with pytest.raises(TaskValidationError, match="'e' .*env must be a dict, got list"):
        ComputeTask(executable="/bin/true", uid="e",
                    task_backend_specific_kwargs={"env": ["A=1"]})


def test_args_the_function_cannot_take_raise_task_validation_error_naming_the_task():
    def step(x, scale=1):
        return x * scale
    with pytest.raises(TaskValidationError, match="^Task 's' validation failed: .*'scal'"):
        ComputeTask(function=step, args=(1,), kwargs={"scal": 2}, uid="s")


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


CORES = min(2, len(os.sched_getaffinity(0)))


def _cores():
    return sorted(os.sched_getaffinity(0))


def test_an_implicitly_routed_task_names_its_backend_from_submission_and_cpus_are_taken():
    async def main():
        async with ConcurrentExecutionBackend(name="cpu") as cpu:
            async with Session(backends=[cpu]) as session:
                assert session.backends["cpu"] is cpu  # by name, as RHAPSODY's
                one = ComputeTask(function=_cores)
                two = ComputeTask(function=_cores, task_backend_specific_kwargs={"cpus": CORES})
                await session.submit_tasks([one, two])
                assert one.backend == two.backend == "cpu"  # known while they run
                await session.wait_tasks()
                return one.return_value, two.return_value
    one, two = asyncio.run(main())
    assert len(one) == 1 and len(two) == CORES


def test_a_concurrent_backend_refuses_what_is_not_an_executor():
    with pytest.raises(TypeError, match="Executor must be ThreadPoolExecutor or "
                                        "ProcessPoolExecutor, got 5"):
        ConcurrentExecutionBackend(executor=5)


def test_an_ai_task_with_a_sampling_value_out_of_range_is_a_task_validation_error():
    # AITask(temperature=inf) passed the task's own check, then failed submit_tasks with
    # a plain ValueError
    from rhapsody_graph.compat.api import AITask
    task = AITask(prompt="hi", model="m", temperature=float("inf"), uid="t")
    with pytest.raises(TaskValidationError, match="'t' .*temperature= must be a finite"):
        task.node()



@pytest.mark.parametrize("fields, text", [
    (dict(prompt=""), "prompt is required"),
    (dict(prompt="hi"), "AITask requires either 'model' or 'backend'"),
    (dict(prompt="hi", model=3), "model must be a string, got int 3"),
    (dict(prompt="hi", model="m", temperature=-1), "temperature must be a non-negative number"),
    (dict(prompt="hi", model="m", max_tokens=0), "max_tokens must be a positive integer"),
    (dict(prompt="hi", model="m", top_p=2), "top_p must be a number between 0 and 1"),
    (dict(prompt="hi", model="m", top_k=0), "top_k must be a positive integer"),
    (dict(prompt="hi", model="m", stop_sequences="."), "stop_sequences must be a list"),
])
def test_ai_tasks_are_checked_as_rhapsody_checks_them(fields, text):
    from rhapsody_graph.compat.api import AITask
    with pytest.raises(TaskValidationError, match=text):
        AITask(uid="a", **fields)


def test_an_ai_task_has_rhapsodys_fields_and_sends_stop_sequences_as_stop():
    from rhapsody_graph.compat.api import AITask
    t = AITask(prompt="hi", model="m", stop_sequences=["."], top_k=5, tag="mine")
    assert (t.temperature, t.max_tokens, t.top_p, t.inference_endpoint, t.tag) == \
        (None, None, None, None, "mine")
    assert t.node().fn.sampling == {"top_k": 5, "stop": ["."]}  # the node's AISpec


def test_a_bad_option_value_raises_task_validation_error_naming_the_task():
    with pytest.raises(TaskValidationError, match="^Task 'g' validation failed: .*option 'gpus' "
                                                  "must be an integer >= 0, got 0.5"):
        ComputeTask(function=abs, uid="g", task_backend_specific_kwargs={"gpus": 0.5})
    with pytest.raises(TaskValidationError, match="^Task 'c' validation failed: .*'cpus'"):
        ComputeTask(executable="/bin/true", uid="c", task_backend_specific_kwargs={"cpus": -1})


SIGTERMED = '''
import asyncio
from rhapsody_graph.compat.api import Session, ComputeTask
from rhapsody_graph.compat.backends import ConcurrentExecutionBackend
async def main():
    try:
        async with Session([await ConcurrentExecutionBackend(name="cpu")]) as s:
            t = ComputeTask(executable="sleep", arguments=["600"])
            await s.submit_tasks([t])
            print("running", flush=True)
            await t
    finally:
        print("finally ran", flush=True)
asyncio.run(main())
'''


def test_a_sigterm_to_a_compat_program_unwinds_it_as_a_native_one_exits_143():
    # the session was made off the main thread, so SIGTERM kept its default action:
    # the program died at once, no finally ran (a Dragon runtime was left behind)
    import signal
    driver = subprocess.Popen([sys.executable, "-c", SIGTERMED], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert driver.stdout.readline() == "running\n"
        driver.send_signal(signal.SIGTERM)
        assert driver.wait(timeout=60) == 143
        assert driver.stdout.read() == "finally ran\n"
    finally:
        if driver.poll() is None:
            driver.kill()


def test_a_dask_backend_given_no_cluster_starts_one_from_resources_and_closes_it_with_its_session():
    # RHAPSODY's DaskExecutionBackend() starts a LocalCluster (resources: its arguments);
    # here it failed "give exactly one of client=, cluster= or address="
    pytest.importorskip("distributed")
    from rhapsody_graph.compat.backends import DaskExecutionBackend

    async def main():
        backend = DaskExecutionBackend({"n_workers": 1, "threads_per_worker": 1,
                                        "dashboard_address": None})
        async with Session(backends=[backend]) as session:
            t = ComputeTask(function=os.getpid)
            await session.submit_tasks([t])
            await t
        return t
    t = asyncio.run(main())
    assert t.state == TaskState.DONE and t.return_value != os.getpid()
    gone = lambda: not os.path.exists(f"/proc/{t.return_value}")
    assert wait_until(gone, 60), "the cluster it started outlived its session"
    with pytest.raises(TypeError, match="resources must be a dict of LocalCluster arguments"):
        DaskExecutionBackend("tcp://127.0.0.1:8786")
    with pytest.raises(TypeError, match="not both"):
        DaskExecutionBackend({"n_workers": 1}, address="tcp://127.0.0.1:8786")


def fails_first(path):
    if not os.path.exists(path):
        open(path, "w").close()
        raise RuntimeError("first attempt fails")
    return "ok"


def test_a_task_submitted_again_holds_only_its_new_runs_fields(tmp_path):
    # its earlier run's exception stayed beside the new value (state DONE, exception set),
    # and an earlier run still going overwrote the newer one's fields when it ended
    async def main():
        async with Session(backends=[ConcurrentExecutionBackend(name="cpu")]) as session:
            t = ComputeTask(function=fails_first, args=(str(tmp_path / "tried"),))
            await session.submit_tasks([t])
            await t
            first = (t.state, type(t.exception).__name__, t.stderr)
            await session.submit_tasks([t])
            await t
            slow = ComputeTask(function=_sleep_then, args=(1.0, "slow"))
            await session.submit_tasks([slow])
            first_run = slow.future
            slow.args = (0.0, "quick")
            await session.submit_tasks([slow])
            await slow
            quick = slow.return_value
            assert await first_run == "slow"  # (its end is told to the task before this)
            return first, (t.state, t.exception, t.return_value), (quick, slow.return_value)
    first, second, slow = asyncio.run(main())
    assert first[:2] == (TaskState.FAILED, "RuntimeError") and "first attempt" in first[2]
    assert second == (TaskState.DONE, None, "ok")
    assert slow == ("quick", "quick")


def _sleep_then(seconds, value):
    import time
    time.sleep(seconds)
    return value


def test_a_batch_refused_before_it_runs_raises_rhapsodys_errors_naming_the_task():
    # they were rhapsody_graph's UnsatisfiableError, NoBackendError and TypeError, which
    # an `except RhapsodyError` of a RHAPSODY program does not catch
    import threading
    from rhapsody_graph.compat.errors import ResourceError, RhapsodyError
    lock = threading.Lock()

    async def refused(**fields):
        async with Session(backends=[ConcurrentExecutionBackend(name="cpu")]) as session:
            with pytest.raises(RhapsodyError) as caught:
                await session.submit_tasks([ComputeTask(uid="ok", function=abs, args=(1,)),
                                            ComputeTask(uid="bad", **fields)])
            assert not session.tasks  # nothing of the batch started
        return caught.value
    too_big = asyncio.run(refused(function=abs, args=(1,),
                                  task_backend_specific_kwargs={"cpus": 4096}))
    assert isinstance(too_big, ResourceError) and too_big.task_uid == "bad"
    assert "max_workers=N" in str(too_big)
    assert "no backend named 'nope'" in str(asyncio.run(refused(function=abs, args=(1,),
                                                                backend="nope")))
    unsent = asyncio.run(refused(function=abs, args=(lock,)))
    assert isinstance(unsent, TaskValidationError) and unsent.task_uid == "bad"
