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

  An objective whose samples all fall in one half (a reward defined for some prompts only)
  has no gradient in the other half: its cross products would be empty. Its row of G is
  then taken from its whole-batch gradient ``v_k``: ``⟨v_k, g_l^H⟩`` with the half H that
  holds none of its samples (still unbiased), ``⟨v_k, v_l⟩`` between two such objectives,
  and ``‖v_k‖²`` (the batch estimate) on the diagonal. The report names these objectives
  (``BalanceReport.batch_estimated``).

Both estimators sit behind one ``measure()`` that returns a ``Measurement`` record (G, the
loss values read with it, and how the per-objective weights become coefficients of the
losses that the update differentiates).

Under ``torch.distributed`` (cross): each rank differentiates its half *contributions*
``(|A_r|/B_r)·L^{A_r}`` and ``(|B_r|/B_r)·L^{B_r}``, whose rank average is the global mean
loss's split; the Gram is rescaled by the global mean fractions. Every rank so applies the
same update, the gradient of the mean over ranks of the local mean losses, however the
groups split on each rank (odd or unequal local batches included).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from .distributed import Collective
    from .inputs import Inputs
    from .sources import GramSource

__all__ = [
    "GRAM_ESTIMATORS",
    "BatchEstimator",
    "CrossGram",
    "Measurement",
    "make_estimator",
    "psd_projection",
    "split_halves",
]

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
    shown = ids[:8].tolist()
    if ids.dtype == object:
        missing = [i for i, v in enumerate(ids.tolist()) if v is None]
        if missing:
            raise ValueError(
                f"groups[{missing[0]}] is None ({len(missing)} of {batch} entries are): groups= needs one id per "
                f"sample, e.g. the index of its prompt (ints or strings), got {shown}{' ...' if batch > 8 else ''}"
            )
    try:
        _, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    except TypeError:
        raise TypeError(
            f"groups must hold ids of one comparable kind (ints or strings, one per sample), got {shown}"
            f"{' ...' if batch > 8 else ''}"
        ) from None
    if first.size < 2:
        raise ValueError(f"groups has a single group ({ids[0]!r}): the cross estimate needs at least two")
    rank_of = np.empty(first.size, dtype=np.int64)
    rank_of[np.argsort(first, kind="stable")] = np.arange(first.size)
    return rank_of[inverse.reshape(-1)] % 2 == 0


@dataclass(eq=False)
class Measurement:
    """What one measurement produced, for the selection, the weighting, the update and the report.

    Attributes:
        gram: K×K float64, the matrix the selection starts from (for ``cross``: the raw cross
            estimate, NaN on the rows of objectives with a non-finite half gradient).
        raw: K×K float64, ``report.gram``.
        values: the loss values on the host (K, then ``extra``'s if given), averaged over ranks.
        losses: what the update differentiates: the K losses, or the 2K half losses.
        coefficients: per entry of ``losses``, the factor of its objective's weight (K or 2K):
            the update is ``Σ_m w_{k(m)}·coefficients_m·∇losses_m``.
        consistency: ``cross``: ``cos(g_k^A, g_k^B)`` (K,), NaN where undefined.
        products: ``cross``: ``‖g_k^A‖‖g_k^B‖`` (K,), the floor's unit.
        batch_estimated: ``cross``: the objectives whose row of G is the batch estimate.
    """

    gram: np.ndarray
    raw: np.ndarray
    values: np.ndarray
    losses: list[Tensor]
    coefficients: np.ndarray
    consistency: np.ndarray | None = None
    products: np.ndarray | None = None
    batch_estimated: tuple[str, ...] = ()

    def expand(self, w: np.ndarray) -> np.ndarray:
        """Per-objective weights (K,) as coefficients of ``losses`` (K or 2K)."""
        if self.coefficients.size == w.size:
            return w  # the batch estimator: the K losses themselves
        return np.concatenate([w * self.coefficients[: w.size], w * self.coefficients[w.size :]])


