"""rhapsody_graph on Dragon against raw Dragon Batch (issue 4), under the launcher::

    dragon python -m pytest benchmarks/test_dragon.py --benchmark-only -o addopts=""

Bars: >= 3x raw Batch throughput on 100 no-op nodes; <= 0.3x Batch-native per-hop
latency on a 20-step chain. ``benchmarks/dragon_compare.py`` prints the ratios.
"""
import os

import pytest

from conftest import ROUNDS, per_unit

if "DRAGON_MY_PUID" not in os.environ and "DRAGON_DEFAULT_PD" not in os.environ:
    pytest.skip("run under the Dragon launcher: dragon python -m pytest benchmarks/test_dragon.py",
                allow_module_level=True)

import multiprocessing  # noqa: E402

import dragon  # noqa: E402,F401

import dragon_workloads as dw  # noqa: E402
import rhapsody_graph as rhapsody  # noqa: E402

multiprocessing.set_start_method("dragon", force=True)
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def backend():
    b = rhapsody.DragonBackend().start()
    yield b
    b.shutdown()


@pytest.mark.parametrize("engine", ["dragon-batch", "rhapsody-dragon"])
@pytest.mark.parametrize("workload", sorted(dw.WORKLOADS))
def test_dragon(benchmark, backend, workload, engine):
    size, expected, runs = dw.WORKLOADS[workload]
    benchmark.group = f"dragon {workload} ({size})"
    value = benchmark.pedantic(runs[engine], args=(backend, size), rounds=ROUNDS,
                               iterations=1, warmup_rounds=1)
    assert value == expected
    per_unit(benchmark, size, "hop" if workload == "chain" else "node")
