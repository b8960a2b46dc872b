"""Reliability round 3 (issue 18): one small test per item that is not a distributed run.

The 2-process items (cross estimator with unequal local batches and per-rank groups, a
random weighting, one rank's bad input) are scenarios of ``tests/_dist_worker.py``, checked in
``tests/test_distributed.py``; the FSDP layouts swapped in after construction are refusal
cases of ``tests/_fsdp2_opt_worker.py``; the one-half objective of the cross estimator is in
``tests/test_cross_gram.py``.
"""

from __future__ import annotations

import copy
import io
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import marble_opt
from marble_opt import MarbleOptimizer, MinNormSolver, loss_weights, min_norm_weights

FOREIGN = "found gradients that no backward\\(losses\\) of this accumulation wrote"


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x))


_GEN = torch.Generator().manual_seed(18)
X = torch.randn(32, 4, generator=_GEN)
Y = torch.randn(32, 3, generator=_GEN)


def make_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def losses_of(net: nn.Module, step: int = 0, scale: float = 1.0) -> dict[str, torch.Tensor]:
    x, y = X[step % 4 * 8 : step % 4 * 8 + 8], Y[step % 4 * 8 : step % 4 * 8 + 8]
    out = net(x)
    return {
        "a": scale * ((out[:, 0] - y[:, 0]) ** 2).mean(),
        "b": scale * ((out[:, 1] + out[:, 0] - y[:, 1]) ** 2).mean(),
        "c": scale * (0.3 * (out[:, 2] - out[:, 0] - y[:, 2]) ** 2).mean(),
    }


def flat(net: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()]).clone()


# ---- item 4: a stateful TorchJD-style weighting (GradVac) ------------------------------------
def test_a_stateful_callable_weighting_resumes_bit_for_bit() -> None:
    """GradVac keeps an EMA of the pairwise cosines (a buffer): it is saved in
    ``state_dict()["marble"]["weighting_state"]`` and a run resumed from a checkpoint (through
    ``torch.save``/``torch.load(weights_only=True)``, a fresh GradVac object) steps exactly as
    the uninterrupted one. GradVac also draws a permutation from torch's global RNG: the
    checkpoint carries that RNG state, as a training script's would."""
    tja = pytest.importorskip("torchjd.aggregation")

    def run(resume_at: int | None) -> tuple[torch.Tensor, dict]:
        net = make_net(1)
        torch.manual_seed(5)

        def build() -> MarbleOptimizer:
            return MarbleOptimizer(torch.optim.AdamW(net.parameters(), lr=1e-2), weighting=tja.GradVacWeighting())

        opt = build()
        for step in range(5):
            if step == resume_at:
                buf = io.BytesIO()
                torch.save({"opt": opt.state_dict(), "rng": torch.get_rng_state()}, buf)
                buf.seek(0)
                ckpt = torch.load(buf, weights_only=True)
                opt = build()
                opt.load_state_dict(ckpt["opt"])
                torch.set_rng_state(ckpt["rng"])
            opt.zero_grad()
            assert not opt.step(losses_of(net, step)).skipped
        return flat(net), opt.state_dict()["marble"]

    straight, state = run(None)
    resumed, _ = run(2)
    assert torch.equal(straight, resumed), (straight - resumed).abs().max()
    phi = state["weighting_state"]["tensors"]["_buffers._phi_t"]
    assert phi.shape == (3, 3) and phi.abs().sum() > 0  # GradVac's EMA is there and moved
    fresh, _ = run(None)
    assert torch.equal(straight, fresh)  # the recipe is deterministic: equality means something
    # without the weighting's state the resumed run is another run
    net = make_net(1)
    torch.manual_seed(5)
    opt = MarbleOptimizer(torch.optim.AdamW(net.parameters(), lr=1e-2), weighting=tja.GradVacWeighting())
    for step in range(5):
        if step == 2:
            sd = opt.state_dict()
            del sd["marble"]["weighting_state"]
            rng = torch.get_rng_state()
            opt = MarbleOptimizer(torch.optim.AdamW(net.parameters(), lr=1e-2), weighting=tja.GradVacWeighting())
            opt.load_state_dict(sd)
            torch.set_rng_state(rng)
        opt.zero_grad()
        opt.step(losses_of(net, step))
    assert not torch.equal(flat(net), straight)


