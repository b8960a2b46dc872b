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

import copy
import io

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


# ---- skip_on_device: a fused wrapped optimizer checks the combined gradient ------------------
FUSED = {
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, fused=True),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-2, fused=True),
    "sgd": lambda params: torch.optim.SGD(params, lr=1e-2, momentum=0.9, fused=True),
}


class _NanGradient(torch.autograd.Function):
    """The identity forward; a NaN gradient backward (finite values, non-finite gradient)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class _Net(nn.Module):
    """A trunk and three heads; ``poison`` gives the first trunk layer's weight a NaN gradient
    while every value, the losses and their gradients w.r.t. the trunk output stay finite."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(8, 16)
        self.last = nn.Linear(16, 16)
        self.heads = nn.ModuleList(nn.Linear(16, 1) for _ in range(3))

    def forward(self, x, poison: bool = False):
        w = _NanGradient.apply(self.first.weight) if poison else self.first.weight
        z = self.last(nn.functional.gelu(nn.functional.linear(x, w, self.first.bias)))
        return z, {f"l{k}": (h(z) - k).pow(2).mean() for k, h in enumerate(self.heads)}


def _device_skip_setup(gram: str, optimizer: str = "adamw", skip_on_device: bool = True):
    net = _Net()
    kw = {"gram_params": list(net.last.parameters())} if gram == "params" else {}
    opt = MarbleOptimizer(FUSED[optimizer](net.parameters()), gram=gram, skip_on_device=skip_on_device, **kw)
    return net, opt


def _device_step(net, opt, gram, x, *, poison=False, with_extra=False):
    """One ``step(losses)``; ``poison``: a NaN gradient outside what G measures (the first
    layer's weight for ``shared``/``params``, the extra loss for the exact sources)."""
    on_layer = poison and gram in ("shared", "params")
    z, losses = net(x, on_layer)
    extra = None
    if with_extra:  # value finite; poisoned: a NaN gradient (sqrt at 0)
        extra = 1e-3 * z.pow(2).mean() + ((z * 0.0).abs().sqrt().sum() if poison and not on_layer else 0.0)
    bench = _bench()
    with bench.HostSyncCounter(bench.host_state(opt)) as c:
        opt.zero_grad()
        report = opt.step(losses, shared=z if gram == "shared" else None, extra=extra)
    return report, c.where


@pytest.mark.parametrize("optimizer", sorted(FUSED))
@pytest.mark.parametrize("gram", sorted(BALANCING))
@pytest.mark.parametrize("with_extra", [False, True])
def test_skip_on_device_makes_one_round_trip_per_balancing_step(gram, optimizer, with_extra):
    net, opt = _device_skip_setup(gram, optimizer)
    x = torch.randn(4, 8)
    _device_step(net, opt, gram, x, with_extra=with_extra)
    report, where = _device_step(net, opt, gram, x, with_extra=with_extra)
    assert where == ["cpu"], where  # the loss values with G; the wrapped kernel reads the flag
    assert report.skipped is False and report.reason == ""


@pytest.mark.parametrize("gram", sorted(BALANCING))
@pytest.mark.parametrize("optimizer", sorted(FUSED))
def test_skip_on_device_steps_bit_identically_to_the_host_check(gram, optimizer):
    x = torch.randn(4, 8)
    runs = []
    for on_device in (False, True):
        net, opt = _device_skip_setup(gram, optimizer, skip_on_device=on_device)
        for t in range(4):
            report, _ = _device_step(net, opt, gram, x, with_extra=t % 2 == 1)
        runs.append(([p.detach().clone() for p in net.parameters()], report.weights, opt.num_steps))
    (p0, w0, n0), (p1, w1, n1) = runs
    assert all(torch.equal(a, b) for a, b in zip(p0, p1))
    assert w0 == w1 and n0 == n1 == 4


@pytest.mark.parametrize(
    ("gram", "with_extra"), [("shared", False), ("params", False), ("exact", True), ("exact-lean", True)]
)
@pytest.mark.parametrize("optimizer", sorted(FUSED))
def test_a_non_finite_gradient_is_skipped_on_the_device_untouched(gram, with_extra, optimizer):
    """G and the losses are finite, the combined gradient is not: the fused kernel skips, with
    parameters and its state as before and no host read for it; the report says so when read."""
    net, opt = _device_skip_setup(gram, optimizer)
    x = torch.randn(4, 8)
    _device_step(net, opt, gram, x)  # the optimizer's state exists
    before = [p.detach().clone() for p in net.parameters()]
    state = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in net.parameters()}
    steps = opt.num_steps
    report, where = _device_step(net, opt, gram, x, poison=True, with_extra=with_extra)
    assert where == ["cpu"], where
    assert report.skipped is True
    assert "skips its step on the device" in report.reason
    assert all(torch.equal(a, p) for a, p in zip(before, net.parameters()))
    for p in net.parameters():
        assert opt.state[p].keys() == state[id(p)].keys()
        assert all(torch.equal(opt.state[p][k], v) for k, v in state[id(p)].items()), gram
    assert opt.num_steps == steps + 1  # documented: the weighting's state advances
    # the next finite step goes ahead as usual
    report, _ = _device_step(net, opt, gram, x)
    assert report.skipped is False and not all(torch.equal(a, p) for a, p in zip(before, net.parameters()))


