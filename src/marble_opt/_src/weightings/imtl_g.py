"""IMTL-G (Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021), in the Gram-only
form of arXiv 2406.16232: ``v = G⁺ · diag(G)^{1/2}``, ``w = v / Σv``.

The update ``d = Jᵀw`` has equal projections onto every unit gradient. G⁺ is the
pseudo-inverse (eigenvalues below ``rtol``·λ_max are treated as zero, so linearly dependent
gradients are handled); ``w = 0`` when ``|Σv|`` is negligible.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import Weighting, real_scalar

__all__ = ["IMTLGWeighting"]


class IMTLGWeighting(Weighting):
    """IMTL-G's weights (``rtol``: relative cut-off of the pseudo-inverse)."""

    name = "imtl-g"

    def __init__(self, rtol: float | None = None) -> None:
        if rtol is not None:
            value = real_scalar(rtol)
            if value is None or not 0.0 <= value < 1.0:
                raise ValueError(
                    f"rtol (IMTL-G's relative cut-off of the pseudo-inverse) must be a float in [0, 1), got {rtol!r}; "
                    "leave it out for the default K·ε"
                )
            rtol = value
        self.rtol = rtol

    def options(self) -> dict[str, Any]:
        return {} if self.rtol is None else {"rtol": self.rtol}

    def _weights(self, gram, losses, index, k):
        n = gram.shape[0]
        scale = float(np.trace(gram)) / n
        if not scale > 0:
            return np.zeros(n), "imtl-g"
        g = gram / scale
        rtol = self.rtol if self.rtol is not None else n * np.finfo(np.float64).eps
        v = np.linalg.pinv(g, rcond=rtol, hermitian=True) @ np.sqrt(np.clip(np.diag(g), 0.0, None))
        total = float(v.sum())
        if abs(total) < 1e-12:
            return np.zeros(n), "imtl-g"
        return v / total, "imtl-g"