def test_a_stateful_callable_sees_the_full_gram_when_an_objective_is_excluded() -> None:
    """nonfinite="exclude": GradVac's per-pair state is K×K, so on a step that leaves an
    objective out it still gets the K×K Gram, with that objective's row and column zero (not
    a smaller matrix that would misalign its state); the excluded weight is 0."""
    tja = pytest.importorskip("torchjd.aggregation")
    net = make_net(2)
    gradvac = tja.GradVacWeighting()
    seen: list[torch.Tensor] = []
    forward = gradvac.forward

    def spy(gram: torch.Tensor) -> torch.Tensor:
        seen.append(gram.clone())
        return forward(gram)

    gradvac.forward = spy
    opt = MarbleOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), weighting=gradvac, nonfinite="exclude")
    reports = []
    for step in range(3):
        losses = losses_of(net, step)
        if step == 1:
            losses["b"] = losses["b"] * float("nan")
        opt.zero_grad()
        reports.append(opt.step(losses))
    assert [tuple(g.shape) for g in seen] == [(3, 3)] * 3
    assert reports[1].excluded == ("b",) and reports[1].loss_weights["b"] == 0.0
    gram = seen[1].numpy()
    assert (gram[1] == 0).all() and (gram[:, 1] == 0).all()
    keep = [0, 2]
    np.testing.assert_array_equal(gram[np.ix_(keep, keep)], reports[1].gram[np.ix_(keep, keep)])
    assert gradvac._phi_t.shape == (3, 3)


# ---- item 5: the torch habit ----------------------------------------------------------------
def test_loss_backward_then_plain_step_warns_once_per_optimizer() -> None:
    for _ in range(2):  # a second optimizer warns again: once per optimizer, not per process
        net = make_net(3)
        opt = MarbleOptimizer(torch.optim.SGD(net.parameters(), lr=0.1))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(3):
                sum(losses_of(net, step).values()).backward()
                opt.step()
                opt.zero_grad()
        foreign = [w for w in caught if "found gradients that no backward(losses)" in str(w.message)]
        assert len(foreign) == 1, [str(w.message) for w in caught]
        assert foreign[0].category is UserWarning
        assert "opt.step({'name': loss, ...})" in str(foreign[0].message)


def test_a_leftover_loss_backward_before_step_losses_warns() -> None:
    net = make_net(3)
    opt = MarbleOptimizer(torch.optim.SGD(net.parameters(), lr=0.1))
    sum(losses_of(net).values()).backward()  # forgotten: p.grad now holds the summed gradient
    with pytest.warns(UserWarning, match=FOREIGN):
        opt.step(losses_of(net))


def test_the_grad_scaler_and_accelerate_paths_stay_silent() -> None:
    """The documented recipes: ``opt.backward(scaled losses)`` then ``scaler.step(opt)``
    (with ``unscale_`` and clipping between), and accelerate's ``prepare`` with
    ``marble.backward(losses)`` then the wrapped ``opt.step()`` under ``accumulate``, or the
    positional ``opt.step(losses)`` through the wrapper."""
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        net = make_net(4)
        opt = MarbleOptimizer(torch.optim.SGD(net.parameters(), lr=0.1))
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        for step in range(3):
            report = opt.backward({k: scaler.scale(v) for k, v in losses_of(net, step).items()})
            assert not report.skipped
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        assert opt.num_steps == 3

    try:
        for how in ("backward", "positional"):
            net = make_net(5)
            marble = MarbleOptimizer(torch.optim.SGD(net.parameters(), lr=0.1))
            accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2 if how == "backward" else 1)
            model, opt = accelerator.prepare(net, marble)
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                for step in range(4):
                    with accelerator.accumulate(model):
                        if how == "backward":
                            marble.backward(losses_of(model, step))
                            if accelerator.sync_gradients:
                                accelerator.clip_grad_norm_(model.parameters(), 1.0)
                            opt.step()
                        else:
                            opt.step(losses_of(model, step))
                        opt.zero_grad()
            assert marble.num_steps == (2 if how == "backward" else 4)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


