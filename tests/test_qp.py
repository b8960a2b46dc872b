"""Property tests of the min-norm QP: ``min_norm_weights`` and ``MinNormSolver``.

Gram matrices come from generated Jacobians (rows = per-objective gradients) with the
structures that break QP solvers: low rank, duplicated rows, exactly opposite rows, zero
rows, row scales spanning 1e-4..1e2 (Gram entries 1e-8..1e4), K from 1 to 64; plus
``marble_opt.testing.hard_gram``. Every tolerance is relative to trace(G)/K, the scale the
solver works at.

Set ``MARBLE_QP_STATS=<path>`` to get the number of examples run and the worst objective
gap against the support-enumeration reference written there as JSON (also printed; use
``-s`` to see it).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from marble_opt import MinNormSolver, min_norm_weights
from marble_opt.testing import GRAM_KINDS, hard_gram, min_norm_objective, reference_min_norm_weights

#: Objective gap / KKT residual allowed, in units of trace(G)/K (the issue asks for 1e-9).
TOL = 1e-9
BACKENDS = ("osqp", "daqp", "quadprog", "frank-wolfe")
#: The headline properties run more examples than the profile's default (scaled with it).
_MORE = settings(max_examples=5 * settings.default.max_examples)
_SOME_MORE = settings(max_examples=2 * settings.default.max_examples)

# ---- statistics for the closing note --------------------------------------------------
_STATS: dict = {"examples": Counter(), "worst_gap": {}, "worst_kkt": {}, "status": Counter()}


def _count(test: str) -> None:
    _STATS["examples"][test] += 1


def _record(table: str, key: str, value: float) -> None:
    _STATS[table][key] = max(_STATS[table].get(key, -np.inf), float(value))


@pytest.fixture(scope="module", autouse=True)
def _report_stats():
    yield
    summary = {
        "examples_total": sum(_STATS["examples"].values()),
        "examples": dict(_STATS["examples"]),
        "worst_gap_vs_reference": _STATS["worst_gap"],
        "worst_kkt_residual": _STATS["worst_kkt"],
        "solver_status": dict(_STATS["status"]),
        "units": "relative to trace(G)/K",
    }
    print("\n[test_qp stats] " + json.dumps(summary, sort_keys=True))
    path = os.environ.get("MARBLE_QP_STATS")
    if path:
        with open(path, "w") as fh:
            json.dump(summary, fh, indent=2, sort_keys=True)


# ---- generated problems -----------------------------------------------------------------
@dataclass
class Problem:
    """A Gram matrix and, where it was built from one, its Jacobian (K×dim)."""

    gram: np.ndarray
    jac: np.ndarray | None
    label: str

    @property
    def k(self) -> int:
        return self.gram.shape[0]

    @property
    def unit(self) -> float:
        """trace(G)/K: the scale tolerances are relative to."""
        return float(np.trace(self.gram)) / self.k


def _gram_of(jac: np.ndarray) -> np.ndarray:
    g = jac @ jac.T
    return 0.5 * (g + g.T)


@st.composite
def jacobians(draw, min_k: int = 1, max_k: int = 64) -> np.ndarray:
    """K×dim Jacobians combining low rank, duplicates, opposites, zero rows, wide scales."""
    k = draw(st.one_of(st.integers(min_k, max(min_k, min(max_k, 8))), st.integers(min_k, max_k)))
    dim = draw(st.integers(1, 48))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    rank = draw(st.one_of(st.none(), st.integers(1, max(1, min(k, dim)))))
    if rank is None:
        jac = rng.normal(size=(k, dim))
    else:
        jac = rng.normal(size=(k, rank)) @ rng.normal(size=(rank, dim))
    if draw(st.booleans()):  # row scales 1e-4..1e2: Gram entries 1e-8..1e4
        jac *= 10.0 ** rng.uniform(-4.0, 2.0, size=(k, 1))
    if k > 1:
        n_copies = draw(st.integers(0, k - 1))
        for _ in range(n_copies):
            src, dst = rng.choice(k, size=2, replace=False)
            sign = -1.0 if draw(st.booleans()) else 1.0  # exactly opposite or duplicated
            jac[dst] = sign * jac[src]
    zero = draw(st.lists(st.integers(0, k - 1), max_size=k, unique=True))
    jac[zero] = 0.0
    return jac


@st.composite
def problems(draw, min_k: int = 1, max_k: int = 64) -> Problem:
    """Either a generated Jacobian's Gram or one of ``hard_gram``'s kinds."""
    if draw(st.integers(0, 3)) == 0:
        kind = draw(st.sampled_from(GRAM_KINDS))
        k = draw(st.integers(min_k, max_k))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        return Problem(hard_gram(kind, k, rng, dim=draw(st.integers(1, 40))), None, kind)
    jac = draw(jacobians(min_k, max_k))
    return Problem(_gram_of(jac), jac, "jacobian")


# ---- the checks every solution must pass -------------------------------------------------
def assert_on_simplex(alpha: np.ndarray, k: int) -> None:
    assert isinstance(alpha, np.ndarray)
    assert alpha.dtype == np.float64
    assert alpha.shape == (k,)
    assert np.isfinite(alpha).all()
    assert (alpha >= 0.0).all(), alpha
    assert abs(float(alpha.sum()) - 1.0) <= 1e-12, float(alpha.sum())


def kkt_residuals(gram: np.ndarray, alpha: np.ndarray) -> tuple[float, float]:
    """(worst violation of (Gα)_k ≥ αᵀGα, worst |(Gα)_k − αᵀGα| over α_k > 0), raw units."""
    grad = gram @ alpha
    value = float(alpha @ grad)
    violation = max(0.0, value - float(grad.min()))
    support = alpha > 0
    equality = float(np.abs(grad[support] - value).max()) if support.any() else 0.0
    return violation, equality


def assert_optimal(p: Problem, alpha: np.ndarray, who: str) -> None:
    """Simplex, KKT conditions, and ⟨d, ĝ_k⟩ ≥ ‖d‖² (= where α_k > 0) for d = Σ α_k ĝ_k."""
    assert_on_simplex(alpha, p.k)
    violation, equality = kkt_residuals(p.gram, alpha)
    _record("worst_kkt", who, max(violation, equality) / p.unit if p.unit > 0 else 0.0)
    tol = TOL * p.unit
    assert violation <= tol, f"KKT: min_k (Gα)_k is {violation / p.unit:.3g}·trace/K below αᵀGα"
    assert equality <= tol, f"KKT: (Gα)_k differs from αᵀGα by {equality / p.unit:.3g}·trace/K on the support"
    if p.jac is not None:  # the same facts measured in gradient space
        d = alpha @ p.jac
        inner = p.jac @ d
        sq = float(d @ d)
        assert (inner >= sq - tol).all(), f"⟨d, g_k⟩ - ‖d‖² = {(inner - sq).min():.3g} < -{tol:.3g}"
        assert (np.abs(inner[alpha > 0] - sq) <= tol).all()


def objective_gap(p: Problem, alpha: np.ndarray, best: np.ndarray) -> float:
    """(½αᵀGα − ½βᵀGβ) / (trace/K); 0 for the all-zero matrix."""
    if p.unit == 0.0:
        return 0.0
    return (min_norm_objective(p.gram, alpha) - min_norm_objective(p.gram, best)) / p.unit


# ---- min_norm_weights -------------------------------------------------------------------
@_MORE
@given(problems())
@example(Problem(np.zeros((3, 3)), np.zeros((3, 4)), "all-zero"))
@example(Problem(np.ones((64, 64)), np.ones((64, 1)), "rank-one K=64"))
def test_min_norm_weights_is_optimal(p: Problem) -> None:
    _count("test_min_norm_weights_is_optimal")
    alpha = min_norm_weights(p.gram)
    assert_optimal(p, alpha, "min_norm_weights")


@_MORE
@given(problems(max_k=8))
@example(Problem(_gram_of(np.array([[1.0, 0.0], [-1.0, 0.0]])), np.array([[1.0, 0.0], [-1.0, 0.0]]), "opposite"))
@example(Problem(_gram_of(np.array([[1e-4, 0.0], [0.0, 1e2], [1e-4, 1e-4]])), None, "wide"))
def test_min_norm_weights_matches_reference(p: Problem) -> None:
    _count("test_min_norm_weights_matches_reference")
    alpha = min_norm_weights(p.gram)
    ref = reference_min_norm_weights(p.gram)
    gap = objective_gap(p, alpha, ref)
    _record("worst_gap", "min_norm_weights", gap)
    assert gap <= TOL, f"objective {gap:.3g}·trace/K above the support-enumeration optimum"


@given(problems(), st.data())
def test_permutation_equivariance(p: Problem, data) -> None:
    _count("test_permutation_equivariance")
    perm = np.array(data.draw(st.permutations(range(p.k))))
    alpha = min_norm_weights(p.gram)
    alpha_perm = min_norm_weights(p.gram[np.ix_(perm, perm)])
    # Back in the original order the permuted problem's answer is optimal for G as well
    # (α itself is not unique when K exceeds the rank, so compare objective values).
    back = np.empty_like(alpha_perm)
    back[perm] = alpha_perm
    assert_optimal(p, back, "permuted")
    assert abs(objective_gap(p, back, alpha)) <= TOL


@given(problems(), st.floats(min_value=1e-6, max_value=1e6))
def test_scaling_invariance(p: Problem, c: float) -> None:
    _count("test_scaling_invariance")
    alpha = min_norm_weights(p.gram)
    alpha_c = min_norm_weights(c * p.gram)
    assert_optimal(p, alpha_c, "scaled")
    assert abs(objective_gap(p, alpha_c, alpha)) <= TOL


@given(jacobians(min_k=2, max_k=2))
@example(np.array([[1.0, 0.0], [0.0, 1.0]]))
@example(np.array([[1.0, 2.0], [1.0, 2.0]]))
@example(np.array([[1.0, 2.0], [-1.0, -2.0]]))
@example(np.array([[3.0, 0.0], [1.0, 0.0]]))
@example(np.array([[0.0, 0.0], [1.0, 1.0]]))
def test_two_objectives_closed_form(jac: np.ndarray) -> None:
    _count("test_two_objectives_closed_form")
    g1, g2 = jac
    p = Problem(_gram_of(jac), jac, "K=2")
    alpha = min_norm_weights(p.gram)
    assert_optimal(p, alpha, "closed-form")
    denom = float((g1 - g2) @ (g1 - g2))
    if denom > 1e-6 * p.unit:  # the formula is defined and well conditioned
        expected = min(max(float((g2 - g1) @ g2) / denom, 0.0), 1.0)
        assert alpha[0] == pytest.approx(expected, abs=1e-12 * p.unit / denom + 1e-12)
    else:  # g1 == g2 (up to rounding): every point of the segment is optimal
        assert objective_gap(p, alpha, np.array([0.5, 0.5])) <= TOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
@given(jac=jacobians(max_k=8))
def test_torch_input_of_any_float_dtype(dtype: torch.dtype, jac: np.ndarray) -> None:
    """A torch tensor of any float dtype is accepted; the answer is optimal up to that
    dtype's rounding of G (rounding can make a rank-deficient G slightly indefinite)."""
    _count(f"test_torch_input_of_any_float_dtype[{dtype}]")
    exact = _gram_of(jac / max(float(np.abs(jac).max()), 1e-30))
    alpha = min_norm_weights(torch.from_numpy(exact).to(dtype))
    p = Problem(exact, None, str(dtype))
    assert_on_simplex(alpha, p.k)
    rounding = 2 * p.k * torch.finfo(dtype).eps * float(np.abs(exact).max())
    gap = objective_gap(p, alpha, reference_min_norm_weights(exact)) * p.unit if p.unit > 0 else 0.0
    assert gap <= TOL * p.unit + rounding


