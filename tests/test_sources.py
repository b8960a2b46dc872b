"""Gram sources: what each one measures, what it writes into ``p.grad``, and its errors.

Every source must write ``p.grad = Σ_k w_k ∇L_k (+ ∇extra)`` with the loss weights it
reports; what differs is the Gram matrix the weights come from (full gradients for exact
and exact-lean, gradients w.r.t. shared tensors for shared, gradients restricted to a
parameter subset for params). Expected values are computed here by hand with
``torch.autograd.grad`` and ``min_norm_weights``.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from marble_opt import MarbleOptimizer, min_norm_weights

torch.set_num_threads(1)

SOURCES = ("exact", "exact-lean", "shared", "params")
K = 3


class Net(nn.Module):
    """A trunk (two tanh layers) and K heads; ``shared`` is the trunk's output."""

    def __init__(self, k: int = K, d_in: int = 5, width: int = 7, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.l1 = nn.Linear(d_in, width)
        self.l2 = nn.Linear(width, width)
        self.heads = nn.ModuleList(nn.Linear(width, 2) for _ in range(k))
        self.double()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z = torch.tanh(self.l2(torch.tanh(self.l1(x))))
        losses = {f"obj{k}": ((h(z) - y[k]) ** 2).mean() * (k + 1) for k, h in enumerate(self.heads)}
        return z, losses


def batch(n: int = 6, k: int = K, d_in: int = 5, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=gen, dtype=torch.float64)
    base = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    # opposed targets: the objectives conflict, so the weights are not trivial
    y = torch.stack(
        [(-1.0) ** j * base + 0.3 * torch.randn(n, 2, generator=gen, dtype=torch.float64) for j in range(k)]
    )
    return x, y


def make_opt(model: Net, gram: str, **kwargs) -> MarbleOptimizer:
    if gram == "params":
        kwargs.setdefault("gram_params", list(model.l2.parameters()))
    kwargs.setdefault("ema_decay", 0.0)
    return MarbleOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), gram=gram, **kwargs)


def run(model: Net, opt: MarbleOptimizer, data, *, extra: bool = False):
    z, losses = model(*data)
    kwargs = {"shared": z} if opt.gram == "shared" else {}
    if extra:
        kwargs["extra"] = 0.05 * sum((p**2).sum() for p in model.parameters())
    return opt.backward(losses, **kwargs)


def flat_grad(model: nn.Module) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in model.parameters()])


def jac(loss_list, inputs) -> torch.Tensor:
    """K×N matrix of the gradients of each loss w.r.t. ``inputs`` (zeros where unused)."""
    rows = []
    for loss in loss_list:
        grads = torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat([(g if g is not None else torch.zeros_like(i)).reshape(-1) for g, i in zip(grads, inputs)])
        )
    return torch.stack(rows)


def as_array(d: dict[str, float]) -> np.ndarray:
    return np.array(list(d.values()))


