"""The min-norm point of the simplex for a Gram matrix (the MGDA quadratic program).

Solves ``α* = argmin_α ½ αᵀ G α  s.t.  α ≥ 0, Σ α = 1`` for a symmetric positive
semi-definite ``G`` (K×K). Every backend's answer goes through the same exact finish:
the support is read off the iterate, the equality-constrained KKT system is solved on it
in float64, and the KKT conditions are checked to 1e-10 (relative to trace(G)/K). A
backend whose answer fails the check falls back to DAQP, then to away-step Frank–Wolfe.

Near-degenerate supports (clusters of near-duplicate gradients, whose differences are at the
rounding level of G) are handled by a rank-revealing step: on the reduced Hessian of the
support, directions of rounding-level curvature are followed as straight lines to the
boundary of the simplex (they drop points) instead of being inverted.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.linalg.lapack import dgelss as _dgelss
from scipy.linalg.lapack import dgesv as _dgesv
from scipy.linalg.lapack import dpotrf as _dpotrf

__all__ = [
    "INDEFINITE_RTOL",
    "KKT_TOL",
    "MinNormSolver",
    "frank_wolfe_min_norm",
    "min_norm_weights",
    "validate_gram",
]

#: KKT tolerance in units of trace(G)/K: ``(Gα)_k ≥ αᵀGα − KKT_TOL`` for every k. It bounds
#: the objective gap ½αᵀGα − ½α*ᵀGα* by KKT_TOL·trace(G)/K.
KKT_TOL = 1e-10
#: Smallest eigenvalue accepted, in units of trace(G): ``λ_min ≥ −max(INDEFINITE_RTOL, √ε)·trace``
#: with ε the machine epsilon of the input's dtype (float64: 1e-6; float32: 3.5e-4; float16:
#: 3.1e-2). Between that and 0 (rounding of a PSD matrix) the negative eigenvalues are clipped.
INDEFINITE_RTOL = 1e-6
_SYMMETRY_RTOL = 1e-5
_EPS = float(np.finfo(np.float64).eps)
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
    """Return ``gram`` as a symmetric positive semi-definite float64 numpy array (K×K).

    Accepts a torch tensor or anything ``numpy.asarray`` takes. Raises ``ValueError`` for
    non-square, empty, non-finite, asymmetric (beyond float32 rounding) input, a negative
    diagonal, a tensor on the meta device (it has no values) and clearly indefinite input:
    smallest eigenvalue below ``−max(INDEFINITE_RTOL, √ε)·trace(G)``, ε the input dtype's
    machine epsilon. Smaller negative eigenvalues (a PSD matrix rounded, e.g. to float16) are
    clipped to 0: the nearest PSD matrix is returned. Entries up to float64's largest value
    are accepted (the trace may overflow; the solver rescales).
    """
    eps = _EPS
    if isinstance(gram, torch.Tensor):
        if gram.device.type == "meta":
            raise ValueError(
                f"gram is a tensor on the meta device (shape {tuple(gram.shape)}, dtype {gram.dtype}): it has no "
                "values to solve for; pass the Gram matrix computed on a real device"
            )
        if gram.dtype.is_floating_point:
            eps = float(torch.finfo(gram.dtype).eps)
        g = gram.detach().to("cpu", torch.float64).numpy()
    else:
        try:
            arr = np.asarray(gram)
            if arr.dtype.kind == "f":
                eps = float(np.finfo(arr.dtype).eps)
            g = np.asarray(arr, dtype=np.float64)
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
    diff = np.abs(0.5 * g - 0.5 * g.T)  # halves: no overflow for entries near float64's maximum
    asym = 2.0 * float(diff.max())
    if asym > _SYMMETRY_RTOL * scale:
        i, j = (int(x) for x in np.unravel_index(np.argmax(diff), g.shape))
        raise ValueError(
            f"gram is not symmetric: [{i}, {j}] = {g[i, j]} but [{j}, {i}] = {g[j, i]} "
            f"(max asymmetry {asym:.3g}, allowed {_SYMMETRY_RTOL:g} × max|G| = {_SYMMETRY_RTOL * scale:.3g})"
        )
    diag = np.diag(g)
    if (diag < -_SYMMETRY_RTOL * scale).any():
        k = int(np.argmin(diag))
        raise ValueError(f"gram has a negative diagonal entry [{k}, {k}] = {diag[k]}: not a Gram matrix")
    g = 0.5 * g + 0.5 * g.T
    return _clip_indefinite(g, scale, max(INDEFINITE_RTOL, float(np.sqrt(eps))))


def _clip_indefinite(g: np.ndarray, scale: float, rtol: float) -> np.ndarray:
    """``g`` if it is PSD up to rounding; its nearest PSD matrix if its smallest eigenvalue is
    above ``−rtol·trace``; else ``ValueError``. One Cholesky factorisation on the usual path."""
    k = g.shape[0]
    if k == 1 or scale == 0.0:
        return g
    gn = g / scale  # entries in [-1, 1]: no overflow below
    trace = float(np.trace(gn))
    shifted = gn + (1e-13 * max(trace, 1.0 / k)) * np.eye(k)
    if _dpotrf(shifted, lower=1, overwrite_a=1, clean=0)[1] == 0:
        return g
    lam, vec = np.linalg.eigh(gn)
    if lam[0] < -rtol * trace:
        raise ValueError(
            f"gram is not positive semi-definite: smallest eigenvalue {lam[0] * scale:.6g} against trace "
            f"{trace * scale:.6g} (allowed down to −{rtol:.3g}·trace, the rounding of the input's dtype); "
            "a Gram matrix G_kl = ⟨g_k, g_l⟩ has no negative eigenvalue"
        )
    psd = (vec * np.maximum(lam, 0.0)) @ vec.T * scale
    return 0.5 * psd + 0.5 * psd.T


def _to_simplex(alpha: np.ndarray) -> np.ndarray:
    a = np.maximum(alpha, 0.0)  # also maps NaN to 0
    s = float(a.sum())
    if not s > 0.0 or s == np.inf:
        return np.full(a.size, 1.0 / a.size)
    a /= s
    return a


def _affine_minimizer(g: np.ndarray, support: np.ndarray) -> tuple[np.ndarray, float, bool]:
    """Minimiser of ½βᵀGβ over the affine hull {β: Σβ = 1, β = 0 off ``support``}.

    Returns ``(β (K,), μ, ok)`` from the bordered KKT system ``G_S β + μ1 = 0, Σβ = 1``
    solved by LU, or by least squares where LU fails; ``ok`` is False where both fail (the
    caller then takes the rank-revealing step).
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
    ok = info == 0 and abs(float(sol[:n].sum()) - 1.0) <= 1e-9  # also catches NaN
    if not ok:
        # Least squares by SVD, with np.linalg.lstsq's default cutoff (eps · size), again
        # without its Python-side overhead: right where the support is exactly affinely
        # dependent (duplicated, opposite or zero gradients); its accuracy is checked.
        m = n + 1
        sol, info = _dgelss(kkt, rhs, cond=_EPS * m, lwork=5 * m + 64)[1::4]
        ok = info == 0 and abs(float(sol[:n].sum()) - 1.0) <= 1e-9
    if full:
        return sol[:n], float(sol[n]), ok
    beta = np.zeros(k)
    beta[idx] = sol[:n]
    return beta, float(sol[n]), ok


