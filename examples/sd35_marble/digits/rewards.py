"""Reward suites for the digits model.

A digits reward is a callable ``reward(images, labels) -> Tensor`` with

- ``images``: float (B, 8, 8) in [0, 1] (0 = background, 1 = full ink, like ``load_digits().images / 16``);
- ``labels``: long (B,), the prompted digits;
- the result: float32 (B,) on the CPU, higher is better, **NaN where the reward does not apply**
  (a reward informative for digits 0–3 only is NaN for prompts 4–9);

and the attributes ``name``, ``description`` and ``digits`` (the prompts it applies to).

Two suites (:data:`REWARD_SUITES`, :func:`build_digits_rewards`):

``mismatch`` — the MARBLE paper's setting (https://arxiv.org/abs/2605.06507): jointly improvable
rewards, each informative for a subset of prompts, with different natural scales and variances, and a
prompt-fidelity reward that is not at its ceiling.

``conflict`` — rewards that trade off in expectation (bold, full strokes for the class against thin,
crisp, smooth strokes), so no method can improve them all.

Every reward is checked against trivial images (:func:`trivial_image_check`): a blank image, a uniform
grey, uniform noise and a training image of another class must each score no higher on average than
the pretrained model's samples. The pixel rewards of SPEC's prototype (contrast, centring, thinness,
crispness, smoothness) were prompt-agnostic, so a *real* training image of another class — sharper than
the model's samples — beat the model on them, and a uniform grey maximised smoothness and centring.
The versions here measure the same properties against the prompted digit's statistics (its mean image,
its stroke region, its usual support, its mean ink centroid), which keeps their character and makes
ignoring the prompt cost reward.

The class-probability rewards use a small torch MLP (64 → 32 → 10, tanh) trained deterministically
on all of ``load_digits`` at first use (< 2 s); it is a different model from the judge (an SVC,
:mod:`digits.judge`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .model import digits_data

__all__ = [
    "DIGIT_REWARDS",
    "REWARD_SUITES",
    "TRIVIAL_KINDS",
    "DigitReward",
    "build_digits_rewards",
    "reward_classifier",
    "trivial_image_check",
    "trivial_image_table",
    "trivial_images",
]

ALL_DIGITS = tuple(range(10))
_PIX_Y, _PIX_X = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")


# --------------------------------------------------------------------------------------------------
# Statistics of the training set and the reward classifier (built once, deterministic).


@dataclass(frozen=True)
class _ClassStats:
    mean: Tensor  # (10, 64) mean training image per class
    order: Tensor  # (10, 64) pixel indices sorted by the class mean, ascending
    support: Tensor  # (10, 64) 1 where the class mean is >= 0.05 (where the digit ever puts ink)
    stroke: Tensor  # (10, 64) 1 where the class mean is >= 0.3 (the digit's usual strokes)
    centroid: Tensor  # (10, 2) mean (row, col) ink centroid of the class's training images


@functools.lru_cache(maxsize=1)
def _stats() -> _ClassStats:
    images, labels = digits_data()
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    mean = torch.stack([x[y == c].mean(0) for c in range(10)]).reshape(10, 64)
    mass = x.sum((1, 2))
    cy, cx = (x * _PIX_Y).sum((1, 2)) / mass, (x * _PIX_X).sum((1, 2)) / mass
    centroid = torch.stack([torch.stack([cy[y == c].mean(), cx[y == c].mean()]) for c in range(10)])
    return _ClassStats(
        mean=mean,
        order=mean.argsort(dim=1),
        support=(mean >= 0.05).float(),
        stroke=(mean >= 0.3).float(),
        centroid=centroid,
    )


@functools.lru_cache(maxsize=1)
def reward_classifier() -> nn.Module:
    """The rewards' digit classifier: MLP 64 → 32 → 10 (tanh) on pixels in [0, 1], logits out.

    Trained at first use on all 1,797 digits: 300 full-batch Adam steps (lr 1e-2, weight decay 1e-3)
    from ``torch.manual_seed(0)`` on one thread, so it is the same model on every run. Frozen, eval mode.
    """
    images, labels = digits_data()
    x, y = torch.from_numpy(images).reshape(-1, 64), torch.from_numpy(labels)
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            clf = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
        opt = torch.optim.Adam(clf.parameters(), lr=1e-2, weight_decay=1e-3)
        with torch.enable_grad():
            for _ in range(300):
                loss = nn.functional.cross_entropy(clf(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    finally:
        torch.set_num_threads(prev)
    return clf.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------------
# The reward type.


@dataclass(frozen=True)
class DigitReward:
    """A named digits reward: ``fn(images (B, 8, 8), labels (B,)) -> (B,)`` applied to ``digits`` only."""

    name: str
    description: str
    fn: Callable[[Tensor, Tensor], Tensor]
    digits: tuple[int, ...] = ALL_DIGITS

    def __call__(self, images: Tensor, labels: Tensor) -> Tensor:
        if not isinstance(images, Tensor) or images.ndim != 3 or tuple(images.shape[1:]) != (8, 8):
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"reward {self.name!r}: images must be a tensor (B, 8, 8), got {shape}")
        if not isinstance(labels, Tensor) or labels.shape != (images.shape[0],):
            shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
            raise ValueError(f"reward {self.name!r}: labels must be a tensor ({images.shape[0]},), got {shape}")
        labels = labels.detach().cpu().long()
        if labels.numel() and (labels.min() < 0 or labels.max() > 9):
            raise ValueError(f"reward {self.name!r}: labels must be digits 0-9, got {labels.unique().tolist()}")
        with torch.no_grad():
            value = self.fn(images.detach().float().cpu(), labels).float()
        applies = torch.isin(labels, torch.tensor(self.digits))
        return torch.where(applies, value, torch.full_like(value, float("nan")))


def _pearson(a: Tensor, b: Tensor, eps: float = 1e-6) -> Tensor:
    """Row-wise Pearson correlation of (B, D) tensors; 0 for a constant row."""
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / ((a.pow(2).sum(1) * b.pow(2).sum(1)).sqrt() + eps)


def _class_prob(temperature: float) -> Callable[[Tensor, Tensor], Tensor]:
    def fn(images: Tensor, labels: Tensor) -> Tensor:
        logits = reward_classifier()(images.reshape(-1, 64))
        return (logits / temperature).softmax(dim=1).gather(1, labels[:, None])[:, 0]

    return fn


def _template_corr(images: Tensor, labels: Tensor) -> Tensor:
    return _pearson(images.reshape(-1, 64), _stats().mean[labels])


def _mirror(images: Tensor, labels: Tensor) -> Tensor:
    return _pearson(images.reshape(-1, 64), images.flip(2).reshape(-1, 64))


def _stroke_contrast(images: Tensor, labels: Tensor) -> Tensor:
    """Mean of the 12 pixels brightest in the class's mean image minus the mean of its 32 darkest."""
    flat, order = images.reshape(-1, 64), _stats().order[labels]
    return flat.gather(1, order[:, -12:]).mean(1) - flat.gather(1, order[:, :32]).mean(1)


