"""What one balancing step did, for logging and diagnostics."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from .balance import MIN_GRAD_NORM, cosine_matrix, update_cosines

__all__ = ["BalanceReport", "DeviceVerdict", "make_report"]


class _Deferred:
    """A field value computed on first access (``fn()``), e.g. the cosines from G."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn


class _LazyField:
    """A dataclass field whose value may be a ``_Deferred``: computed once, when first read.

    Used for the report's derived fields (``cosine``, ``update_cosine``, ``mean_cosine``),
    which a training loop rarely reads: computing them on every step cost ~0.1 ms; and under
    ``skip_on_device`` for ``skipped`` and ``reason``, which wait for the device when read."""

    _NO_DEFAULT = object()

    def __init__(self, default: Any = _NO_DEFAULT) -> None:
        self.default = default

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name
        self.slot = "_lazy_" + name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:  # the dataclass asks for the field's default
            if self.default is _LazyField._NO_DEFAULT:
                raise AttributeError(self.slot)
            return self.default
        if self.slot not in obj.__dict__:  # a report pickled when this field was a plain one
            if self.name in obj.__dict__:
                return obj.__dict__[self.name]
            raise AttributeError(self.name)
        value = obj.__dict__[self.slot]
        if isinstance(value, _Deferred):
            value = value.fn()
            obj.__dict__[self.slot] = value
        return value

    def __set__(self, obj: Any, value: Any) -> None:
        obj.__dict__[self.slot] = value


@dataclass(frozen=True, eq=False)
class BalanceReport:
    """The outcome of one ``MarbleOptimizer.backward`` call.

    Per-objective fields are dicts keyed by objective name, in the optimizer's order
    (``names``). Matrices are float64 numpy arrays (K×K) in that order, or None on a step
    that reused cached weights (``solved=False``, see ``refresh_every``).

    Attributes:
        names: objective names, in order.
        weights: balancing weights α applied this step (smoothed, on the simplex over the
            objectives that took part).
        raw_weights: the QP's solution α* before smoothing (empty when not solved).
        loss_weights: the coefficients ``w_k`` of the update ``d = Σ_k w_k ∇L_k``.
        losses: the loss values (on a cached step under ``skip_on_device``, read from the
            device when first accessed).
        gram: ``G_kl = ⟨∇L_k, ∇L_l⟩`` as measured by the Gram source.
        cosine: ``cos(∇L_k, ∇L_l)``.
        grad_norms: ``‖∇L_k‖``.
        update_cosine: cosine of the combined update ``d`` with each ``∇L_k`` (NaN for an
            excluded objective, whose gradient is zero or not finite).
        mean_cosine: cosine of the plain mean of the gradients with each ``∇L_k`` (the
            weighted-sum baseline's diagnostic, from the same Gram at no extra cost).
        excluded: objectives left out of the QP (zero or non-finite gradient).
        skipped: True when no update was written (non-finite input under
            ``nonfinite="skip"``, or no objective with a usable gradient); with
            ``skip_on_device``, True when the wrapped optimizer skipped the step on the
            device (read from it when first accessed).
        solved: whether the QP was solved this step (False on cached-weight steps).
        solver_status: the path that produced ``raw_weights`` (``"osqp"``,
            ``"active-set"``, ``"closed-form"``, ...), ``"cached"`` or ``"skipped"``.
        reason: why the step was skipped or objectives excluded (which and why), human
            readable; empty when every objective took part.
        self_consistency: with ``gram_estimator="cross"``: ``cos(g_k^A, g_k^B)``, the cosine
            of each objective's gradients on the two halves of the batch (near 0: that
            objective's batch gradient is mostly noise; NaN for one in ``batch_estimated``).
            Empty otherwise.
        batch_estimated: with ``gram_estimator="cross"``: the objectives whose samples all
            fell in one half of the batch (a reward defined for some prompts only), so that
            their row of ``gram`` comes from their whole-batch gradient (the batch estimate on
            the diagonal) instead of the cross products, which would be empty.

    With ``gram_estimator="cross"``, ``gram`` is the raw cross estimate
    ``½(⟨g_k^A, g_l^B⟩ + ⟨g_l^A, g_k^B⟩)`` (before smoothing, PSD projection and the floor);
    ``cosine``, ``grad_norms`` and the update cosines come from the processed matrix the
    weighting saw.
    """

    names: tuple[str, ...]
    weights: dict[str, float]
    raw_weights: dict[str, float]
    loss_weights: dict[str, float]
    losses: dict[str, float] = _LazyField()  # type: ignore[assignment]
    gram: np.ndarray | None
    cosine: np.ndarray | None = _LazyField()  # type: ignore[assignment]
    grad_norms: dict[str, float] = _LazyField()  # type: ignore[assignment]
    update_cosine: dict[str, float] = _LazyField()  # type: ignore[assignment]
    mean_cosine: dict[str, float] = _LazyField()  # type: ignore[assignment]
    excluded: tuple[str, ...]
    skipped: bool = _LazyField()  # type: ignore[assignment]
    solved: bool
    solver_status: str
    reason: str = _LazyField(default="")  # type: ignore[assignment]
    self_consistency: dict[str, float] = field(default_factory=dict)
    batch_estimated: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON types: numpy arrays become nested lists, tuples lists,
        and NaN or ±inf become None (``json.dumps(report.to_dict())`` works)."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    @property
    def worst_update_cosine(self) -> float:
        """The smallest update cosine over the objectives that took part (NaN when not measured)."""
        return min((c for c in self.update_cosine.values() if c == c), default=float("nan"))

    @property
    def worst_mean_cosine(self) -> float:
        """The smallest cosine of the plain mean with an objective that took part (NaN when not measured)."""
        return min((c for c in self.mean_cosine.values() if c == c), default=float("nan"))


