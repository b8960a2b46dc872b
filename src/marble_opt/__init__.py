"""marble_opt: multi-objective training in PyTorch by min-norm gradient balancing (MARBLE).

Swap ``torch.optim.AdamW(...)`` for ``MarbleOptimizer(torch.optim.AdamW(...))`` and call
``opt.step({"task_a": loss_a, "task_b": loss_b})``: the update combines the per-objective
gradients with MARBLE's min-norm weights (or another weighting: ``weighting="upgrad"``, ...).
"""

from ._src.balancer import Balancer
from ._src.estimators import GRAM_ESTIMATORS
from ._src.fsdp import detach_shared
from ._src.optimizer import MarbleOptimizer
from ._src.qp import MinNormSolver, min_norm_weights
from ._src.report import BalanceReport
from ._src.sources import GRAM_SOURCES, GramSource
from ._src.weightings import (
    WEIGHTINGS,
    AlignedMTLWeighting,
    CAGradWeighting,
    CallableWeighting,
    IMTLGWeighting,
    MarbleWeighting,
    MeanWeighting,
    MGDAWeighting,
    UPGradWeighting,
    Weighting,
    WeightingResult,
    WeightingState,
    loss_weights,
)

__all__ = [
    "GRAM_ESTIMATORS",
    "GRAM_SOURCES",
    "WEIGHTINGS",
    "AlignedMTLWeighting",
    "BalanceReport",
    "Balancer",
    "CAGradWeighting",
    "CallableWeighting",
    "GramSource",
    "IMTLGWeighting",
    "MGDAWeighting",
    "MarbleOptimizer",
    "MarbleWeighting",
    "MeanWeighting",
    "MinNormSolver",
    "UPGradWeighting",
    "Weighting",
    "WeightingResult",
    "WeightingState",
    "detach_shared",
    "loss_weights",
    "min_norm_weights",
]
__version__ = "0.1.0"
