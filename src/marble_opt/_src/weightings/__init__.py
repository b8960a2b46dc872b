"""Weightings: Gram-only rules that turn K per-objective gradients into one update.

One small module per method; ``make_weighting`` builds one from a name, an instance or any
callable with TorchJD's Gramian-weighting signature; ``loss_weights`` is the stateless,
public entry point.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ..balance import MIN_GRAD_NORM
from ..qp import validate_gram
from .aligned_mtl import AlignedMTLWeighting
from .base import Weighting, WeightingResult, WeightingState
from .cagrad import CAGradWeighting
from .external import CallableWeighting
from .imtl_g import IMTLGWeighting
from .marble import MarbleWeighting, check_ema_decay
from .mean import MeanWeighting
from .mgda import MGDAWeighting
from .upgrad import UPGradWeighting

__all__ = [
    "WEIGHTINGS",
    "AlignedMTLWeighting",
    "CAGradWeighting",
    "CallableWeighting",
    "IMTLGWeighting",
    "MGDAWeighting",
    "MarbleWeighting",
    "MeanWeighting",
    "UPGradWeighting",
    "Weighting",
    "WeightingResult",
    "WeightingState",
    "check_ema_decay",
    "loss_weights",
    "make_weighting",
]

#: Weightings by name: ``MarbleOptimizer(weighting=name, weighting_options={...})``.
WEIGHTINGS: dict[str, Callable[..., Weighting]] = {
    "marble": MarbleWeighting,
    "mgda": MGDAWeighting,
    "mean": MeanWeighting,
    "upgrad": UPGradWeighting,
    "cagrad": CAGradWeighting,
    "imtl-g": IMTLGWeighting,
    "aligned-mtl": AlignedMTLWeighting,
}


def make_weighting(weighting: Any, options: dict[str, Any] | None = None) -> Weighting:
    """A ``Weighting`` from a name in ``WEIGHTINGS`` (with ``options``), an instance, or a callable
    ``fn(G) -> w`` such as a ``torchjd.aggregation`` weighting."""
    options = dict(options or {})
    if isinstance(weighting, str):
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {sorted(WEIGHTINGS)} or a callable, got {weighting!r}")
        try:
            return WEIGHTINGS[weighting](**options)
        except TypeError as err:
            raise TypeError(f"weighting={weighting!r} does not take options {sorted(options)}: {err}") from None
    if options:
        raise ValueError(f"weighting_options {sorted(options)} apply only to a weighting given by name")
    if isinstance(weighting, Weighting):
        return weighting
    if callable(weighting):
        return CallableWeighting(weighting)
    raise TypeError(f"weighting must be a name in {sorted(WEIGHTINGS)}, a Weighting or a callable, got {weighting!r}")


def loss_weights(gram: Any, weighting: Any = "upgrad", *, losses: Any = None, **options: Any) -> np.ndarray:
    """Per-loss weights ``w`` (K,) of one Gram matrix: ``d = Σ_k w_k g_k``.

    Stateless (no EMA, no warm start). ``gram`` is the raw ``G_kl = ⟨g_k, g_l⟩`` (K×K, PSD,
    numpy or torch); the method sees every objective, as in its paper and in TorchJD (the
    optimizer instead leaves zero and non-finite gradients out first; MARBLE, which
    normalises, gives a zero gradient weight 0 here too). ``weighting`` is a name in
    ``WEIGHTINGS`` (options as keywords, e.g. ``loss_weights(G, "cagrad", c=0.4)``), a
    ``Weighting`` or a TorchJD-style callable. ``losses`` (K,): only for MARBLE's loss-based
    normalisations.

    The weights do **not** sum to 1 in general: MARBLE rescales by the gradient norms
    (``w_k = α_k·mean‖g‖/‖g_k‖``), UPGrad's projections add weight, CAGrad adds
    ``√φ/‖g_w‖·w*`` to the mean, Aligned-MTL scales by √λ_min, and IMTL-G's weights can be
    negative. Only ``mean`` and ``mgda`` sum to 1.
    """
    g = validate_gram(gram)
    w = make_weighting(weighting, options)
    values = None if losses is None else np.asarray(losses, dtype=np.float64).reshape(-1)
    if values is not None and values.shape != (g.shape[0],):
        raise ValueError(f"losses must have {g.shape[0]} entries, got shape {values.shape}")
    valid = np.ones(g.shape[0], dtype=bool)
    if isinstance(w, MarbleWeighting):  # it normalises: a zero gradient cannot take part
        valid = np.sqrt(np.maximum(np.diag(g), 0.0)) > MIN_GRAD_NORM
        if not valid.any():
            return np.zeros(g.shape[0])
    return w.weigh(g, values, valid, WeightingState()).w