# ---- item 7a: tiny losses --------------------------------------------------------------------
def test_losses_scaled_by_1e_14_still_train() -> None:
    """Gradients of norm ≤ 1e-12 used to count as zero: every step skipped with the false
    reason "no objective has a finite, non-zero gradient". MARBLE normalises, so with
    ``rescale=False`` (unit-scale update) the tiny losses take the same steps as the plain
    ones, up to rounding."""
    runs = []
    for scale in (1.0, 1e-14):
        net = make_net(6)
        opt = MarbleOptimizer(torch.optim.SGD(net.parameters(), lr=0.05), rescale=False, ema_decay=0.0)
        before = flat(net)
        for step in range(3):
            opt.zero_grad()
            report = opt.step(losses_of(net, step, scale))
            assert not report.skipped and report.excluded == () and report.reason == "", report.reason
            assert 0.0 < max(report.grad_norms.values()) < (1e-12 if scale < 1 else np.inf)
        runs.append(flat(net))
        assert (runs[-1] - before).abs().max() > 1e-3  # it trains
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-5, atol=1e-6)


# ---- item 7b: min_norm_weights does not depend on earlier calls -----------------------------
def test_min_norm_weights_is_the_same_whatever_was_solved_before() -> None:
    """On a rank-deficient G the minimiser is not unique; the answer used to depend on the
    state that a cached OSQP workspace kept from earlier calls of the same K."""
    for seed in range(40):
        rng = np.random.default_rng(seed)
        jac = rng.normal(size=(6, 3)) @ rng.normal(size=(3, 6))  # 6 gradients of rank 3
        gram = jac @ jac.T
        first = min_norm_weights(gram)
        for _ in range(3):  # other problems of the same size in between
            other = rng.normal(size=(6, 6))
            min_norm_weights(other @ other.T)
        np.testing.assert_array_equal(min_norm_weights(gram), first, err_msg=f"seed {seed}")
        np.testing.assert_array_equal(MinNormSolver().solve(gram)[0], first, err_msg=f"seed {seed}")


# ---- item 7d: load_state_dict validates the "marble" entry ------------------------------------
def _trained() -> tuple[MarbleOptimizer, dict]:
    net = make_net(7)
    opt = MarbleOptimizer(torch.optim.AdamW(net.parameters(), lr=1e-2), refresh_every=2)
    for step in range(3):
        opt.zero_grad()
        opt.step(losses_of(net, step))
    return opt, opt.state_dict()


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("weighting", "upgrad", r"\['weighting'\] = 'upgrad', but this optimizer uses weighting='marble'"),
        ("ema", torch.tensor([0.5, float("nan"), 0.5]), r"\['ema'\] = \[0.5, nan, 0.5\] is not finite"),
        ("ema", torch.tensor([0.5, 0.5]), r"\['ema'\] has shape \(2,\), but the state names 3 objectives"),
        ("ema", torch.tensor([0.9, 0.9, 0.9]), r"\['ema'\] = .* is not on the simplex"),
        ("loss_weights", torch.tensor([1.0, 2.0, 3.0, 4.0]), r"\['loss_weights'\] has shape \(4,\)"),
        ("last_raw", "abc", r"\['last_raw'\] must be a vector of numbers, got 'abc'"),
        ("num_steps", -1, r"\['num_steps'\] must be an int >= 0, got -1"),
        ("num_steps", 2.5, r"\['num_steps'\] must be an int >= 0, got 2.5"),
        ("names", ["a", "a", "b"], r"\['names'\] has duplicates"),
        ("gram_ema", torch.eye(3), r"\['gram_ema'\] holds a cross estimate"),
        ("weighting_state", {"tensors": {}}, r"\['weighting_state'\] holds a stateful weighting's own state"),
    ],
)
def test_load_state_dict_validates_the_marble_entry_and_loads_nothing(key, value, message) -> None:
    opt, good = _trained()
    bad = copy.deepcopy(good)
    bad["marble"][key] = value
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=r"state_dict\['marble'\]" + message):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    assert after["marble"].keys() == before["marble"].keys()
    for k, v in before["marble"].items():
        assert torch.equal(v, after["marble"][k]) if isinstance(v, torch.Tensor) else v == after["marble"][k], k
    assert all(
        torch.equal(before["state"][i]["exp_avg"], after["state"][i]["exp_avg"]) for i in before["state"]
    )  # the wrapped optimizer's state was not loaded either
    opt.load_state_dict(good)  # the good one still loads


