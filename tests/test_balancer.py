"""marble_opt.Balancer: a loop of ``weights`` → backward of the weighted loss → the caller's
``optimizer.step()`` → ``bal.step()`` trains as ``MarbleOptimizer.step(losses)`` does.

What holds exactly and what to a tolerance (found by running every case below):

- Every source but ``exact`` (``exact-lean``, ``shared``, ``params``, with either estimator):
  bit-identical parameters, gradients, reports' weights and balancing state. Both paths
  measure G with the same code and then run one backward of ``Σ_{w_k ≠ 0} w_k L_k`` built in
  the same order. With ``gram_estimator="cross"`` the optimizer differentiates the half means
  (``a·L^A + b·L^B``) and the Balancer the mean: the same floats here, where the batch is even
  and both halves have the same size.
- ``gram="exact"``: ``MarbleOptimizer`` combines the update from the per-objective gradient
  rows it already holds (``wᵀ·rows``), the Balancer's caller runs one more backward: the two
  gradients differ by float32 rounding (about 1e-7 relative), so parameters, weights and state
  agree to tolerances a few float32 ulps wide, not bit for bit. The first step's weights are
  bit-identical (the same G). AdamW can blow a rounding-level difference up where a gradient
  entry is zero in exact arithmetic (an L1 loss whose residual signs balance): its update is
  ``lr·g/(|g|+eps)``. The data below do not hit that case.
"""

from __future__ import annotations

import copy
import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _asserts import assert_close_vec, assert_same_tree, vec
from _models import (
    NAMES,
    SOURCE_ESTIMATORS,
    SOURCES,
    WEIGHTING_CASES,
    balancer,
    balancing_options,
    base_optimizer,
    batch,
    model,
    objectives,
    optimizer,
    shared_kw,
)

from marble_opt import Balancer, BalanceReport

ROOT = Path(__file__).resolve().parents[1]
SEED = 0
STEPS = 4
#: (refresh_every, micro-batches per step)
SCHEDULES = {"every-step": (1, 1), "refresh_every=2": (2, 1), "2-micro-batches": (1, 2)}


def _losses(net, step: int, micro: int, est: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Step ``step``'s micro-batch ``micro``: per-sample losses for the cross estimator."""
    return objectives(net, batch(SEED + 10 * step + micro), per_sample=est == "cross")


def _grads(net) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in net.parameters()]


def _balancer_loop(case: str, gram: str, est: str, refresh: int, micro: int, steps: int = STEPS):
    """The loop the docs show: weights → backward of the weighted loss → step → bal.step()."""
    net = model(SEED)
    opt = base_optimizer(net)  # AdamW
    bal = balancer(net, gram, weighting=case, estimator=est, refresh_every=refresh, ema_decay=0.5)
    reports, grads = [], []
    for i in range(steps):
        for m in range(micro):
            losses, z = _losses(net, i, m, est)
            w = bal.weights(losses, **shared_kw(gram, z))
            assert isinstance(bal.report, BalanceReport) and not bal.report.skipped
            assert w == bal.report.loss_weights and tuple(w) == NAMES
            bal.weighted_loss(losses, w).backward()
            reports.append(bal.report)
        grads.append(_grads(net))
        opt.step()
        bal.step()
        opt.zero_grad()
    return net, bal, reports, grads


def _optimizer_loop(case: str, gram: str, est: str, refresh: int, micro: int, steps: int = STEPS):
    """The same with ``MarbleOptimizer``: ``backward`` for all but the last micro-batch, then ``step(losses)``."""
    net = model(SEED)
    opt = optimizer(net, gram, weighting=case, estimator=est, refresh_every=refresh, ema_decay=0.5)
    reports, grads = [], []
    for i in range(steps):
        for m in range(micro):
            losses, z = _losses(net, i, m, est)
            call = opt.step if m == micro - 1 else opt.backward
            reports.append(call(losses, **shared_kw(gram, z)))
            assert not reports[-1].skipped
        grads.append(_grads(net))
        opt.zero_grad()
    return net, opt, reports, grads


