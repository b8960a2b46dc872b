"""The min-norm point of the simplex for a Gram matrix (the MGDA quadratic program).

Solves ``α* = argmin_α ½ αᵀ G α  s.t.  α ≥ 0, Σ α = 1`` for a symmetric positive
semi-definite ``G`` (K×K). Every backend's answer goes through the same exact finish:
the support is read off the iterate, the equality-constrained KKT system is solved on it
in float64, and the KKT conditions are checked to 1e-10 (relative to trace(G)/K). A
backend whose answer fails the check falls back to DAQP, then to away-step Frank–Wolfe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.linalg.lapack import dgelss as _dgelss
from scipy.linalg.lapack import dgesv as _dgesv

__all__ = [
    "KKT_TOL",
    "MinNormSolver",
    "frank_wolfe_min_norm",
    "min_norm_weights",
    "validate_gram",
]

#: KKT tolerance in units of trace(G)/K: ``(Gα)_k ≥ αᵀGα − KKT_TOL`` for every k. It bounds
#: the objective gap ½αᵀGα − ½α*ᵀGα* by KKT_TOL·trace(G)/K.
KKT_TOL = 1e-10
_SYMMETRY_RTOL = 1e-5
_OSQP_SETTINGS = dict(
    verbose=False,
    eps_abs=1e-5,
    eps_rel=1e-5,
    polishing=True,
    max_iter=1000,
    warm_starting=True,
    check_termination=10,
)
# qpsolvers backends that need a strictly positive definite P.
_NEEDS_PD = frozenset({"quadprog", "cvxopt", "qpalm", "hpipm"})


def validate_gram(gram: Any) -> np.ndarray:
    """Return ``gram`` as a symmetric float64 numpy array (K×K) or raise ``ValueError``.

    Accepts a torch tensor or anything ``numpy.asarray`` takes. Rejects non-square,
    empty, non-finite, asymmetric (beyond float32 rounding) input and negative diagonals.
    """
    if isinstance(gram, torch.Tensor):
        g = gram.detach().to("cpu", torch.float64).numpy()
    else:
        try:
            g = np.asarray(gram, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise ValueError(f"gram must be a K×K real matrix, got {type(gram).__name__}: {err}") from None
    if g.ndim != 2 or g.shape[0] != g.shape[1]:
        raise ValueError(f"gram must be a square K×K matrix, got shape {tuple(g.shape)}")
    if g.shape[0] == 0:
        raise ValueError("gram is empty (K=0): there is no objective to weight")
    bad = ~np.isfinite(g)
    if bad.any():
        i, j = (int(x) for x in np.argwhere(bad)[0])
        raise ValueError(f"gram has non-finite entries, first at [{i}, {j}] = {g[i, j]}")
    scale = float(np.abs(g).max())
    asym = float(np.abs(g - g.T).max())
    if asym > _SYMMETRY_RTOL * scale:
        i, j = (int(x) for x in np.unravel_index(np.argmax(np.abs(g - g.T)), g.shape))
        raise ValueError(
            f"gram is not symmetric: [{i}, {j}] = {g[i, j]} but [{j}, {i}] = {g[j, i]} "
            f"(max asymmetry {asym:.3g}, allowed {_SYMMETRY_RTOL:g} × max|G| = {_SYMMETRY_RTOL * scale:.3g})"
        )
    diag = np.diag(g)
    if (diag < -_SYMMETRY_RTOL * scale).any():
        k = int(np.argmin(diag))
        raise ValueError(f"gram has a negative diagonal entry [{k}, {k}] = {diag[k]}: not a Gram matrix")
    return 0.5 * (g + g.T)


def _kkt_ok(g: np.ndarray, alpha: np.ndarray, tol: float = KKT_TOL) -> bool:
    """Whether ``alpha`` (on the simplex) satisfies the KKT conditions of the scaled QP."""
    grad = g @ alpha
    return bool(grad.min() >= float(alpha @ grad) - tol)


def _to_simplex(alpha: np.ndarray) -> np.ndarray:
    a = np.maximum(alpha, 0.0)  # also maps NaN to 0
    s = float(a.sum())
    if not s > 0.0 or s == np.inf:
        return np.full(a.size, 1.0 / a.size)
    a /= s
    return a


def _affine_minimizer(g: np.ndarray, support: np.ndarray) -> np.ndarray:
    """Minimiser of ½βᵀGβ over the affine hull {β: Σβ = 1, β = 0 off ``support``} (K,).

    Solves the bordered KKT system on the support; least squares where the support's
    points are affinely dependent (duplicated or coplanar gradients).
    """
    k = g.shape[0]
    full = bool(support.all())
    idx = None if full else np.flatnonzero(support)
    n = k if full else idx.size
    kkt = np.empty((n + 1, n + 1))
    kkt[:n, :n] = g if full else g.take(idx, 0).take(idx, 1)
    kkt[n, :] = 1.0
    kkt[:, n] = 1.0
    kkt[n, n] = 0.0
    rhs = np.zeros(n + 1)
    rhs[n] = 1.0
    # LAPACK's gesv directly: the same LU solve as np.linalg.solve without its ~5 µs of
    # Python-side checks (this solve is most of a warm-started call). info > 0: singular.
    sol, info = _dgesv(kkt, rhs)[2:]
    if info != 0 or not abs(float(sol[:n].sum()) - 1.0) <= 1e-9:  # also catches NaN
        # Least squares by SVD, with np.linalg.lstsq's default cutoff (eps · size), again
        # without its Python-side overhead; np.linalg.lstsq if LAPACK reports trouble.
        m = n + 1
        sol, info = _dgelss(kkt, rhs, cond=np.finfo(np.float64).eps * m, lwork=5 * m + 64)[1::4]
        if info != 0 or not np.isfinite(sol).all():
            sol = np.linalg.lstsq(kkt, rhs, rcond=None)[0]
    if full:
        return sol[:n]
    beta = np.zeros(k)
    beta[idx] = sol[:n]
    return beta


def _active_set(g: np.ndarray, alpha: np.ndarray, *, tol: float = KKT_TOL, max_iter: int = 0) -> np.ndarray | None:
    """Wolfe's min-norm-point method in Gram coordinates, started from a feasible ``alpha``.

    Exact and finite: each major step adds the most violating objective to the support,
    each minor step moves to the support's affine minimiser or to the boundary and drops
    an objective. Returns None if it does not reach the KKT tolerance (numerical trouble).
    """
    k = g.shape[0]
    alpha = _to_simplex(alpha)
    support = alpha > 0.0
    for _ in range(max_iter or 4 * k + 10):
        for _minor in range(k + 1):
            beta = _affine_minimizer(g, support)
            if beta[support].min() > 0.0:
                alpha = beta
                break
            neg = support & (beta <= 0.0)
            # A just-added index has α = 0; where β is 0 there too the step is blocked
            # (θ = 0) instead of 0/0 = NaN, which used to empty the support.
            denom = alpha[neg] - beta[neg]
            theta = float(np.min(np.where(denom > 0.0, alpha[neg] / np.where(denom > 0.0, denom, 1.0), 0.0)))
            alpha = alpha + theta * (beta - alpha)
            support &= alpha > 1e-15
            if not support.any():  # numerical trouble (e.g. an indefinite, rounded G)
                return None
            alpha[~support] = 0.0
            alpha = _to_simplex(alpha)
        grad = g @ alpha
        j = int(np.argmin(grad))
        if grad[j] >= float(alpha @ grad) - tol:
            return alpha
        if support[j]:
            return None
        support[j] = True
    return None


def _finish(g: np.ndarray, alpha: np.ndarray) -> np.ndarray | None:
    """Exact finish of an approximate solution: drop near-zero weights, then active set."""
    alpha = _to_simplex(alpha)
    alpha[alpha < 1e-7 * alpha.max()] = 0.0
    return _active_set(g, alpha)


def _closed_form_two(g: np.ndarray) -> np.ndarray:
    """K=2: α₁ = clip(⟨ĝ₂−ĝ₁, ĝ₂⟩ / ‖ĝ₁−ĝ₂‖², 0, 1)."""
    denom = g[0, 0] - 2.0 * g[0, 1] + g[1, 1]
    if denom <= 1e-300:
        a1 = 0.5
    else:
        a1 = min(max((g[1, 1] - g[0, 1]) / denom, 0.0), 1.0)
    return np.array([a1, 1.0 - a1])


def frank_wolfe_min_norm(g: np.ndarray, alpha0: np.ndarray | None = None, *, max_iter: int = 10_000) -> np.ndarray:
    """Away-step Frank–Wolfe with exact line search on ``½αᵀGα`` over the simplex.

    ``g``: symmetric PSD (K×K) float64. Linear convergence on this problem; used as the
    last-resort fallback and as a benchmark baseline.
    """
    k = g.shape[0]
    alpha = np.full(k, 1.0 / k) if alpha0 is None else _to_simplex(np.asarray(alpha0, dtype=np.float64))
    grad = g @ alpha
    for _ in range(max_iter):
        lam = float(alpha @ grad)
        s = int(np.argmin(grad))
        active = np.flatnonzero(alpha > 0)
        v = int(active[np.argmax(grad[active])])
        if lam - grad[s] <= KKT_TOL * 1e-2:
            break
        if lam - grad[s] >= grad[v] - lam:  # toward step: d = e_s − α
            d_grad = g[:, s] - grad
            gamma_max = 1.0
            direction = -alpha.copy()
            direction[s] += 1.0
        else:  # away step: d = α − e_v
            d_grad = grad - g[:, v]
            gamma_max = alpha[v] / (1.0 - alpha[v]) if alpha[v] < 1.0 else 1e30
            direction = alpha.copy()
            direction[v] -= 1.0
        curvature = float(direction @ d_grad)
        slope = float(direction @ grad)
        if slope >= 0:
            break
        gamma = gamma_max if curvature <= 0 else min(-slope / curvature, gamma_max)
        alpha = alpha + gamma * direction
        alpha[alpha < 0] = 0.0
        grad = grad + gamma * d_grad
    return _to_simplex(alpha)


def _upper_triangle_pattern(k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """CSC pattern of a dense upper triangle: (indptr, row indices, rows, cols) for Px."""
    cols = np.concatenate([np.full(j + 1, j) for j in range(k)])
    rows = np.concatenate([np.arange(j + 1) for j in range(k)])
    indptr = np.concatenate([[0], np.cumsum(np.arange(1, k + 1))])
    return indptr, rows, rows, cols


@dataclass
class _OsqpWorkspace:
    """One OSQP problem of size K, reused across solves through ``update(Px=...)``."""

    k: int
    solver: Any = field(init=False)
    rows: np.ndarray = field(init=False)
    cols: np.ndarray = field(init=False)
    _zero_y: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        import osqp
        import scipy.sparse as sp

        k = self.k
        indptr, indices, self.rows, self.cols = _upper_triangle_pattern(k)
        p = sp.csc_matrix((np.eye(k)[self.rows, self.cols], indices, indptr), shape=(k, k))
        a = sp.csc_matrix(np.vstack([np.ones((1, k)), np.eye(k)]))
        lower = np.concatenate([[1.0], np.zeros(k)])
        upper = np.concatenate([[1.0], np.full(k, np.inf)])
        self._zero_y = np.zeros(k + 1)
        self.solver = osqp.OSQP(algebra="builtin")
        self.solver.setup(P=p, q=np.zeros(k), A=a, l=lower, u=upper, **_OSQP_SETTINGS)

    def solve(self, g: np.ndarray, warm: np.ndarray) -> tuple[np.ndarray, str]:
        """Approximate solution (K,) and OSQP's status string for scaled ``g``."""
        px = g[self.rows, self.cols]
        ext = getattr(self.solver, "_solver", None)
        if ext is None or not hasattr(ext, "update_data_mat"):  # pragma: no cover - other osqp
            self.solver.update(Px=px)
            self.solver.warm_start(x=warm, y=self._zero_y)
            res = self.solver.solve(raise_error=False)
            return np.array(res.x, dtype=np.float64), str(res.info.status)
        # osqp 1.x's Python wrapper spends ~20 µs per solve packing a results namespace;
        # its extension object does the same work without it.
        ext.update_data_mat(P_x=px, P_i=None, A_x=None, A_i=None)
        ext.warm_start(warm, self._zero_y)
        ext.solve()
        return np.array(ext.solution.x, dtype=np.float64), str(ext.info.status)