# ---- items 7e, 7f, 7h: weighting options -----------------------------------------------------
def test_a_preference_without_an_anchor_is_refused() -> None:
    """MARBLE mixes the preference into α only through the anchor; with anchor=0 (the
    default) it used to be accepted and silently ignored."""
    net = make_net(8)
    with pytest.raises(ValueError, match=r"preference=\[1.0, 3.0, 1.0\] has no effect with anchor=0.*'anchor': 0.5"):
        MarbleOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), weighting_options={"preference": [1.0, 3.0, 1.0]})
    with pytest.raises(ValueError, match="preference=.* has no effect with anchor=0"):
        loss_weights(np.eye(3), "marble", preference=[1.0, 3.0, 1.0], anchor=0.0)
    opt = MarbleOptimizer(
        torch.optim.SGD(net.parameters(), lr=0.1), weighting_options={"preference": [1.0, 3.0, 1.0], "anchor": 0.5}
    )
    assert opt.weighting.preference.tolist() == [1.0, 3.0, 1.0] and opt.weighting.anchor == 0.5


def test_imtl_g_rtol_is_validated() -> None:
    net = make_net(8)
    for rtol in (-1e-3, -1, 1.0, 2, "1e-3", float("nan"), True, [1e-3]):
        with pytest.raises(
            ValueError, match=r"rtol \(IMTL-G's relative cut-off of the pseudo-inverse\) must be a float"
        ):
            loss_weights(np.eye(2), "imtl-g", rtol=rtol)
        with pytest.raises(ValueError, match=r"rtol .* must be a float in \[0, 1\), got"):
            MarbleOptimizer(
                torch.optim.SGD(net.parameters(), lr=0.1), weighting="imtl-g", weighting_options={"rtol": rtol}
            )
    gram = np.array([[1.0, 0.2], [0.2, 2.0]])
    want = loss_weights(gram, "imtl-g", rtol=1e-6)
    for rtol in (0, 1e-6, np.float32(1e-6), torch.tensor(1e-6, dtype=torch.float64)):  # numbers are fine
        np.testing.assert_allclose(loss_weights(gram, "imtl-g", rtol=rtol), want, rtol=1e-12)


def test_ema_decay_and_anchor_accept_0d_tensors() -> None:
    net = make_net(9)
    opt = MarbleOptimizer(
        torch.optim.SGD(net.parameters(), lr=0.1),
        ema_decay=torch.tensor(0.5),
        weighting_options={"anchor": torch.tensor(0.25)},
    )
    assert opt.ema_decay == 0.5 and type(opt.ema_decay) is float
    assert opt.weighting.anchor == 0.25 and type(opt.weighting.anchor) is float
    opt.ema_decay = torch.tensor(0.3, dtype=torch.float64)  # e.g. from a schedule
    assert opt.ema_decay == 0.3 and type(opt.weighting.ema_decay) is float
    assert not opt.step(losses_of(net)).skipped
    for bad in (torch.tensor([0.5]), torch.tensor(True), torch.tensor(1.5), torch.tensor(0.5j)):
        with pytest.raises(ValueError, match="ema_decay must be a float in \\[0, 1\\), got tensor"):
            opt.ema_decay = bad
        with pytest.raises(ValueError, match="anchor must be a float in \\[0, 1\\], got tensor"):
            MarbleOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), weighting_options={"anchor": bad})


