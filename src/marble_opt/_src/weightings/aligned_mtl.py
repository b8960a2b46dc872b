"""Aligned-MTL (Senushkin et al., "Independent Component Alignment for Multi-Task Learning",
CVPR 2023), Algorithm 1 in Gram form.

With ``G = V Λ Vᵀ`` (the eigenvalues above ``K·eps·λ_max``, r of them), the balance
transformation ``B = √λ_min · V Λ^{-1/2} Vᵀ`` makes the aligned gradients' Gram
``λ_min·I`` on the span (condition number 1); ``w = B p`` (p uniform by default). ``scale``
picks λ_min (``"min"``, the paper's), the (lower) median or the mean (``"rmse"``) eigenvalue.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import Weighting, check_preference, restricted_preference

__all__ = ["AlignedMTLWeighting"]

_SCALES = ("min", "median", "rmse")


class AlignedMTLWeighting(Weighting):
    """Aligned-MTL's weights ``w = B p``."""

    name = "aligned-mtl"

    def __init__(self, preference: Any = None, scale: str = "min") -> None:
        if scale not in _SCALES:
            raise ValueError(f"scale must be one of {_SCALES}, got {scale!r}")
        self.preference = check_preference(preference)
        self.scale = scale

    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"scale": self.scale}
        if self.preference is not None:
            opts["preference"] = self.preference.tolist()
        return opts

    def _weights(self, gram, losses, index, k):
        n = gram.shape[0]
        p = restricted_preference(self.preference, index, k)
        vals, vecs = np.linalg.eigh(gram)
        tol = float(vals.max()) * n * np.finfo(np.float64).eps
        keep = vals > tol
        if not keep.any():
            return p.copy(), "aligned-mtl"
        vals, vecs = vals[keep], vecs[:, keep]
        if self.scale == "min":
            s = float(vals.min())
        elif self.scale == "median":
            s = float(np.sort(vals)[(vals.size - 1) // 2])  # the lower median
        else:
            s = float(vals.mean())
        b = np.sqrt(s) * (vecs / np.sqrt(vals)) @ vecs.T
        return b @ p, "aligned-mtl"
