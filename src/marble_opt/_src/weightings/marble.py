"""MARBLE (arXiv 2605.06507): normalise, min-norm QP, anchor, EMA, rescale.

``α* = argmin_{α∈Δ} ½ αᵀĜα`` with ``Ĝ_kl = s_k s_l G_kl`` (``s_k = 1/‖g_k‖`` for
``normalize="l2"``); optionally anchored to a preference p,
``α̃ = λ·p + (1−λ)·α*`` (λ = ``anchor``; p uniform by default); smoothed,
``α_t = ρ·α_{t−1} + (1−ρ)·α̃_t``; and rescaled, ``w_k = α_k s_k m`` with
``m = mean‖g_k‖ / mean‖ĝ_k‖``, so that ``d = Σ w_k g_k = m·Σ α_k ĝ_k``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..balance import NORMALIZATIONS, combine_weights, objective_scales, scaled_gram
from ..qp import MinNormSolver
from .base import Weighting, WeightingResult, WeightingState, check_preference, real_scalar, restricted_preference

__all__ = ["MarbleWeighting", "check_ema_decay"]


def check_ema_decay(value: Any) -> float:
    """ρ as a float in [0, 1), or ``ValueError`` quoting the bad value (numpy floats and 0-d
    tensors, e.g. from a schedule, are accepted and converted)."""
    rho = real_scalar(value)
    if rho is None or not 0.0 <= rho < 1.0:
        raise ValueError(f"ema_decay must be a float in [0, 1), got {value!r}")
    return rho


class MarbleWeighting(Weighting):
    """The paper's weighting (the default of ``MarbleOptimizer``).

    Args:
        ema_decay: ρ in [0, 1); 0.7 is the paper's best value, 0 disables smoothing.
        normalize: ``"l2"`` (ĝ = g/‖g‖, the paper's), ``"none"``, ``"loss"`` (ĝ = g/L),
            ``"loss+l2"``.
        rescale: put the update at the scale of a typical raw gradient (``m`` above).
        solver: the min-norm QP backend (``"osqp"`` or any name ``min_norm_weights`` takes).
        anchor: λ in [0, 1]: ``α̃ = λ·p + (1−λ)·α*`` leans towards the preference p while
            keeping part of the conflict-avoiding solution (λ=0: the paper's MARBLE).
        preference: p (K,), non-negative, renormalised over the objectives that take part;
            uniform by default. Used only through ``anchor``: a preference with ``anchor=0``
            is refused (it would be ignored).
    """

    name = "marble"

    def __init__(
        self,
        ema_decay: float = 0.7,
        normalize: str = "l2",
        rescale: bool = True,
        solver: str = "osqp",
        anchor: float = 0.0,
        preference: Any = None,
    ) -> None:
        self.ema_decay = check_ema_decay(ema_decay)
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        if not isinstance(rescale, bool):
            raise TypeError(f"rescale must be a bool, got {rescale!r}")
        lam = real_scalar(anchor)
        if lam is None or not 0.0 <= lam <= 1.0:
            raise ValueError(f"anchor must be a float in [0, 1], got {anchor!r}")
        if preference is not None and lam == 0.0:
            raise ValueError(
                f"preference={preference!r} has no effect with anchor=0: MARBLE mixes it into α only as "
                "α̃ = λ·p + (1−λ)·α* with λ = anchor; pass an anchor in (0, 1] with it "
                "(weighting_options={'anchor': 0.5, 'preference': [...]}), or drop the preference"
            )
        self.normalize = normalize
        self.rescale = rescale
        self.solver = MinNormSolver(solver)
        self.anchor = lam
        self.preference = check_preference(preference)

    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {
            "ema_decay": self.ema_decay,
            "normalize": self.normalize,
            "rescale": self.rescale,
            "solver": self.solver.solver,
        }
        if self.anchor:
            opts["anchor"] = self.anchor
        if self.preference is not None:
            opts["preference"] = self.preference.tolist()
        return opts

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["solver"] = self.solver.solver  # OSQP workspaces are rebuilt on demand
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        state["solver"] = MinNormSolver(state["solver"])
        self.__dict__.update(state)

    def _anchored(self, raw: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """``λ·p + (1−λ)·α*`` over ``valid`` (α* unchanged for λ = 0)."""
        if self.anchor == 0.0:
            return raw
        idx = np.flatnonzero(valid)
        if self.preference is not None and self.preference.size != raw.size:
            raise ValueError(f"preference has {self.preference.size} entries but there are {raw.size} objectives")
        p = np.zeros_like(raw)
        p[idx] = restricted_preference(self.preference, idx)
        return self.anchor * p + (1.0 - self.anchor) * raw

    def _smoothed(self, target: np.ndarray, state: WeightingState) -> np.ndarray:
        if state.alpha is None or self.ema_decay == 0.0:
            return target.copy()
        return self.ema_decay * state.alpha + (1.0 - self.ema_decay) * target

    def weigh(
        self,
        gram: np.ndarray,
        losses: np.ndarray | None,
        valid: np.ndarray,
        state: WeightingState,
        names: Sequence[str] | None = None,
    ) -> WeightingResult:
        k = gram.shape[0]
        norms = np.sqrt(np.maximum(np.diag(gram), 0.0))
        if losses is None:
            if self.normalize in ("loss", "loss+l2"):
                raise ValueError(f"normalize={self.normalize!r} needs the loss values; pass losses=")
            losses = np.ones(k)
        names = list(names) if names is not None else [f"#{i}" for i in range(k)]
        scales = objective_scales(norms, losses, valid, self.normalize, names)
        if valid.all():  # the QP's input without the masked copies (same values)
            scaled = scaled_gram(gram, scales)
        else:
            scaled = scaled_gram(gram[np.ix_(valid, valid)], scales[valid])
        warm = state.warm_start(valid)
        raw = np.zeros(k)
        raw[valid], status = self.solver.solve(scaled, warm, validated=True)
        smoothed = self._smoothed(self._anchored(raw, valid), state)
        w = combine_weights(smoothed, scales, norms, valid, rescale=self.rescale)
        alpha = np.where(valid, smoothed, 0.0)
        alpha = alpha / alpha.sum()
        # What commit() would recompute for a single micro-batch committed on this same state.
        extra = {"scales": scales, "norms": norms, "smoothed": smoothed, "w": w, "basis": (state.alpha, self._basis())}
        return WeightingResult(raw=raw, alpha=alpha, w=w, valid=valid.copy(), status=status, extra=extra)

    def _basis(self) -> tuple[float, float, bool]:
        return (self.ema_decay, self.anchor, self.rescale)

    def _weights(self, gram, losses, index, k):  # pragma: no cover - weigh is overridden
        raise NotImplementedError

    def commit(self, state: WeightingState, results: Sequence[WeightingResult]) -> WeightingState:
        """EMA of the micro-batches' mean (anchored) α*; w from the last micro-batch's scales."""
        if not results:
            return state
        last = results[-1]
        basis = last.extra.get("basis")
        if len(results) == 1 and basis is not None and basis[0] is state.alpha and basis[1] == self._basis():
            # One micro-batch on the state it was weighed on: the mean of one α* is α* itself,
            # so the smoothed weights and w are those weigh() computed (same operations).
            return WeightingState(alpha=last.extra["smoothed"], warm=last.raw.copy(), loss_weights=last.extra["w"])
        target = self._anchored(np.mean([r.raw for r in results], axis=0), last.valid)
        alpha = self._smoothed(target, state)
        w = combine_weights(alpha, last.extra["scales"], last.extra["norms"], last.valid, rescale=self.rescale)
        return WeightingState(alpha=alpha, warm=last.raw.copy(), loss_weights=w)
