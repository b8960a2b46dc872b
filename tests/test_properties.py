"""The optimizer's contract, run over every Gram source × normalisation × refresh interval ×
non-finite policy where the combination is meaningful. Assertions live in tests/_asserts.py,
models in tests/_models.py. The first-step properties (the update is the weighted sum of the
per-objective gradients, no conflict, weights finite and on the simplex) run over both paths
(``PATHS``): ``MarbleOptimizer.backward`` and a ``Balancer`` whose weighted loss the caller
backwards; tests/test_balancer.py checks that the two train alike step for step."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from _asserts import (
    assert_close_vec,
    assert_finite_weights,
    assert_grad_is_weighted_sum,
    assert_matches_reference,
    assert_no_conflict,
    assert_non_conflicting,
    assert_on_simplex,
    assert_report_tells_the_truth,
    assert_same_direction,
    assert_same_tree,
    assert_same_update,
    assert_untouched,
    assert_weights_match,
    gram_seen,
    snapshot,
    vec,
)
from _models import (
    NAMES,
    NON_CONFLICTING,
    NORMALIZATIONS,
    PATHS,
    POLICIES,
    REFRESH,
    SOURCE_ESTIMATORS,
    SOURCES,
    WEIGHTING_CASES,
    balanced_backward,
    batch,
    gram_inputs,
    model,
    objectives,
    optimizer,
    shared_kw,
    weighting_arg,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from marble_opt import WEIGHTINGS, loss_weights
from marble_opt.testing import flat_grad, jacobian_rows

_SETTINGS = settings(
    max_examples=int(__import__("os").environ.get("PROPS_EXAMPLES", 4)),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("normalize", NORMALIZATIONS)
@pytest.mark.parametrize("gram", SOURCES)
@_SETTINGS
@given(seed=st.integers(0, 10_000))
def test_first_step_equals_the_hand_computed_reference_and_conflicts_with_no_objective(
    gram: str, normalize: str, path: str, seed: int
) -> None:
    net = model(seed)
    losses, z = objectives(net, batch(seed))
    rows_g = jacobian_rows(losses, gram_inputs(net, gram, z))
    params = list(net.parameters())
    rows_full = jacobian_rows(losses, params)
    report = balanced_backward(path, net, gram, losses, z, normalize=normalize)
    assert not report.skipped and report.solved
    assert_on_simplex(report)
    assert_matches_reference(report, params, rows_g, rows_full, normalize)
    assert_non_conflicting(report, rows_g, normalize)
    assert_grad_is_weighted_sum(params, rows_full, vec(report.loss_weights, report.names))


def _poison(losses: dict[str, torch.Tensor], z: torch.Tensor, names: tuple[str, ...], kind: str) -> dict:
    """``kind="loss"``: those losses are NaN; ``"grad"``: finite, with a NaN gradient (√ at 0)."""
    out = dict(losses)
    for n in names:
        out[n] = out[n] * float("nan") if kind == "loss" else out[n] + torch.sqrt(0.0 * z.sum())
    return out


def _step_then_accumulate(net, opt, gram: str, per_sample: bool = False) -> None:
    """One real step on batch 0 (so, for refresh_every > 1, the next is a cached one), then one
    micro-batch backward on batch 1 whose step has not come yet."""
    losses, z = objectives(net, batch(0), per_sample=per_sample)
    assert not opt.step(losses, **shared_kw(gram, z)).skipped
    opt.zero_grad()
    losses, z = objectives(net, batch(1), per_sample=per_sample)
    assert not opt.backward(losses, **shared_kw(gram, z)).skipped


@pytest.mark.parametrize("kind", ["loss", "grad"])
@pytest.mark.parametrize("refresh_every", REFRESH)
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("gram", SOURCES)
def test_a_skipped_step_leaves_everything_untouched(gram: str, policy: str, refresh_every: int, kind: str) -> None:
    """After one real step (so the next is a cached one for refresh_every=3), a micro-batch
    accumulates, then a poisoned one (every objective for "exclude") skips: parameters,
    p.grad (NaN for "propagate"), optimizer state, weights and step count stay bit-identical
    through the backward and the step() that follows; "raise" raises before anything changes."""
    net = model(3)
    params = list(net.parameters())
    opt = optimizer(net, gram, refresh_every=refresh_every, nonfinite=policy, ema_decay=0.5)
    _step_then_accumulate(net, opt, gram)
    before = snapshot(params, opt)
    losses, z = objectives(net, batch(2))
    bad = _poison(losses, z, ("a", "b", "c") if policy == "exclude" else ("b",), kind)
    if policy == "raise":
        with pytest.raises(FloatingPointError, match="non-finite"):
            opt.backward(bad, **shared_kw(gram, z))
        assert_untouched(before, params, opt, nan_grads=False)
        return
    report = opt.backward(bad, **shared_kw(gram, z))
    assert report.skipped and report.reason
    assert_untouched(before, params, opt, nan_grads=policy == "propagate")
    assert opt.step() is None
    assert_untouched(before, params, opt, nan_grads=policy == "propagate")


@pytest.mark.parametrize("base", ["adamw-fused", "sgd-fused"])
@pytest.mark.parametrize("kind", ["loss", "grad", "extra"])
@pytest.mark.parametrize("refresh_every", REFRESH)
@pytest.mark.parametrize("gram", SOURCES)
def test_skip_on_device_keeps_the_skip_guarantee(gram: str, refresh_every: int, kind: str, base: str) -> None:
    """With a fused optimizer that skips on the device: a poisoned step(losses) after a real
    one (cached for refresh_every=3) leaves parameters and the optimizer's state
    bit-identical, and the report says skipped. ``"extra"``: a NaN gradient through the
    extra loss, which G does not measure: the device's check is the one that skips."""
    net = model(3)
    params = list(net.parameters())
    opt = optimizer(net, gram, refresh_every=refresh_every, ema_decay=0.5, base=base, skip_on_device=True)
    losses, z = objectives(net, batch(0))
    assert not opt.step(losses, **shared_kw(gram, z)).skipped
    opt.zero_grad()
    before = [p.detach().clone() for p in params]
    state = copy.deepcopy(opt.optimizer.state_dict()["state"])
    losses, z = objectives(net, batch(2))
    if kind == "extra":
        report = opt.step(losses, extra=torch.sqrt(0.0 * z.sum()), **shared_kw(gram, z))
    else:
        report = opt.step(_poison(losses, z, ("b",), kind), **shared_kw(gram, z))
    assert report.skipped and report.reason
    assert all(torch.equal(a, p) for a, p in zip(before, params))
    after = opt.optimizer.state_dict()["state"]
    assert after.keys() == state.keys()
    for i, entry in state.items():
        assert all(torch.equal(entry[k], after[i][k]) for k in entry)


