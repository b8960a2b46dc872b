"""MarbleOptimizer: integration with torch.optim, the balancing maths, state and bad input.

Every expected value is computed independently here: per-objective gradients with
``torch.autograd.grad``, Gram matrices by hand, weights with ``min_norm_weights`` on the
hand-scaled Gram, plain AdamW runs for comparison.
"""

from __future__ import annotations

import copy
import io
import math
import pickle
import warnings

import numpy as np
import pytest
import torch
from _models import TrunkHeads
from torch import nn

from marble_opt import BalanceReport, MarbleOptimizer, min_norm_weights

# ---- a small multi-task model and three objectives on different scales -----------------


_GEN = torch.Generator().manual_seed(1234)
X = torch.randn(48, 5, generator=_GEN)
T = torch.randn(48, 3, generator=_GEN)


def make_model(seed: int = 0) -> TrunkHeads:
    """A shared trunk and three linear heads; ``model(x)`` returns ``(features, heads)``."""
    torch.manual_seed(seed)
    return TrunkHeads(d_in=5, width=8)


def first_head(model: TrunkHeads, x: torch.Tensor = X) -> torch.Tensor:
    """The first head's outputs (B,)."""
    return model(x)[1][0]


def objectives(model: nn.Module, x: torch.Tensor = X) -> dict[str, torch.Tensor]:
    """Three positive losses on scales 1e2, 1 and 1e-2."""
    _, (ya, yb, yc) = model(x)
    return {
        "big": 100.0 * ((ya - T[: len(x), 0]) ** 2).mean(),
        "mid": (yb - T[: len(x), 1]).abs().mean(),
        "small": 0.01 * ((yc - T[: len(x), 2] + ya) ** 2).mean(),
    }


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def hand_grads(losses: dict[str, torch.Tensor], params: list[torch.Tensor]) -> torch.Tensor:
    """K×N matrix of per-objective gradients (float32), graphs kept."""
    rows = []
    for loss in losses.values():
        gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(gs, params)]))
    return torch.stack(rows)


def flat_grad(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1) for p in params])


def snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[list[torch.Tensor], dict]:
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict())


def assert_same_tree(a, b) -> None:
    """Equal nested dicts/lists of tensors and scalars, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same_tree(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_tree(x, y)
    else:
        assert a == b


def assert_same_params(m1: nn.Module, m2: nn.Module) -> None:
    for (name, p), q in zip(m1.named_parameters(), m2.parameters()):
        assert torch.equal(p, q), f"{name} differs by {(p - q).abs().max().item():.3g}"


def cosine(u: torch.Tensor, v: torch.Tensor) -> float:
    u, v = u.double(), v.double()
    return float(u @ v / (u.norm() * v.norm()))


# ---- a torch.optim.Optimizer sharing the wrapped optimizer's objects --------------------


def test_is_an_optimizer_that_shares_the_wrapped_objects() -> None:
    model = make_model()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt = MarbleOptimizer(inner)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is inner.param_groups
    assert opt.state is inner.state
    assert opt.defaults is inner.defaults
    for _ in range(2):
        opt.zero_grad()
        opt.step(objectives(model))
    assert opt.state is inner.state and len(inner.state) == len(params_of(model))

    # load_state_dict replaces the wrapped optimizer's objects: still the same ones.
    sd = opt.state_dict()
    inner2 = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt2 = MarbleOptimizer(inner2)
    old_groups, old_state = inner2.param_groups, inner2.state
    opt2.load_state_dict(sd)
    assert opt2.param_groups is inner2.param_groups
    assert opt2.state is inner2.state
    assert opt2.defaults is inner2.defaults
    assert inner2.state is not old_state or inner2.param_groups is not old_groups  # really replaced
    assert len(inner2.state) == len(params_of(model))
    # No wrapper state leaks into the wrapped optimizer's per-parameter state.
    assert all(set(s) == {"step", "exp_avg", "exp_avg_sq"} for s in inner2.state.values())

    # Setters write through; add_param_group lands in the wrapped optimizer.
    extra = nn.Parameter(torch.zeros(3))
    opt2.add_param_group({"params": [extra], "lr": 0.5})
    assert inner2.param_groups[-1]["params"] == [extra] and opt2.param_groups is inner2.param_groups
    opt2.defaults = {"lr": 0.25}
    assert inner2.defaults == {"lr": 0.25}


# ---- the headline behaviour: AdamW on the sum leaves the small objective behind ----------


class Bottleneck(nn.Module):
    """Two-unit trunk; outputs on scales 100 and 0.01 (one per objective)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(6, 2), nn.Tanh())
        self.head_a = nn.Linear(2, 1)
        self.head_b = nn.Linear(2, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(x)
        return 100.0 * self.head_a(h).squeeze(-1), 0.01 * self.head_b(h).squeeze(-1)


def _multitask_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1001)
    x = torch.randn(256, 6, generator=g)
    t_a = 100.0 * torch.tanh(x[:, 0] + 0.5 * x[:, 1])
    t_b = 0.01 * torch.tanh(x[:, 2] - x[:, 3])
    specialists = torch.arange(256) < 64  # objective b is measured on its 64 specialist samples
    return x, t_a, t_b, specialists


def _multitask_losses(model: Bottleneck, data) -> dict[str, torch.Tensor]:
    x, t_a, t_b, spec = data
    ya, yb = model(x)
    return {"a": ((ya - t_a) ** 2).mean(), "b": ((yb[spec] - t_b[spec]) ** 2).mean()}


def _train(marble: bool, steps: int = 300) -> dict[str, float]:
    torch.manual_seed(1)
    model = Bottleneck()
    data = _multitask_data()
    inner = torch.optim.AdamW(model.parameters(), lr=0.03)
    opt = MarbleOptimizer(inner) if marble else inner
    with torch.no_grad():
        start = {k: v.item() for k, v in _multitask_losses(model, data).items()}
    for _ in range(steps):
        opt.zero_grad()
        losses = _multitask_losses(model, data)
        if marble:
            opt.step(losses)
        else:
            sum(losses.values()).backward()
            opt.step()
    with torch.no_grad():
        end = {k: v.item() for k, v in _multitask_losses(model, data).items()}
    return {k: end[k] / start[k] for k in start}


def test_marble_improves_every_objective_where_the_sum_does_not() -> None:
    summed = _train(marble=False)
    marble = _train(marble=True)
    # Summed loss: the large-scale objective is solved, the small-scale one is left behind.
    assert summed["a"] < 1e-2
    assert summed["b"] > 0.5, summed
    # MARBLE on the same model, data, optimizer and steps: both are solved.
    assert marble["a"] < 1e-2, marble
    assert marble["b"] < 1e-2, marble
    assert marble["b"] < 0.01 * summed["b"]


