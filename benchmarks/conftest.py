"""Shared fixtures for the pytest-benchmark suite.

Run explicitly (plain ``python -m pytest`` never collects ``benchmarks/``: the
project's ``testpaths`` leaves it out)::

    python -m pytest benchmarks/ --benchmark-only

Per-node / per-hop figures are in each benchmark's ``extra_info`` (keep them with
``--benchmark-json=PATH``). ``-o addopts=""`` drops the project's
``--doctest-modules`` default (harmless here: these modules have no doctests).

Rounds are small so the suite fits in a few minutes on 2 cores; raise them with
``BENCH_ROUNDS=N`` (run workloads) and ``BENCH_GRAPH_ROUNDS=N`` (build / order).
"""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import workloads  # noqa: E402

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
GRAPH_ROUNDS = int(os.environ.get("BENCH_GRAPH_ROUNDS", "3"))


def pytest_report_header(config):
    return f"benchmarks: {workloads.describe()}"


@pytest.fixture(scope="session")
def engines():
    """Every run engine, started and warmed once for the whole session."""
    with workloads.Engines() as e:
        yield e


def per_unit(benchmark, count: int, unit: str) -> None:
    """Record median/min microseconds per ``unit`` in the benchmark's extra_info."""
    benchmark.extra_info["count"] = count
    benchmark.extra_info["unit"] = unit
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable
        return
    s = stats.stats
    benchmark.extra_info[f"us_per_{unit}_median"] = round(s.median / count * 1e6, 2)
    benchmark.extra_info[f"us_per_{unit}_min"] = round(s.min / count * 1e6, 2)