def expected_weights(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(α*, w) for normalize="l2", rescale=True, ema_decay=0, from a raw Gram matrix."""
    norms = np.sqrt(np.diag(gram))
    alpha = min_norm_weights(gram / np.outer(norms, norms))
    return alpha, alpha * norms.mean() / norms


def combined_grad(model: Net, data, w: np.ndarray, extra: bool = False) -> torch.Tensor:
    _, losses = model(*data)
    total = sum(float(wk) * loss for wk, loss in zip(w, losses.values()))
    if extra:
        total = total + 0.05 * sum((p**2).sum() for p in model.parameters())
    grads = torch.autograd.grad(total, list(model.parameters()))
    return torch.cat([g.reshape(-1) for g in grads])


# ---- every source: the update is Σ w_k ∇L_k with the reported weights -------------------------


@pytest.mark.parametrize("gram", SOURCES)
def test_update_is_weighted_sum_of_gradients_with_reported_weights(gram):
    model, data = Net(), batch()
    opt = make_opt(model, gram)
    report = run(model, opt, data)
    w = as_array(report.loss_weights)
    assert report.solved and not report.skipped
    assert (w > 0).sum() >= 2, "the test problem must give a non-trivial combination"
    torch.testing.assert_close(flat_grad(model), combined_grad(model, data, w), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("gram", SOURCES)
def test_gram_is_the_products_of_the_gradients_the_source_names(gram):
    model, data = Net(), batch()
    opt = make_opt(model, gram)
    z, losses = model(*data)
    inputs = {
        "exact": list(model.parameters()),
        "exact-lean": list(model.parameters()),
        "shared": [z],
        "params": list(model.l2.parameters()),
    }[gram]
    j = jac(list(losses.values()), inputs)
    report = opt.backward(losses, shared=z) if gram == "shared" else opt.backward(losses)
    np.testing.assert_allclose(report.gram, (j @ j.T).numpy(), rtol=1e-12, atol=1e-15)
    alpha, w = expected_weights((j @ j.T).numpy())
    np.testing.assert_allclose(as_array(report.raw_weights), alpha, atol=1e-9)
    np.testing.assert_allclose(as_array(report.loss_weights), w, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("gram", SOURCES)
def test_update_accumulates_into_existing_grads_like_backward(gram):
    model, data = Net(), batch()
    opt = make_opt(model, gram)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)
    report = run(model, opt, data)
    expected = combined_grad(model, data, as_array(report.loss_weights)) + 0.25
    torch.testing.assert_close(flat_grad(model), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("gram", SOURCES)
def test_extra_is_added_after_balancing(gram):
    model, data = Net(), batch()
    ref = run(model, make_opt(model, gram), data)
    model.zero_grad(set_to_none=True)
    report = run(model, make_opt(model, gram), data, extra=True)
    # the weights ignore the extra term ...
    np.testing.assert_allclose(as_array(report.raw_weights), as_array(ref.raw_weights), atol=1e-12)
    np.testing.assert_allclose(as_array(report.loss_weights), as_array(ref.loss_weights), rtol=1e-12)
    np.testing.assert_allclose(report.gram, ref.gram, rtol=1e-12)
    # ... and its gradient is added to the balanced update with weight one
    w = as_array(report.loss_weights)
    torch.testing.assert_close(flat_grad(model), combined_grad(model, data, w, extra=True), rtol=1e-10, atol=1e-12)
    extra_only = combined_grad(model, data, np.zeros(K), extra=True)
    assert extra_only.norm() > 1e-3 * flat_grad(model).norm(), "extra must matter for this test to mean anything"


@pytest.mark.parametrize("gram", SOURCES)
def test_non_finite_gradient_skips_and_leaves_grads_untouched(gram):
    model, data = Net(), batch()
    opt = make_opt(model, gram)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    z, losses = model(*data)
    # finite value, infinite gradient (d/dz sqrt(z − z) at 0), on every source's path
    losses["obj1"] = losses["obj1"] + torch.sqrt(z[0, 0] - z[0, 0].detach())
    report = opt.backward(losses, shared=z) if gram == "shared" else opt.backward(losses)
    assert report.skipped
    for p in model.parameters():
        assert torch.equal(p.grad, torch.full_like(p, 0.5))


@pytest.mark.parametrize("gram", ["shared", "params"])
def test_non_finite_combined_gradient_outside_the_gram_skips_and_leaves_grads_untouched(gram):
    # the Gram is finite (the inf is upstream of the shared tensor / outside gram_params),
    # so only the combined backward sees it: p.grad must still come back as it was
    model, data = Net(), batch()
    opt = make_opt(model, gram)
    x, y = data
    for start in (None, 0.5):
        h = torch.tanh(model.l1(x))
        h = h + torch.sqrt(model.l1.bias.sum() - model.l1.bias.sum().detach())  # value +0, gradient inf in l1
        z = torch.tanh(model.l2(h))
        losses = {f"obj{k}": ((head(z) - y[k]) ** 2).mean() for k, head in enumerate(model.heads)}
        for p in model.parameters():
            p.grad = None if start is None else torch.full_like(p, start)
        report = opt.backward(losses, shared=z) if gram == "shared" else opt.backward(losses)
        assert report.skipped
        assert np.isfinite(report.gram).all() if report.gram is not None else True
        for p in model.parameters():
            assert p.grad is None if start is None else torch.equal(p.grad, torch.full_like(p, start))


# ---- shared: exact where theory says so ---------------------------------------------------------


class LastLayer(nn.Module):
    """Frozen trunk, one trainable linear layer; losses are non-linear functions of its output."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh()).requires_grad_(False)
        self.last = nn.Linear(6, 5)
        self.targets = torch.randn(K, 5)
        self.double()

    def forward(self, x):
        u = self.last(self.trunk(x))
        losses = {
            "mse": ((u - self.targets[0]) ** 2).sum(),
            "lse": torch.logsumexp(u * self.targets[1], dim=-1).sum(),
            "cos": (1.0 - torch.cosine_similarity(u, self.targets[2].expand_as(u), dim=-1)).sum(),
        }
        return u, losses


def _last_layer_step(model: LastLayer, x: torch.Tensor, gram: str, normalize: str):
    opt = MarbleOptimizer(
        torch.optim.SGD(model.last.parameters(), lr=0.1), gram=gram, ema_decay=0.0, normalize=normalize
    )
    model.zero_grad(set_to_none=True)
    u, losses = model(x)
    report = opt.backward(losses, shared=u) if gram == "shared" else opt.backward(losses)
    return report, flat_grad(model.last)


@pytest.mark.parametrize("normalize", ["l2", "none", "loss"])
def test_shared_is_exact_for_one_sample_and_only_the_last_layer_trainable(normalize):
    # ∇_W L_k = u_k hᵀ and ∇_b L_k = u_k (u_k = ∂L_k/∂u), so G_exact = (‖h‖² + 1)·G_shared:
    # the same weights (the QP, the l2/loss scales and the rescale are all scale-free)
    model = LastLayer()
    x = torch.randn(1, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    shared, g_shared = _last_layer_step(model, x, "shared", normalize)
    exact, g_exact = _last_layer_step(model, x, "exact", normalize)
    h = model.trunk(x)
    np.testing.assert_allclose(exact.gram, (h.norm() ** 2 + 1).item() * shared.gram, rtol=1e-10)
    assert (as_array(exact.raw_weights) > 1e-3).sum() >= 2, "non-trivial weights needed"
    np.testing.assert_allclose(as_array(shared.raw_weights), as_array(exact.raw_weights), atol=1e-9)
    np.testing.assert_allclose(as_array(shared.loss_weights), as_array(exact.loss_weights), rtol=1e-8)
    torch.testing.assert_close(g_shared, g_exact, rtol=1e-8, atol=1e-12)


def test_shared_differs_from_exact_beyond_the_theory():
    # the identity above is not vacuous: with two samples G_exact is no multiple of G_shared
    model = LastLayer()
    x = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    shared, _ = _last_layer_step(model, x, "shared", "l2")
    exact, _ = _last_layer_step(model, x, "exact", "l2")
    assert np.abs(as_array(shared.raw_weights) - as_array(exact.raw_weights)).max() > 1e-3


def test_shared_accepts_a_list_of_tensors_and_sums_their_grams():
    model, data = Net(), batch()
    x, y = data
    h = torch.tanh(model.l1(x))
    z = torch.tanh(model.l2(h))
    losses = {
        f"obj{k}": ((head(z) - y[k]) ** 2).mean() + 0.1 * (h[:, k] ** 2).mean() for k, head in enumerate(model.heads)
    }
    j = jac(list(losses.values()), [z, h])
    report = make_opt(model, "shared").backward(losses, shared=[z, h])
    np.testing.assert_allclose(report.gram, (j @ j.T).numpy(), rtol=1e-12)


# ---- params: the min-norm weights of the named parameters' own gradients ------------------------


def test_params_weights_are_min_norm_of_the_named_parameters_gradients():
    model, data = Net(), batch()
    subset = [model.l2.weight, model.heads[0].bias]
    opt = make_opt(model, "params", gram_params=subset)
    _, losses = model(*data)
    j = jac(list(losses.values()), subset)
    report = opt.backward(losses)
    gram = (j @ j.T).numpy()
    alpha, w = expected_weights(gram)
    np.testing.assert_allclose(report.gram, gram, rtol=1e-12)
    np.testing.assert_allclose(as_array(report.raw_weights), alpha, atol=1e-9)
    np.testing.assert_allclose(as_array(report.loss_weights), w, rtol=1e-8)
    # the update covers ALL parameters, not just the subset
    full = combined_grad(model, data, w)
    torch.testing.assert_close(flat_grad(model), full, rtol=1e-8, atol=1e-12)
    assert model.l1.weight.grad is not None and model.l1.weight.grad.abs().max() > 0


# ---- exact-lean == exact ---------------------------------------------------------------------


@pytest.mark.parametrize("extra", [False, True])
def test_exact_lean_gives_the_same_gram_weights_and_update_as_exact(extra):
    results = {}
    for gram in ("exact", "exact-lean"):
        model = Net()
        opt = make_opt(model, gram, ema_decay=0.7)
        for s in range(3):  # a few real steps, so the smoothed weights and parameters move
            opt.zero_grad()
            run(model, opt, batch(seed=20 + s), extra=extra)
            opt.step()
        opt.zero_grad()
        report = run(model, opt, batch(), extra=extra)
        results[gram] = (report, flat_grad(model))
    (r1, g1), (r2, g2) = results["exact"], results["exact-lean"]
    np.testing.assert_allclose(r2.gram, r1.gram, rtol=1e-12)
    np.testing.assert_allclose(as_array(r2.raw_weights), as_array(r1.raw_weights), atol=1e-12)
    np.testing.assert_allclose(as_array(r2.weights), as_array(r1.weights), atol=1e-12)
    torch.testing.assert_close(g2, g1, rtol=1e-10, atol=1e-12)


def test_exact_lean_works_in_float32():
    results = {}
    for gram in ("exact", "exact-lean"):
        model = Net().float()
        x, y = batch()
        opt = make_opt(model, gram)
        _, losses = model(x.float(), y.float())
        report = opt.backward(losses)
        results[gram] = (report, flat_grad(model))
    np.testing.assert_allclose(results["exact-lean"][0].gram, results["exact"][0].gram, rtol=1e-6)
    torch.testing.assert_close(results["exact-lean"][1], results["exact"][1], rtol=1e-5, atol=1e-7)


# ---- refresh_every ---------------------------------------------------------------------------


class CountBackward(torch.autograd.Function):
    """Identity that counts how often the backward crosses it."""

    calls = 0

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        CountBackward.calls += 1
        return g


@pytest.mark.parametrize("gram", SOURCES)
def test_refresh_every_solves_every_n_steps_and_reuses_the_cached_weights(gram):
    n = 3
    model = Net()
    opt = make_opt(model, gram, refresh_every=n, ema_decay=0.5)
    last_solved = None
    for step in range(2 * n + 2):
        data = batch(seed=10 + step)
        opt.zero_grad()
        x, y = data
        z = CountBackward.apply(torch.tanh(model.l2(torch.tanh(model.l1(x)))))
        losses = {f"obj{k}": ((h(z) - y[k]) ** 2).mean() * (k + 1) for k, h in enumerate(model.heads)}
        CountBackward.calls = 0
        report = opt.backward(losses, shared=z) if gram == "shared" else opt.backward(losses)
        w = as_array(report.loss_weights)
        if step % n == 0:
            assert report.solved and report.solver_status != "cached", step
            assert report.gram is not None
            # K passes cross the trunk (none for shared: they stop at z), then one combined pass
            assert CountBackward.calls == {"exact": K, "exact-lean": K + 1, "shared": 1, "params": K + 1}[gram]
            last_solved = w
        else:
            assert not report.solved and report.solver_status == "cached", step
            assert report.gram is None and report.raw_weights == {}
            assert CountBackward.calls == 1, "a cached step runs exactly one backward through the trunk"
            np.testing.assert_array_equal(w, last_solved)
        torch.testing.assert_close(flat_grad(model), combined_grad(model, data, w), rtol=1e-10, atol=1e-12)
        opt.step()


def test_refresh_every_uses_the_smoothed_weights_between_solves():
    model = Net()
    opt = make_opt(model, "exact", refresh_every=2, ema_decay=0.5)
    alphas = []
    for step in range(4):
        report = run(model, opt, batch(seed=step))
        opt.step()
        if step % 2 == 0:
            alphas.append(as_array(report.raw_weights))
            np.testing.assert_allclose(as_array(opt.weights), as_array(report.weights), atol=1e-12)
        else:  # the cached step applies the committed EMA, unchanged
            np.testing.assert_allclose(as_array(report.weights), as_array(opt.weights), atol=1e-12)
    np.testing.assert_allclose(as_array(opt.weights), 0.5 * alphas[0] + 0.5 * alphas[1], atol=1e-12)


# ---- errors ----------------------------------------------------------------------------------


def _losses(model, data):
    return model(*data)


def test_shared_source_without_shared_tensor():
    model, data = Net(), batch()
    z, losses = _losses(model, data)
    with pytest.raises(ValueError, match=r"gram='shared' needs the shared tensor.*shared=z"):
        make_opt(model, "shared").backward(losses)
    assert all(p.grad is None for p in model.parameters())


def test_shared_tensor_not_on_the_graph():
    model, data = Net(), batch()
    z, losses = _losses(model, data)
    stranger = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match=r"shared\[0\] \(shape \(3, 4\)\) is not on the graph of any loss"):
        make_opt(model, "shared").backward(losses, shared=stranger)
    recomputed = torch.tanh(model.l2(torch.tanh(model.l1(data[0]))))  # same values, another graph
    with pytest.raises(ValueError, match=r"shared\[1\].*not on the graph of any loss"):
        make_opt(model, "shared").backward(losses, shared=[z, recomputed])
    assert all(p.grad is None for p in model.parameters())


def test_shared_tensor_that_does_not_require_grad():
    model, data = Net(), batch()
    z, losses = _losses(model, data)
    with pytest.raises(ValueError, match=r"shared\[0\] \(shape \(6, 7\)\) does not require grad.*detached"):
        make_opt(model, "shared").backward(losses, shared=z.detach())


def test_loss_that_does_not_depend_on_the_shared_tensor():
    model, data = Net(), batch()
    z, losses = _losses(model, data)
    losses["bypass"] = (model.l1.weight**2).sum()
    with pytest.raises(ValueError, match=r"loss 'bypass' has no path to the shared tensor"):
        make_opt(model, "shared").backward(losses, shared=z)
    assert all(p.grad is None for p in model.parameters())


def test_shared_given_to_a_source_that_does_not_use_it():
    for gram in ("exact", "exact-lean", "params"):
        model, data = Net(), batch()
        z, losses = _losses(model, data)
        with pytest.raises(ValueError, match=rf"shared= is only used by gram='shared'.*gram='{gram}'"):
            make_opt(model, gram).backward(losses, shared=z)
        assert all(p.grad is None for p in model.parameters())


def test_params_source_without_gram_params():
    model = Net()
    with pytest.raises(ValueError, match=r"gram='params' needs gram_params"):
        MarbleOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), gram="params")


