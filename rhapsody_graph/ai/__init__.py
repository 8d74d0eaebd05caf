"""AI nodes: prompts to an OpenAI-compatible inference service, as graph nodes."""
from .models import Model, model, smollm2_path
from .nodes import ai, prompt

__all__ = ["Model", "model", "smollm2_path", "ai", "prompt"]
