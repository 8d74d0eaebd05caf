"""First result of a one-node graph in a fresh interpreter (bar: <= 0.5 s after import).

The timed figure is the whole ``python -c`` process; extra_info also carries what the
script itself measured: the import alone, and import to first value (the bar).
"""
import statistics

import pytest

import workloads as w
from conftest import ROUNDS

pytestmark = pytest.mark.timeout(600)


@pytest.mark.parametrize("engine", w.STARTUP_ENGINES)
def test_first_result(benchmark, engine):
    benchmark.group = "first result after import (one node, fresh process)"
    seen = []

    def once():
        r = w.startup(engine)
        seen.append(r)
        return r

    benchmark.pedantic(once, rounds=ROUNDS, iterations=1)
    for k in ("import_s", "first_value_s"):
        benchmark.extra_info[f"{k}_median"] = round(statistics.median(r[k] for r in seen), 4)