@pytest.mark.parametrize("base", ["adamw-fused", "sgd-fused"])
@pytest.mark.parametrize("refresh_every", REFRESH)
@pytest.mark.parametrize("gram", SOURCES)
@_SETTINGS
@given(seed=st.integers(0, 10_000))
def test_skip_on_device_takes_the_same_steps(gram: str, refresh_every: int, base: str, seed: int) -> None:
    """On finite steps, leaving the check to the fused optimizer changes nothing: the same
    parameters, weights and reports as checking on the host, bit for bit."""
    runs = []
    for on_device in (False, True):
        net = model(seed)
        opt = optimizer(net, gram, refresh_every=refresh_every, ema_decay=0.5, base=base, skip_on_device=on_device)
        reports = []
        for i in range(4):
            opt.zero_grad()
            losses, z = objectives(net, batch(seed + i))
            reports.append(opt.step(losses, **shared_kw(gram, z)))
        runs.append((net, opt, reports))
    (net0, opt0, rep0), (net1, opt1, rep1) = runs
    assert all(torch.equal(a, b) for a, b in zip(net0.parameters(), net1.parameters()))
    assert opt0.weights == opt1.weights and opt0.num_steps == opt1.num_steps == 4
    for a, b in zip(rep0, rep1):
        assert a.loss_weights == b.loss_weights and a.skipped is b.skipped is False and a.solved == b.solved


