"""Soak: 20,000 mixed nodes (Python nodes, a few executables, joins) with 5 % random
failures and 1 % worker kills finish with exact accounting, a full ledger and no
process left (marker ``slow``: ``python -m pytest -m slow tests/faults``)."""
import os
import random
import signal

import pytest

import rhapsody_graph as rhapsody

from ..conftest import child_pids

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

NODES = 20_000


def work(i, fate, log):
    """Succeed, raise, or SIGKILL its own worker, as ``fate`` says; log every start."""
    with open(log, "a") as f:
        f.write(f"{i}\n")
    if fate == "fail":
        raise ValueError(f"node {i} failed on purpose")
    if fate == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    return i


def total(values):
    return sum(values)


def fates_of(seed: int, n: int) -> list:
    """``n`` fates: 94 % ok, 5 % fail, 1 % kill its worker (at least one of each)."""
    rng = random.Random(seed)
    fates = [rng.choices(["ok", "fail", "kill"], weights=[94, 5, 1])[0] for _ in range(n)]
    assert "kill" in fates and "fail" in fates
    return fates


def check_accounting(fates, got, sums, ran, log, join):
    """Every value, failure and join as the fates say; every node started exactly once,
    but a killed worker's node once more (an infrastructure failure is retried)."""
    for i, (fate, value) in enumerate(zip(fates, got)):
        if fate == "ok":
            assert value == i
        elif fate == "fail":
            assert isinstance(value, ValueError)
        else:
            assert isinstance(value, rhapsody.WorkerDiedError)
    for k, value in enumerate(sums):
        chunk = fates[k * join:(k + 1) * join]
        if all(f == "ok" for f in chunk):
            assert value == sum(range(k * join, k * join + join))
        else:
            assert isinstance(value, Exception)
    assert all(r.returncode == 0 for r in ran)
    counts = {}
    for i in map(int, open(log).read().split()):
        counts[i] = counts.get(i, 0) + 1
    assert all(counts.get(i) == (2 if fate == "kill" else 1) for i, fate in enumerate(fates))


def test_twenty_thousand_mixed_nodes_with_failures_and_worker_kills(tmp_path):
    fates = fates_of(20_000, NODES)
    log = str(tmp_path / "starts")
    before = child_pids()
    with rhapsody.LocalBackend(cpus=2) as backend:
        step = rhapsody.task(work)
        nodes = [step(i, fate, log) for i, fate in enumerate(fates)]
        joins = [rhapsody.task(total)(nodes[k:k + 100]) for k in range(0, NODES, 100)]
        programs = [rhapsody.executable(["true"]) for _ in range(20)]
        with pytest.warns(RuntimeWarning, match="node\\(s\\) failed"):
            values = rhapsody.compute(nodes, joins, programs, backend=backend,
                                      on_error="continue")
        assert backend.ledger.idle()
    check_accounting(fates, *values, log, join=100)
    assert not child_pids() - before
