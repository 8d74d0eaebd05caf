"""The Dragon backend's scenarios, run under the real ``dragon`` launcher in one launch.

Starting Dragon costs seconds, so every scenario in tests/dragon_runtime shares one
launch and one Batch runtime; this test starts it, bounds it, and checks that the
launch passed every scenario and left no Dragon process behind. The examples in
examples/dragon run here too, each in a launch of its own, as a user runs them.

Every launch runs under tests/reaper.py, which knows the launch's processes by ancestry
(a child subreaper): what is left behind is found by pid and reported whatever its name,
and another job's Dragon runtime on the same machine is never counted nor touched.
"""
import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings

import pytest

from tests.reaper import NONE_LEFT, children, descendants, left_behind, run, start, stop

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SCENARIOS = os.path.join(ROOT, "tests", "dragon_runtime")
EXAMPLES = os.path.join(ROOT, "examples", "dragon")


#: how long a launch's processes may take to exit after the launch itself has
GRACE = 5.0


def dragon_alive() -> bool:
    """Whether any Dragon runtime runs on this machine (this test's or another's); not
    this pytest itself, whose command line may name this file."""
    out = subprocess.run(["pgrep", "-f", "dragon"], capture_output=True, text=True).stdout
    return bool({int(pid) for pid in out.split()} - {os.getpid()})


@pytest.fixture(autouse=True)
def no_orchestrator_file_left():
    """After each test, once its processes are gone: remove the ``ddict_orc_<id>`` files
    it left in the working directory (the checkout). Batch's results dictionary writes
    one there and removes it only when it is closed, so a run killed on purpose leaves
    it (docs/dragon.md)."""
    before = set(glob.glob(os.path.join(ROOT, "ddict_orc_*")))
    yield
    for path in set(glob.glob(os.path.join(ROOT, "ddict_orc_*"))) - before:
        os.unlink(path)


@pytest.mark.timeout(900)
def test_dragon_scenarios_pass_under_the_dragon_launcher_and_leave_no_process():
    launcher = shutil.which("dragon")
    assert launcher, 'the Dragon launcher is missing: pip install ".[test]" installs dragonhpc'
    code, output = _launch([launcher, sys.executable, "-m", "pytest", SCENARIOS, "-q", "-p",
                            "no:cacheprovider", "-o", "addopts=-ra"], 840)
    summary = re.search(r"(\d+) passed", output)
    assert code == 0 and summary, output[-6000:]
    assert int(summary.group(1)) == _scenario_count(), output[-6000:]
    assert left_behind(output) == NONE_LEFT


@pytest.mark.timeout(420)
@pytest.mark.parametrize("example, args, shows", [
    ("ai_on_a_gpu.py", ["--gpus", "2"], r"analyse ran on \S+, GPU \d; best run \d\nsummary: \w"),
    ("cpu_gpu_affinity.py", ["--gpus", "4"], r"gpu only .*CUDA_VISIBLE_DEVICES=\d"),
    ("gpu_round_robin.py", ["--gpus", "4"], r"task 7: host \S+, CUDA_VISIBLE_DEVICES=3"),
    ("multi_rank_job.py", [], r"executable ranks: \['rank 0 of 2', 'rank 1 of 2'\]"),
    (os.path.join("..", "rhapsody", "dragon_templates.py"), [],
     r"Task task\.\d+: DONE \(output: 'rank 0\\nrank 1'\)(?s:.*)"
     r"Task groups: DONE \(output: 'rank 0 cores \[\d\]\\nrank 1 cores \[\d\]'\)"),
    (os.path.join("..", "rhapsody", "resource_placement.py"), ["--gpus", "4"],
     r"4 cpu affinity: A \[\d\] B \[\d\] disjoint=True(?s:.*)5 round robin: 0 1 2 3 0 1 2 3"
     r"(?s:.*)6 combined: cores \[\d+\] GPU 0"),
    (os.path.join("..", "rhapsody", "multiple_backends.py"), [],
     r"Task 1 ran on: local_cpu\nTask 2 ran on: hpc_gpu\nImplicit task ran on: local_cpu; "
     r"templated task on: hpc_gpu(?s:.*)16 of 16 hostname tasks finished on Dragon"),
    ("mixed_session.py", ["--gpus", "2"],
     r"simulation 5 on hpc, host \S+, cores \[\d\]: 0.833(?s:.*)2 of 6 refined on \['cpu'\]\n"
     r"summary: \S(?s:.*)the summary ran on llm, host \S+"),
])
def test_dragon_example_runs_under_the_launcher_and_leaves_no_process(example, args, shows):
    code, output = _launch([shutil.which("dragon"), os.path.join(EXAMPLES, example), *args], 360)
    assert code == 0 and re.search(shows, output), output[-3000:]
    assert left_behind(output) == NONE_LEFT


