"""Weightings: agreement with TorchJD's implementations, exactness, and use in the optimizer.

TorchJD (``torchjd.aggregation``) is an independent implementation of the same papers; each
comparison builds a J with JJᵀ = G and compares the updates d = Jᵀw (cosine ≥ 0.999, norm
within 1%). Where a comparison is not meaningful the test says why and checks exactness
instead (KKT conditions, objective values).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from _models import TrunkHeads
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import marble_opt
from marble_opt import MarbleOptimizer, loss_weights
from marble_opt.testing import (
    GRAM_KINDS,
    flat_grad,
    hard_gram,
    jacobian_rows,
    min_norm_objective,
    reference_min_norm_weights,
)

tja = pytest.importorskip("torchjd.aggregation")
from torchjd._linalg import QuadprogProjector  # noqa: E402

KS = (2, 3, 4, 5, 7, 10)
KINDS = ("random", *GRAM_KINDS)


def make_gram(kind: str, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed * 1000 + k)
    if kind == "random":
        j = rng.normal(size=(k, 20))
        return j @ j.T
    return hard_gram(kind, k, rng)


def factor(gram: np.ndarray) -> np.ndarray:
    """A J (K×K) with J Jᵀ = G."""
    vals, vecs = np.linalg.eigh(gram)
    return vecs * np.sqrt(np.clip(vals, 0.0, None))


def torchjd_weighting(name: str):
    # Tolerances tightened where TorchJD's defaults stop early or regularise (their defaults:
    # Frank–Wolfe eps 1e-3 for MGDA; reg_eps 1e-4 added to the normalised Gram for UPGrad).
    return {
        "mean": tja.MeanWeighting(),
        "mgda": tja.MGDAWeighting(epsilon=1e-12, max_iters=10_000),
        "upgrad": tja.UPGradWeighting(projector=QuadprogProjector(norm_eps=0.0, reg_eps=1e-12)),
        "cagrad": tja.CAGradWeighting(c=0.4, norm_eps=1e-12),
        "imtl-g": tja.IMTLGWeighting(),
        "aligned-mtl": tja.AlignedMTLWeighting(),
    }[name]


OPTIONS = {"cagrad": {"c": 0.4}}


def pareto_stationary(gram: np.ndarray) -> bool:
    """0 is (numerically) in the convex hull of the gradients: the min-norm value is ~0."""
    k = gram.shape[0]
    scale = float(np.trace(gram)) / k
    return min_norm_objective(gram, reference_min_norm_weights(gram)) <= 1e-8 * scale


def assert_same_update(gram: np.ndarray, w: np.ndarray, w_ref: np.ndarray, what: str) -> None:
    j = factor(gram)
    d, d_ref = j.T @ w, j.T @ w_ref
    tiny = 1e-6 * math.sqrt(float(np.trace(gram)) / gram.shape[0])
    n, n_ref = float(np.linalg.norm(d)), float(np.linalg.norm(d_ref))
    if n_ref < tiny:
        assert n < tiny, f"{what}: TorchJD's update is ~0 ({n_ref:.3g}) but ours has norm {n:.3g}"
        return
    cos = float(d @ d_ref) / (n * n_ref) if n > 0 else 0.0
    assert cos >= 0.999, f"{what}: cosine {cos:.6f} with TorchJD's update"
    assert abs(n - n_ref) <= 0.01 * n_ref, f"{what}: norm {n:.6g} against TorchJD's {n_ref:.6g}"


@pytest.mark.parametrize("name", ["mean", "mgda", "upgrad", "cagrad", "imtl-g", "aligned-mtl"])
@pytest.mark.parametrize("kind", KINDS)
def test_same_update_as_torchjd(name: str, kind: str) -> None:
    for k in KS:
        gram = make_gram(kind, k, seed=0)
        if name in ("mgda", "cagrad") and pareto_stationary(gram):
            # 0 is in the hull: MGDA's exact answer is d = 0, which TorchJD's Frank–Wolfe
            # approaches only to ~1e-2 (checked exactly in test_mgda_is_the_exact_min_norm_point);
            # CAGrad's d = g0 + √φ·g_w/‖g_w‖ is undefined there (ours: g0, the paper code's limit).
            continue
        if name == "upgrad" and kind == "wide-scales":
            continue  # TorchJD's reg_eps swamps gradients 1e-12 smaller; test_upgrad_is_an_exact_projection
        w = loss_weights(gram, name, **OPTIONS.get(name, {}))
        w_ref = torchjd_weighting(name)(torch.from_numpy(gram)).double().numpy()
        assert_same_update(gram, w, w_ref, f"{name} on {kind} K={k}")


@settings(max_examples=15, deadline=None)
@given(
    k=st.integers(2, 8),
    seed=st.integers(0, 2**31 - 1),
    name=st.sampled_from(["mean", "upgrad", "cagrad", "imtl-g", "aligned-mtl", "mgda"]),
)
def test_same_update_as_torchjd_on_random_jacobians(k: int, seed: int, name: str) -> None:
    rng = np.random.default_rng(seed)
    j = rng.normal(size=(k, 3 * k)) * rng.uniform(0.1, 10.0, size=(k, 1))
    gram = j @ j.T
    w = loss_weights(gram, name, **OPTIONS.get(name, {}))
    w_ref = torchjd_weighting(name)(torch.from_numpy(gram)).double().numpy()
    assert_same_update(gram, w, w_ref, f"{name} K={k}")


@pytest.mark.parametrize("kind", KINDS)
def test_mgda_is_the_exact_min_norm_point(kind: str) -> None:
    for k in range(2, 11):
        gram = make_gram(kind, k, seed=1)
        w = loss_weights(gram, "mgda")
        assert w.min() >= 0 and w.sum() == pytest.approx(1.0, abs=1e-12)
        best = min_norm_objective(gram, reference_min_norm_weights(gram))
        assert min_norm_objective(gram, w) - best <= 1e-9 * float(np.trace(gram)) / k


@pytest.mark.parametrize("kind", KINDS)
def test_upgrad_is_an_exact_projection(kind: str) -> None:
    """Each v^(i) = u_i + λ solves min_{λ≥0} ½(u+λ)ᵀG(u+λ): KKT (Gv ≥ 0, λ ≥ 0, λ·Gv = 0),
    so the update has a non-negative inner product with every gradient."""
    from marble_opt._src.weightings.upgrad import dual_cone_weights

    for k in KS:
        gram = make_gram(kind, k, seed=2)
        norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
        for i in range(k):
            u = np.zeros(k)
            u[i] = 1.0 / k
            v = dual_cone_weights(gram, u)
            lam = v - u
            gv = gram @ v
            # Rounding scale of ⟨g_l, d⟩: ‖g_l‖ Σ_m |v_m| ‖g_m‖ (no cancellation).
            tol = 1e-9 * norms * float(np.abs(v) @ norms) + 1e-300
            assert (lam >= -1e-12).all()
            assert (gv >= -tol).all(), f"{kind} K={k}: ⟨g_l, d⟩ = {gv.min():.3g} < 0"
            live = lam > 1e-9 * lam.max(initial=0.0)
            assert (np.abs(gv[live]) <= tol[live]).all()


def test_cagrad_solves_its_dual_at_least_as_well_as_torchjd() -> None:
    """Where the directions are ill-posed (0 in or near the hull), compare objective values."""
    from marble_opt._src.weightings.cagrad import cagrad_dual

    for kind in ("opposite", "wide-scales", "duplicates"):
        for k in (3, 5, 7):
            gram = make_gram(kind, k, seed=0)
            g = gram / (np.trace(gram) / k)
            a = g.sum(axis=1) / k
            s = 0.4 * math.sqrt(a.sum() / k)

            def f(w: np.ndarray, a: np.ndarray = a, s: float = s, g: np.ndarray = g) -> float:
                return float(a @ w) + s * math.sqrt(max(float(w @ g @ w), 0.0))

            ref = torchjd_weighting("cagrad")(torch.from_numpy(gram)).double().numpy() - 1.0 / k
            if ref.sum() <= 0:
                continue
            ref = np.clip(ref / ref.sum(), 0.0, None)
            assert f(cagrad_dual(g, 0.4)) <= f(ref / ref.sum()) + 1e-12


def test_loss_weights_do_not_sum_to_one_in_general() -> None:
    gram = make_gram("well-conditioned", 4, seed=3)
    assert loss_weights(gram, "mean").sum() == pytest.approx(1.0)
    assert loss_weights(gram, "mgda").sum() == pytest.approx(1.0)
    assert loss_weights(gram, "upgrad").sum() > 1.0  # the projections add weight
    w = loss_weights(gram, "marble")  # α_k · mean‖g‖ / ‖g_k‖
    alpha = reference_min_norm_weights(gram / np.sqrt(np.outer(np.diag(gram), np.diag(gram))))
    norms = np.sqrt(np.diag(gram))
    np.testing.assert_allclose(w, alpha * norms.mean() / norms, rtol=1e-6, atol=1e-9)


def test_loss_weights_accepts_a_torch_gram_and_a_torchjd_object() -> None:
    gram = make_gram("random", 5, seed=4)
    a = loss_weights(torch.from_numpy(gram), "upgrad")
    b = loss_weights(gram, tja.UPGradWeighting(projector=QuadprogProjector(norm_eps=0.0, reg_eps=1e-12)))
    assert_same_update(gram, a, b, "torch input vs TorchJD object")


def test_bad_weighting_arguments_name_the_value() -> None:
    gram = make_gram("random", 3, seed=5)
    with pytest.raises(ValueError, match="weighting must be one of .* got 'nope'"):
        loss_weights(gram, "nope")
    with pytest.raises(TypeError, match="weighting='mean' does not take options \\['c'\\]"):
        loss_weights(gram, "mean", c=1.0)
    with pytest.raises(ValueError, match="c must be a finite float >= 0, got -1"):
        loss_weights(gram, "cagrad", c=-1)
    with pytest.raises(ValueError, match="anchor must be a float in \\[0, 1\\], got 2"):
        loss_weights(gram, "marble", anchor=2)


# ---- in the optimizer ------------------------------------------------------------------


_GEN = torch.Generator().manual_seed(7)
X = torch.randn(32, 5, generator=_GEN)
T = torch.randn(32, 3, generator=_GEN)


def make_model(seed: int = 0) -> TrunkHeads:
    torch.manual_seed(seed)
    return TrunkHeads(d_in=5, width=8)


def objectives(model: TrunkHeads, x: torch.Tensor = X) -> dict[str, torch.Tensor]:
    _, (ya, yb, yc) = model(x)
    return {
        "a": 10.0 * ((ya - T[: len(x), 0]) ** 2).mean(),
        "b": (yb + ya - T[: len(x), 1]).abs().mean(),
        "c": 0.1 * ((yc - ya - T[: len(x), 2]) ** 2).mean(),
    }


def grads_of(model: nn.Module, losses: dict[str, torch.Tensor]) -> np.ndarray:
    return jacobian_rows(losses, list(model.parameters())).numpy()


def update_of(model: nn.Module) -> np.ndarray:
    return flat_grad(list(model.parameters())).numpy()


@pytest.mark.parametrize("name", ["marble", "mgda", "mean", "upgrad", "cagrad", "imtl-g", "aligned-mtl"])
@pytest.mark.parametrize("gram", ["exact", "exact-lean"])
def test_the_optimizer_applies_the_weightings_weights(name: str, gram: str) -> None:
    model = make_model(1)
    options = {"ema_decay": 0.0} if name == "marble" else {}
    opt = MarbleOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), weighting=name, weighting_options=options, gram=gram
    )
    losses = objectives(model)
    j = grads_of(model, losses)
    report = opt.backward(losses)
    want = loss_weights(j @ j.T, name, **options)
    got = np.array([report.loss_weights[n] for n in report.names])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(update_of(model), j.T @ got, rtol=1e-4, atol=1e-6)
    assert sum(report.weights.values()) == pytest.approx(1.0)


def test_a_torchjd_weighting_object_works_in_the_optimizer() -> None:
    updates = []
    for weighting in ("upgrad", tja.UPGradWeighting(projector=QuadprogProjector(norm_eps=0.0, reg_eps=1e-12))):
        model = make_model(2)
        opt = MarbleOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), weighting=weighting)
        for _ in range(3):
            opt.zero_grad()
            opt.step(objectives(model))
        updates.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(updates[0], updates[1], rtol=1e-5, atol=1e-6)


def test_anchor_mixes_the_preference_into_alpha() -> None:
    model = make_model(3)
    p = [0.5, 0.3, 0.2]
    opt = MarbleOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        ema_decay=0.0,
        weighting_options={"anchor": 0.4, "preference": p},
    )
    report = opt.backward(objectives(model))
    raw = np.array([report.raw_weights[n] for n in report.names])
    alpha = np.array([report.weights[n] for n in report.names])
    np.testing.assert_allclose(alpha, 0.4 * np.array(p) + 0.6 * raw, atol=1e-12)


def test_marble_options_are_refused_for_another_weighting() -> None:
    model = make_model(4)
    with pytest.raises(
        ValueError, match=r"\['ema_decay'\] are options of weighting='marble', not of weighting='upgrad'"
    ):
        MarbleOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), weighting="upgrad", ema_decay=0.5)
    with pytest.raises(ValueError, match="given both as keywords and in weighting_options"):
        MarbleOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), ema_decay=0.5, weighting_options={"ema_decay": 0.1}
        )
    opt = MarbleOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), weighting="mean")
    with pytest.raises(ValueError, match="ema_decay is an option of weighting='marble'"):
        opt.ema_decay = 0.3


@pytest.mark.parametrize("name", ["marble", "upgrad", "cagrad"])
def test_resume_is_bit_exact_with_any_weighting(name: str) -> None:
    def run(steps: int, resume_at: int | None) -> tuple[list[torch.Tensor], dict]:
        model = make_model(5)
        opt = MarbleOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), weighting=name, refresh_every=2)
        for i in range(steps):
            if resume_at is not None and i == resume_at:
                sd = {k: v for k, v in opt.state_dict().items()}
                opt = MarbleOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), weighting=name, refresh_every=2)
                opt.load_state_dict(sd)
            opt.zero_grad()
            opt.step(objectives(model, X[i % 4 * 8 : i % 4 * 8 + 8]))
        return [p.detach().clone() for p in model.parameters()], opt.state_dict()

    straight, _ = run(6, None)
    resumed, sd = run(6, 3)
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)
    assert sd["marble"]["weighting"] == name


def test_report_to_dict_is_json_ready() -> None:
    model = make_model(6)
    opt = MarbleOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    losses = objectives(model)
    losses["zero"] = 0.0 * losses["a"]  # excluded: NaN cosines
    report = opt.backward(losses)
    d = report.to_dict()
    text = json.dumps(d, allow_nan=False)
    back = json.loads(text)
    assert back["names"] == ["a", "b", "c", "zero"]
    assert back["update_cosine"]["zero"] is None and math.isnan(report.update_cosine["zero"])
    assert back["gram"] == report.gram.tolist()
    assert back["excluded"] == ["zero"] and back["skipped"] is False


def test_the_public_namespace_exports_every_weighting() -> None:
    for name, cls in marble_opt.WEIGHTINGS.items():
        assert cls.name == name
        assert getattr(marble_opt, cls.__name__) is cls


@pytest.mark.parametrize("factory", ["DualProjWeighting", "IMTLGWeighting", "AlignedMTLWeighting", "MeanWeighting"])
def test_any_torchjd_gramian_weighting_drives_the_optimizer(factory: str) -> None:
    """A TorchJD weighting we have no native version of (DualProj) works like the others:
    the update is Σ w_k g_k with w = weighting(G) on the measured Gram."""
    model = make_model(8)
    weighting = getattr(tja, factory)()
    opt = MarbleOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), weighting=weighting)
    losses = objectives(model)
    j = grads_of(model, losses)
    report = opt.backward(losses)
    want = weighting(torch.from_numpy(j @ j.T)).double().numpy()
    got = np.array([report.loss_weights[n] for n in report.names])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(update_of(model), j.T @ got, rtol=1e-4, atol=1e-6)
    assert report.solver_status == factory