def test_params_source_with_empty_gram_params():
    model = Net()
    with pytest.raises(ValueError, match=r"gram_params is empty"):
        MarbleOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), gram="params", gram_params=[])


def test_params_source_with_a_tensor_outside_the_optimizer():
    model = Net()
    outsider = nn.Parameter(torch.zeros(2, 3))
    with pytest.raises(
        ValueError, match=r"gram_params\[1\] \(shape \(2, 3\)\) is not a parameter of the wrapped optimizer"
    ):
        MarbleOptimizer(
            torch.optim.SGD(model.l2.parameters(), lr=0.1), gram="params", gram_params=[model.l2.weight, outsider]
        )
    with pytest.raises(ValueError, match=r"gram_params\[0\].*is not a parameter of the wrapped optimizer"):
        MarbleOptimizer(torch.optim.SGD(model.l2.parameters(), lr=0.1), gram="params", gram_params=[model.l1.weight])


def test_params_source_loss_that_misses_the_named_parameters():
    model, data = Net(), batch()
    z, losses = _losses(model, data)
    opt = make_opt(model, "params", gram_params=list(model.heads[0].parameters()))
    with pytest.raises(ValueError, match=r"loss 'obj1' has no path to any of gram_params"):
        opt.backward(losses)


def test_gram_params_given_to_another_source_and_unknown_source():
    model = Net()
    with pytest.raises(ValueError, match=r"gram_params is only used with gram='params', not gram='exact'"):
        MarbleOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), gram="exact", gram_params=[model.l1.weight])
    with pytest.raises(ValueError, match=r"gram must be one of .* got 'fast'"):
        MarbleOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), gram="fast")


