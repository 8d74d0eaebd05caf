"""Shared fixtures: declared inventories, so GPU placement is checked on any machine."""
import os
import time

import pytest

import rhapsody_graph as rhapsody
from tests.reaper import descendants


def child_pids(pid: int = None) -> set:
    """Live descendants of ``pid`` (default: this process, less its watchdog and what
    the watchdog started, the resource tracker its workers share: one each per
    driver, for the driver's life), from /proc."""
    if pid is None:
        from rhapsody_graph.backends.watchdog import watchdog_pid
        guard = watchdog_pid()
        return descendants(os.getpid()) - ({guard} | descendants(guard) if guard else set())
    return descendants(pid)


def wait_until(test, seconds: float) -> bool:
    """Whether ``test()`` came true within ``seconds`` (checked every 50 ms)."""
    deadline = time.monotonic() + seconds
    while not test():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


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
