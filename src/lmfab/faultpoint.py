"""Fault injection for the reliability tests: named points where a test makes lmfab fail.

lmfab calls :func:`fault` at a few places where a real failure would hurt most (inside a
checkpoint write, at a training step, between curation tasks, while encoding a file). It
does nothing unless the environment variable ``LMFAB_FAULT`` is set, which only the tests
in ``tests/faults/`` do; the cost otherwise is one dictionary lookup.

``LMFAB_FAULT`` holds one or more specs separated by ``;``::

    POINT[KEY=VALUE,...]:ACTION

``POINT`` names the place (``checkpoint.write``, ``train.step``, ``curate.task``,
``encode.file``, ...); each ``KEY=VALUE`` must equal what the caller passes (``rank=1``,
``step=3``, ``stage=scatter``); ``after=N`` fires at the N-th matching call (default 1).
Each spec fires once per process. Actions:

* ``kill`` -- SIGKILL this process (a crash, an OOM killer, a lost node);
* ``raise`` -- raise ``RuntimeError("injected fault at POINT")`` (a bug in one rank);
* ``pause=SECONDS`` -- print ``lmfab-fault: paused at POINT`` to stderr and sleep, so a test
  can kill the process at exactly that point (e.g. with a checkpoint half-written);
* ``enospc`` -- raise ``OSError(ENOSPC)`` (the disk is full);
* anything else (``nan``) is returned to the caller, which injects it (a poisoned loss).

Standard library only: every layer, the data pipeline too, may import it.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import time

ENV = "LMFAB_FAULT"

_fired: set[str] = set()
_counts: dict[str, int] = {}


def _parse(spec: str) -> tuple[str, dict[str, str], str]:
    head, _, action = spec.rpartition(":")
    point, _, rest = head.partition("[")
    where = {}
    for item in rest.rstrip("]").split(","):
        if item:
            key, _, value = item.partition("=")
            where[key.strip()] = value.strip()
    return point.strip(), where, action.strip()


def fault(point: str, **where: object) -> str | None:
    """Perform the fault configured for ``point`` at this call, if any (see the module doc).
    Returns the action for actions the caller injects itself (``nan``), else None."""
    env = os.environ.get(ENV)
    if not env:
        return None
    due = []
    for spec in env.split(";"):  # count this call for every matching spec, then fire one
        name, want, action = _parse(spec)
        if name != point or spec in _fired:
            continue
        after = int(want.pop("after", "1"))
        if any(str(where.get(k)) != v for k, v in want.items()):
            continue
        _counts[spec] = _counts.get(spec, 0) + 1
        if _counts[spec] >= after:
            due.append((spec, action))
    for spec, action in due[:1]:
        _fired.add(spec)
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if action == "raise":
            raise RuntimeError(f"injected fault at {point} {where}")
        if action == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"injected at {point}")
        if action.startswith("pause="):
            print(f"lmfab-fault: paused at {point}", file=sys.stderr, flush=True)
            time.sleep(float(action.split("=", 1)[1]))
            return None
        return action
    return None