@pytest.mark.timeout(300)
def test_dragon_example_runs_as_plain_python_and_leaves_no_process():
    code, output = _launch([sys.executable, os.path.join(EXAMPLES, "without_launcher.py")], 240)
    assert code == 0 and re.search(
        r"before: False\nunder a Dragon runtime now: True(?s:.*)on Dragon: value 5 from "
        r"process \d+ on \S+\non the local backend: value 5 from process \d+ on \S+\n"
        r"on Dragon again: 6", output), \
        output[-3000:]
    assert left_behind(output) == NONE_LEFT


def _launch(cmd: list, seconds: float) -> tuple:
    """Run ``cmd`` (the Dragon launcher on a program, or a program that starts Dragon)
    under the reaper; its exit code and output, the reaper's report last. On a timeout,
    kill all it started, by pid, and fail."""
    code, output = run(cmd, GRACE, seconds, cwd=ROOT, preexec_fn=os.setpgrp)
    if code is None:
        _remove_dead_runtime_files()
        pytest.fail(f"{cmd[1:]} did not finish under dragon in {seconds} s:\n" + output[-6000:])
    return code, output


def _start(cmd: list, grace: float, preexec=os.setpgrp) -> subprocess.Popen:
    """``cmd`` under the reaper, in a process group of its own (to signal it whole); not
    in a session of its own: the dragon launcher started by setsid hangs without a word
    (dragonhpc 0.15)."""
    return start(cmd, grace, cwd=ROOT, preexec_fn=preexec)


@pytest.mark.timeout(600)  # two launches, if the first hangs
def test_ctrl_c_to_the_driver_kills_its_nodes_and_leaves_no_dragon_process(tmp_path):
    pidfile = tmp_path / "pids"
    script = os.path.join(SCENARIOS, "interrupted.py")
    proc, pids = _launch_until_started([shutil.which("dragon"), script, str(pidfile)], GRACE,
                                       pidfile, 3)
    try:
        time.sleep(1)  # the nodes and the server run: the driver waits in its loop
        os.kill(_driver_pid(proc.pid, script), signal.SIGINT)  # what Ctrl-C does to the driver
        output, _ = proc.communicate(timeout=90 + GRACE)
    finally:
        _end_launch(proc)
    assert "KeyboardInterrupt" in output, output[-3000:]
    assert left_behind(output) == NONE_LEFT
    assert not [p for p in pids if os.path.exists(f"/proc/{p}")], \
        "a node's process or the inference server survived"


UNCLOSED = """import rhapsody_graph as rhapsody

@rhapsody.task
def plain(x):
    return 2 * x

if __name__ == "__main__":
    print(rhapsody.compute(plain(21), backend="dragon"))  # no `with`, nothing closed
"""


FAILS_BEFORE_ITS_SESSION = """import rhapsody_graph as rhapsody

if __name__ == "__main__":
    backend = rhapsody.DragonBackend().start()  # started, never in a session
    raise SystemExit("failed before the session")
"""


@pytest.mark.timeout(300)
@pytest.mark.parametrize("launcher", ["dragon", "python"])
@pytest.mark.parametrize("program, code_and_output", [
    (UNCLOSED, (0, "(42,)")), (FAILS_BEFORE_ITS_SESSION, (1, "failed before the session"))])
def test_a_dragon_program_that_never_closes_its_backend_exits_and_leaves_no_process(
        tmp_path, program, code_and_output, launcher):
    """Under the launcher, and as a plain ``python script.py`` (which starts a Dragon
    runtime of its own and must stop it)."""
    script = tmp_path / "unclosed.py"
    script.write_text(program)
    run = [shutil.which("dragon")] if launcher == "dragon" else [sys.executable]
    code, output = _launch(run + [str(script)], 240)
    assert (code, code_and_output[1] in output) == (code_and_output[0], True), output[-3000:]
    assert left_behind(output) == NONE_LEFT


def _fresh_signals() -> None:
    """In the launcher before exec: its own process group, SIGINT neither ignored nor
    blocked (dispositions and masks are inherited across exec, and this test process
    may carry others' settings)."""
    os.setpgrp()
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _launch_until_started(cmd: list, grace: float, pidfile, count: int,
                          preexec=_fresh_signals, seconds: float = 150) -> tuple:
    """Start ``cmd`` under the reaper and wait until its nodes have written ``count``
    pids to ``pidfile``: the launch and those pids.

    A launch that ends first fails the test with its output. Now and then Batch loses
    a call (a Dragon bug, docs/dragon.md), which the backend's ``start_timeout`` (120 s)
    then retries: ``seconds`` waits past that. A launch whose nodes have still not
    started (seen once in CI, with a wait of 120 s) is killed, by pid, and started once
    more, with a warning that carries its output; a second hang fails the test with
    both outputs."""
    hung = []
    for _ in range(2):
        proc = _start(cmd, grace, preexec)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"the launch ended before its nodes started:\n"
                            f"{proc.communicate()[0][-3000:]}")
            if pidfile.exists() and len(pidfile.read_text().split()) >= count:
                return proc, [int(p) for p in pidfile.read_text().split()]
            time.sleep(0.2)
        _end_launch(proc)
        hung.append(proc.communicate()[0][-3000:])
        pidfile.unlink(missing_ok=True)
        warnings.warn(f"the launch's nodes did not start in {seconds} s; launching again. "
                      f"Its output:\n{hung[-1]}")
    pytest.fail("the launch's nodes did not start, twice:\n" + "\n----\n".join(hung))


