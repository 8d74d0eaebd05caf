"""Doctests in docs/ and the package compare printed output exactly: no progress lines
from long runs there (tests that want a display ask for one)."""
import os

os.environ.setdefault("RHAPSODY_GRAPH_PROGRESS", "0")