@pytest.mark.parametrize("refresh_every", REFRESH)
@pytest.mark.parametrize("normalize", NORMALIZATIONS)
@pytest.mark.parametrize("gram", SOURCES)
def test_an_excluded_objective_is_left_out_of_solved_and_cached_steps(
    gram: str, normalize: str, refresh_every: int
) -> None:
    net = model(5)
    params = list(net.parameters())
    opt = optimizer(net, gram, normalize=normalize, refresh_every=refresh_every, nonfinite="exclude", ema_decay=0.5)
    last: dict[str, float] = {}
    for i in range(2):  # a solved step, then (refresh_every=3) a cached one
        opt.zero_grad()
        losses, z = objectives(net, batch(10 + i))
        rows_full = jacobian_rows(losses, params)
        before = [p.detach().clone() for p in params]
        # Then one the last step weighted (a cached step reuses those weights): the least of
        # two or more; if it weighted only one, a cached step without it has nothing left.
        positive = sorted((n for n, v in last.items() if v > 0), key=last.get)
        bad = positive[0] if last else "b"
        cached = i == 1 and refresh_every > 1
        report = opt.step(_poison(losses, z, (bad,), "loss"), **shared_kw(gram, z))
        if cached and len(positive) == 1:
            assert report.skipped and "no usable objective" in report.reason
            assert all(torch.equal(p, q) for p, q in zip(params, before))
            continue
        assert not report.skipped
        assert report.excluded == (bad,)
        assert report.solved == (i == 0 or refresh_every == 1)
        w = vec(report.loss_weights, report.names)
        assert report.loss_weights[bad] == 0.0 and w.sum() > 0
        assert sum(report.weights.values()) == pytest.approx(1.0) and report.weights[bad] == 0.0
        assert_grad_is_weighted_sum(params, rows_full, w)
        assert opt.num_steps == i + 1
        last = report.loss_weights
        assert any(not torch.equal(p, q) for p, q in zip(params, before))


def _assert_resumes_bit_for_bit(make, gram: str, per_sample: bool = False) -> None:
    """state_dict after 2 steps → a new model and optimizer (``make(net)``) → the same next 3
    steps, bit for bit: loss weights, solved/cached, parameters, weights and state."""
    net = model(7)
    opt = make(net)
    reports = []
    for i in range(5):
        if i == 2:
            saved_model, saved_opt = copy.deepcopy(net.state_dict()), copy.deepcopy(opt.state_dict())
        opt.zero_grad()
        losses, z = objectives(net, batch(20 + i), per_sample=per_sample)
        reports.append(opt.step(losses, **shared_kw(gram, z)))
    net2 = model(99)
    opt2 = make(net2)
    net2.load_state_dict(saved_model)
    opt2.load_state_dict(saved_opt)
    for i in range(2, 5):
        opt2.zero_grad()
        losses, z = objectives(net2, batch(20 + i), per_sample=per_sample)
        report = opt2.step(losses, **shared_kw(gram, z))
        assert report.loss_weights == reports[i].loss_weights
        assert report.solved == reports[i].solved
    for p, q in zip(net.parameters(), net2.parameters()):
        assert torch.equal(p, q)
    assert opt2.weights == opt.weights
    assert_same_tree(opt2.state_dict(), opt.state_dict())


@pytest.mark.parametrize("refresh_every", REFRESH)
@pytest.mark.parametrize("normalize", NORMALIZATIONS)
@pytest.mark.parametrize("gram", SOURCES)
def test_resume_is_bit_for_bit(gram: str, normalize: str, refresh_every: int) -> None:
    """state_dict after 2 steps → a new model and optimizer → the same next 3 steps, bit for bit."""
    _assert_resumes_bit_for_bit(
        lambda net: optimizer(net, gram, normalize=normalize, refresh_every=refresh_every, ema_decay=0.7), gram
    )


@pytest.mark.parametrize("refresh_every", REFRESH)
@pytest.mark.parametrize("normalize", NORMALIZATIONS)
@pytest.mark.parametrize("gram", SOURCES)
def test_gradient_accumulation(gram: str, normalize: str, refresh_every: int) -> None:
    """Documented semantics: micro-batch backwards add ``Σ_k w_k g_k`` each (their own
    weights) to p.grad; the step commits ρ·α_prev + (1-ρ)·mean of the solved micro-batches'
    α* (none solved, on a cached step: α unchanged)."""
    rho = 0.5
    net = model(9)
    params = list(net.parameters())
    opt = optimizer(net, gram, normalize=normalize, refresh_every=refresh_every, ema_decay=rho, base="sgd")
    losses, z = objectives(net, batch(30))
    opt.step(losses, **shared_kw(gram, z))
    prev = vec(opt.weights, opt.names)
    opt.zero_grad()
    expected = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
    raws = []
    for i in range(2):
        losses, z = objectives(net, batch(31 + i, n=4))
        rows_full = jacobian_rows(losses, params)
        report = opt.backward(losses, **shared_kw(gram, z))
        expected += torch.as_tensor(vec(report.loss_weights, report.names)) @ rows_full
        if report.solved:
            raws.append(vec(report.raw_weights, report.names))
    assert len(raws) == (2 if refresh_every == 1 else 0)
    torch.testing.assert_close(flat_grad(params), expected, rtol=1e-5, atol=1e-7)
    opt.step()
    committed = rho * prev + (1 - rho) * np.mean(raws, axis=0) if raws else prev
    np.testing.assert_allclose(vec(opt.weights, opt.names), committed, atol=1e-12)
    assert opt.num_steps == 2


