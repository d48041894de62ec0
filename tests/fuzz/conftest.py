"""Hypothesis profiles of the fuzz suite.

``fast`` (default, every test run): a few dozen inputs per target, enough to keep each
target's oracle honest. ``campaign`` (``make fuzz``, or ``HYPOTHESIS_PROFILE=campaign``):
thousands per target, the figures of docs/reliability.md. The oracle of every target is the
same: the input is accepted, or refused with one message naming the file, line, key or
tensor -- never a Python traceback."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_COMMON = dict(deadline=None, derandomize=False, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                      HealthCheck.data_too_large, HealthCheck.filter_too_much])
settings.register_profile("fast", max_examples=10, **_COMMON)
settings.register_profile("campaign", max_examples=int(os.environ.get("FUZZ_EXAMPLES", 2000)),
                          **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))
