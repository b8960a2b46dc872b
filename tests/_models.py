"""Toy models and objectives shared by the property suite (small: a step takes milliseconds)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from marble_opt import WEIGHTINGS, Balancer, BalanceReport, MarbleOptimizer

#: Every Gram source, normalisation, refresh interval and non-finite policy the suite runs over.
SOURCES = ("exact", "exact-lean", "shared", "params")
NORMALIZATIONS = ("l2", "none", "loss", "loss+l2")
REFRESH = (1, 3)
POLICIES = ("skip", "raise", "exclude", "propagate")
NAMES = ("a", "b", "c")
#: Every weighting by name, and one TorchJD weighting object (built by ``weighting_arg``).
WEIGHTING_CASES = (*WEIGHTINGS, "torchjd-upgrad")
#: The weightings that promise ``⟨d, g_k⟩ ≥ 0`` for every k (MARBLE at ρ=0).
NON_CONFLICTING = ("marble", "mgda", "upgrad")
#: Every (Gram source, estimator) pair: "cross" needs parameter-space gradients.
SOURCE_ESTIMATORS = (*((s, "batch") for s in SOURCES), *((s, "cross") for s in SOURCES if s != "shared"))


class TrunkHeads(nn.Module):
    """``z = tanh(W x + b)`` shared by three linear heads; ``forward`` returns ``(z, heads)``."""

    def __init__(self, d_in: int = 4, width: int = 5) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(d_in, width), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(width, 1) for _ in NAMES)

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        z = self.trunk(x)
        return z, [head(z).squeeze(-1) for head in self.heads]


@dataclass
class Batch:
    x: Tensor
    t: Tensor


def batch(seed: int, n: int = 8) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(n, 4, generator=g), torch.randn(n, 3, generator=g))


def model(seed: int) -> TrunkHeads:
    torch.manual_seed(seed)
    return TrunkHeads()


def objectives(net: TrunkHeads, data: Batch, *, per_sample: bool = False) -> tuple[dict[str, Tensor], Tensor]:
    """Three positive losses on different scales (``normalize="loss"`` needs L > 0) and the
    shared features they are computed from; ``per_sample``: (B,) tensors (for the cross
    estimator), else their means."""
    z, (ya, yb, yc) = net(data.x)
    losses = {
        "a": 10.0 * (ya - data.t[:, 0]) ** 2 + 0.1,
        "b": (yb - data.t[:, 1]).abs() + 0.1,
        "c": 0.1 * (yc - data.t[:, 2] + ya) ** 2 + 0.1,
    }
    return (losses if per_sample else {n: v.mean() for n, v in losses.items()}), z


def weighting_arg(case: str) -> Any:
    """What ``MarbleOptimizer(weighting=...)`` gets for a case of ``WEIGHTING_CASES``: the name,
    or a fresh ``torchjd.aggregation.UPGradWeighting()`` for ``"torchjd-upgrad"``."""
    if case == "torchjd-upgrad":
        from torchjd.aggregation import UPGradWeighting

        return UPGradWeighting()
    return case


def gram_inputs(net: TrunkHeads, gram: str, z: Tensor) -> list[Tensor]:
    """What ``gram`` measures G on: every parameter, the features ``z`` or ``gram_params``."""
    if gram == "shared":
        return [z]
    if gram == "params":
        return list(net.trunk.parameters())
    return list(net.parameters())


def base_optimizer(net: nn.Module, base: str = "adamw") -> torch.optim.Optimizer:
    """The wrapped (or, with a ``Balancer``, the caller's own) optimizer: ``"adamw"``, ``"sgd"``,
    or ``"adamw-fused"``, ``"sgd-fused"`` (what ``skip_on_device`` needs)."""
    if base.startswith("sgd"):
        return torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, fused=base == "sgd-fused" or None)
    return torch.optim.AdamW(net.parameters(), lr=1e-2, fused=base == "adamw-fused" or None)


def balancing_options(
    net: TrunkHeads,
    gram: str,
    *,
    normalize: str = "l2",
    refresh_every: int = 1,
    nonfinite: str = "skip",
    ema_decay: float = 0.0,
    weighting: str = "marble",
    estimator: str = "batch",
) -> dict[str, Any]:
    """The keywords ``MarbleOptimizer`` and ``Balancer`` share. ``normalize`` and ``ema_decay``
    are MARBLE's options: used only with ``weighting="marble"``."""
    marble = {"normalize": normalize, "ema_decay": ema_decay} if weighting == "marble" else {}
    return {
        "weighting": weighting_arg(weighting),
        "gram": gram,
        "gram_params": list(net.trunk.parameters()) if gram == "params" else None,
        "gram_estimator": estimator,
        "refresh_every": refresh_every,
        "nonfinite": nonfinite,
        **marble,
    }


def optimizer(
    net: TrunkHeads, gram: str, *, base: str = "adamw", skip_on_device: bool = False, **options: Any
) -> MarbleOptimizer:
    """``MarbleOptimizer(base_optimizer(net, base), **balancing_options(net, gram, **options))``."""
    return MarbleOptimizer(
        base_optimizer(net, base), skip_on_device=skip_on_device, **balancing_options(net, gram, **options)
    )


def balancer(net: TrunkHeads, gram: str, **options: Any) -> Balancer:
    """``Balancer(net.parameters(), **balancing_options(net, gram, **options))``."""
    return Balancer(net.parameters(), **balancing_options(net, gram, **options))


#: The two ways to balance: ``MarbleOptimizer.backward`` or a ``Balancer`` loop (``balanced_backward``).
PATHS = ("optimizer", "balancer")


def balanced_backward(
    path: str, net: TrunkHeads, gram: str, losses: dict[str, Tensor], z: Tensor, *, base: str = "adamw", **options: Any
) -> BalanceReport:
    """One balanced backward of a fresh optimizer (``path="optimizer"``: ``opt.backward``; ``base``
    is its wrapped optimizer) or ``Balancer`` (``"balancer"``: ``w = bal.weights(...)``, then the
    backward of ``bal.weighted_loss(losses, w)``); returns the report. Either leaves the update
    in ``p.grad``."""
    if path == "optimizer":
        return optimizer(net, gram, base=base, **options).backward(losses, **shared_kw(gram, z))
    bal = balancer(net, gram, **options)
    w = bal.weights(losses, **shared_kw(gram, z))
    report = bal.report
    assert report is not None and w == report.loss_weights, f"weights() {w} != report.loss_weights"
    if not report.skipped:
        bal.weighted_loss(losses, w).backward()
    return report


def shared_kw(gram: str, z: Tensor) -> dict[str, Tensor]:
    return {"shared": z} if gram == "shared" else {}
