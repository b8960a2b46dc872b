"""Issue 11, items 4, 7 and 8: complex parameters, exclusion on cached steps, a parameter
listed twice. Each test failed on the code before the fix (noted per test)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from marble_opt import MarbleOptimizer, min_norm_weights


def marble_weights(gram: np.ndarray) -> np.ndarray:
    """MARBLE's per-loss weights at ρ=0 by hand: α on the unit-normalised Gram, rescaled."""
    norms = np.sqrt(np.diag(gram))
    alpha = min_norm_weights(gram / np.outer(norms, norms))
    return alpha * norms.mean() / norms


def complex_losses(z: torch.Tensor, w: torch.Tensor) -> dict[str, torch.Tensor]:
    a = torch.tensor([1.0, -2.0, 0.5])
    b = torch.tensor([-1.0, 0.5, 2.0])
    return {
        "p": ((z.imag - a) ** 2).sum() + (w**2).sum(),
        "q": ((z.imag - b) ** 2).sum() + 0.1 * (z.real * 0.0).sum() + (w * 0.3).sum(),
    }


@pytest.mark.parametrize("gram", ["exact", "exact-lean", "params"])
def test_complex_parameters_use_the_real_inner_product(gram: str) -> None:
    """Before: the imaginary parts were dropped, purely imaginary gradients looked like zero
    and every step was skipped."""
    z = nn.Parameter(torch.zeros(3, dtype=torch.complex64))
    w = nn.Parameter(torch.zeros(2))
    kwargs = {"gram_params": [z]} if gram == "params" else {}
    opt = MarbleOptimizer(torch.optim.SGD([z, w], lr=0.1), gram=gram, ema_decay=0.0, **kwargs)
    losses = complex_losses(z, w)
    params = [z] if gram == "params" else [z, w]
    rows = []
    for loss in losses.values():
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        rows.append(torch.cat([torch.view_as_real(g).reshape(-1) if g.is_complex() else g for g in grads]))
    j = torch.stack(rows).double().numpy()
    assert np.abs(j[:, 0:6:2]).max() == 0.0  # the z part is purely imaginary
    report = opt.backward(losses)
    assert not report.skipped
    np.testing.assert_allclose(report.gram, j @ j.T, rtol=1e-6)
    wts = marble_weights(j @ j.T)
    np.testing.assert_allclose([report.loss_weights[n] for n in report.names], wts, rtol=1e-6)
    full = [torch.autograd.grad(v, [z, w], retain_graph=True) for v in complex_losses(z, w).values()]
    want_z = sum(float(c) * g[0] for c, g in zip(wts, full))
    torch.testing.assert_close(z.grad, want_z)
    assert z.grad.dtype == torch.complex64 and z.grad.imag.abs().max() > 0


def test_a_nonfinite_gradient_on_a_cached_step_excludes_that_objective() -> None:
    """Before: nonfinite="exclude" with refresh_every=2 skipped the whole cached step and
    left report.reason empty."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randn(8, 3)

    def losses() -> dict[str, torch.Tensor]:
        out = model(x)
        return {n: ((out[:, i] - y[:, i]) ** 2).mean() for i, n in enumerate(("a", "b", "c"))}

    opt = MarbleOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), refresh_every=2, nonfinite="exclude", ema_decay=0.0
    )
    opt.zero_grad()
    opt.step(losses())
    cached = dict(zip(opt.names, opt._loss_weights))
    alpha = opt.weights
    bad = losses()
    bad["c"] = bad["c"] + torch.sqrt(0.0 * model.weight.sum())  # finite value, NaN gradient
    assert torch.isfinite(bad["c"])
    opt.zero_grad()
    report = opt.backward(bad)
    assert not report.skipped and not report.solved
    assert report.excluded == ("c",)
    assert "'c'" in report.reason and "non-finite gradient" in report.reason
    kept = alpha["a"] + alpha["b"]
    clean = losses()
    want = torch.autograd.grad(sum(cached[n] / kept * clean[n] for n in ("a", "b")), list(model.parameters()))
    for p, g in zip(model.parameters(), want):
        torch.testing.assert_close(p.grad, g)
        assert torch.isfinite(p.grad).all()


def test_the_exclusion_reason_names_the_objective_on_a_solve_step() -> None:
    model = nn.Linear(4, 2)
    x = torch.randn(6, 4)
    opt = MarbleOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), nonfinite="exclude")
    out = model(x)
    report = opt.backward({"a": out[:, 0].pow(2).mean(), "b": out[:, 1].mean() * float("nan")})
    assert report.excluded == ("b",) and "'b'" in report.reason and "non-finite loss" in report.reason


@pytest.mark.parametrize("gram", ["exact", "exact-lean", "params"])
def test_a_parameter_listed_twice_gets_its_gradient_once(gram: str) -> None:
    """Before: gram="exact" doubled its gradient (and G), exact-lean did not."""
    torch.manual_seed(1)
    model = nn.Linear(4, 2)
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    params = [model.weight, model.bias, model.weight]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns about the duplicate
        base = torch.optim.SGD(params, lr=0.1)
    kwargs = {"gram_params": [model.weight, model.weight]} if gram == "params" else {}
    opt = MarbleOptimizer(base, gram=gram, ema_decay=0.0, **kwargs)
    out = model(x)
    losses = {"a": ((out[:, 0] - y[:, 0]) ** 2).mean(), "b": (out[:, 1] - y[:, 1]).abs().mean()}
    uniq = [model.weight, model.bias] if gram != "params" else [model.weight]
    rows = []
    for loss in losses.values():
        g = torch.autograd.grad(loss, uniq, retain_graph=True)
        rows.append(torch.cat([t.reshape(-1) for t in g]))
    j = torch.stack(rows).double().numpy()
    report = opt.backward(losses)
    np.testing.assert_allclose(report.gram, j @ j.T, rtol=1e-5)
    w = [report.loss_weights[n] for n in report.names]
    out = model(x)
    again = {"a": ((out[:, 0] - y[:, 0]) ** 2).mean(), "b": (out[:, 1] - y[:, 1]).abs().mean()}
    want = torch.autograd.grad(w[0] * again["a"] + w[1] * again["b"], [model.weight, model.bias])
    torch.testing.assert_close(model.weight.grad, want[0])
    torch.testing.assert_close(model.bias.grad, want[1])