# ---- the balancing maths, checked against hand computations -------------------------------


def test_report_gram_norms_and_cosines_match_autograd() -> None:
    model = make_model()
    opt = MarbleOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), ema_decay=0.0)
    losses = objectives(model)
    grads = hand_grads(losses, params_of(model)).double()
    gram = (grads @ grads.T).numpy()
    report = opt.backward(losses)
    assert isinstance(report, BalanceReport)
    assert report.names == ("big", "mid", "small")
    np.testing.assert_allclose(report.gram, gram, rtol=1e-12, atol=1e-12 * np.trace(gram))
    norms = grads.norm(dim=1).numpy()
    np.testing.assert_allclose([report.grad_norms[n] for n in report.names], norms, rtol=1e-12)
    np.testing.assert_allclose(report.cosine, gram / np.outer(norms, norms), atol=1e-12)
    assert report.losses == {k: pytest.approx(v.item(), rel=1e-7) for k, v in losses.items()}
    assert report.solved and not report.skipped and report.excluded == ()


def test_report_derived_fields_are_computed_on_access_from_the_steps_own_matrices() -> None:
    """cosine, grad_norms, update_cosine and mean_cosine are filled when first read: the same
    values whenever they are read (after later steps too), frozen, in ``to_dict()`` and kept
    by ``dataclasses.replace``."""
    import dataclasses
    import json

    from marble_opt._src.balance import cosine_matrix, update_cosines

    model = make_model(3)
    opt = MarbleOptimizer(torch.optim.SGD(params_of(model), lr=0.1), ema_decay=0.0)
    reports = []
    for _ in range(3):
        opt.zero_grad()
        reports.append(opt.step(objectives(model)))
    first = reports[0]  # read only now, two steps later
    norms = np.sqrt(np.diag(first.gram))
    w = np.array([first.loss_weights[n] for n in first.names])
    np.testing.assert_array_equal(first.cosine, cosine_matrix(first.gram, norms))
    assert first.grad_norms == dict(zip(first.names, norms.tolist()))
    assert first.update_cosine == dict(zip(first.names, update_cosines(first.gram, w, norms).tolist()))
    assert first.cosine is first.cosine  # computed once
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.cosine = None  # type: ignore[misc]
    later = reports[2]
    copy_ = dataclasses.replace(later, reason="x")
    np.testing.assert_array_equal(copy_.cosine, later.cosine)
    assert copy_.mean_cosine == later.mean_cosine and copy_.reason == "x"
    d = json.loads(json.dumps(later.to_dict()))
    assert d["cosine"] == later.cosine.tolist() and d["update_cosine"] == later.update_cosine
    assert [f.name for f in dataclasses.fields(BalanceReport)][5:10] == [
        "gram",
        "cosine",
        "grad_norms",
        "update_cosine",
        "mean_cosine",
    ]


def test_update_cosine_is_equal_and_positive_for_active_objectives() -> None:
    model = make_model(3)
    params = params_of(model)
    opt = MarbleOptimizer(torch.optim.SGD(params, lr=0.1), ema_decay=0.0)
    for step in range(4):
        opt.zero_grad()
        losses = objectives(model)
        grads = hand_grads(losses, params)
        report = opt.backward(losses)
        d = flat_grad(params)
        alpha = np.array([report.weights[n] for n in report.names])
        cos_update = np.array([report.update_cosine[n] for n in report.names])
        # The reported cosines are those of the update actually written to p.grad ...
        actual = np.array([cosine(d, g) for g in grads])
        np.testing.assert_allclose(cos_update, actual, atol=1e-6)
        # ... equal for every objective with α_k > 0, at least as large elsewhere, positive.
        active = alpha > 1e-9
        assert active.any()
        assert cos_update.min() > 0.0
        assert np.ptp(cos_update[active]) < 1e-6, (step, cos_update, alpha)
        assert (cos_update[~active] >= cos_update[active].min() - 1e-6).all()
        # mean_cosine: cosine of the plain mean of the raw gradients with each gradient.
        mean = grads.mean(dim=0)
        expected_mean = np.array([cosine(mean, g) for g in grads])
        np.testing.assert_allclose([report.mean_cosine[n] for n in report.names], expected_mean, atol=1e-9)
        assert report.worst_update_cosine == pytest.approx(cos_update.min())
        assert report.worst_mean_cosine == pytest.approx(expected_mean.min())
        opt.step()


def test_gradient_is_the_weighted_sum_and_accumulates() -> None:
    model = make_model(1)
    params = params_of(model)
    opt = MarbleOptimizer(torch.optim.SGD(params, lr=0.1), ema_decay=0.0)
    losses = objectives(model)
    grads = hand_grads(losses, params).double()
    # Something already in p.grad (another loss, an earlier micro-batch) is kept.
    prior = [torch.randn_like(p) for p in params]
    for p, g in zip(params, prior):
        p.grad = g.clone()
    report = opt.backward(losses)
    w = torch.tensor([report.loss_weights[n] for n in report.names], dtype=torch.float64)
    expected = torch.cat([g.reshape(-1) for g in prior]).double() + w @ grads
    torch.testing.assert_close(flat_grad(params).double(), expected, rtol=1e-5, atol=1e-6)
    # SPEC: w_k = α_k · mean‖g‖ / ‖g_k‖ for normalize="l2" with rescale.
    alpha = np.array([report.weights[n] for n in report.names])
    norms = grads.norm(dim=1).numpy()
    np.testing.assert_allclose(w.numpy(), alpha * norms.mean() / norms, rtol=1e-10)
    np.testing.assert_allclose(alpha.sum(), 1.0, atol=1e-12)


@pytest.mark.parametrize("normalize", ["l2", "none", "loss", "loss+l2"])
def test_normalisations_give_the_spec_weights(normalize: str) -> None:
    model = make_model(2)
    params = params_of(model)
    opt = MarbleOptimizer(torch.optim.SGD(params, lr=0.1), ema_decay=0.0, normalize=normalize)
    losses = objectives(model)
    values = np.array([v.item() for v in losses.values()])
    grads = hand_grads(losses, params).double()
    gram = (grads @ grads.T).numpy()
    norms = np.sqrt(np.diag(gram))
    scale = {"l2": 1 / norms, "none": np.ones(3), "loss": 1 / values, "loss+l2": 1 / (values * norms)}[normalize]
    expected_alpha = min_norm_weights(gram * np.outer(scale, scale))
    report = opt.backward(losses)
    alpha = np.array([report.raw_weights[n] for n in report.names])
    np.testing.assert_allclose(alpha, expected_alpha, atol=1e-7)
    np.testing.assert_allclose([report.weights[n] for n in report.names], alpha, atol=1e-15)
    # d = m · Σ α_k ĝ_k with m = mean‖g_k‖ / mean‖ĝ_k‖ (for "l2": mean‖g_k‖, the SPEC's).
    m = norms.mean() / (scale * norms).mean()
    w = np.array([report.loss_weights[n] for n in report.names])
    np.testing.assert_allclose(w, alpha * scale * m, rtol=1e-6)
    d = flat_grad(params).double()
    torch.testing.assert_close(d, torch.from_numpy(w) @ grads, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d.norm(), (torch.from_numpy(alpha * scale) @ grads).norm() * m, rtol=1e-5, atol=0)


