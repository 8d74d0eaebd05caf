"""A driver killed from outside (SIGTERM at a batch system's walltime, SIGKILL from the
OOM killer) takes every process its run started with it: workers and what they fork,
executables and their process trees (a ``setsid`` grandchild too), inference servers.
Real drivers run as subprocesses and get real signals; leftovers are found by a mark
unique to each test in their command lines, or by pid."""
import os
import random
import signal
import subprocess
import sys

import pytest

from ..conftest import wait_until

pytestmark = pytest.mark.timeout(180)

DRIVER = r'''
import os, sys, threading, time
import rhapsody_graph as rhapsody

mark, pids = sys.argv[1], sys.argv[2]


@rhapsody.task
def python_node(mark, pids):
    import subprocess
    helper = subprocess.Popen(["sleep", mark])  # a helper the node forks
    with open(os.path.join(pids, "worker"), "w") as f:
        f.write(f"{os.getpid()} {helper.pid}")
    time.sleep(600)


def note_server(session, model, path):
    """Write ``model``'s server pid to ``path`` once it answers."""
    while True:
        service = session.backends["inference"].services.running.get(model)
        if service is not None and service.client is not None:
            with open(path + ".log", "w") as f:  # its log, which the watchdog removes
                f.write(service.server.log)
            with open(path, "w") as f:
                f.write(str(service.server.pid))
            return
        time.sleep(0.05)


if __name__ == "__main__":
    program = rhapsody.executable(
        ["sh", "-c", f"setsid sleep {mark} & echo $$ $! > {pids}/executable; exec sleep {mark}"])
    nodes = [python_node(mark, pids), program]
    session = rhapsody.api.get_session()
    if "ai" in sys.argv[3:]:  # and an AI node, whose server is started for it
        rhapsody.model("smollm2", engine="llama_cpp", path=rhapsody.smollm2_path())
        nodes.append(rhapsody.ai("Write a very long story about a dragon.", model="smollm2",
                                 max_tokens=4096))
        threading.Thread(target=note_server, args=(session, "smollm2", f"{pids}/server"),
                         daemon=True).start()
    if "fork-helper" in sys.argv[3:]:  # a process forked from the driver once it runs
        import multiprocessing
        futures = session.submit(nodes)
        while not os.path.exists(f"{pids}/worker"):
            time.sleep(0.02)
        helper = multiprocessing.get_context("fork").Process(target=time.sleep, args=(600,))
        helper.start()
        with open(f"{pids}/helper", "w") as f:
            f.write(str(helper.pid))
        nodes = futures
    rhapsody.compute(*nodes)
'''


def marked(mark: str) -> set:
    """Pids of live processes whose command line holds ``mark``."""
    found = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    if mark.encode() in f.read():
                        found.add(int(name))
            except OSError:
                pass
    return found


def alive(pids) -> set:
    return {p for p in pids if os.path.exists(f"/proc/{p}")
            and open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"}



def run_and_kill(tmp_path, sig: int, files, *extra: str):
    """Start a driver, wait until each of ``files`` holds pids, send it ``sig``;
    return (its exit code, the mark of its processes, the pids written)."""
    mark = f"3600.{random.randrange(10**6):06d}"
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    driver = subprocess.Popen([sys.executable, str(script), mark, str(tmp_path), *extra],
                              stdin=subprocess.DEVNULL)
    try:
        ready = lambda: all((tmp_path / f).exists() and (tmp_path / f).read_text().strip()
                            for f in files)
        assert wait_until(ready, 150), "the run never got going"
        pids = {int(p) for f in files for p in (tmp_path / f).read_text().split()}
        assert marked(mark) and alive(pids) == pids
        driver.send_signal(sig)
        code = driver.wait(timeout=60)
    finally:
        if driver.poll() is None:
            driver.kill()
    return code, mark, pids


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 128 + signal.SIGTERM),
                                       (signal.SIGKILL, -signal.SIGKILL)])
def test_a_killed_driver_leaves_no_worker_executable_or_grandchild(tmp_path, sig, code):
    exit_code, mark, pids = run_and_kill(tmp_path, sig, ["worker", "executable"])
    assert exit_code == code
    assert wait_until(lambda: not marked(mark) and not alive(pids), 20), \
        f"left behind: {sorted(marked(mark) | alive(pids))}"


def test_a_sigkilled_driver_that_forked_a_helper_still_takes_its_run_with_it(tmp_path):
    """The forked helper holds a copy of everything the driver had open (the pipe to
    its watchdog among them): its death must be seen all the same."""
    exit_code, mark, pids = run_and_kill(tmp_path, signal.SIGKILL,
                                         ["worker", "executable", "helper"], "fork-helper")
    helper = int((tmp_path / "helper").read_text())
    try:
        assert exit_code == -signal.SIGKILL
        ours = lambda: (marked(mark) | alive(pids)) - {helper}  # its command line is the driver's
        assert wait_until(lambda: not ours(), 20), f"left behind: {sorted(ours())}"
        assert alive({helper}), "the user's own process is not the run's to kill"
    finally:
        os.kill(helper, signal.SIGKILL)


def test_an_inference_server_and_its_log_go_with_a_sigkilled_driver(tmp_path):
    exit_code, mark, pids = run_and_kill(tmp_path, signal.SIGKILL,
                                         ["worker", "executable", "server"], "ai")
    log = (tmp_path / "server.log").read_text()
    assert exit_code == -signal.SIGKILL
    assert wait_until(lambda: not marked(mark) and not alive(pids), 20), \
        f"left behind: {sorted(marked(mark) | alive(pids))}"
    assert wait_until(lambda: not os.path.exists(log), 20), f"left behind: {log}"
