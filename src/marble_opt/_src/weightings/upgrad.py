"""UPGrad (Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", arXiv 2406.16232).

Each weighted gradient ``p_k g_k`` is projected onto the dual cone ``{x : ⟨g_l, x⟩ ≥ 0 ∀l}``
of the gradients and the projections are summed. In Gram terms the projection of ``Jᵀu``
is ``Jᵀv`` with ``v = argmin_{v ≥ u} ½ vᵀGv`` (the dual of the projection), i.e.
``v = u + λ``, ``λ = argmin_{λ≥0} ½ ‖Lᵀ(u + λ)‖²`` for a factor ``G = L Lᵀ``: a
non-negative least-squares problem solved exactly by Lawson–Hanson (``scipy.optimize.nnls``).
Then ``w = Σ_k v^(k)``. The result has a non-negative inner product with every gradient.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import nnls

from ..balance import scaled_gram
from .base import Weighting, check_preference, restricted_preference

__all__ = ["UPGradWeighting", "dual_cone_weights", "gram_factor"]


def gram_factor(gram: np.ndarray) -> np.ndarray:
    """``F`` (k×k) with ``F Fᵀ ≈ G`` from the PSD part of ``G`` (negative eigenvalues clipped)."""
    vals, vecs = np.linalg.eigh(gram)
    return vecs * np.sqrt(np.clip(vals, 0.0, None))


def dual_cone_weights(gram: np.ndarray, u: np.ndarray, *, ridge: float = 1e-12) -> np.ndarray:
    """``v = u + λ``, ``λ = argmin_{λ≥0} ½ (u+λ)ᵀG(u+λ)``: ``Jᵀv`` is the projection of ``Jᵀu``
    onto the dual cone ``{x : Jx ≥ 0}`` of the rows of J (``G = JJᵀ``).

    Solved as non-negative least squares (Lawson–Hanson, exact active set) on the Gram
    rescaled to a unit diagonal, ``Ĝ = DGD`` with ``D = diag(G)^{-1/2}`` (so gradients of
    very different norms keep their constraints), with a ``ridge``·‖λ̂‖² term that picks the
    bounded solution when G is singular. Zero-gradient rows constrain nothing: ``v_k = u_k``.
    """
    diag = np.diag(gram)
    live = diag > 0
    v = u.astype(np.float64).copy()
    if not live.any():
        return v
    d = 1.0 / np.sqrt(diag[live])
    g_hat = scaled_gram(gram[np.ix_(live, live)], d)
    a = gram_factor(g_hat).T
    u_hat = u[live] / d
    n = a.shape[1]
    a_aug = np.vstack([a, np.sqrt(ridge) * np.eye(n)])
    b_aug = np.concatenate([-(a @ u_hat), np.zeros(n)])
    nu, _ = nnls(a_aug, b_aug, maxiter=50 * max(1, n))
    v[live] = u[live] + d * nu
    return v


class UPGradWeighting(Weighting):
    """UPGrad's weights ``w = Σ_k Π_dual(p_k e_k)`` (p: ``preference``, uniform by default)."""

    name = "upgrad"

    def __init__(self, preference: Any = None) -> None:
        self.preference = check_preference(preference)

    def options(self) -> dict[str, Any]:
        return {} if self.preference is None else {"preference": self.preference.tolist()}

    def _weights(self, gram, losses, index, k):
        p = restricted_preference(self.preference, index, k)
        w = np.zeros(gram.shape[0])
        for i, pi in enumerate(p):
            u = np.zeros_like(w)
            u[i] = pi
            w += dual_cone_weights(gram, u)
        return w, "upgrad"
