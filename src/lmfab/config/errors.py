"""The one exception type of a params file or a setting lmfab cannot honour.

Kept apart from the loader and free of third-party imports (no torch, no yaml), so that
every part of lmfab, the offline data pipeline included, can raise and catch it without
importing anything heavier. ``lmfab.config`` and ``lmfab.config.load`` re-export it.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A params file or override that lmfab cannot honour. The message names the key path."""