def test_loss_normalisation_rejects_a_non_positive_loss() -> None:
    model = make_model()
    opt = MarbleOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), normalize="loss")
    losses = objectives(model)
    losses["mid"] = losses["mid"] - 100.0
    with pytest.raises(ValueError, match=r"loss 'mid' = -9\d\.\d+ is not positive"):
        opt.backward(losses)


def test_single_objective_is_plain_training() -> None:
    plain, wrapped = make_model(4), make_model(4)
    adam = torch.optim.AdamW(plain.parameters(), lr=1e-2, weight_decay=0.1)
    opt = MarbleOptimizer(torch.optim.AdamW(wrapped.parameters(), lr=1e-2, weight_decay=0.1))
    for _ in range(40):
        adam.zero_grad()
        objectives(plain)["mid"].backward()
        adam.step()
        opt.zero_grad()
        report = opt.step({"mid": objectives(wrapped)["mid"]})
        assert report.loss_weights == {"mid": 1.0} and report.weights == {"mid": 1.0}
    assert_same_params(plain, wrapped)
    assert_same_tree(adam.state_dict()["state"], opt.optimizer.state_dict()["state"])


def test_single_objective_weight_is_exactly_one() -> None:
    """w = α·mean‖g‖/‖g‖ is 1 only up to rounding; K=1 must give the loss's own gradient."""
    model = make_model(4)
    params = params_of(model)
    opt = MarbleOptimizer(torch.optim.SGD(params, lr=0.1))
    for c in 10.0 ** np.linspace(-5, 5, 101):
        opt.zero_grad()
        loss = float(c) * objectives(model)["big"]
        expected = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        report = opt.backward({"big": loss})
        assert report.loss_weights == {"big": 1.0}, c
        for p, g in zip(params, expected):
            assert p.grad is None if g is None else torch.equal(p.grad, g)


def test_single_valid_objective_is_its_own_gradient() -> None:
    """Two objectives, one with an exactly zero gradient: training on the other alone."""
    plain, wrapped = make_model(5), make_model(5)
    adam = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    opt = MarbleOptimizer(torch.optim.AdamW(wrapped.parameters(), lr=1e-2))
    for _ in range(20):
        adam.zero_grad()
        objectives(plain)["big"].backward()
        adam.step()
        opt.zero_grad()
        ya = first_head(wrapped)
        report = opt.step({"big": objectives(wrapped)["big"], "flat": 0.0 * ya.sum() + 1.0})
        assert report.excluded == ("flat",)
    assert_same_params(plain, wrapped)


def test_ema_of_the_weights() -> None:
    rho = 0.6
    model = make_model(6)
    opt = MarbleOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), ema_decay=rho)
    assert opt.weights == {}
    r1 = opt.step(objectives(model))
    a1 = np.array([r1.raw_weights[n] for n in r1.names])
    np.testing.assert_array_equal([opt.weights[n] for n in r1.names], a1)  # first solve: α* as is
    opt.zero_grad()
    r2 = opt.step(objectives(model))
    a2 = np.array([r2.raw_weights[n] for n in r2.names])
    assert not np.allclose(a1, a2, atol=1e-6)  # the test would not see a wrong ρ otherwise
    expected = rho * a1 + (1 - rho) * a2
    np.testing.assert_allclose([opt.weights[n] for n in r2.names], expected, rtol=0, atol=1e-15)
    np.testing.assert_allclose([r2.weights[n] for n in r2.names], expected, rtol=0, atol=1e-15)
    assert sum(opt.weights.values()) == pytest.approx(1.0, abs=1e-15)


def test_default_ema_decay_is_the_papers_best() -> None:
    opt = MarbleOptimizer(torch.optim.SGD(make_model().parameters(), lr=0.1))
    assert opt.ema_decay == 0.7


def test_zero_gradient_objective_is_excluded_and_reported() -> None:
    model = make_model(7)
    params = params_of(model)
    opt = MarbleOptimizer(torch.optim.SGD(params, lr=0.1), ema_decay=0.0)
    losses = objectives(model)
    losses["dead"] = 0.0 * losses["big"] + 2.0  # on the graph, gradient exactly zero
    grads = hand_grads({k: losses[k] for k in ("big", "mid", "small")}, params).double()
    report = opt.backward(losses)
    assert report.excluded == ("dead",)
    assert report.weights["dead"] == 0.0 and report.raw_weights["dead"] == 0.0
    assert report.loss_weights["dead"] == 0.0 and report.grad_norms["dead"] == 0.0
    # The others are balanced exactly as without it.
    gram = (grads @ grads.T).numpy()
    norms = np.sqrt(np.diag(gram))
    expected = min_norm_weights(gram / np.outer(norms, norms))
    np.testing.assert_allclose([report.raw_weights[n] for n in ("big", "mid", "small")], expected, atol=1e-7)
    assert not report.skipped


def test_all_zero_gradients_skip_the_step() -> None:
    model = make_model(8)
    opt = MarbleOptimizer(torch.optim.AdamW(model.parameters(), lr=0.1))
    before, state = snapshot(model, opt)
    y = first_head(model)
    report = opt.step({"a": 0.0 * y.sum(), "b": 0.0 * y.mean() + 1.0})
    assert report.skipped and set(report.excluded) == {"a", "b"}
    assert "no objective" in report.reason
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
    assert opt.state_dict()["state"] == state["state"] == {}


