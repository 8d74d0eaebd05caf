"""RHAPSODY 0.6's user-facing API on rhapsody_graph: a RHAPSODY program runs once its
imports are changed and the differences listed in ``docs/rhapsody.md`` are checked.

============================================  ==================================================
RHAPSODY                                      rhapsody_graph
============================================  ==================================================
``import rhapsody``                           ``import rhapsody_graph.compat as rhapsody``
``from rhapsody.api import ...``              ``from rhapsody_graph.compat.api import ...``
``from rhapsody.api.errors import ...``       ``from rhapsody_graph.compat.errors import ...``
``from rhapsody.backends import ...``         ``from rhapsody_graph.compat.backends import ...``
``from rhapsody.backends.constants ...``      ``from rhapsody_graph.compat.backends.constants ...``
``from rhapsody.backends.execution ...``      ``from rhapsody_graph.compat.backends.execution ...``
``from rhapsody.backends.inference ...``      ``from rhapsody_graph.compat.backends.inference ...``
============================================  ==================================================

Every task becomes one node of a :class:`rhapsody_graph.Session` over the mapped
backends (see :mod:`.backends`), so the ledger places it and its future carries where it
ran. See ``docs/rhapsody.md`` for what changes and what is better.
"""
from . import backends
from .api import AITask, BaseTask, ComputeTask, Session, TaskState
from .errors import (BackendError, ResourceError, RhapsodyError, SessionError,
                     TaskExecutionError, TaskValidationError)

#: the RHAPSODY release whose API this layer provides
__version__ = "0.6.0"

__all__ = ["__version__", "Session", "ComputeTask", "AITask", "BaseTask", "TaskState",
           "backends", "RhapsodyError", "BackendError", "TaskValidationError",
           "TaskExecutionError", "SessionError", "ResourceError"]
