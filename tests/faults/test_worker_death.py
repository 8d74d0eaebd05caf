"""A worker's death is noticed by its exit, not by its pipe closing: a child it forked
that still holds the pipe must not delay (or, if it never exits, hang) the run."""
import os
import signal
import subprocess

import pytest

import rhapsody_graph as rhapsody

from ..test_scheduler import still_alive


def note_and_die(path, child):
    with open(path, "a") as f:
        f.write(f"{child}\n")
    os.kill(os.getpid(), signal.SIGKILL)


def fork_and_die(path):
    note_and_die(path, subprocess.Popen(["sleep", "600"]).pid)  # inherits the worker's pipes


def fork_and_die_in_rank_one(path):
    """Rank 1 forks a child (which holds every descriptor it had: its result pipe too),
    then dies; rank 0 returns."""
    if os.environ["RANK"] != "1":
        return 0
    child = os.fork()
    if child == 0:
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
        os.execvp("sleep", ["sleep", "600"])  # holds the pipe, as a forked helper does
    note_and_die(path, child)


@pytest.mark.timeout(60)  # a death seen only when the pipe closes would wait 600 s
@pytest.mark.parametrize("make, match", [
    (lambda path: rhapsody.task(fork_and_die)(path), "the worker process .*died .killed by SIGKILL"),
    (lambda path: rhapsody.task(ranks=2, retries=0)(fork_and_die_in_rank_one)(path),
     "rank 1 of node .*died .killed by SIGKILL"),
], ids=["worker", "rank"])
def test_a_process_killed_while_its_child_holds_its_pipe_fails_its_node_at_once(
        tmp_path, make, match):
    path = tmp_path / "children"
    with rhapsody.LocalBackend(cpus=2) as backend:
        with pytest.raises(rhapsody.WorkerDiedError, match=match):
            make(str(path)).compute(backend=backend)
        assert rhapsody.task(abs)(-3).compute(backend=backend) == 3  # a fresh worker
        assert backend.ledger.idle()
    children = [int(p) for p in path.read_text().split()]
    assert not still_alive(children, 10), "the dead process's children outlived it"