def test_gradient_accumulation_commits_the_mean_of_micro_batches() -> None:
    model = make_model(14)
    params = params_of(model)
    opt = MarbleOptimizer(torch.optim.SGD(params, lr=0.1), ema_decay=0.5)
    halves = (X[:24], X[24:])
    grads = [hand_grads(objectives(model, x), params).double() for x in halves]
    reports = [opt.backward(objectives(model, x)) for x in halves]
    expected_grad = sum(
        torch.tensor([r.loss_weights[n] for n in r.names], dtype=torch.float64) @ g for r, g in zip(reports, grads)
    )
    torch.testing.assert_close(flat_grad(params).double(), expected_grad, rtol=1e-5, atol=1e-6)
    opt.step()
    raw = [np.array([r.raw_weights[n] for n in r.names]) for r in reports]
    np.testing.assert_allclose([opt.weights[n] for n in reports[0].names], (raw[0] + raw[1]) / 2, atol=1e-15)
    assert opt.num_steps == 1
    # zero_grad() starts a new accumulation: a backward whose step never came is forgotten.
    opt.zero_grad()
    r3 = opt.backward(objectives(model, X[:24]))
    opt.zero_grad()
    r4 = opt.backward(objectives(model, X[24:]))
    opt.step()
    a3 = np.array([r3.raw_weights[n] for n in r3.names])
    a4 = np.array([r4.raw_weights[n] for n in r4.names])
    assert not np.allclose(a3, a4, atol=1e-6)
    expected = 0.5 * (raw[0] + raw[1]) / 2 + 0.5 * a4
    np.testing.assert_allclose([opt.weights[n] for n in r4.names], expected, atol=1e-15)


# ---- torch integrations: schedulers, GradScaler, clipping ----------------------------------


@pytest.mark.parametrize(
    "make_scheduler",
    [
        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
        lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda e: 1.0 / (1 + e)),
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=8),
    ],
    ids=["StepLR", "LambdaLR", "OneCycleLR"],
)
def test_lr_schedulers_drive_the_wrapped_optimizer(make_scheduler) -> None:
    ref_model, model = make_model(9), make_model(9)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.05, momentum=0.9)
    ref_sched = make_scheduler(ref_opt)
    inner = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        opt = MarbleOptimizer(inner)
        sched = make_scheduler(opt)
        lrs, ref_lrs = [], []
        for _ in range(6):
            opt.zero_grad()
            opt.step(objectives(model))
            sched.step()
            lrs.append(inner.param_groups[0]["lr"])
            ref_opt.zero_grad()
            objectives(ref_model)["mid"].backward()
            ref_opt.step()
            ref_sched.step()
            ref_lrs.append(ref_opt.param_groups[0]["lr"])
    assert lrs == ref_lrs
    assert len(set(lrs)) > 1  # the schedule really changed the wrapped optimizer's lr
    assert sched.get_last_lr() == ref_sched.get_last_lr()


def _scaler_run(scaled: bool, steps: int = 5) -> tuple[nn.Module, MarbleOptimizer]:
    model = make_model(10)
    opt = MarbleOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), ema_decay=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14, growth_interval=2) if scaled else None
    for _ in range(steps):
        opt.zero_grad()
        losses = objectives(model)
        if scaler is None:
            opt.step(losses)
        else:
            opt.backward({k: scaler.scale(v) for k, v in losses.items()})
            scaler.step(opt)
            scaler.update()
    if scaler is not None:
        assert scaler.get_scale() == 2.0**16  # grew twice: no step was skipped
    return model, opt


def test_grad_scaler_matches_the_unscaled_run() -> None:
    ref_model, ref_opt = _scaler_run(scaled=False)
    model, opt = _scaler_run(scaled=True)
    assert_same_params(ref_model, model)
    assert opt.weights == ref_opt.weights
    assert opt.num_steps == ref_opt.num_steps == 5


def test_grad_scaler_overflow_is_skipped_and_the_loop_backs_off() -> None:
    """fp16-style overflow of the scaled losses/gradients: MARBLE reports a skipped step
    (parameters, optimizer state, weights untouched, no gradient written). GradScaler only
    looks at p.grad, so the loop backs the scale off itself on ``report.skipped``; the
    weights advance only on real steps and every real step equals the unscaled run."""
    ref_model = make_model(11)
    ref_opt = MarbleOptimizer(torch.optim.AdamW(ref_model.parameters(), lr=1e-2))
    model = make_model(11)
    opt = MarbleOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, growth_interval=1000)
    big = lambda m: {k: 1e3 * v for k, v in objectives(m).items()}  # noqa: E731
    real_steps = skipped = 0
    for _ in range(12):
        before, state = snapshot(model, opt)
        weights = opt.weights
        opt.zero_grad()  # also forgets the skipped backward whose step() never came
        report = opt.backward({k: scaler.scale(v) for k, v in big(model).items()})
        if report.skipped:
            skipped += 1
            assert "non-finite" in report.reason
            assert all(p.grad is None for p in model.parameters())
            scaler.update(scaler.get_scale() * 2.0**-8)
            for p, q in zip(model.parameters(), before):
                assert torch.equal(p, q)
            assert_same_tree(opt.state_dict()["state"], state["state"])
            assert opt.weights == weights
        else:
            scaler.step(opt)
            scaler.update()
            real_steps += 1
            ref_opt.zero_grad()
            ref_opt.step(big(ref_model))
            assert_same_params(ref_model, model)
            assert opt.weights == ref_opt.weights
    assert skipped >= 1 and real_steps >= 5
    assert scaler.get_scale() < 2.0**127
    assert opt.num_steps == real_steps


def test_propagate_policy_lets_the_standard_grad_scaler_loop_back_off() -> None:
    """With nonfinite="propagate" the unchanged torch loop (scale each loss, backward,
    scaler.step, scaler.update) handles an overflow by itself: the skipped backward fills
    p.grad with NaN, GradScaler sees it, skips the step and lowers its scale; parameters,
    optimizer state and weights stay as they were, and real steps equal the unscaled run."""
    ref_model = make_model(11)
    ref_opt = MarbleOptimizer(torch.optim.AdamW(ref_model.parameters(), lr=1e-2))
    model = make_model(11)
    opt = MarbleOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), nonfinite="propagate")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, growth_interval=1000)
    big = lambda m: {k: 1e3 * v for k, v in objectives(m).items()}  # noqa: E731
    real_steps = skipped = 0
    for _ in range(40):
        before, state = snapshot(model, opt)
        weights = opt.weights
        scale_before = scaler.get_scale()
        opt.zero_grad()
        report = opt.backward({k: scaler.scale(v) for k, v in big(model).items()})
        scaler.step(opt)
        scaler.update()
        if report.skipped:
            skipped += 1
            assert all(torch.isnan(p.grad).all() for p in model.parameters())
            assert scaler.get_scale() < scale_before  # the scaler backed off by itself
            for p, q in zip(model.parameters(), before):
                assert torch.equal(p, q)
            assert_same_tree(opt.state_dict()["state"], state["state"])
            assert opt.weights == weights
        else:
            real_steps += 1
            ref_opt.zero_grad()
            ref_opt.step(big(ref_model))
            assert_same_params(ref_model, model)
            assert opt.weights == ref_opt.weights
    assert skipped >= 1 and real_steps >= 5
    assert opt.num_steps == real_steps


