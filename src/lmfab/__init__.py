"""lmfab: an LLM fab. Raw text in; a compute-optimal, evaluated, exported GPT model out."""

__version__ = "0.1.0"
