"""``LocalBackend(start_method="fork")``: workers forked from one template, a copy of the
driver taken while it runs one thread. Each test runs a real driver program in its
own interpreter (a test process has other threads, and a fork must be taken in a
process that has none), most of them under the reaper, which reports any process
the driver started that outlived it."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest

import rhapsody_graph as rhapsody
from tests import reaper

from ..conftest import wait_until
from ..faults.test_driver_death import alive, marked

pytestmark = pytest.mark.timeout(120)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_driver(tmp_path, body: str, *args: str) -> str:
    """Run ``body`` as a driver script under the reaper; its output, once it exited 0
    and left nothing behind."""
    script = tmp_path / "driver.py"
    script.write_text("import os, sys, time, threading, warnings\n"
                      "import rhapsody_graph as rhapsody\n" + textwrap.dedent(body))
    code, out = reaper.run([sys.executable, str(script), *args], grace=10, timeout=90,
                           cwd=ROOT, stdin=subprocess.DEVNULL)
    assert code == 0, out
    assert reaper.left_behind(out) == reaper.NONE_LEFT, out
    return out


def test_forked_workers_are_copies_of_the_driver_made_by_one_template(tmp_path):
    out = run_driver(tmp_path, """
        STATE = {"set": "at import"}

        @rhapsody.task
        def where(i):
            print("printed by", i)
            return os.getpid(), os.getppid(), STATE["set"], sys.modules.get("fractions") is not None

        if __name__ == "__main__":
            import fractions  # imported by the driver only: a fork has it, a spawn would not
            STATE["set"] = "by the driver"
            print("once, before the fork")  # buffered (a pipe): a fork must not repeat it
            with rhapsody.LocalBackend(cpus=2, start_method="fork") as backend:
                got = rhapsody.compute([where(i) for i in range(8)], backend=backend)[0]
                template = backend._forker.pid
            assert {ppid for _, ppid, _, _ in got} == {template}, got
            assert template != os.getpid() and os.getpid() not in {p for p, _, _, _ in got}
            assert {s for _, _, s, _ in got} == {"by the driver"}, got
            assert all(m for _, _, _, m in got), got
            print("ok", len({p for p, _, _, _ in got}))
    """)
    assert out.count("once, before the fork") == 1, out
    assert out.count("printed by") == 8, out  # two workers' lines may interleave
    assert "ok " in out


def test_a_driver_that_runs_threads_spawns_its_workers_and_says_why(tmp_path):
    out = run_driver(tmp_path, """
        @rhapsody.task
        def parent():
            return os.getppid()

        if __name__ == "__main__":
            stop = threading.Event()
            threading.Thread(target=stop.wait).start()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                with rhapsody.LocalBackend(cpus=2, start_method="fork") as backend:
                    assert parent().compute(backend=backend) == os.getpid()
                    assert backend.start_method == "spawn"
            stop.set()
            print("warned:", *[str(w.message) for w in caught])
    """)
    assert "warned: LocalBackend(start_method='fork'): its workers are spawned instead, " \
           "because the driver runs 2 Python threads" in out, out


def test_forked_workers_that_time_out_or_die_are_replaced_by_forks(tmp_path):
    out = run_driver(tmp_path, """
        @rhapsody.task(timeout=0.5)
        def sleepy():
            time.sleep(60)

        @rhapsody.task
        def die():
            os._exit(3)

        @rhapsody.task
        def parent():
            return os.getppid()

        if __name__ == "__main__":
            with rhapsody.LocalBackend(cpus=1, start_method="fork") as backend:
                template = backend.start(1)._forker.pid
                for node in (sleepy(), die()):
                    try:
                        node.compute(backend=backend)
                    except Exception as exc:
                        print(type(exc).__name__, exc)
                    assert parent().compute(backend=backend) == template
            print("ok")
    """)
    assert "NodeTimeoutError" in out and "died (exit code 3)" in out and "ok" in out, out


def test_a_graph_computed_inside_a_forked_worker_gets_its_own_backend(tmp_path):
    out = run_driver(tmp_path, """
        @rhapsody.task
        def double(x):
            return 2 * x

        @rhapsody.task
        def outer():
            return double(21).compute(), os.getpid()

        if __name__ == "__main__":
            backend = rhapsody.LocalBackend(cpus=1, start_method="fork")
            with rhapsody.Session(backend):  # a `with` session is the driver's, not the fork's
                value, worker = outer().compute()
            backend.shutdown()
            assert value == 42 and worker != os.getpid()
            print("ok")
    """)
    assert "ok" in out, out


def test_a_sigkilled_driver_takes_its_template_forked_workers_and_their_children(tmp_path):
    mark = f"3600.{os.getpid()}"
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent("""
        import os, subprocess, sys, time
        import rhapsody_graph as rhapsody

        @rhapsody.task
        def hold(mark, path):
            helper = subprocess.Popen(["sleep", mark])
            with open(path, "w") as f:
                f.write(f"{os.getpid()} {os.getppid()} {helper.pid}")
            time.sleep(600)

        if __name__ == "__main__":
            backend = rhapsody.LocalBackend(cpus=1, start_method="fork")
            hold(sys.argv[1], sys.argv[2]).compute(backend=backend)
    """))
    pids_file = tmp_path / "pids"
    driver = subprocess.Popen([sys.executable, str(script), mark, str(pids_file)], cwd=ROOT,
                              stdin=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: pids_file.exists() and pids_file.read_text().strip(), 60)
        pids = {int(p) for p in pids_file.read_text().split()}
        assert len(pids) == 3 and alive(pids) == pids and driver.pid not in pids
        driver.send_signal(signal.SIGKILL)
        assert driver.wait(timeout=30) == -signal.SIGKILL
    finally:
        if driver.poll() is None:
            driver.kill()
    assert wait_until(lambda: not alive(pids) and not marked(mark), 20), \
        f"left behind: {sorted(alive(pids) | marked(mark))}"


def test_a_start_method_it_does_not_know_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"start_method must be one of 'spawn', 'fork', "
                                         r"got 'forkserver'"):
        rhapsody.LocalBackend(start_method="forkserver")