def test_clip_grad_norm_between_backward_and_step() -> None:
    model = make_model(12)
    params = params_of(model)
    lr, max_norm = 0.5, 1e-3
    opt = MarbleOptimizer(torch.optim.SGD(params, lr=lr), ema_decay=0.0)
    before = torch.cat([p.detach().reshape(-1) for p in params]).clone()
    report = opt.backward(objectives(model))
    direction = flat_grad(params).clone()
    total = torch.nn.utils.clip_grad_norm_(params, max_norm)
    assert float(total) == pytest.approx(float(direction.norm()), rel=1e-5)
    assert float(total) > 10 * max_norm  # the clip really bites
    opt.step()
    moved = (before - torch.cat([p.detach().reshape(-1) for p in params])) / lr
    assert float(moved.norm()) == pytest.approx(max_norm, rel=1e-3)
    assert cosine(moved, direction) == pytest.approx(1.0, abs=1e-6)
    assert not report.skipped


# ---- state: resume, deepcopy, pickle, refresh interval ---------------------------------------


def _fresh(seed: int = 13, refresh_every: int = 1) -> tuple[TrunkHeads, MarbleOptimizer]:
    model = make_model(seed)
    opt = MarbleOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), ema_decay=0.7, refresh_every=refresh_every)
    return model, opt


def _batch(i: int) -> torch.Tensor:
    return X[(i * 16) % 48 : (i * 16) % 48 + 16] if i % 2 else X


@pytest.mark.parametrize("refresh_every", [1, 2])
def test_resume_is_bit_for_bit(refresh_every: int, tmp_path) -> None:
    straight, opt = _fresh(refresh_every=refresh_every)
    reports = []
    for i in range(6):
        opt.zero_grad()
        reports.append(opt.step(objectives(straight, _batch(i))))
        if i == 2:
            model_path, opt_path = tmp_path / "model.pt", tmp_path / "opt.pt"
            torch.save(straight.state_dict(), model_path)
            torch.save(opt.state_dict(), opt_path)

    resumed, opt2 = _fresh(seed=99, refresh_every=refresh_every)  # different init: all from the file
    resumed.load_state_dict(torch.load(model_path))  # default weights_only=True
    opt2.load_state_dict(torch.load(opt_path))
    for i in range(3, 6):
        opt2.zero_grad()
        report = opt2.step(objectives(resumed, _batch(i)))
        assert report.weights == reports[i].weights
        assert report.loss_weights == reports[i].loss_weights
        assert report.solved == reports[i].solved
    assert_same_params(straight, resumed)
    assert opt2.weights == opt.weights
    assert_same_tree(opt2.state_dict(), opt.state_dict())


def test_state_dict_loads_under_weights_only() -> None:
    model, opt = _fresh()
    opt.step(objectives(model))
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert sd["marble"]["names"] == ["big", "mid", "small"]


def test_deepcopy_and_pickle() -> None:
    model, opt = _fresh()
    torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)  # patches opt.step
    for _ in range(2):
        opt.zero_grad()
        opt.step(objectives(model))
    copies = [copy.deepcopy((model, opt)), pickle.loads(pickle.dumps((model, opt)))]
    originals = [p.detach().clone() for p in model.parameters()]
    for m2, o2 in copies:
        assert isinstance(o2, MarbleOptimizer)
        assert o2.weights == opt.weights and o2.num_steps == opt.num_steps
        assert o2.param_groups is o2.optimizer.param_groups
        assert o2.param_groups[0]["params"][0] is next(m2.parameters())
    # Each copy trains on its own parameters, like the original would.
    for m2, o2 in copies:
        o2.zero_grad()
        o2.step(objectives(m2))
        for p, q in zip(model.parameters(), originals):
            assert torch.equal(p, q)  # the original did not move
    opt.zero_grad()
    opt.step(objectives(model))
    for m2, o2 in copies:
        assert_same_params(model, m2)
        assert o2.weights == opt.weights


def test_refresh_every_solves_only_every_n_steps() -> None:
    model, opt = _fresh(refresh_every=3)
    params = params_of(model)
    solved, statuses = [], []
    cached_w = None
    for i in range(7):
        opt.zero_grad()
        losses = objectives(model, _batch(i))
        grads = hand_grads(losses, params).double()
        weights_before = opt.weights
        report = opt.backward(losses)
        solved.append(report.solved)
        statuses.append(report.solver_status)
        w = torch.tensor([report.loss_weights[n] for n in report.names], dtype=torch.float64)
        torch.testing.assert_close(flat_grad(params).double(), w @ grads, rtol=1e-5, atol=1e-6)
        if report.solved:
            assert report.gram is not None and report.raw_weights
        else:
            assert report.gram is None and report.raw_weights == {}
            assert report.loss_weights == cached_w  # the weights of the last solved step
            assert report.weights == weights_before
        opt.step()
        if not report.solved:
            assert opt.weights == weights_before  # nothing new to average in
        cached_w = report.loss_weights if report.solved else cached_w
    assert solved == [True, False, False, True, False, False, True]
    assert statuses[1] == statuses[2] == "cached"


# ---- bad input ----------------------------------------------------------------------------


@pytest.fixture
def setup():
    model = make_model(20)
    opt = MarbleOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    return model, opt


def test_empty_dict(setup) -> None:
    _, opt = setup
    with pytest.raises(ValueError, match="losses is empty"):
        opt.step({})


def test_non_scalar_loss(setup) -> None:
    model, opt = setup
    ya = first_head(model)
    with pytest.raises(ValueError, match=r"loss 'vec' must be a scalar, got a tensor of shape \(48,\)"):
        opt.step({"ok": ya.mean(), "vec": ya})


def test_loss_without_a_path_to_a_trainable_parameter(setup) -> None:
    model, opt = setup
    with torch.no_grad():
        detached = first_head(model).mean()
    with pytest.raises(ValueError, match=r"loss 'nograd' = .* does not require grad"):
        opt.step({"ok": first_head(model).mean(), "nograd": detached})
    other = nn.Linear(5, 1)  # requires grad, but not through the wrapped optimizer's params
    with pytest.raises(ValueError, match=r"loss 'elsewhere' has no path to any trainable parameter"):
        opt.step({"ok": first_head(model).mean(), "elsewhere": other(X).mean()})
    frozen = make_model(21)
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match=r"loss 'frozen' = .* does not require grad"):
        opt.step({"ok": first_head(model).mean(), "frozen": first_head(frozen).mean()})


