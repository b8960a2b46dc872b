"""Multi-reward RL helpers for flow-matching models (DiffusionNFT), torch only.

- ``group_advantages``: one advantage per reward, centred within each prompt group and
  scaled by the reward's standard deviation (over the whole batch by default).
- ``gdpo_advantages``: GDPO's single advantage (each reward normalised within its prompt
  group, weighted sum, then normalised over the batch), the baseline multi-reward
  aggregation of TRL's ``normalize_then_sum``.
- ``reward_masks``: which samples each reward applies to (its finite entries).
- ``nft_losses``: the DiffusionNFT loss of each reward, all sharing one graph through the
  predicted velocity, ready for ``MarbleOptimizer.step(out.losses, shared=v_theta,
  extra=out.kl)``.
- ``update_cosines``: cosine of each loss's gradient with an update direction, both taken
  with respect to a shared tensor (the diagnostic for an unbalanced baseline).
- ``old_policy_decay`` and ``ema_update_``: DiffusionNFT's old-policy schedule and the
  in-place EMA (lerp) of parameter dicts it and a model EMA use.
- ``flow_sample``: deterministic flow-matching samplers (Euler, DPM-Solver++(2M)) over any
  velocity function.

Typical use, with rewards that may be NaN where they do not apply::

    adv = group_advantages(rewards, group_ids)
    out = nft_losses(v_theta, v_old, x0, x_t, t, adv, masks=reward_masks(rewards), v_ref=v_ref)
    opt.step(out.losses, shared=v_theta, extra=out.kl)

Without ``masks`` a sample whose reward is NaN still enters that reward's loss with
advantage 0 (r = ½); with them it is left out and the loss is averaged over valid samples.

Because the NFT loss is affine in the optimality probability ``r``, for weights summing to
one ``Σ_k w_k ∇L_k = ∇L(Σ_k w_k r_k)``: balancing K rewards costs one backward.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "FLOW_SAMPLERS",
    "NFTLosses",
    "ema_update_",
    "flow_sample",
    "gdpo_advantages",
    "group_advantages",
    "nft_losses",
    "old_policy_decay",
    "optimality_probability",
    "reward_masks",
    "update_cosines",
]
#: Names of the samplers ``flow_sample`` offers.
FLOW_SAMPLERS = ("euler", "dpm2")


def _check_batch(name: str, value: Tensor, batch: int) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.ndim != 1 or value.shape[0] != batch:
        raise ValueError(f"{name} must have shape ({batch},), got {tuple(value.shape)}")
    return value


def group_advantages(
    rewards: Mapping[str, Tensor],
    group_ids: Tensor,
    *,
    eps: float = 1e-4,
    global_std: bool = True,
) -> dict[str, Tensor]:
    """Per-reward advantages ``A_k(i) = (R_k(i) − mean_{j∈group(i)} R_k(j)) / (std_k + eps)``.

    Means and standard deviations (population, ddof=0) are taken over the valid samples
    only.

    Args:
        rewards: ``{name: (B,) rewards}``; NaN (or ±inf) marks a sample the reward does not
            apply to.
        group_ids: (B,) integer id of each sample's prompt group.
        eps: added to the standard deviation (>= 0).
        global_std: std of R_k over all valid samples of the batch (DiffusionNFT's and the
            MARBLE authors' setting, the default); False: std within each group.

    Returns:
        ``{name: (B,) float32 advantages}``; 0 where the reward is NaN, and 0 for a group
        whose valid rewards are all equal (never NaN).
    """
    _check_group_args(rewards, group_ids, eps)
    batch = group_ids.shape[0]
    _, inverse = torch.unique(group_ids, return_inverse=True)
    num_groups = int(inverse.max()) + 1 if batch else 0
    out: dict[str, Tensor] = {}
    for name, reward in rewards.items():
        r = _check_batch(f"rewards[{name!r}]", reward, batch).detach().to(torch.float64)
        inv = inverse.to(r.device)
        valid = torch.isfinite(r)
        r0 = torch.where(valid, r, torch.zeros_like(r))
        vf = valid.to(torch.float64)
        count = torch.zeros(num_groups, dtype=torch.float64, device=r.device).index_add_(0, inv, vf)
        total = torch.zeros_like(count).index_add_(0, inv, r0)
        mean = total / count.clamp(min=1.0)
        # a group whose valid rewards are all equal is centred to exact zeros (its float mean
        # may differ from the common value in the last bit)
        inf = torch.full_like(count, float("inf"))
        hi = (-inf).scatter_reduce(0, inv, torch.where(valid, r, -inf[inv]), "amax")
        lo = inf.scatter_reduce(0, inv, torch.where(valid, r, inf[inv]), "amin")
        spread = valid & (hi > lo)[inv]
        centred = torch.where(spread, r0 - mean[inv], torch.zeros_like(r0))
        if global_std:
            n = vf.sum().clamp(min=1.0)
            batch_mean = r0.sum() / n
            std_i = torch.sqrt((((r0 - batch_mean) ** 2) * vf).sum() / n).expand_as(r0)
        else:
            var = torch.zeros_like(count).index_add_(0, inv, centred**2) / count.clamp(min=1.0)
            std_i = var.sqrt()[inv]
        # centred != 0 implies a positive std, so eps = 0 is safe
        adv = torch.where(centred != 0, centred / (std_i + eps), torch.zeros_like(centred))
        out[name] = adv.to(torch.float32)
    return out


def gdpo_advantages(
    rewards: Mapping[str, Tensor],
    group_ids: Tensor,
    *,
    weights: Mapping[str, float] | None = None,
    eps: float = 1e-4,
) -> Tensor:
    """GDPO's advantage (arXiv 2601.05242): normalise each reward within its group, sum, normalise.

    1. Per reward k and prompt group g, over the valid (finite) rewards of the group:
       ``A_k(i) = (R_k(i) − mean_g R_k) / (std_g R_k + eps)`` (std with Bessel's correction).
    2. ``S(i) = Σ_k w_k A_k(i)`` over the rewards whose ``A_k(i)`` is defined: a reward that
       does not apply to sample i (NaN) is skipped, and so is a group with fewer than two
       valid values of that reward (its std is undefined).
    3. ``A(i) = (S(i) − mean S) / (std S + eps)``, mean and std (Bessel) over the whole batch
       of samples that at least one reward applies to.

    This is TRL's ``GRPOConfig(multi_objective_aggregation="normalize_then_sum")`` (TRL 1.16,
    ``GRPOTrainer._generate_and_score_completions``) with ``reward_weights``, for arbitrary
    group ids instead of TRL's consecutive groups of ``num_generations``. It differs only in:

    - a sample that no reward applies to gets NaN here (TRL: 0, after leaving it out of the
      batch statistics as here); ``torch.nan_to_num(a, nan=0.0)`` gives TRL's value, while
      ``nft_losses`` leaves a non-finite advantage out of the loss instead of training it
      at ``r = ½``;
    - a group (or batch) whose valid values are all equal gives exact zeros; TRL divides
      the float rounding residue of ``R − mean`` by ``eps`` (of order 1e-3 at most in
      float32 for rewards of order 1);
    - the arithmetic is float64 (TRL: the rewards' dtype, float32), the result float32.

    Args:
        rewards: ``{name: (B,) rewards}``; NaN (or ±inf) marks a sample the reward does not
            apply to.
        group_ids: (B,) integer id of each sample's prompt group.
        weights: ``{name: w_k}`` (finite; missing names: 1), TRL's ``reward_weights``.
        eps: added to both standard deviations (>= 0; TRL's 1e-4).

    Returns:
        (B,) float32 advantages; NaN exactly where no reward applies.
    """
    _check_group_args(rewards, group_ids, eps)
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(rewards))
    if unknown:
        raise ValueError(f"weights names {unknown}, which are not rewards {list(rewards)}")
    for name, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(f"weights[{name!r}] must be a finite number, got {w!r}")
    batch = group_ids.shape[0]
    _, inverse = torch.unique(group_ids, return_inverse=True)
    num_groups = int(inverse.max()) + 1 if batch else 0

    def centred(x: Tensor, valid: Tensor, inv: Tensor, n_groups: int) -> tuple[Tensor, Tensor]:
        """``x − group mean`` (exact zeros in a group of equal values) and the group's Bessel
        std, both per sample; 0 where ``x`` is invalid or its group has < 2 valid values."""
        x0 = torch.where(valid, x, torch.zeros_like(x))
        vf = valid.to(x.dtype)
        count = torch.zeros(n_groups, dtype=x.dtype, device=x.device).index_add_(0, inv, vf)
        mean = torch.zeros_like(count).index_add_(0, inv, x0) / count.clamp(min=1.0)
        inf = torch.full_like(count, float("inf"))
        hi = (-inf).scatter_reduce(0, inv, torch.where(valid, x, -inf[inv]), "amax")
        lo = inf.scatter_reduce(0, inv, torch.where(valid, x, inf[inv]), "amin")
        defined = valid & (count >= 2)[inv]
        c = torch.where(defined & (hi > lo)[inv], x0 - mean[inv], torch.zeros_like(x0))
        var = torch.zeros_like(count).index_add_(0, inv, c**2) / (count - 1).clamp(min=1.0)
        return c, var.sqrt()[inv]

    total: Tensor | None = None
    scorable: Tensor | None = None
    for name, reward in rewards.items():
        r = _check_batch(f"rewards[{name!r}]", reward, batch).detach().to(torch.float64)
        valid = torch.isfinite(r)
        c, std = centred(r, valid, inverse.to(r.device), num_groups)
        # c != 0 implies std > 0, so eps = 0 is safe; undefined terms (NaN rewards, groups of
        # one valid value) add nothing, as TRL's nansum does
        a = torch.where(c != 0, c / (std + eps), torch.zeros_like(c)) * float(weights.get(name, 1.0))
        total = a if total is None else total + a
        scorable = valid if scorable is None else scorable | valid
    assert total is not None and scorable is not None
    zeros = torch.zeros(batch, dtype=torch.long, device=total.device)
    c, std = centred(total, scorable, zeros, 1)
    adv = torch.where(c != 0, c / (std + eps), torch.zeros_like(c))
    return torch.where(scorable, adv, torch.full_like(adv, float("nan"))).to(torch.float32)


def reward_masks(rewards: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``{name: (B,) bool}``: True where reward ``name`` is finite (applies to the sample).

    Pass it as ``nft_losses(..., masks=reward_masks(rewards))`` so that samples a reward
    does not apply to are left out of that reward's loss (``group_advantages`` gives them
    advantage 0, which alone would still train them at r = ½).
    """
    if not isinstance(rewards, Mapping) or not rewards:
        raise ValueError("rewards must be a non-empty dict {name: (B,) tensor}")
    out = {}
    for name, reward in rewards.items():
        if not isinstance(reward, Tensor) or reward.ndim != 1:
            raise ValueError(f"rewards[{name!r}] must be a 1-D tensor of shape (B,), got {reward!r}")
        out[name] = torch.isfinite(reward)
    return out


def optimality_probability(advantage: Tensor, clip: float = 5.0) -> Tensor:
    """``r = clip(A, −C, C) / (2C) + ½`` ∈ [0, 1], the NFT optimality probability."""
    return advantage.clamp(-clip, clip) / (2.0 * clip) + 0.5


class NFTLosses(NamedTuple):
    """Per-reward NFT losses sharing one graph, and the unbalanced KL term (or None)."""

    losses: dict[str, Tensor]
    kl: Tensor | None


def nft_losses(
    v_theta: Tensor,
    v_old: Tensor,
    x0: Tensor,
    x_t: Tensor,
    t: Tensor,
    advantages: Mapping[str, Tensor],
    *,
    beta: float = 0.1,
    adv_clip: float = 5.0,
    masks: Mapping[str, Tensor] | None = None,
    v_ref: Tensor | None = None,
    kl_weight: float = 1e-4,
    min_weight: float = 1e-5,
    reduction: str = "mean",
) -> NFTLosses:
    """DiffusionNFT losses, one per reward, on a batch of noised samples.

    With ``x_t = (1−t)·x0 + t·ε`` and velocities ``v = ε − x0``:
    ``v⁺ = β v_θ + (1−β) v_old``, ``v⁻ = (1+β) v_old − β v_θ``, ``x̂± = x_t − t v±``;
    ``P_i = mean((x̂⁺−x0)²)/w⁺_i``, ``N_i = mean((x̂⁻−x0)²)/w⁻_i`` with ``w±`` the detached
    mean absolute error of ``x̂±`` (clamped at ``min_weight``); per reward
    ``L_k = mean_{i valid for k} C·(r_k(i)·P_i + (1−r_k(i))·N_i)/β`` with ``r_k`` from
    ``optimality_probability(A_k, C)``.

    Args:
        v_theta: (B, ...) velocity of the policy being trained (requires grad).
        v_old: (B, ...) velocity of the old (sampling) policy; detached here.
        x0: (B, ...) clean samples; x_t: (B, ...) noised samples; t: (B,) times in [0, 1].
        advantages: ``{name: (B,)}`` from ``group_advantages``.
        beta: NFT's β (> 0). adv_clip: C.
        masks: optional ``{name: (B,) bool}``; samples where False are left out of that
            reward's mean (a reward with no valid sample gives a zero loss, still on the graph).
            A non-finite advantage leaves its sample out of that reward as well.
        v_ref: optional (B, ...) velocity of the frozen reference (e.g. LoRA disabled);
            gives ``kl = kl_weight · mean((v_θ − v_ref)²)``, kept out of the balancing.
        reduction: ``"mean"`` (a scalar per reward) or ``"none"``: per-sample losses (B,)
            per reward, 0 for a left-out sample and the kept ones scaled by B / (number
            kept), so that ``.mean()`` is exactly the ``"mean"`` loss (what per-sample Gram
            estimators that split the batch expect).

    Returns:
        ``NFTLosses(losses={name: scalar or (B,)}, kl=scalar or None)``.
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta!r}")
    if not adv_clip > 0:
        raise ValueError(f"adv_clip must be > 0, got {adv_clip!r}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if not isinstance(advantages, Mapping) or not advantages:
        raise ValueError("advantages must be a non-empty dict {name: (B,) tensor}")
    if masks is not None:
        unknown = [k for k in masks if k not in advantages]
        if unknown:
            raise ValueError(f"masks has keys {unknown} that are not rewards in advantages {list(advantages)}")
    for name, value in (("v_old", v_old), ("x0", x0), ("x_t", x_t)):
        if value.shape != v_theta.shape:
            raise ValueError(f"{name} must have the shape of v_theta {tuple(v_theta.shape)}, got {tuple(value.shape)}")
    batch = v_theta.shape[0]
    t = _check_batch("t", t, batch).to(v_theta.dtype).view(batch, *([1] * (v_theta.ndim - 1)))
    dims = tuple(range(1, v_theta.ndim))
    v_old = v_old.detach()
    x0 = x0.detach()
    x_t = x_t.detach()

    def weighted_error(velocity: Tensor) -> Tensor:
        err = x_t - t * velocity - x0
        with torch.no_grad():
            weight = err.detach().abs().mean(dim=dims).clamp(min=min_weight)
        return (err**2).mean(dim=dims) / weight

    positive = weighted_error(beta * v_theta + (1.0 - beta) * v_old)
    negative = weighted_error((1.0 + beta) * v_old - beta * v_theta)
    losses: dict[str, Tensor] = {}
    for name, adv in advantages.items():
        adv = _check_batch(f"advantages[{name!r}]", adv, batch).detach().to(positive.dtype)
        keep = torch.isfinite(adv)
        if masks is not None and name in masks:
            keep = keep & (_check_batch(f"masks[{name!r}]", masks[name], batch).to(keep.device) != 0)
        r = optimality_probability(torch.where(keep, adv, torch.zeros_like(adv)), adv_clip)
        per_sample = adv_clip * (r * positive + (1.0 - r) * negative) / beta
        # where(), not a product: a non-finite value of a left-out sample does not reach the loss
        kept = torch.where(keep, per_sample, torch.zeros_like(per_sample))
        n_kept = keep.sum().clamp(min=1).to(per_sample.dtype)
        losses[name] = kept.sum() / n_kept if reduction == "mean" else kept * (batch / n_kept)
    kl = None
    if v_ref is not None:
        if v_ref.shape != v_theta.shape:
            raise ValueError(f"v_ref must have the shape of v_theta {tuple(v_theta.shape)}, got {tuple(v_ref.shape)}")
        kl = kl_weight * ((v_theta - v_ref.detach()) ** 2).mean()
    return NFTLosses(losses, kl)


def update_cosines(
    losses: Mapping[str, Tensor],
    shared: Tensor,
    *,
    update: Tensor | None = None,
) -> tuple[dict[str, float], dict[str, bool]]:
    """Cosine of each loss's gradient with the update direction, gradients taken w.r.t. ``shared``.

    The diagnostic for an unbalanced baseline: with ``shared`` the predicted velocity (the
    "shared" approximation MARBLE balances with), each gradient is one cheap backward
    through the loss only; the graph is kept for the real backward.

    Args:
        losses: ``{name: scalar loss}``, each a function of ``shared``.
        shared: the tensor the gradients are taken with respect to (requires grad).
        update: optional scalar loss whose gradient is the update direction (for example
            DiffusionNFT's single weighted-sum loss); default: the plain mean of the gradients
            of the losses that have one.

    Returns:
        ``(cosines, valid)``: ``{name: cosine in [-1, 1]}`` and ``{name: bool}``, False for a
        loss whose gradient is zero (a reward with no applicable sample); its cosine is 0.
    """
    if not isinstance(losses, Mapping) or not losses:
        raise ValueError("losses must be a non-empty dict {name: scalar tensor}")
    names = list(losses)
    grads = [torch.autograd.grad(losses[k], shared, retain_graph=True, allow_unused=True)[0] for k in names]
    rows = torch.stack([(g if g is not None else torch.zeros_like(shared)).flatten().double() for g in grads])
    norms = rows.norm(dim=1)
    valid = norms > 1e-12
    if update is None:
        w = valid.double() / valid.sum().clamp(min=1)
        direction = w @ rows
    else:
        g = torch.autograd.grad(update, shared, retain_graph=True, allow_unused=True)[0]
        direction = (g if g is not None else torch.zeros_like(shared)).flatten().double()
    d_norm = direction.norm()
    dots = rows @ direction
    ok = valid & (d_norm > 0)
    cos = torch.where(ok, dots / (d_norm * norms).clamp(min=1e-300), torch.zeros_like(dots)).clamp(-1, 1)
    return {n: float(c) for n, c in zip(names, cos)}, {n: bool(v) for n, v in zip(names, valid)}


def old_policy_decay(step: int, rate: float = 0.001, cap: float = 0.95) -> float:
    """DiffusionNFT's old-policy decay ``d = min(rate·step, cap)`` (``step`` counts from 0).

    The old policy is then updated as ``θ_old ← d·θ_old + (1−d)·θ`` (``ema_update_``): it
    copies the policy at first and lags it more and more, up to ``cap``.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")
    if not rate >= 0:
        raise ValueError(f"rate must be >= 0, got {rate!r}")
    if not 0.0 <= cap <= 1.0:
        raise ValueError(f"cap must be in [0, 1], got {cap!r}")
    return min(rate * step, cap)


@torch.no_grad()
def ema_update_(
    target: Mapping[str, Tensor] | Iterable[Tensor],
    source: Mapping[str, Tensor] | Iterable[Tensor],
    decay: float,
) -> None:
    """In place, ``target ← decay·target + (1−decay)·source`` for each pair of tensors.

    Args:
        target: tensors updated in place (a dict is matched to ``source`` by key).
        source: tensors of the same shapes (read, never written; detached).
        decay: in [0, 1]; 0 copies ``source``, 1 leaves ``target`` unchanged.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay!r}")
    if isinstance(target, Mapping):
        if not isinstance(source, Mapping):
            raise TypeError("target is a dict: source must be a dict with the same keys")
        missing = sorted(set(target) ^ set(source))
        if missing:
            raise ValueError(f"target and source have different keys: {missing[:5]}")
        pairs = [(target[k], source[k]) for k in target]
    else:
        t_list = list(target)
        s_list = list(source.values()) if isinstance(source, Mapping) else list(source)
        if len(t_list) != len(s_list):
            raise ValueError(f"target has {len(t_list)} tensors but source has {len(s_list)}")
        pairs = list(zip(t_list, s_list))
    for t, s in pairs:
        if t.shape != s.shape:
            raise ValueError(f"shape mismatch: target {tuple(t.shape)} vs source {tuple(s.shape)}")
        t.mul_(decay).add_(s.detach().to(t.dtype), alpha=1.0 - decay)


def flow_sample(
    velocity: Callable[[Tensor, Tensor], Tensor],
    noise: Tensor,
    sigmas: Tensor | Iterable[float],
    method: str = "euler",
) -> Tensor:
    """Deterministic flow-matching sampling from ``noise`` over the times ``sigmas`` (no CFG).

    The flow is ``x_σ = (1−σ)·x0 + σ·ε`` with velocity ``v = ε − x0``.

    - ``"euler"``: ``x ← x + (σ_next − σ)·v``.
    - ``"dpm2"``: DPM-Solver++(2M) (Lu et al. 2022, https://arxiv.org/abs/2211.01095) in the
      data prediction ``x̂0 = x − σ·v`` with ``α = 1 − σ`` and ``λ = log(α/σ)``; its
      first-order step is exactly Euler, and the first step and a step to σ = 0 are first
      order (diffusers' ``DPMSolverMultistepScheduler`` with ``final_sigmas_type="zero"``).

    Args:
        velocity: ``velocity(x, sigma) -> v``, with ``x`` like ``noise`` and ``sigma`` (B,).
        noise: (B, ...) starting point at ``sigmas[0]`` (usually 1).
        sigmas: decreasing times, (n+1,), the last usually 0: n velocity evaluations.
        method: ``"euler"`` or ``"dpm2"``.

    Returns:
        (B, ...) the sample at ``sigmas[-1]``, in the dtype of ``noise`` (float32 at least).
    """
    if method not in FLOW_SAMPLERS:
        raise ValueError(f"method must be one of {list(FLOW_SAMPLERS)}, got {method!r}")
    sig = sigmas.tolist() if isinstance(sigmas, Tensor) else [float(s) for s in sigmas]
    if len(sig) < 2:
        raise ValueError(f"sigmas needs at least 2 times, got {sig!r}")
    x = noise if noise.dtype in (torch.float32, torch.float64) else noise.float()
    prev_x0: Tensor | None = None
    prev_h: float | None = None
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        v = velocity(x, torch.full((x.shape[0],), s, device=x.device, dtype=x.dtype))
        if method == "euler":
            x = x + (s_next - s) * v
            continue
        x0 = x - s * v
        h = None
        if 0.0 < s < 1.0 and 0.0 < s_next < 1.0:
            h = math.log((1 - s_next) / s_next) - math.log((1 - s) / s)
        d = x0
        if prev_x0 is not None and h is not None and prev_h is not None and s_next > 0:
            r = prev_h / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * prev_x0
        # x_next = (σ_next/σ)·x + (α_next − σ_next·α/σ)·D
        x = (s_next / s) * x + ((1 - s_next) - s_next * (1 - s) / s) * d
        prev_x0, prev_h = x0, h
    return x


def _check_group_args(rewards: Any, group_ids: Any, eps: Any) -> None:
    """The checks shared by the group-normalised advantages: ``ValueError`` naming the argument."""
    if not isinstance(rewards, Mapping) or not rewards:
        raise ValueError("rewards must be a non-empty dict {name: (B,) tensor}")
    if not isinstance(group_ids, Tensor) or group_ids.ndim != 1:
        raise ValueError(f"group_ids must be a 1-D tensor of shape (B,), got {group_ids!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 <= eps < float("inf"):
        raise ValueError(f"eps must be a finite float >= 0, got {eps!r}")