def _centring(images: Tensor, labels: Tensor) -> Tensor:
    """Minus the distance (pixels) of the ink centroid from the class's mean centroid.

    Ink = pixels above the image's own mean (so a uniform image has none); a prior mass of 0.05 at the
    corner (0, 0) stands in for a missing centroid (blank or uniform images land about 4.9 px away).
    """
    ink = (images - images.mean((1, 2), keepdim=True)).clamp(min=0.0)
    mass = ink.sum((1, 2)) + 0.05
    cy, cx = (ink * _PIX_Y).sum((1, 2)) / mass, (ink * _PIX_X).sum((1, 2)) / mass
    target = _stats().centroid[labels]
    return -((cy - target[:, 0]).pow(2) + (cx - target[:, 1]).pow(2)).sqrt()


def _thinness(images: Tensor, labels: Tensor) -> Tensor:
    """``−|mean ink − 0.2| − 2·stray``; stray = mean ink outside the class's support (class mean < 0.05)."""
    flat = images.reshape(-1, 64)
    stray = (flat * (1.0 - _stats().support[labels])).mean(1)
    return -(flat.mean(1) - 0.2).abs() - 2.0 * stray


def _crispness(images: Tensor, labels: Tensor) -> Tensor:
    """``Σ_{stroke} p² / Σ p``: full-ink pixels on the class's usual strokes, per unit of all ink."""
    flat = images.reshape(-1, 64)
    return (flat.pow(2) * _stats().stroke[labels]).sum(1) / (flat.sum(1) + 1e-6)


def _total_variation(images: Tensor) -> Tensor:
    """Mean absolute difference over the 112 horizontally or vertically adjacent pixel pairs."""
    dy = (images[:, 1:] - images[:, :-1]).abs().sum((1, 2))
    dx = (images[:, :, 1:] - images[:, :, :-1]).abs().sum((1, 2))
    return (dx + dy) / 112.0


def _smoothness(images: Tensor, labels: Tensor) -> Tensor:
    """``−(TV + 0.05) / (stroke contrast₊ + 0.01)``: edges per unit of contrast on the class's strokes."""
    contrast = _stroke_contrast(images, labels).clamp(min=0.0)
    return -(_total_variation(images) + 0.05) / (contrast + 0.01)