def _plain(value: Any) -> Any:
    """``value`` with numpy arrays and scalars, tuples and non-finite floats made JSON-ready."""
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    return value


class DeviceVerdict:
    """``skip_on_device``: what a report's ``skipped`` and ``reason`` read when first accessed.

    ``flag``: an on-device 0-dim bool, True when finite: the gradient a ``backward`` added
    (and a cached step's loss values), replaced by the step's own check of every ``p.grad``
    when ``step(losses)`` steps; None: nothing was found non-finite."""

    def __init__(self, flag: Any, reason: str, what: str = "gradient") -> None:
        self.flag = flag
        self.base = reason
        self.what = what

    def skipped(self) -> bool:
        return self.flag is not None and not bool(self.flag)

    def reason(self) -> str:
        if not self.skipped():
            return self.base
        skipped = f"non-finite {self.what} (the wrapped optimizer skips its step on the device)"
        return f"{self.base}; {skipped}" if self.base else skipped


def make_report(
    names: tuple[str, ...],
    values: Any,
    *,
    weights: np.ndarray | None = None,
    raw: np.ndarray | None = None,
    loss_weights: np.ndarray | None = None,
    gram: np.ndarray | None = None,
    used: np.ndarray | None = None,
    norms: np.ndarray | None = None,
    excluded: tuple[str, ...] = (),
    skipped: bool = False,
    status: str,
    reason: str = "",
    consistency: np.ndarray | None = None,
    batch_estimated: tuple[str, ...] = (),
    verdict: DeviceVerdict | None = None,
) -> BalanceReport:
    """A ``BalanceReport`` from one step's records; derived fields are computed on first access.

    ``values``: the loss values (K,) or a zero-argument callable giving them as a dict (read
    from the device when first accessed); ``used``: the matrix the weighting saw (cosines come
    from it; default ``gram``); ``verdict``: ``skipped``/``reason`` read from the device."""

    def named(x: np.ndarray | None) -> dict[str, float]:
        return {} if x is None else dict(zip(names, np.asarray(x, dtype=np.float64).tolist()))

    seen = used if used is not None else gram
    measured = seen is not None and norms is not None
    memo: list[tuple[np.ndarray, np.ndarray | None, np.ndarray | None]] = []

    def cosines() -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        if memo:
            return memo[0]
        assert seen is not None and norms is not None
        update_cos = mean_cos = None
        if loss_weights is not None:
            update_cos = update_cosines(seen, loss_weights, norms)
            valid = norms > MIN_GRAD_NORM
            mean_cos = update_cosines(seen, np.where(valid, 1.0 / max(int(valid.sum()), 1), 0.0), norms)
            # An excluded objective's gradient is zero or not finite (its row of G was
            # zeroed): its cosine is undefined.
            update_cos = np.where(valid, update_cos, np.nan)
            mean_cos = np.where(valid, mean_cos, np.nan)
        memo.append((cosine_matrix(seen, norms), update_cos, mean_cos))
        return memo[0]

    return BalanceReport(
        names=names,
        weights=named(weights),
        raw_weights=named(raw),
        loss_weights=named(loss_weights),
        losses=_Deferred(values) if callable(values) else named(values),
        gram=gram,
        cosine=_Deferred(lambda: cosines()[0]) if measured else None,
        grad_norms=_Deferred(lambda: named(norms)),
        update_cosine=_Deferred(lambda: named(cosines()[1])) if measured else {},
        mean_cosine=_Deferred(lambda: named(cosines()[2])) if measured else {},
        excluded=excluded,
        skipped=skipped if verdict is None else _Deferred(verdict.skipped),
        solved=raw is not None,
        solver_status=status,
        reason=reason if verdict is None else _Deferred(verdict.reason),
        self_consistency=named(consistency),
        batch_estimated=batch_estimated,
    )