def _poisoned(model: nn.Module, kind: str) -> dict[str, torch.Tensor]:
    losses = objectives(model)
    if kind == "loss":
        losses["mid"] = losses["mid"] * float("nan")
    elif kind == "inf-loss":
        losses["mid"] = losses["mid"] + float("inf")
    else:  # finite loss, NaN gradient: d/du sqrt(u) at u = 0 is inf, times du/dθ = 0
        ya = first_head(model)
        losses["mid"] = losses["mid"] + torch.sqrt(((ya - ya.detach()) ** 2).sum())
        assert torch.isfinite(losses["mid"])
    return losses


@pytest.mark.parametrize("kind", ["loss", "inf-loss", "gradient"])
def test_non_finite_is_skipped(setup, kind: str) -> None:
    model, opt = setup
    opt.step(objectives(model))  # optimizer state and weights exist
    before, state = snapshot(model, opt)
    weights = opt.weights
    opt.zero_grad()
    report = opt.backward(_poisoned(model, kind))
    assert report.skipped and report.solver_status == "skipped"
    assert "mid" in report.reason and "non-finite" in report.reason
    assert all(p.grad is None for p in model.parameters())  # no gradient was written
    assert opt.step() is None  # the following step does nothing
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
    assert_same_tree(opt.state_dict(), state)
    assert opt.weights == weights and opt.num_steps == 1
    # step(losses) in one call: same; and training goes on afterwards.
    opt.zero_grad()
    assert opt.step(_poisoned(model, kind)).skipped
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
    opt.zero_grad()
    assert not opt.step(objectives(model)).skipped
    assert opt.num_steps == 2
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize("kind", ["loss", "inf-loss", "gradient"])
def test_non_finite_raises(kind: str) -> None:
    model = make_model(22)
    opt = MarbleOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), nonfinite="raise")
    opt.step(objectives(model))
    before, state = snapshot(model, opt)
    opt.zero_grad()
    match = r"non-finite loss: 'mid' = (nan|inf)" if kind != "gradient" else r"non-finite gradient of 'mid'"
    with pytest.raises(FloatingPointError, match=match):
        opt.step(_poisoned(model, kind))
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
    assert_same_tree(opt.state_dict(), state)


def test_non_finite_objective_can_be_excluded() -> None:
    model = make_model(23)
    opt = MarbleOptimizer(torch.optim.SGD(model.parameters(), lr=1e-2), nonfinite="exclude", ema_decay=0.0)
    before = [p.detach().clone() for p in model.parameters()]
    report = opt.step(_poisoned(model, "loss"))
    assert not report.skipped and "mid" in report.excluded
    assert report.weights["mid"] == 0.0 and report.loss_weights["mid"] == 0.0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_objectives_are_fixed_by_the_first_call(setup) -> None:
    model, opt = setup
    opt.step(objectives(model))
    losses = objectives(model)
    with pytest.raises(ValueError, match=r"missing \['small'\], new \[\]"):
        opt.step({k: losses[k] for k in ("big", "mid")})
    losses = objectives(model)
    with pytest.raises(ValueError, match=r"missing \[\], new \['extra'\]"):
        opt.step({**losses, "extra": losses["big"] * 2})
    losses = objectives(model)
    with pytest.raises(ValueError, match=r"missing \['small'\], new \['tiny'\]"):
        opt.step({"big": losses["big"], "mid": losses["mid"], "tiny": losses["small"]})
    # The order of the keys does not matter.
    losses = objectives(model)
    report = opt.step({k: losses[k] for k in ("small", "big", "mid")})
    assert report.names == ("big", "mid", "small")
    # reset_weights() starts over with new objectives.
    opt.reset_weights()
    assert opt.weights == {} and opt.names == ()
    opt.zero_grad()
    losses = objectives(model)
    report = opt.step({"x": losses["big"], "y": losses["small"]})
    assert report.names == ("x", "y") and set(opt.weights) == {"x", "y"}


@pytest.mark.parametrize(
    ("bad", "exc", "match"),
    [
        (lambda ls: list(ls.values()), TypeError, r"losses must be a dict .*got list"),
        (lambda ls: {**ls, "mid": 0.5}, TypeError, r"loss 'mid' must be a torch.Tensor, got float: 0.5"),
        (lambda ls: {**ls, "mid": np.float32(1.0)}, TypeError, r"loss 'mid' must be a torch.Tensor, got float32"),
        (lambda ls: {**ls, 3: ls["mid"]}, TypeError, r"loss names must be strings, got 3 \(int\)"),
    ],
    ids=["list", "float-value", "numpy-value", "int-key"],
)
def test_wrong_loss_types(setup, bad, exc, match) -> None:
    model, opt = setup
    with pytest.raises(exc, match=match):
        opt.step(bad(objectives(model)))


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"ema_decay": 1.5}, ValueError, r"ema_decay must be a float in \[0, 1\), got 1.5"),
        ({"ema_decay": -0.1}, ValueError, r"ema_decay .* got -0.1"),
        ({"ema_decay": "0.5"}, ValueError, r"ema_decay .* got '0.5'"),
        ({"normalize": "l3"}, ValueError, r"normalize must be one of .* got 'l3'"),
        ({"refresh_every": 0}, ValueError, r"refresh_every must be an int >= 1, got 0"),
        ({"refresh_every": 2.0}, ValueError, r"refresh_every .* got 2.0"),
        ({"nonfinite": "x"}, ValueError, r"nonfinite must be one of .* got 'x'"),
        ({"gram": "approx"}, ValueError, r"gram must be one of .* got 'approx'"),
        ({"solver": "nope"}, ValueError, r"solver='nope' is not available"),
        ({"rescale": "yes"}, TypeError, r"rescale must be a bool, got 'yes'"),
    ],
)
def test_bad_constructor_options(kwargs, exc, match) -> None:
    with pytest.raises(exc, match=match):
        MarbleOptimizer(torch.optim.SGD(make_model().parameters(), lr=0.1), **kwargs)


def test_wrapped_object_must_be_an_optimizer() -> None:
    model = make_model()
    with pytest.raises(TypeError, match=r"optimizer must be a torch.optim.Optimizer, got TrunkHeads"):
        MarbleOptimizer(model)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"optimizer must be a torch.optim.Optimizer, got list"):
        MarbleOptimizer(list(model.parameters()))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="already a MarbleOptimizer"):
        MarbleOptimizer(MarbleOptimizer(torch.optim.SGD(model.parameters(), lr=0.1)))