def test_requires_grad_tensor_is_accepted() -> None:
    jac = torch.randn(4, 6, requires_grad=True)
    gram = jac @ jac.T  # float32: symmetric only up to rounding
    alpha = min_norm_weights(gram)
    stored = gram.detach().double().numpy()
    assert_optimal(Problem(0.5 * (stored + stored.T), None, "torch"), alpha, "torch")


# ---- every backend, and MinNormSolver with warm starts --------------------------------------
@pytest.mark.parametrize("solver", BACKENDS)
@_SOME_MORE
@given(p=problems())
def test_backend_is_optimal(solver: str, p: Problem) -> None:
    _count(f"test_backend_is_optimal[{solver}]")
    alpha, status = MinNormSolver(solver).solve(p.gram)
    _STATS["status"][f"{solver}:{status}"] += 1
    assert status != "frank-wolfe-inexact"
    assert_optimal(p, alpha, solver)
    # min_norm_weights builds a fresh solver per call: the same α as a fresh MinNormSolver,
    # whatever was solved before (on a rank-deficient G too, where α is not unique).
    fresh = min_norm_weights(p.gram, solver=solver)
    np.testing.assert_array_equal(fresh, alpha)


@pytest.mark.parametrize("solver", BACKENDS)
@_SOME_MORE
@given(p=problems(max_k=8))
def test_backend_matches_reference(solver: str, p: Problem) -> None:
    _count(f"test_backend_matches_reference[{solver}]")
    alpha = min_norm_weights(p.gram, solver=solver)
    gap = objective_gap(p, alpha, reference_min_norm_weights(p.gram))
    _record("worst_gap", solver, gap)
    assert gap <= TOL, f"{solver}: objective {gap:.3g}·trace/K above the optimum"


