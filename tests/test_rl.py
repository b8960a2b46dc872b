"""marble_opt.rl: per-reward group advantages and DiffusionNFT losses.

The expected values are written out here from SPEC's formulas, independently of the
implementation: advantages from a per-group numpy loop, the NFT loss from its definition.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from marble_opt import MarbleOptimizer
from marble_opt.rl import group_advantages, nft_losses, optimality_probability, reward_masks

torch.set_num_threads(1)
NAN = float("nan")


# ---- group_advantages ----------------------------------------------------------------------


def reference_advantages(r: np.ndarray, g: np.ndarray, *, global_std: bool, eps: float) -> np.ndarray:
    """SPEC: A(i) = (R(i) − mean of R over i's group) / (std + eps), over valid (finite) rewards;
    std over the whole batch (population) or within the group; 0 for NaN rewards and for a
    group whose valid rewards are all equal."""
    valid = np.isfinite(r)
    out = np.zeros(len(r))
    batch_std = float(np.std(r[valid])) if valid.any() else 0.0
    for gid in np.unique(g):
        idx = (g == gid) & valid
        if not idx.any():
            continue
        vals = r[idx]
        if vals.max() == vals.min():
            continue
        std = batch_std if global_std else float(np.std(vals))
        out[idx] = (vals - vals.mean()) / (std + eps)
    return out


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 2.0, 3.0, 10.0, 14.0, 5.0, 5.0])
    g = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    valid = r.double()
    std_all = valid.std(unbiased=False).item()
    centred = [-1.0, 0.0, 1.0, -2.0, 2.0, 0.0, 0.0]
    out = group_advantages({"a": r}, g)["a"]
    torch.testing.assert_close(out, torch.tensor([c / (std_all + 1e-4) for c in centred]))
    per_group = group_advantages({"a": r}, g, global_std=False)["a"]
    stds = [math.sqrt(2 / 3)] * 3 + [2.0, 2.0] + [0.0, 0.0]
    torch.testing.assert_close(per_group, torch.tensor([c / (s + 1e-4) for c, s in zip(centred, stds)]))
    assert out.dtype == torch.float32 and set(group_advantages({"a": r, "b": -r}, g)) == {"a", "b"}


def test_group_of_equal_rewards_gives_exact_zeros_not_nan():
    # 0.1 three times: the float mean differs from 0.1 in the last bit
    r = torch.tensor([0.1, 0.1, 0.1, 0.3, 0.7], dtype=torch.float64)
    g = torch.tensor([4, 4, 4, 9, 9])
    for global_std in (True, False):
        for eps in (1e-4, 0.0):
            out = group_advantages({"a": r}, g, global_std=global_std, eps=eps)["a"]
            assert torch.equal(out[:3], torch.zeros(3)), (global_std, eps)
            assert torch.isfinite(out).all()
    # every reward equal in the whole batch: zeros, even with eps=0 (std 0)
    out = group_advantages({"a": torch.full((6,), 0.3)}, torch.arange(6) // 3, eps=0.0)["a"]
    assert torch.equal(out, torch.zeros(6))


def test_nan_rewards_get_zero_advantage_and_are_left_out_of_means_and_stds():
    r = torch.tensor([1.0, NAN, 3.0, 7.0, NAN, 9.0, NAN])
    g = torch.tensor([0, 0, 0, 1, 1, 1, 2])
    out = group_advantages({"ocr": r, "other": torch.arange(7.0)}, g)
    assert torch.equal(out["ocr"][[1, 4, 6]], torch.zeros(3))
    kept = torch.tensor([1.0, 3.0, 7.0, 9.0]).double()
    std = kept.std(unbiased=False).item()  # over the valid rewards only
    torch.testing.assert_close(out["ocr"][[0, 2, 3, 5]], torch.tensor([-1.0, 1.0, -1.0, 1.0]) / (std + 1e-4))
    # the NaNs of one reward do not touch another reward's advantages
    torch.testing.assert_close(out["other"], group_advantages({"other": torch.arange(7.0)}, g)["other"])


def test_group_advantages_errors():
    g = torch.tensor([0, 0, 1])
    with pytest.raises(ValueError, match="non-empty dict"):
        group_advantages({}, g)
    with pytest.raises(ValueError, match="group_ids must be a 1-D tensor"):
        group_advantages({"a": torch.zeros(3)}, g[None])
    with pytest.raises(ValueError, match=r"rewards\['a'\] must have shape \(3,\), got \(4,\)"):
        group_advantages({"a": torch.zeros(4)}, g)
    with pytest.raises(ValueError, match="eps must be a finite float >= 0"):
        group_advantages({"a": torch.zeros(3)}, g, eps=-1.0)


rewards_and_groups = st.integers(1, 24).flatmap(
    lambda n: st.tuples(
        st.lists(st.one_of(st.integers(-40, 40).map(lambda v: v / 8.0), st.just(NAN)), min_size=n, max_size=n),
        st.lists(st.integers(0, 4), min_size=n, max_size=n),
    )
)


@settings(max_examples=150, deadline=None)
@given(rewards_and_groups, st.booleans(), st.sampled_from([1e-4, 0.0]))
def test_group_advantages_match_the_reference(data, global_std, eps):
    r, g = np.array(data[0]), np.array(data[1])
    out = group_advantages({"a": torch.tensor(r)}, torch.tensor(g), global_std=global_std, eps=eps)["a"]
    expected = reference_advantages(r, g, global_std=global_std, eps=eps)
    assert torch.isfinite(out).all()
    assert torch.equal(out[torch.from_numpy(~np.isfinite(r))], torch.zeros(int((~np.isfinite(r)).sum())))
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)


@settings(max_examples=100, deadline=None)
@given(
    rewards_and_groups, st.booleans(), st.floats(0.5, 8.0), st.floats(-10.0, 10.0), st.randoms(use_true_random=False)
)
def test_group_advantages_properties(data, global_std, scale, shift, rnd):
    r, g = torch.tensor(data[0]), torch.tensor(data[1])
    a = group_advantages({"a": r}, g, global_std=global_std, eps=0.0)["a"]
    valid = torch.isfinite(r)
    # centred within every group (over its valid samples)
    for gid in g.unique():
        sel = (g == gid) & valid
        assert abs(float(a[sel].double().sum())) < 1e-4
    # equivariant to a permutation of the samples; invariant to relabelling the groups
    perm = list(range(len(r)))
    rnd.shuffle(perm)
    perm = torch.tensor(perm)
    a_perm = group_advantages({"a": r[perm]}, g[perm], global_std=global_std, eps=0.0)["a"]
    torch.testing.assert_close(a_perm, a[perm], rtol=1e-5, atol=1e-5)
    relabelled = group_advantages({"a": r}, 100 - 7 * g, global_std=global_std, eps=0.0)["a"]
    torch.testing.assert_close(relabelled, a, rtol=1e-5, atol=1e-5)
    # invariant to a positive affine change of the reward; odd under a sign flip
    moved = group_advantages({"a": scale * r + shift}, g, global_std=global_std, eps=0.0)["a"]
    torch.testing.assert_close(moved, a, rtol=1e-4, atol=1e-4)
    flipped = group_advantages({"a": -r}, g, global_std=global_std, eps=0.0)["a"]
    torch.testing.assert_close(flipped, -a, rtol=1e-5, atol=1e-5)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-5, 5), min_size=2, max_size=16))
def test_one_group_global_and_per_group_std_agree(values):
    r = torch.tensor(values, dtype=torch.float64)
    g = torch.zeros(len(values), dtype=torch.long)
    a = group_advantages({"a": r}, g)["a"]
    b = group_advantages({"a": r}, g, global_std=False)["a"]
    torch.testing.assert_close(a, b)


# ---- nft_losses --------------------------------------------------------------------------------


def test_optimality_probability():
    a = torch.tensor([-100.0, -5.0, -2.5, 0.0, 2.5, 5.0, 100.0])
    torch.testing.assert_close(optimality_probability(a), torch.tensor([0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]))
    torch.testing.assert_close(optimality_probability(a, clip=10.0)[2], torch.tensor(0.375))


def nft_problem(batch: int = 6, shape=(3, 4), k: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, *shape, generator=gen, dtype=torch.float64)
    eps = torch.randn(batch, *shape, generator=gen, dtype=torch.float64)
    t = torch.rand(batch, generator=gen, dtype=torch.float64) * 0.9 + 0.05
    tt = t.view(batch, 1, 1)
    x_t = (1 - tt) * x0 + tt * eps
    v_old = eps - x0 + 0.3 * torch.randn(batch, *shape, generator=gen, dtype=torch.float64)
    v_theta = (v_old + 0.2 * torch.randn(batch, *shape, generator=gen, dtype=torch.float64)).requires_grad_()
    # advantages beyond ±C too, so the clipping is exercised
    adv = {f"r{j}": 4.0 * torch.randn(batch, generator=gen, dtype=torch.float64) for j in range(k)}
    return v_theta, v_old, x0, x_t, t, adv


def reference_nft_loss(v_theta, v_old, x0, x_t, t, adv, beta=0.1, clip=5.0):
    """SPEC's DiffusionNFT loss of one reward, written out sample by sample."""
    total = 0.0
    for i in range(v_theta.shape[0]):
        vp = beta * v_theta[i] + (1 - beta) * v_old[i]
        vn = (1 + beta) * v_old[i] - beta * v_theta[i]
        ep = x_t[i] - t[i] * vp - x0[i]
        en = x_t[i] - t[i] * vn - x0[i]
        p = (ep**2).mean() / ep.detach().abs().mean()
        n = (en**2).mean() / en.detach().abs().mean()
        r = min(max(float(adv[i]), -clip), clip) / (2 * clip) + 0.5
        total = total + clip * (r * p + (1 - r) * n) / beta
    return total / v_theta.shape[0]


def grad_v(loss, v):
    return torch.autograd.grad(loss, v, retain_graph=True)[0]


def test_nft_loss_matches_the_spec_formula():
    v, v_old, x0, x_t, t, adv = nft_problem()
    out = nft_losses(v, v_old, x0, x_t, t, adv, beta=0.1, adv_clip=5.0)
    assert out.kl is None
    for name, a in adv.items():
        ref = reference_nft_loss(v, v_old, x0, x_t, t, a)
        torch.testing.assert_close(out.losses[name], ref)
        torch.testing.assert_close(grad_v(out.losses[name], v), grad_v(ref, v))


def test_combined_backward_equals_the_weighted_sum_of_single_gradients():
    v, v_old, x0, x_t, t, adv = nft_problem()
    out = nft_losses(v, v_old, x0, x_t, t, adv)
    w = [0.7, -0.2, 1.9]
    one_by_one = sum(wk * grad_v(loss, v) for wk, loss in zip(w, out.losses.values()))
    combined = grad_v(sum(wk * loss for wk, loss in zip(w, out.losses.values())), v)
    torch.testing.assert_close(combined, one_by_one)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_affine_identity_weighted_sum_equals_the_loss_of_the_mean_probability(seed):
    v, v_old, x0, x_t, t, adv = nft_problem(seed=seed)
    out = nft_losses(v, v_old, x0, x_t, t, adv)
    w = torch.tensor(np.random.default_rng(seed).dirichlet(np.ones(3)))
    r_bar = sum(wk * optimality_probability(a) for wk, a in zip(w, adv.values()))
    # the advantage that maps to r̄: invert r = A/(2C) + ½ (|A| ≤ C since r̄ ∈ [0, 1])
    a_bar = (r_bar - 0.5) * 2 * 5.0
    assert a_bar.abs().max() <= 5.0 + 1e-12
    single = nft_losses(v, v_old, x0, x_t, t, {"mean": a_bar}).losses["mean"]
    combined = sum(wk * loss for wk, loss in zip(w, out.losses.values()))
    torch.testing.assert_close(combined, single)
    torch.testing.assert_close(grad_v(combined, v), grad_v(single, v))
    # combining the advantages before clipping (the authors' shortcut) is not the same
    naive = nft_losses(v, v_old, x0, x_t, t, {"m": sum(wk * a for wk, a in zip(w, adv.values()))}).losses["m"]
    assert any(a.abs().max() > 5 for a in adv.values())
    assert not torch.allclose(naive, combined)


def test_masks_leave_samples_out_of_that_reward_only():
    v, v_old, x0, x_t, t, adv = nft_problem(batch=8)
    mask = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1], dtype=torch.bool)
    adv["r0"] = torch.where(mask, adv["r0"], torch.full_like(adv["r0"], NAN))  # masked rewards may be NaN
    out = nft_losses(v, v_old, x0, x_t, t, adv, masks={"r0": mask})
    keep = mask.nonzero().squeeze(1)
    sub = nft_losses(v[keep], v_old[keep], x0[keep], x_t[keep], t[keep], {"r0": adv["r0"][keep]}).losses["r0"]
    torch.testing.assert_close(out.losses["r0"], sub)
    g = grad_v(out.losses["r0"], v)
    assert torch.isfinite(g).all()
    assert torch.equal(g[~mask], torch.zeros_like(g[~mask]))
    # the other rewards still see every sample
    full = nft_losses(v, v_old, x0, x_t, t, {"r1": adv["r1"]}).losses["r1"]
    torch.testing.assert_close(out.losses["r1"], full)


