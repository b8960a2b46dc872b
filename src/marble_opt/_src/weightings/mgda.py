"""MGDA (Désidéri 2012; Sener & Koltun, arXiv 1810.04650): the min-norm point on the raw Gram.

``w = α* = argmin_{α∈Δ} ½ αᵀGα`` with no normalisation and no smoothing: ``d = Σ α*_k g_k``
is the min-norm element of the convex hull of the raw gradients. Solved exactly by
``MinNormSolver`` (KKT-checked to 1e-10·trace(G)/K).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..qp import MinNormSolver
from .base import Weighting, WeightingResult, WeightingState

__all__ = ["MGDAWeighting"]


class MGDAWeighting(Weighting):
    """Min-norm weights on the raw Gram (``solver``: the QP backend, ``"osqp"`` by default)."""

    name = "mgda"

    def __init__(self, solver: str = "osqp") -> None:
        self.solver = MinNormSolver(solver)

    def options(self) -> dict[str, Any]:
        return {"solver": self.solver.solver}

    def __getstate__(self) -> dict[str, Any]:
        return {"solver": self.solver.solver}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.solver = MinNormSolver(state["solver"])

    def weigh(
        self, gram: np.ndarray, losses, valid: np.ndarray, state: WeightingState, names: Sequence[str] | None = None
    ) -> WeightingResult:
        k = gram.shape[0]
        warm = state.warm_start(valid)
        alpha = np.zeros(k)
        alpha[valid], status = self.solver.solve(gram[np.ix_(valid, valid)], warm, validated=True)
        return WeightingResult(raw=alpha, alpha=alpha.copy(), w=alpha.copy(), valid=valid.copy(), status=status)

    def _weights(self, gram, losses, index, k):  # pragma: no cover - weigh is overridden
        raise NotImplementedError