@pytest.mark.parametrize("solver", BACKENDS)
@given(
    jac=jacobians(min_k=3),
    steps=st.lists(st.floats(min_value=0.0, max_value=0.3), min_size=1, max_size=5),
    seed=st.integers(0, 2**32 - 1),
)
def test_solver_warm_started_along_a_trajectory(solver: str, jac: np.ndarray, steps: list[float], seed: int) -> None:
    """Gradients drift step to step; each solve starts from the last answer (as the optimizer does)."""
    _count(f"test_solver_warm_started_along_a_trajectory[{solver}]")
    rng = np.random.default_rng(seed)
    solver_obj = MinNormSolver(solver)
    warm = None
    for noise in steps:
        jac = jac + noise * rng.normal(size=jac.shape) * np.abs(jac).max(axis=1, keepdims=True)
        p = Problem(_gram_of(jac), jac, "trajectory")
        alpha, status = solver_obj.solve(p.gram, warm)
        _STATS["status"][f"warm-{solver}:{status}"] += 1
        assert_optimal(p, alpha, f"warm-{solver}")
        assert abs(objective_gap(p, alpha, min_norm_weights(p.gram, solver="daqp"))) <= TOL
        warm = alpha


@given(p=problems(min_k=3), warm=st.lists(st.floats(min_value=0.0, max_value=10.0), min_size=64, max_size=64))
def test_arbitrary_warm_start(p: Problem, warm: list[float]) -> None:
    """Any finite warm start, on the simplex or not, with zeros or all zero, gives the optimum."""
    _count("test_arbitrary_warm_start")
    start = np.array(warm[: p.k])
    alpha = min_norm_weights(p.gram, warm_start=start)
    assert_optimal(p, alpha, "arbitrary-warm")
    alpha_t, _ = MinNormSolver().solve(torch.from_numpy(p.gram), torch.from_numpy(start))
    assert_optimal(p, alpha_t, "arbitrary-warm")