# ---- item 7g: a denormal Gram --------------------------------------------------------------
DENORMAL = {
    "equal": np.array([[1e-310, 0.5e-310], [0.5e-310, 1e-310]]),
    "duplicates": np.full((3, 3), 1e-310) + np.diag([1e-310] * 3),
    "mixed": np.array([[4e-310, -1e-310, 0.0], [-1e-310, 2e-310, 1e-310], [0.0, 1e-310, 3e-310]]),
    "one-tiny": np.diag([1e-310, 1.0]),
}


@pytest.mark.parametrize("case", list(DENORMAL))
def test_a_denormal_gram_gives_the_weights_of_the_scaled_gram(case: str) -> None:
    """UPGrad (and MARBLE) normalised G by 1/√(G_ii G_jj), which overflows for entries of
    1e-310: LinAlgError / NaN. Every built-in weighting is invariant to G → cG, so the
    weights must be those of the same Gram times 2^1000 (exact in floating point)."""
    gram = DENORMAL[case]
    for name in marble_opt.WEIGHTINGS:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            w = loss_weights(gram, name)
        assert np.isfinite(w).all(), (name, w)
        np.testing.assert_allclose(w, loss_weights(gram * 2.0**1000, name), rtol=1e-9, atol=0, err_msg=name)


# ---- items 7i, 7j: errors that name the key ------------------------------------------------
def test_bad_inputs_give_errors_that_name_the_key() -> None:
    net = make_net(10)
    opt = MarbleOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), weighting=lambda gram: None)
    with pytest.raises(TypeError, match=r"returned None for a 3×3 Gram matrix: it must return K weights"):
        opt.step(losses_of(net))
    cross = MarbleOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), gram_estimator="cross")
    out = net(X[:8])
    per_sample = {"a": (out[:, 0] - Y[:8, 0]) ** 2, "b": out[:, 1] ** 2}
    with pytest.raises(ValueError, match=r"groups\[0\] is None \(8 of 8 entries are\): groups= needs one id per"):
        cross.backward(per_sample, groups=[None] * 8)
    with pytest.raises(ValueError, match=r"groups\[3\] is None \(1 of 8"):
        cross.backward(per_sample, groups=[0, 0, 1, None, 2, 2, 3, 3])
    with pytest.raises(TypeError, match=r"groups must hold ids of one comparable kind"):
        cross.backward(per_sample, groups=[{"prompt": i // 2} for i in range(8)])
    with pytest.raises(TypeError, match=r"loss 'b' has dtype torch.int64: per-sample losses must be floating point"):
        cross.backward({"a": per_sample["a"], "b": torch.arange(8)})
    assert cross.names == () and all(p.grad is None for p in net.parameters())  # nothing happened
    with pytest.raises(ValueError, match=r"loss 'b' = 3.0 does not require grad"):
        opt.backward({"a": losses_of(net)["a"], "b": torch.tensor(3)})


def test_building_from_parameters_says_to_wrap_a_built_optimizer() -> None:
    net = make_net(11)
    how = r"MarbleOptimizer wraps a built torch optimizer: MarbleOptimizer\(torch.optim.AdamW\(params, lr=...\), ...\)"
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['lr'\]: " + how):
        MarbleOptimizer(net.parameters(), lr=1e-3)
    with pytest.raises(TypeError, match=r"optimizer must be a torch.optim.Optimizer, got generator; " + how):
        MarbleOptimizer(net.parameters())
