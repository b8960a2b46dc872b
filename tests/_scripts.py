"""A benchmark script (``benchmarks/NAME.py``) imported as a module, once per test process."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/{name}.py`` as the module ``_bench_{name}`` (executed on first use only)."""
    module = f"_bench_{name}"
    if module not in sys.modules:
        spec = importlib.util.spec_from_file_location(module, BENCH / f"{name}.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[module] = mod
        try:
            spec.loader.exec_module(mod)
        except BaseException:
            del sys.modules[module]
            raise
    return sys.modules[module]