def test_non_finite_advantages_are_left_out_without_a_mask():
    v, v_old, x0, x_t, t, adv = nft_problem(batch=5)
    a = adv["r0"].clone()
    a[2] = NAN
    masked = nft_losses(v, v_old, x0, x_t, t, {"r0": adv["r0"]}, masks={"r0": torch.arange(5) != 2}).losses["r0"]
    torch.testing.assert_close(nft_losses(v, v_old, x0, x_t, t, {"r0": a}).losses["r0"], masked)


def test_chained_helpers_leave_samples_with_nan_rewards_out_of_that_reward():
    """group_advantages → nft_losses(masks=reward_masks(rewards)): a NaN reward's samples
    get no gradient from that reward's loss, which averages over its valid samples only
    (SPEC); the same samples still count for the other rewards."""
    v, v_old, x0, x_t, t, _ = nft_problem(batch=8)
    gen = torch.Generator().manual_seed(3)
    rewards = {
        "ocr": torch.randn(8, generator=gen, dtype=torch.float64),
        "bright": torch.randn(8, generator=gen, dtype=torch.float64),
    }
    applies = torch.tensor([1, 0, 1, 1, 0, 1, 0, 1], dtype=torch.bool)
    rewards["ocr"] = torch.where(applies, rewards["ocr"], torch.full_like(rewards["ocr"], NAN))
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    adv = group_advantages(rewards, groups)
    masks = reward_masks(rewards)
    assert torch.equal(masks["ocr"], applies) and bool(masks["bright"].all())
    out = nft_losses(v, v_old, x0, x_t, t, adv, masks=masks)
    keep = applies.nonzero().squeeze(1)
    sub = nft_losses(v[keep], v_old[keep], x0[keep], x_t[keep], t[keep], {"ocr": adv["ocr"][keep].double()}).losses[
        "ocr"
    ]
    torch.testing.assert_close(out.losses["ocr"], sub)
    g = grad_v(out.losses["ocr"], v)
    assert torch.equal(g[~applies], torch.zeros_like(g[~applies]))
    assert bool((grad_v(out.losses["bright"], v)[~applies].abs().sum(dim=(1, 2)) > 0).all())
    # without the masks the NaN samples would train at r = 1/2: a different loss
    unmasked = nft_losses(v, v_old, x0, x_t, t, adv).losses["ocr"]
    assert not torch.allclose(unmasked, out.losses["ocr"])
    with pytest.raises(ValueError, match="rewards"):
        reward_masks({})


