"""CAGrad (Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning",
arXiv 2110.14048, Algorithm 1), in Gram form.

With the mean gradient ``g₀ = (1/K) Σ g_k`` and ``φ = c²‖g₀‖²`` the dual problem is
``w* = argmin_{w∈Δ} g_wᵀg₀ + √φ ‖g_w‖`` (``g_w = Σ w_k g_k``); the update is
``d = g₀ + (√φ / ‖g_w*‖) g_w*``, i.e. per-loss weights ``1/K + (√φ/‖g_w*‖) w*``. In Gram
terms ``g_wᵀg₀ = wᵀG1/K`` and ``‖g_w‖² = wᵀGw``: a convex problem on the simplex, solved
here by SLSQP (scipy) with the exact gradient from several starts (the mean, the vertices
and the min-norm point), keeping the best. When ``g_w*`` vanishes (it cancels to below
float64 precision: 0 lies in the hull, a Pareto-stationary point where the formula is
undefined) the update is ``g₀``, the limit the paper's code takes (it divides by
``‖g_w‖ + 1e-4``); TorchJD returns 0 there. The paper's code
also divides d by 1 + c² (``rescale=1``); like TorchJD we do not.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import minimize

from ..qp import MinNormSolver
from .base import Weighting

__all__ = ["CAGradWeighting", "cagrad_dual"]

#: ``‖g_w*‖`` below this fraction of ``Σ w*_k ‖g_k‖`` is cancellation at float64 Gram precision.
_CANCEL = 1e-7


def cagrad_dual(g: np.ndarray, c: float) -> np.ndarray:
    """``w* = argmin_{w∈Δ} wᵀ(G1/K) + c‖g₀‖ √(wᵀGw)`` for a (scaled) Gram ``g`` (k×k)."""
    k = g.shape[0]
    a = g.sum(axis=1) / k
    s = c * np.sqrt(max(float(a.sum()) / k, 0.0))

    def f(w: np.ndarray) -> float:
        return float(a @ w) + s * np.sqrt(max(float(w @ g @ w), 0.0))

    def grad(w: np.ndarray) -> np.ndarray:
        gw = g @ w
        n = np.sqrt(max(float(w @ gw), 0.0))
        return a + (s * gw / n if n > 1e-150 else 0.0)

    starts = [np.full(k, 1.0 / k), MinNormSolver().solve(g, validated=True)[0]]
    starts += [np.eye(k)[i] for i in range(k)]
    best, best_f = starts[0], f(starts[0])
    for w0 in starts:
        if f(w0) < best_f:
            best, best_f = w0, f(w0)
    cons = ({"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones_like(w)},)
    for w0 in (best, starts[0], starts[1]):
        res = minimize(
            f,
            w0,
            jac=grad,
            method="SLSQP",
            bounds=[(0.0, 1.0)] * k,
            constraints=cons,
            options={"ftol": 1e-15, "maxiter": 500},
        )
        w = np.clip(res.x, 0.0, None)
        w = w / w.sum() if w.sum() > 0 else starts[0]
        if f(w) < best_f:
            best, best_f = w, f(w)
    return best


class CAGradWeighting(Weighting):
    """CAGrad's weights; ``c`` ≥ 0 is the radius of the ball around g₀ (0: the mean; the paper
    and issue 14 use 0.4 or 0.5)."""

    name = "cagrad"

    def __init__(self, c: float = 0.4) -> None:
        if isinstance(c, bool) or not isinstance(c, (int, float, np.floating)) or not (c >= 0 and np.isfinite(c)):
            raise ValueError(f"c must be a finite float >= 0, got {c!r}")
        self.c = float(c)

    def options(self) -> dict[str, Any]:
        return {"c": self.c}

    def _weights(self, gram, losses, index, k):
        n = gram.shape[0]
        scale = float(np.trace(gram)) / n
        mean = np.full(n, 1.0 / n)
        if not scale > 0 or self.c == 0.0:
            return mean, "cagrad"
        g = gram / scale
        g0_sq = float(g.sum()) / n**2
        if not g0_sq > 0:
            return mean, "cagrad"
        w = cagrad_dual(g, self.c)
        gw_norm = np.sqrt(max(float(w @ g @ w), 0.0))
        if not gw_norm > _CANCEL * float(w @ np.sqrt(np.clip(np.diag(g), 0.0, None))):
            return mean, "cagrad-degenerate"
        return mean + (self.c * np.sqrt(g0_sq) / gw_norm) * w, "cagrad"
