"""Reference solutions, hard Gram matrices and flat gradients, for tests and benchmarks.

``reference_min_norm_weights`` solves the min-norm QP exactly by enumerating supports
(K ≤ 10): independent of every solver in the package, it is the yardstick for them.
``jacobian_rows`` and ``flat_grad`` build the per-objective gradients and ``p.grad`` as plain
matrices, so a step can be recomputed by hand.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "GRAM_KINDS",
    "flat_grad",
    "hard_gram",
    "jacobian_rows",
    "min_norm_objective",
    "reference_min_norm_weights",
]


def flat_grad(params: Sequence[Tensor]) -> Tensor:
    """``p.grad`` of every parameter, flattened and concatenated (zeros where ``None``):
    shape (N,), N = Σ numel, float64 on the parameters' device."""
    return torch.cat(
        [(torch.zeros_like(p) if p.grad is None else p.grad).detach().reshape(-1).double() for p in params]
    )


def jacobian_rows(losses: Mapping[str, Tensor] | Sequence[Tensor], inputs: Sequence[Tensor]) -> Tensor:
    """The K×N matrix whose row k is ``∇_inputs L_k`` flattened (zeros where a loss does not
    reach an input), float64; ``inputs`` are parameters or any tensors on the graph (e.g. a
    trunk's features). Graphs are kept, ``p.grad`` is not touched."""
    values = list(losses.values()) if isinstance(losses, Mapping) else list(losses)
    rows = []
    for loss in values:
        grads = torch.autograd.grad(loss, list(inputs), retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat([(torch.zeros_like(x) if g is None else g).reshape(-1).double() for g, x in zip(grads, inputs)])
        )
    return torch.stack(rows)


def min_norm_objective(gram: np.ndarray, alpha: np.ndarray) -> float:
    """``½ αᵀ G α``."""
    return 0.5 * float(alpha @ gram @ alpha)


def reference_min_norm_weights(gram: np.ndarray) -> np.ndarray:
    """Exact min-norm weights by support enumeration: every non-empty subset S, the
    minimiser over S's affine hull (least squares on the bordered KKT system), kept when
    it is non-negative; the best of those. O(2^K): K ≤ 10."""
    g = np.asarray(gram, dtype=np.float64)
    k = g.shape[0]
    scale = float(np.trace(g)) / k
    if scale > 0:  # the minimiser is invariant to scaling G; keep the systems well scaled
        g = g / scale
    if k > 10:
        raise ValueError(f"support enumeration is for K <= 10, got K={k}")
    best, best_val = None, np.inf
    for size in range(1, k + 1):
        for support in itertools.combinations(range(k), size):
            idx = list(support)
            n = len(idx)
            kkt = np.zeros((n + 1, n + 1))
            kkt[:n, :n] = g[np.ix_(idx, idx)]
            kkt[n, :n] = kkt[:n, n] = 1.0
            rhs = np.zeros(n + 1)
            rhs[n] = 1.0
            try:
                sol = np.linalg.solve(kkt, rhs)[:n]
            except np.linalg.LinAlgError:
                sol = np.linalg.lstsq(kkt, rhs, rcond=None)[0][:n]
            if sol.min() < -1e-12 or abs(sol.sum() - 1.0) > 1e-9:
                continue
            alpha = np.zeros(k)
            alpha[idx] = np.maximum(sol, 0.0)
            alpha /= alpha.sum()
            val = min_norm_objective(g, alpha)
            if val < best_val:
                best, best_val = alpha, val
    assert best is not None  # singletons are always feasible
    return best


#: Kinds of hard Gram matrices ``hard_gram`` builds.
GRAM_KINDS = ("well-conditioned", "rank-deficient", "duplicates", "opposite", "zero-rows", "wide-scales")


def hard_gram(kind: str, k: int, rng: np.random.Generator, *, dim: int = 32) -> np.ndarray:
    """A K×K Gram matrix of gradients of ``kind`` (see ``GRAM_KINDS``), float64."""
    if kind == "well-conditioned":
        j = rng.normal(size=(k, max(dim, 2 * k)))
    elif kind == "rank-deficient":
        j = rng.normal(size=(k, max(1, k // 3))) @ rng.normal(size=(max(1, k // 3), dim))
    elif kind == "duplicates":
        base = rng.normal(size=(max(1, k // 2), dim))
        j = base[rng.integers(0, base.shape[0], size=k)]
    elif kind == "opposite":
        j = rng.normal(size=(k, dim))
        j[1::2] = -j[0::2][: j[1::2].shape[0]]
    elif kind == "zero-rows":
        j = rng.normal(size=(k, dim))
        j[rng.random(k) < 0.3] = 0.0
        if not j.any():
            j[0] = rng.normal(size=dim)
    elif kind == "wide-scales":
        j = rng.normal(size=(k, dim)) * 10.0 ** rng.uniform(-6, 6, size=(k, 1))
    else:
        raise ValueError(f"kind must be one of {GRAM_KINDS}, got {kind!r}")
    g = j @ j.T
    return 0.5 * (g + g.T)
