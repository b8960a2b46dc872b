"""Exponential moving average of the balancing weights (a point of the simplex)."""

from __future__ import annotations

import torch

__all__ = ["WeightEMA"]


class WeightEMA:
    """``α_t = ρ·α_{t−1} + (1−ρ)·α*_t``; the first update takes ``α*`` as it is.

    A convex combination of two points of the simplex stays on the simplex. ``value`` is a
    float64 CPU tensor (K,) or None before the first commit. ``candidate`` previews the
    smoothed weights for a new solve without changing the state; ``commit`` advances it
    (the optimizer commits only when its step really happens).
    """

    def __init__(self, decay: float) -> None:
        self.decay = float(decay)
        self.value: torch.Tensor | None = None

    def candidate(self, raw: torch.Tensor) -> torch.Tensor:
        """Smoothed weights (K,) that committing ``raw`` (K,) would give."""
        if self.value is None or self.decay == 0.0:
            return raw.clone()
        return self.decay * self.value + (1.0 - self.decay) * raw

    def commit(self, raw: torch.Tensor) -> torch.Tensor:
        """Advance the average with ``raw`` (K,); returns the new value."""
        self.value = self.candidate(raw)
        return self.value

    def reset(self) -> None:
        self.value = None
