"""The plain mean: ``w_k = 1/K`` (the weighted-sum baseline with equal weights)."""

from __future__ import annotations

import numpy as np

from .base import Weighting

__all__ = ["MeanWeighting"]


class MeanWeighting(Weighting):
    """``d = (1/K) Σ_k g_k`` over the objectives that take part."""

    name = "mean"

    def _weights(self, gram, losses, index, k):
        n = gram.shape[0]
        return np.full(n, 1.0 / n), "mean"