# ---- bad input ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("gram", "match"),
    [
        (np.ones((2, 3)), r"square.*\(2, 3\)"),
        (np.ones(3), r"square.*\(3,\)"),
        (np.ones((2, 2, 2)), r"square.*\(2, 2, 2\)"),
        (np.float64(1.0), r"square.*\(\)"),
        (np.zeros((0, 0)), "empty"),
        (np.array([[1.0, np.nan], [np.nan, 1.0]]), r"non-finite.*\[0, 1\].*nan"),
        (np.array([[1.0, 0.0], [0.0, np.inf]]), r"non-finite.*\[1, 1\].*inf"),
        (np.array([[1.0, 0.5], [-0.5, 1.0]]), r"not symmetric.*\[0, 1\] = 0.5.*\[1, 0\] = -0.5"),
        (np.array([[-1.0, 0.0], [0.0, 1.0]]), r"negative diagonal.*\[0, 0\] = -1"),
        ([["a", "b"], ["c", "d"]], "real matrix"),
        (torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]), "non-finite"),
        (torch.ones(2, 3), "square"),
    ],
    ids=[
        "non-square",
        "vector",
        "3d",
        "scalar",
        "empty",
        "nan",
        "inf",
        "asymmetric",
        "negative-diagonal",
        "strings",
        "torch-nan",
        "torch-non-square",
    ],
)
@pytest.mark.parametrize("entry", ["function", "solver"])
def test_bad_gram_raises_value_error(gram, match: str, entry: str) -> None:
    with pytest.raises(ValueError, match=match):
        if entry == "function":
            min_norm_weights(gram)
        else:
            MinNormSolver().solve(gram)


