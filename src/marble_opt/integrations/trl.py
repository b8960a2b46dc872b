"""``MarbleGRPOTrainer``: TRL's ``GRPOTrainer`` with the rewards balanced in gradient space.

    from marble_opt.integrations.trl import MarbleGRPOTrainer

    trainer = MarbleGRPOTrainer(
        model=model, reward_funcs=[correct, brief, formatted], args=GRPOConfig(...),
        train_dataset=dataset, processing_class=tokenizer,
        marble={"gram": "exact", "ema_decay": 0.7},   # the Balancer's options
    )
    trainer.train()

Instead of aggregating the reward functions into one advantage, it keeps one advantage per reward
function (normalised within each prompt group as TRL's ``scale_rewards`` says; NaN where the
function returned ``None``, and such samples are left out of that reward's loss), builds K GRPO
losses from one forward pass (same log-probabilities, ratio and clipping as TRL's loss, one loss
per advantage), asks a ``marble_opt.Balancer`` for per-loss weights ``w_k`` and returns
``Σ_k w_k L_k`` (plus TRL's KL term, which stays out of the balancing), so TRL's accelerator does
the one backward. Logs ``weight/<reward name>`` and ``cos/<reward name>`` (the cosine of the update
with that reward's gradient, from the Balancer's Gram) and ``loss_weight/<reward name>`` (the
``w_k``) into ``state.log_history``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

try:
    from transformers import TrainerCallback
    from trl import GRPOTrainer
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "marble_opt.integrations.trl needs TRL: pip install 'marble-opt[trl]' (trl and datasets)"
    ) from err

__all__ = ["MarbleGRPOTrainer", "per_reward_advantages"]

_SUPPORTED_LOSSES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo")


def per_reward_advantages(rewards: torch.Tensor, num_generations: int, scale: str = "group") -> torch.Tensor:
    """One advantage per reward: ``(R_k - mean of R_k in the prompt group) / (std + 1e-4)``.

    ``rewards``: (N, K) with NaN where a reward does not apply; rows come in groups of
    ``num_generations`` completions of one prompt. ``scale``: ``"group"`` (std within the group),
    ``"batch"`` (std of reward k over the batch) or ``"none"``. NaN stays NaN; a group whose
    reward k is constant gets advantage 0.
    """
    n, k = rewards.shape
    if n % num_generations:
        raise ValueError(f"{n} rows do not split into groups of num_generations={num_generations}")
    grouped = rewards.view(-1, num_generations, k)
    mean = torch.nanmean(grouped, dim=1, keepdim=True)
    centred = grouped - mean
    if scale == "group":
        valid = (~torch.isnan(grouped)).sum(dim=1, keepdim=True).clamp(min=2)
        var = torch.nansum(centred**2, dim=1, keepdim=True) / (valid - 1)
        adv = centred / (var.sqrt() + 1e-4)
    elif scale == "batch":
        flat = rewards - torch.nanmean(rewards, dim=0, keepdim=True)
        valid = (~torch.isnan(rewards)).sum(dim=0, keepdim=True).clamp(min=2)
        std = (torch.nansum(flat**2, dim=0, keepdim=True) / (valid - 1)).sqrt()
        adv = centred / (std.view(1, 1, k) + 1e-4)
    elif scale == "none":
        adv = centred
    else:
        raise ValueError(f"scale_rewards={scale!r}: expected 'group', 'batch' or 'none'")
    return adv.view(n, k)


class _CommitCallback(TrainerCallback):
    """Commits the Balancer's smoothing state once the optimizer step happened."""

    def __init__(self, trainer: MarbleGRPOTrainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.balancer.step()


class MarbleGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` plus ``marble={...}``: the Balancer's options (``gram``,
    ``gram_params``, ``weighting``, ``ema_decay``, ``refresh_every``, ``nonfinite``, ...).

    Default ``gram="exact"``: K backward passes over the trainable parameters per micro-batch
    (use ``refresh_every`` to amortise, or ``gram="params"`` with ``gram_params`` on the last
    blocks / LoRA matrices for large models). ``gram="shared"`` takes its Gram w.r.t. the
    per-token log-probabilities.
    """

    def __init__(self, *args: Any, marble: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        from marble_opt import Balancer

        if marble is not None and not isinstance(marble, Mapping):
            raise TypeError(f"marble must be a dict of Balancer options, got {type(marble).__name__}: {marble!r}")
        options = {"gram": "exact", **dict(marble or {})}
        self._check_supported()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.balancer = Balancer(params, **options)
        self._marble_rewards: torch.Tensor | None = None
        self.add_callback(_CommitCallback(self))

    def _check_supported(self) -> None:
        a = self.args
        problems = []
        if self.loss_type not in _SUPPORTED_LOSSES:
            problems.append(f"loss_type={self.loss_type!r} (supported: {', '.join(_SUPPORTED_LOSSES)})")
        if getattr(a, "top_entropy_quantile", 1.0) < 1.0:
            problems.append(f"top_entropy_quantile={a.top_entropy_quantile} (use 1.0)")
        if getattr(a, "off_policy_mask_threshold", None) is not None:
            problems.append(f"off_policy_mask_threshold={a.off_policy_mask_threshold} (use None)")
        if getattr(self, "_entropy_bonus_enabled", False):
            problems.append("an entropy bonus (entropy_coef=0 and no adaptive entropy)")
        if getattr(self, "aux_loss_enabled", False):
            problems.append("a router auxiliary loss (output_router_logits=False)")
        if getattr(a, "use_vllm", False):
            problems.append("use_vllm=True (generate with transformers)")
        if problems:
            raise ValueError("MarbleGRPOTrainer does not support " + "; ".join(problems))

    # ---- rollouts: keep every reward function's rewards -------------------------------------------
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._marble_rewards = rewards  # (N over all processes, K), NaN where None
        return rewards

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        rewards, self._marble_rewards = self._marble_rewards, None
        assert rewards is not None
        mode = "train" if self.model.training else "eval"
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        adv = per_reward_advantages(rewards.float(), num_generations, self.scale_rewards)
        local = len(output["prompt_ids"])
        start = self.accelerator.process_index * local
        adv = adv[start : start + local].to(output["advantages"].device)
        output["marble_advantages"] = adv
        # Tokens of the samples each reward applies to, over the whole generation batch (dapo-style
        # normalisers), stored on every row so that TRL's splitting keeps it.
        lengths = output["completion_mask"].sum(-1).float()
        valid = (~torch.isnan(adv)).float()
        counts = self.accelerator.gather((valid * lengths.unsqueeze(1)).sum(0, keepdim=True)).sum(0)
        output["marble_num_items"] = counts.unsqueeze(0).expand(local, -1).clone()
        return output

    # ---- the K losses from one forward, balanced -------------------------------------------------
    def _per_reward_losses(self, per_token_logps, old_logps, mask, inputs, mode):
        coef_1 = torch.exp(self._log_weights(per_token_logps - old_logps, mask))
        advs = inputs["marble_advantages"]
        accum = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        losses = {}
        for k, name in enumerate(self.reward_func_names):
            a = advs[:, k]
            valid = ~torch.isnan(a)
            a = torch.nan_to_num(a, nan=0.0).unsqueeze(1)
            if self.loss_type == "cispo":
                per_token = -torch.clamp(coef_1, max=self.epsilon_high).detach() * a * per_token_logps
            elif self.loss_type == "sapo":
                temps = torch.where(a > 0, self.args.sapo_temperature_pos, self.args.sapo_temperature_neg)
                per_token = -(torch.sigmoid(temps * (coef_1 - 1)) * 4 / temps) * a
            else:
                c1 = coef_1 if self.args.delta is None else torch.clamp(coef_1, max=self.args.delta)
                c2 = torch.clamp(coef_1, 1 - self.epsilon_low, 1 + self.epsilon_high)
                per_token = -torch.min(c1 * a, c2 * a)
            m = mask * valid.unsqueeze(1).to(mask.dtype)
            n_valid = valid.sum().clamp(min=1)
            if self.loss_type in ("grpo", "sapo"):
                loss = ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).sum() / n_valid / accum
            elif self.loss_type == "bnpo":
                loss = (per_token * m).sum() / m.sum().clamp(min=1.0) / accum
            elif self.loss_type == "dr_grpo":
                loss = (per_token * m).sum() / (n_valid * self.max_completion_length) / accum
            elif self.loss_type == "luspo":
                loss = (per_token * m).sum(-1).sum() / n_valid / accum
            else:  # dapo, cispo: tokens of the samples this reward applies to, in the generation batch
                norm = inputs["marble_num_items"][0, k].clamp(min=1.0) / self.accelerator.num_processes
                if mode == "train":
                    norm = norm * self.current_gradient_accumulation_steps / self.args.steps_per_generation
                loss = (per_token * m).sum() / norm
            losses[name] = loss
        return losses, coef_1

    def _log_weights(self, log_ratio, mask):
        if self.importance_sampling_level == "sequence":
            return ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
        return log_ratio

    def _compute_loss(self, model, inputs):
        if "marble_advantages" not in inputs:
            return super()._compute_loss(model, inputs)
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        per_token_logps, entropies, _ = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=True
        )
        old = inputs.get("old_per_token_logps")
        old = per_token_logps.detach() if old is None else old
        mode = "train" if self.model.training else "eval"
        losses, coef_1 = self._per_reward_losses(per_token_logps, old, mask, inputs, mode)

        extra = None
        if self.beta != 0.0:  # TRL's KL term, kept out of the balancing and added after it
            ref = inputs["ref_per_token_logps"]
            kl = torch.exp(ref - per_token_logps) - (ref - per_token_logps) - 1
            if self.args.use_bias_correction_kl:
                kl = kl * coef_1
            accum = self.current_gradient_accumulation_steps if mode == "train" else 1.0
            extra = self.beta * ((kl * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accum
            self._metrics[mode]["kl"].append(((kl * mask).sum() / mask.sum().clamp(min=1.0)).item())
        self._metrics[mode]["entropy"].append(((entropies * mask).sum() / mask.sum().clamp(min=1.0)).item())

        if mode != "train" or not torch.is_grad_enabled():
            total = sum(losses.values()) / len(losses)
            return total if extra is None else total + extra
        shared = per_token_logps if self.balancer.gram == "shared" else None
        w = self.balancer.weights(losses, shared=shared) if shared is not None else self.balancer.weights(losses)
        report = self.balancer.report
        cos = getattr(report, "update_cosine", None) or {}
        alpha = getattr(report, "weights", None) or {}
        for name in self.reward_func_names:
            # weight/: the balancing coefficients (on the simplex); loss_weight/: w_k in Σ w_k L_k
            self._metrics[mode][f"weight/{name}"].append(float(alpha.get(name, 0.0)))
            self._metrics[mode][f"loss_weight/{name}"].append(float(w[name]))
            if name in cos and cos[name] is not None:
                self._metrics[mode][f"cos/{name}"].append(float(cos[name]))
        if any(v != 0.0 for v in w.values()):
            total = self.balancer.weighted_loss(losses, w)
        else:  # nothing to balance (every gradient zero or skipped): a zero loss on the graph
            total = per_token_logps.sum() * 0.0
        return total if extra is None else total + extra
