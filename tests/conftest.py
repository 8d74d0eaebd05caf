"""Shared fixtures: declared inventories, so GPU placement is checked on any machine."""
import os
import time

import pytest

import rhapsody_graph as rhapsody


def child_pids(pid: int = None) -> set:
    """Live descendants of ``pid`` (default: this process, less its watchdog: one per
    driver, for the driver's life), from /proc."""
    if pid is None:
        from rhapsody_graph.backends.watchdog import watchdog_pid
        return _descendants(os.getpid()) - {watchdog_pid()}
    return _descendants(pid)


def wait_until(test, seconds: float) -> bool:
    """Whether ``test()`` came true within ``seconds`` (checked every 50 ms)."""
    deadline = time.monotonic() + seconds
    while not test():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _descendants(pid: int) -> set:
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except FileNotFoundError:
            continue
        for t in tasks:
            try:
                with open(f"/proc/{p}/task/{t}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except FileNotFoundError:
                continue
            for k in kids:
                if k not in found:
                    found.add(k)
                    todo.append(k)
    return found


@pytest.fixture(scope="module")
def gpu_backend():
    """2 real cores and 4 declared GPUs."""
    with rhapsody.LocalBackend(cpus=2, gpus=4) as backend:
        yield backend


@pytest.fixture(scope="module")
def two_hosts():
    """Two declared hosts of 2 cores and 2 GPUs each, run on this machine."""
    hosts = [rhapsody.Host("n0", cpus=2, gpus=2), rhapsody.Host("n1", cpus=2, gpus=2)]
    with rhapsody.LocalBackend(hosts=hosts) as backend:
        yield backend


UNDER_DRAGON = "DRAGON_MY_PUID" in os.environ or "DRAGON_DEFAULT_PD" in os.environ
# tests/dragon_runtime needs the Dragon launcher; tests/backends/test_dragon.py starts it
collect_ignore = [] if UNDER_DRAGON else ["dragon_runtime"]