@pytest.mark.parametrize("gram", SOURCES)
def test_scratch_buffers_are_reused_but_not_copied(gram):
    model, data = Net(), batch()
    opt = make_opt(model, gram)
    run(model, opt, data)
    opt.step()
    held = {k: v for k, v in vars(opt.source).items() if isinstance(v, torch.Tensor)}
    run(model, opt, batch(seed=5))  # same shapes: the same buffers, no new allocation
    for key, tensor in held.items():
        assert getattr(opt.source, key) is tensor, key
    model2, opt2 = copy.deepcopy((model, opt))  # a copy (or pickle) leaves the scratch space behind
    assert not any(isinstance(v, torch.Tensor) for v in vars(opt2.source).values())
    opt.zero_grad()
    opt2.zero_grad()
    r1, r2 = run(model, opt, data), run(model2, opt2, data)
    np.testing.assert_allclose(as_array(r2.loss_weights), as_array(r1.loss_weights), rtol=1e-12)
    torch.testing.assert_close(flat_grad(model2), flat_grad(model))


class EmbeddingNet(nn.Module):
    """A sparse (or dense) embedding, a tanh trunk and two heads."""

    def __init__(self, sparse: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 4, sparse=sparse)
        self.trunk = nn.Linear(4, 4)
        self.heads = nn.Linear(4, 2)

    def forward(self, idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z = torch.tanh(self.trunk(self.emb(idx)))
        out = self.heads(z)
        return z, {"a": (out[:, 0] - 1.0).pow(2).mean(), "b": (out[:, 1] + 1.0).pow(2).mean()}


@pytest.mark.parametrize("gram", SOURCES)
@pytest.mark.parametrize("existing_grads", [False, True])
def test_sparse_gradients_are_refused_by_name_before_anything_changes(gram, existing_grads):
    model = EmbeddingNet(sparse=True)
    kw = {"gram_params": list(model.trunk.parameters())} if gram == "params" else {}
    opt = MarbleOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), gram=gram, **kw)
    if existing_grads:
        for p in model.parameters():
            p.grad = torch.full_like(p, 0.5)
    before = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    z, losses = model(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"parameter #0 \(shape \(10, 4\)\) a sparse gradient .*sparse=False"):
        opt.backward(losses, **({"shared": z} if gram == "shared" else {}))
    for p, g in zip(model.parameters(), before):
        assert (p.grad is None and g is None) or (p.grad.layout == torch.strided and torch.equal(p.grad, g))
    # the same model with a dense embedding trains
    dense = EmbeddingNet(sparse=False)
    kw = {"gram_params": list(dense.trunk.parameters())} if gram == "params" else {}
    opt = MarbleOptimizer(torch.optim.SGD(dense.parameters(), lr=0.1), gram=gram, **kw)
    z, losses = dense(torch.tensor([1, 2, 3]))
    assert not opt.step(losses, **({"shared": z} if gram == "shared" else {})).skipped