class BatchEstimator:
    """G of the whole batch's gradients (the default): nothing to process, no state."""

    name = "batch"

    def measure(self, inputs: Inputs, source: GramSource, *, keep_graph: bool, comm: Collective) -> Measurement:
        gram, values = source.measure(
            inputs.losses,
            inputs.names,
            inputs.params,
            inputs.shared,
            keep_graph=keep_graph,
            values=inputs.values,
            comm=comm,
        )
        return Measurement(gram, gram, values, inputs.losses, np.ones(len(inputs.names)))

    def process(self, gram: np.ndarray, usable: np.ndarray, measured: Measurement) -> np.ndarray:
        return gram

    def pending(self, measured: Measurement, usable: np.ndarray) -> np.ndarray | None:
        return None

    def commit(self, pending: Sequence[np.ndarray]) -> None:
        pass

    def reset(self) -> None:
        pass

    value = None


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

    name = "cross"

    def measure(self, inputs: Inputs, source: GramSource, *, keep_graph: bool, comm: Collective) -> Measurement:
        """G from the 2K half gradients (the cross estimate), the values and the coefficients."""
        assert inputs.per_sample is not None and inputs.halves is not None
        names, k = inputs.names, len(inputs.names)
        halves, coefficients, values = self.half_losses(inputs.per_sample, inputs.halves, inputs.values, comm.active)
        half_names = [f"{n}[A]" for n in names] + [f"{n}[B]" for n in names]
        g2, host = source.measure(
            halves, half_names, inputs.params, None, keep_graph=keep_graph, values=values, comm=comm
        )
        if comm.active:  # half contributions: back to half means with the global mean fractions
            (frac_a, frac_b), host = host[-2:], host[:-2]
            scale = np.concatenate([np.full(k, 1.0 / frac_a), np.full(k, 1.0 / frac_b)])
            g2 = g2 * np.outer(scale, scale)
        else:
            frac_a, frac_b = coefficients[0], coefficients[-1]
        g2 = 0.5 * (g2 + g2.T)
        # A non-finite half gradient poisons its objective: fold the 2K rows onto K.
        finite = np.isfinite(np.diag(g2))
        ok = finite[:k] & finite[k:]
        g2 = np.where(np.isfinite(g2), g2, 0.0)
        cross, consistency, products = self.split_gram(g2)
        one_half = self.one_half_rows(g2, cross, products, consistency, frac_a, frac_b) & ok
        cross = np.where(np.outer(ok, ok), cross, np.nan)
        batch_estimated = tuple(names[i] for i in np.flatnonzero(one_half))
        return Measurement(cross, cross, host, halves, coefficients, consistency, products, batch_estimated)

    @staticmethod
    def half_losses(
        losses: Sequence[Tensor], mask: np.ndarray, values: Tensor, distributed: bool
    ) -> tuple[list[Tensor], np.ndarray, Tensor]:
        """``[L_1^A..L_K^A, L_1^B..L_K^B]``, their coefficients (2K,) and the values to read.

        On one process: the means over each half, with coefficients ``a = |A|/B``, ``b = |B|/B``
        (``mean(L_k) = a·L_k^A + b·L_k^B``). Under ``torch.distributed``: the half contributions
        ``a·L_k^A = Σ_A ℓ / B`` (and B's), with coefficients 1, and the local fractions appended
        to the values (their mean over ranks rescales G)."""
        idx_a = torch.as_tensor(np.flatnonzero(mask), device=losses[0].device)
        idx_b = torch.as_tensor(np.flatnonzero(~mask), device=losses[0].device)
        n = mask.size
        frac_a, frac_b = idx_a.numel() / n, idx_b.numel() / n
        k = len(losses)
        if distributed:
            halves_a = [loss.index_select(0, idx_a).sum() / n for loss in losses]
            halves_b = [loss.index_select(0, idx_b).sum() / n for loss in losses]
            fractions = torch.tensor([frac_a, frac_b], dtype=torch.float64, device=values.device)
            return halves_a + halves_b, np.ones(2 * k), torch.cat([values, fractions])
        halves_a = [loss.index_select(0, idx_a).mean() for loss in losses]
        halves_b = [loss.index_select(0, idx_b).mean() for loss in losses]
        coefficients = np.concatenate([np.full(k, frac_a), np.full(k, frac_b)])
        return halves_a + halves_b, coefficients, values

    @staticmethod
    def one_half_rows(
        g2: np.ndarray,
        cross: np.ndarray,
        products: np.ndarray,
        consistency: np.ndarray,
        frac_a: float,
        frac_b: float,
    ) -> np.ndarray:
        """Objectives with a gradient in one half only: their rows of ``cross`` (and
        ``products``, ``consistency``) are replaced in place by estimates from the whole-batch
        gradient ``v_k = a·g_k^A + b·g_k^B`` (module docstring); returns them as a (K,) mask."""
        k = cross.shape[0]
        norm_a, norm_b = np.diag(g2)[:k], np.diag(g2)[k:]
        in_a = (norm_b == 0.0) & (norm_a > 0.0)
        in_b = (norm_a == 0.0) & (norm_b > 0.0)
        one = in_a | in_b
        if not one.any():
            return one
        v = np.concatenate([frac_a * np.eye(k), frac_b * np.eye(k)], axis=1)  # v_k in the 2K rows
        vg = v @ g2  # ⟨v_k, g^A_l⟩ | ⟨v_k, g^B_l⟩
        vgv = vg @ v.T  # ⟨v_k, v_l⟩
        for i in np.flatnonzero(one):
            other = vg[i, k:] if in_a[i] else vg[i, :k]  # the half that holds none of i's samples
            row = np.where(one, vgv[i], other)
            cross[i, :] = row
            cross[:, i] = row
        products[one] = np.diag(vgv)[one]
        consistency[one] = np.nan
        return one

    def pending(self, measured: Measurement, usable: np.ndarray) -> np.ndarray:
        """What ``commit`` averages into the EMA for this micro-batch."""
        return np.where(np.outer(usable, usable), measured.raw, 0.0)

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

    def process(self, cross: np.ndarray, usable: np.ndarray, measured: Measurement) -> np.ndarray:
        """The matrix for the weighting: smoothed, projected to PSD, diagonal floored (the
        rows of objectives outside ``usable`` stay zero)."""
        assert measured.products is not None
        g = psd_projection(self.candidate(cross))
        diag = np.diag(g)
        raised = np.maximum(diag, self.floor * np.where(usable, measured.products, 0.0))
        return g + np.diag(raised - diag)

    def commit(self, crosses: Sequence[np.ndarray]) -> None:
        """Advance the EMA with the mean raw estimate of the micro-batches of a real step."""
        if crosses and self.ema > 0.0:
            self.value = self.candidate(np.mean(crosses, axis=0))

    def reset(self) -> None:
        self.value = None


def make_estimator(name: str, options: Any = None) -> BatchEstimator | CrossGram:
    """The estimator named ``name`` (``GRAM_ESTIMATORS``) with its ``options`` (``"cross"`` only)."""
    if name not in GRAM_ESTIMATORS:
        raise ValueError(f"gram_estimator must be one of {GRAM_ESTIMATORS}, got {name!r}")
    if options is not None and name != "cross":
        raise ValueError(f"estimator_options apply to gram_estimator='cross', not {name!r}")
    if name == "batch":
        return BatchEstimator()
    options = dict(options or {})
    unknown = sorted(set(options) - {"floor", "ema"})
    if unknown:
        raise ValueError(f"estimator_options has unknown keys {unknown}; gram_estimator='cross' takes 'floor', 'ema'")
    return CrossGram(**options)
