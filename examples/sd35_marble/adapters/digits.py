"""The digits model behind the model seam: a 0.5 M-parameter class-conditional rectified flow.

Preset ``digits`` (the default). The model (``digits/model.py``, pretrained on scikit-learn's
bundled 8×8 digits) maps ``x`` (B, 64) in [-1, 1], ``t`` (B,) and the digit label to a
velocity. Prompts are digit labels; a prompt group is ``group_size`` samples of one label.
The whole network is trained: the policy is a full copy of the pretrained model, the old
(sampling) policy a second copy, the reference of the KL the frozen pretrained model.
Rewards come from a suite of ``digits/rewards.py`` (``--reward-suite``); they score images
(B, 8, 8) in [0, 1] with the labels.

Evaluation samples (``samples/eval_samples_step_XXXXXX.npz``, before the first step and at
every ``--sample-every``) come from fixed held-out noise, the same for every RL seed:
``images`` float32 (N, 8, 8) in [0, 1] oriented like ``load_digits().images / 16``, and
``labels`` int64 (N,), ``grid_images_per_prompt`` samples of each digit.
"""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .base import Cond, ConfigError, ModelAdapter

#: Seed of the held-out evaluation noise (independent of --seed: every run sees the same).
EVAL_NOISE_SEED = 20_240_601
NUM_CLASSES = 10


