"""Shared test setup: offline hub, one torch thread, deterministic hypothesis profiles.

Profiles (select with ``HYPOTHESIS_PROFILE=<name>``):

- ``ci`` (default): derandomized, no deadline, a budget that keeps the suite fast.
- ``thorough``: randomized, ten times the examples, for a local soak run.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

torch.set_num_threads(1)

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=100,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "thorough",
    derandomize=False,
    deadline=None,
    max_examples=600,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
