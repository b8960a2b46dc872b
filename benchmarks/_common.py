"""Shared helpers for the benchmark scripts: timing, round-robin order, Markdown tables.

Timings on a shared CPU are noisy, so every script measures its methods interleaved
(round-robin over repeats, with the order rotated each round) and reports medians and
ratios measured side by side in one run.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "Samples",
    "environment_line",
    "fmt_float",
    "fmt_time",
    "markdown_table",
    "rotated",
    "setup_torch",
    "time_call",
    "write_json",
    "write_markdown",
]


def setup_torch(threads: int = 1) -> None:
    """One intra-op thread (the benchmark machines are shared), deterministic seeds."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)


def rotated(items: Sequence[Any], shift: int) -> list[Any]:
    """``items`` rotated left by ``shift`` (round-robin order for interleaved timing)."""
    if not items:
        return []
    s = shift % len(items)
    return list(items[s:]) + list(items[:s])


def time_call(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of one call of ``fn``."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


class Samples:
    """Timing samples (seconds) by key; medians and ratios of medians."""

    def __init__(self) -> None:
        self.data: dict[Any, list[float]] = defaultdict(list)

    def add(self, key: Any, seconds: float) -> None:
        self.data[key].append(seconds)

    def extend(self, key: Any, values: Iterable[float]) -> None:
        self.data[key].extend(values)

    def median(self, key: Any) -> float:
        values = self.data.get(key)
        return statistics.median(values) if values else float("nan")

    def count(self, key: Any) -> int:
        return len(self.data.get(key, ()))

    def ratio(self, num: Any, den: Any) -> float:
        d = self.median(den)
        return self.median(num) / d if d > 0 else float("nan")


def fmt_time(seconds: float) -> str:
    """Human-readable duration: µs below 1 ms, ms below 1 s, else s."""
    if seconds != seconds:  # NaN
        return "n/a"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1.0:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def fmt_float(x: float, digits: int = 1) -> str:
    """``1.2e-11`` style; '0' for exact zero, 'n/a' for NaN."""
    if x != x:
        return "n/a"
    if x == 0.0:
        return "0"
    return f"{x:.{digits}e}"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table (first column left-aligned, the rest right-aligned)."""
    rows = [[str(c) for c in r] for r in rows]
    head = "| " + " | ".join(headers) + " |"
    sep = "| " + " | ".join([":---"] + ["---:"] * (len(headers) - 1)) + " |"
    body = ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def environment_line() -> str:
    """One line naming the machine and library versions the numbers were measured with."""
    import numpy
    import torch

    parts = [
        f"Python {platform.python_version()}",
        f"torch {torch.__version__} ({torch.get_num_threads()} thread)",
        f"numpy {numpy.__version__}",
    ]
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("osqp", "qpsolvers", "daqp", "quadprog", "torchjd"):
        try:
            parts.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:  # pragma: no cover - optional
            pass
    cpu = platform.processor() or platform.machine()
    parts.append(f"{cpu}, {os.cpu_count()} logical CPUs")
    return ", ".join(parts)


def write_json(path: str | os.PathLike[str] | None, data: Any) -> None:
    """Write ``data`` (the raw, unrounded figures behind a Markdown report) to ``path`` as JSON
    (parents created); nothing when ``path`` is None. Tests assert on these, never on the
    rounded figures the Markdown prints. Non-finite floats are written as null."""
    if path is None:
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(_json_ready(data), indent=1, sort_keys=True) + "\n", encoding="utf-8")


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return _json_ready(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_markdown(path: str | os.PathLike[str] | None, text: str) -> None:
    """Print ``text``; also write it to ``path`` (parents created) when given."""
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    if path is not None:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