def _assert_same_training(bal_run, opt_run, exact: bool) -> None:
    """Gradients per step, reports, parameters and the committed state: equal (``exact``) or to
    a few float32 ulps."""
    net_b, bal, rep_b, grads_b = bal_run
    net_o, opt, rep_o, grads_o = opt_run
    assert len(rep_b) == len(rep_o)
    for i, (a, b) in enumerate(zip(rep_b, rep_o)):
        assert a.names == b.names and a.solved == b.solved, f"report {i}: solved {a.solved} vs {b.solved}"
        for field in ("loss_weights", "weights", "raw_weights"):
            x, y = getattr(a, field), getattr(b, field)
            assert x.keys() == y.keys(), f"report {i}: {field} keys {x.keys()} vs {y.keys()}"
            if exact or i == 0:
                assert x == y, f"report {i}: {field} {x} != {y}"
            elif x:
                assert_close_vec(vec(x, a.names), vec(y, a.names), 1e-5, f"report {i}: {field}")
    for i, (gb, go) in enumerate(zip(grads_b, grads_o)):
        assert [g is None for g in gb] == [g is None for g in go], f"step {i}: which p.grad is None differs"
        present = [(x, y) for x, y in zip(gb, go) if x is not None]
        if exact:
            assert all(torch.equal(x, y) for x, y in present), f"step {i}: the gradients differ"
        else:  # the update as a whole: one vector over every parameter
            flat_b, flat_o = (torch.cat([t.flatten() for t in ts]) for ts in zip(*present))
            assert_close_vec(flat_b, flat_o, 1e-5, f"step {i}: the gradient")
    for (name, p), q in zip(net_b.named_parameters(), net_o.parameters()):
        if exact:
            assert torch.equal(p, q), f"{name} differs by {(p - q).abs().max().item():.3g}"
        else:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    assert bal.num_steps == opt.num_steps == STEPS
    if exact:
        assert_same_tree(bal.state_dict(), opt.balancer.state_dict())
    else:
        state_b, state_o = bal.state_dict(), opt.balancer.state_dict()
        assert state_b["names"] == state_o["names"] and state_b["num_steps"] == state_o["num_steps"]
        for key in ("ema", "last_raw", "loss_weights"):
            if state_o[key] is None:
                assert state_b[key] is None, key
            else:
                assert_close_vec(state_b[key], state_o[key], 1e-5, f"state_dict[{key!r}]")


_GRID = [(case, gram, est) for case in WEIGHTING_CASES for gram, est in SOURCE_ESTIMATORS]


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize(("case", "gram", "est"), _GRID, ids=[f"{c}-{g}-{e}" for c, g, e in _GRID])
def test_a_balancer_loop_trains_as_marble_optimizer_step(case: str, gram: str, est: str, schedule: str) -> None:
    """Every weighting × Gram source × estimator; every step solved, ``refresh_every=2``
    (cached steps in between), or two micro-batches accumulated per step: 4 AdamW steps of a
    Balancer loop and of ``MarbleOptimizer.step(losses)`` from the same model and data."""
    refresh, micro = SCHEDULES[schedule]
    _assert_same_training(
        _balancer_loop(case, gram, est, refresh, micro),
        _optimizer_loop(case, gram, est, refresh, micro),
        exact=gram != "exact",
    )


@pytest.mark.parametrize(("gram", "est"), SOURCE_ESTIMATORS)
@pytest.mark.parametrize("path", ["optimizer", "balancer"])
def test_a_parameter_only_a_zero_weighted_loss_reaches_gets_no_gradient(path: str, gram: str, est: str) -> None:
    """With ``nonfinite="exclude"`` a NaN loss gets weight 0; the head only it reaches keeps
    ``p.grad = None`` (so AdamW applies it no decay and no momentum) with every source, as the
    backward of the Balancer's weighted loss leaves it. (The exact source used to write zeros
    there, so a Balancer loop and MarbleOptimizer moved that head differently.)"""
    net = model(SEED)
    losses, z = _losses(net, 0, 0, est)
    losses["b"] = losses["b"] * float("nan")  # head 1 is reached by "b" only
    options = {"weighting": "marble", "estimator": est, "nonfinite": "exclude"}
    if path == "optimizer":
        report = optimizer(net, gram, **options).backward(losses, **shared_kw(gram, z))
    else:
        bal = balancer(net, gram, **options)
        w = bal.weights(losses, **shared_kw(gram, z))
        bal.weighted_loss(losses, w).backward()
        report = bal.report
    assert not report.skipped and report.excluded == ("b",) and report.loss_weights["b"] == 0.0
    assert net.heads[1].weight.grad is None and net.heads[1].bias.grad is None
    assert all(
        p.grad is not None and torch.isfinite(p.grad).all() for p in (*net.trunk.parameters(), net.heads[0].weight)
    )


# ---- skipped steps --------------------------------------------------------------------------


