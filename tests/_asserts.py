"""Property assertions written once, applied by tests/test_properties.py to every Gram source,
normalisation, refresh interval and non-finite policy (in the manner of TorchJD's
``tests/unit/aggregation/_asserts.py``)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

from marble_opt import BalanceReport, MarbleOptimizer
from marble_opt.testing import flat_grad, jacobian_rows, reference_min_norm_weights


def vec(report_field: dict[str, float], names: tuple[str, ...]) -> np.ndarray:
    return np.array([report_field[n] for n in names], dtype=np.float64)


def scales_of(norms: np.ndarray, losses: np.ndarray, normalize: str) -> np.ndarray:
    """``s_k`` with ``ĝ_k = s_k g_k`` (SPEC "The algorithm, one step", item 3)."""
    return {
        "l2": 1.0 / norms,
        "none": np.ones_like(norms),
        "loss": 1.0 / losses,
        "loss+l2": 1.0 / (losses * norms),
    }[normalize]


def reference_loss_weights(rows_g: Tensor, losses: np.ndarray, normalize: str) -> np.ndarray:
    """``w`` of a first step at ρ=0 by hand: G = J Jᵀ, Ĝ = (s sᵀ)∘G, α* by support
    enumeration, ``w = α* s · mean‖g‖ / mean‖ĝ‖`` (``rescale=True``)."""
    gram = (rows_g @ rows_g.T).numpy()
    norms = np.sqrt(np.diag(gram))
    s = scales_of(norms, losses, normalize)
    alpha = reference_min_norm_weights(gram * np.outer(s, s))
    m = norms.mean() / (s * norms).mean()
    return alpha * s * m


def assert_close_vec(actual: Tensor | np.ndarray, expected: Tensor | np.ndarray, rel: float, what: str) -> None:
    a = torch.as_tensor(np.asarray(actual), dtype=torch.float64)
    e = torch.as_tensor(np.asarray(expected), dtype=torch.float64)
    err = float((a - e).norm())
    scale = float(e.norm())
    assert err <= rel * scale + 1e-12, f"{what}: |actual - expected| = {err:.3g}, |expected| = {scale:.3g}"


def assert_grad_is_weighted_sum(params: list[Tensor], rows_full: Tensor, w: np.ndarray, rel: float = 1e-5) -> None:
    """``p.grad`` (flattened) equals ``Σ_k w_k g_k`` over every trainable parameter."""
    expected = torch.as_tensor(w, dtype=torch.float64) @ rows_full
    assert_close_vec(flat_grad(params), expected, rel, "p.grad against Σ w_k g_k")


def assert_matches_reference(
    report: BalanceReport, params: list[Tensor], rows_g: Tensor, rows_full: Tensor, normalize: str
) -> None:
    """The report's loss weights and ``p.grad`` equal the hand-computed step."""
    names = report.names
    w_ref = reference_loss_weights(rows_g, vec(report.losses, names), normalize)
    assert_close_vec(vec(report.loss_weights, names), w_ref, 1e-4, "loss weights against the reference")
    assert_grad_is_weighted_sum(params, rows_full, w_ref, rel=1e-4)


def assert_non_conflicting(report: BalanceReport, rows_g: Tensor, normalize: str, tol: float = 1e-5) -> None:
    """At ρ=0, with ``d̂ = Σ α_k ĝ_k`` over the measured gradients: ``⟨d̂, ĝ_k⟩ ≥ ‖d̂‖²`` for
    every valid objective, with equality where ``α_k > 0``; so no objective gets a negative
    cosine with the update ``d = Σ w_k g_k``, and for ``"l2"`` the active ones get equal ones."""
    names = report.names
    alpha = vec(report.raw_weights, names)
    norms = rows_g.norm(dim=1).numpy()
    s = scales_of(norms, vec(report.losses, names), normalize)
    g_hat = rows_g * torch.as_tensor(s)[:, None]
    d_hat = torch.as_tensor(alpha) @ g_hat
    inner = (g_hat @ d_hat).numpy()
    sq = float(d_hat @ d_hat)
    atol = tol * float((g_hat**2).sum(dim=1).max())
    assert (inner >= sq - atol).all(), f"⟨d̂, ĝ_k⟩ = {inner} below ‖d̂‖² = {sq}"
    active = alpha > 1e-6
    np.testing.assert_allclose(inner[active], sq, atol=atol, err_msg="⟨d̂, ĝ_k⟩ of active objectives")
    d = torch.as_tensor(vec(report.loss_weights, names)) @ rows_g
    cos = (rows_g @ d).numpy() / (norms * float(d.norm()))
    assert (cos >= -1e-6).all(), f"cos(d, g_k) = {cos}"
    if normalize == "l2":
        np.testing.assert_allclose(cos[active], cos[active][0], atol=1e-4, err_msg="equal cosines")


