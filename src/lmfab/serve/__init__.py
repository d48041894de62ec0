"""The OpenAI-compatible HTTP server (``lmfab serve``): :mod:`lmfab.serve.app`."""
