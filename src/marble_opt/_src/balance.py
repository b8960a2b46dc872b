"""Gram-only maths of one balancing step: scales, validity, weights, cosines.

Everything here takes the raw Gram matrix ``G_kl = ⟨g_k, g_l⟩`` (K×K, float64 numpy) and
per-objective scalars; nothing touches parameters or autograd.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "MIN_GRAD_NORM",
    "NORMALIZATIONS",
    "combine_weights",
    "cosine_matrix",
    "objective_scales",
    "scaled_gram",
    "update_cosines",
]

#: An objective whose gradient norm is at most this (exactly zero) is left out of the weighting:
#: normalising a zero gradient is undefined; any non-zero one takes part whatever its scale.
MIN_GRAD_NORM = 0.0
#: ``"l2"``: ĝ = g/‖g‖ (the paper's); ``"none"``: ĝ = g; ``"loss"``: ĝ = g/L (MGDA);
#: ``"loss+l2"``: ĝ = g/(L·‖g‖).
NORMALIZATIONS = ("l2", "none", "loss", "loss+l2")


def scaled_gram(gram: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """``S G S`` for ``S = diag(scales)`` (the Gram of ``s_k g_k``). Where ``s_k·s_l`` overflows
    (a Gram of denormal entries, e.g. 1e-310, normalised: ``s ≈ 1e155``) the product is taken
    one factor at a time, which stays finite; otherwise one multiplication by the outer product."""
    with np.errstate(over="ignore"):
        outer = np.outer(scales, scales)
    if np.isfinite(outer).all():
        return gram * outer
    return (gram * scales[:, None]) * scales[None, :]


def objective_scales(
    norms: np.ndarray, losses: np.ndarray, valid: np.ndarray, normalize: str, names: Sequence[str]
) -> np.ndarray:
    """Scale ``s_k`` with ``ĝ_k = s_k g_k`` (K,); 0 for objectives outside ``valid``.

    Raises ``ValueError`` naming the objective when a loss-based normalisation meets a
    loss that is not positive.
    """
    scales = np.zeros_like(norms)
    if normalize in ("loss", "loss+l2"):
        for k in np.flatnonzero(valid):
            if not losses[k] > 0.0:
                raise ValueError(
                    f"normalize={normalize!r} divides by the loss, but loss {names[k]!r} = "
                    f"{float(losses[k])!r} is not positive; use normalize='l2' or shift the loss"
                )
    v = valid
    if normalize == "l2":
        scales[v] = 1.0 / norms[v]
    elif normalize == "none":
        scales[v] = 1.0
    elif normalize == "loss":
        scales[v] = 1.0 / losses[v]
    elif normalize == "loss+l2":
        scales[v] = 1.0 / (losses[v] * norms[v])
    else:  # validated by the optimizer; kept for direct callers
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    return scales


def combine_weights(
    alpha: np.ndarray, scales: np.ndarray, norms: np.ndarray, valid: np.ndarray, *, rescale: bool
) -> np.ndarray:
    """Per-loss coefficients ``w`` (K,) with ``d = Σ_k w_k g_k = m · Σ_k α_k ĝ_k``.

    ``alpha`` is restricted to ``valid`` and renormalised. With ``rescale`` the magnitude
    ``m = mean‖g_k‖ / mean‖ĝ_k‖`` over valid objectives puts the update at the scale of a
    typical raw gradient (for ``"l2"``: ``m = mean‖g_k‖``); without it ``m = 1``.
    """
    if rescale and int(valid.sum()) == 1:
        # One usable objective: its own gradient, exactly (m·s_k = 1 up to rounding).
        return np.where(valid, 1.0, 0.0)
    a = np.where(valid, alpha, 0.0)
    total = a.sum()
    a = a / total if total > 0 else np.where(valid, 1.0 / max(int(valid.sum()), 1), 0.0)
    m = 1.0
    if rescale and valid.any():
        m = float(norms[valid].mean() / (scales[valid] * norms[valid]).mean())
    return a * scales * m


def cosine_matrix(gram: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """``cos(g_k, g_l)`` (K×K); 0 where a gradient is zero."""
    denom = np.outer(norms, norms)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(denom > 0, gram / np.where(denom > 0, denom, 1.0), 0.0)
    return np.clip(out, -1.0, 1.0)


def update_cosines(gram: np.ndarray, w: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """``cos(d, g_k)`` for ``d = Σ_l w_l g_l`` (K,), from the Gram alone; 0 where undefined."""
    gw = gram @ w
    d_norm = float(np.sqrt(max(float(w @ gw), 0.0)))
    denom = d_norm * norms
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(denom > 0, gw / np.where(denom > 0, denom, 1.0), 0.0)
    return np.clip(out, -1.0, 1.0)