def test_a_reward_with_no_valid_sample_gives_zero_loss_on_the_graph():
    v, v_old, x0, x_t, t, adv = nft_problem(batch=4)
    out = nft_losses(v, v_old, x0, x_t, t, adv, masks={"r1": torch.zeros(4, dtype=torch.bool)})
    assert out.losses["r1"].item() == 0.0 and out.losses["r1"].requires_grad
    assert torch.equal(grad_v(out.losses["r1"], v), torch.zeros_like(v))


def test_kl_term():
    v, v_old, x0, x_t, t, adv = nft_problem()
    v_ref = (v_old + 0.5).requires_grad_()
    out = nft_losses(v, v_old, x0, x_t, t, adv, v_ref=v_ref, kl_weight=0.01)
    torch.testing.assert_close(out.kl, 0.01 * ((v - v_ref) ** 2).mean())
    torch.testing.assert_close(grad_v(out.kl, v), 0.02 * (v - v_ref).detach() / v.numel())
    assert out.kl.grad_fn is not None
    assert torch.autograd.grad(out.kl, v_ref, allow_unused=True)[0] is None  # the reference is frozen
    # the per-reward losses do not include it
    torch.testing.assert_close(out.losses["r0"], nft_losses(v, v_old, x0, x_t, t, adv).losses["r0"])


