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


def test_twenty_thousand_mixed_nodes_with_failures_and_worker_kills(tmp_path):
    rng = random.Random(20_000)
    fates = [rng.choices(["ok", "fail", "kill"], weights=[94, 5, 1])[0] for _ in range(NODES)]
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
    got, sums, ran = values
    for i, (fate, value) in enumerate(zip(fates, got)):
        if fate == "ok":
            assert value == i
        elif fate == "fail":
            assert isinstance(value, ValueError)
        else:
            assert isinstance(value, rhapsody.WorkerDiedError)
    for k, value in enumerate(sums):
        chunk = fates[k * 100:(k + 1) * 100]
        expected = sum(range(k * 100, k * 100 + 100)) if all(f == "ok" for f in chunk) else None
        assert value == expected if expected is not None else isinstance(value, Exception)
    assert all(r.returncode == 0 for r in ran)
    starts = [int(line) for line in open(log).read().split()]
    counts = {}
    for i in starts:
        counts[i] = counts.get(i, 0) + 1
    # exactly once, but a killed worker's node runs again once (an infrastructure failure)
    assert all(counts.get(i) == (2 if fate == "kill" else 1) for i, fate in enumerate(fates))
    assert not child_pids() - before
