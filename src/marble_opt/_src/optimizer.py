"""MarbleOptimizer: a torch optimizer that steps along the min-norm combination of K gradients."""

from __future__ import annotations

import dataclasses
import numbers
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from itertools import chain
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

from .balance import MIN_GRAD_NORM, NORMALIZATIONS, combine_weights, cosine_matrix, objective_scales, update_cosines
from .distributed import Collective
from .qp import MinNormSolver
from .report import BalanceReport
from .smoothing import WeightEMA
from .sources import GramSource, combined_backward, make_source

__all__ = ["MarbleOptimizer"]

_NONFINITE_POLICIES = ("skip", "raise", "exclude", "propagate")


def _check_ema_decay(value: Any) -> float:
    """ρ as a float in [0, 1), or ``ValueError`` quoting the bad value.

    Any real number is accepted (Python or numpy scalars, e.g. a schedule computed with
    numpy); bools and NaN are not."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
        raise ValueError(f"ema_decay must be a float in [0, 1), got {value!r}")
    return float(value)


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
    """What the micro-batches since the last optimizer step solved, committed by ``step``."""

    def __init__(self) -> None:
        self.raw_sum: np.ndarray | None = None
        self.count = 0
        self.last_raw: np.ndarray | None = None
        self.scales: np.ndarray | None = None
        self.norms: np.ndarray | None = None
        self.valid: np.ndarray | None = None
        self.skip = False

    def add(self, raw: np.ndarray, scales: np.ndarray, norms: np.ndarray, valid: np.ndarray) -> None:
        self.raw_sum = raw.copy() if self.raw_sum is None else self.raw_sum + raw
        self.count += 1
        self.last_raw, self.scales, self.norms, self.valid = raw, scales, norms, valid


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

    Args:
        optimizer: an already built torch optimizer (AdamW, SGD, ...).
        ema_decay: ρ in [0, 1). 0.7 is the paper's best value; 0 disables smoothing.
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
        refresh_every: solve the QP on every N-th optimizer step; in between, reuse the
            last loss weights with one ordinary backward.
        nonfinite: a non-finite loss or gradient ``"skip"``\ s the step (parameters,
            optimizer state, weights and ``p.grad`` untouched, ``report.skipped``),
            ``"raise"``\ s ``FloatingPointError``, or is ``"exclude"``\ d from the QP for
            that step. ``"propagate"`` skips like ``"skip"`` but fills ``p.grad`` with NaN,
            as ``loss.backward()`` would: use it with fp16 ``GradScaler``, which then sees
            the overflow, skips its step and lowers its scale.
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
        ema_decay: float = 0.7,
        normalize: str = "l2",
        rescale: bool = True,
        solver: str = "osqp",
        gram: str = "exact",
        gram_params: Sequence[Tensor] | None = None,
        refresh_every: int = 1,
        nonfinite: str = "skip",
        process_group: Any = None,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, MarbleOptimizer):
            raise TypeError("optimizer is already a MarbleOptimizer; wrap the base optimizer once")
        ema_decay = _check_ema_decay(ema_decay)
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        if not isinstance(rescale, bool):
            raise TypeError(f"rescale must be a bool, got {rescale!r}")
        if isinstance(refresh_every, bool) or not isinstance(refresh_every, int) or refresh_every < 1:
            raise ValueError(f"refresh_every must be an int >= 1, got {refresh_every!r}")
        if nonfinite not in _NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {_NONFINITE_POLICIES}, got {nonfinite!r}")
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

        self.normalize = normalize
        self.rescale = rescale
        self.refresh_every = refresh_every
        self.nonfinite = nonfinite
        self._gram_name = gram
        self._solver = MinNormSolver(solver)
        self._ema = WeightEMA(ema_decay)
        self._names: tuple[str, ...] | None = None
        self._last_raw: np.ndarray | None = None
        self._loss_weights: np.ndarray | None = None
        self._pending = _Pending()
        self._skip_mark: _GradMark | None = None
        self.num_steps = 0

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
        # but the solver's OSQP workspaces, which are rebuilt on demand.
        state = self.__dict__.copy()
        state["_solver"] = self._solver.solver
        state["_skip_mark"] = None  # weak references: a restored skip is kept (it cannot be judged stale)
        # An LR scheduler replaces self.step by a wrapper bound to *this* object (unpicklable,
        # and a deepcopy would step the original); torch.optim.Optimizer never copies it.
        state.pop("step", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        state["_solver"] = MinNormSolver(state["_solver"])
        state.setdefault("_skip_mark", None)
        self.__dict__.update(state)
        self._patch_step_function()

    @property
    def ema_decay(self) -> float:
        """ρ of the weights' EMA; settable (e.g. by a schedule), in [0, 1)."""
        return self._ema.decay

    @ema_decay.setter
    def ema_decay(self, value: float) -> None:
        self._ema.decay = _check_ema_decay(value)

    @property
    def gram(self) -> str:
        """The Gram source's name (fixed at construction)."""
        return self._gram_name

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def __repr__(self) -> str:
        return (
            f"MarbleOptimizer(gram={self._gram_name!r}, normalize={self.normalize!r}, ema_decay={self.ema_decay}, "
            f"solver={self._solver.solver!r}, refresh_every={self.refresh_every}, nonfinite={self.nonfinite!r},\n"
            f"  {self.optimizer!r})"
        )

    # ---- public API --------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        """The objectives' names, fixed by the first ``backward`` (empty before)."""
        return self._names or ()

    @property
    def weights(self) -> dict[str, float]:
        """The smoothed balancing weights α by objective (empty before the first step)."""
        if self._ema.value is None or self._names is None:
            return {}
        return dict(zip(self._names, self._ema.value.tolist()))

    def reset_weights(self) -> None:
        """Forget the objectives, the smoothed weights and the cached loss weights."""
        self._names = None
        self._ema.reset()
        self._last_raw = None
        self._loss_weights = None
        self._pending = _Pending()
        self._skip_mark = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)
        # A new accumulation: forget a skipped backward whose step() never came (GradScaler
        # skips calling it on inf) and weights of micro-batches whose gradients are gone.
        self._pending = _Pending()
        self._skip_mark = None

    def backward(
        self,
        losses: Mapping[str, Tensor],
        *,
        shared: Tensor | Sequence[Tensor] | None = None,
        extra: Tensor | None = None,
    ) -> BalanceReport:
        """Accumulate the balanced gradient of ``losses`` into ``p.grad``.

        Args:
            losses: ``{name: scalar loss}``, K ≥ 1, each with a path to a trainable parameter.
            shared: for ``gram="shared"``: the tensor (or tensors) every loss is computed from.
            extra: an optional scalar loss added to the update unbalanced (a KL or weight
                penalty): its gradient is added after balancing.

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
        self._forget_stale_skip()
        report = self._backward(losses, shared, extra)
        if self._pending.skip:
            self._skip_mark = _grad_mark(self._trainable_params())
        return report

    def _forget_stale_skip(self) -> None:
        """Drop a skip whose gradients someone cleared or replaced since (a new accumulation)."""
        if self._pending.skip and self._skip_mark is not None:
            if not _same_grads(self._trainable_params(), self._skip_mark):
                self._pending = _Pending()
                self._skip_mark = None

    def _backward(
        self,
        losses: Mapping[str, Tensor],
        shared: Tensor | Sequence[Tensor] | None,
        extra: Tensor | None,
    ) -> BalanceReport:
        names, tensors = self._check_losses(losses)
        shared_list = self._check_shared(shared)
        self.source.check_shared(shared_list)  # on cached steps too, so errors do not depend on the step
        if extra is not None:
            extra = self._check_scalar("extra", extra)
        gram_params = getattr(self.source, "gram_params", None)
        if gram_params is not None:  # frozen since construction?
            self._check_gram_params(self.optimizer, gram_params)
        params = self._trainable_params()
        local = [t.detach().double() for t in tensors] + ([extra.detach().double()] if extra is not None else [])
        # Under torch.distributed: the mean over ranks, non-finite on every rank if on any.
        values = self._comm.mean_losses(torch.stack(local).cpu().numpy(), tensors[0].device)
        values, extra_value = values[: len(names)], (values[len(names)] if extra is not None else 0.0)
        bad_loss = ~np.isfinite(values)
        excluded_bad = np.zeros(len(names), dtype=bool)
        if bad_loss.any():
            detail = ", ".join(f"{names[k]!r} = {values[k]}" for k in np.flatnonzero(bad_loss))
            if self.nonfinite != "exclude" or bad_loss.all():
                return self._nonfinite(names, values, f"non-finite loss: {detail}")
            excluded_bad |= bad_loss
        if not np.isfinite(extra_value):
            return self._nonfinite(names, values, f"non-finite extra loss: {extra_value}")

        solve = self._loss_weights is None or self.num_steps % self.refresh_every == 0 or self._pending.count > 0
        if not solve:
            return self._apply_cached(names, values, tensors, params, extra)
        return self._solve_and_apply(names, values, tensors, params, shared_list, extra, excluded_bad)

    def step(  # type: ignore[override]
        self,
        losses: Mapping[str, Tensor] | Callable[[], Any] | None = None,
        *,
        shared: Tensor | Sequence[Tensor] | None = None,
        extra: Tensor | None = None,
        closure: Callable[[], Any] | None = None,
    ) -> Any:
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
            report = self.backward(losses, shared=shared, extra=extra)
        elif shared is not None or extra is not None:
            raise ValueError("shared= and extra= need losses: step(losses, shared=..., extra=...)")
        if self._pending.skip:
            self._pending = _Pending()
            self._skip_mark = None
            if report is not None and not report.skipped:
                reason = "a backward() earlier in this accumulation skipped; no step was taken"
                report = dataclasses.replace(report, skipped=True, reason=reason)
            return report
        out = self._hooked_step(closure)
        return report if losses is not None else out

    # torch.optim.Optimizer would wrap ``step`` to run the step hooks around the whole call,
    # before step(losses) has written the gradient and on skipped steps too: run them here.
    step.hooked = True  # type: ignore[attr-defined]

    def _hooked_step(self, closure: Callable[[], Any] | None) -> Any:
        """The wrapped optimizer's step between this optimizer's step hooks, then the commit."""
        args: tuple[Any, ...] = (self,)
        kwargs: dict[str, Any] = {} if closure is None else {"closure": closure}
        with torch.autograd.profiler.record_function(f"Optimizer.step#{type(self).__name__}.step"):
            for hook in chain(_global_optimizer_pre_hooks.values(), self._optimizer_step_pre_hooks.values()):
                result = hook(self, args, kwargs)
                if result is not None:
                    if not (isinstance(result, tuple) and len(result) == 2):
                        raise RuntimeError(
                            f"step pre-hook {hook!r} must return None or (new_args, new_kwargs), got {result!r}"
                        )
                    args, kwargs = result
            closure = kwargs.get("closure")
            out = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
            self._commit()
            for hook in chain(self._optimizer_step_post_hooks.values(), _global_optimizer_post_hooks.values()):
                hook(self, args, kwargs)
        return out

    # ---- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict plus a ``"marble"`` entry (tensors and scalars).

        Hooks registered with ``register_state_dict_pre_hook`` / ``_post_hook`` run as on any
        torch optimizer (the post-hook sees, and may replace, the dict with its ``"marble"``
        entry). A plain torch optimizer loading this dict ignores ``"marble"`` silently.
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        sd = self.optimizer.state_dict()
        sd["marble"] = {
            "names": list(self._names) if self._names is not None else None,
            "ema": None if self._ema.value is None else self._ema.value.clone(),
            "last_raw": None if self._last_raw is None else torch.from_numpy(self._last_raw.copy()),
            "loss_weights": None if self._loss_weights is None else torch.from_numpy(self._loss_weights.copy()),
            "num_steps": int(self.num_steps),
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
        ema = marble.get("ema")
        self._ema.value = None if ema is None else torch.as_tensor(ema, dtype=torch.float64).clone()
        for attr, key in (("_last_raw", "last_raw"), ("_loss_weights", "loss_weights")):
            value = marble.get(key)
            setattr(self, attr, None if value is None else torch.as_tensor(value, dtype=torch.float64).numpy().copy())
        self.num_steps = int(marble.get("num_steps", 0))

    # ---- internals -------------------------------------------------------------------------
    def _trainable_params(self) -> list[Tensor]:
        params = [p for group in self.param_groups for p in group["params"] if p.requires_grad]
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
        return value.reshape(())

    def _check_losses(self, losses: Mapping[str, Tensor]) -> tuple[tuple[str, ...], list[Tensor]]:
        if not isinstance(losses, Mapping):
            raise TypeError(f"losses must be a dict {{name: scalar loss}}, got {type(losses).__name__}")
        if not losses:
            raise ValueError("losses is empty: pass at least one {name: loss}")
        for key in losses:
            if not isinstance(key, str):
                raise TypeError(f"loss names must be strings, got {key!r} ({type(key).__name__})")
        if self._names is None:
            names = tuple(losses)
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

    def _apply_cached(self, names, values, tensors, params, extra) -> BalanceReport:
        w = self._loss_weights
        assert w is not None
        alpha = self._ema.value.numpy() if self._ema.value is not None else np.zeros(len(names))
        usable = np.isfinite(values) | (w == 0.0)
        excluded = tuple(names[k] for k in np.flatnonzero(~usable))
        if excluded:  # nonfinite="exclude": renormalise α over the objectives that remain
            kept = float(alpha[usable].sum())
            if not kept > 0.0:
                return self._nonfinite(names, values, f"no usable objective on a cached step (excluded {excluded})")
            w = np.where(usable, w / kept, 0.0)
            alpha = np.where(usable, alpha / kept, 0.0)
        ok = combined_backward(tensors, w, params, extra, in_place=self._comm.active)
        if not self._comm.all_true(ok, tensors[0].device):
            return self._nonfinite(names, values, "non-finite gradient of the combined loss")
        return self._report(names, values, weights=alpha, loss_weights=w, excluded=excluded, status="cached")

    def _solve_and_apply(self, names, values, tensors, params, shared, extra, excluded_bad) -> BalanceReport:
        keep_graph = extra is not None
        gram = self.source.gram(tensors, names, params, shared, keep_graph=keep_graph)
        # The QP's whole input, bit-identical on every rank (a no-op on one process).
        gram, values = self._comm.same_everywhere(gram, values, device=tensors[0].device)
        diag = np.diag(gram)
        # A non-finite g_k makes its own ‖g_k‖² non-finite, and also every ⟨g_j, g_k⟩:
        # blame the diagonal, not the rows it poisons.
        bad_grad = ~np.isfinite(diag)
        if not bad_grad.any():
            bad_grad = ~np.isfinite(gram).all(axis=1)
        bad_grad &= ~excluded_bad
        if bad_grad.any():
            detail = ", ".join(repr(names[k]) for k in np.flatnonzero(bad_grad))
            if self.nonfinite != "exclude":
                return self._nonfinite(names, values, f"non-finite gradient of {detail}")
            excluded_bad = excluded_bad | bad_grad
        usable = ~excluded_bad
        gram = np.where(np.outer(usable, usable), gram, 0.0)
        norms = np.sqrt(np.maximum(np.diag(gram), 0.0))
        valid = usable & (norms > MIN_GRAD_NORM)
        excluded = tuple(names[k] for k in np.flatnonzero(~valid))
        if not valid.any():
            self.source.release()
            self._pending.skip = True
            return self._report(
                names,
                values,
                gram=gram,
                norms=norms,
                excluded=excluded,
                skipped=True,
                status="skipped",
                reason="no objective has a finite, non-zero gradient",
            )
        scales = objective_scales(norms, values, valid, self.normalize, names)
        raw = np.zeros(len(names))
        scaled = gram[np.ix_(valid, valid)] * np.outer(scales[valid], scales[valid])
        warm = None
        if self._last_raw is not None and self._last_raw[valid].sum() > 0:
            warm = self._last_raw[valid]
        alpha_valid, status = self._solver.solve(scaled, warm, validated=True)
        raw[valid] = alpha_valid
        smoothed = self._ema.candidate(torch.from_numpy(raw)).numpy()
        w = combine_weights(smoothed, scales, norms, valid, rescale=self.rescale)
        if not self._comm.all_true(self.source.apply(w, tensors, params, extra), tensors[0].device):
            return self._nonfinite(names, values, "non-finite gradient of the combined loss")
        self._pending.add(raw, scales, norms, valid)
        applied = np.where(valid, smoothed, 0.0)
        applied = applied / applied.sum()
        return self._report(
            names,
            values,
            weights=applied,
            raw=raw,
            loss_weights=w,
            gram=gram,
            norms=norms,
            excluded=excluded,
            status=status,
        )

    def _commit(self) -> None:
        """Advance the smoothed weights after a real step of the wrapped optimizer."""
        pending = self._pending
        self._pending = _Pending()
        self.num_steps += 1
        if pending.count == 0:
            return
        assert pending.raw_sum is not None and pending.valid is not None
        mean_raw = pending.raw_sum / pending.count
        value = self._ema.commit(torch.from_numpy(mean_raw)).numpy()
        self._last_raw = pending.last_raw
        self._loss_weights = combine_weights(value, pending.scales, pending.norms, pending.valid, rescale=self.rescale)

    def _report(
        self,
        names: tuple[str, ...],
        values: np.ndarray,
        *,
        weights: np.ndarray | None = None,
        raw: np.ndarray | None = None,
        loss_weights: np.ndarray | None = None,
        gram: np.ndarray | None = None,
        norms: np.ndarray | None = None,
        excluded: tuple[str, ...] = (),
        skipped: bool = False,
        status: str,
        reason: str = "",
    ) -> BalanceReport:
        if self._names is None:  # the first call that gets this far fixes the objectives
            self._names = names

        def named(x: np.ndarray | None) -> dict[str, float]:
            return {} if x is None else {n: float(v) for n, v in zip(names, x)}

        cosine = update_cos = mean_cos = None
        if gram is not None and norms is not None:
            cosine = cosine_matrix(gram, norms)
            if loss_weights is not None:
                update_cos = update_cosines(gram, loss_weights, norms)
                valid = norms > MIN_GRAD_NORM
                mean_cos = update_cosines(gram, np.where(valid, 1.0 / max(int(valid.sum()), 1), 0.0), norms)
                # An excluded objective's gradient is zero or not finite (its row of G was
                # zeroed): its cosine is undefined.
                update_cos = np.where(valid, update_cos, np.nan)
                mean_cos = np.where(valid, mean_cos, np.nan)
        return BalanceReport(
            names=names,
            weights=named(weights),
            raw_weights=named(raw),
            loss_weights=named(loss_weights),
            losses=named(values),
            gram=gram,
            cosine=cosine,
            grad_norms=named(norms),
            update_cosine=named(update_cos),
            mean_cosine=named(mean_cos),
            excluded=excluded,
            skipped=skipped,
            solved=raw is not None,
            solver_status=status,
            reason=reason,
        )
