"""MarbleOptimizer: a torch optimizer that steps along the min-norm combination of K gradients."""

from __future__ import annotations

import dataclasses
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from itertools import chain
from typing import Any, overload

import numpy as np
import torch
from torch import Tensor
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

from .balance import MIN_GRAD_NORM, cosine_matrix, update_cosines
from .distributed import Collective
from .estimators import GRAM_ESTIMATORS, CrossGram, split_halves
from .report import BalanceReport, _Deferred
from .sources import (
    CombinedGradient,
    GramSource,
    all_finite,
    combined_backward,
    device_finite,
    make_source,
)
from .weightings import MarbleWeighting, Weighting, WeightingResult, WeightingState, make_weighting
from .weightings.marble import check_ema_decay

__all__ = ["MarbleOptimizer"]

_NONFINITE_POLICIES = ("skip", "raise", "exclude", "propagate")


#: MARBLE's own options, accepted as keywords of ``MarbleOptimizer`` for the default weighting.
_MARBLE_OPTIONS = ("ema_decay", "normalize", "rescale", "solver")


#: What a skipped backward saw of ``p.grad``: per parameter, None or (weak reference, version).
_GradMark = tuple[tuple[weakref.ref, int] | None, ...]


def _grad_mark(params: Sequence[Tensor]) -> _GradMark:
    return tuple(None if p.grad is None else (weakref.ref(p.grad), p.grad._version) for p in params)


def _same_grads(params: Sequence[Tensor], mark: _GradMark) -> bool:
    """Whether every ``p.grad`` is the very tensor ``mark`` saw, not written to since."""
    if len(params) != len(mark):
        return False
    for p, m in zip(params, mark):
        if m is None or p.grad is None:
            if (m is None) != (p.grad is None):
                return False
        elif m[0]() is not p.grad or p.grad._version != m[1]:
            return False
    return True


class _Pending:
    """What the micro-batches since the last optimizer step solved, committed by ``step``:
    the weighting's answers and (``gram_estimator="cross"``) the raw cross estimates."""

    def __init__(self) -> None:
        self.results: list[WeightingResult] = []
        self.crosses: list[np.ndarray] = []
        self.skip = False
        #: ``skip_on_device``: whether the loss values of the cached steps were finite, on the
        #: device, unread (the step's check of every ``p.grad`` is AND-ed with it).
        self.device_flag: Tensor | None = None

    @property
    def count(self) -> int:
        return len(self.results)


class _Measured:
    """One solve's measurement: the matrix for the weighting and what the report shows."""

    def __init__(self, gram: np.ndarray, raw: np.ndarray, apply_losses: list[Tensor], expand: Callable) -> None:
        self.gram = gram  # handed to the weighting (K×K)
        self.raw = raw  # report.gram (K×K)
        self.apply_losses = apply_losses  # what source.apply combines
        self.expand = expand  # w (K,) -> the coefficients of apply_losses
        self.consistency: np.ndarray | None = None  # cos(g_k^A, g_k^B) for "cross"
        self.products: np.ndarray | None = None  # ‖g_k^A‖‖g_k^B‖ for "cross"