@pytest.mark.parametrize("refresh_every", REFRESH)
@pytest.mark.parametrize("policy", ["skip", "exclude", "propagate"])
@pytest.mark.parametrize("gram", SOURCES)
def test_a_skip_whose_gradients_were_cleared_does_not_swallow_the_next_step(
    gram: str, policy: str, refresh_every: int
) -> None:
    """A micro-batch, then a skipped one whose step() never comes (GradScaler on an
    overflow); the loop clears gradients through the model. The next step(losses) is taken,
    bit for bit as in a run that never saw the skip, and its report says so."""
    runs = []
    for stale in (True, False):
        net = model(11)
        params = list(net.parameters())
        opt = optimizer(net, gram, refresh_every=refresh_every, nonfinite=policy, ema_decay=0.5)
        losses, z = objectives(net, batch(40))
        opt.step(losses, **shared_kw(gram, z))
        opt.zero_grad()
        if stale:
            losses, z = objectives(net, batch(41))
            opt.backward(losses, **shared_kw(gram, z))
            losses, z = objectives(net, batch(42))
            assert opt.backward(_poison(losses, z, ("a", "b", "c"), "loss"), **shared_kw(gram, z)).skipped
            net.zero_grad()
        before = snapshot(params, opt)
        losses, z = objectives(net, batch(43))
        report = opt.step(losses, **shared_kw(gram, z))
        assert not report.skipped
        assert_report_tells_the_truth(report, before, params, opt)
        runs.append((params, opt.weights, opt.state_dict()))
    (p1, w1, s1), (p2, w2, s2) = runs
    assert all(torch.equal(a, b) for a, b in zip(p1, p2))
    assert w1 == w2
    assert_same_tree(s1, s2)


# ---- every weighting × Gram source × estimator -----------------------------------------------
#
# Each (weighting, source, estimator) triple runs the first-step properties; the stateful
# ones (skip, resume, exclusion, accumulation) run every weighting with every
# (source, estimator) pair too, each pair once per weighting, on a few steps of a tiny model.

_GRID = [(case, gram, est) for case in WEIGHTING_CASES for gram, est in SOURCE_ESTIMATORS]
_IDS = [f"{case}-{gram}-{est}" for case, gram, est in _GRID]
#: Positive homogeneity: scaling every loss by c scales every g_k, and G by c²; these methods
#: normalise G (trace, eigenvalues, norms) or solve a scale-free problem, so w is unchanged.
#: TorchJD's UPGrad regularises G by a fixed ε, so it promises this only approximately.
_SCALE_FREE = tuple(WEIGHTINGS)


def _run(
    case: str, gram: str, est: str, seed: int, *, order=NAMES, scale=None, nonfinite="skip", nan=(), path="optimizer"
):
    """One backward of a fresh model (MARBLE at ρ=0) on the losses in ``order``, each times
    ``scale[name]``, those in ``nan`` NaN, through ``path`` (``PATHS``). Returns the model, the
    report and, measured by hand before it over the finite objectives, the Gram the weighting
    should see and the Jacobian of the batch-mean losses over every parameter."""
    net = model(seed)
    losses, z = objectives(net, batch(seed), per_sample=est == "cross")
    losses = {n: losses[n] * (1.0 if scale is None else scale[n]) for n in order}
    finite = {n: v for n, v in losses.items() if n not in nan}
    seen = gram_seen(finite, gram_inputs(net, gram, z), est)
    rows = jacobian_rows({n: v.mean() for n, v in finite.items()}, list(net.parameters()))
    for n in nan:
        losses[n] = losses[n] * float("nan")
    report = balanced_backward(
        path, net, gram, losses, z, weighting=case, estimator=est, nonfinite=nonfinite, base="sgd"
    )
    return net, report, seen, rows