@pytest.mark.parametrize("poisoned", [0, 1])
@pytest.mark.parametrize("gram", sorted(BALANCING))
def test_skip_on_device_defers_through_backward_clipping_and_accumulation(gram, poisoned):
    """``backward()`` per micro-batch, ``clip_grad_norm_``, then ``step()``: a poisoned
    micro-batch is added to p.grad, and the step skips on the device with parameters and
    state untouched; the reads are the loss values with G of each balancing backward. Each
    ``backward()``'s report tells whether its own gradient was finite (read after the step)."""
    net, opt = _device_skip_setup(gram)
    x = torch.randn(4, 8)
    _device_step(net, opt, gram, x)  # the state exists
    before = [p.detach().clone() for p in net.parameters()]
    state = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in net.parameters()}
    bench = _bench()
    reports = []
    with bench.HostSyncCounter(bench.host_state(opt)) as c:
        opt.zero_grad()
        for poison in (poisoned == 0, poisoned == 1):
            z, losses = net(x, poison and gram in ("shared", "params"))
            extra = (z * 0.0).abs().sqrt().sum() if poison and gram.startswith("exact") else None
            reports.append(opt.backward(losses, shared=z if gram == "shared" else None, extra=extra))
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        assert opt.step() is None
    assert c.where == ["cpu", "cpu"], c.where
    assert [r.skipped for r in reports] == [poisoned == 0, poisoned == 1]
    assert all(torch.equal(a, p) for a, p in zip(before, net.parameters()))
    for p in net.parameters():
        assert all(torch.equal(opt.state[p][k], v) for k, v in state[id(p)].items())
    # without the poison the same sequence steps
    opt.zero_grad()
    for _ in range(2):
        z, losses = net(x)
        assert opt.backward(losses, shared=z if gram == "shared" else None).skipped is False
    opt.step()
    assert not all(torch.equal(a, p) for a, p in zip(before, net.parameters()))


def test_skip_on_device_is_refused_where_it_cannot_work():
    net = _Net()
    with pytest.raises(ValueError, match=r"fused=True; got AdamW with fused=None"):
        MarbleOptimizer(torch.optim.AdamW(net.parameters()), skip_on_device=True)
    with pytest.raises(ValueError, match=r"got RMSprop"):
        MarbleOptimizer(torch.optim.RMSprop(net.parameters()), skip_on_device=True)
    with pytest.raises(ValueError, match=r"nonfinite='skip', not nonfinite='exclude'"):
        MarbleOptimizer(FUSED["adamw"](net.parameters()), skip_on_device=True, nonfinite="exclude")
    with pytest.raises(TypeError, match=r"skip_on_device must be True or False, got 'yes'"):
        MarbleOptimizer(FUSED["adamw"](net.parameters()), skip_on_device="yes")
    opt = MarbleOptimizer(FUSED["sgd"](net.parameters()), skip_on_device=True)
    assert "skip_on_device=True" in repr(opt)


@pytest.mark.parametrize("gram", sorted(BALANCING))
def test_skip_on_device_reads_nothing_on_a_cached_step(gram):
    """Between refreshes the loss values stay on the device until the report's ``losses`` is read."""
    net, opt = _device_skip_setup(gram)
    opt.refresh_every = 2
    x = torch.randn(4, 8)
    _, where = _device_step(net, opt, gram, x)  # the first step: its flag is read (no state yet)
    assert where in (["cpu", "__bool__"], ["cpu"]), where
    _device_step(net, opt, gram, x)  # cached
    _, where = _device_step(net, opt, gram, x)  # solve
    assert where == ["cpu"]
    report, where = _device_step(net, opt, gram, x, with_extra=True)  # cached
    assert where == [] and not report.solved and opt.num_steps == 4
    z, losses = net(x)
    assert report.losses.keys() == losses.keys() and all(v > 0 for v in report.losses.values())
    assert report.skipped is False and report.reason == ""


