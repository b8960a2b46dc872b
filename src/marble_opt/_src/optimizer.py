"""MarbleOptimizer: a torch optimizer that steps along the min-norm combination of K gradients.

The step is a pipeline of stages, each owned by one module, with records passed between them:

    check inputs (inputs.py) → measure G and the loss values, one host read (estimators.py,
    sources.py) → select who takes part (selection.py) → weigh (weightings/) → apply, the one
    writer of p.grad (apply.py) → report (report.py)

The first four are the ``Balancer``'s (balancer.py, usable without this wrapper); this module
adds the apply stage, the accumulation bookkeeping (accumulation.py), the device skip
(device_skip.py) and the torch.optim contract (wrapper.py).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, overload

import numpy as np
import torch
from torch import Tensor

from .accumulation import FOREIGN_GRADIENTS, Accumulation, grad_mark
from .apply import Update, write_gradient
from .balancer import Balancer
from .device_skip import check_device_skip, step_on_device
from .fsdp import detached_origins, fsdp2_mesh
from .inputs import Inputs
from .inputs import sharding as checks_sharding
from .report import BalanceReport, DeviceVerdict, make_report
from .selection import Verdict, check_values
from .sources import ExactSource, nonfinite_objectives
from .weightings import Weighting
from .wrapper import WrappedOptimizer

__all__ = ["MarbleOptimizer"]


#: The error for ``skip_on_device=True`` with FSDP2 parameters.
FSDP_DEVICE_SKIP = (
    "skip_on_device=True is not supported with parameters sharded by FSDP2 (fully_shard): the ranks must agree "
    "on a skip, which needs a host read; construct with skip_on_device=False"
)


class MarbleOptimizer(WrappedOptimizer):
    r"""Wraps a torch optimizer so it steps along the MARBLE combination of K losses.

    For losses ``{name_k: L_k}`` it measures ``G_kl = ⟨g_k, g_l⟩`` (``g_k = ∇L_k``), scales
    each gradient (``ĝ_k = s_k g_k``, ``normalize``), solves the min-norm QP
    ``α* = argmin_{α∈Δ} ½ αᵀĜα``, smooths it (``α_t = ρ α_{t−1} + (1−ρ) α*_t``) and
    accumulates ``d = m · Σ_k α_k ĝ_k`` into ``p.grad`` (``m = mean‖g_k‖`` for ``"l2"``), so
    clipping, ``GradScaler``, accelerate, LR schedulers and the wrapped optimizer work as
    with ``loss.backward()``. With ρ=0 every objective with ``α_k > 0`` gets the same,
    positive cosine with ``d`` and none gets a negative one (arXiv 2605.06507).

    It is a ``torch.optim.Optimizer`` whose ``param_groups``, ``state`` and ``defaults`` are
    the wrapped optimizer's own objects. The balancing is a ``Balancer`` (``opt.balancer``):
    inputs → measure G (``gram``, ``gram_estimator``) → select → the weighting (G, loss values,
    validity → per-loss weights w); this optimizer writes ``Σ_k w_k ∇L_k`` and steps.

    Args:
        optimizer: an already built torch optimizer (AdamW, SGD, ...).
        weighting: ``"marble"`` (default), ``"mgda"``, ``"mean"``, ``"upgrad"``,
            ``"cagrad"``, ``"imtl-g"``, ``"aligned-mtl"`` (``marble_opt.WEIGHTINGS``), a
            ``Weighting``, or any callable with TorchJD's Gramian-weighting signature
            (``fn(G: Tensor K×K) -> Tensor (K,)``, e.g. ``torchjd.aggregation.UPGradWeighting()``;
            a stateful one's state is saved in ``state_dict``, a random one's weights are
            broadcast from the first rank under ``torch.distributed``).
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
            per-objective gradients are measured (``marble_opt.GRAM_SOURCES``; the guide
            "Choosing a Gram source").
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
        skip_on_device: with a fused ``Adam``/``AdamW``/``SGD`` (``fused=True``) and
            ``nonfinite="skip"``: check finiteness on the device and hand it to the wrapped step
            as ``found_inf`` (as ``GradScaler`` does), so a balancing step makes one
            device-to-host transfer and a cached step none. ``p.grad`` keeps a non-finite
            gradient until ``zero_grad()``, and ``report.skipped`` is read when first accessed;
            the details are in ``marble_opt._src.device_skip``. Not under ``torch.distributed``.
        process_group: the ranks of a data-parallel job to agree with. ``None``: the
            default group whenever ``torch.distributed`` is initialized; a
            ``ProcessGroup``: that one; ``False``: none (each rank balances its own batch).
            With equal local batches and losses that are local means, the step equals one
            process on the whole batch (see ``marble_opt._src.distributed``): wrap the model
            in DDP as usual; the exact sources average their per-objective gradients
            themselves, the others rely on DDP for their one ordinary backward.

    Objectives are fixed by the first call: later calls must pass the same names (any
    order), else ``ValueError`` names the missing or new ones; ``reset_weights()`` forgets
    them together with the smoothed weights. ``step()`` warns (once) when it finds gradients
    that no ``backward(losses)`` of this accumulation wrote (``loss.backward(); opt.step()``,
    or a leftover ``loss.backward()`` before ``step(losses)``): they would be stepped on
    unbalanced.
    """

    EXTRA_KEY = "marble"

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
        **unexpected: Any,
    ) -> None:
        how = "MarbleOptimizer wraps a built torch optimizer: MarbleOptimizer(torch.optim.AdamW(params, lr=...), ...)"
        if unexpected:
            raise TypeError(f"unexpected keyword arguments {sorted(unexpected)}: {how}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}; {how}")
        if isinstance(optimizer, MarbleOptimizer):
            raise TypeError("optimizer is already a MarbleOptimizer; wrap the base optimizer once")
        if not isinstance(skip_on_device, bool):
            raise TypeError(f"skip_on_device must be True or False, got {skip_on_device!r}")
        self.balancer = Balancer._for(
            lambda: optimizer.param_groups,
            weighting=weighting,
            weighting_options=weighting_options,
            ema_decay=ema_decay,
            normalize=normalize,
            rescale=rescale,
            solver=solver,
            gram=gram,
            gram_params=gram_params,
            gram_estimator=gram_estimator,
            estimator_options=estimator_options,
            refresh_every=refresh_every,
            nonfinite=nonfinite,
            process_group=process_group,
        )
        if skip_on_device:
            check_device_skip(optimizer, nonfinite)
        # Sharded layouts other than FSDP2 are refused here and at every backward (accelerate
        # shards after construction); FSDP2 shards are accepted (see Balancer.check_inputs).
        mesh = fsdp2_mesh([p for group in optimizer.param_groups for p in group["params"]])
        if mesh is not None and skip_on_device:
            raise ValueError(FSDP_DEVICE_SKIP)
        super().__init__(optimizer)
        self.balancer._rebind(lambda: self.optimizer.param_groups)
        self.skip_on_device = skip_on_device
        self._accum = Accumulation()
        self._warned = False  # the torch-habit warning, once per optimizer

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.balancer._rebind(lambda: self.optimizer.param_groups)

    # ---- options and state, read from the balancer ------------------------------------------
    weighting = property(lambda self: self.balancer.weighting, doc="The weighting (fixed at construction).")
    gram = property(lambda self: self.balancer.gram, doc="The Gram source's name (fixed at construction).")
    source = property(lambda self: self.balancer.source, doc="The Gram source (``GramSource``).")
    gram_estimator = property(lambda self: self.balancer.gram_estimator, doc='"batch" or "cross".')
    nonfinite = property(lambda self: self.balancer.nonfinite, doc="The non-finite policy.")
    names = property(lambda self: self.balancer.names, doc="The objectives' names (empty before the first call).")
    num_steps = property(lambda self: self.balancer.num_steps, doc="Optimizer steps taken so far.")
    _comm = property(lambda self: self.balancer.comm)

    @property
    def refresh_every(self) -> int:
        """Solve on every N-th step (settable)."""
        return self.balancer.refresh_every

    @refresh_every.setter
    def refresh_every(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"refresh_every must be an int >= 1, got {value!r}")
        self.balancer.refresh_every = value

    @property
    def ema_decay(self) -> float:
        """ρ of MARBLE's EMA of the weights; settable (e.g. by a schedule), in [0, 1). 0 for
        weightings without smoothing."""
        return float(getattr(self.balancer.weighting, "ema_decay", 0.0))

    @ema_decay.setter
    def ema_decay(self, value: float) -> None:
        self.balancer.set_ema_decay(value)

    normalize = property(lambda self: getattr(self.weighting, "normalize", None), doc="MARBLE's normalisation.")
    rescale = property(lambda self: getattr(self.weighting, "rescale", None), doc="MARBLE's rescaling.")
    _loss_weights = property(lambda self: self.balancer.state.loss_weights, doc="The cached per-loss weights.")

    @property
    def weights(self) -> dict[str, float]:
        """The committed balancing weights α by objective (MARBLE: smoothed; empty before the first step)."""
        alpha = self.balancer.state.alpha
        return {} if alpha is None or not self.names else dict(zip(self.names, alpha.tolist()))

    def reset_weights(self) -> None:
        """Forget the objectives, the smoothed weights and the cached loss weights."""
        self.balancer.reset()
        self._accum = Accumulation()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)
        if self.skip_on_device:
            try:
                check_device_skip(self.optimizer, self.nonfinite)
            except ValueError:
                self.optimizer.param_groups.pop()
                raise

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)
        # A new accumulation: forget a skipped backward whose step() never came (GradScaler
        # skips calling it on inf) and weights of micro-batches whose gradients are gone.
        self._new_accumulation()
        if not set_to_none:  # zeros written here are not someone else's gradients
            self._accum.zeroed = grad_mark(self.balancer.params())

    def _new_accumulation(self) -> None:
        self.balancer.discard()
        self._accum = Accumulation()

    def __repr__(self) -> str:
        device = ", skip_on_device=True" if self.skip_on_device else ""
        return f"MarbleOptimizer({self.balancer.describe()}{device},\n  {self.optimizer!r})"

    # ---- the step ---------------------------------------------------------------------------
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
        return self._backward(losses, shared, extra, groups, "device" if self.skip_on_device else "host")[0]

    def _backward(
        self, losses: Any, shared: Any, extra: Any, groups: Any, check: str
    ) -> tuple[BalanceReport, DeviceVerdict | None]:
        bal, accum = self.balancer, self._accum
        if self.skip_on_device and bal.comm.active:
            raise ValueError("skip_on_device=True is not supported under torch.distributed: construct with False")
        params = bal.params()
        if self.skip_on_device and checks_sharding(params) is not None:
            raise ValueError(FSDP_DEVICE_SKIP)
        if accum.forget_stale(params):
            self._new_accumulation()
        self._accum.begin(params, self._warned)
        inputs = bal.check_inputs(losses, shared, extra, groups)
        report, verdict = self._balance(inputs, check)
        bal.fix_names(inputs.names)
        self._accum.mark_stale(params)
        bal.report = report
        return report, verdict

    def _balance(self, inputs: Inputs, check: str) -> tuple[BalanceReport, DeviceVerdict | None]:
        """The pipeline: measure → select → weigh → apply → report (inputs are checked)."""
        bal = self.balancer
        if not bal.solving:
            return self._cached(inputs, check)
        measured = bal.measure(inputs, keep_graph=inputs.extra is not None)
        selection = bal.select(inputs, measured)
        if isinstance(selection, Verdict):
            return self._stop(inputs, measured.values, selection), None
        if not selection.valid.any():  # type: ignore[union-attr]
            bal.source.release()
            self._accum.skip = True
            return bal.nothing_report(inputs, measured, selection), None
        result = bal.weigh(inputs, measured, selection)
        source = bal.source
        exact = isinstance(source, ExactSource)
        coefficients = measured.expand(result.w)
        update = Update(
            coefficients,
            measured.losses,
            inputs.extra,
            rows=source.rows if exact else None,
            used=source.used_by(coefficients) if exact else None,
            norms=source.norms if exact else None,
            origins=detached_origins(inputs.shared),
        )
        written = write_gradient(update, inputs.params, check=check, in_place=bal.comm.active, comm=bal.comm)
        source.release()
        verdict = None
        if self.skip_on_device:  # the report reads this backward's flag, or step(losses)'s own check
            flag = written.finite if isinstance(written.finite, Tensor) else None
            verdict = DeviceVerdict(flag, "; ".join(selection.reasons))
        elif not bal.comm.all_true(bool(written.finite), inputs.device):
            return self._stop(inputs, measured.values, Verdict("non-finite gradient of the combined loss")), None
        bal.record(measured, selection, result)
        self._accum.written = True
        return bal.solved_report(inputs, measured, selection, result, verdict), verdict

    def _cached(self, inputs: Inputs, check: str) -> tuple[BalanceReport, DeviceVerdict | None]:
        """A step between solves: the cached weights, one ordinary backward."""
        bal, names = self.balancer, inputs.names
        usable = np.ones(len(names), dtype=bool)
        if self.skip_on_device:  # no host read: finiteness goes to the wrapped step's found_inf
            w, alpha = bal.cached_weights(usable)
            written = write_gradient(
                Update(w, inputs.losses, inputs.extra, origins=detached_origins(inputs.shared)),
                inputs.params,
                check=check,
            )
            loss_flag = inputs.values.isfinite().all()
            self._accum.add_flag(loss_flag)
            flag = loss_flag if written.finite is None else loss_flag & written.finite.to(loss_flag.device)
            verdict = DeviceVerdict(flag, "", "loss or gradient")
            values = inputs.values
            self._accum.written = True
            lazy = lambda: dict(zip(names, values.cpu().numpy()[: len(names)].tolist()))  # noqa: E731
            return make_report(names, lazy, weights=alpha, loss_weights=w, status="cached", verdict=verdict), verdict
        if bal.nonfinite != "exclude" and not bal.comm.active:  # one host read: values and finiteness
            w, alpha = bal.cached_weights(usable)
            update = Update(w, inputs.losses, inputs.extra, origins=detached_origins(inputs.shared))
            written = write_gradient(update, inputs.params, check="host", carry=inputs.values)
            values = written.carried
            assert values is not None
            if not written.finite:
                stop = check_values(values, names, "skip", inputs.extra is not None)
                stop = stop if isinstance(stop, Verdict) else Verdict("non-finite gradient of the combined loss")
                return self._stop(inputs, values, stop), None
            self._accum.written = True
            return make_report(names, values[: len(names)], weights=alpha, loss_weights=w, status="cached"), None
        values = bal.comm.mean_losses(inputs.values.cpu().numpy(), inputs.device)
        selection = check_values(values, names, bal.nonfinite, inputs.extra is not None)
        if isinstance(selection, Verdict):
            return self._stop(inputs, values, selection), None
        retain = bal.nonfinite == "exclude" and not bal.comm.active and inputs.mesh is None
        while True:
            w, alpha = bal.cached_weights(selection.usable)
            if w is None:
                return self._stop(inputs, values, bal.no_usable(names, selection)), None
            update = Update(w, inputs.losses, inputs.extra, origins=detached_origins(inputs.shared))
            written = write_gradient(update, inputs.params, in_place=bal.comm.active, retain_graph=retain)
            if bal.comm.all_true(bool(written.finite), inputs.device):
                break
            among = selection.usable & (bal.state.loss_weights != 0.0)
            bad = nonfinite_objectives(inputs.losses, inputs.params, among) if retain else None
            if bad is None or not bad.any():
                return self._stop(inputs, values, Verdict("non-finite gradient of the combined loss")), None
            selection.usable = selection.usable & ~bad
            selection.reasons.append(f"excluded (non-finite gradient, finite loss): {_names(names, bad)}")
        self._accum.written = True
        excluded = tuple(names[k] for k in np.flatnonzero(~selection.usable))
        report = make_report(
            names,
            values[: len(names)],
            weights=alpha,
            loss_weights=w,
            excluded=excluded,
            status="cached",
            reason="; ".join(selection.reasons),
        )
        return report, None

    def _stop(self, inputs: Inputs, values: np.ndarray, verdict: Verdict) -> BalanceReport:
        """A step that stops: raise, or skip (``"propagate"``: NaN in ``p.grad``)."""
        self.balancer.source.release()
        if self.nonfinite == "raise":
            raise FloatingPointError(f"{verdict.reason} (nonfinite='raise')")
        self._accum.skip = True
        if self.nonfinite == "propagate":
            write_gradient(Update(None, nan=True), inputs.params)
        return make_report(
            inputs.names, values[: len(inputs.names)], skipped=True, status="skipped", reason=verdict.reason
        )

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
        report = verdict = None
        if losses is not None:
            if closure is not None:
                raise ValueError("pass either losses or a closure to step(), not both")
            if self.skip_on_device:  # refused before backward writes anything
                check_device_skip(self.optimizer, self.nonfinite)
            check = "step" if self.skip_on_device else "host"  # the step itself checks p.grad
            report, verdict = self._backward(losses, shared, extra, groups, check)
        elif shared is not None or extra is not None or groups is not None:
            raise ValueError("shared=, extra= and groups= need losses: step(losses, shared=..., extra=...)")
        if self._accum.skip:
            self._new_accumulation()
            if report is not None and not report.skipped:
                reason = "a backward() earlier in this accumulation skipped; no step was taken"
                report = dataclasses.replace(report, skipped=True, reason=reason)
            return report
        if closure is None:
            self._warn_foreign(plain=losses is None)
        else:  # the closure's own backward(losses) counts: look once it has run
            closure = self._checked_after(closure)
        flags: list[Tensor | None] = []
        out = self.hooked_step(closure, lambda closure: self._inner_step(closure, flags))
        if verdict is not None and flags and flags[0] is not None:
            verdict.flag = flags[0]  # skip_on_device: step(losses)'s report tells the step's own check
        return report if losses is not None else out

    # torch.optim.Optimizer would wrap ``step`` to run the step hooks around the whole call,
    # before step(losses) has written the gradient and on skipped steps too: run them here.
    step.hooked = True  # type: ignore[attr-defined]

    def _inner_step(self, closure: Callable[[], Any] | None, flags: list[Tensor | None]) -> tuple[bool, Any]:
        """The wrapped step, then the commit: ``(stepped, result)``."""
        if self.skip_on_device:
            stepped, out, flag = step_on_device(self.optimizer, closure, self._accum.device_flag)
            flags.append(flag)
            if not stepped:  # a first step with a non-finite gradient, seen on the host
                self._new_accumulation()
                return False, out
        else:
            out = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        self.balancer.step()
        self._accum = Accumulation()
        return True, out

    def _checked_after(self, closure: Callable[[], Any]) -> Callable[[], Any]:
        def checked() -> Any:
            out = closure()
            self._warn_foreign(plain=True)
            return out

        return checked

    def _warn_foreign(self, plain: bool) -> None:
        if not self._warned and self._accum.found_foreign(self.balancer.params(), plain):
            self._warned = True
            warnings.warn(FOREIGN_GRADIENTS, UserWarning, stacklevel=3)

    # ---- state ---------------------------------------------------------------------------
    def _extra_state(self) -> dict[str, Any]:
        """``state_dict()["marble"]``: the objectives, the weighting's state (``ema``: α,
        ``last_raw``: the warm start, ``loss_weights``: the cached w, a stateful callable's
        own), the step count and the cross estimator's EMA of G. ``load_state_dict`` checks it
        first (weighting, names, lengths, finite values) and loads nothing on a mismatch; a
        dict without it (a plain optimizer's) resets the balancing."""
        return self.balancer.state_dict()

    def _check_extra_state(self, extra: Any) -> Any:
        return None if extra is None else (extra, self.balancer.check_state(extra))

    def _load_extra_state(self, extra: Any) -> None:
        self._new_accumulation()
        if extra is None:  # a plain optimizer's state dict: start the balancing afresh
            self.balancer.reset()
        else:
            self.balancer.load_state_dict(extra[0])


def _names(names: Sequence[str], mask: np.ndarray) -> str:
    return ", ".join(repr(names[k]) for k in np.flatnonzero(mask))