def _nan(losses: dict[str, torch.Tensor], name: str = "b") -> dict[str, torch.Tensor]:
    return {**losses, name: losses[name] * float("nan")}


@pytest.mark.parametrize("policy", ["skip", "propagate"])
@pytest.mark.parametrize("refresh", [1, 2])
@pytest.mark.parametrize("gram", SOURCES)
def test_a_skipped_step_weighs_zero_and_the_loop_goes_on_as_the_optimizers(
    gram: str, refresh: int, policy: str
) -> None:
    """A NaN loss on step 1 (cached for refresh_every=2): the report says skipped, every weight
    is 0, ``weighted_loss`` refuses with a clear ValueError, the committed state is untouched;
    the caller skips its step, and the next steps equal ``MarbleOptimizer``'s, which skipped too."""
    exact = gram != "exact"
    runs = []
    for path in ("balancer", "optimizer"):
        net = model(SEED)
        options = {"refresh_every": refresh, "nonfinite": policy, "ema_decay": 0.5}
        if path == "balancer":
            opt, bal = base_optimizer(net), balancer(net, gram, **options)
        else:
            opt = optimizer(net, gram, **options)
        for i in range(4):
            losses, z = _losses(net, i, 0, "batch")
            if i == 1:
                losses = _nan(losses)
            if path == "optimizer":
                report = opt.step(losses, **shared_kw(gram, z))
                opt.zero_grad()
                assert report.skipped == (i == 1)
                continue
            before = copy.deepcopy(bal.state_dict())
            w = bal.weights(losses, **shared_kw(gram, z))
            if i == 1:
                assert bal.report.skipped and "non-finite loss: 'b'" in bal.report.reason
                assert w == dict.fromkeys(NAMES, 0.0)
                with pytest.raises(ValueError, match="every weight is 0 .*skipped this step.*no loss to backward"):
                    bal.weighted_loss(losses, w)
                assert_same_tree(bal.state_dict(), before)
            else:
                assert not bal.report.skipped
                bal.weighted_loss(losses, w).backward()
                opt.step()
                bal.step()
            opt.zero_grad()
        runs.append(net)
        if path == "balancer":
            assert bal.num_steps == 3
    for p, q in zip(*(n.parameters() for n in runs)):
        if exact:
            assert torch.equal(p, q)
        else:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("refresh", [1, 2])
@pytest.mark.parametrize("gram", SOURCES)
def test_nonfinite_raise_raises_floating_point_error_and_changes_nothing(gram: str, refresh: int) -> None:
    net = model(SEED)
    bal = balancer(net, gram, refresh_every=refresh, nonfinite="raise", ema_decay=0.5)
    losses, z = _losses(net, 0, 0, "batch")
    bal.weighted_loss(losses, bal.weights(losses, **shared_kw(gram, z))).backward()
    bal.step()
    before = copy.deepcopy(bal.state_dict())
    losses, z = _losses(net, 1, 0, "batch")
    with pytest.raises(FloatingPointError, match=r"non-finite loss: 'b' = nan \(nonfinite='raise'\)"):
        bal.weights(_nan(losses), **shared_kw(gram, z))
    assert_same_tree(bal.state_dict(), before)


# ---- state: discard, state_dict, pickling -----------------------------------------------------


def _step(net, opt, bal, i: int, gram: str, est: str = "batch") -> dict[str, float]:
    losses, z = _losses(net, i, 0, est)
    w = bal.weights(losses, **shared_kw(gram, z))
    bal.weighted_loss(losses, w).backward()
    opt.step()
    bal.step()
    opt.zero_grad()
    return w


@pytest.mark.parametrize("refresh", [1, 2])
@pytest.mark.parametrize("gram", SOURCES)
def test_discard_leaves_the_state_as_committed(gram: str, refresh: int) -> None:
    """Two ``weights`` calls whose step is not taken, then ``discard()``: the state is as
    committed, and the steps that follow are bit-identical to a run that never made them."""
    runs = []
    for discarded in (True, False):
        net = model(SEED)
        opt, bal = base_optimizer(net), balancer(net, gram, refresh_every=refresh, ema_decay=0.5)
        for i in range(refresh):  # the next step solves
            _step(net, opt, bal, i, gram)
        committed = copy.deepcopy(bal.state_dict())
        if discarded:
            for m in range(2):
                losses, z = _losses(net, 5, m, "batch")
                w = bal.weights(losses, **shared_kw(gram, z))
                assert bal.report.solved
                bal.weighted_loss(losses, w).backward()
            assert len(bal._pending) == 2  # what step() would commit
            bal.discard()
            opt.zero_grad()
            assert_same_tree(bal.state_dict(), committed)
            assert not bal._pending
        weights = [_step(net, opt, bal, i, gram) for i in range(refresh, refresh + 3)]
        runs.append((net, bal.state_dict(), weights))
    (n1, s1, w1), (n2, s2, w2) = runs
    assert w1 == w2
    assert all(torch.equal(p, q) for p, q in zip(n1.parameters(), n2.parameters()))
    assert_same_tree(s1, s2)