@functools.lru_cache(maxsize=256)
def _sum_zero_basis(n: int) -> np.ndarray:
    """Orthonormal basis (n, n−1) of {x: Σx = 0}: the last n−1 columns of the Householder
    reflection that maps e₁ to 1/√n (read-only)."""
    w = np.full(n, 1.0 / np.sqrt(n))
    w[0] -= 1.0
    w /= np.linalg.norm(w)
    z = (np.eye(n) - 2.0 * np.outer(w, w))[:, 1:].copy()
    z.setflags(write=False)
    return z


def _rank_revealing_step(
    g: np.ndarray, alpha: np.ndarray, support: np.ndarray, tol: float
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The affine step of Wolfe's method on a near-degenerate support: ``(β, None)`` or ``(None, ray)``.

    Works on the reduced Hessian ``H = ZᵀG_S Z`` (Z: orthonormal basis of {Σx = 0}) and the
    reduced gradient ``r = ZᵀG_S α_S``. Eigen-directions of H whose curvature is at the
    rounding level of G are not inverted (that would amplify the rounding to O(1) errors in β):
    if the gradient has a component along them, the step is the ray ``−Z P r`` (P the
    projector on them), along which the objective decreases linearly; else the Newton step
    on the other directions gives β, the affine minimiser up to those rounding-level terms.
    """
    k = g.shape[0]
    idx = np.flatnonzero(support)
    n = idx.size
    if n == 1:
        beta = np.zeros(k)
        beta[idx] = 1.0
        return beta, None
    gs = g.take(idx, 0).take(idx, 1)
    z = _sum_zero_basis(n)
    h = z.T @ gs @ z
    r = z.T @ (gs @ alpha[idx])
    lam, u = np.linalg.eigh(0.5 * (h + h.T))
    small = lam <= _curvature_floor(g, support)
    big = ~small
    beta = np.zeros(k)
    beta[idx] = alpha[idx] - z @ (u[:, big] @ ((u[:, big].T @ r) / lam[big]))
    if small.any():
        # The slope along the small directions, read at β: there the other directions'
        # gradient is cancelled, so the eigenvectors' rounding (≈ ε‖H‖/gap) does not leak
        # it into the small subspace. Along them G is flat, so the slope at α is the same.
        u_small = u[:, small]
        slope = u_small @ (u_small.T @ (z.T @ (gs @ beta[idx])))
        if float(np.linalg.norm(slope)) > max(1e-2 * tol, _rounding(g, support, beta)):
            ray = np.zeros(k)
            ray[idx] = -(z @ slope)
            return None, ray
    return beta, None


def _affine_step(
    g: np.ndarray, alpha: np.ndarray, support: np.ndarray, tol: float, short: float, exact: bool = False
) -> tuple[np.ndarray | None, np.ndarray | None, bool]:
    """``(β, None, slow)``: the support's affine minimiser; ``(None, ray, True)``: a descent
    direction of rounding-level curvature (see ``_rank_revealing_step``).

    The LU answer is kept when it is accurate (equal gradients on the support up to
    rounding; for a β > 0 that ends the minor cycle, the caller checks this on α = β) and, for
    a long step, when the curvature along it is above its rounding; else, or with ``exact``,
    the rank-revealing step (``slow``: an eigen-decomposition of the reduced Hessian).
    ``short``: steps with ``‖β − α‖₁² ≤ short`` are short enough for any rounding of the
    curvature (‖β − α‖₁ ≤ 2 when both are on the simplex).
    """
    if not exact:
        beta, mu, ok = _affine_minimizer(g, support)
        if ok:
            if short >= 4.0 and beta[support].min() > 0.0:
                return beta, None, False
            grad_s = (g @ beta)[support]
            spread = float(grad_s.max() - grad_s.min())
            if spread <= 1e-2 * tol or spread <= _rounding(g, support, beta):
                # The step to β lowers the objective if the curvature dᵀGd along it is
                # positive: certain where it exceeds its rounding, ε·n·(Σ|d_k|√G_kk)², and
                # immaterial where that rounding is below the tolerance (a short step).
                d = beta - alpha  # 0 off the support
                l1 = float(np.abs(d).sum())
                if l1 * l1 <= short:
                    return beta, None, False
                root = np.sqrt(np.maximum(np.diag(g)[support], 0.0))
                noise = 64.0 * int(support.sum()) * _EPS * float(np.abs(d[support]) @ root) ** 2
                if noise <= 1e-1 * tol:
                    return beta, None, False
                a = alpha[support]
                curvature = float(a @ (g[np.ix_(support, support)] @ a)) + mu  # G_S β = −μ1: dᵀGd = αᵀGα + μ
                if curvature > noise:
                    return beta, None, False
    return (*_rank_revealing_step(g, alpha, support, tol), True)


def _curvature_floor(g: np.ndarray, support: np.ndarray) -> float:
    """Curvature below which a direction within ``support`` is rounding noise of G: the
    rounding of the reduced Hessian grows with the support's size and largest entry."""
    return 64.0 * int(support.sum()) * _EPS * max(float(np.max(np.diag(g)[support])), 0.0)


def _rounding(g: np.ndarray, support: np.ndarray, beta: np.ndarray) -> float:
    """Rounding level of ``(Gβ)_k`` over the support, with a margin: by |G_kl| ≤ √(G_kk G_ll),
    ``ε·Σ_l |G_kl β_l| ≤ ε·√G_kk·Σ_l √G_ll |β_l|`` (scale-aware: tiny gradients, tiny rounding)."""
    root = np.sqrt(np.maximum(np.diag(g)[support], 0.0))
    return 64.0 * _EPS * float(root.max()) * float(root @ np.abs(beta[support]))


def _merge_near_duplicates(g: np.ndarray, alpha: np.ndarray, support: np.ndarray) -> np.ndarray:
    """Move the weight of every group of near-duplicate objectives in the support (pairs with
    ``‖g_i − g_j‖² = G_ii + G_jj − 2G_ij`` at the rounding level) to the member with the
    smallest ``(Gα)_i``. Along such a pair the objective is linear up to rounding, so this
    changes it by at most ½·floor (below the KKT tolerance) and typically lowers it; it turns
    a cluster of near-duplicates into one point at O(K²) cost, where the rank-revealing step
    would drop them one eigen-decomposition at a time."""
    alpha = alpha.copy()
    floor = _curvature_floor(g, support)
    diag = np.diag(g)
    grad = g @ alpha
    alive = support.copy()
    idx = np.flatnonzero(support)
    for p in idx[np.argsort(grad[idx])]:
        if not alive[p]:
            continue
        group = alive & (diag + diag[p] - 2.0 * g[p] <= floor)
        group[p] = False
        if group.any():
            alpha[p] += float(alpha[group].sum())
            alpha[group] = 0.0
            alive &= ~group
    return alpha


def _active_set(
    g: np.ndarray, alpha: np.ndarray, *, tol: float = KKT_TOL, max_iter: int = 0, max_slow: int | None = None
) -> np.ndarray | None:
    """Wolfe's min-norm-point method in Gram coordinates, started from a feasible ``alpha``.

    ``g``: scaled to trace(G)/K = 1 (``tol`` is in those units). Exact and finite: each major
    step adds the most violating objective to the support, each minor step moves to the
    support's affine minimiser (or along a ray of rounding-level curvature) until the
    boundary and drops an objective. Returns None if it does not reach the KKT tolerance
    (numerical trouble) or needs more than ``max_slow`` rank-revealing steps (a large,
    affinely dependent start: the caller restarts smaller).
    """
    k = g.shape[0]
    alpha = _to_simplex(alpha)
    support = alpha > 0.0
    merged = exact = False
    # ‖d‖₁² below this: the rounding of the curvature along d, ≈ K·ε·max G_kk·‖d‖₁² (with a
    # margin of 8; max G_kk ≤ trace = K), is below 0.1·tol.
    short = 0.1 * tol / (8.0 * k * k * _EPS)
    for _ in range(max_iter or 4 * k + 10):
        for _minor in range(k + 1):
            beta, ray, slow = _affine_step(g, alpha, support, tol, short, exact)
            if slow and max_slow is not None:
                max_slow -= 1
                if max_slow < 0:
                    return None
            if ray is not None and not merged:
                # A near-degenerate support: merge its near-duplicates once (cheap), then
                # resume from the smaller support.
                merged = True
                alpha = _merge_near_duplicates(g, alpha, support)
                support = alpha > 0.0
                continue
            if beta is not None:
                if beta[support].min() > 0.0:
                    alpha = beta
                    break
                neg = support & (beta <= 0.0)
                # A just-added index has α = 0; where β is 0 there too the step is blocked
                # (θ = 0) instead of 0/0 = NaN, which used to empty the support.
                denom = alpha[neg] - beta[neg]
                theta = float(np.min(np.where(denom > 0.0, alpha[neg] / np.where(denom > 0.0, denom, 1.0), 0.0)))
                alpha = alpha + theta * (beta - alpha)
            else:
                neg = support & (ray < 0.0)
                if not neg.any():  # Σ ray = 0: only a zero ray has no negative entry
                    return None
                theta = float(np.min(alpha[neg] / -ray[neg]))
                alpha = alpha + theta * ray
            support &= alpha > 1e-15
            if not support.any():  # numerical trouble (e.g. an indefinite, rounded G)
                return None
            alpha[~support] = 0.0
            alpha = _to_simplex(alpha)
        else:  # every minor step drops an objective: more than K of them is numerical trouble
            return None
        grad = g @ alpha
        value = float(alpha @ grad)
        if float(grad[support].max()) > value + tol:  # unequal on the support: an inaccurate LU answer
            if exact:
                return None
            exact = True  # solve this support again, rank-revealing
            continue
        exact = False
        j = int(np.argmin(grad))
        if grad[j] >= value - tol:
            return alpha
        if support[j]:
            return None
        support[j] = True
    return None


def _finish(g: np.ndarray, alpha: np.ndarray) -> np.ndarray | None:
    """Exact finish of an approximate solution: drop near-zero weights, then active set."""
    alpha = _to_simplex(alpha)
    alpha[alpha < 1e-7 * alpha.max()] = 0.0
    if int((alpha > 0.0).sum()) <= 8:
        return _active_set(g, alpha)
    # A large support that is affinely dependent (more objectives than the gradients' rank,
    # near-duplicates) would cost one eigen-decomposition per dropped objective: after a few,
    # restart Wolfe's method from the best vertex, whose supports grow affinely independent.
    finished = _active_set(g, alpha, max_slow=4)
    if finished is None:
        vertex = np.zeros(g.shape[0])
        vertex[int(np.argmin(np.diag(g)))] = 1.0
        finished = _active_set(g, vertex)
    return finished


def _closed_form_two(g: np.ndarray) -> np.ndarray:
    """K=2: α₁ = clip(⟨ĝ₂−ĝ₁, ĝ₂⟩ / ‖ĝ₁−ĝ₂‖², 0, 1)."""
    denom = g[0, 0] - 2.0 * g[0, 1] + g[1, 1]
    if denom <= 1e-300:
        # ‖g₁ − g₂‖² is 0 up to rounding (it may even round negative): the objective is
        # linear along the segment, so the end with the smaller ‖g_k‖² (either if equal).
        a1 = 1.0 if g[0, 0] < g[1, 1] else 0.0 if g[0, 0] > g[1, 1] else 0.5
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
    another backend name, ``"daqp-fallback"``, ``"frank-wolfe-fallback"``; and, should every
    exact finish fail, ``"frank-wolfe-inexact"`` together with a ``RuntimeWarning`` giving its
    KKT residual: a point outside the bound is never returned silently).
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
        scale = sum(np.diagonal(g).tolist()) / k  # Python floats: an overflow is inf, without a warning
        if not 1e-300 < scale < 1e300:  # the trace overflows (or underflows): rescale first
            big = float(np.abs(g).max())
            if big > 0.0:
                g = g / big
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
                grad = g @ alpha
                warnings.warn(
                    f"min-norm QP (K={k}): every exact finish failed; returning a Frank–Wolfe point whose KKT "
                    f"residual is {float(alpha @ grad - grad.min()):.3g}·trace(G)/K, above the documented "
                    f"{KKT_TOL:g} (status 'frank-wolfe-inexact')",
                    RuntimeWarning,
                    stacklevel=2,
                )
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


