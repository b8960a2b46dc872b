"""Measure the shipped digits models: judge accuracy, reward statistics, the trivial-image check.

Run from ``examples/sd35_marble``::

    python -m digits.report --per-class 100

Prints markdown tables: per seed the judge's accuracy; per reward the mean and the within-prompt sd
(the sd over samples of one prompt, averaged over the prompts it applies to) of the model's samples;
the trivial-image check of both suites.
"""

from __future__ import annotations

import argparse

import torch

from .judge import DigitsJudge
from .model import load_pretrained, sample, to_images
from .rewards import DIGIT_REWARDS, REWARD_SUITES, trivial_image_check, trivial_image_table


def model_samples(
    seed: int, per_class: int, noise_seed: int = 1234, steps: int = 10
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (10·per_class, 8, 8) from the shipped model ``seed`` on fixed noise, and their labels."""
    labels = torch.arange(10).repeat(per_class)
    noise = torch.randn(len(labels), 64, generator=torch.Generator().manual_seed(noise_seed))
    return to_images(sample(load_pretrained(seed), noise, labels, steps=steps)), labels


def reward_stats(images: torch.Tensor, labels: torch.Tensor) -> dict[str, tuple[float, float]]:
    """``{reward: (mean, within-prompt sd)}`` over the prompts each reward applies to."""
    out = {}
    for name, reward in DIGIT_REWARDS.items():
        values = reward(images, labels)
        sds = [float(values[labels == d].std()) for d in reward.digits]
        out[name] = (float(values.nanmean()), sum(sds) / len(sds))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=100, help="samples per digit and seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    judge = DigitsJudge()
    print(f"judge held-out accuracy on load_digits: {judge.test_accuracy:.4f}\n")
    stats, tables = {}, {}
    for seed in args.seeds:
        images, labels = model_samples(seed, args.per_class)
        print(f"seed {seed}: judge accuracy {judge.accuracy(images, labels):.4f} on {len(labels)} samples")
        stats[seed] = reward_stats(images, labels)
        tables[seed] = {suite: trivial_image_check(suite, images, labels) for suite in REWARD_SUITES}
    print("\n| reward | digits | " + " | ".join(f"seed {s} mean | seed {s} sd" for s in args.seeds) + " |")
    print("|" + " --- |" * (2 + 2 * len(args.seeds)))
    for name, reward in DIGIT_REWARDS.items():
        cells = " | ".join(f"{stats[s][name][0]:.3f} | {stats[s][name][1]:.3f}" for s in args.seeds)
        digits = "all" if len(reward.digits) == 10 else ",".join(map(str, reward.digits))
        print(f"| {name} | {digits} | {cells} |")
    for seed in args.seeds:
        print(f"\ntrivial-image check, model seed {seed} (grey = 0.5):\n")
        print(trivial_image_table(tables[seed]))


if __name__ == "__main__":
    main()
