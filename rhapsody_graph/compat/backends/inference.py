"""``rhapsody.backends.inference``: the inference backend under its RHAPSODY name."""
from . import DragonVllmInferenceBackend

__all__ = ["DragonVllmInferenceBackend"]