@dataclass
class Snapshot:
    params: list[Tensor]
    grads: list[Tensor | None]
    state: dict[str, Any]
    weights: dict[str, float]
    num_steps: int


def snapshot(params: list[Tensor], opt: MarbleOptimizer) -> Snapshot:
    return Snapshot(
        [p.detach().clone() for p in params],
        [None if p.grad is None else p.grad.clone() for p in params],
        copy.deepcopy(opt.state_dict()),
        dict(opt.weights),
        opt.num_steps,
    )


def assert_same_tree(a: Any, b: Any, where: str = "") -> None:
    """Equal nested dicts/lists of tensors and scalars, tensors bit for bit."""
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys {a.keys()} != {b.keys()}"
        for key in a:
            assert_same_tree(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_untouched(before: Snapshot, params: list[Tensor], opt: MarbleOptimizer, *, nan_grads: bool) -> None:
    """Parameters, optimizer state, weights and step count bit-identical to ``before``;
    ``p.grad`` too, or all NaN (``nonfinite="propagate"``)."""
    for i, (p, q) in enumerate(zip(params, before.params)):
        assert torch.equal(p, q), f"parameter {i} moved"
    for i, (p, g) in enumerate(zip(params, before.grads)):
        if nan_grads:
            assert p.grad is not None and torch.isnan(p.grad).all(), f"p.grad {i} is not all NaN"
        elif g is None:
            assert p.grad is None, f"p.grad {i} appeared"
        else:
            assert p.grad is not None and torch.equal(p.grad, g), f"p.grad {i} changed"
    assert_same_tree(opt.state_dict(), before.state, "state_dict")
    assert opt.weights == before.weights
    assert opt.num_steps == before.num_steps


def assert_report_tells_the_truth(
    report: BalanceReport, before: Snapshot, params: list[Tensor], opt: MarbleOptimizer
) -> None:
    """``step(losses)`` stepped exactly when its report says it did not skip."""
    if report.skipped:
        assert opt.num_steps == before.num_steps, "a skipped report, yet a step was counted"
        assert all(torch.equal(p, q) for p, q in zip(params, before.params)), "a skipped report, yet parameters moved"
    else:
        assert opt.num_steps == before.num_steps + 1, "report says not skipped, but no step was taken"
        assert any(not torch.equal(p, q) for p, q in zip(params, before.params)), "not skipped, yet nothing moved"


# ---- every weighting ---------------------------------------------------------------------


def gram_seen(losses: dict[str, Tensor], inputs: list[Tensor], estimator: str, floor: float = 0.01) -> np.ndarray:
    """The K×K matrix a weighting is handed, computed by hand: ``G = J Jᵀ`` of the batch means
    (``"batch"``), or for ``"cross"`` (per-sample losses; even samples in half A) the
    symmetrised cross product ``½(J_A J_Bᵀ + J_B J_Aᵀ)``, projected onto the PSD cone, its
    diagonal raised to ``floor·‖g_k^A‖‖g_k^B‖``."""
    if estimator == "batch":
        rows = jacobian_rows({n: v.mean() for n, v in losses.items()}, inputs)
        return (rows @ rows.T).numpy()
    first = next(iter(losses.values()))
    even = torch.arange(first.shape[0]) % 2 == 0
    a = jacobian_rows([v[even].mean() for v in losses.values()], inputs).numpy()
    b = jacobian_rows([v[~even].mean() for v in losses.values()], inputs).numpy()
    cross = 0.5 * (a @ b.T + b @ a.T)
    vals, vecs = np.linalg.eigh(cross)
    psd = (vecs * np.clip(vals, 0.0, None)) @ vecs.T
    floor_diag = floor * np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return psd + np.diag(np.maximum(np.diag(psd), floor_diag) - np.diag(psd))


def assert_finite_weights(report: BalanceReport, names: tuple[str, ...]) -> None:
    """α*, α and w: one finite value per objective, in the order given; α sums to 1."""
    assert report.names == names, f"report names {report.names} != {names}"
    for field in ("raw_weights", "weights", "loss_weights"):
        values = getattr(report, field)
        assert tuple(values) == names, f"{field} keys {tuple(values)} != {names}"
        assert np.isfinite(vec(values, names)).all(), f"{field} not finite: {values}"
    assert sum(report.weights.values()) == pytest.approx(1.0, abs=1e-9), f"α sums to {sum(report.weights.values())}"


def assert_on_simplex(report: BalanceReport, tol: float = 1e-9) -> None:
    """α* (when solved) and α: non-negative and summing to 1 (MARBLE, MGDA: the min-norm point
    of the simplex, and its EMA)."""
    fields = ("raw_weights", "weights") if report.solved else ("weights",)
    for field in fields:
        a = vec(getattr(report, field), report.names)
        assert (a >= -tol).all() and abs(float(a.sum()) - 1.0) <= tol, f"{field} = {a} is not on the simplex"


def assert_no_conflict(gram: np.ndarray, w: np.ndarray, rel: float = 1e-6) -> None:
    """``⟨d, g_k⟩ = (G w)_k ≥ 0`` for every k, ``d = Σ_l w_l g_l`` (G: the Gram the weighting saw)."""
    inner = gram @ w
    atol = rel * float(np.abs(np.diag(gram)).max()) * float(np.abs(w).sum())
    assert (inner >= -atol).all(), f"⟨d, g_k⟩ = {inner} (tolerance {atol:.3g}): the update conflicts with an objective"


def assert_weights_match(actual: dict[str, float], expected: dict[str, float], rel: float, what: str) -> None:
    """Weights keyed by objective name agree (so a permuted run compares name by name)."""
    names = tuple(expected)
    assert set(actual) == set(names), f"{what}: names {sorted(actual)} != {sorted(names)}"
    assert_close_vec(vec(actual, names), vec(expected, names), rel, what)


def assert_same_direction(a: np.ndarray, b: np.ndarray, rel: float, what: str) -> None:
    """``a = λ b`` for some λ > 0."""
    lam = float(a @ b) / float(b @ b)
    assert lam > 0, f"{what}: opposite directions ({a} vs {b})"
    assert_close_vec(a, lam * b, rel, what)


def assert_same_update(gram: np.ndarray, w: np.ndarray, w_ref: np.ndarray, rel: float, what: str) -> None:
    """``Σ w_k g_k`` and ``Σ w_ref_k g_k`` agree in the geometry of ``gram``:
    ``‖d − d_ref‖_G = √((w − w_ref)ᵀ G (w − w_ref))`` small against ``‖d_ref‖_G`` (or, when that
    vanishes, against ``Σ|w_ref_k|·max‖g_k‖``). Weights may differ along the null space of a
    singular G (the min-norm point's weights are then not unique)."""
    diff = np.asarray(w, dtype=np.float64) - np.asarray(w_ref, dtype=np.float64)
    err = float(np.sqrt(max(float(diff @ gram @ diff), 0.0)))
    ref = float(np.sqrt(max(float(w_ref @ gram @ w_ref), 0.0)))
    floor = 1e-3 * float(np.abs(w_ref).sum()) * float(np.sqrt(np.abs(np.diag(gram)).max()))
    assert err <= rel * max(ref, floor), f"{what}: ‖d − d_ref‖_G = {err:.3g}, ‖d_ref‖_G = {ref:.3g}"
