"""End to end on 2 workers: 5,000 independent no-ops, a 1,000-step chain, a binary
reduction over 1,024 leaves (2,047 tasks). Engines are started and warmed once per
session (see conftest.py); each round builds the graph (or submits) and gets the values.

Bars (issue 3): <= 100 us per node (independent); <= 150 us per hop (chain).
"""
import pytest

import workloads as w
from conftest import ROUNDS, per_unit

pytestmark = pytest.mark.timeout(600)


def _bench(benchmark, engines, workload, engine):
    fn, expected, size, unit = w.RUNS[workload]
    benchmark.group = f"{workload} ({size})"
    value = benchmark.pedantic(fn, args=(engine, engines, size), rounds=ROUNDS,
                               iterations=1, warmup_rounds=1)
    assert value == expected(size)
    per_unit(benchmark, w.run_tasks(workload, size), unit)


@pytest.mark.parametrize("engine", w.RUN_ENGINES)
def test_independent(benchmark, engines, engine):
    _bench(benchmark, engines, "independent", engine)


@pytest.mark.parametrize("engine", w.RUN_ENGINES)
def test_chain(benchmark, engines, engine):
    _bench(benchmark, engines, "chain", engine)


@pytest.mark.parametrize("engine", w.RUN_ENGINES)
def test_reduction(benchmark, engines, engine):
    _bench(benchmark, engines, "reduction", engine)