@pytest.mark.parametrize(("case", "gram", "est"), _GRID, ids=_IDS)
@_SETTINGS
@given(seed=st.integers(0, 10_000))
def test_every_weighting_applies_its_weights_to_the_measured_gram(case: str, gram: str, est: str, seed: int) -> None:
    """Finite α*, α, w per objective (on the simplex for MARBLE and MGDA); w is the weighting
    of the Gram the source and estimator measured (by hand); p.grad = Σ w_k ∇mean(L_k) (the
    optimizer's update, or the gradient of the Balancer's weighted loss); no conflict for the
    methods that promise it; permuting the objectives permutes the weights; scaling every
    loss leaves w alone. Both paths run on the same drawn example."""
    for path in PATHS:
        _check_weighting(case, gram, est, seed, path)


def _check_weighting(case: str, gram: str, est: str, seed: int, path: str) -> None:
    net, report, seen, rows = _run(case, gram, est, seed, path=path)
    assert not report.skipped and report.solved
    assert_finite_weights(report, NAMES)
    if case in ("marble", "mgda"):
        assert_on_simplex(report)
    w = vec(report.loss_weights, NAMES)
    want = loss_weights(seen, weighting_arg(case), **({"ema_decay": 0.0} if case == "marble" else {}))

    def same(actual: dict[str, float], expected: np.ndarray, what: str) -> None:
        # The cross estimate projected onto the PSD cone is often singular at this batch size:
        # then min-norm weights are unique only up to its null space; compare the updates.
        if est == "batch":
            assert_close_vec(vec(actual, NAMES), expected, 1e-4, f"{path}, {case}: {what}")
        else:
            assert_same_update(seen, vec(actual, NAMES), expected, 1e-4, f"{path}, {case}: {what}")

    same(report.loss_weights, want, "w against the weighting of the measured Gram")
    assert_grad_is_weighted_sum(list(net.parameters()), rows, w, rel=1e-4)
    if case in NON_CONFLICTING:
        assert_no_conflict(seen, w)
    _, permuted, _, _ = _run(case, gram, est, seed, order=NAMES[::-1], path=path)
    assert permuted.names == NAMES[::-1]
    same(permuted.loss_weights, w, "weights of permuted objectives")
    if case in _SCALE_FREE:
        for c in (1e-3, 1e3):
            _, scaled, _, _ = _run(case, gram, est, seed, scale=dict.fromkeys(NAMES, c), path=path)
            same(scaled.loss_weights, w, f"w with every loss × {c}")


@pytest.mark.parametrize("normalize", ["l2", "loss"])
@pytest.mark.parametrize("gram", SOURCES)
def test_marble_normalised_updates_ignore_per_objective_loss_scales(gram: str, normalize: str) -> None:
    """MARBLE's ``"l2"`` and ``"loss"`` normalisations divide g_k by ‖g_k‖ or L_k, so
    L_k → c_k L_k leaves α* unchanged and the update d = Σ w_k c_k g_k only rescaled.
    (Not ``"loss+l2"``: ĝ_k = g_k/(L_k‖g_k‖) scales by 1/c_k. Not the cross estimator: its
    PSD projection does not commute with G → C G C, so it does not promise this.)"""
    est = "batch"
    scale = {"a": 1e-2, "b": 1.0, "c": 50.0}
    runs = []
    for s in (None, scale):
        net = model(4)
        opt = optimizer(net, gram, normalize=normalize, estimator=est, base="sgd")
        losses, z = objectives(net, batch(4), per_sample=est == "cross")
        report = opt.backward({n: v * (1.0 if s is None else s[n]) for n, v in losses.items()}, **shared_kw(gram, z))
        runs.append((report, flat_grad(list(net.parameters())).numpy()))
    (plain, d_plain), (scaled, d_scaled) = runs
    assert_close_vec(vec(scaled.raw_weights, NAMES), vec(plain.raw_weights, NAMES), 1e-4, "α* under loss scales")
    assert_same_direction(d_scaled, d_plain, 1e-4, "the update under loss scales")


@pytest.mark.parametrize(("case", "gram", "est"), _GRID, ids=_IDS)
def test_every_weighting_leaves_everything_untouched_on_a_skip(case: str, gram: str, est: str) -> None:
    """As the skip test above, for every weighting and estimator (the policy cycles)."""
    i = _GRID.index((case, gram, est))
    policy = ("skip", "exclude", "propagate")[i % 3]
    net = model(i)
    params = list(net.parameters())
    opt = optimizer(net, gram, weighting=case, estimator=est, nonfinite=policy, refresh_every=1 + i % 2)
    _step_then_accumulate(net, opt, gram, per_sample=est == "cross")
    before = snapshot(params, opt)
    losses, z = objectives(net, batch(2), per_sample=est == "cross")
    bad = _poison(losses, z, NAMES if policy == "exclude" else ("b",), "loss")
    report = opt.backward(bad, **shared_kw(gram, z))
    assert report.skipped and report.reason
    assert_untouched(before, params, opt, nan_grads=policy == "propagate")
    assert opt.step() is None
    assert_untouched(before, params, opt, nan_grads=policy == "propagate")