class DigitsAdapter(ModelAdapter):
    """Full-model RL on the pretrained digits flow (policy, old copy, frozen reference)."""

    presets = ("digits",)
    sample_at_start = True

    @classmethod
    def check_rewards(cls, cfg: Any) -> None:
        """``--rewards`` picks digits rewards (default: the ``--reward-suite``'s); unknown names,
        reward options and ``--reward-weights`` keys outside the run's rewards are refused."""
        from digits.rewards import DIGIT_REWARDS, REWARD_SUITES

        if cfg.reward_suite not in REWARD_SUITES:
            raise ConfigError(f"--reward-suite {cfg.reward_suite!r}: choose one of {list(REWARD_SUITES)}")
        unknown = [n for n in cfg.rewards if n not in DIGIT_REWARDS]
        if unknown:
            raise ConfigError(
                f"--rewards: unknown digits reward {', '.join(map(repr, unknown))}; the digits rewards are "
                f"{', '.join(DIGIT_REWARDS)} (leave --rewards out to train the --reward-suite's)"
            )
        repeated = sorted({n for n in cfg.rewards if cfg.rewards.count(n) > 1})
        if repeated:
            raise ConfigError(f"--rewards: reward {', '.join(map(repr, repeated))} given more than once")
        if cfg.reward_options:
            raise ConfigError(
                f"--reward-options {sorted(cfg.reward_options)}: the digits rewards take no options; leave it out"
            )
        names = list(cfg.rewards) or REWARD_SUITES[cfg.reward_suite]
        unknown = sorted(set(cfg.reward_weights) - set(names))
        if unknown:
            raise ConfigError(f"--reward-weights names {unknown}, which are not among the rewards of this run {names}")

    @classmethod
    def build_rewards(cls, cfg: Any, device: torch.device) -> list[Any]:
        from digits.rewards import DIGIT_REWARDS, build_digits_rewards

        cls.check_rewards(cfg)
        if cfg.rewards:  # --rewards picks digits rewards by name instead of a suite
            return [DIGIT_REWARDS[n] for n in cfg.rewards]
        return list(build_digits_rewards(cfg.reward_suite))

    def __init__(self, cfg: Any, accelerator: Any) -> None:
        from digits.model import load_pretrained

        self.cfg = cfg
        self.accelerator = accelerator
        self.device = accelerator.device
        try:
            ref = load_pretrained(cfg.pretrain_seed)
        except FileNotFoundError as exc:
            raise ConfigError(f"--pretrain-seed {cfg.pretrain_seed}: {exc}") from exc
        self.ref = ref.to(self.device).eval().requires_grad_(False)
        self.policy = copy.deepcopy(self.ref).requires_grad_(True)
        self.old = copy.deepcopy(self.ref)
        self.module = self.policy
        self.train_module: torch.nn.Module = self.policy  # replaced by the DDP wrapper when prepared
        self.latent_shape = (64,)
        self.sigmas = torch.linspace(1.0, 0.0, cfg.sampling_steps + 1)

    def velocity(self, x: Tensor, t: Tensor, cond: Cond, policy: str = "default") -> Tensor:
        (labels,) = cond
        if policy == "default":
            model = self.train_module
        elif policy == "old":
            model = self.old
        elif policy == "ref":
            model = self.ref
        else:
            raise ValueError(f"policy must be 'default', 'old' or 'ref', got {policy!r}")
        return model(x.float(), t.to(x.device, torch.float32), labels.to(x.device)).float()

    def encode(self, prompts: list[int]) -> Cond:
        return (torch.as_tensor([int(p) for p in prompts], dtype=torch.long, device=self.device),)

    @torch.no_grad()
    def decode(self, x: Tensor) -> Tensor:
        from digits.model import to_images

        return to_images(x).cpu()

    def weights(self, which: str) -> dict[str, Tensor]:
        module = {"default": self.policy, "old": self.old}[which]
        return dict(module.named_parameters())

    def draw_prompts(self, rng: random.Random, n: int) -> list[int]:
        """``n`` labels: shuffled rounds of all ten digits (each digit once per 10 prompts)."""
        out: list[int] = []
        while len(out) < n:
            out += rng.sample(range(NUM_CLASSES), NUM_CLASSES)
        return out[:n]

    def reward_prompts(self, prompts: list[int]) -> Tensor:
        return torch.as_tensor([int(p) for p in prompts], dtype=torch.long)

    def eval_prompts(self) -> list[int]:
        return list(range(NUM_CLASSES))

    def eval_seed(self, seed: int) -> int:
        return EVAL_NOISE_SEED

    def eval_metrics(self, images: Tensor, prompts: list[int]) -> dict[str, float]:
        """The independent judge's accuracy on the evaluation samples (never a reward)."""
        from digits.judge import DigitsJudge

        return {"judge_accuracy": DigitsJudge().accuracy(images, np.asarray(prompts, dtype=np.int64))}

    def export(self, out_dir: Path, tensors: dict[str, dict[str, Tensor]]) -> None:
        """``digits_policy.safetensors`` (and ``_ema``): ``DigitsFlow().load_state_dict`` reads them."""
        from safetensors.torch import save_file

        names = {"default": "digits_policy.safetensors", "ema": "digits_policy_ema.safetensors"}
        for which, sd in tensors.items():
            save_file(sd, str(out_dir / names[which]))

    def write_samples(self, out_dir: Path, step: int, images: Tensor, prompts: list[int], per_prompt: int) -> None:
        """``samples/eval_samples_step_XXXXXX.npz`` and a PNG grid (a row per digit)."""
        from PIL import Image

        folder = out_dir / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        labels = np.repeat(np.asarray(prompts, dtype=np.int64), per_prompt)
        imgs = images.detach().float().cpu().numpy().astype(np.float32)
        np.savez(folder / f"eval_samples_step_{step:06d}.npz", images=imgs, labels=labels)
        cells = np.pad(imgs.reshape(len(prompts), per_prompt, 8, 8), ((0, 0), (0, 0), (1, 1), (1, 1)))  # 1 px gaps
        grid = cells.transpose(0, 2, 1, 3).reshape(len(prompts) * 10, -1)
        big = np.kron(grid, np.ones((4, 4), dtype=np.float32))  # 4x upscaled, ink dark on white
        Image.fromarray(((1.0 - big) * 255).round().astype(np.uint8)).save(folder / f"step_{step:06d}.png")
