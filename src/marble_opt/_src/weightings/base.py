"""The Gram-only weighting interface: raw Gram, loss values and validity in; α*, α and w out.

A weighting maps the raw Gram matrix ``G_kl = ⟨g_k, g_l⟩`` (K×K float64) of K
per-objective gradients to per-loss weights ``w`` (K,) with the update ``d = Σ_k w_k g_k``.
It never touches parameters or autograd (TorchJD's split between the Gramian part and the
Jacobian part). Its state between steps (an EMA, a warm start, the cached loss weights) is
one explicit record, ``WeightingState``, that the optimizer saves in ``state_dict``.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

__all__ = ["Weighting", "WeightingResult", "WeightingState", "check_preference", "real_scalar"]


@dataclass
class WeightingState:
    """What a weighting carries from one optimizer step to the next.

    Attributes:
        alpha: the committed balancing weights α (K,), e.g. MARBLE's EMA; None before the
            first committed step.
        warm: the last QP solution α* (K,), a warm start for the next solve; None before.
        loss_weights: the per-loss weights w (K,) reused on cached steps
            (``refresh_every > 1``); None before the first committed step.
        external: a stateful callable weighting's own state after the last committed step
            (``CallableWeighting``: its tensors and plain attributes); None otherwise.
    """

    alpha: np.ndarray | None = None
    warm: np.ndarray | None = None
    loss_weights: np.ndarray | None = None
    external: dict[str, Any] | None = None

    def copy(self) -> WeightingState:
        def c(x: np.ndarray | None) -> np.ndarray | None:
            return None if x is None else x.copy()

        return WeightingState(c(self.alpha), c(self.warm), c(self.loss_weights), self.external)

    def warm_start(self, valid: np.ndarray) -> np.ndarray | None:
        """The last α* restricted to ``valid`` (K,) bool, as a QP warm start; None when there is
        none, it has another K, or it puts no weight on the objectives in ``valid``."""
        if self.warm is None or self.warm.shape != valid.shape or not self.warm[valid].sum() > 0:
            return None
        return self.warm[valid]


@dataclass(frozen=True, eq=False)
class WeightingResult:
    """One weighting's answer for one Gram matrix (every array (K,), 0 outside ``valid``).

    Attributes:
        raw: α*, the method's own solution before any smoothing or anchoring (for MARBLE
            and MGDA the min-norm point; for the others ``w`` normalised to sum 1).
        alpha: the balancing weights applied this step (after MARBLE's EMA and anchor;
            sums to 1 over ``valid`` when the weights are non-negative).
        w: per-loss weights, ``d = Σ_k w_k g_k``. They do **not** sum to 1 in general
            (MARBLE rescales by the gradient norms; UPGrad, CAGrad, Aligned-MTL scale too).
        valid: the objectives that took part.
        status: how α* was obtained (the QP path, ``"closed-form"``, the method's name).
        extra: method-specific values the commit needs (MARBLE: scales and norms).
    """

    raw: np.ndarray
    alpha: np.ndarray
    w: np.ndarray
    valid: np.ndarray
    status: str
    extra: dict[str, Any] = field(default_factory=dict)


class Weighting(abc.ABC):
    """Gram-only balancing rule; subclasses implement ``_weights`` on the valid sub-block.

    ``weigh(gram, losses, valid, state)`` returns a ``WeightingResult`` without changing
    ``state``; ``commit(state, results)`` returns the state after a real optimizer step
    that used ``results`` (one per micro-batch since the last step).
    """

    #: The name ``MarbleOptimizer(weighting=...)`` and ``loss_weights`` accept.
    name: ClassVar[str] = ""
    #: Whether the same Gram and state always give the same weights (then every rank of a
    #: data-parallel job computes them itself; otherwise they are broadcast from the first).
    deterministic: ClassVar[bool] = True

    def load(self, state: WeightingState) -> None:  # noqa: B027 - a no-op for weightings whose state is all in ``state``
        """Make the weighting's own state (if any lives outside ``state``) match ``state``: after
        a step that was not taken, and after ``load_state_dict``."""

    def weigh(
        self,
        gram: np.ndarray,
        losses: np.ndarray | None,
        valid: np.ndarray,
        state: WeightingState,
        names: Sequence[str] | None = None,
    ) -> WeightingResult:
        """Weights for the raw Gram ``gram`` (K×K float64) over the objectives in ``valid`` (K,) bool;
        ``losses`` (K,) the loss values (or None), ``names`` the objectives' names for messages."""
        k = gram.shape[0]
        idx = np.flatnonzero(valid)
        sub = gram[np.ix_(idx, idx)]
        sub_losses = None if losses is None else losses[idx]
        w_sub, status = self._weights(sub, sub_losses, idx, k)
        w = np.zeros(k)
        w[idx] = w_sub
        total = float(w.sum())
        alpha = w / total if total > 0 else w.copy()
        return WeightingResult(raw=alpha.copy(), alpha=alpha, w=w, valid=valid.copy(), status=status)

    @abc.abstractmethod
    def _weights(
        self, gram: np.ndarray, losses: np.ndarray | None, index: np.ndarray, k: int
    ) -> tuple[np.ndarray, str]:
        """Per-loss weights (k,) and a status for a k×k Gram of valid objectives (k ≥ 1).

        ``index`` gives the valid objectives' positions among all ``k`` (for preferences)."""

    def commit(self, state: WeightingState, results: Sequence[WeightingResult]) -> WeightingState:
        """The state after a real step that used ``results`` (the micro-batches' answers).

        Default (stateless methods): the mean α and the mean w over the micro-batches."""
        if not results:
            return state
        return WeightingState(
            alpha=np.mean([r.alpha for r in results], axis=0),
            warm=results[-1].raw.copy(),
            loss_weights=np.mean([r.w for r in results], axis=0),
        )

    def options(self) -> dict[str, Any]:
        """The options this weighting was built with (for ``repr``)."""
        return {}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"


def real_scalar(value: Any) -> float | None:
    """``value`` as a Python float when it is one real number: an int or float (numpy's too),
    or a 0-d tensor or array of a real, non-bool dtype (``torch.tensor(0.7)``); else None.
    Bools are not numbers here."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    if shape is None or tuple(shape) != () or dtype is None:
        return None
    if hasattr(value, "is_floating_point"):  # a torch tensor
        if value.is_complex() or value.dtype == torch.bool:
            return None
        return float(value.detach().cpu().item())
    if isinstance(value, np.ndarray) and value.dtype.kind in "iuf":
        return float(value)
    return None


def check_preference(preference: Any, name: str = "preference") -> np.ndarray | None:
    """A preference vector p as float64 (K,) with p ≥ 0 and Σp > 0, or None."""
    if preference is None:
        return None
    try:
        p = np.asarray(
            preference.detach().cpu() if hasattr(preference, "detach") else preference, dtype=np.float64
        ).reshape(-1)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a vector of non-negative numbers, got {preference!r}") from None
    if p.size == 0 or not np.isfinite(p).all() or (p < 0).any() or not p.sum() > 0:
        raise ValueError(
            f"{name} must be a non-empty vector of finite non-negative numbers, not all 0, got {p.tolist()}"
        )
    return p


def restricted_preference(p: np.ndarray | None, index: np.ndarray, k_total: int | None = None) -> np.ndarray:
    """``p`` restricted to the objectives ``index`` and renormalised to sum 1 (uniform if None)."""
    n = len(index)
    if p is None:
        return np.full(n, 1.0 / n)
    if k_total is not None and p.size != k_total:
        raise ValueError(f"preference has {p.size} entries but there are {k_total} objectives")
    if index.size and index.max() >= p.size:
        raise ValueError(f"preference has {p.size} entries but there are more objectives ({int(index.max()) + 1})")
    sub = p[index]
    total = float(sub.sum())
    return sub / total if total > 0 else np.full(n, 1.0 / n)