def test_float32_rounding_asymmetry_is_tolerated() -> None:
    """A Gram formed in float32 by a non-symmetric kernel is symmetric only to rounding."""
    g = np.array([[1.0, 0.3], [0.3 * (1 + 1e-7), 2.0]])
    alpha = min_norm_weights(g)
    assert_on_simplex(alpha, 2)


def test_rounded_indefinite_gram_does_not_break_the_active_set() -> None:
    """A rank-deficient G rounded to float16 is slightly indefinite; the exact finish used to
    divide 0 by 0 there, empty its support and crash. Now: a point of the simplex that is
    optimal up to the rounding, for every backend and warm start."""
    jac = np.array([[-6.27e-4, 1.82e-3], [0.0, 0.0], [8.44e-6, -8.54e-5], [-1.924, 6.141], [-1.563, 0.249]])
    jac /= np.abs(jac).max()
    exact = _gram_of(jac)
    rounded = torch.from_numpy(exact).half()
    best = min_norm_objective(exact, reference_min_norm_weights(exact))
    for solver in BACKENDS:
        for warm in (None, np.array([0.0, 0.194, 0.945, 0.0, 0.0]), np.array([0.82, 0.58, 0.48, 0.0, 0.07])):
            alpha, _ = MinNormSolver(solver).solve(rounded, warm)
            assert_on_simplex(alpha, 5)
            assert min_norm_objective(exact, alpha) - best <= 1e-3 * float(np.abs(exact).max())


def test_unknown_solver_is_named() -> None:
    with pytest.raises(ValueError, match=r"solver='nope' is not available"):
        min_norm_weights(np.eye(3), solver="nope")
    with pytest.raises(TypeError, match="solver must be a string"):
        MinNormSolver(3)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "warm",
    [np.ones(2), np.ones(4), np.array([1.0, np.nan, 0.0]), np.array([np.inf, 0.0, 0.0])],
    ids=["short", "long", "nan", "inf"],
)
def test_bad_warm_start(warm: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"warm_start must be a finite vector of shape \(3,\)"):
        min_norm_weights(np.eye(3), warm_start=warm)


