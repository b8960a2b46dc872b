"""marble_opt.rl: the loop helpers the example's seam uses (samplers, EMA, decay, cosines).

Expected values come from closed forms: the exact flow of Gaussian data, explicit
EMA arithmetic, cosines computed by hand from explicit gradients.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from marble_opt.rl import ema_update_, flow_sample, old_policy_decay, update_cosines

torch.set_num_threads(1)


def gaussian_velocity(m: float, a: float):
    """Exact velocity of the flow x_t = (1−t)·x0 + t·ε with x0 ~ N(m, a²): affine in x."""

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        x0 = m + (1 - t) * a**2 / ((1 - t) ** 2 * a**2 + t**2) * (x - (1 - t) * m)
        return (x - x0) / t

    return velocity


def shifted_sigmas(n: int, shift: float = 3.0) -> torch.Tensor:
    s = torch.linspace(1.0, 1.0 / n, n, dtype=torch.float64)
    s = shift * s / (1 + (shift - 1) * s)
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)])


# ---- flow_sample ---------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["euler", "dpm2"])
def test_point_mass_data_is_sampled_exactly(method):
    """With x0 = m (a point mass) the x0-prediction is constant: both samplers are exact."""
    eps = torch.randn(16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    m = 1.5

    def velocity(x, t):
        return (x - m) / t.reshape(-1, 1)

    out = flow_sample(velocity, eps, shifted_sigmas(7), method)
    assert torch.allclose(out, torch.full_like(out, m), atol=1e-12)


def test_euler_is_first_order_and_dpm2_far_more_accurate_on_gaussian_data():
    """Affine velocity field (Gaussian data, exact flow known): Euler's error halves with the
    step; DPM-Solver++(2M) is at least 4x more accurate at every step count tried."""
    m, a = 2.0, 0.3
    eps = torch.randn(64, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    exact = m + a * eps

    def error(n: int, method: str) -> float:
        return float((flow_sample(gaussian_velocity(m, a), eps, shifted_sigmas(n), method) - exact).abs().max())

    euler = [error(n, "euler") for n in (40, 80, 160)]
    dpm2 = [error(n, "dpm2") for n in (40, 80, 160)]
    assert all(abs(math.log2(euler[i] / euler[i + 1]) - 1) < 0.15 for i in range(2)), euler
    assert all(d < e / 4 for d, e in zip(dpm2, euler)), (dpm2, euler)


def test_flow_sample_passes_the_batch_times_and_counts_evaluations():
    seen = []

    def velocity(x, t):
        seen.append(t.clone())
        return torch.zeros_like(x)

    x = torch.randn(5, 2)
    out = flow_sample(velocity, x, [1.0, 0.5, 0.0], "dpm2")
    assert len(seen) == 2 and all(t.shape == (5,) for t in seen)
    assert seen[0].tolist() == [1.0] * 5 and seen[1].tolist() == [0.5] * 5
    assert torch.equal(out, x)  # v = 0: nothing moves
    with pytest.raises(ValueError, match="method must be one of"):
        flow_sample(velocity, x, [1.0, 0.0], "heun")
    with pytest.raises(ValueError, match="at least 2 times"):
        flow_sample(velocity, x, [1.0], "euler")


# ---- old_policy_decay / ema_update_ ---------------------------------------------------------
def test_old_policy_decay_schedule_and_errors():
    assert [old_policy_decay(s, 0.001, 0.95) for s in (0, 1, 500, 950, 5000)] == pytest.approx(
        [0.0, 0.001, 0.5, 0.95, 0.95]
    )
    with pytest.raises(ValueError, match="step"):
        old_policy_decay(-1)
    with pytest.raises(ValueError, match="cap"):
        old_policy_decay(1, 0.1, 1.5)


@settings(max_examples=40, deadline=None)
@given(
    decay=st.floats(0.0, 1.0),
    values=st.lists(st.floats(-1e3, 1e3), min_size=2, max_size=6),
    shift=st.floats(-10, 10),
)
def test_ema_update_is_the_lerp(decay, values, shift):
    src = {"a": torch.tensor(values, dtype=torch.float64), "b": torch.tensor([shift], dtype=torch.float64)}
    tgt = {"a": torch.tensor(values, dtype=torch.float64) + shift, "b": torch.tensor([0.0], dtype=torch.float64)}
    want = {k: decay * tgt[k] + (1 - decay) * src[k] for k in tgt}
    before_src = {k: v.clone() for k, v in src.items()}
    ema_update_(tgt, src, decay)
    for k in tgt:
        assert torch.allclose(tgt[k], want[k], atol=1e-9 * (1 + want[k].abs().max()))
        assert torch.equal(src[k], before_src[k])


def test_ema_update_copies_at_zero_keeps_at_one_and_accepts_lists():
    p = torch.nn.Parameter(torch.randn(3, 4))
    t = [torch.zeros(3, 4)]
    ema_update_(t, [p], 0.0)
    assert torch.equal(t[0], p.detach())
    ema_update_(t, [p * 2], 1.0)
    assert torch.equal(t[0], p.detach())
    with pytest.raises(ValueError, match="decay"):
        ema_update_(t, [p], 1.5)
    with pytest.raises(ValueError, match="different keys"):
        ema_update_({"a": torch.zeros(1)}, {"b": torch.zeros(1)}, 0.5)
    with pytest.raises(ValueError, match="shape"):
        ema_update_([torch.zeros(2)], [torch.zeros(3)], 0.5)


# ---- update_cosines ------------------------------------------------------------------------------
def test_update_cosines_match_explicit_gradients():
    torch.manual_seed(0)
    shared = torch.randn(6, requires_grad=True)
    c = torch.randn(3, 6)
    losses = {"a": (c[0] * shared).sum(), "b": (c[1] * shared).sum(), "z": (0 * shared).sum()}
    cos, valid = update_cosines(losses, shared)
    mean = (c[0] + c[1]) / 2  # the zero gradient of "z" is left out of the mean
    for k, g in (("a", c[0]), ("b", c[1])):
        assert cos[k] == pytest.approx(float(torch.dot(g, mean) / (g.norm() * mean.norm())), abs=1e-6)
    assert valid == {"a": True, "b": True, "z": False} and cos["z"] == 0.0
    # an explicit update direction: here the gradient of a's loss itself
    cos, _ = update_cosines(losses, shared, update=losses["a"])
    assert cos["a"] == pytest.approx(1.0)
    assert cos["b"] == pytest.approx(float(torch.dot(c[0], c[1]) / (c[0].norm() * c[1].norm())), abs=1e-6)
    # the graph is kept for the real backward
    sum(losses.values()).backward()
    assert torch.allclose(shared.grad, c[0] + c[1])


# ---- nft_losses(reduction="none") ---------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), keep=st.lists(st.booleans(), min_size=6, max_size=6))
def test_per_sample_nft_losses_average_to_the_mean_loss_and_zero_left_out_samples(seed, keep):
    from marble_opt.rl import nft_losses

    g = torch.Generator().manual_seed(seed)
    b = 6
    v = torch.randn(b, 4, generator=g, dtype=torch.float64, requires_grad=True)
    v_old, x0, xt = (torch.randn(b, 4, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.rand(b, generator=g, dtype=torch.float64)
    adv = {"a": torch.randn(b, generator=g), "b": torch.randn(b, generator=g)}
    masks = {"a": torch.tensor(keep), "b": torch.ones(b, dtype=torch.bool)}
    mean = nft_losses(v, v_old, x0, xt, t, adv, masks=masks)
    per = nft_losses(v, v_old, x0, xt, t, adv, masks=masks, reduction="none")
    for k in adv:
        assert per.losses[k].shape == (b,)
        assert torch.allclose(per.losses[k].mean(), mean.losses[k].to(per.losses[k].dtype), rtol=1e-6, atol=1e-9)
    assert torch.all(per.losses["a"][~torch.tensor(keep)] == 0)
    # each kept sample's loss depends on its own velocity only
    (grad,) = torch.autograd.grad(per.losses["b"][0], v)
    assert torch.all(grad[1:] == 0) and grad[0].abs().sum() > 0
    with pytest.raises(ValueError, match="reduction"):
        nft_losses(v, v_old, x0, xt, t, adv, reduction="sum")