def test_step_argument_errors(setup) -> None:
    model, opt = setup
    with pytest.raises(ValueError, match="either losses or a closure"):
        opt.step(objectives(model), closure=lambda: None)
    with pytest.raises(ValueError, match=r"shared= is only used by gram='shared'"):
        opt.step(objectives(model), shared=torch.zeros(3, requires_grad=True))


# ---- review follow-ups: settable ρ, cached steps with an excluded objective, NaN cosines -----


def test_ema_decay_is_settable_and_takes_effect() -> None:
    model = make_model(21)
    opt = MarbleOptimizer(torch.optim.SGD(model.parameters(), lr=1e-2), ema_decay=0.7)
    opt.zero_grad()
    opt.step(objectives(model))
    opt.ema_decay = 0.0
    assert opt.ema_decay == 0.0 and "ema_decay=0.0" in repr(opt)
    opt.zero_grad()
    report = opt.step(objectives(model))
    assert report.weights == pytest.approx(report.raw_weights, abs=1e-12)  # no smoothing any more
    with pytest.raises(ValueError, match="ema_decay must be a float in \\[0, 1\\), got 1.5"):
        opt.ema_decay = 1.5
    with pytest.raises(AttributeError):
        opt.gram = "shared"  # fixed at construction


def test_cached_step_renormalises_over_the_objectives_that_remain() -> None:
    model = make_model(22)
    opt = MarbleOptimizer(
        torch.optim.SGD(model.parameters(), lr=1e-2), refresh_every=2, nonfinite="exclude", ema_decay=0.0
    )
    opt.zero_grad()
    opt.step(objectives(model))  # solve step: caches the loss weights
    cached = dict(zip(opt.names, opt._loss_weights))
    alpha = opt.weights
    losses = objectives(model)
    losses["small"] = losses["small"] * float("nan")
    opt.zero_grad()
    report = opt.backward(losses)
    assert not report.solved and report.excluded == ("small",)
    kept = alpha["big"] + alpha["mid"]
    assert report.weights["small"] == 0.0
    assert sum(report.weights.values()) == pytest.approx(1.0)
    for k in ("big", "mid"):
        assert report.loss_weights[k] == pytest.approx(cached[k] / kept)
    params = params_of(model)
    clean = objectives(model)
    want = torch.autograd.grad(
        sum(report.loss_weights[k] * clean[k] for k in ("big", "mid")), params, allow_unused=True
    )
    want = [torch.zeros_like(p) if g is None else g for p, g in zip(params, want)]
    torch.testing.assert_close(flat_grad(params), torch.cat([g.reshape(-1) for g in want]))


def test_an_excluded_objective_has_an_undefined_cosine_not_zero() -> None:
    model = make_model(23)
    opt = MarbleOptimizer(torch.optim.SGD(model.parameters(), lr=1e-2), ema_decay=0.0)
    losses = objectives(model)
    losses["zero"] = 0.0 * losses["mid"]  # on the graph, zero gradient
    report = opt.backward(losses)
    assert report.excluded == ("zero",)
    assert math.isnan(report.update_cosine["zero"]) and math.isnan(report.mean_cosine["zero"])
    assert report.worst_update_cosine == pytest.approx(min(report.update_cosine[k] for k in ("big", "mid", "small")))
    assert report.worst_update_cosine > 0


# ---- issue 11: stale skips, hooks, messages ------------------------------------------------


def _overflowing(model: nn.Module) -> dict[str, torch.Tensor]:
    """Finite parameters and inputs, losses that overflow float32 to inf (as fp16 ones would)."""
    return {k: v * 1e30 * 1e30 for k, v in objectives(model).items()}


def test_a_stale_skip_does_not_swallow_the_next_good_step() -> None:
    """nonfinite="propagate" + GradScaler: the overflowing backward fills p.grad with NaN,
    GradScaler.step never calls step(), the loop clears gradients through the *model*
    (model.zero_grad(), as the HF Trainer does); the next good step must be taken, exactly
    as a fresh run at the backed-off scale takes it."""
    model = make_model(30)
    opt = MarbleOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), nonfinite="propagate")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, backoff_factor=0.5, growth_interval=1000)
    ref_model = copy.deepcopy(model)
    ref_opt = MarbleOptimizer(torch.optim.AdamW(ref_model.parameters(), lr=1e-2), nonfinite="propagate")
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**9, growth_interval=1000)

    report = opt.backward({k: scaler.scale(v) for k, v in _overflowing(model).items()})
    assert report.skipped
    scaler.step(opt)  # sees the NaN gradients: does not call opt.step()
    scaler.update()
    assert scaler.get_scale() == 2.0**9 and opt.num_steps == 0
    model.zero_grad()  # not opt.zero_grad()

    before = [p.detach().clone() for p in model.parameters()]
    report = opt.backward({k: scaler.scale(v) for k, v in objectives(model).items()})
    scaler.step(opt)
    scaler.update()
    assert not report.skipped
    assert opt.num_steps == 1
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))

    ref_opt.backward({k: ref_scaler.scale(v) for k, v in objectives(ref_model).items()})
    ref_scaler.step(ref_opt)
    assert_same_params(ref_model, model)
    assert opt.weights == ref_opt.weights


@pytest.mark.parametrize("clear", ["model.zero_grad", "grad=None"])
def test_step_with_losses_after_a_stale_skip_steps(clear: str) -> None:
    model = make_model(31)
    opt = MarbleOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), nonfinite="propagate")
    assert opt.backward(_overflowing(model)).skipped  # its step() never comes
    if clear == "model.zero_grad":
        model.zero_grad()
    else:
        for p in model.parameters():
            p.grad = None
    before = [p.detach().clone() for p in model.parameters()]
    report = opt.step(objectives(model))
    assert not report.skipped
    assert opt.num_steps == 1
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize("policy", ["skip", "propagate"])
def test_step_with_losses_never_reports_a_step_it_did_not_take(policy: str) -> None:
    """A skipped micro-batch whose gradients were not cleared skips the accumulation's step:
    step(losses) must then say skipped, not return skipped=False without stepping."""
    model = make_model(32)
    opt = MarbleOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), nonfinite=policy)
    opt.zero_grad()
    assert opt.backward(_overflowing(model)).skipped
    before = [p.detach().clone() for p in model.parameters()]
    report = opt.step(objectives(model))
    assert report.skipped and "earlier in this accumulation" in report.reason
    assert opt.num_steps == 0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    # The skip is consumed: the next accumulation steps.
    opt.zero_grad()
    assert not opt.step(objectives(model)).skipped and opt.num_steps == 1


