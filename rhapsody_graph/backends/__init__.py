"""Backends lower a placed node to a real execution; see :mod:`.base` for the protocol."""
from .base import Backend, Call, Lease
from .local import LocalBackend

__all__ = ["Backend", "Call", "Lease", "LocalBackend"]
