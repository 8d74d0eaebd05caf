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


PREAMBLE = """import os, sys, time, threading, warnings
import rhapsody_graph as rhapsody


@rhapsody.task
def parent():
    return os.getppid()
"""


def run_driver(tmp_path, body: str, *args: str, **env: str) -> str:
    """Run ``body`` as a driver script under the reaper, with ``env`` added to its
    environment; its output, once it exited 0 and left nothing behind."""
    script = tmp_path / "driver.py"
    script.write_text(PREAMBLE + textwrap.dedent(body))
    code, out = reaper.run([sys.executable, str(script), *args], grace=10, timeout=90,
                           cwd=tmp_path, stdin=subprocess.DEVNULL, env={**os.environ, **env})
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
           "because the driver runs 1 other Python thread(s) (Thread-1 (wait); a session's " \
           "own are named rhapsody-*)" in out, out


def test_forked_workers_that_time_out_or_die_are_replaced_by_forks(tmp_path):
    out = run_driver(tmp_path, """
        @rhapsody.task(timeout=0.5)
        def sleepy():
            time.sleep(60)

        @rhapsody.task
        def die():
            os._exit(3)

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


def test_a_worker_forked_after_the_driver_moved_gets_its_directory_umask_and_environment(
        tmp_path):
    out = run_driver(tmp_path, """
        @rhapsody.task
        def seen():
            mask = os.umask(0)
            return os.getcwd(), oct(mask), len(os.environ.get("BIG", "")), "GONE" in os.environ

        if __name__ == "__main__":
            os.environ["GONE"] = "1"
            backend = rhapsody.LocalBackend(cpus=1, start_method="fork").start(1)
            os.makedirs("moved", exist_ok=True)
            os.chdir("moved")
            os.umask(0o077)
            os.environ["BIG"] = "x" * 300_000  # more than one exec could take
            del os.environ["GONE"]
            backend.abort()  # its worker goes: the next one is forked from now on
            print("seen", seen().compute(backend=backend))
            backend.shutdown()
    """)
    assert f"seen ('{tmp_path}/moved', '0o77', 300000, False)" in out, out


def test_a_forked_worker_shares_the_drivers_files_and_holds_none_of_its_pipes(tmp_path):
    (tmp_path / "drvlib.py").write_text(textwrap.dedent("""
        import logging, os
        LOG = open("driver.log", "a")  # opened at import: by the driver, and a spawn
        HELD = os.pipe()  # a pipe the driver holds (the lowest free descriptors)

        def use(i):
            logging.getLogger("t").warning("logged by %d", i)
            LOG.write(f"written by {i}\\n")
            LOG.flush()
            return os.readlink(f"/proc/self/fd/{HELD[0]}")
    """))
    out = run_driver(tmp_path, """
        import logging
        import drvlib

        if __name__ == "__main__":
            logging.basicConfig(filename="handler.log")
            with rhapsody.LocalBackend(cpus=2, start_method="fork") as backend:
                held = rhapsody.compute([rhapsody.task(drvlib.use)(i) for i in range(6)],
                                        backend=backend)[0]
            print("held", set(held))
            print("written", sorted(open("driver.log").read().split("\\n")))
            print("logged", len(open("handler.log").read().splitlines()))
    """)
    assert "held {'/dev/null'}" in out, out
    assert "written ['', " + ", ".join(f"'written by {i}'" for i in range(6)) + "]" in out, out
    assert "logged 6" in out, out


def test_a_backend_dropped_without_shutdown_leaves_no_template(tmp_path):
    out = run_driver(tmp_path, """
        import gc
        if __name__ == "__main__":
            templates = []
            for _ in range(3):
                backend = rhapsody.LocalBackend(cpus=1, start_method="fork").start(1)
                templates.append(backend._forker.pid)
                del backend
                gc.collect()
            print("left", [p for p in templates if os.path.exists(f"/proc/{p}")])
    """)
    assert "left []" in out, out


def test_a_lost_template_says_so_and_its_backend_spawns_from_then_on(tmp_path):
    out = run_driver(tmp_path, """
        import json, signal

        @rhapsody.task
        def die_where_forked(driver):
            if os.getppid() != driver:  # forked: its template is gone
                os._exit(7)
            return "rerun on a spawned worker"

        if __name__ == "__main__":
            warnings.simplefilter("always")
            backend = rhapsody.LocalBackend(cpus=1, start_method="fork")
            with rhapsody.Session(backend, run_log="run.jsonl"):
                os.kill(backend.start(1)._forker.pid, signal.SIGKILL)
                print(die_where_forked(os.getpid()).compute(), backend.start_method)
            backend.shutdown()
            for line in open("run.jsonl"):
                print("attempt", json.loads(line)["outcome"], json.loads(line).get("error"))
    """)
    assert "rerun on a spawned worker spawn" in out, out
    assert "its workers are spawned from now on" in out, out
    assert "attempt died WorkerDiedError" in out and "its exit status was lost: its template" in out, out


def test_a_driver_running_threads_the_threading_module_does_not_know_is_not_forked(tmp_path):
    out = run_driver(tmp_path, """
        import _thread

        if __name__ == "__main__":
            _thread.start_new_thread(time.sleep, (60,))  # as OpenMP's pool: not a threading.Thread
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                with rhapsody.LocalBackend(cpus=1, start_method="fork") as backend:
                    print("spawned", parent().compute(backend=backend) == os.getpid())
            print("warned:", *[str(w.message) for w in caught])
    """)
    assert "spawned True" in out and "the driver runs 1 thread(s) the threading module " \
                                      "does not know" in out, out


def test_a_refused_fork_raised_as_an_error_leaves_the_backend_free_to_run(tmp_path):
    out = run_driver(tmp_path, """
        if __name__ == "__main__":
            warnings.simplefilter("error")  # as under pytest's filterwarnings = error
            stop = threading.Event()
            threading.Thread(target=stop.wait).start()
            backend = rhapsody.LocalBackend(cpus=1, start_method="fork")
            try:
                parent().compute(backend=backend)
            except RuntimeWarning as warning:
                print("raised:", str(warning)[:60])
            print("then spawned", parent().compute(backend=backend) == os.getpid())
            backend.shutdown()
            stop.set()
    """)
    assert "raised: LocalBackend(start_method='fork'): its workers are spawned" in out, out
    assert "then spawned True" in out, out


def test_a_forked_worker_shares_the_drivers_tracker_and_ends_with_its_threads_and_handlers(
        tmp_path):
    out = run_driver(tmp_path, """
        import atexit, multiprocessing
        from multiprocessing import shared_memory

        @rhapsody.task
        def leave_things(log):
            def later():
                time.sleep(0.2)
                with open(log, "a") as f:
                    f.write("non-daemon thread ended\\n")
            threading.Thread(target=later).start()
            atexit.register(lambda: open(log, "a").write("handler of the worker ran\\n"))
            segment = shared_memory.SharedMemory(create=True, size=4096)  # tracked
            segment.close()
            segment.unlink()
            with open(f"/proc/self/task/{threading.get_native_id()}/children") as f:
                kids = [open(f"/proc/{k}/cmdline").read() for k in f.read().split()]
            return any("resource_tracker" in k for k in kids)  # one of its own?

        if __name__ == "__main__":
            with multiprocessing.get_context("spawn").Pool(1) as pool:  # the driver's tracker
                pool.map(abs, [-1])
            atexit.register(lambda: print("the driver's handler ran in", os.getpid()))
            with rhapsody.LocalBackend(cpus=1, start_method="fork") as backend:
                own = leave_things(os.path.abspath("exits.log")).compute(backend=backend)
            print("a tracker of its own", own)
            print("log", sorted(open("exits.log").read().splitlines()))
    """)
    assert "a tracker of its own False" in out, out  # it shares the driver's
    assert "log ['handler of the worker ran', 'non-daemon thread ended']" in out, out
    assert out.count("the driver's handler ran in") == 1, out  # in the driver only


def test_a_forked_worker_is_timed_out_and_reaped_with_the_driver_holding_1100_files(tmp_path):
    out = run_driver(tmp_path, """
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and hard < 2048:
            print("skip: at most", hard, "files"); sys.exit(0)
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), hard))

        @rhapsody.task(timeout=0.5)
        def slow():
            time.sleep(60)

        if __name__ == "__main__":
            held = [open(__file__) for _ in range(1100)]  # descriptors past select()'s 1024
            with rhapsody.LocalBackend(cpus=1, start_method="fork") as backend:
                try:
                    slow().compute(backend=backend)
                except rhapsody.NodeTimeoutError:
                    print("timed out")
                print("then", rhapsody.task(abs)(-3).compute(backend=backend))
    """)
    assert ("timed out" in out and "then 3" in out) or "skip:" in out, out


def test_what_a_forked_worker_left_in_its_group_ends_with_it_at_shutdown(tmp_path):
    out = run_driver(tmp_path, """
        @rhapsody.task
        def leave_a_helper():
            pid = os.fork()  # no exec, no session of its own: in the worker's group
            if pid == 0:
                time.sleep(600)
                os._exit(0)
            return pid

        if __name__ == "__main__":
            with rhapsody.LocalBackend(cpus=1, start_method="fork") as backend:
                helper = leave_a_helper().compute(backend=backend)
            try:  # killed: at most a zombie until its new parent reaps it
                state = open(f"/proc/{helper}/stat").read().rsplit(")", 1)[1].split()[0]
            except OSError:
                state = "gone"
            print("helper left", state not in ("Z", "gone"))
    """)
    assert "helper left False" in out, out  # and the reaper found nothing left


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
    driver = subprocess.Popen([sys.executable, str(script), mark, str(pids_file)], cwd=tmp_path,
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


def test_the_default_backend_forks_when_the_environment_says_so(tmp_path):
    out = run_driver(tmp_path, """
        if __name__ == "__main__":
            backend = rhapsody.api.get_backend()
            print("forked", parent().compute() == backend._forker.pid, backend.start_method)
    """, RHAPSODY_GRAPH_START_METHOD="fork")
    assert "forked True fork" in out, out


def test_a_start_method_it_does_not_know_is_refused_naming_it(monkeypatch):
    with pytest.raises(ValueError, match=r"start_method must be one of 'spawn', 'fork', "
                                         r"got 'forkserver'$"):
        rhapsody.LocalBackend(start_method="forkserver")
    monkeypatch.setenv("RHAPSODY_GRAPH_START_METHOD", "vfork")
    with pytest.raises(ValueError, match=r"got 'vfork' \(\$RHAPSODY_GRAPH_START_METHOD\)"):
        rhapsody.LocalBackend()
