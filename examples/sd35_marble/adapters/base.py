"""The model seam: what the RL loop in ``train.py`` needs from a model.

The loop (old-policy rollouts, rewards, per-reward group advantages, DiffusionNFT losses,
balancing, old-policy and EMA updates, metrics, checkpoints, resume) is written once against
``ModelAdapter``. Adding a model (Flux, a video model) means one file with a subclass:

- ``build_rewards(cfg)`` (a classmethod, called after the ``Accelerator`` exists, before the
  model loads): the K reward callables ``reward(images, prompts) -> (B,) float32`` (NaN where
  a reward does not apply), each with a ``.name``;
- ``draw_prompts(rng, n)``: the prompts of one step (any objects the adapter understands:
  text, class labels, ...), the same on every process;
- ``encode(prompts) -> Cond``: a tuple of batch-first tensors, one row per prompt;
- ``velocity(x, t, cond, policy)``: the flow-matching velocity ``v = ε − x0`` at times
  ``t`` (B,) for ``policy`` ``"default"`` (trained, with grad), ``"old"`` (the sampling
  policy) or ``"ref"`` (the frozen reference of the KL);
- ``sigmas``: the sampling schedule (n+1,) from 1 to 0; ``latent_shape``: one sample's shape;
- ``decode(x) -> images`` for the rewards (CPU tensors);
- ``weights(which)``: ``{key: tensor}`` of the ``"default"`` (trainable parameters) or
  ``"old"`` policy, updated in place by the loop; ``module``: the ``nn.Module`` holding the
  trainable parameters (what ``accelerator.prepare`` wraps; the loop stores the wrapper in
  ``train_module``, which ``velocity(..., "default")`` must call so that DDP averages the
  gradients);
- ``export(out_dir, tensors)``: write the trained weights in the model's own format;
- ``eval_prompts()``, ``write_samples(...)``: the fixed evaluation batch and how to save it.

``Cond`` rows are per prompt: ``take(cond, index)`` picks the rows of a batch of samples, so
one embedding per prompt is held, not one per image.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

#: A condition: a tuple of batch-first tensors (text embeddings, pooled embeddings, labels, ...).
Cond = tuple[Tensor, ...]

POLICIES = ("default", "old", "ref")


class ConfigError(ValueError):
    """Bad input found before training: reported as ``error: ...`` with exit status 2."""


def take(cond: Cond, index: Tensor) -> Cond:
    """The rows ``index`` (B,) of every tensor of ``cond`` (on each tensor's device)."""
    return tuple(c[index.to(c.device)] for c in cond)


class ModelAdapter(ABC):
    """A flow-matching model as the RL loop sees it (see the module docstring)."""

    #: Which presets use this adapter (documentation only).
    presets: ClassVar[tuple[str, ...]] = ()
    #: Write evaluation samples before the first step (the pretrained model's).
    sample_at_start: ClassVar[bool] = False

    latent_shape: tuple[int, ...]
    sigmas: Tensor
    #: the module holding the trainable parameters
    module: torch.nn.Module
    #: what ``velocity(..., "default")`` calls: ``module`` or the loop's ``accelerator.prepare(module)``
    train_module: torch.nn.Module

    @classmethod
    @abstractmethod
    def build_rewards(cls, cfg: Any, device: torch.device) -> list[Any]:
        """The reward callables of the run (checked here: fail before the model loads)."""

    @abstractmethod
    def draw_prompts(self, rng: random.Random, n: int) -> list[Any]:
        """``n`` prompts for one step; the same on every process (``rng`` is shared)."""

    @abstractmethod
    def encode(self, prompts: list[Any]) -> Cond:
        """Condition tensors, one row per prompt."""

    @abstractmethod
    def velocity(self, x: Tensor, t: Tensor, cond: Cond, policy: str = "default") -> Tensor:
        """Velocity (B, *latent_shape) float32 at times ``t`` (B,) in [0, 1]."""

    @abstractmethod
    def decode(self, x: Tensor) -> Tensor:
        """Samples → images for the rewards, float32 on the CPU."""

    @abstractmethod
    def weights(self, which: str) -> dict[str, Tensor]:
        """``{key: tensor}`` of the ``"default"`` (trainable) or ``"old"`` policy."""

    @abstractmethod
    def export(self, out_dir: Path, tensors: dict[str, dict[str, Tensor]]) -> None:
        """Write ``{"default": ..., "ema": ...}`` weights (CPU tensors) in the model's format."""

    @abstractmethod
    def eval_prompts(self) -> list[Any]:
        """The prompts of the fixed evaluation batch."""

    @abstractmethod
    def write_samples(self, out_dir: Path, step: int, images: Tensor, prompts: list[Any], per_prompt: int) -> None:
        """Save the evaluation images (``per_prompt`` consecutive images per prompt)."""

    # ---- optional hooks -------------------------------------------------------------------------
    def reward_prompts(self, prompts: list[Any]) -> Any:
        """What the rewards get as their second argument for these per-sample prompts."""
        return prompts

    def eval_seed(self, seed: int) -> int:
        """Seed of the evaluation noise (held fixed across steps)."""
        return seed + 12345

    def eval_metrics(self, images: Tensor, prompts: list[Any]) -> dict[str, float]:
        """Extra numbers logged with each evaluation besides the rewards (e.g. a judge's accuracy)."""
        del images, prompts
        return {}

    def extra_state(self) -> dict[str, Any]:
        """Adapter state a checkpoint keeps besides the weights (e.g. a prompt sampler's)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore ``extra_state()`` (the default keeps none)."""
        del state
