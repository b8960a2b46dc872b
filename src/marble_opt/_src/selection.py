"""The selection stage: which objectives take part in a step, and why the others do not.

Numpy only: it reads the loss values and the measured Gram matrix and decides, under the
non-finite policy, whether the step goes on, and which objectives are excluded with which
reason. Nothing here touches tensors, parameters or the optimizer.

- A non-finite loss: ``"exclude"`` leaves that objective out (unless every loss is), every
  other policy stops the step (``Verdict``).
- A non-finite ``extra`` loss stops the step under every policy.
- A non-finite gradient (seen as a non-finite diagonal entry of G, or else a non-finite row):
  excluded under ``"exclude"``, else the step stops.
- A zero gradient (``‖g_k‖ = 0``, after the estimator's processing) leaves its objective out of
  the weighting: normalising it is undefined. Small but non-zero gradients take part: the
  default weighting normalises them, so a loss's scale does not decide whether it counts.
- No objective left: the step writes nothing (a skip that no policy raises on).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .balance import MIN_GRAD_NORM

__all__ = ["NONFINITE_POLICIES", "Selection", "Verdict", "check_values", "select"]

#: ``nonfinite=`` policies: skip the step, raise, exclude the objective, or skip and fill
#: ``p.grad`` with NaN (for ``GradScaler``).
NONFINITE_POLICIES = ("skip", "raise", "exclude", "propagate")


@dataclass(frozen=True)
class Verdict:
    """The step stops: nothing is written (``"propagate"``: NaN is), ``reason`` says why."""

    reason: str


@dataclass
class Selection:
    """Who takes part in a step.

    Attributes:
        usable: (K,) bool, a finite loss and a finite gradient (or, on a cached step, a finite
            loss).
        reasons: human-readable exclusions so far (``report.reason``).
        valid: (K,) bool, usable with a non-zero gradient: the objectives the weighting sees.
        gram: K×K, the matrix the weighting sees (rows outside ``usable`` zero; for ``cross``
            the processed estimate).
        raw: K×K, ``report.gram`` (rows outside ``usable`` zero).
        norms: (K,) ``√G_kk`` of ``gram``.
        excluded: the names of the objectives outside ``valid``.
    """

    usable: np.ndarray
    reasons: list[str] = field(default_factory=list)
    valid: np.ndarray | None = None
    gram: np.ndarray | None = None
    raw: np.ndarray | None = None
    norms: np.ndarray | None = None
    excluded: tuple[str, ...] = ()


def _listed(names: Sequence[str], mask: np.ndarray, values: np.ndarray | None = None) -> str:
    idx = np.flatnonzero(mask)
    if values is None:
        return ", ".join(repr(names[k]) for k in idx)
    return ", ".join(f"{names[k]!r} = {values[k]}" for k in idx)


def check_values(values: np.ndarray, names: Sequence[str], policy: str, has_extra: bool) -> Selection | Verdict:
    """The loss values' part of the selection (solved and cached steps alike)."""
    k = len(names)
    losses = values[:k]
    bad = ~np.isfinite(losses)
    selection = Selection(usable=~bad)
    if bad.any():
        detail = _listed(names, bad, losses)
        if policy != "exclude" or bad.all():
            return Verdict(f"non-finite loss: {detail}")
        selection.reasons.append(f"excluded (non-finite loss): {detail}")
    if has_extra and not np.isfinite(values[k]):
        return Verdict(f"non-finite extra loss: {values[k]}")
    return selection


def select(
    selection: Selection,
    gram: np.ndarray,
    raw: np.ndarray,
    names: Sequence[str],
    policy: str,
    process: Callable[[np.ndarray, np.ndarray], np.ndarray],
) -> Selection | Verdict:
    """The gradients' part: non-finite rows of ``gram`` (K×K as measured), then
    ``process(masked gram, usable)`` (the estimator's), then zero gradients."""
    usable = selection.usable
    all_finite = bool(np.isfinite(gram).all())
    if not all_finite:
        # A non-finite g_k makes its own ‖g_k‖² non-finite, and also every ⟨g_j, g_k⟩:
        # blame the diagonal, not the rows it poisons.
        bad = ~np.isfinite(np.diag(gram))
        if not bad.any():
            bad = ~np.isfinite(gram).all(axis=1)
        bad &= usable
        if bad.any():
            if policy != "exclude":
                return Verdict(f"non-finite gradient of {_listed(names, bad)}")
            usable = usable & ~bad
            selection.reasons.append(f"excluded (non-finite gradient): {_listed(names, bad)}")
    if all_finite and usable.all():
        masked = gram.copy()  # every objective usable: nothing to mask (np.where would copy too)
        raw = masked if raw is gram else raw.copy()
    else:
        both = np.outer(usable, usable)
        masked = np.where(both, gram, 0.0)
        raw = masked if raw is gram else np.where(both, raw, 0.0)
    seen = process(masked, usable)
    norms = np.sqrt(np.maximum(np.diag(seen), 0.0))
    valid = usable & (norms > MIN_GRAD_NORM)
    zero = usable & ~valid
    if zero.any():
        selection.reasons.append(f"excluded (zero gradient): {_listed(names, zero)}")
    selection.usable = usable
    selection.valid = valid
    selection.gram = seen
    selection.raw = raw
    selection.norms = norms
    selection.excluded = tuple(names[k] for k in np.flatnonzero(~valid))
    return selection
