"""Model code: one GPT class with options from closed sets (torch only)."""

from lmfab.models.gpt import GPT, build_model, materialize

__all__ = ["GPT", "build_model", "materialize"]
