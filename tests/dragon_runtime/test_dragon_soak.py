"""Soak on the real Dragon runtime: 200 mixed nodes (placed Python nodes, executables,
joins) with 5 % random failures and 1 % worker kills finish with exact accounting and
a full ledger; the launch that runs it checks that no Dragon process is left
(the smaller Dragon counterpart of tests/faults/test_soak.py).

The nodes ask for a core (``cpus=1``), so they run in worker processes of their own
(``batch.process``), which a kill takes away. A node that SIGKILLs a Batch *pool*
worker (an unplaced node, ``batch.function``) takes that worker from Batch for good
(dragonhpc 0.15 does not replace it): once every pool worker is gone, function calls
never start and fail after ``start_timeout``."""
import pytest

import rhapsody_graph as rhapsody

from ..faults.test_soak import check_accounting, fates_of, total, work

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

NODES = 200
JOIN = 20  # nodes per join


def test_mixed_placed_nodes_with_failures_and_worker_kills(dragon_backend, tmp_path):
    fates = fates_of(203, NODES)
    log = str(tmp_path / "starts")
    step = rhapsody.task(work, cpus=1)
    nodes = [step(i, fate, log) for i, fate in enumerate(fates)]
    joins = [rhapsody.task(total)(nodes[k:k + JOIN]) for k in range(0, NODES, JOIN)]
    programs = [rhapsody.executable(["true"]) for _ in range(10)]
    with pytest.warns(RuntimeWarning, match="node\\(s\\) failed"):
        values = rhapsody.compute(nodes, joins, programs, backend=dragon_backend,
                                  on_error="continue")
    assert dragon_backend.ledger.idle()
    check_accounting(fates, *values, log, join=JOIN)