@pytest.mark.parametrize("gram", sorted(BALANCING))
def test_skip_on_device_skips_a_cached_step_with_a_nan_loss_untouched(gram):
    net, opt = _device_skip_setup(gram)
    opt.refresh_every = 2
    x = torch.randn(4, 8)
    _device_step(net, opt, gram, x)  # solve; the state exists
    before = [p.detach().clone() for p in net.parameters()]
    state = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in net.parameters()}
    z, losses = net(x)
    losses["l1"] = losses["l1"] * float("nan")
    bench = _bench()
    with bench.HostSyncCounter(bench.host_state(opt)) as c:
        opt.zero_grad()
        report = opt.step(losses, shared=z if gram == "shared" else None)
    assert c.where == []
    assert report.skipped is True and "non-finite loss or gradient" in report.reason
    assert np.isnan(report.losses["l1"])
    assert all(torch.equal(a, p) for a, p in zip(before, net.parameters()))
    for p in net.parameters():
        assert all(torch.equal(opt.state[p][k], v) for k, v in state[id(p)].items())


# ---- skip_on_device: the cases a review found ----------------------------------------------------
@pytest.mark.parametrize("optimizer", sorted(FUSED))
@pytest.mark.parametrize("gram", ["shared", "exact"])
def test_skip_on_device_skipping_a_first_step_creates_no_state(gram, optimizer):
    """A fused kernel creates state (SGD: an uninitialised momentum buffer) even on a skipped
    step: a first step's flag is read on the host instead, and a skip leaves the state empty."""
    net, opt = _device_skip_setup(gram, optimizer)
    x = torch.randn(4, 8)
    before = [p.detach().clone() for p in net.parameters()]
    report, where = _device_step(net, opt, gram, x, poison=True, with_extra=gram == "exact")
    assert report.skipped is True and where[-1] == "__bool__"
    assert len(opt.state) == 0 and opt.num_steps == 0
    assert all(torch.equal(a, p) for a, p in zip(before, net.parameters()))
    report, _ = _device_step(net, opt, gram, x)
    assert report.skipped is False and all(torch.isfinite(p).all() for p in net.parameters())
    assert len(opt.state) == len(list(net.parameters()))


@pytest.mark.parametrize("gram", ["shared", "exact"])
def test_skip_on_device_checks_every_gradient_not_only_the_new_one(gram):
    """Without zero_grad() after a device skip, the NaN left in p.grad still skips the next
    step (the check covers every p.grad), and nothing non-finite reaches the parameters."""
    net, opt = _device_skip_setup(gram)
    x = torch.randn(4, 8)
    _device_step(net, opt, gram, x)
    before = [p.detach().clone() for p in net.parameters()]
    report, _ = _device_step(net, opt, gram, x, poison=True, with_extra=gram == "exact")
    assert report.skipped is True
    z, losses = net(x)
    report = opt.step(losses, shared=z if gram == "shared" else None)  # no zero_grad: the NaN is still there
    assert report.skipped is True and "skips its step on the device" in report.reason
    assert all(torch.equal(a, p) for a, p in zip(before, net.parameters()))
    # a host skip (NaN loss) then a deferred NaN gradient: the next step still sees it
    opt.zero_grad()
    z, losses = net(x)
    assert opt.backward(
        {k: v * float("nan") for k, v in losses.items()}, shared=z if gram == "shared" else None
    ).skipped
    z, losses = net(x, gram == "shared")
    extra = (z * 0.0).abs().sqrt().sum() if gram == "exact" else None
    opt.step(losses, shared=z if gram == "shared" else None, extra=extra)  # stopped by the earlier skip
    z, losses = net(x)
    opt.step(losses, shared=z if gram == "shared" else None)
    assert all(torch.equal(a, p) for a, p in zip(before, net.parameters()))
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_skip_on_device_runs_a_closure_before_checking():
    """``step(closure)``: the closure's backward is checked too (it runs first)."""
    net, opt = _device_skip_setup("shared")
    x = torch.randn(4, 8)
    _device_step(net, opt, "shared", x)
    before = [p.detach().clone() for p in net.parameters()]

    def closure(poison=True):
        opt.zero_grad()
        z, losses = net(x, poison)
        opt.backward(losses, shared=z)
        return sum(losses.values())

    loss = opt.step(closure)
    assert torch.isfinite(loss)
    assert all(torch.equal(a, p) for a, p in zip(before, net.parameters()))
    opt.step(lambda: closure(poison=False))
    assert not all(torch.equal(a, p) for a, p in zip(before, net.parameters()))


def _with_a_pending_nan_loss(finite_first: bool = False):
    """A solved step, then a cached micro-batch whose loss l1 is NaN: its flag waits for
    ``step()`` (``finite_first``: after a finite cached micro-batch). Returns (net, opt, x)."""
    net, opt = _device_skip_setup("shared")
    opt.refresh_every = 2
    x = torch.randn(4, 8)
    _device_step(net, opt, "shared", x)  # solve
    opt.zero_grad()
    if finite_first:
        z, losses = net(x)
        opt.backward(losses, shared=z)
    z, losses = net(x)
    opt.backward({**losses, "l1": losses["l1"] * float("nan")}, shared=z)
    return net, opt, x