@pytest.mark.parametrize(("case", "gram", "est"), _GRID, ids=_IDS)
def test_every_weighting_resumes_bit_for_bit(case: str, gram: str, est: str) -> None:
    """state_dict after 2 steps → a new model, optimizer and weighting object → the same next
    3 steps, bit for bit (solved and, for refresh_every=2, cached ones)."""
    refresh = 1 + _GRID.index((case, gram, est)) % 2
    _assert_resumes_bit_for_bit(
        lambda net: optimizer(net, gram, weighting=case, estimator=est, refresh_every=refresh, ema_decay=0.7),
        gram,
        per_sample=est == "cross",
    )


@pytest.mark.parametrize(("case", "gram", "est"), _GRID, ids=_IDS)
def test_every_weighting_weighs_an_excluded_objective_zero(case: str, gram: str, est: str) -> None:
    """nonfinite="exclude" with one NaN loss: it gets weight 0 and the update is Σ w_k g_k over
    the others, with the weights the method gives the others' Gram (batch: the same as a run
    without that objective)."""
    seed = _GRID.index((case, gram, est))
    bad = NAMES[seed % 3]
    net, report, seen, rows = _run(case, gram, est, seed, nonfinite="exclude", nan=(bad,))
    assert not report.skipped and report.excluded == (bad,)
    assert report.loss_weights[bad] == 0.0 and report.weights[bad] == 0.0
    assert_finite_weights(report, NAMES)
    rest = tuple(n for n in NAMES if n != bad)
    assert_grad_is_weighted_sum(list(net.parameters()), rows, vec(report.loss_weights, rest), rel=1e-4)
    want = loss_weights(seen, weighting_arg(case), **({"ema_decay": 0.0} if case == "marble" else {}))
    if est == "batch":
        _, without, _, _ = _run(case, gram, est, seed, order=rest)
        assert_weights_match({n: report.loss_weights[n] for n in rest}, without.loss_weights, 1e-4, "w without it")
        assert_close_vec(vec(report.loss_weights, rest), want, 1e-4, f"{case}: w of the others' Gram")
    if case in NON_CONFLICTING and est == "batch":
        assert_no_conflict(seen, vec(report.loss_weights, rest))


@pytest.mark.parametrize(("case", "gram", "est"), _GRID, ids=_IDS)
def test_every_weighting_accumulates_micro_batches(case: str, gram: str, est: str) -> None:
    """Two micro-batch backwards add Σ_k w_k g_k each; the step commits the mean α of the
    micro-batches (MARBLE: ρ·α_prev + (1−ρ)·mean α*), and the cached step that follows
    (refresh_every=2) reuses the mean w (MARBLE: w from the committed α)."""
    rho = 0.5
    net = model(9)
    params = list(net.parameters())
    opt = optimizer(net, gram, weighting=case, estimator=est, refresh_every=2, ema_decay=rho, base="sgd")
    expected = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
    reports = []
    for i in range(2):
        losses, z = objectives(net, batch(31 + i, n=4), per_sample=est == "cross")
        rows_full = jacobian_rows({n: v.mean() for n, v in losses.items()}, params)
        reports.append(opt.backward(losses, **shared_kw(gram, z)))
        assert reports[-1].solved
        expected += torch.as_tensor(vec(reports[-1].loss_weights, NAMES)) @ rows_full
    assert_close_vec(flat_grad(params), expected, 1e-5, "p.grad after two micro-batches")
    opt.step()
    field = "raw_weights" if case == "marble" else "weights"
    committed = np.mean([vec(getattr(r, field), NAMES) for r in reports], axis=0)
    np.testing.assert_allclose(vec(opt.weights, NAMES), committed, atol=1e-12)
    opt.zero_grad()
    losses, z = objectives(net, batch(33, n=4), per_sample=est == "cross")
    cached = opt.step(losses, **shared_kw(gram, z))
    assert not cached.solved
    if case != "marble":
        mean_w = np.mean([vec(r.loss_weights, NAMES) for r in reports], axis=0)
        np.testing.assert_allclose(vec(cached.loss_weights, NAMES), mean_w, atol=1e-12)
    assert opt.num_steps == 2