def test_shared_under_torch_compile_of_the_whole_model_points_the_right_way():
    """``torch.compile`` of a model returning ``(z, heads(z))``: the returned z is a graph
    output, not the heads' input, so the losses do not reach it. The error says so and how
    to fix it; compiling the trunk and the heads separately works."""

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.trunk, self.heads = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x):
            z = torch.tanh(self.trunk(x))
            return z, self.heads(z)

    model = Model()
    opt = MarbleOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), gram="shared")
    x = torch.randn(8, 4)
    z, out = torch.compile(model, backend="aot_eager")(x)
    losses = {"a": out[:, 0].pow(2).mean(), "b": out[:, 1].pow(2).mean()}
    with pytest.raises(ValueError, match=r"not on the graph of any loss") as err:
        opt.backward(losses, shared=z)
    message = str(err.value)
    assert "the losses were computed from" in message and "compile the trunk and the heads separately" in message
    assert "gram='params' or 'exact'" in message and "trunk's output" not in message
    z = torch.tanh(model.trunk(x))  # the fix: z is the heads' input
    out = torch.compile(model.heads, backend="aot_eager")(z)
    report = opt.backward({"a": out[:, 0].pow(2).mean(), "b": out[:, 1].pow(2).mean()}, shared=z)
    assert not report.skipped and report.gram is not None


