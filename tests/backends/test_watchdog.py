"""The watchdog removes the files a driver registered when the driver is killed."""
import os
import signal
import subprocess
import sys

from ..conftest import wait_until

DRIVER = '''
import os, sys
from rhapsody_graph.backends import watchdog
removed, kept = sys.argv[1:3]
for path in (removed, kept):
    open(path, "w").close()
    watchdog.remove_at_end(path)
watchdog.keep_file(kept)  # the driver dealt with this one itself
print(watchdog.watchdog_pid(), flush=True)
os.kill(os.getpid(), 9)
'''


def test_a_sigkilled_drivers_registered_file_is_removed_and_a_kept_one_stays(tmp_path):
    removed, kept = tmp_path / "a log with spaces.log", tmp_path / "kept.log"
    driver = subprocess.run([sys.executable, "-c", DRIVER, str(removed), str(kept)],
                            capture_output=True, text=True, timeout=60)
    assert driver.returncode == -signal.SIGKILL, driver.stderr
    guard = int(driver.stdout)
    assert wait_until(lambda: not os.path.exists(f"/proc/{guard}"), 20), "watchdog lives on"
    assert not removed.exists()
    assert kept.exists()


FORKED_AS_IT_DIES = '''
import os, sys, time
from rhapsody_graph.backends import watchdog
env = watchdog.marked(dict(os.environ))
child = os.fork()
if child == 0:  # between fork and exec when the driver dies: not marked until it execs
    time.sleep(0.1)
    os.execve("/bin/sleep", ["sleep", "600"], env)
print(child, flush=True)
os.kill(os.getpid(), 9)
'''


def test_a_program_forked_just_before_the_driver_was_sigkilled_dies_once_it_has_execd():
    # the watchdog looked once, before the program carried its marker, and ended
    driver = subprocess.run([sys.executable, "-c", FORKED_AS_IT_DIES], capture_output=True,
                            text=True, timeout=60)
    assert driver.returncode == -signal.SIGKILL, driver.stderr
    child = int(driver.stdout)

    def gone() -> bool:
        try:
            with open(f"/proc/{child}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            return True
    try:
        assert wait_until(gone, 20), "the program outlived its driver"
    finally:
        if not gone():
            os.kill(child, signal.SIGKILL)


def run_inner_daemon(pidfile):
    """A node that runs a graph itself, whose executable leaves a daemon; returns
    whether the daemon is gone once that inner run has ended."""
    import rhapsody_graph as rhapsody
    with rhapsody.LocalBackend(cpus=1) as inner:
        daemon = ("import subprocess; p = subprocess.Popen(['sleep', '600'], "  # (in a
                  f"start_new_session=True); open({pidfile!r}, 'w').write(str(p.pid))")  # session
        rhapsody.executable([sys.executable, "-c", daemon]).compute(backend=inner)  # of its own)
    daemon = int(open(pidfile).read())
    ended = wait_until(lambda: not os.path.exists(f"/proc/{daemon}")
                       or open(f"/proc/{daemon}/stat").read().rsplit(")", 1)[1].split()[0] == "Z", 20)
    if not ended:
        os.kill(daemon, signal.SIGKILL)
    return ended


def test_a_daemon_of_an_inner_runs_executable_dies_when_that_inner_run_ends(tmp_path):
    # inside a node, the end of a run compared only the outer part of the chained group
    # marker (outer/inner) with the inner one: its daemons lived until the outer worker
    import rhapsody_graph as rhapsody
    with rhapsody.LocalBackend(cpus=1) as b:
        assert rhapsody.task(run_inner_daemon)(str(tmp_path / "daemon")).compute(backend=b)


def test_a_group_marker_is_within_the_marks_it_extends_only():
    from rhapsody_graph.backends.watchdog import _within
    marks = {b"RHAPSODY_GROUP=a.1/b.2"}
    assert _within(b"RHAPSODY_GROUP=a.1/b.2", marks)
    assert _within(b"RHAPSODY_GROUP=a.1/b.2/c.3", marks)
    assert not _within(b"RHAPSODY_GROUP=a.1", marks)
    assert not _within(b"RHAPSODY_GROUP=a.1/b.22", marks)
