"""marble_opt: multi-objective training in PyTorch by min-norm gradient balancing (MARBLE).

Swap ``torch.optim.AdamW(...)`` for ``MarbleOptimizer(torch.optim.AdamW(...))`` and call
``opt.step({"task_a": loss_a, "task_b": loss_b})``: the update is the min-norm point of the
convex hull of the normalised per-objective gradients, so it moves against none of them.
"""

from ._src.optimizer import MarbleOptimizer
from ._src.qp import MinNormSolver, min_norm_weights
from ._src.report import BalanceReport
from ._src.sources import GRAM_SOURCES, GramSource

__all__ = [
    "GRAM_SOURCES",
    "BalanceReport",
    "GramSource",
    "MarbleOptimizer",
    "MinNormSolver",
    "min_norm_weights",
]
__version__ = "0.1.0"