_RESUME = [(g, "batch", 1) for g in SOURCES] + [(g, "batch", 2) for g in SOURCES] + [("exact", "cross", 2)]


@pytest.mark.parametrize(("gram", "est", "refresh"), _RESUME)
def test_state_dict_round_trip_resumes_bit_for_bit(gram: str, est: str, refresh: int) -> None:
    """``state_dict()`` after 2 steps, through ``torch.save``/``torch.load(weights_only=True)``,
    into a new Balancer (with the model's and AdamW's state): the next 3 steps, their weights
    and the final state are bit-identical to the uninterrupted run's (with the cross
    estimator's EMA of G too)."""

    def make(net):
        options = balancing_options(net, gram, estimator=est, refresh_every=refresh, ema_decay=0.7)
        if est == "cross":
            options["estimator_options"] = {"ema": 0.5}
        return base_optimizer(net), Balancer(net.parameters(), **options)

    net = model(SEED)
    opt, bal = make(net)
    weights = []
    for i in range(5):
        if i == 2:
            buf = io.BytesIO()
            torch.save({"model": net.state_dict(), "opt": opt.state_dict(), "bal": bal.state_dict()}, buf)
        weights.append(_step(net, opt, bal, i, gram, est))
    if est == "cross":
        assert bal.state_dict()["gram_ema"] is not None
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    net2 = model(SEED + 1)
    opt2, bal2 = make(net2)
    net2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    bal2.load_state_dict(saved["bal"])
    assert bal2.names == NAMES and bal2.num_steps == 2
    for i in range(2, 5):
        assert _step(net2, opt2, bal2, i, gram, est) == weights[i]
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), net2.parameters()))
    assert_same_tree(bal2.state_dict(), bal.state_dict())


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("gram", SOURCES)
def test_a_copied_balancer_trains_on_as_the_original(gram: str, how: str) -> None:
    """The model, AdamW and the Balancer copied together after 2 steps (``copy.deepcopy`` or
    ``pickle``): the copy's Balancer holds the copied model's parameters, and both go on
    bit-identically."""
    net = model(SEED)
    opt, bal = base_optimizer(net), balancer(net, gram, refresh_every=2, ema_decay=0.7)
    for i in range(2):
        _step(net, opt, bal, i, gram)
    if how == "deepcopy":
        net2, opt2, bal2 = copy.deepcopy((net, opt, bal))
    else:
        net2, opt2, bal2 = pickle.loads(pickle.dumps((net, opt, bal)))
    assert bal2.report is None  # the last report is not carried over
    assert all(p is q for p, q in zip(bal2.params(), net2.parameters()))
    assert repr(bal2) == repr(bal)
    for i in range(2, 5):
        assert _step(net2, opt2, bal2, i, gram) == _step(net, opt, bal, i, gram)
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), net2.parameters()))
    assert_same_tree(bal2.state_dict(), bal.state_dict())


# ---- errors name what is wrong ------------------------------------------------------------------