def test_skip_on_device_forgets_the_flag_of_an_abandoned_accumulation():
    """A cached micro-batch with a NaN loss, then the gradients are cleared by the model:
    the next accumulation steps (the flag went with its gradients)."""
    net, opt, x = _with_a_pending_nan_loss()
    net.zero_grad(set_to_none=True)
    before = [p.detach().clone() for p in net.parameters()]
    z, losses = net(x)
    assert opt.backward(losses, shared=z).skipped is False
    opt.step()
    assert not all(torch.equal(a, p) for a, p in zip(before, net.parameters()))


def test_skip_on_device_does_not_skip_a_large_finite_gradient():
    """The check is exact entry by entry: a finite gradient whose sum overflows float32 steps."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    for on_device in (False, True):
        model = copy.deepcopy(lin)
        opt = MarbleOptimizer(torch.optim.SGD(model.parameters(), lr=1e-40, fused=True), skip_on_device=on_device)
        for _ in range(2):
            out = model(torch.ones(2, 4))
            # (with an extra loss, so that exact's update is not proven finite from G)
            report = opt.step({"a": 1e38 * out[:, 0].sum(), "b": 1e38 * out[:, 1].sum()}, extra=out[:, 2].mean())
            assert report.skipped is False
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_skip_on_device_refuses_a_group_that_cannot_skip():
    net = _Net()
    opt = MarbleOptimizer(FUSED["adamw"](list(net.first.parameters())), skip_on_device=True)
    with pytest.raises(ValueError, match=r"fused=\[True, False\]"):
        opt.add_param_group({"params": list(net.last.parameters()), "fused": False})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": list(net.last.parameters()), "fused": True})
    opt.param_groups[1]["fused"] = False  # changed behind its back: refused before anything steps
    z, losses = net(torch.randn(4, 8))
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(ValueError, match="skip_on_device=True needs"):
        opt.step(losses)
    assert all(torch.equal(a, p) for a, p in zip(before, net.parameters()))


def test_skip_on_device_survives_copies_and_keeps_a_pending_flag():
    """deepcopy and torch.save/load (which drop torch's fused marker) still step, and a cached
    micro-batch's NaN-loss flag pending at the copy still skips the step."""
    net, opt, x = _with_a_pending_nan_loss()
    buffer = io.BytesIO()
    torch.save((net, opt), buffer)
    buffer.seek(0)
    for copied_net, copied_opt in (copy.deepcopy((net, opt)), torch.load(buffer, weights_only=False)):
        before = [p.detach().clone() for p in copied_net.parameters()]
        copied_opt.step()
        assert all(torch.equal(a, p) for a, p in zip(before, copied_net.parameters()))
        copied_opt.zero_grad()
        z, losses = copied_net(x)
        assert copied_opt.step(losses, shared=z).skipped is False
        assert not all(torch.equal(a, p) for a, p in zip(before, copied_net.parameters()))


def test_skip_on_device_forgets_a_flag_whose_gradients_were_zeroed_in_place():
    net, opt, x = _with_a_pending_nan_loss(finite_first=True)
    net.zero_grad(set_to_none=False)  # the accumulation is abandoned, its gradients zeroed in place
    before = [p.detach().clone() for p in net.parameters()]
    z, losses = net(x)
    opt.backward(losses, shared=z)
    opt.step()
    assert not all(torch.equal(a, p) for a, p in zip(before, net.parameters()))


def test_skip_on_device_with_momentum_free_sgd_reads_nothing_more_after_the_first_step():
    """SGD without momentum keeps no state: its steps are never first steps for the check."""
    net = _Net()
    opt = MarbleOptimizer(torch.optim.SGD(net.parameters(), lr=1e-2, fused=True), gram="shared", skip_on_device=True)
    x = torch.randn(4, 8)
    for _ in range(3):
        _, where = _device_step(net, opt, "shared", x)
        assert where == ["cpu"], where
    report, where = _device_step(net, opt, "shared", x, poison=True)
    assert where == ["cpu"] and report.skipped is True and len(opt.state) == 0


def test_a_report_pickled_before_its_fields_were_lazy_still_reads():
    net, opt = _device_skip_setup("shared")
    report, _ = _device_step(net, opt, "shared", torch.randn(4, 8))
    losses, skipped, reason = report.losses, report.skipped, report.reason
    for name in ("losses", "skipped", "reason"):  # as an older version stored them
        report.__dict__[name] = report.__dict__.pop(f"_lazy_{name}")
    assert (report.losses, report.skipped, report.reason) == (losses, skipped, reason)