def min_norm_weights(gram: Any, *, solver: str = "osqp", warm_start: Any = None) -> np.ndarray:
    """Min-norm point of the simplex for a Gram matrix.

    Args:
        gram: K×K symmetric PSD matrix, ``G_kl = ⟨g_k, g_l⟩`` (torch tensor or array-like,
            any float dtype).
        solver: ``"osqp"`` (default), ``"frank-wolfe"``, or the name of any installed
            qpsolvers backend (``"daqp"``, ``"quadprog"``, ...). Each call builds its own
            solver, so the answer depends on ``gram`` and ``warm_start`` only, never on earlier
            calls (also where the minimiser is not unique); ``MinNormSolver`` keeps one
            workspace per K across solves instead (faster, for a loop of solves).
        warm_start: optional (K,) starting weights; if their support is already optimal
            the answer comes from one KKT solve.

    Returns:
        float64 numpy array (K,), ``>= 0``, summing to 1, with
        ``½αᵀGα − min ≤ 1e-10 · trace(G)/K``.

    Raises:
        ValueError: non-square, empty, non-finite, asymmetric or clearly indefinite ``gram``
            (see ``validate_gram``), a tensor on the meta device; unknown solver.

    Warns:
        RuntimeWarning: if every exact finish failed and a Frank–Wolfe point outside the
            bound is returned (not seen on any test problem).
    """
    g = validate_gram(gram)
    # A fresh solver per call: a cached OSQP workspace carries state from earlier solves (its
    # adapted ρ, its last iterate), and where the minimiser is not unique (rank-deficient G)
    # the answer would depend on what was solved before.
    return MinNormSolver(solver).solve(g, warm_start, validated=True)[0]