class MinNormSolver:
    """Stateful min-norm solver: keeps one OSQP workspace per K and the last solution.

    ``solve(gram, warm_start)`` returns ``(alpha, status)``: float64 weights (K,) on the
    simplex and a short status naming the path that produced them (``"closed-form"``,
    ``"active-set"`` when the warm start's support was already optimal, ``"osqp"`` or
    another backend name, ``"daqp-fallback"``, ``"frank-wolfe-fallback"``).
    """

    def __init__(self, solver: str = "osqp") -> None:
        if not isinstance(solver, str):
            raise TypeError(f"solver must be a string naming a backend, got {solver!r}")
        if solver not in ("osqp", "frank-wolfe"):
            import qpsolvers

            if solver not in qpsolvers.available_solvers:
                raise ValueError(
                    f"solver={solver!r} is not available; choose 'osqp', 'frank-wolfe' or one of "
                    f"qpsolvers' installed backends {sorted(qpsolvers.available_solvers)}"
                )
        self.solver = solver
        self._workspaces: dict[int, _OsqpWorkspace] = {}

    def solve(self, gram: Any, warm_start: Any = None, *, validated: bool = False) -> tuple[np.ndarray, str]:
        g = gram if validated else validate_gram(gram)
        k = g.shape[0]
        if k == 1:
            return np.ones(1), "closed-form"
        scale = float(np.trace(g)) / k
        if scale <= 0.0:  # all gradients zero: every point of the simplex is optimal
            return np.full(k, 1.0 / k), "closed-form"
        g = g / scale
        if k == 2:
            return _closed_form_two(g), "closed-form"
        warm = self._warm(warm_start, k)
        if warm is not None:
            exact = _active_set(g, warm)
            if exact is not None:
                return exact, "active-set"
        alpha, status = self._backend(g, warm)
        finished = None if alpha is None else _finish(g, alpha)
        if finished is None and self.solver != "daqp":
            alpha, status = self._qpsolvers(g, "daqp"), "daqp-fallback"
            finished = None if alpha is None else _finish(g, alpha)
        if finished is None:
            alpha = frank_wolfe_min_norm(g, alpha if alpha is not None else warm)
            status = "frank-wolfe-fallback"
            finished = _finish(g, alpha)
            if finished is None:
                finished, status = alpha, "frank-wolfe-inexact"
        return finished, status

    def _warm(self, warm_start: Any, k: int) -> np.ndarray | None:
        if warm_start is None:
            return None
        warm = np.asarray(
            warm_start.detach().cpu().numpy() if isinstance(warm_start, torch.Tensor) else warm_start,
            dtype=np.float64,
        )
        if warm.shape != (k,) or not np.isfinite(warm).all():
            raise ValueError(f"warm_start must be a finite vector of shape ({k},), got {warm!r}")
        return _to_simplex(warm)

    def _backend(self, g: np.ndarray, warm: np.ndarray | None) -> tuple[np.ndarray | None, str]:
        k = g.shape[0]
        start = warm if warm is not None else np.full(k, 1.0 / k)
        if self.solver == "osqp":
            ws = self._workspaces.get(k)
            if ws is None:
                ws = self._workspaces[k] = _OsqpWorkspace(k)
            # OSQP only has to find the support: any finite iterate (even at the iteration
            # limit) is handed to the exact active-set finish.
            alpha, _ = ws.solve(g, start)
            return (alpha if np.isfinite(alpha).all() else None), "osqp"
        if self.solver == "frank-wolfe":
            return frank_wolfe_min_norm(g, start), "frank-wolfe"
        return self._qpsolvers(g, self.solver), self.solver

    @staticmethod
    def _qpsolvers(g: np.ndarray, name: str) -> np.ndarray | None:
        import qpsolvers

        k = g.shape[0]
        p = g + 1e-12 * np.eye(k) if name in _NEEDS_PD else g
        try:
            x = qpsolvers.solve_qp(p, np.zeros(k), A=np.ones((1, k)), b=np.ones(1), lb=np.zeros(k), solver=name)
        except Exception:  # a backend failure is handled by the fallback chain
            return None
        return None if x is None or not np.isfinite(x).all() else np.asarray(x, dtype=np.float64)


_DEFAULT_SOLVERS: dict[str, MinNormSolver] = {}


def min_norm_weights(gram: Any, *, solver: str = "osqp", warm_start: Any = None) -> np.ndarray:
    """Min-norm point of the simplex for a Gram matrix.

    Args:
        gram: K×K symmetric PSD matrix, ``G_kl = ⟨g_k, g_l⟩`` (torch tensor or array-like,
            any float dtype).
        solver: ``"osqp"`` (default, one cached workspace per K), ``"frank-wolfe"``, or the
            name of any installed qpsolvers backend (``"daqp"``, ``"quadprog"``, ...).
        warm_start: optional (K,) starting weights; if their support is already optimal
            the answer comes from one KKT solve.

    Returns:
        float64 numpy array (K,), ``>= 0``, summing to 1, with
        ``½αᵀGα − min ≤ 1e-10 · trace(G)/K``.

    Raises:
        ValueError: non-square, empty, non-finite or asymmetric ``gram``; unknown solver.
    """
    g = validate_gram(gram)
    inst = _DEFAULT_SOLVERS.get(solver)
    if inst is None:
        inst = _DEFAULT_SOLVERS[solver] = MinNormSolver(solver)
    return inst.solve(g, warm_start, validated=True)[0]
