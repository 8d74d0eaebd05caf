"""A node's timeout (or cancel) stops what the node started, not only its own process
group: a grandchild that left the group with ``setsid``, and the workers and programs
of a ``compute()`` the node ran itself (real processes, found by pid)."""
import subprocess
import time

import pytest

import rhapsody_graph as rhapsody

from ..test_scheduler import still_alive

pytestmark = pytest.mark.timeout(120)


def escape_and_wait(path):
    """A Python node that starts a process in a session of its own, then hangs."""
    child = subprocess.Popen(["sleep", "300"], start_new_session=True)
    with open(path, "w") as f:
        f.write(str(child.pid))
    time.sleep(300)


def nested_compute(path):
    """A Python node that runs a graph itself: an executable that hangs."""
    program = rhapsody.executable(["sh", "-c", f"echo $$ > {path}; exec sleep 300"])
    return program.compute()


def pid_in(path) -> int:
    with open(path) as f:
        return int(f.read().split()[0])


@pytest.fixture
def backend():
    with rhapsody.LocalBackend(cpus=2) as b:
        yield b


def test_a_timed_out_executable_takes_its_setsid_grandchild_with_it(backend, tmp_path):
    path = tmp_path / "pid"
    node = rhapsody.executable(["sh", "-c", f"setsid sleep 300 & echo $! > {path}; exec sleep 300"],
                               timeout=2)
    with pytest.raises(rhapsody.NodeTimeoutError):
        node.compute(backend=backend)
    assert not still_alive([pid_in(path)], 10), "the setsid grandchild outlived the timeout"


def test_a_timed_out_python_node_takes_the_process_it_started_in_its_own_session(backend,
                                                                                  tmp_path):
    path = tmp_path / "pid"
    with pytest.raises(rhapsody.NodeTimeoutError):
        rhapsody.task(timeout=2)(escape_and_wait)(str(path)).compute(backend=backend)
    assert not still_alive([pid_in(path)], 10), "the node's own-session child outlived it"


def test_a_timed_out_node_that_computes_inside_stops_its_inner_run(backend, tmp_path):
    path = tmp_path / "pid"
    with pytest.raises(rhapsody.NodeTimeoutError):
        rhapsody.task(timeout=3)(nested_compute)(str(path)).compute(backend=backend)
    assert not still_alive([pid_in(path)], 10), "the inner run's program outlived the node"