def test_errors_name_the_key() -> None:
    net = model(SEED)
    bal = balancer(net, "exact")
    losses, _ = _losses(net, 0, 0, "batch")
    other = torch.nn.Linear(4, 1)
    x = batch(0).x
    with pytest.raises(ValueError, match="loss 'elsewhere' has no path to any trainable parameter"):
        bal.weights({**losses, "elsewhere": other(x).mean()})
    with pytest.raises(ValueError, match="loss 'detached' = .* does not require grad"):
        bal.weights({**losses, "detached": losses["a"].detach()})
    with pytest.raises(ValueError, match=r"loss 'b' must be a scalar, got a tensor of shape \(2,\)"):
        bal.weights({**losses, "b": torch.stack([losses["a"], losses["b"]])})
    assert bal.names == ()  # a call that raised fixes no objectives
    bal.weights(losses)
    assert bal.names == NAMES
    with pytest.raises(ValueError, match=r"missing \['c'\], new \['x'\].*a Balancer: reset\(\)"):
        bal.weights({"a": losses["a"], "b": losses["b"], "x": losses["c"]})
    bal.reset()
    assert bal.names == () and bal.weights({"a": losses["a"], "x": losses["c"]}).keys() == {"a", "x"}

    w = bal.weights({"a": losses["a"], "x": losses["c"]})
    with pytest.raises(ValueError, match=r"weights has \['x'\], which losses has not"):
        bal.weighted_loss({"a": losses["a"]}, w)
    with pytest.raises(ValueError, match=r"gram='shared' needs the shared tensor.*weights\(losses, shared=z\)"):
        balancer(net, "shared").weights(losses)
    with pytest.raises(ValueError, match="groups= is only used with gram_estimator='cross'"):
        bal.weights(losses, groups=[0, 1])
    with pytest.raises(ValueError, match="no parameter that requires grad"):
        Balancer([torch.zeros(3)])
    with pytest.raises(ValueError, match=r"\['ema_decay'\] are options of weighting='marble', not of weighting='mgda'"):
        Balancer(net.parameters(), weighting="mgda", ema_decay=0.5)


def test_load_state_dict_names_the_bad_key_and_changes_nothing() -> None:
    net = model(SEED)
    opt, bal = base_optimizer(net), balancer(net, "exact", ema_decay=0.5)
    _step(net, opt, bal, 0, "exact")
    good = bal.state_dict()
    target = balancer(model(SEED), "exact", ema_decay=0.5)
    before = target.state_dict()
    for bad, message in (
        ({**good, "ema": torch.tensor([0.5, 0.5])}, r"state_dict\['ema'\] has shape \(2,\), but the state names 3"),
        (
            {**good, "loss_weights": torch.tensor([1.0, float("nan"), 1.0])},
            r"state_dict\['loss_weights'\] = .* not finite",
        ),
        ({**good, "num_steps": -1}, r"state_dict\['num_steps'\] must be an int >= 0, got -1"),
        ({**good, "names": ["a", "a", "c"]}, r"state_dict\['names'\] has duplicates"),
    ):
        with pytest.raises(ValueError, match=message):
            target.load_state_dict(bad)
        assert_same_tree(target.state_dict(), before)
    with pytest.raises(
        ValueError, match=r"state_dict\['weighting'\] = 'marble', but this balancer uses weighting='mgda'"
    ):
        balancer(model(SEED), "exact", weighting="mgda").load_state_dict(good)
    with pytest.raises(TypeError, match=r"must be a dict \(state_dict\), got list"):
        target.load_state_dict([])


# ---- the accelerate example --------------------------------------------------------------------


def test_the_accelerate_example_trains_and_equals_marble_optimizer(tmp_path: Path) -> None:
    """examples/balancer_accelerate.py: both losses go down (mean of the last epoch below the
    first's), every step balanced, and its final parameters equal a ``MarbleOptimizer.step``
    run of the same loop (``gram="exact"``: to float rounding)."""
    pytest.importorskip("accelerate")
    out = tmp_path / "run.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "balancer_accelerate.py"), "--check", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    log = result["log"]
    assert len(log) == 2 * 16 and not any(entry["skipped"] for entry in log)
    assert proc.stdout.count("weights: regression=") == len(log) and "\nfinal: " in proc.stdout
    for name in ("regression", "classification"):
        values = np.array([entry["losses"][name] for entry in log]).reshape(2, 16)
        assert values[1].mean() < values[0].mean(), f"{name}: {values.mean(axis=1)}"
        weights = np.array([entry["weights"][name] for entry in log])
        assert np.isfinite(weights).all() and (weights > 0).all()
    for p, q in zip(result["params"], result["reference_params"]):
        np.testing.assert_allclose(p, q, rtol=1e-5, atol=1e-6)
    assert result["check"]["max_rel_diff"] < 1e-5