DIGIT_REWARDS: dict[str, DigitReward] = {
    r.name: r
    for r in (
        DigitReward(
            "class_prob_t4",
            "probability of the prompted digit at temperature 4 (reward classifier); off its ceiling",
            _class_prob(4.0),
        ),
        DigitReward(
            "template_corr",
            "Pearson correlation with the class's mean training image (digits 0-3)",
            _template_corr,
            (0, 1, 2, 3),
        ),
        DigitReward(
            "mirror_symmetry",
            "Pearson correlation with the left-right mirror image (digits 0, 1, 8)",
            _mirror,
            (0, 1, 8),
        ),
        DigitReward(
            "stroke_contrast",
            "mean of the class's 12 brightest mean-image pixels minus its 32 darkest (digits 4-7)",
            _stroke_contrast,
            (4, 5, 6, 7),
        ),
        DigitReward(
            "centring",
            "minus the distance (px) of the ink centroid from the class's mean centroid (digits 5-9)",
            _centring,
            (5, 6, 7, 8, 9),
        ),
        DigitReward(
            "class_prob",
            "probability of the prompted digit (reward classifier, temperature 1); near its ceiling",
            _class_prob(1.0),
        ),
        DigitReward("thinness", "-|mean ink - 0.2| - 2 * ink outside the class's support", _thinness),
        DigitReward("crispness", "sum of p^2 on the class's strokes / sum of p (full, on-stroke ink)", _crispness),
        DigitReward(
            "smoothness", "-(total variation + 0.05) / (stroke contrast + 0.01) (few edges per contrast)", _smoothness
        ),
    )
}

REWARD_SUITES: dict[str, list[str]] = {
    "mismatch": ["class_prob_t4", "template_corr", "mirror_symmetry", "stroke_contrast", "centring"],
    "conflict": ["class_prob", "thinness", "crispness", "smoothness", "mirror_symmetry"],
}


def build_digits_rewards(suite: str) -> list[DigitReward]:
    """The rewards of ``suite`` (``"mismatch"`` or ``"conflict"``), in a fixed order."""
    if suite not in REWARD_SUITES:
        raise ValueError(f"unknown digits reward suite {suite!r}; known: {sorted(REWARD_SUITES)}")
    return [DIGIT_REWARDS[name] for name in REWARD_SUITES[suite]]


# --------------------------------------------------------------------------------------------------
# Trivial-image check.

TRIVIAL_KINDS = ("blank", "grey", "noise", "other_class")


def trivial_images(labels: Tensor, seed: int = 0, grey: float = 0.5) -> dict[str, Tensor]:
    """Trivial images (B, 8, 8) for the prompts ``labels`` (B,): blank (0), uniform ``grey``, uniform
    noise in [0, 1], and for each prompt a training image of another class (drawn with ``seed``)."""
    labels = labels.detach().cpu().long()
    gen = torch.Generator().manual_seed(seed)
    images, targets = (torch.from_numpy(a) for a in digits_data())
    b = labels.shape[0]
    others = []
    for c in labels.tolist():
        pool = torch.nonzero(targets != c).squeeze(1)
        others.append(images[pool[torch.randint(len(pool), (1,), generator=gen)]][0])
    return {
        "blank": torch.zeros(b, 8, 8),
        "grey": torch.full((b, 8, 8), float(grey)),
        "noise": torch.rand(b, 8, 8, generator=gen),
        "other_class": torch.stack(others) if others else torch.zeros(0, 8, 8),
    }


def trivial_image_check(
    suite: str, model_images: Tensor, labels: Tensor, seed: int = 0, grey: float = 0.5
) -> dict[str, dict[str, float]]:
    """Mean reward of the model's samples and of each trivial image kind, per reward of ``suite``.

    Returns ``{reward name: {"model": m, "blank": ..., "grey": ..., "noise": ..., "other_class": ...,
    "passed": 1.0 or 0.0}}``, each a NaN-aware mean over the prompts the reward applies to;
    ``passed`` is 1.0 when no trivial kind scores higher than the model.
    """
    kinds = {"model": model_images.detach().float().cpu(), **trivial_images(labels, seed=seed, grey=grey)}
    table: dict[str, dict[str, float]] = {}
    for reward in build_digits_rewards(suite):
        row = {kind: float(reward(images, labels).nanmean()) for kind, images in kinds.items()}
        row["passed"] = float(all(row[k] <= row["model"] for k in TRIVIAL_KINDS))
        table[reward.name] = row
    return table


def trivial_image_table(tables: dict[str, dict[str, dict[str, float]]], kinds: Sequence[str] = TRIVIAL_KINDS) -> str:
    """Markdown table of :func:`trivial_image_check` results, ``{suite: table}``."""
    lines = ["| suite | reward | model | " + " | ".join(kinds) + " |", "|" + " --- |" * (3 + len(kinds))]
    for suite, table in tables.items():
        for name, row in table.items():
            cells = " | ".join(f"{row[k]:.3f}" for k in ("model", *kinds))
            lines.append(f"| {suite} | {name} | {cells} |")
    return "\n".join(lines)
