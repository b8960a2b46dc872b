"""``Balancer``: the balancing without the optimizer wrapper (inputs → measure → select → weigh).

For a caller that owns its backward and its optimizer step (accelerate, DeepSpeed, Lightning,
TRL, FSDP through accelerate)::

    bal = Balancer(model.parameters(), gram="exact")
    for batch in loader:
        losses = compute_losses(batch)                     # {name: scalar loss}
        w = bal.weights(losses)                            # {name: float}
        if not bal.report.skipped:
            accelerator.backward(bal.weighted_loss(losses, w))   # Σ_k w_k L_k
            optimizer.step()
            bal.step()                                     # the smoothing state advances
        optimizer.zero_grad()

The gradient of ``Σ_k w_k L_k`` is the update ``MarbleOptimizer`` would write into ``p.grad``
for the same losses and state (``MarbleOptimizer`` is built on a ``Balancer``: ``opt.balancer``).
``weights`` measures G (with ``gram="exact"`` K backward passes through the graph, which is
kept for the caller's backward), selects the objectives that take part, and weighs them;
every ``refresh_every``-th step it solves, in between it returns the cached weights after one
read of the loss values. ``step()`` commits the weighting's state (MARBLE's EMA, the warm
start, the cached weights) once the caller's optimizer step really happened; ``discard()``
forgets the calls of a step that was not taken.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import inputs as checks
from .distributed import Collective
from .estimators import Measurement, make_estimator
from .inputs import Inputs
from .report import BalanceReport, make_report
from .selection import NONFINITE_POLICIES, Selection, Verdict, check_values, select
from .sources import GramSource, make_source
from .weightings import MarbleWeighting, Weighting, WeightingResult, WeightingState, make_weighting
from .weightings.marble import check_ema_decay

__all__ = ["Balancer"]

#: MARBLE's own options, accepted as keywords for the default weighting.
_MARBLE_OPTIONS = ("ema_decay", "normalize", "rescale", "solver")


def build_weighting(weighting: Any, options: Mapping[str, Any] | None, **marble: Any) -> Weighting:
    """The weighting from a name, an instance or a callable; MARBLE's keyword options
    (``ema_decay``, ``normalize``, ``rescale``, ``solver``) only where they apply."""
    given = {k: v for k, v in marble.items() if v is not None}
    if options is not None and not isinstance(options, Mapping):
        raise TypeError(f"weighting_options must be a dict of options, got {type(options).__name__}: {options!r}")
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


def _param_groups(params: Any) -> list[dict[str, Any]]:
    """``params`` (tensors, or dicts with ``"params"``) as a list of parameter groups."""
    if isinstance(params, Tensor):
        params = [params]
    items = list(params)
    if items and isinstance(items[0], Mapping):
        return [{"params": list(g["params"])} for g in items]
    return [{"params": items}]


class Balancer:
    r"""Per-loss weights that balance K objectives, for a caller that does its own backward.

    ``w = weights(losses)`` measures the objectives' Gram matrix and weighs them; the caller
    backwards ``weighted_loss(losses, w)`` (``Σ_k w_k L_k``), steps its optimizer, then calls
    ``step()``. The gradient of ``Σ_k w_k L_k`` is the update ``MarbleOptimizer`` would write
    for the same losses and state (the guide "Balancer" has the loop, its cost and recipes).

    Args:
        params: the trained parameters (tensors, or parameter groups as dicts with
            ``"params"``), as given to the optimizer.
        weighting: as for ``MarbleOptimizer``: a name of ``marble_opt.WEIGHTINGS``, a
            ``Weighting`` or a callable ``fn(G) -> weights``.
        weighting_options: as for ``MarbleOptimizer``.
        ema_decay: MARBLE's ρ (as for ``MarbleOptimizer``).
        normalize: MARBLE's normalisation (as for ``MarbleOptimizer``).
        rescale: MARBLE's rescaling (as for ``MarbleOptimizer``).
        solver: the QP solver (as for ``MarbleOptimizer``).
        gram: the Gram source, ``"exact"``, ``"exact-lean"``, ``"shared"`` or ``"params"``.
        gram_params: the parameters ``gram="params"`` measures G on.
        gram_estimator: ``"batch"`` or ``"cross"`` (per-sample losses).
        estimator_options: for ``"cross"``: ``{"floor": ..., "ema": ...}``.
        refresh_every: solve on every N-th step (``step()`` calls); in between, ``weights``
            returns the cached weights after one read of the loss values.
        nonfinite: ``"skip"``, ``"raise"``, ``"exclude"`` or ``"propagate"`` (as ``"skip"``).
        process_group: the ranks to agree with under ``torch.distributed`` (as for
            ``MarbleOptimizer``).

    Attributes:
        report: the last ``weights`` call's ``BalanceReport`` (None before the first).

    With ``nonfinite="propagate"`` a ``Balancer`` behaves as with ``"skip"`` (it writes no
    gradient; the caller skips its step). Under ``"exclude"`` an excluded objective gets
    weight 0: build the weighted loss with ``weighted_loss``, which leaves zero-weighted
    (possibly non-finite) losses out.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
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
        process_group: Any = None,
    ) -> None:
        groups = _param_groups(params)
        self._setup(
            lambda: groups,
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
        self._params_of()  # at least one trainable parameter, none sharded

    @classmethod
    def _for(cls, param_groups: Callable[[], list[dict[str, Any]]], **options: Any) -> Balancer:
        """A Balancer over parameter groups read at each call (``MarbleOptimizer``'s)."""
        self = cls.__new__(cls)
        self._setup(param_groups, **options)
        self._owner = ("state_dict['marble']", "optimizer")  # error messages name its keys
        return self

    def _setup(
        self,
        param_groups: Callable[[], list[dict[str, Any]]],
        *,
        weighting: Any,
        weighting_options: Any,
        ema_decay: Any,
        normalize: Any,
        rescale: Any,
        solver: Any,
        gram: str,
        gram_params: Any,
        gram_estimator: str,
        estimator_options: Any,
        refresh_every: int,
        nonfinite: str,
        process_group: Any,
    ) -> None:
        self.weighting = build_weighting(
            weighting, weighting_options, ema_decay=ema_decay, normalize=normalize, rescale=rescale, solver=solver
        )
        if isinstance(refresh_every, bool) or not isinstance(refresh_every, int) or refresh_every < 1:
            raise ValueError(f"refresh_every must be an int >= 1, got {refresh_every!r}")
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        if gram_estimator == "cross" and gram == "shared":
            raise ValueError(
                "gram_estimator='cross' does not work with gram='shared': the two halves of the batch occupy "
                "disjoint rows of the shared tensor, so every cross product ⟨g_k^A, g_l^B⟩ there is exactly zero; "
                "use a parameter-space source (gram='exact', 'exact-lean' or 'params')"
            )
        self.estimator = make_estimator(gram_estimator, estimator_options)
        if gram_params is not None:
            gram_params = checks.check_gram_params(param_groups(), gram_params)
        self.source: GramSource = make_source(gram, gram_params)
        self.comm = Collective(process_group)
        self._param_groups = param_groups
        self.refresh_every = refresh_every
        self.nonfinite = nonfinite
        self.gram = gram
        self.reset()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        groups = self._param_groups()
        state["_param_groups"] = groups  # a list pickles; a closure does not
        state["report"] = None  # may hold values still on the device, read lazily
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        groups = state["_param_groups"]
        if not callable(groups):
            state["_param_groups"] = lambda: groups
        self.__dict__.update(state)

    def _rebind(self, param_groups: Callable[[], list[dict[str, Any]]]) -> None:
        self._param_groups = param_groups

    # ---- public surface ------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        """The objectives' names, fixed by the first call (empty before)."""
        return self._names or ()

    @property
    def num_steps(self) -> int:
        """Optimizer steps committed so far (``step()`` calls)."""
        return self._num_steps

    @property
    def state(self) -> WeightingState:
        """The weighting's committed state (α, warm start, cached loss weights)."""
        return self._wstate

    @property
    def gram_estimator(self) -> str:
        return self.estimator.name

    def reset(self) -> None:
        """Forget the objectives, the weighting's state and anything not yet committed."""
        self._names: tuple[str, ...] | None = None
        self._wstate = WeightingState()
        self.weighting.load(self._wstate)
        self.estimator.reset()
        self._pending: list[WeightingResult] = []
        self._crosses: list[np.ndarray] = []
        self._num_steps = 0
        self.report: BalanceReport | None = None

    def weights(
        self, losses: Mapping[str, Tensor], shared: Tensor | Sequence[Tensor] | None = None, groups: Any = None
    ) -> dict[str, float]:
        """Per-loss weights ``{name: w_k}``: the update is the gradient of ``Σ_k w_k L_k``.

        Args:
            losses: ``{name: scalar loss}`` (with ``gram_estimator="cross"``: per-sample (B,)
                losses; the weights then apply to their means).
            shared: with ``gram="shared"``: the tensor(s) every loss is computed from.
            groups: with ``"cross"``: a group id per sample (whole groups go to one half).

        The graph is kept: the caller's backward of ``weighted_loss(losses, w)`` follows.
        ``self.report`` tells what happened; when it says ``skipped`` every weight is 0 and the
        caller should not step (``"raise"`` raises ``FloatingPointError`` instead).
        """
        inputs = self.check_inputs(losses, shared, None, groups)
        weights = self._weights(inputs)
        self.fix_names(inputs.names)
        return weights

    def fix_names(self, names: tuple[str, ...]) -> None:
        """The objectives, fixed by the first call that completed (one that raised fixes nothing)."""
        if self._names is None:
            self._names = names

    def _weights(self, inputs: Inputs) -> dict[str, float]:
        if not self.solving:
            values = self.comm.mean_losses(inputs.values.cpu().numpy(), inputs.device)
            selection = check_values(values, inputs.names, self.nonfinite, False)
            if isinstance(selection, Verdict):
                return self._stopped(inputs, values, selection)
            w, alpha = self.cached_weights(selection.usable)
            if w is None:
                return self._stopped(inputs, values, self.no_usable(inputs.names, selection))
            self.report = make_report(
                inputs.names,
                values,
                weights=alpha,
                loss_weights=w,
                status="cached",
                reason="; ".join(selection.reasons),
            )
            return dict(zip(inputs.names, w.tolist()))
        measured = self.measure(inputs, keep_graph=True)
        selection = self.select(inputs, measured)
        if isinstance(selection, Verdict):
            return self._stopped(inputs, measured.values, selection)
        assert selection.valid is not None
        if not selection.valid.any():
            self.report = self.nothing_report(inputs, measured, selection)
            return dict.fromkeys(inputs.names, 0.0)
        result = self.weigh(inputs, measured, selection)
        self.record(measured, selection, result)
        self.source.release()
        self.report = self.solved_report(inputs, measured, selection, result)
        return dict(zip(inputs.names, result.w.tolist()))

    def weighted_loss(self, losses: Mapping[str, Tensor], weights: Mapping[str, float]) -> Tensor:
        """``Σ_k w_k L_k`` over the objectives with a non-zero weight (per-sample losses are
        averaged first), so that an excluded, non-finite loss cannot poison it through 0·NaN."""
        unknown = [name for name in weights if name not in losses]
        if unknown:
            raise ValueError(f"weights has {unknown}, which losses has not (losses: {list(losses)})")
        total = None
        for name, w in weights.items():
            if w != 0.0:
                loss = losses[name]
                loss = loss.mean() if loss.dim() > 0 else loss
                total = loss * w if total is None else total + loss * w
        if total is None:
            raise ValueError("every weight is 0 (the balancer skipped this step): there is no loss to backward")
        return total

    def step(self) -> None:
        """Commit the weighting's state after the caller's optimizer step really happened: the
        answers of every ``weights`` call since the last ``step`` (micro-batches of one
        accumulation) advance MARBLE's EMA, the warm start and the cached weights."""
        pending, crosses = self._pending, self._crosses
        self._pending, self._crosses = [], []
        self._num_steps += 1
        if not pending:
            return
        self._wstate = self.weighting.commit(self._wstate, pending)
        self.estimator.commit(crosses)

    def discard(self) -> None:
        """Forget the ``weights`` calls since the last ``step`` (their optimizer step was not
        taken): the weighting's state stays as committed."""
        if self._pending:
            self.weighting.load(self._wstate)
        self._pending, self._crosses = [], []

    # ---- the stages (MarbleOptimizer composes them with its apply stage) ----------------------
    @property
    def solving(self) -> bool:
        """Whether the next call solves (else it reuses the cached weights)."""
        return self._wstate.loss_weights is None or self._num_steps % self.refresh_every == 0 or bool(self._pending)

    def params(self) -> list[Tensor]:
        return self._params_of()

    def _params_of(self) -> list[Tensor]:
        return checks.trainable_params(self._param_groups())

    def check_inputs(self, losses: Any, shared: Any, extra: Any, groups: Any) -> Inputs:
        """Inputs: every check, then (under ``torch.distributed``) the names agreed across ranks;
        one rank's error is raised on every rank."""
        failure: BaseException | None = None
        keys: tuple[str, ...] = ()
        mesh: Any = None
        try:
            if self.estimator.name == "cross":
                per_sample, batch = checks.check_per_sample(losses, self._names)
                halves = checks.check_halves(batch, groups)
                keys = tuple(per_sample)
                scalars = checks.check_losses({n: v.mean() for n, v in per_sample.items()}, self._names)
            else:
                if groups is not None:
                    raise ValueError("groups= is only used with gram_estimator='cross'")
                scalars = checks.check_losses(losses, self._names)
                keys, per_sample, halves = tuple(scalars), None, None
            shared_list = checks.check_shared(shared)
            self.source.check_shared(shared_list)  # on cached steps too: errors do not depend on the step
            extra = checks.check_extra(extra)
            gram_params = getattr(self.source, "gram_params", None)
            if gram_params is not None:  # frozen since construction?
                checks.check_gram_params(self._param_groups(), gram_params)
            params = self._params_of()
            mesh = checks.sharding(params)
            if mesh is not None:
                self.check_sharded(mesh)
        except Exception as err:
            if not self.comm.active:
                raise
            failure = err
        # Under torch.distributed: the same keys on every rank (else ValueError on every rank,
        # not a hang), in one order (the first rank's), before any other collective.
        names = self.comm.agree_names(keys, failure=failure)
        names = self._names or names  # the objectives are fixed once a call completes: fix_names
        tensors = [scalars[n] for n in names]
        return Inputs(
            names=names,
            losses=tensors,
            per_sample=None if per_sample is None else [per_sample[n] for n in names],
            halves=halves,
            shared=shared_list,
            extra=extra,
            params=params,
            values=checks.stacked_values(tensors, extra),
            mesh=mesh,
        )

    def check_sharded(self, mesh: Any) -> None:
        """Refuse what does not work with FSDP2 parameters on ``mesh`` (a 1-D device mesh)."""
        if self.estimator.name == "cross":
            raise NotImplementedError(
                "gram_estimator='cross' is not supported with parameters sharded by FSDP2 (fully_shard): its two "
                "half-batch gradients would need two more backward passes per objective through FSDP; use "
                "gram_estimator='batch'"
            )
        if self.gram == "params":
            raise NotImplementedError(
                "gram='params' is not supported with parameters sharded by FSDP2 (fully_shard): gram_params are "
                "shards off the autograd graph; use gram='shared', 'exact' or 'exact-lean'"
            )
        group = self.comm._group()
        size = 1 if group is None else torch.distributed.get_world_size(group)
        if size != mesh.size():
            raise ValueError(
                f"the parameters are sharded by fully_shard over {mesh.size()} ranks, but this optimizer agrees with "
                f"{size} (process_group={self.comm.process_group!r}): pass process_group=mesh.get_group()"
            )

    def measure(self, inputs: Inputs, *, keep_graph: bool) -> Measurement:
        """G and the loss values (one device-to-host transfer on one process)."""
        try:
            measured = self.estimator.measure(inputs, self.source, keep_graph=keep_graph, comm=self.comm)
        except BaseException:
            self.source.release()
            raise
        if self.comm.active:  # the weighting's whole input, bit-identical on every rank
            gram, values = self.comm.same_everywhere(measured.gram, measured.values, device=inputs.device)
            raw = gram if measured.raw is measured.gram else measured.raw
            measured.gram, measured.raw, measured.values = gram, raw, values
        return measured

    def select(self, inputs: Inputs, measured: Measurement) -> Selection | Verdict:
        """Who takes part (``selection``): the loss values, then the measured gradients."""
        selection = check_values(measured.values, inputs.names, self.nonfinite, inputs.extra is not None)
        if isinstance(selection, Verdict):
            return selection
        return select(
            selection,
            measured.gram,
            measured.raw,
            inputs.names,
            self.nonfinite,
            lambda gram, usable: self.estimator.process(gram, usable, measured),
        )

    def weigh(self, inputs: Inputs, measured: Measurement, selection: Selection) -> WeightingResult:
        """The weighting's answer for the selected objectives."""
        assert selection.gram is not None and selection.valid is not None
        try:
            result = self.weighting.weigh(
                selection.gram, measured.values[: len(inputs.names)], selection.valid, self._wstate, inputs.names
            )
        except BaseException:
            self.source.release()
            raise
        if not self.weighting.deterministic and self.comm.active:  # every rank applies the first rank's
            raw, alpha, w = self.comm.same_everywhere(result.raw, result.alpha, result.w, device=inputs.device)
            result = WeightingResult(raw=raw, alpha=alpha, w=w, valid=result.valid, status=result.status)
        return result

    def record(self, measured: Measurement, selection: Selection, result: WeightingResult) -> None:
        """Keep a micro-batch's answer for ``step()`` (once its update is in)."""
        self._pending.append(result)
        pending_cross = self.estimator.pending(measured, selection.usable)
        if pending_cross is not None:
            self._crosses.append(pending_cross)

    @staticmethod
    def no_usable(names: Sequence[str], selection: Selection) -> Verdict:
        excluded = tuple(names[k] for k in np.flatnonzero(~selection.usable))
        return Verdict(f"no usable objective on a cached step (excluded {excluded}); " + "; ".join(selection.reasons))

    def cached_weights(self, usable: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """The cached loss weights w and α, renormalised over ``usable`` (``"exclude"``);
        ``(None, α)`` when no usable objective carries weight."""
        w = self._wstate.loss_weights
        assert w is not None
        alpha = self._wstate.alpha if self._wstate.alpha is not None else np.zeros(len(w))
        if usable.all():
            return w, alpha
        kept = float(alpha[usable].sum())
        if not kept > 0.0:
            return None, alpha
        return np.where(usable, w / kept, 0.0), np.where(usable, alpha / kept, 0.0)

    # ---- reports ---------------------------------------------------------------------------
    def _stopped(self, inputs: Inputs, values: np.ndarray, verdict: Verdict) -> dict[str, float]:
        self.source.release()
        if self.nonfinite == "raise":
            raise FloatingPointError(f"{verdict.reason} (nonfinite='raise')")
        self.report = make_report(inputs.names, values, skipped=True, status="skipped", reason=verdict.reason)
        return dict.fromkeys(inputs.names, 0.0)

    @staticmethod
    def _measured_fields(measured: Measurement, selection: Selection) -> dict[str, Any]:
        """What a report of a measured step says of G and the selection."""
        return dict(
            gram=selection.raw,
            used=selection.gram,
            norms=selection.norms,
            excluded=selection.excluded,
            consistency=measured.consistency,
            batch_estimated=measured.batch_estimated,
        )

    @classmethod
    def nothing_report(cls, inputs: Inputs, measured: Measurement, selection: Selection) -> BalanceReport:
        """No objective with a finite, non-zero gradient: nothing written, no policy raises."""
        return make_report(
            inputs.names,
            measured.values,
            skipped=True,
            status="skipped",
            reason="no objective has a finite, non-zero gradient",
            **cls._measured_fields(measured, selection),
        )

    @classmethod
    def solved_report(
        cls, inputs: Inputs, measured: Measurement, selection: Selection, result: WeightingResult, verdict: Any = None
    ) -> BalanceReport:
        return make_report(
            inputs.names,
            measured.values,
            weights=result.alpha,
            raw=result.raw,
            loss_weights=result.w,
            status=result.status,
            reason="; ".join(selection.reasons),
            verdict=verdict,
            **cls._measured_fields(measured, selection),
        )

    # ---- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Tensors and Python scalars (``torch.load(weights_only=True)`` reads it): the objectives,
        the weighting's state (``ema``: α, ``last_raw``: the warm start, ``loss_weights``: the
        cached w, ``weighting_state``: a stateful callable's own), the step count and the cross
        estimator's EMA of G."""

        def t(x: np.ndarray | None) -> Tensor | None:
            return None if x is None else torch.from_numpy(np.array(x, dtype=np.float64, copy=True))

        st = self._wstate
        sd: dict[str, Any] = {
            "names": list(self._names) if self._names is not None else None,
            "ema": t(st.alpha),
            "last_raw": t(st.warm),
            "loss_weights": t(st.loss_weights),
            "num_steps": int(self._num_steps),
            "weighting": self.weighting.name,
            "gram_ema": t(self.estimator.value),
        }
        if st.external is not None:
            sd["weighting_state"] = st.external
        return sd

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load a ``state_dict()``, checked first: a mismatch raises ``ValueError`` naming the
        key and value, with nothing changed."""
        checked = self.check_state(state)
        self.reset()
        self._names, self._wstate, self._num_steps, gram_ema = checked
        self.estimator.value = gram_ema
        self.weighting.load(self._wstate)

    def check_state(self, state: Any) -> tuple[tuple[str, ...] | None, WeightingState, int, np.ndarray | None]:
        """The state a ``load_state_dict`` would take, or ``ValueError`` naming what is wrong."""
        where, owner = getattr(self, "_owner", ("state_dict", "balancer"))
        if not isinstance(state, Mapping):
            raise TypeError(f"the balancing state must be a dict ({where}), got {type(state).__name__}")
        saved = state.get("weighting")
        if saved is not None and saved != self.weighting.name:
            raise ValueError(
                f"{where}['weighting'] = {saved!r}, but this {owner} uses weighting={self.weighting.name!r}: its "
                f"cached weights would be another method's; build the {owner} with the weighting the state was "
                "saved with"
                + (", or drop the 'marble' entry to start the balancing afresh" if owner == "optimizer" else "")
            )
        names = state.get("names")
        if names is not None:
            if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names) or not names:
                raise ValueError(f"{where}['names'] must be a non-empty list of strings, got {names!r}")
            if len(set(names)) != len(names):
                raise ValueError(f"{where}['names'] has duplicates: {list(names)}")
            names = tuple(names)
        k = None if names is None else len(names)

        def arr(key: str, simplex: bool = False) -> np.ndarray | None:
            value = state.get(key)
            if value is None:
                return None
            try:
                a = torch.as_tensor(value, dtype=torch.float64).numpy().copy()
            except (TypeError, ValueError, RuntimeError):
                raise ValueError(f"{where}[{key!r}] must be a vector of numbers, got {value!r}") from None
            if k is None or a.shape != (k,):
                raise ValueError(
                    f"{where}[{key!r}] has shape {tuple(a.shape)}, but the state names "
                    + ("no objectives" if names is None else f"{k} objectives ({list(names)})")
                )
            if not np.isfinite(a).all():
                raise ValueError(f"{where}[{key!r}] = {a.tolist()} is not finite")
            if simplex and ((a < -1e-9).any() or abs(float(a.sum()) - 1.0) > 1e-6):
                raise ValueError(f"{where}[{key!r}] = {a.tolist()} is not on the simplex (α ≥ 0, Σα = 1)")
            return a

        alpha = arr("ema", simplex=isinstance(self.weighting, MarbleWeighting) or self.weighting.name == "mgda")
        warm = arr("last_raw")
        loss_weights = arr("loss_weights")
        num_steps = state.get("num_steps", 0)
        if isinstance(num_steps, Tensor):
            num_steps = num_steps.item()
        if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 0:
            raise ValueError(f"{where}['num_steps'] must be an int >= 0, got {num_steps!r}")
        gram_ema = state.get("gram_ema")
        if gram_ema is not None:
            if self.estimator.name != "cross":
                raise ValueError(
                    f"{where}['gram_ema'] holds a cross estimate, but this {owner} uses "
                    f"gram_estimator={self.estimator.name!r}"
                )
            gram_ema = torch.as_tensor(gram_ema, dtype=torch.float64).numpy().copy()
            if k is None or gram_ema.shape != (k, k) or not np.isfinite(gram_ema).all():
                raise ValueError(
                    f"{where}['gram_ema'] must be a finite {k}×{k} matrix, got shape {tuple(gram_ema.shape)}"
                )
        external = state.get("weighting_state")
        if external is not None and not getattr(self.weighting, "stateful", False):
            raise ValueError(
                f"{where}['weighting_state'] holds a stateful weighting's own state, but this {owner}'s "
                f"weighting {self.weighting!r} keeps none"
            )
        ws = WeightingState(alpha=alpha, warm=warm, loss_weights=loss_weights, external=external)
        return names, ws, int(num_steps), gram_ema

    def set_ema_decay(self, value: Any) -> None:
        if not isinstance(self.weighting, MarbleWeighting):
            raise ValueError(f"ema_decay is an option of weighting='marble', not of {self.weighting!r}")
        self.weighting.ema_decay = check_ema_decay(value)

    def __repr__(self) -> str:
        return f"Balancer({self.describe()})"

    def describe(self) -> str:
        """The options, as ``repr`` shows them (``MarbleOptimizer``'s repr reuses it)."""
        w = self.weighting
        head = ", ".join(f"{k}={v!r}" for k, v in w.options().items())
        if not isinstance(w, MarbleWeighting):
            head = f"weighting={w!r}"
        est = f", gram_estimator={self.estimator.name!r}" if self.estimator.name != "batch" else ""
        return f"gram={self.gram!r}{est}, {head}, refresh_every={self.refresh_every}, nonfinite={self.nonfinite!r}"
