"""Runs only under the Dragon launcher (``dragon python -m pytest tests/dragon_runtime``).

One :class:`DragonBackend` (one Batch runtime, ~5 s to start here) serves every
scenario of the session; each scenario is bounded by its own timeout.
"""
import multiprocessing

import dragon  # noqa: F401  (must come before the start method is set)
import pytest

import rhapsody_graph as rhapsody

multiprocessing.set_start_method("dragon", force=True)


@pytest.fixture(scope="session")
def dragon_backend():
    """The allocation's hosts, with 4 GPU ids declared on each (this machine has none)."""
    backend = rhapsody.DragonBackend(gpus=4)
    backend.start()
    yield backend
    backend.shutdown()