class MarbleOptimizer(torch.optim.Optimizer):
    r"""Wraps a torch optimizer so it steps along the MARBLE combination of K losses.

    For losses ``{name_k: L_k}`` it measures ``G_kl = ⟨g_k, g_l⟩`` (``g_k = ∇L_k``), scales
    each gradient (``ĝ_k = s_k g_k``, ``normalize``), solves the min-norm QP
    ``α* = argmin_{α∈Δ} ½ αᵀĜα``, smooths it (``α_t = ρ α_{t−1} + (1−ρ) α*_t``) and
    accumulates ``d = m · Σ_k α_k ĝ_k`` into ``p.grad`` (``m = mean‖g_k‖`` for ``"l2"``), so
    clipping, ``GradScaler``, accelerate, LR schedulers and the wrapped optimizer work as
    with ``loss.backward()``. With ρ=0 every objective with ``α_k > 0`` gets the same,
    positive cosine with ``d`` and none gets a negative one.

    It is a ``torch.optim.Optimizer`` whose ``param_groups``, ``state`` and ``defaults`` are
    the wrapped optimizer's own objects.

    The step reads: measure G (the Gram source ``gram`` and the estimator
    ``gram_estimator``) → the weighting (G, loss values, validity → per-loss weights w) →
    the source writes ``Σ_k w_k ∇L_k``. MARBLE (above) is the default weighting.

    Args:
        optimizer: an already built torch optimizer (AdamW, SGD, ...).
        weighting: ``"marble"`` (default), ``"mgda"``, ``"mean"``, ``"upgrad"``,
            ``"cagrad"``, ``"imtl-g"``, ``"aligned-mtl"`` (``marble_opt.WEIGHTINGS``), a
            ``Weighting``, or any callable with TorchJD's Gramian-weighting signature
            (``fn(G: Tensor K×K) -> Tensor (K,)``, e.g. ``torchjd.aggregation.UPGradWeighting()``).
        weighting_options: options of a weighting given by name (``{"c": 0.4}`` for
            CAGrad, ``{"anchor": 0.5, "preference": [...]}`` for MARBLE).
        ema_decay: MARBLE's ρ in [0, 1) (default 0.7, the paper's best value; 0 disables
            smoothing). This and ``normalize``, ``rescale``, ``solver`` are MARBLE's options
            (``solver`` also MGDA's): refused with another weighting.
        normalize: ``"l2"`` (ĝ = g/‖g‖), ``"none"``, ``"loss"`` (ĝ = g/L), ``"loss+l2"``.
        rescale: scale the update to the mean raw gradient norm, ``d = m·Σ_k α_k ĝ_k`` with
            ``m = mean‖g_k‖ / mean‖ĝ_k‖`` (the authors' choice). With ``False`` the update
            has the scale of the normalised gradients (unit scale for ``"l2"``), which does
            not follow a loss scale: do not combine it with ``GradScaler``.
        solver: ``"osqp"`` or any name ``min_norm_weights`` accepts.
        gram: ``"exact"``, ``"exact-lean"``, ``"shared"`` or ``"params"``: how the
            per-objective gradients are measured (``marble_opt.GRAM_SOURCES``; the README's
            "Gram sources" table).
        gram_params: the parameters ``gram="params"`` measures G on.
        gram_estimator: ``"batch"`` (default: G of the whole batch's gradients) or
            ``"cross"``: losses are per-sample (B,) tensors, G is the cross product of two
            disjoint halves' gradients, ``½(⟨g_k^A, g_l^B⟩ + ⟨g_l^A, g_k^B⟩)``, unbiased for
            ``⟨E g_k, E g_l⟩`` (see ``marble_opt._src.estimators``); not with ``gram="shared"``.
        estimator_options: for ``"cross"``: ``{"floor": 0.01, "ema": 0.0}``.
        refresh_every: solve the QP on every N-th optimizer step; in between, reuse the
            last loss weights with one ordinary backward.
        nonfinite: a non-finite loss or gradient ``"skip"``\ s the step (parameters,
            optimizer state, weights and ``p.grad`` untouched, ``report.skipped``),
            ``"raise"``\ s ``FloatingPointError``, or is ``"exclude"``\ d from the QP for
            that step. ``"propagate"`` skips like ``"skip"`` but fills ``p.grad`` with NaN,
            as ``loss.backward()`` would: use it with fp16 ``GradScaler``, which then sees
            the overflow, skips its step and lowers its scale.
        skip_on_device: with a wrapped optimizer that can skip a step on the device
            (``torch.optim.Adam``, ``AdamW`` or ``SGD`` built with ``fused=True``, or any whose
            fused step reads ``found_inf``), check finiteness there instead of on the host:
            ``backward`` adds the gradient to ``p.grad`` whatever it holds, and this
            optimizer's ``step()`` checks every ``p.grad`` entry by entry on the device and
            hands the result to the wrapped step as ``found_inf`` (as ``GradScaler`` does). A
            balancing step then makes one device-to-host transfer (the loss values with G)
            and a cached step none, for every Gram source. Non-finite losses and gradients
            that G shows are still skipped on the host as under ``"skip"``; on a first step
            (no optimizer state yet, which the fused kernel would create even when skipping)
            the flag is read on the host. Otherwise a non-finite gradient makes the kernel
            skip (parameters and its state untouched), but ``p.grad`` keeps it (call
            ``zero_grad()``: until then every step skips), the step hooks run, and the
            weighting's state (the smoothed weights, ``num_steps``) advances as if the step
            had been taken; ``report.skipped`` and ``report.reason`` (and a cached step's
            ``report.losses``) are read from the device when first accessed. A closure runs
            before the check. Step through this optimizer, not the wrapped one. Needs
            ``nonfinite="skip"``; not under ``torch.distributed``.
        process_group: the ranks of a data-parallel job to agree with. ``None``: the
            default group whenever ``torch.distributed`` is initialized; a
            ``ProcessGroup``: that one; ``False``: none (each rank balances its own batch).
            With equal local batches and losses that are local means, the step equals one
            process on the whole batch (see ``marble_opt._src.distributed``): wrap the model
            in DDP as usual; the exact sources average their per-objective gradients
            themselves, the others rely on DDP for their one ordinary backward.

    Objectives are fixed by the first call: later calls must pass the same names (any
    order), else ``ValueError`` names the missing or new ones; ``reset_weights()`` forgets
    them together with the smoothed weights.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        weighting: str | Weighting | Callable[[Tensor], Tensor] = "marble",
        weighting_options: Mapping[str, Any] | None = None,
        ema_decay: float | None = None,
        normalize: str | None = None,
        rescale: bool | None = None,
        solver: str | None = None,
        gram: str = "exact",
        gram_params: Sequence[Tensor] | None = None,
        gram_estimator: str = "batch",
        estimator_options: Mapping[str, Any] | None = None,
        refresh_every: int = 1,
        nonfinite: str = "skip",
        skip_on_device: bool = False,
        process_group: Any = None,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, MarbleOptimizer):
            raise TypeError("optimizer is already a MarbleOptimizer; wrap the base optimizer once")
        self._weighting = self._build_weighting(
            weighting, weighting_options, ema_decay=ema_decay, normalize=normalize, rescale=rescale, solver=solver
        )
        if isinstance(refresh_every, bool) or not isinstance(refresh_every, int) or refresh_every < 1:
            raise ValueError(f"refresh_every must be an int >= 1, got {refresh_every!r}")
        if nonfinite not in _NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {_NONFINITE_POLICIES}, got {nonfinite!r}")
        if not isinstance(skip_on_device, bool):
            raise TypeError(f"skip_on_device must be True or False, got {skip_on_device!r}")
        if skip_on_device:
            self._check_device_skip(optimizer, nonfinite)
        if gram_estimator not in GRAM_ESTIMATORS:
            raise ValueError(f"gram_estimator must be one of {GRAM_ESTIMATORS}, got {gram_estimator!r}")
        if gram_estimator == "cross" and gram == "shared":
            raise ValueError(
                "gram_estimator='cross' does not work with gram='shared': the two halves of the batch occupy "
                "disjoint rows of the shared tensor, so every cross product ⟨g_k^A, g_l^B⟩ there is exactly zero; "
                "use a parameter-space source (gram='exact', 'exact-lean' or 'params')"
            )
        if estimator_options is not None and gram_estimator != "cross":
            raise ValueError(f"estimator_options apply to gram_estimator='cross', not {gram_estimator!r}")
        self._cross = CrossGram(**dict(estimator_options or {})) if gram_estimator == "cross" else None
        if gram_params is not None:
            gram_params = self._check_gram_params(optimizer, gram_params)
        self.source: GramSource = make_source(gram, gram_params)
        self._comm = Collective(process_group)
        self._comm.check_params(p for group in optimizer.param_groups for p in group["params"])
        self.source.comm = self._comm

        # torch.optim.Optimizer.__init__ would build its own param_groups/state; we share the
        # wrapped optimizer's instead and set up only the hook tables it relies on.
        self.optimizer = optimizer
        self._optimizer_step_pre_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_step_post_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_pre_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_post_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: dict[int, Callable] = OrderedDict()
        self._patch_step_function()

        self.refresh_every = refresh_every
        self.nonfinite = nonfinite
        self.skip_on_device = skip_on_device
        self._stepping = False  # inside step(losses) with skip_on_device: the step checks p.grad
        self._step_flag: Tensor | None = None  # that check, for step(losses)'s report
        self._verdict: _DeviceVerdict | None = None  # the last backward's, for step(losses) to fill
        self._gram_name = gram
        self._estimator_name = gram_estimator
        self._names: tuple[str, ...] | None = None
        self._wstate = WeightingState()  # the weighting's whole state between steps
        self._pending = _Pending()
        # The gradients as the last backward of this accumulation left them, while it holds a
        # skip or a pending loss flag: either is forgotten once someone clears or replaces them.
        self._stale_mark: _GradMark | None = None
        self.num_steps = 0

    @staticmethod
    def _check_device_skip(optimizer: torch.optim.Optimizer, nonfinite: str) -> None:
        """``skip_on_device=True`` needs ``nonfinite="skip"`` and a wrapped optimizer whose step
        reads ``found_inf`` (fused Adam, AdamW, SGD: as under ``GradScaler``)."""
        if nonfinite != "skip":
            raise ValueError(f"skip_on_device=True works with nonfinite='skip', not nonfinite={nonfinite!r}")
        fused = [group.get("fused") for group in optimizer.param_groups]
        # The marker torch sets on fused optimizers is not pickled: the classes known to read
        # found_inf in their fused step count too.
        known = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad))
        if not (known or getattr(optimizer, "_step_supports_amp_scaling", False)) or not all(fused):
            raise ValueError(
                f"skip_on_device=True needs a wrapped optimizer that skips a step on the device when told "
                f"found_inf: torch.optim.Adam, AdamW or SGD built with fused=True; got {type(optimizer).__name__} "
                f"with fused={fused[0] if len(set(map(repr, fused))) == 1 else fused!r}"
            )

    @staticmethod
    def _build_weighting(weighting: Any, options: Mapping[str, Any] | None, **marble: Any) -> Weighting:
        """The weighting from a name, an instance or a callable; MARBLE's keyword options
        (``ema_decay``, ``normalize``, ``rescale``, ``solver``) only where they apply."""
        given = {k: v for k, v in marble.items() if v is not None}
        options = dict(options or {})
        if weighting == "marble":
            clash = sorted(set(given) & set(options))
            if clash:
                raise ValueError(f"{clash} given both as keywords and in weighting_options; give each once")
            return make_weighting("marble", {**given, **options})
        if weighting == "mgda" and set(given) <= {"solver"}:
            return make_weighting("mgda", {**given, **options})
        if given:
            name = weighting if isinstance(weighting, str) else type(weighting).__name__
            raise ValueError(
                f"{sorted(given)} are options of weighting='marble', not of weighting={name!r}; "
                "pass that weighting's own options in weighting_options={...}"
            )
        return make_weighting(weighting, options)

    # ---- the wrapped optimizer's objects, shared (never copied) -------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim.Optimizer pickles only defaults/state/param_groups; we keep everything
        # (the weighting drops its solver's OSQP workspaces itself; they are rebuilt on demand).
        state = self.__dict__.copy()
        state["_stale_mark"] = None  # weak references: a restored skip or flag is kept (it cannot be judged stale)
        # An LR scheduler replaces self.step by a wrapper bound to *this* object (unpicklable,
        # and a deepcopy would step the original); torch.optim.Optimizer never copies it.
        state.pop("step", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        state.pop("_skip_mark", None)  # the same mark, pickled under its earlier name
        state.setdefault("_stale_mark", None)
        state.setdefault("skip_on_device", False)  # pickled before the option existed
        state.setdefault("_stepping", False)
        state.setdefault("_step_flag", None)
        state.setdefault("_verdict", None)
        self.__dict__.update(state)
        self._patch_step_function()

    @property
    def weighting(self) -> Weighting:
        """The weighting (``MarbleWeighting`` by default; fixed at construction)."""
        return self._weighting

    @property
    def gram_estimator(self) -> str:
        """``"batch"`` or ``"cross"`` (fixed at construction)."""
        return self._estimator_name

    @property
    def ema_decay(self) -> float:
        """ρ of MARBLE's EMA of the weights; settable (e.g. by a schedule), in [0, 1). 0 for
        weightings without smoothing."""
        return float(getattr(self._weighting, "ema_decay", 0.0))

    @ema_decay.setter
    def ema_decay(self, value: float) -> None:
        if not isinstance(self._weighting, MarbleWeighting):
            raise ValueError(f"ema_decay is an option of weighting='marble', not of {self._weighting!r}")
        self._weighting.ema_decay = check_ema_decay(value)

    @property
    def normalize(self) -> str | None:
        """MARBLE's scale normalisation (None for other weightings)."""
        return getattr(self._weighting, "normalize", None)

    @property
    def rescale(self) -> bool | None:
        """MARBLE's rescaling (None for other weightings)."""
        return getattr(self._weighting, "rescale", None)

    @property
    def _loss_weights(self) -> np.ndarray | None:
        """The per-loss weights cached for steps between solves (``refresh_every``)."""
        return self._wstate.loss_weights

    @property
    def gram(self) -> str:
        """The Gram source's name (fixed at construction)."""
        return self._gram_name

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)
        if self.skip_on_device:
            try:
                self._check_device_skip(self.optimizer, self.nonfinite)
            except ValueError:
                self.optimizer.param_groups.pop()
                raise

    def __repr__(self) -> str:
        w = self._weighting
        head = ", ".join(f"{k}={v!r}" for k, v in w.options().items())
        if not isinstance(w, MarbleWeighting):
            head = f"weighting={w!r}"
        est = f", gram_estimator={self._estimator_name!r}" if self._estimator_name != "batch" else ""
        return (
            f"MarbleOptimizer(gram={self._gram_name!r}{est}, {head}, refresh_every={self.refresh_every}, "
            f"nonfinite={self.nonfinite!r}{', skip_on_device=True' if self.skip_on_device else ''},\n  {self.optimizer!r})"
        )

    # ---- public API --------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        """The objectives' names, fixed by the first ``backward`` (empty before)."""
        return self._names or ()

    @property
    def weights(self) -> dict[str, float]:
        """The committed balancing weights α by objective (MARBLE: smoothed; empty before the first step)."""
        if self._wstate.alpha is None or self._names is None:
            return {}
        return dict(zip(self._names, self._wstate.alpha.tolist()))

    def reset_weights(self) -> None:
        """Forget the objectives, the smoothed weights and the cached loss weights."""
        self._names = None
        self._wstate = WeightingState()
        if self._cross is not None:
            self._cross.reset()
        self._pending = _Pending()
        self._stale_mark = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)
        # A new accumulation: forget a skipped backward whose step() never came (GradScaler
        # skips calling it on inf) and weights of micro-batches whose gradients are gone.
        self._pending = _Pending()
        self._stale_mark = None

    def backward(
        self,
        losses: Mapping[str, Tensor],
        *,
        shared: Tensor | Sequence[Tensor] | None = None,
        extra: Tensor | None = None,
        groups: Any = None,
    ) -> BalanceReport:
        """Accumulate the balanced gradient of ``losses`` into ``p.grad``.

        Args:
            losses: ``{name: loss}``, K ≥ 1, each with a path to a trainable parameter: a
                scalar, or with ``gram_estimator="cross"`` a (B,) tensor of per-sample losses
                (the same B for every objective; the update uses their means).
            shared: for ``gram="shared"``: the tensor (or tensors) every loss is computed from.
            extra: an optional scalar loss added to the update unbalanced (a KL or weight
                penalty): its gradient is added after balancing.
            groups: with ``gram_estimator="cross"``: a group id per sample (B,), e.g. the
                prompt; whole groups go to one half (default: even samples to half A, odd to B).

        Returns:
            A ``BalanceReport``. When it says ``skipped``, no gradient was written and the
            next ``step()`` leaves parameters and optimizer state untouched. A skip whose
            ``step()`` never came (``GradScaler`` does not call it on an overflow) is
            forgotten once the gradients it saw are cleared or replaced by any means
            (``zero_grad()`` of this optimizer or of the model, ``p.grad = None``), so it
            never swallows the step of a later accumulation. (Under ``"skip"`` with no
            gradient at all yet, clearing leaves nothing to see: call ``zero_grad()`` of
            this optimizer, or ``step()``, after such a skip.)
        """
        self._forget_stale()
        report = self._backward(losses, shared, extra, groups)
        if self._pending.skip or self._pending.device_flag is not None:
            self._stale_mark = _grad_mark(self._trainable_params())
        return report

    def _forget_stale(self) -> None:
        """Drop a skip, or a cached step's pending loss flag (``skip_on_device``), whose
        gradients someone cleared or replaced since (a new accumulation)."""
        pending = self._pending
        if (pending.skip or pending.device_flag is not None) and self._stale_mark is not None:
            if not _same_grads(self._trainable_params(), self._stale_mark):
                if pending.skip:
                    self._pending = _Pending()
                else:
                    pending.device_flag = None
                self._stale_mark = None

    def _backward(
        self,
        losses: Mapping[str, Tensor],
        shared: Tensor | Sequence[Tensor] | None,
        extra: Tensor | None,
        groups: Any,
    ) -> BalanceReport:
        if self.skip_on_device and self._comm.active:
            raise ValueError("skip_on_device=True is not supported under torch.distributed: construct with False")
        if self._cross is not None:
            names, tensors, mask, per_sample = self._check_per_sample(losses, groups)
        else:
            if groups is not None:
                raise ValueError("groups= is only used with gram_estimator='cross'")
            names, tensors = self._check_losses(losses)
            mask, per_sample = None, None
        shared_list = self._check_shared(shared)
        self.source.check_shared(shared_list)  # on cached steps too, so errors do not depend on the step
        if extra is not None:
            extra = self._check_scalar("extra", extra)
        gram_params = getattr(self.source, "gram_params", None)
        if gram_params is not None:  # frozen since construction?
            self._check_gram_params(self.optimizer, gram_params)
        params = self._trainable_params()
        # The K loss values (and extra's) in one float64 tensor: one conversion, one transfer
        # (float32/16 -> float64 is exact, so the values are those of a per-loss .double()).
        local = torch.stack([t.detach() for t in tensors] + ([extra.detach()] if extra is not None else []))
        local = local.to(torch.float64)
        solve = self._loss_weights is None or self.num_steps % self.refresh_every == 0 or self._pending.count > 0
        cross = None if mask is None else (mask, per_sample)
        measured = None
        if not solve and self.nonfinite != "exclude" and not self._comm.active:
            return self._apply_cached_one_read(names, local, tensors, params, extra)
        if solve and not self._comm.active:
            # One device-to-host transfer for the loss values and G together: the source reads
            # ``local`` with its Gram. A non-finite loss is then found after the Gram passes
            # (their cost is wasted on such a step; the outcome is the same: nothing written).
            measured, host = self._measure_with(local, names, tensors, params, shared_list, extra is not None, cross)
        else:
            host = local.cpu().numpy()
        # Under torch.distributed: the mean over ranks, non-finite on every rank if on any.
        values = self._comm.mean_losses(host, tensors[0].device)
        values, extra_value = values[: len(names)], (values[len(names)] if extra is not None else 0.0)
        bad_loss = ~np.isfinite(values)
        excluded_bad = np.zeros(len(names), dtype=bool)
        reasons: list[str] = []
        if bad_loss.any():
            detail = ", ".join(f"{names[k]!r} = {values[k]}" for k in np.flatnonzero(bad_loss))
            if self.nonfinite != "exclude" or bad_loss.all():
                return self._nonfinite(names, values, f"non-finite loss: {detail}")
            excluded_bad |= bad_loss
            reasons.append(f"excluded (non-finite loss): {detail}")
        if not np.isfinite(extra_value):
            return self._nonfinite(names, values, f"non-finite extra loss: {extra_value}")

        if not solve:
            return self._apply_cached(names, values, tensors, params, extra, reasons)
        return self._solve_and_apply(
            names, values, tensors, params, shared_list, extra, excluded_bad, reasons, cross, measured
        )

    def _measure_with(self, local, names, tensors, params, shared, keep_graph, cross) -> tuple[_Measured, np.ndarray]:
        """``_measure`` with the source carrying ``local`` (the loss values, on the device)
        to the host together with G; a source that cannot carry it leaves it to one read here."""
        source = self.source
        source.carry = local
        try:
            m = self._measure(names, tensors, params, shared, keep_graph, cross)
        except BaseException:
            source.release()
            raise
        finally:
            source.carry = None
            carried = source.__dict__.pop("carried", None)
        return m, (local.cpu().numpy() if carried is None else carried)

    @overload
    def step(
        self,
        losses: Mapping[str, Tensor],
        *,
        shared: Tensor | Sequence[Tensor] | None = ...,
        extra: Tensor | None = ...,
        groups: Any = ...,
        closure: None = ...,
    ) -> BalanceReport: ...

    @overload
    def step(
        self,
        losses: Callable[[], Any] | None = ...,
        *,
        shared: None = ...,
        extra: None = ...,
        groups: None = ...,
        closure: Callable[[], Any] | None = ...,
    ) -> Any: ...

    def step(  # type: ignore[override]
        self,
        losses: Mapping[str, Tensor] | Callable[[], Any] | None = None,
        *,
        shared: Tensor | Sequence[Tensor] | None = None,
        extra: Tensor | None = None,
        groups: Any = None,
        closure: Callable[[], Any] | None = None,
    ) -> BalanceReport | Any:
        """With ``losses``: ``backward(losses, ...)`` then the wrapped step; returns the report.

        Without: the wrapped optimizer's step on the gradients already in ``p.grad`` (the
        ``GradScaler`` / accelerate path), returning what it returns. Either way the step is
        not taken if a ``backward`` of this accumulation skipped (the returned report then
        says ``skipped``); the smoothed weights advance only when the wrapped step really runs.

        Step hooks (``register_step_pre_hook`` / ``register_step_post_hook``) run around the
        wrapped step only: the pre-hook sees the balanced gradient in ``p.grad``, and neither
        runs on a skipped step. They receive ``args=(self,)`` and ``kwargs`` holding the
        ``closure`` if one was given. An LR scheduler still counts a skipped step (as with
        ``GradScaler``); condition ``scheduler.step()`` on ``not report.skipped`` if it must not.
        """
        if callable(losses) and not isinstance(losses, Mapping):
            closure, losses = losses, None  # positional closure, as torch.optim passes it
        report = None
        if losses is not None:
            if closure is not None:
                raise ValueError("pass either losses or a closure to step(), not both")
            if self.skip_on_device:  # refused before backward writes anything
                self._check_device_skip(self.optimizer, self.nonfinite)
            self._stepping = self.skip_on_device  # the step checks p.grad: backward need not
            try:
                report = self.backward(losses, shared=shared, extra=extra, groups=groups)
            finally:
                self._stepping = False
        elif shared is not None or extra is not None or groups is not None:
            raise ValueError("shared=, extra= and groups= need losses: step(losses, shared=..., extra=...)")
        if self._pending.skip:
            self._pending = _Pending()
            self._stale_mark = None
            if report is not None and not report.skipped:
                reason = "a backward() earlier in this accumulation skipped; no step was taken"
                report = dataclasses.replace(report, skipped=True, reason=reason)
            return report
        self._step_flag = None
        out = self._hooked_step(closure)
        flag, self._step_flag = self._step_flag, None
        verdict, self._verdict = self._verdict, None
        if losses is not None and verdict is not None and flag is not None:
            verdict.flag = flag  # skip_on_device: step(losses)'s report tells the step's own check
        return report if losses is not None else out

    # torch.optim.Optimizer would wrap ``step`` to run the step hooks around the whole call,
    # before step(losses) has written the gradient and on skipped steps too: run them here.
    step.hooked = True  # type: ignore[attr-defined]

    def _hooked_step(self, closure: Callable[[], Any] | None) -> Any:
        """The wrapped optimizer's step between this optimizer's step hooks, then the commit."""
        args: tuple[Any, ...] = (self,)
        kwargs: dict[str, Any] = {} if closure is None else {"closure": closure}
        # The profiler's label for this step (as torch.optim.Optimizer gives one), only while
        # a profiler records: entering a record_function costs ~30 µs per step otherwise.
        label = f"Optimizer.step#{type(self).__name__}.step"
        with torch.autograd.profiler.record_function(label) if torch.autograd._profiler_enabled() else nullcontext():
            for hook in chain(_global_optimizer_pre_hooks.values(), self._optimizer_step_pre_hooks.values()):
                result = hook(self, args, kwargs)
                if result is not None:
                    if not (isinstance(result, tuple) and len(result) == 2):
                        raise RuntimeError(
                            f"step pre-hook {hook!r} must return None or (new_args, new_kwargs), got {result!r}"
                        )
                    args, kwargs = result
            closure = kwargs.get("closure")
            if self.skip_on_device:
                stepped, out = self._step_on_device(closure)
                if not stepped:  # a first step with a non-finite gradient, seen on the host
                    self._pending = _Pending()
                    return out
            else:
                out = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
            self._commit()
            for hook in chain(self._optimizer_step_post_hooks.values(), _global_optimizer_post_hooks.values()):
                hook(self, args, kwargs)
        return out

    def _step_on_device(self, closure: Callable[[], Any] | None) -> tuple[bool, Any]:
        """``skip_on_device``: the wrapped (fused) step told ``found_inf`` = some ``p.grad`` (or a
        cached step's loss value) is not finite, checked on the device entry by entry: its
        kernel then leaves parameters and state untouched, with no host read (the way
        ``GradScaler`` hands it over; attributes the optimizer had are restored). A closure runs
        first, so that the check sees the gradient it computes. Where some parameter with a
        gradient has no state yet (a first step, whose state the kernel would create even when
        skipping), the flag is read on the host instead: ``(False, None)`` for a skip."""
        opt = self.optimizer
        self._check_device_skip(opt, self.nonfinite)  # a group added or changed since
        out = None
        if closure is not None:
            with torch.enable_grad():
                out = closure()
        params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return True, opt.step()
        flag = device_finite([p.grad for p in params])
        if self._pending.device_flag is not None:
            flag = flag & self._pending.device_flag.to(flag.device)
        self._step_flag = flag
        if any(not opt.state.get(p) for p in params) and _creates_state(opt):
            if not bool(flag):
                return False, out
            opt.step()
            return True, out
        saved = {name: opt.__dict__[name] for name in ("found_inf", "grad_scale") if name in opt.__dict__}
        opt.found_inf = (~flag).to(torch.float32)
        opt.grad_scale = None
        try:
            opt.step()
            return True, out
        finally:
            for name in ("found_inf", "grad_scale"):
                if name in saved:
                    setattr(opt, name, saved[name])
                else:
                    opt.__dict__.pop(name, None)

    # ---- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict plus a ``"marble"`` entry (tensors and scalars):
        the objectives, the weighting's state (``ema``: α, ``last_raw``: the warm start,
        ``loss_weights``: the cached w), the step count and the cross estimator's EMA of G.

        Hooks registered with ``register_state_dict_pre_hook`` / ``_post_hook`` run as on any
        torch optimizer (the post-hook sees, and may replace, the dict with its ``"marble"``
        entry). A plain torch optimizer loading this dict ignores ``"marble"`` silently.
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        sd = self.optimizer.state_dict()
        st = self._wstate

        def t(x: np.ndarray | None) -> Tensor | None:
            return None if x is None else torch.from_numpy(np.array(x, dtype=np.float64, copy=True))

        sd["marble"] = {
            "names": list(self._names) if self._names is not None else None,
            "ema": t(st.alpha),
            "last_raw": t(st.warm),
            "loss_weights": t(st.loss_weights),
            "num_steps": int(self.num_steps),
            "weighting": self._weighting.name,
            "gram_ema": t(self._cross.value) if self._cross is not None else None,
        }
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict()``; one without ``"marble"`` (a plain optimizer's) resets the weights.

        ``register_load_state_dict_pre_hook`` hooks may replace the dict (e.g. torch's recipe
        for another parameter order); ``_post_hook`` hooks run once everything is loaded.
        """
        state_dict = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = dict(result)
        marble = state_dict.pop("marble", None)
        self.optimizer.load_state_dict(state_dict)
        self.reset_weights()
        if marble is not None:
            self._load_marble(marble)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _load_marble(self, marble: dict[str, Any]) -> None:
        names = marble.get("names")
        self._names = tuple(names) if names is not None else None

        def arr(key: str) -> np.ndarray | None:
            value = marble.get(key)
            return None if value is None else torch.as_tensor(value, dtype=torch.float64).numpy().copy()

        self._wstate = WeightingState(alpha=arr("ema"), warm=arr("last_raw"), loss_weights=arr("loss_weights"))
        if self._cross is not None:
            self._cross.value = arr("gram_ema")
        self.num_steps = int(marble.get("num_steps", 0))

    # ---- internals -------------------------------------------------------------------------
    def _trainable_params(self) -> list[Tensor]:
        # Deduplicated by identity: a parameter listed twice gets its gradient once, from every source.
        seen: set[int] = set()
        params = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        if not params:
            raise ValueError("the wrapped optimizer has no parameter that requires grad")
        return params

    @staticmethod
    def _check_gram_params(optimizer: torch.optim.Optimizer, gram_params: Sequence[Tensor]) -> list[Tensor]:
        if isinstance(gram_params, Tensor):
            gram_params = [gram_params]
        gram_params = list(gram_params)
        if not gram_params:
            raise ValueError("gram_params is empty: name at least one parameter to measure G on")
        known = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for i, p in enumerate(gram_params):
            if not isinstance(p, Tensor):
                raise TypeError(f"gram_params[{i}] must be a tensor (a parameter), got {type(p).__name__}")
            if id(p) not in known:
                raise ValueError(
                    f"gram_params[{i}] (shape {tuple(p.shape)}) is not a parameter of the wrapped optimizer"
                )
            if not p.requires_grad:
                raise ValueError(
                    f"gram_params[{i}] (shape {tuple(p.shape)}) does not require grad: gram='params' measures G "
                    "on it; unfreeze it, or build the optimizer with gram_params it can differentiate"
                )
        return gram_params

    @staticmethod
    def _check_scalar(name: str, value: Any) -> Tensor:
        if not isinstance(value, Tensor):
            raise TypeError(f"loss {name!r} must be a torch.Tensor, got {type(value).__name__}: {value!r}")
        if value.numel() != 1:
            raise ValueError(f"loss {name!r} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        if value.is_complex():
            raise ValueError(
                f"loss {name!r} is complex ({value.dtype}): losses must be real; pass e.g. its .real or .abs()"
            )
        if not value.requires_grad:
            raise ValueError(
                f"loss {name!r} = {float(value.detach())} does not require grad: it has no path to a "
                "trainable parameter (was it computed under torch.no_grad() or from detached tensors?)"
            )
        return value if value.dim() == 0 else value.reshape(())  # no view node for a scalar

    def _check_losses(self, losses: Mapping[str, Tensor]) -> tuple[tuple[str, ...], list[Tensor]]:
        if not isinstance(losses, Mapping):
            raise TypeError(f"losses must be a dict {{name: scalar loss}}, got {type(losses).__name__}")
        if not losses:
            raise ValueError("losses is empty: pass at least one {name: loss}")
        for key in losses:
            if not isinstance(key, str):
                raise TypeError(f"loss names must be strings, got {key!r} ({type(key).__name__})")
        # Under torch.distributed: the same keys on every rank (else ValueError on every rank,
        # not a hang), in one order (the first rank's), before any collective.
        agreed = self._comm.agree_names(tuple(losses))
        if self._names is None:
            names = agreed
        else:
            names = self._names
            missing = [n for n in names if n not in losses]
            new = [n for n in losses if n not in names]
            if missing or new:
                raise ValueError(
                    f"the objectives changed since the first step: missing {missing}, new {new} "
                    f"(expected {list(names)}); pass a NaN loss to leave one out for a step with "
                    "nonfinite='exclude', or call reset_weights() to start over with new objectives"
                )
        tensors = [self._check_scalar(n, losses[n]) for n in names]
        return names, tensors

    def _check_shared(self, shared: Tensor | Sequence[Tensor] | None) -> list[Tensor] | None:
        if shared is None:
            return None
        if isinstance(shared, Tensor):
            return [shared]
        if isinstance(shared, Sequence) and shared:
            return list(shared)
        raise TypeError(f"shared must be a tensor or a non-empty list of tensors, got {type(shared).__name__}")

    def _nonfinite(self, names: tuple[str, ...], values: np.ndarray, reason: str) -> BalanceReport:
        self.source.release()
        if self.nonfinite == "raise":
            raise FloatingPointError(f"{reason} (nonfinite='raise')")
        self._pending.skip = True
        if self.nonfinite == "propagate":
            for p in self._trainable_params():
                if p.grad is None:
                    p.grad = torch.full_like(p, float("nan"))
                else:
                    p.grad.fill_(float("nan"))
        return self._report(names, values, skipped=True, status="skipped", reason=reason)

    def _check_per_sample(
        self, losses: Mapping[str, Tensor], groups: Any
    ) -> tuple[tuple[str, ...], list[Tensor], np.ndarray, list[Tensor]]:
        """Names, whole-batch mean losses, the half-A mask and the per-sample losses, for
        ``gram_estimator="cross"``."""
        if not isinstance(losses, Mapping):
            raise TypeError(f"losses must be a dict {{name: per-sample losses}}, got {type(losses).__name__}")
        scalars = {}
        batch = None
        for name, value in losses.items():
            if not isinstance(value, Tensor):
                raise TypeError(f"loss {name!r} must be a torch.Tensor, got {type(value).__name__}: {value!r}")
            if value.dim() != 1 or value.shape[0] < 2:
                raise ValueError(
                    f"gram_estimator='cross' needs per-sample losses: loss {name!r} must be a (B,) tensor "
                    f"with B >= 2, got shape {tuple(value.shape)}"
                )
            if batch is None:
                batch = value.shape[0]
            elif value.shape[0] != batch:
                raise ValueError(
                    f"loss {name!r} has {value.shape[0]} per-sample values, but the first loss has {batch}: "
                    "every objective needs one loss per sample of the same batch"
                )
            scalars[name] = value
        # The whole batch's mean losses, checked once (an empty dict is refused there).
        names, means = self._check_losses({n: v.mean() for n, v in scalars.items()})
        assert batch is not None
        mask = split_halves(batch, groups)
        if mask.all() or not mask.any():
            raise ValueError(f"groups put every sample in one half ({batch} samples): pass at least two groups")
        per_sample = [scalars[n] for n in names]
        return names, means, mask, per_sample

    def _measure(self, names, tensors, params, shared, keep_graph: bool, cross) -> _Measured:
        """G for the weighting, report.gram, and how to apply w: the batch or the cross estimate."""
        if cross is None:
            gram = self.source.gram(tensors, names, params, shared, keep_graph=keep_graph)
            return _Measured(gram, gram, tensors, lambda w: w)
        mask, per_sample = cross
        halves, frac_a, frac_b = CrossGram.half_losses(per_sample, mask)
        half_names = [f"{n}[A]" for n in names] + [f"{n}[B]" for n in names]
        g2 = self.source.gram(halves, half_names, params, None, keep_graph=keep_graph)
        k = len(names)
        g2 = 0.5 * (g2 + g2.T)
        # A non-finite half gradient poisons its objective: fold the 2K rows onto K.
        finite = np.isfinite(np.diag(g2))
        ok = finite[:k] & finite[k:]
        cross, consistency, products = CrossGram.split_gram(np.where(np.isfinite(g2), g2, 0.0))
        cross = np.where(np.outer(ok, ok), cross, np.nan)
        m = _Measured(cross, cross, halves, lambda w: np.concatenate([w * frac_a, w * frac_b]))
        m.consistency = consistency
        m.products = products
        return m

    def _apply_cached(self, names, values, tensors, params, extra, reasons) -> BalanceReport:
        w = self._wstate.loss_weights
        assert w is not None
        alpha = self._wstate.alpha if self._wstate.alpha is not None else np.zeros(len(names))
        usable = np.isfinite(values) | (w == 0.0)
        retain = self.nonfinite == "exclude" and not self._comm.active
        while True:
            excluded = tuple(names[k] for k in np.flatnonzero(~usable))
            w_k, alpha_k = w, alpha
            if excluded:  # nonfinite="exclude": renormalise α over the objectives that remain
                kept = float(alpha[usable].sum())
                if not kept > 0.0:
                    return self._nonfinite(
                        names,
                        values,
                        f"no usable objective on a cached step (excluded {excluded}); " + "; ".join(reasons),
                    )
                w_k = np.where(usable, w / kept, 0.0)
                alpha_k = np.where(usable, alpha / kept, 0.0)
            ok = combined_backward(tensors, w_k, params, extra, in_place=self._comm.active, retain_graph=retain)
            if self._comm.all_true(ok, tensors[0].device):
                break
            bad = self._nonfinite_gradients(tensors, params, usable & (w != 0.0)) if retain else None
            if bad is None or not bad.any():
                return self._nonfinite(names, values, "non-finite gradient of the combined loss")
            usable = usable & ~bad
            detail = ", ".join(repr(names[k]) for k in np.flatnonzero(bad))
            reasons.append(f"excluded (non-finite gradient, finite loss): {detail}")
        return self._report(
            names,
            values,
            weights=alpha_k,
            loss_weights=w_k,
            excluded=excluded,
            status="cached",
            reason="; ".join(reasons),
        )

    def _apply_cached_one_read(self, names, local, tensors, params, extra) -> BalanceReport:
        """A cached step (one process, not ``"exclude"``) with one host read: the combined
        gradient is computed first (apart from ``p.grad``, or into it when every ``p.grad``
        is None and it is cleared again on failure), then the loss values and its
        finiteness flag come to the host together. The outcome is ``_apply_cached``'s:
        a non-finite loss or gradient skips with ``p.grad`` as it was."""
        w = self._wstate.loss_weights
        assert w is not None
        alpha = self._wstate.alpha if self._wstate.alpha is not None else np.zeros(len(names))
        if self.skip_on_device:
            return self._apply_cached_on_device(names, local, tensors, params, extra, w, alpha)
        grad = CombinedGradient.compute(tensors, w, params, extra)
        flag = grad.finite_flag()
        if flag is not None:
            flag = flag.reshape(1).double()
            if flag.device != local.device:
                flag = flag.to(local.device)
            host = torch.cat([local, flag]).cpu().numpy()  # the one read of this step
            host, finite = host[:-1], bool(host[-1])
        else:
            host, finite = local.cpu().numpy(), True
        values, extra_value = host[: len(names)], (host[len(names)] if extra is not None else 0.0)
        bad_loss = ~np.isfinite(values)
        if bad_loss.any():
            grad.undo()
            detail = ", ".join(f"{names[k]!r} = {values[k]}" for k in np.flatnonzero(bad_loss))
            return self._nonfinite(names, values, f"non-finite loss: {detail}")
        if not np.isfinite(extra_value):
            grad.undo()
            return self._nonfinite(names, values, f"non-finite extra loss: {extra_value}")
        if not grad.is_finite(finite):
            grad.undo()
            return self._nonfinite(names, values, "non-finite gradient of the combined loss")
        grad.commit()
        return self._report(names, values, weights=alpha, loss_weights=w, status="cached", reason="")

    def _apply_cached_on_device(self, names, local, tensors, params, extra, w, alpha) -> BalanceReport:
        """A cached step under ``skip_on_device`` with no host read: the gradient goes into
        ``p.grad``; whether it and the loss values are finite stays on the device for the
        wrapped step's ``found_inf``; the report reads the values when they are accessed."""
        grad = CombinedGradient.compute(tensors, w, params, extra)
        grad_flag = device_finite(grad.present) if grad.present and not self._stepping else None
        grad.commit()
        loss_flag = local.isfinite().all()
        pending = self._pending.device_flag
        self._pending.device_flag = loss_flag if pending is None else pending & loss_flag
        flag = loss_flag if grad_flag is None else loss_flag & grad_flag.to(loss_flag.device)
        verdict = self._verdict = _DeviceVerdict(flag, "", "loss or gradient")
        report = self._report(
            names, np.zeros(len(names)), weights=alpha, loss_weights=w, status="cached", verdict=verdict
        )
        host: list[np.ndarray] = []

        def values() -> dict[str, float]:
            if not host:
                host.append(local.cpu().numpy())
            return dict(zip(names, host[0][: len(names)].tolist()))

        object.__setattr__(report, "losses", _Deferred(values))
        return report

    @staticmethod
    def _nonfinite_gradients(tensors: Sequence[Tensor], params: Sequence[Tensor], among: np.ndarray) -> np.ndarray:
        """Which objectives (among ``among``) have a non-finite gradient (one backward each;
        only after a combined backward failed under ``nonfinite="exclude"``)."""
        bad = np.zeros(len(tensors), dtype=bool)
        for k in np.flatnonzero(among):
            grads = torch.autograd.grad(tensors[k], list(params), retain_graph=True, allow_unused=True)
            bad[k] = not all_finite([g for g in grads if g is not None])
        return bad

    def _solve_and_apply(
        self, names, values, tensors, params, shared, extra, excluded_bad, reasons, cross=None, measured=None
    ) -> BalanceReport:
        keep_graph = extra is not None
        m = self._measure(names, tensors, params, shared, keep_graph, cross) if measured is None else measured
        mask = None if cross is None else cross[0]
        # The weighting's whole input, bit-identical on every rank (a no-op on one process).
        gram, values = self._comm.same_everywhere(m.gram, values, device=tensors[0].device)
        all_finite_gram = bool(np.isfinite(gram).all())
        if not all_finite_gram:
            # A non-finite g_k makes its own ‖g_k‖² non-finite, and also every ⟨g_j, g_k⟩:
            # blame the diagonal, not the rows it poisons.
            bad_grad = ~np.isfinite(np.diag(gram))
            if not bad_grad.any():
                bad_grad = ~np.isfinite(gram).all(axis=1)
            bad_grad &= ~excluded_bad
            if bad_grad.any():
                detail = ", ".join(repr(names[k]) for k in np.flatnonzero(bad_grad))
                if self.nonfinite != "exclude":
                    return self._nonfinite(names, values, f"non-finite gradient of {detail}")
                excluded_bad = excluded_bad | bad_grad
                reasons.append(f"excluded (non-finite gradient): {detail}")
        usable = ~excluded_bad
        if all_finite_gram and not excluded_bad.any():
            gram = gram.copy()  # every objective usable: nothing to mask (np.where would copy too)
            raw_gram = gram if mask is None else m.raw.copy()
        else:
            gram = np.where(np.outer(usable, usable), gram, 0.0)
            raw_gram = gram if mask is None else np.where(np.outer(usable, usable), m.raw, 0.0)
        if mask is not None:
            assert self._cross is not None
            assert m.products is not None
            gram = self._cross.process(gram, np.where(usable, m.products, 0.0))
        norms = np.sqrt(np.maximum(np.diag(gram), 0.0))
        valid = usable & (norms > MIN_GRAD_NORM)
        if valid.all():
            excluded: tuple[str, ...] = ()
        else:
            excluded = tuple(names[k] for k in np.flatnonzero(~valid))
            zero = [names[k] for k in np.flatnonzero(usable & ~valid)]
            if zero:
                reasons.append(f"excluded (zero gradient): {', '.join(map(repr, zero))}")
        if not valid.any():
            self.source.release()
            self._pending.skip = True
            return self._report(
                names,
                values,
                gram=raw_gram,
                used=gram,
                norms=norms,
                excluded=excluded,
                skipped=True,
                status="skipped",
                reason="no objective has a finite, non-zero gradient",
                consistency=m.consistency,
            )
        try:
            result = self._weighting.weigh(gram, values, valid, self._wstate, names)
        except Exception:
            self.source.release()
            raise
        defer = ("quiet" if self._stepping else True) if self.skip_on_device else False
        applied = self.source.apply(m.expand(result.w), m.apply_losses, params, extra, defer=defer)
        verdict = None
        if self.skip_on_device:  # the report reads this backward's flag, or step(losses)'s own check
            verdict = self._verdict = _DeviceVerdict(
                applied if isinstance(applied, Tensor) else None, "; ".join(reasons)
            )
        elif not self._comm.all_true(applied, tensors[0].device):
            return self._nonfinite(names, values, "non-finite gradient of the combined loss")
        self._pending.results.append(result)
        if mask is not None:
            self._pending.crosses.append(np.where(np.outer(usable, usable), m.raw, 0.0))
        return self._report(
            names,
            values,
            weights=result.alpha,
            raw=result.raw,
            loss_weights=result.w,
            gram=raw_gram,
            used=gram,
            norms=norms,
            excluded=excluded,
            status=result.status,
            reason="; ".join(reasons),
            consistency=m.consistency,
            verdict=verdict,
        )

    def _commit(self) -> None:
        """Advance the weighting's state (and the cross estimator's EMA) after a real step."""
        pending = self._pending
        self._pending = _Pending()
        self.num_steps += 1
        if pending.count == 0:
            return
        self._wstate = self._weighting.commit(self._wstate, pending.results)
        if self._cross is not None:
            self._cross.commit(pending.crosses)

    def _report(
        self,
        names: tuple[str, ...],
        values: np.ndarray,
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
        verdict: _DeviceVerdict | None = None,
    ) -> BalanceReport:
        if self._names is None:  # the first call that gets this far fixes the objectives
            self._names = names

        def named(x: np.ndarray | None) -> dict[str, float]:
            return {} if x is None else dict(zip(names, np.asarray(x, dtype=np.float64).tolist()))

        # Cosines from the matrix the weighting saw (for "cross": the processed estimate),
        # computed when first read (``_Deferred``): a training loop rarely reads them.
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
            losses=named(values),
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
        )


class _DeviceVerdict:
    """``skip_on_device``: what a report's ``skipped`` and ``reason`` read when first accessed.

    ``flag``: an on-device 0-dim bool, True when finite: the gradient this ``backward`` added
    (and a cached step's loss values), replaced by the step's own check of every ``p.grad``
    when ``step(losses)`` steps; None: nothing was found non-finite."""

    def __init__(self, flag: Tensor | None, reason: str, what: str = "gradient") -> None:
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


def _creates_state(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the wrapped step creates per-parameter state (all but SGD without momentum)."""
    return not (
        isinstance(optimizer, torch.optim.SGD) and all(g.get("momentum", 0) == 0 for g in optimizer.param_groups)
    )
