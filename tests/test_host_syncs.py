"""Device-to-host round trips per optimizer step, counted on CPU.

``HostSyncCounter`` (benchmarks/step_overhead.py) counts every read of a device-computed
tensor's values into Python (``item``, ``bool``, ``numpy``, ``cpu()``, ...): on a GPU each is
a synchronisation that idles the device while Python runs. The counts asserted here are the
ones the optimizer achieves: a balancing step reads the loss values and G in one transfer,
then (unless ``exact`` proves its update finite from G) the finiteness of the combined
gradient; the wrapped AdamW's own reads of its host-side step counters are not counted.

Also here: the proof that lets ``exact`` skip its finiteness pass over the update.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _scripts import load_benchmark
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from marble_opt import MarbleOptimizer
from marble_opt._src.sources import _finite_combination


def _bench():
    return load_benchmark("step_overhead")


# ---- the counter itself --------------------------------------------------------------------
def test_counter_counts_reads_of_computed_tensors_only():
    bench = _bench()
    x = torch.randn(5, requires_grad=True)
    with bench.HostSyncCounter() as c:
        y = (x * 2).sum()
        y.item()  # 1
        y.detach().cpu().numpy()  # 1: the copy; reading the copy is free
        bool(y > 0)  # 1
        float(y.detach())  # 1
        t = torch.stack([y.detach(), y.detach()])
        t.tolist()  # 1
        h = torch.from_numpy(np.ones(3))  # host data, and what is computed from it alone
        (h * 2).sum().item()
        torch.as_tensor(np.zeros(2)).numpy()
        torch.tensor([1.0, 2.0]).max().item()
    assert c.count == 5, c.where


def test_counter_sees_no_round_trip_in_a_plain_adamw_step():
    bench = _bench()
    model = nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters())
    for _ in range(2):
        with bench.HostSyncCounter(bench.host_state(opt)) as c:
            opt.zero_grad()
            model(torch.randn(3, 4)).pow(2).mean().backward()
            opt.step()
    assert c.count == 0, c.where  # its step counters stay on the host


# ---- per source -----------------------------------------------------------------------------
def _setup(gram: str, refresh_every: int = 1):
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 16))
    heads = nn.ModuleList(nn.Linear(16, 1) for _ in range(3))
    params = [*trunk.parameters(), *heads.parameters()]
    kw = {"gram_params": list(trunk[2].parameters())} if gram == "params" else {}
    opt = MarbleOptimizer(torch.optim.AdamW(params), gram=gram, refresh_every=refresh_every, **kw)

    def step(with_extra: bool) -> list[str]:
        bench = _bench()
        z = trunk(torch.randn(4, 8))
        losses = {f"l{k}": (h(z) - k).pow(2).mean() for k, h in enumerate(heads)}
        extra = 1e-3 * z.pow(2).mean() if with_extra else None
        with bench.HostSyncCounter(bench.host_state(opt)) as c:
            opt.zero_grad()
            report = opt.step(losses, shared=z if gram == "shared" else None, extra=extra)
        assert not report.skipped
        return c.where

    return opt, step


#: Host round trips of a balancing step: the loss values with G (one transfer), then the
#: finiteness of the combined gradient; ``exact`` proves its update finite from G when there
#: is no extra loss. (exact-lean on a GPU also copies each of its K gradients to the host:
#: not counted on CPU.)
BALANCING = {"exact": (1, 2), "exact-lean": (2, 2), "shared": (2, 2), "params": (2, 2)}


@pytest.mark.parametrize("gram", sorted(BALANCING))
@pytest.mark.parametrize("with_extra", [False, True])
def test_round_trips_of_a_balancing_step(gram, with_extra):
    _, step = _setup(gram)
    step(with_extra)  # first step: state is created
    where = step(with_extra)
    bound = BALANCING[gram][with_extra]
    assert 1 <= len(where) <= bound, where  # at least the loss values are read
    assert where[0] == "cpu"  # the K loss values and G in one transfer
    if len(where) == 2:
        assert where[1] == "__bool__"  # the finiteness flag of the combined gradient


@pytest.mark.parametrize("gram", sorted(BALANCING))
def test_round_trips_of_a_cached_step(gram):
    """Between refreshes: the loss values and the finiteness of the one backward, read together."""
    opt, step = _setup(gram, refresh_every=2)
    step(False)  # solve
    where = step(False)  # cached
    assert opt.num_steps == 2
    assert where == ["cpu"], where


def test_a_cached_step_with_a_nonfinite_loss_still_skips_untouched():
    """The one read of a cached step comes after its backward: a NaN loss then skips with
    every p.grad and parameter as before (and the optimizer state untouched)."""
    torch.manual_seed(0)
    trunk = nn.Linear(4, 4)
    heads = nn.ModuleList(nn.Linear(4, 1) for _ in range(2))
    params = [*trunk.parameters(), *heads.parameters()]
    opt = MarbleOptimizer(torch.optim.AdamW(params), refresh_every=2)
    for t in range(2):
        z = trunk(torch.randn(3, 4))
        losses = {f"l{k}": h(z).pow(2).mean() for k, h in enumerate(heads)}
        if t == 1:
            losses["l1"] = losses["l1"] * float("nan")
            before = [p.detach().clone() for p in params]
            state = {k: v["exp_avg"].clone() for k, v in enumerate(opt.state.values())}
        opt.zero_grad()
        report = opt.step(losses)
    assert report.skipped and report.solver_status == "skipped" and "non-finite loss" in report.reason
    assert all(p.grad is None for p in params)
    assert all(torch.equal(a, p) for a, p in zip(before, params))
    assert all(torch.equal(state[k], v["exp_avg"]) for k, v in enumerate(opt.state.values()))


def test_exact_without_extra_reads_the_update_never():
    """exact's G proves its update finite: no pass over it, no round trip for it."""
    _, step = _setup("exact")
    step(False)
    assert step(False) == ["cpu"]  # the loss values with G: one transfer per balancing step