def test_nft_shape_and_argument_errors():
    v, v_old, x0, x_t, t, adv = nft_problem(batch=4)
    bad = torch.zeros(4, 3, 5, dtype=torch.float64)
    for name, args in {
        "v_old": (v, bad, x0, x_t, t),
        "x0": (v, v_old, bad, x_t, t),
        "x_t": (v, v_old, x0, bad, t),
    }.items():
        with pytest.raises(ValueError, match=rf"{name} must have the shape of v_theta \(4, 3, 4\), got \(4, 3, 5\)"):
            nft_losses(*args, adv)
    with pytest.raises(ValueError, match=r"t must have shape \(4,\), got \(4, 1\)"):
        nft_losses(v, v_old, x0, x_t, t[:, None], adv)
    with pytest.raises(ValueError, match=r"advantages\['r1'\] must have shape \(4,\), got \(3,\)"):
        nft_losses(v, v_old, x0, x_t, t, {**adv, "r1": adv["r1"][:3]})
    with pytest.raises(ValueError, match=r"masks\['r0'\] must have shape \(4,\), got \(2, 2\)"):
        nft_losses(v, v_old, x0, x_t, t, adv, masks={"r0": torch.ones(2, 2, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"masks has keys \['typo'\] that are not rewards"):
        nft_losses(v, v_old, x0, x_t, t, adv, masks={"typo": torch.ones(4, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"v_ref must have the shape of v_theta"):
        nft_losses(v, v_old, x0, x_t, t, adv, v_ref=bad)
    with pytest.raises(ValueError, match="beta must be > 0"):
        nft_losses(v, v_old, x0, x_t, t, adv, beta=0.0)
    with pytest.raises(ValueError, match="adv_clip must be > 0"):
        nft_losses(v, v_old, x0, x_t, t, adv, adv_clip=-1.0)
    with pytest.raises(ValueError, match="advantages must be a non-empty dict"):
        nft_losses(v, v_old, x0, x_t, t, {})


# ---- sign test: a tiny DiffusionNFT loop on a toy flow model -----------------------------------


class ToyFlow(nn.Module):
    """v_θ(x_t, t) for 4-pixel "images"; sampling integrates dx/dt = v from t=1 to 0."""

    def __init__(self, dim: int = 4, width: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim + 1, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, dim)
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, t[:, None]], dim=1))


@torch.no_grad()
def sample(model: nn.Module, noise: torch.Tensor, steps: int = 6) -> torch.Tensor:
    x = noise
    ts = torch.linspace(1.0, 0.0, steps + 1)
    for i in range(steps):
        x = x - (ts[i] - ts[i + 1]) * model(x, ts[i].expand(x.shape[0]))
    return x


def brightness(x0: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(x0).mean(dim=1)


def nft_loop(sign: float, *, marble: bool, epochs: int = 10, batch: int = 64, seed: int = 0) -> tuple[float, float]:
    torch.manual_seed(seed)
    model = ToyFlow()
    probe = torch.randn(256, 4)
    before = brightness(sample(model, probe)).mean().item()
    inner = torch.optim.AdamW(model.parameters(), lr=3e-3)
    opt = MarbleOptimizer(inner, gram="shared") if marble else inner
    reference = copy.deepcopy(model).requires_grad_(False)
    groups = torch.arange(batch) // 8
    for _ in range(epochs):
        old = copy.deepcopy(model).requires_grad_(False)  # the sampling policy of this epoch
        x0 = sample(old, torch.randn(batch, 4))
        rewards = {"brightness": sign * brightness(x0)}
        if marble:  # a second, agreeing reward that is NaN on a quarter of the samples
            half = sign * torch.sigmoid(x0[:, :2]).mean(dim=1)
            rewards["left_half"] = torch.where(torch.arange(batch) % 4 == 0, torch.full_like(half, NAN), half)
        adv = group_advantages(rewards, groups)
        masks = {name: torch.isfinite(r) for name, r in rewards.items()}
        for _ in range(4):
            t = torch.rand(batch) * 0.98 + 0.01
            x_t = (1 - t[:, None]) * x0 + t[:, None] * torch.randn_like(x0)
            v = model(x_t, t)
            with torch.no_grad():
                v_old, v_ref = old(x_t, t), reference(x_t, t)
            out = nft_losses(v, v_old, x0, x_t, t, adv, masks=masks, v_ref=v_ref)
            opt.zero_grad()
            if marble:
                report = opt.step(out.losses, shared=v, extra=out.kl)
                assert not report.skipped
            else:
                (out.losses["brightness"] + out.kl).backward()
                opt.step()
    return before, brightness(sample(model, probe)).mean().item()


@pytest.mark.parametrize("marble", [False, True], ids=["plain", "marble-shared"])
def test_nft_raises_the_reward_and_lowers_it_with_the_sign_flipped(marble):
    before, up = nft_loop(+1.0, marble=marble)
    before_down, down = nft_loop(-1.0, marble=marble)
    assert before == before_down
    assert up > before + 0.15, (before, up)
    assert down < before - 0.15, (before, down)