def _driver_pid(reaper: int, script: str) -> int:
    """The driver process of the launch under ``reaper`` (its own cmdline names the
    script).

    Its arguments are read split by NULs or, where a title was set (``setproctitle``,
    which gunicorn, imported by Dragon, loads when it is installed, leaves one string),
    by spaces."""
    for pid in descendants(reaper):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().replace(b"\0", b" ").split()
        except OSError:
            continue
        if len(argv) > 1 and argv[1].decode(errors="replace") == script:
            return pid
    raise AssertionError("no driver process found")


def _scenario_count() -> int:
    files = [f for f in os.listdir(SCENARIOS) if f.startswith("test_") and f.endswith(".py")]
    return sum(len(re.findall(r"^def test_", open(os.path.join(SCENARIOS, f)).read(), re.M))
               for f in files)


KILLED_DRIVER = """import os, sys, time
import rhapsody_graph as rhapsody

@rhapsody.task
def sleeper(path):
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(600)

rhapsody.compute(sleeper(sys.argv[1]), backend=rhapsody.DragonBackend())
"""


@pytest.mark.timeout(600)  # two launches, if the first hangs
def test_a_plain_python_driver_killed_by_sigkill_leaves_no_dragon_process(tmp_path):
    """``python script.py`` starts its own Dragon runtime; SIGKILL to the driver (a batch
    system's, the OOM killer's) takes the runtime and the node's process with it."""
    script, pidfile = tmp_path / "killed.py", tmp_path / "pid"
    script.write_text(KILLED_DRIVER)
    proc, (node,) = _launch_until_started(  # the reaper's grace: the watchdog's time
        [sys.executable, str(script), str(pidfile)], 30, pidfile, 1, os.setpgrp)
    try:
        driver, = children(proc.pid)
        assert len(descendants(driver)) > 2, "no Dragon runtime was started"
        os.kill(driver, signal.SIGKILL)
        output, _ = proc.communicate(timeout=90)
    finally:
        _end_launch(proc)
    assert left_behind(output) == NONE_LEFT  # within 30 s of the driver's death
    assert not os.path.exists(f"/proc/{node}"), "the node's process survived"


LAUNCHER_KILLED = """import os, sys, time
import rhapsody_graph as rhapsody

@rhapsody.task(cpus=1)
def sleeper(path):
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(600)

with open(sys.argv[2], "w") as f:
    f.write(str(os.getpid()))
with rhapsody.DragonBackend() as backend:
    rhapsody.compute(sleeper(sys.argv[1]), backend=backend)
"""


@pytest.mark.timeout(720)  # two launches, if the first hangs
@pytest.mark.parametrize("signum, whole_group", [(signal.SIGTERM, False),
                                                 (signal.SIGINT, True)])
def test_a_signal_to_the_launcher_stops_the_driver_and_leaves_no_process(
        tmp_path, signum, whole_group):
    """A batch system's SIGTERM may reach only the launcher, a terminal's Ctrl-C reaches
    its whole group (Dragon's services first): the driver must not run on under init,
    nor the node's process, nor any Dragon process."""
    script, pidfile, driverfile = tmp_path / "launched.py", tmp_path / "pid", tmp_path / "driver"
    script.write_text(LAUNCHER_KILLED)
    # the reaper waits for the driver's bounded shutdown, then its watchdog
    proc, (node,) = _launch_until_started(
        [shutil.which("dragon"), str(script), str(pidfile), str(driverfile)], 150, pidfile, 1)
    try:
        driver = int(driverfile.read_text())
        launcher, = children(proc.pid)
        if whole_group:
            os.killpg(os.getpgid(launcher), signum)  # the launcher leads a group of its own
        else:
            os.kill(launcher, signum)  # the launcher alone
        output, _ = proc.communicate(timeout=120 + 150)
    finally:
        _end_launch(proc)
    assert left_behind(output) == NONE_LEFT
    assert not os.path.exists(f"/proc/{driver}"), "the driver outlived its launcher"
    assert not os.path.exists(f"/proc/{node}"), "the node's process survived"


def _end_launch(proc: subprocess.Popen) -> None:
    """After a launch that failed or was killed in part: kill what is left of it (the
    reaper does, by pid), then the files of dead runtimes."""
    stop(proc)
    _remove_dead_runtime_files()



def _remove_dead_runtime_files() -> None:
    """The shared-memory files killed Dragon runtimes leave, when no runtime at all is
    alive (this test's or another's)."""
    if not dragon_alive():
        for name in os.listdir("/dev/shm"):
            if name.startswith("DD"):
                os.unlink(os.path.join("/dev/shm", name))