def test_the_cost_script_times_every_method(tmp_path: Path) -> None:
    """benchmarks/balancer_cost.py --quick: every method timed, the ratio the docs quote computed
    from the medians (timings are reported, not asserted)."""
    from _scripts import load_benchmark

    out = tmp_path / "cost.json"
    bench = load_benchmark("balancer_cost")
    assert bench.main(["--quick", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    medians = result["median_s"]
    assert set(medians) == set(bench.METHODS) and all(np.isfinite(v) and v > 0 for v in medians.values())
    ratio = medians["Balancer exact"] / medians["MarbleOptimizer exact"]
    assert result["ratio_balancer_to_optimizer"] == pytest.approx(ratio)


_ACCELERATE_RECIPES = r"""
import json, sys, tempfile
import torch
from accelerate import Accelerator
from _models import batch, model, objectives, optimizer
from marble_opt import Balancer

def loop(steps, start=0, save_at=None, load=None):
    acc = Accelerator(cpu=True, gradient_accumulation_steps=2)
    net = model(0)
    inner = torch.optim.AdamW(net.parameters(), lr=1e-2)
    net, inner = acc.prepare(net, inner)
    bal = Balancer(net.parameters(), gram="exact-lean", ema_decay=0.5)
    acc.register_for_checkpointing(bal)
    if load:
        acc.load_state(load)
    for i in range(start, steps):
        if i == save_at:
            acc.save_state(where)
        with acc.accumulate(net):
            losses, _ = objectives(net, batch(i))
            w = bal.weights(losses)
            acc.backward(bal.weighted_loss(losses, w))
            inner.step()
            if acc.sync_gradients and not inner.step_was_skipped:
                bal.step()
            inner.zero_grad()
    return net, bal

where = tempfile.mkdtemp()
net, bal = loop(8, save_at=4)
resumed, bal2 = loop(8, start=4, load=where)
ref = model(0)
opt = optimizer(ref, "exact-lean", ema_decay=0.5)
for s in range(4):
    for m in range(2):  # accelerate divides the loss by the accumulation steps
        losses, _ = objectives(ref, batch(2 * s + m))
        (opt.backward if m == 0 else opt.step)({k: v / 2 for k, v in losses.items()})
    opt.zero_grad()
same = lambda a, b: all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
print(json.dumps({
    "num_steps": [bal.num_steps, bal2.num_steps],
    "accumulated_as_optimizer": same(net, ref),
    "ema_as_optimizer": bal.state_dict()["ema"].tolist() == opt.balancer.state_dict()["ema"].tolist(),
    "resumed_as_uninterrupted": same(net, resumed) and bal.state_dict()["ema"].tolist() == bal2.state_dict()["ema"].tolist(),
}))
"""


def test_accelerate_accumulation_and_checkpointing_recipes(tmp_path: Path) -> None:
    """docs/balancer.md's recipes, in a subprocess (accelerate's state is process-wide): under
    ``accelerator.accumulate`` with 2 steps, ``bal.step()`` on ``sync_gradients`` trains bit for
    bit as ``MarbleOptimizer`` (backward, then step(losses)) on the halved losses; and
    ``accelerator.register_for_checkpointing(bal)`` + ``save_state``/``load_state`` resumes bit
    for bit."""
    pytest.importorskip("accelerate")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", _ACCELERATE_RECIPES], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {
        "num_steps": [4, 4],
        "accumulated_as_optimizer": True,
        "ema_as_optimizer": True,
        "resumed_as_uninterrupted": True,
    }


def test_a_marble_optimizers_state_loads_into_a_balancer_and_back() -> None:
    """``MarbleOptimizer.state_dict()["marble"]`` is a Balancer's ``state_dict()``: a run can
    move from one to the other and go on bit for bit (here with a non-exact source, where the
    two train bit-identically)."""
    gram = "shared"
    net = model(SEED)
    opt = optimizer(net, gram, ema_decay=0.7)
    for i in range(2):
        losses, z = _losses(net, i, 0, "batch")
        opt.step(losses, shared=z)
        opt.zero_grad()
    bal = balancer(net, gram, ema_decay=0.7)
    bal.load_state_dict(opt.state_dict()["marble"])
    assert_same_tree(bal.state_dict(), opt.balancer.state_dict())
    adamw = base_optimizer(net)
    adamw.load_state_dict(copy.deepcopy(opt.optimizer.state_dict()))
    twin = copy.deepcopy(net)
    opt2 = optimizer(twin, gram, ema_decay=0.7)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for i in range(2, 4):
        w = _step(net, adamw, bal, i, gram)
        losses, z = _losses(twin, i, 0, "batch")
        assert opt2.step(losses, shared=z).loss_weights == w
        opt2.zero_grad()
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), twin.parameters()))
    back = optimizer(model(SEED), gram, ema_decay=0.7)
    state = back.state_dict()
    state["marble"] = bal.state_dict()
    back.load_state_dict(state)
    assert back.num_steps == 4 and back.weights == opt2.weights