# ---- issue 11, item 9: near-degenerate supports ---------------------------------------------
def _near_duplicate_clusters(k: int, seed: int, spread: float, n_clusters: int = 2, dim: int = 32) -> np.ndarray:
    """The issue's case: ``n_clusters`` base gradients, each objective one of them plus noise of size ``spread``."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n_clusters, dim))
    return _gram_of(base[rng.integers(0, n_clusters, size=k)] + spread * rng.normal(size=(k, dim)))


@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("spread", [1e-9, 3e-8, 1e-6, 1e-4])
@pytest.mark.parametrize("k", [16, 128])
def test_near_duplicate_clusters_meet_the_documented_bound(k: int, spread: float) -> None:
    """Two clusters of near-duplicate gradients: the exact finish used to fail on every path
    and return a Frank–Wolfe point 1e-8·trace/K off (K=16), silently. Now the KKT conditions
    hold to 1e-9·trace/K on every seed, through the exact path (no fallback, no warning)."""
    seeds = range(12) if k == 16 else range(3)
    for seed in seeds:
        g = _near_duplicate_clusters(k, seed, spread)
        p = Problem(g, None, f"clusters K={k}")
        alpha, status = MinNormSolver().solve(g)
        _STATS["status"][f"clusters:{status}"] += 1
        assert status == "osqp", (seed, status)
        assert_optimal(p, alpha, f"clusters K={k}")
        assert_optimal(p, min_norm_weights(g), f"clusters K={k}")


@pytest.mark.filterwarnings("error::RuntimeWarning")
@_MORE
@given(kind=st.sampled_from(GRAM_KINDS), k=st.integers(1, 10), seed=st.integers(0, 2**32 - 1), dim=st.integers(1, 40))
@example(kind="near-duplicates", k=10, seed=2, dim=32)
def test_hard_kinds_match_the_reference(kind: str, k: int, seed: int, dim: int) -> None:
    """Every kind of ``hard_gram`` (near-duplicates included), K ≤ 10: objective within
    1e-9·trace/K of the support-enumeration optimum, cold and warm-started."""
    _count("test_hard_kinds_match_the_reference")
    g = hard_gram(kind, k, np.random.default_rng(seed), dim=dim)
    p = Problem(g, None, kind)
    ref = reference_min_norm_weights(g)
    for alpha in (min_norm_weights(g), MinNormSolver().solve(g, np.full(k, 1.0 / k))[0]):
        assert_on_simplex(alpha, k)
        gap = objective_gap(p, alpha, ref)
        _record("worst_gap", f"hard:{kind}", gap)
        assert gap <= TOL, f"{kind}: objective {gap:.3g}·trace/K above the optimum"


@pytest.mark.filterwarnings("error::RuntimeWarning")
@settings(max_examples=max(10, settings.default.max_examples // 2), deadline=None)
@given(kind=st.sampled_from(GRAM_KINDS), k=st.integers(11, 128), seed=st.integers(0, 2**32 - 1))
def test_hard_kinds_are_kkt_optimal_beyond_enumeration(kind: str, k: int, seed: int) -> None:
    """K up to 128, where enumeration is out of reach: the KKT conditions to 1e-9·trace/K."""
    _count("test_hard_kinds_are_kkt_optimal_beyond_enumeration")
    g = hard_gram(kind, k, np.random.default_rng(seed))
    alpha, status = MinNormSolver().solve(g)
    _STATS["status"][f"hard-large:{status}"] += 1
    assert "inexact" not in status
    assert_optimal(Problem(g, None, kind), alpha, f"hard-large:{kind}")


def test_an_inexact_answer_is_never_silent(monkeypatch: pytest.MonkeyPatch) -> None:
    """If every exact finish fails (simulated), the Frank–Wolfe point comes back with its
    status and a RuntimeWarning giving its KKT residual, not silently."""
    import marble_opt._src.qp as qp_module

    monkeypatch.setattr(qp_module, "_active_set", lambda *args, **kwargs: None)
    g = hard_gram("well-conditioned", 6, np.random.default_rng(0))
    with pytest.warns(RuntimeWarning, match=r"K=6.*Frank–Wolfe point.*KKT residual.*frank-wolfe-inexact"):
        alpha, status = MinNormSolver().solve(g)
    assert status == "frank-wolfe-inexact"
    assert_on_simplex(alpha, 6)
    with pytest.warns(RuntimeWarning, match="frank-wolfe-inexact"):
        min_norm_weights(g, solver="daqp")


# ---- issue 11, item 10: edge inputs ----------------------------------------------------------
@pytest.mark.parametrize("entry", ["function", "solver"])
def test_trace_overflowing_float64_is_rescaled(entry: str, capfd: pytest.CaptureFixture[str]) -> None:
    """Finite entries whose trace overflows float64 (it used to end in an internal "argmax
    of an empty sequence" after OSQP printed an error): the answer of G / max|G|."""
    rng = np.random.default_rng(5)
    for kind in ("well-conditioned", "rank-deficient", "near-duplicates"):
        base = hard_gram(kind, 6, rng)
        g = base / np.abs(base).max() * 1.5e308
        with np.errstate(over="ignore"):
            assert np.isfinite(g).all() and not np.isfinite(np.trace(g))
        alpha = min_norm_weights(g) if entry == "function" else MinNormSolver().solve(g)[0]
        p = Problem(g / 1.5e308, None, "overflow")
        assert_optimal(p, alpha, "overflow")
        assert objective_gap(p, alpha, reference_min_norm_weights(p.gram)) <= TOL
    assert_on_simplex(min_norm_weights(np.full((3, 3), np.finfo(np.float64).max)), 3)
    assert capfd.readouterr().out == ""


@pytest.mark.parametrize(
    ("gram", "smallest"),
    [
        (np.array([[1.0, 2.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), "-1"),
        (np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 1.0]]), "-0.414"),
        (np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]), "-1"),
        (torch.tensor([[1.0, 2.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), "-1"),
    ],
    ids=["2x2-block", "coupled", "zero-diagonal", "torch"],
)
@pytest.mark.parametrize("entry", ["function", "solver", "daqp"])
def test_clearly_indefinite_gram_is_refused(gram, smallest: str, entry: str, capfd) -> None:
    """A positive diagonal but a clearly negative eigenvalue: ValueError naming it, and OSQP
    never gets to print its "not quasidefinite" error."""
    with pytest.raises(ValueError, match=rf"not positive semi-definite: smallest eigenvalue {smallest}"):
        if entry == "function":
            min_norm_weights(gram)
        elif entry == "solver":
            MinNormSolver().solve(gram)
        else:
            min_norm_weights(gram, solver="daqp")
    assert capfd.readouterr().out == ""