# ---- the proof ------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(
    k=st.integers(1, 5),
    n=st.integers(1, 40),
    log_scale=st.floats(-30, 39),
    seed=st.integers(0, 2**31 - 1),
    wscale=st.floats(0.0, 4.0),
)
def test_finite_combination_is_sound(k, n, log_scale, seed, wscale):
    """Whenever ``_finite_combination`` vouches for ``Σ w_k g_k``, the float32 sum computed
    as ExactSource computes it (all rows: one matrix-vector product; some: multiply-adds) is
    finite; and a non-finite row's norm is never vouched for."""
    rng = np.random.default_rng(seed)
    rows64 = rng.standard_normal((k, n)) * 10.0**log_scale / np.sqrt(n)
    with np.errstate(over="ignore"):
        rows = torch.from_numpy(rows64.astype(np.float32))
    w = rng.random(k) * wscale
    norms = np.sqrt(np.sum(rows.double().numpy() ** 2, axis=1))
    if _finite_combination(w, norms, torch.float32):
        assert torch.isfinite(rows).all()
        assert torch.isfinite(torch.as_tensor(w, dtype=torch.float32) @ rows).all()
        d = rows[0] * float(w[0])
        for j in range(1, k):
            d.add_(rows[j], alpha=float(w[j]))
        assert torch.isfinite(d).all()
    bad = rows.clone()
    bad[0, 0] = float("nan")
    bad_norms = np.sqrt(np.sum(bad.double().numpy() ** 2, axis=1))
    assert not _finite_combination(np.ones(k), bad_norms, torch.float32)


def test_finite_combination_refuses_an_overflowing_bound():
    big = float(torch.finfo(torch.float32).max)
    assert not _finite_combination(np.array([0.5, 0.5]), np.array([big, big]), torch.float32)
    assert _finite_combination(np.array([0.5, 0.5]), np.array([big, big]), torch.float64)
    assert _finite_combination(np.array([]), np.array([]), torch.float32)


@pytest.mark.parametrize("with_extra", [False, True])
def test_exact_skips_on_a_non_finite_gradient_without_touching_anything(with_extra):
    """The guarantee the proof must not weaken: a NaN gradient anywhere, no update."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = MarbleOptimizer(torch.optim.AdamW(model.parameters()), gram="exact")
    x = torch.randn(5, 4)
    out = model(x)
    opt.step({"a": out[:, 0].pow(2).mean(), "b": out[:, 1].mean()})  # AdamW state exists
    before = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in opt.state[model.weight].items()}
    out = model(x)
    poisoned = out[:, 1].mean() + (out[:, 2] * 0.0).abs().sqrt().sum()  # value finite, gradient NaN
    assert torch.isfinite(poisoned)
    extra = out.pow(2).mean() if with_extra else None
    opt.zero_grad()
    report = opt.step({"a": out[:, 0].pow(2).mean(), "b": poisoned}, extra=extra)
    assert report.skipped
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(torch.equal(opt.state[model.weight][k], v) for k, v in state.items())


def test_exact_excluding_a_non_finite_gradient_steps_with_a_finite_update():
    """nonfinite="exclude": the NaN row gets weight 0 and stays out of the product (and of
    the proof); the others' update is applied and finite."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = MarbleOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), gram="exact", nonfinite="exclude")
    out = model(torch.randn(5, 4))
    poisoned = out[:, 1].mean() + (out[:, 2] * 0.0).abs().sqrt().sum()
    before = model.weight.detach().clone()
    report = opt.step({"a": out[:, 0].pow(2).mean(), "b": poisoned, "c": -out[:, 2].mean()})
    assert not report.skipped and report.excluded == ("b",)
    assert report.loss_weights["b"] == 0.0
    assert torch.isfinite(model.weight.grad).all() and torch.isfinite(model.weight).all()
    assert not torch.equal(model.weight, before)
