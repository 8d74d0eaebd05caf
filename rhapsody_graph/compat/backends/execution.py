"""``rhapsody.backends.execution``: the execution backends under their RHAPSODY names."""
from . import (ConcurrentExecutionBackend, DaskExecutionBackend, DragonExecutionBackend,
               DragonExecutionBackendV3)

__all__ = ["ConcurrentExecutionBackend", "DragonExecutionBackendV3", "DragonExecutionBackend",
           "DaskExecutionBackend"]
