"""The cross-batch Gram estimator (``gram_estimator="cross"``).

Every expected value is computed by hand here: per-half gradients with
``torch.autograd.grad`` and the cross products from them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from marble_opt import MarbleOptimizer, loss_weights
from marble_opt._src.estimators import psd_projection, split_halves
from marble_opt.testing import flat_grad, jacobian_rows

K, D, B = 3, 40, 16


class Linear(nn.Module):
    """Per-sample losses ``L_{k,i} = ⟨s_k + n_{k,i}, θ⟩``: per-sample gradient = signal + noise."""

    def __init__(self) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(D, dtype=torch.float64))

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:  # (K, B, D) -> (K, B)
        return vectors @ self.theta


def synthetic(steps: int, estimator: str, seed: int = 0, sigma: float = 9.0) -> tuple[np.ndarray, list]:
    gen = torch.Generator().manual_seed(seed)
    signal = torch.randn(K, D, generator=gen, dtype=torch.float64)
    model = Linear()
    opt = MarbleOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), gram="exact", gram_estimator=estimator)
    reports = []
    for _ in range(steps):
        noise = sigma * torch.randn(K, B, D, generator=gen, dtype=torch.float64)
        per_sample = model(signal[:, None, :] + noise)
        losses = {f"r{k}": per_sample[k] for k in range(K)}
        if estimator == "batch":
            losses = {n: v.mean() for n, v in losses.items()}
        opt.zero_grad()
        reports.append(opt.step(losses))
    return (signal @ signal.T).numpy(), reports


def test_the_cross_estimate_converges_to_the_signals_gram_and_the_batch_one_does_not() -> None:
    target, cross = synthetic(400, "cross")
    _, batch = synthetic(400, "batch")
    mean_cross = np.mean([r.gram for r in cross], axis=0)
    mean_batch = np.mean([r.gram for r in batch], axis=0)
    rel = np.linalg.norm(mean_cross - target) / np.linalg.norm(target)
    assert rel < 0.2, f"cross estimate off by {rel:.3f} (relative Frobenius)"
    # The noise adds σ²D/B = 203 to each batch diagonal entry (the signal's is ~40).
    inflation = np.diag(mean_batch) / np.diag(target)
    assert (inflation > 3.0).all(), inflation
    assert (np.abs(np.diag(mean_cross) / np.diag(target) - 1.0) < 0.25).all()
    # The halves' self-consistency reports that these gradients are mostly noise.
    consistency = np.mean([[r.self_consistency[n] for n in r.names] for r in cross], axis=0)
    assert (consistency < 0.5).all() and (consistency > 0.0).all()
    assert batch[0].self_consistency == {}


def half_grads(model: nn.Module, per_sample: list[torch.Tensor], mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    params = list(model.parameters())
    a = jacobian_rows([v[torch.as_tensor(np.flatnonzero(mask))].mean() for v in per_sample], params)
    b = jacobian_rows([v[torch.as_tensor(np.flatnonzero(~mask))].mean() for v in per_sample], params)
    return a.numpy(), b.numpy()


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
        self.out = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x))


def per_sample_losses(model: Net, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    out = model(x)
    return {
        "sq": (out[:, 0] - y[:, 0]) ** 2,
        "abs": (out[:, 1] - y[:, 1]).abs() + 0.1 * out[:, 0],
        "big": 10.0 * (out[:, 2] + out[:, 0] - y[:, 2]) ** 2,
    }


@pytest.mark.parametrize("gram", ["exact", "exact-lean", "params"])
@pytest.mark.parametrize("with_groups", [False, True])
def test_cross_report_and_update_match_a_hand_computation(gram: str, with_groups: bool) -> None:
    torch.manual_seed(0)
    model = Net()
    x, y = torch.randn(12, 4), torch.randn(12, 3)
    groups = torch.arange(12) // 3 if with_groups else None
    kwargs = {"gram_params": list(model.parameters())} if gram == "params" else {}
    opt = MarbleOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), gram=gram, gram_estimator="cross", ema_decay=0.0, **kwargs
    )
    losses = per_sample_losses(model, x, y)
    mask = split_halves(12, groups)
    if with_groups:  # whole groups of 3 alternate between the halves
        assert mask.tolist() == [True] * 3 + [False] * 3 + [True] * 3 + [False] * 3
    a, b = half_grads(model, list(losses.values()), mask)
    report = opt.backward(losses, groups=groups)
    cross = 0.5 * (a @ b.T + b @ a.T)
    np.testing.assert_allclose(report.gram, cross, rtol=1e-5, atol=1e-9)
    for k, name in enumerate(report.names):
        cos = a[k] @ b[k] / np.linalg.norm(a[k]) / np.linalg.norm(b[k])
        assert report.self_consistency[name] == pytest.approx(cos, rel=1e-5, abs=1e-7)
    # The weighting saw the PSD projection of the estimate with the floored diagonal.
    used = psd_projection(cross)
    floor = 0.01 * np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    used = used + np.diag(np.maximum(np.diag(used), floor) - np.diag(used))
    w_want = loss_weights(used, "marble")
    w = np.array([report.loss_weights[n] for n in report.names])
    np.testing.assert_allclose(w, w_want, rtol=1e-4, atol=1e-8)
    # ... and the update is Σ w_k ∇ mean(L_k) over the whole batch.
    full = (a * mask.sum() + b * (~mask).sum()) / 12
    got = flat_grad(list(model.parameters())).numpy()
    np.testing.assert_allclose(got, full.T @ w, rtol=1e-4, atol=1e-7)


def test_cached_steps_apply_the_weights_to_the_whole_batch_means() -> None:
    torch.manual_seed(1)
    model = Net()
    x, y = torch.randn(10, 4), torch.randn(10, 3)
    opt = MarbleOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), gram_estimator="cross", refresh_every=2)
    opt.zero_grad()
    opt.step(per_sample_losses(model, x, y))
    opt.zero_grad()
    losses = per_sample_losses(model, x, y)
    report = opt.backward(losses)
    assert not report.solved
    params = list(model.parameters())
    again = per_sample_losses(model, x, y)  # lr=0: the same parameters
    want = torch.autograd.grad(sum(report.loss_weights[n] * v.mean() for n, v in again.items()), params)
    for p, g in zip(params, want):
        torch.testing.assert_close(p.grad, g)


def test_resume_with_the_cross_estimator_and_its_gram_ema_is_bit_exact() -> None:
    def run(resume_at: int | None) -> tuple[list[torch.Tensor], dict]:
        torch.manual_seed(2)
        model = Net()
        gen = torch.Generator().manual_seed(3)

        def make() -> MarbleOptimizer:
            return MarbleOptimizer(
                torch.optim.AdamW(model.parameters(), lr=1e-2), gram_estimator="cross", estimator_options={"ema": 0.5}
            )

        opt = make()
        for i in range(5):
            if i == resume_at:
                sd = opt.state_dict()
                opt = make()
                opt.load_state_dict(sd)
            x, y = torch.randn(8, 4, generator=gen), torch.randn(8, 3, generator=gen)
            opt.zero_grad()
            opt.step(per_sample_losses(model, x, y))
        return [p.detach().clone() for p in model.parameters()], opt.state_dict()

    straight, sd = run(None)
    resumed, _ = run(2)
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed))
    assert sd["marble"]["gram_ema"].shape == (3, 3)


def test_the_shared_source_refuses_the_cross_estimator_and_says_why() -> None:
    model = Net()
    with pytest.raises(ValueError, match="disjoint rows of the shared tensor, so every cross product"):
        MarbleOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), gram="shared", gram_estimator="cross")


def test_bad_per_sample_input_is_refused_with_names() -> None:
    model = Net()
    opt = MarbleOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), gram_estimator="cross")
    x, y = torch.randn(6, 4), torch.randn(6, 3)
    losses = per_sample_losses(model, x, y)
    with pytest.raises(ValueError, match=r"loss 'sq' must be a \(B,\) tensor with B >= 2, got shape \(\)"):
        opt.backward({**losses, "sq": losses["sq"].mean()})
    with pytest.raises(ValueError, match="loss 'abs' has 5 per-sample values, but the first loss has 6"):
        opt.backward({**losses, "abs": losses["abs"][:5]})
    with pytest.raises(ValueError, match="groups has 4 entries but the per-sample losses have 6"):
        opt.backward(losses, groups=[0, 0, 1, 1])
    with pytest.raises(ValueError, match="groups has a single group"):
        opt.backward(losses, groups=[7] * 6)
    plain = MarbleOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="groups= is only used with gram_estimator='cross'"):
        plain.backward({n: v.mean() for n, v in losses.items()}, groups=[0, 1, 0, 1, 0, 1])
    with pytest.raises(ValueError, match="gram_estimator must be one of"):
        MarbleOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), gram_estimator="halves")


@settings(max_examples=60, deadline=None)
@given(
    k=st.integers(1, 6),
    n_groups=st.integers(2, 9),
    per_group=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
    floor=st.floats(0.0, 1.0),
)
def test_split_and_processing_properties(k: int, n_groups: int, per_group: int, seed: int, floor: float) -> None:
    """Groups stay whole and alternate; the matrix handed to a weighting is PSD with its
    diagonal at least floor·‖g^A‖‖g^B‖; the raw estimate is the symmetrised cross product."""
    from marble_opt._src.estimators import CrossGram

    rng = np.random.default_rng(seed)
    ids = np.repeat(rng.permutation(n_groups), per_group)
    mask = split_halves(ids.size, ids)
    for g in np.unique(ids):
        assert len(set(mask[ids == g])) == 1  # a group is never split
    order = list(dict.fromkeys(ids.tolist()))
    assert [bool(mask[ids == g][0]) for g in order] == [i % 2 == 0 for i in range(len(order))]
    a, b = rng.normal(size=(k, 7)), rng.normal(size=(k, 7))
    rows = np.concatenate([a, b])
    cross, consistency, products = CrossGram.split_gram(rows @ rows.T)
    np.testing.assert_allclose(cross, 0.5 * (a @ b.T + b @ a.T), atol=1e-12)
    np.testing.assert_allclose(products, np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), rtol=1e-12)
    np.testing.assert_allclose(consistency * products, np.sum(a * b, axis=1), atol=1e-12)
    from marble_opt._src.estimators import Measurement

    measured = Measurement(
        gram=cross, raw=cross, values=np.zeros(k), losses=[], coefficients=np.eye(k), products=products
    )
    used = CrossGram(floor=floor).process(cross, np.ones(k, dtype=bool), measured)
    assert np.linalg.eigvalsh(used).min() >= -1e-10 * max(1.0, np.abs(used).max())
    assert (np.diag(used) >= floor * products - 1e-12).all()


def test_an_empty_loss_dict_is_refused_clearly_with_the_cross_estimator():
    model = torch.nn.Linear(3, 1)
    opt = MarbleOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), gram_estimator="cross")
    with pytest.raises(ValueError, match="losses is empty"):
        opt.backward({})


@pytest.mark.parametrize("half", ["A", "B"])
def test_an_objective_with_samples_in_one_half_only_gets_its_batch_estimate(half: str) -> None:
    """Issue 18, item 3: a reward defined for some prompts only (its per-sample loss is 0
    elsewhere) whose prompts all fall in one half has no gradient in the other half, so its
    cross products are empty. It takes part with an honest estimate: its row of G is
    ⟨v_r, g_l^H⟩ with v_r its whole-batch gradient and H the half without its samples, ‖v_r‖²
    on the diagonal; the report names it in ``batch_estimated``; it is not excluded as a zero
    gradient, and its weight is MARBLE's on that matrix (not one inflated by a 0 diagonal)."""
    torch.manual_seed(4)
    model = Net()
    x, y = torch.randn(12, 4), torch.randn(12, 3)
    groups = torch.arange(12) // 2  # 6 groups of 2: A = groups 0, 2, 4; B = 1, 3, 5
    mask = split_halves(12, groups)
    only = torch.as_tensor(mask if half == "A" else ~mask, dtype=torch.float32)
    opt = MarbleOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), gram_estimator="cross", ema_decay=0.0)
    losses = per_sample_losses(model, x, y)
    losses["partial"] = only * (model(x)[:, 2] - y[:, 0]) ** 2  # 0 on the other half's prompts
    report = opt.backward(losses, groups=groups)
    assert not report.skipped and report.excluded == () and report.reason == ""
    assert report.batch_estimated == ("partial",)
    assert np.isnan(report.self_consistency["partial"])
    again = per_sample_losses(model, x, y)  # no step yet: the same parameters, a fresh graph
    again["partial"] = only * (model(x)[:, 2] - y[:, 0]) ** 2
    a, b = half_grads(model, list(again.values()), mask)
    r = 3
    assert np.abs((b if half == "A" else a)[r]).max() == 0.0  # really no gradient in the other half
    frac_a = mask.mean()
    v = frac_a * a[r] + (1 - frac_a) * b[r]  # its whole-batch gradient
    other = b if half == "A" else a
    want = 0.5 * (a @ b.T + b @ a.T)
    want[r, :3] = want[:3, r] = other[:3] @ v
    want[r, r] = v @ v
    np.testing.assert_allclose(report.gram, want, rtol=1e-5, atol=1e-9)
    # The weighting saw that matrix, PSD-projected, with the floor at ‖v_r‖² for this objective.
    used = psd_projection(want)
    products = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    products[r] = v @ v
    used = used + np.diag(np.maximum(np.diag(used), 0.01 * products) - np.diag(used))
    w = np.array([report.loss_weights[n] for n in report.names])
    np.testing.assert_allclose(w, loss_weights(used, "marble"), rtol=1e-4, atol=1e-8)
    assert report.weights["partial"] > 0.05  # it takes part