@pytest.mark.parametrize("rowwise", [True, False], ids=["upper-triangle", "matrix-product"])
@pytest.mark.parametrize("k", [1, 3, 7])
def test_the_gram_workspace_is_exact_symmetric_and_does_not_overflow_near_the_float64_maximum(
    monkeypatch, rowwise: bool, k: int
) -> None:
    """Both ways of forming G (CPU upper triangle, one matrix product per block) give the
    float64 products over several column blocks, exactly symmetric; entries near float64's
    largest value stay finite (``(G + Gᵀ)/2`` would overflow there)."""
    from marble_opt._src import sources

    monkeypatch.setattr(sources, "_GRAM_ROWWISE_MAX_K", 16 if rowwise else 0)
    monkeypatch.setattr(sources, "_GRAM_BLOCK_BYTES", {"cpu": 8 * k * 1024})  # 1024 columns a block
    gen = torch.Generator().manual_seed(k)
    rows = torch.randn(k, 5000, generator=gen)  # 5 blocks, the last one partial
    g, carried = sources._GramWorkspace().gram(rows, carry=torch.arange(3.0, dtype=torch.float64))
    exact = rows.double() @ rows.double().T
    np.testing.assert_allclose(g, exact.numpy(), rtol=0, atol=1e-12 * float(exact.trace()))
    assert np.array_equal(g, g.T)
    assert carried.tolist() == [0.0, 1.0, 2.0]
    # float64 rows (multiplied in place) whose products approach float64's maximum
    big = torch.full((k, 4), 6.0e153, dtype=torch.float64)
    g_big, _ = sources._GramWorkspace().gram(big)
    assert np.isfinite(g_big).all()
    np.testing.assert_allclose(g_big, np.full((k, k), 4 * 6.0e153**2), rtol=1e-15)
