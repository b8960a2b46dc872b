"""Any callable with TorchJD's Gramian-weighting signature: ``fn(G: Tensor (K×K)) -> Tensor (K,)``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .base import Weighting

__all__ = ["CallableWeighting"]


class CallableWeighting(Weighting):
    """Wraps ``fn`` (e.g. ``torchjd.aggregation.UPGradWeighting()``): it receives the valid
    objectives' raw Gram as a float64 CPU tensor (k×k, PSD) and returns per-loss weights (k,)."""

    name = "callable"

    def __init__(self, fn: Callable[[torch.Tensor], Any]) -> None:
        if not callable(fn):
            raise TypeError(f"weighting must be a name or a callable on a Gram matrix, got {type(fn).__name__}")
        self.fn = fn

    def options(self) -> dict[str, Any]:
        return {"fn": self.fn}

    def __repr__(self) -> str:
        return f"CallableWeighting({self.fn!r})"

    def _weights(self, gram, losses, index, k):
        out = self.fn(torch.from_numpy(np.ascontiguousarray(gram)))
        if isinstance(out, torch.Tensor):
            out = out.detach().to("cpu", torch.float64).numpy()
        w = np.asarray(out, dtype=np.float64).reshape(-1)
        if w.shape != (gram.shape[0],):
            raise ValueError(
                f"weighting {self.fn!r} returned {w.size} weights for a {gram.shape[0]}×{gram.shape[0]} Gram matrix"
            )
        if not np.isfinite(w).all():
            raise ValueError(f"weighting {self.fn!r} returned non-finite weights {w.tolist()}")
        return w, type(self.fn).__name__
