"""Building and ordering a 100,000-node graph (10 levels x 10,000, 180,000 edges).

Bars (issue 3): construction <= 10 us per node; ordering <= 10 us per node.
"""
import gc

import pytest

import workloads as w
from conftest import GRAPH_ROUNDS, per_unit

pytestmark = pytest.mark.timeout(900)
NODES = w.LEVELS * w.WIDTH


def _collect():
    gc.collect()  # free the previous round's graph outside the timing


@pytest.mark.parametrize("engine", w.BUILD_ENGINES)
def test_build(benchmark, engine):
    benchmark.group = "build 100k nodes"
    out = benchmark.pedantic(w.build, args=(engine,), setup=_collect,
                             rounds=GRAPH_ROUNDS, iterations=1)
    assert len(out) == (1 if engine == "dict" else w.WIDTH)
    del out
    per_unit(benchmark, NODES, "node")


@pytest.mark.parametrize("engine", w.ORDER_ENGINES)
def test_order(benchmark, engine):
    benchmark.group = "order 100k nodes"
    graph_input = w.order_input(engine)
    n = benchmark.pedantic(w.order, args=(engine, graph_input), setup=_collect,
                           rounds=GRAPH_ROUNDS, iterations=1)
    assert n == NODES
    per_unit(benchmark, NODES, "node")
