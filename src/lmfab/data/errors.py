"""The data layer's own error for a recipe or data argument that lmfab cannot honour.

``DataConfigError`` is a ``ValueError`` whose message names the file and key path, so the
command line turns it into one ``lmfab: error: ...`` line and exit code 2, exactly as it does
for a params file's ``ConfigError``. It lives here, not in :mod:`lmfab.config`, because the
data layer sits beside config and must not import it (nor torch).
"""

from __future__ import annotations

from lmfab.strict_yaml import SchemaError


class DataConfigError(SchemaError):
    """A curation recipe, override or data argument that lmfab cannot honour."""
