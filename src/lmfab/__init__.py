"""lmfab: an LLM fab. Raw text in; a trained, evaluated GPT model out."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lmfab")  # one source: pyproject.toml, as installed
except PackageNotFoundError:  # a source tree on PYTHONPATH that was never installed
    __version__ = "0.0.0+unknown"
