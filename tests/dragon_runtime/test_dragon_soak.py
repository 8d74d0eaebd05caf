"""Soak on the real Dragon runtime: 200 mixed nodes (placed Python nodes, executables,
joins) with 5 % random failures and 1 % worker kills finish with exact accounting and
a full ledger; the launch that runs it checks that no Dragon process is left
(the smaller Dragon counterpart of tests/faults/test_soak.py).

The nodes ask for a core (``cpus=1``), so they run in worker processes of their own
(``batch.process``), which a kill takes away. A node that SIGKILLs a Batch *pool*
worker (an unplaced node, ``batch.function``) takes that worker from Batch for good
(dragonhpc 0.15 does not replace it): once every pool worker is gone, function calls
never start and fail after ``start_timeout``."""
import os
import random
import signal

import pytest

import rhapsody_graph as rhapsody

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

NODES = 200
JOIN = 20  # nodes per join


def work(i, fate, log):
    """Succeed, raise, or SIGKILL its own process, as ``fate`` says; log every start."""
    with open(log, "a") as f:
        f.write(f"{i}\n")
    if fate == "fail":
        raise ValueError(f"node {i} failed on purpose")
    if fate == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    return i


def total(values):
    return sum(values)


def test_mixed_placed_nodes_with_failures_and_worker_kills(dragon_backend, tmp_path):
    rng = random.Random(203)
    fates = [rng.choices(["ok", "fail", "kill"], weights=[94, 5, 1])[0] for _ in range(NODES)]
    assert "kill" in fates and "fail" in fates
    log = str(tmp_path / "starts")
    step = rhapsody.task(work, cpus=1)
    nodes = [step(i, fate, log) for i, fate in enumerate(fates)]
    joins = [rhapsody.task(total)(nodes[k:k + JOIN]) for k in range(0, NODES, JOIN)]
    programs = [rhapsody.executable(["true"]) for _ in range(10)]
    with pytest.warns(RuntimeWarning, match="node\\(s\\) failed"):
        got, sums, ran = rhapsody.compute(nodes, joins, programs, backend=dragon_backend,
                                          on_error="continue")
    assert dragon_backend.ledger.idle()
    for i, (fate, value) in enumerate(zip(fates, got)):
        if fate == "ok":
            assert value == i
        elif fate == "fail":
            assert isinstance(value, ValueError)
        else:
            assert isinstance(value, rhapsody.WorkerDiedError)
    for k, value in enumerate(sums):
        chunk = fates[k * JOIN:(k + 1) * JOIN]
        if all(f == "ok" for f in chunk):
            assert value == sum(range(k * JOIN, k * JOIN + JOIN))
        else:
            assert isinstance(value, Exception)
    assert all(r.returncode == 0 for r in ran)
    counts = {}
    for i in map(int, open(log).read().split()):
        counts[i] = counts.get(i, 0) + 1
    # exactly once, but a killed worker's node runs again once (an infrastructure failure)
    assert all(counts.get(i) == (2 if fate == "kill" else 1) for i, fate in enumerate(fates))
