"""RHAPSODY 0.6's user-facing API on rhapsody_graph: a RHAPSODY program runs with only
its imports changed.

============================================  ==================================================
RHAPSODY                                      rhapsody_graph
============================================  ==================================================
``import rhapsody``                           ``import rhapsody_graph.compat as rhapsody``
``from rhapsody.api import ...``              ``from rhapsody_graph.compat.api import ...``
``from rhapsody.backends import ...``         ``from rhapsody_graph.compat.backends import ...``
``from rhapsody.backends.execution ...``      ``from rhapsody_graph.compat.backends.execution ...``
``from rhapsody.backends.inference ...``      ``from rhapsody_graph.compat.backends.inference ...``
============================================  ==================================================

Every task becomes one node of a :class:`rhapsody_graph.Session` over the mapped
backends (see :mod:`.backends`), so the ledger places it and its future carries where it
ran. See ``docs/rhapsody.md`` for what changes and what is better.
"""
from . import backends
from .api import AITask, BaseTask, ComputeTask, Session, TaskState

__all__ = ["Session", "ComputeTask", "AITask", "BaseTask", "TaskState", "backends"]
