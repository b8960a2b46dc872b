"""Gram estimators: how the Gram matrix handed to a weighting is estimated from a batch.

- ``batch`` (the default): ``G_kl = ⟨g_k, g_l⟩`` of the whole batch's gradients. Each
  ``g_k`` carries its minibatch noise, so ``E[G_kk] = ‖E g_k‖² + tr Cov(g_k)/B``: with noisy
  per-sample gradients the diagonal is inflated and the min-norm point protects noise.
- ``cross``: per-objective gradients on two disjoint halves A, B of the batch and
  ``G_kl = ½(⟨g_k^A, g_l^B⟩ + ⟨g_l^A, g_k^B⟩)``, an unbiased estimate of ``⟨E g_k, E g_l⟩``
  (independent halves: the noise terms have zero mean). It is not PSD in general and its
  diagonal can be ≤ 0 when a gradient is mostly noise, so the matrix handed to the
  weighting is: the (optionally EMA-smoothed) estimate, projected onto the PSD cone
  (negative eigenvalues set to 0), with its diagonal raised to at least
  ``floor·‖g_k^A‖‖g_k^B‖`` (adding a non-negative diagonal keeps it PSD). Needs
  parameter-space gradients: in a shared activation space the halves occupy disjoint
  rows, so every cross product is exactly zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["GRAM_ESTIMATORS", "CrossGram", "psd_projection", "split_halves"]

#: The names ``MarbleOptimizer(gram_estimator=...)`` accepts.
GRAM_ESTIMATORS = ("batch", "cross")


def psd_projection(gram: np.ndarray) -> np.ndarray:
    """The nearest PSD matrix in Frobenius norm: ``V max(Λ, 0) Vᵀ`` (K×K, symmetric)."""
    sym = 0.5 * (gram + gram.T)
    vals, vecs = np.linalg.eigh(sym)
    out = (vecs * np.clip(vals, 0.0, None)) @ vecs.T
    return 0.5 * (out + out.T)


def split_halves(batch: int, groups: Any = None) -> np.ndarray:
    """A boolean mask (B,), True for half A.

    Without ``groups``: even positions go to A, odd to B (so equal local batches under DDP
    give the same split as one process on the concatenated batch). With ``groups`` (B,
    ids): whole groups alternate between A and B in the order they first appear, so the
    samples of one prompt stay together.
    """
    if groups is None:
        return np.arange(batch) % 2 == 0
    if isinstance(groups, Tensor):
        groups = groups.detach().cpu().numpy()
    ids = np.asarray(groups).reshape(-1)
    if ids.shape[0] != batch:
        raise ValueError(f"groups has {ids.shape[0]} entries but the per-sample losses have {batch}")
    _, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    if first.size < 2:
        raise ValueError(f"groups has a single group ({ids[0]!r}): the cross estimate needs at least two")
    rank_of = np.empty(first.size, dtype=np.int64)
    rank_of[np.argsort(first, kind="stable")] = np.arange(first.size)
    return rank_of[inverse.reshape(-1)] % 2 == 0


class CrossGram:
    """The cross-half estimate and its state (an EMA of the raw estimate, ``ema``).

    Args:
        floor: the diagonal handed to the weighting is at least ``floor·‖g_k^A‖‖g_k^B‖``
            (a cosine between the halves of ``floor``), so the normalisation stays defined
            for a gradient that is mostly noise. In [0, 1].
        ema: ρ_G in [0, 1) of an EMA over steps of the raw cross estimate (0: none).
    """

    def __init__(self, floor: float = 0.01, ema: float = 0.0) -> None:
        if isinstance(floor, bool) or not isinstance(floor, (int, float, np.floating)) or not 0.0 <= floor <= 1.0:
            raise ValueError(f"estimator_options['floor'] must be a float in [0, 1], got {floor!r}")
        if isinstance(ema, bool) or not isinstance(ema, (int, float, np.floating)) or not 0.0 <= ema < 1.0:
            raise ValueError(f"estimator_options['ema'] must be a float in [0, 1), got {ema!r}")
        self.floor = float(floor)
        self.ema = float(ema)
        self.value: np.ndarray | None = None  # the committed EMA of the raw estimate

    @staticmethod
    def half_losses(losses: Sequence[Tensor], mask: np.ndarray) -> tuple[list[Tensor], float, float]:
        """``[L_1^A..L_K^A, L_1^B..L_K^B]`` (means over each half) and the halves' fractions
        ``a = |A|/B``, ``b = |B|/B`` (so ``mean(L_k) = a·L_k^A + b·L_k^B``)."""
        idx_a = torch.as_tensor(np.flatnonzero(mask), device=losses[0].device)
        idx_b = torch.as_tensor(np.flatnonzero(~mask), device=losses[0].device)
        halves_a = [loss.index_select(0, idx_a).mean() for loss in losses]
        halves_b = [loss.index_select(0, idx_b).mean() for loss in losses]
        n = mask.size
        return halves_a + halves_b, idx_a.numel() / n, idx_b.numel() / n

    @staticmethod
    def split_gram(g2: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """From the 2K×2K Gram of ``[g^A; g^B]``: the raw cross estimate (K×K), the halves'
        self-consistency ``cos(g_k^A, g_k^B)`` (K,) and ``‖g_k^A‖‖g_k^B‖`` (K,)."""
        k = g2.shape[0] // 2
        ab = g2[:k, k:]
        cross = 0.5 * (ab + ab.T)
        prod = np.sqrt(np.maximum(np.diag(g2)[:k], 0.0) * np.maximum(np.diag(g2)[k:], 0.0))
        with np.errstate(divide="ignore", invalid="ignore"):
            consistency = np.where(prod > 0, np.diag(ab) / np.where(prod > 0, prod, 1.0), np.nan)
        return cross, np.clip(consistency, -1.0, 1.0), prod

    def candidate(self, cross: np.ndarray) -> np.ndarray:
        """The smoothed raw estimate committing ``cross`` would give."""
        if self.value is None or self.ema == 0.0 or self.value.shape != cross.shape:
            return cross.copy()
        return self.ema * self.value + (1.0 - self.ema) * cross

    def process(self, cross: np.ndarray, norm_products: np.ndarray) -> np.ndarray:
        """The matrix for the weighting: smoothed, projected to PSD, diagonal floored."""
        g = psd_projection(self.candidate(cross))
        diag = np.diag(g)
        raised = np.maximum(diag, self.floor * norm_products)
        return g + np.diag(raised - diag)

    def commit(self, crosses: Sequence[np.ndarray]) -> None:
        """Advance the EMA with the mean raw estimate of the micro-batches of a real step."""
        if crosses and self.ema > 0.0:
            self.value = self.candidate(np.mean(crosses, axis=0))

    def reset(self) -> None:
        self.value = None
