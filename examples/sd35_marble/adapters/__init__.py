"""Model adapters of the example: the RL loop in ``train.py`` sees models only through them.

``ADAPTERS`` maps a preset to ``"module:Class"``; the module is imported on first use, so a
preset's dependencies load only when it runs.
"""

from __future__ import annotations

import importlib

from .base import POLICIES, Cond, ConfigError, ModelAdapter, take

__all__ = ["ADAPTERS", "POLICIES", "Cond", "ConfigError", "ModelAdapter", "adapter_class", "take"]

ADAPTERS = {
    "digits": "digits:DigitsAdapter",
    "tiny": "sd3:SD3Adapter",
    "sd35-medium": "sd3:SD3Adapter",
}


def adapter_class(preset: str) -> type[ModelAdapter]:
    """The adapter class of ``preset`` (imports its module)."""
    if preset not in ADAPTERS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {list(ADAPTERS)}")
    module, name = ADAPTERS[preset].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