def test_state_dict_hooks_registered_on_the_wrapper_run() -> None:
    model = make_model(33)
    opt = MarbleOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    opt.zero_grad()
    opt.step(objectives(model))
    calls: list[str] = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd-pre") or None)

    def sd_post(o, sd):
        calls.append("sd-post")
        assert o is opt and "marble" in sd
        return {**sd, "tag": 1}

    opt.register_state_dict_post_hook(sd_post)
    sd = opt.state_dict()
    assert calls == ["sd-pre", "sd-post"] and sd["tag"] == 1

    def load_pre(o, sd):
        calls.append("load-pre")
        out = dict(sd)
        out.pop("tag")  # the replaced dict is the one loaded
        out["marble"] = {**out["marble"], "num_steps": 41}
        return out

    opt2 = MarbleOptimizer(torch.optim.AdamW(make_model(33).parameters(), lr=1e-2))
    opt2.register_load_state_dict_pre_hook(load_pre)
    opt2.register_load_state_dict_post_hook(lambda o: calls.append(f"load-post:{o.num_steps}"))
    opt2.load_state_dict(sd)
    assert calls[2:] == ["load-pre", "load-post:41"]


def test_torch_recipe_loads_a_state_dict_with_another_parameter_order() -> None:
    """torch's recipe (Optimizer.load_state_dict docs): a load_state_dict pre-hook maps the
    saved state onto this optimizer's parameters by ``param_names``."""
    model = make_model(34)
    opt = MarbleOptimizer(torch.optim.AdamW(model.named_parameters(), lr=1e-2))
    for i in range(2):
        opt.zero_grad()
        opt.step(objectives(model, _batch(i)))
    saved = copy.deepcopy(opt.state_dict())
    model2 = copy.deepcopy(model)
    opt2 = MarbleOptimizer(torch.optim.AdamW(list(model2.named_parameters())[::-1], lr=1e-2))

    def adapt_state_dict_ids(optimizer, state_dict):
        adapted = copy.deepcopy(optimizer.state_dict())
        group, saved_group = adapted["param_groups"][0], state_dict["param_groups"][0]
        for key, value in saved_group.items():
            if key not in ("params", "param_names"):
                group[key] = value
        lookup = dict(zip(saved_group["param_names"], saved_group["params"]))
        adapted["state"] = {
            pid: copy.deepcopy(state_dict["state"][lookup[name]])
            for pid, name in zip(group["params"], group["param_names"])
        }
        adapted["marble"] = state_dict["marble"]
        return adapted

    opt2.register_load_state_dict_pre_hook(adapt_state_dict_ids)
    opt2.load_state_dict(saved)
    named2 = dict(model2.named_parameters())
    for name, p in model.named_parameters():
        assert_same_tree(opt2.state[named2[name]], opt.state[p])
    assert opt2.weights == opt.weights and opt2.num_steps == opt.num_steps == 2
    opt.zero_grad()
    opt.step(objectives(model, _batch(2)))
    opt2.zero_grad()
    opt2.step(objectives(model2, _batch(2)))
    for name, p in model.named_parameters():  # the Gram sums in another order: not bit for bit
        torch.testing.assert_close(named2[name], p, rtol=1e-6, atol=1e-7)


def test_step_hooks_see_the_balanced_gradient_and_skip_skipped_steps() -> None:
    model = make_model(35)
    params = params_of(model)
    inner = torch.optim.SGD(params, lr=0.1)
    opt = MarbleOptimizer(inner, nonfinite="skip")
    seen: dict[str, list] = {"pre": [], "inner": [], "post": []}
    opt.register_step_pre_hook(lambda o, args, kwargs: seen["pre"].append(flat_grad(params).clone()))
    inner.register_step_pre_hook(lambda o, args, kwargs: seen["inner"].append(flat_grad(params).clone()))
    opt.register_step_post_hook(lambda o, args, kwargs: seen["post"].append(o.num_steps))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)  # patches opt.step
    opt.zero_grad()
    report = opt.step(objectives(model))
    sched.step()
    assert not report.skipped
    assert len(seen["pre"]) == len(seen["inner"]) == 1
    assert seen["pre"][0].abs().sum() > 0 and torch.equal(seen["pre"][0], seen["inner"][0])
    assert seen["post"] == [1]  # after the commit
    opt.zero_grad()
    bad = objectives(model)
    bad["mid"] = bad["mid"] * float("nan")
    assert opt.step(bad).skipped
    assert len(seen["pre"]) == 1 and seen["post"] == [1]
    assert inner.param_groups[0]["lr"] == pytest.approx(0.05)


def test_step_pre_hook_may_replace_the_closure() -> None:
    model = make_model(36)
    opt = MarbleOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    called = []
    opt.register_step_pre_hook(lambda o, args, kwargs: (args, {"closure": lambda: called.append(1) or 0.5}))
    opt.zero_grad()
    opt.backward(objectives(model))
    assert opt.step() == 0.5 and called == [1]


def test_a_complex_loss_is_refused_by_name(setup) -> None:
    model, opt = setup
    losses = objectives(model)
    losses["mid"] = torch.complex(losses["mid"], losses["mid"])
    with pytest.raises(ValueError, match=r"loss 'mid' is complex \(torch.complex64\)"):
        opt.backward(losses)
    assert all(p.grad is None for p in model.parameters())


def test_gram_params_frozen_after_construction_is_refused_by_name() -> None:
    model = make_model(37)
    opt = MarbleOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), gram="params", gram_params=list(model.trunk.parameters())
    )
    model.trunk[0].bias.requires_grad_(False)
    with pytest.raises(ValueError, match=r"gram_params\[1\] \(shape \(8,\)\) does not require grad"):
        opt.backward(objectives(model))
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("value", [np.float32(0.5), np.float64(0.25), np.float16(0.5), np.int64(0)])
def test_ema_decay_accepts_numpy_scalars(value) -> None:
    model = make_model()
    opt = MarbleOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), ema_decay=value)
    assert opt.ema_decay == float(value) and type(opt.ema_decay) is float
    opt.ema_decay = value
    assert opt.ema_decay == float(value)


@pytest.mark.parametrize("value", [np.bool_(False), True, np.float32(1.0), np.float64(-0.1), np.float32("nan")])
def test_ema_decay_still_refuses_bools_and_out_of_range(value) -> None:
    model = make_model()
    with pytest.raises(ValueError, match="ema_decay must be a float in"):
        MarbleOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), ema_decay=value)
    opt = MarbleOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="ema_decay must be a float in"):
        opt.ema_decay = value