@pytest.mark.parametrize(
    ("dtype", "rel", "accepted"),
    [
        (np.float64, 1e-14, True),  # float64 rounding
        (np.float64, 5e-7, True),  # below INDEFINITE_RTOL: clipped
        (np.float64, 5e-6, False),
        (np.float32, 1e-4, True),  # float32's tolerance: √ε ≈ 3.5e-4
        (np.float32, 1e-3, False),
    ],
)
def test_indefiniteness_tolerance_is_relative_to_trace_and_dtype(dtype, rel: float, accepted: bool, capfd) -> None:
    """λ_min = −rel·trace on a rank-deficient Gram: accepted (the negative part clipped, the
    answer optimal for the PSD part) or refused, as ``INDEFINITE_RTOL`` / the dtype's √ε say."""
    rng = np.random.default_rng(3)
    jac = rng.normal(size=(6, 2))
    psd = _gram_of(jac)
    v = np.linalg.svd(jac.T)[2][-1]  # a null direction of G
    g = (psd - rel * np.trace(psd) * np.outer(v, v)).astype(dtype)
    assert np.linalg.eigvalsh(g.astype(np.float64))[0] < -0.5 * rel * np.trace(psd)
    if accepted:
        alpha = min_norm_weights(g)
        p = Problem(psd, jac, "clipped")
        assert_on_simplex(alpha, 6)
        rounding = 6 * np.finfo(dtype).eps * np.abs(psd).max() + rel * np.trace(psd)
        assert objective_gap(p, alpha, reference_min_norm_weights(psd)) * p.unit <= TOL * p.unit + rounding
    else:
        with pytest.raises(ValueError, match="not positive semi-definite"):
            min_norm_weights(g)
    assert capfd.readouterr().out == ""


def test_rounded_grams_never_make_osqp_print(capfd: pytest.CaptureFixture[str]) -> None:
    """float16/float32 rounding of rank-deficient Gram matrices (slightly indefinite): solved
    without a word on stdout (OSQP prints errors there for a non-convex P)."""
    rng = np.random.default_rng(0)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for kind in ("rank-deficient", "duplicates", "near-duplicates", "opposite"):
            g = hard_gram(kind, 7, rng)
            g = g / np.abs(g).max()
            alpha = MinNormSolver().solve(torch.from_numpy(g).to(dtype))[0]
            assert_on_simplex(alpha, 7)
    assert capfd.readouterr().out == ""


@pytest.mark.parametrize("entry", ["function", "solver"])
def test_meta_device_gram_is_named(entry: str) -> None:
    gram = torch.eye(3, device="meta")
    with pytest.raises(ValueError, match=r"gram is a tensor on the meta device \(shape \(3, 3\)"):
        if entry == "function":
            min_norm_weights(gram)
        else:
            MinNormSolver().solve(gram)


def test_two_near_duplicates_take_the_shorter_gradient() -> None:
    """K=2 closed form when ‖g₁ − g₂‖² rounds to ≤ 0: the objective is linear along the
    segment, so the shorter gradient wins (it used to return ½, ½: up to 2e-9·trace/K off)."""
    g = np.array([[26.37792518, 26.37792529], [26.37792529, 26.3779254]])
    assert g[0, 0] - 2 * g[0, 1] + g[1, 1] <= 0.0
    np.testing.assert_array_equal(min_norm_weights(g), [1.0, 0.0])
    for seed in range(50):
        g = _near_duplicate_clusters(2, seed, 1e-9, n_clusters=1)
        p = Problem(g, None, "K=2 near-duplicates")
        assert objective_gap(p, min_norm_weights(g), reference_min_norm_weights(g)) <= TOL
