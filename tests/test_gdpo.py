"""GDPO's advantage (``marble_opt.rl.gdpo_advantages``) and ``train.py --combine gdpo``.

The reference is TRL 1.16's ``multi_objective_aggregation="normalize_then_sum"`` written out
here in numpy (consecutive groups of ``G`` generations, ``nanmean``/Bessel ``nanstd`` that is
NaN below two values, ``nansum`` over the rewards, batch normalisation, NaN advantages set to
0), independently of the implementation.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from marble_opt.rl import gdpo_advantages, group_advantages

torch.set_num_threads(1)
NAN = float("nan")
ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "examples" / "sd35_marble" / "train.py"


def _nanstd_bessel(x: np.ndarray, axis=None, keepdims=False) -> np.ndarray:
    """TRL's ``nanstd``: Bessel-corrected std over the non-NaN values, NaN below two of them."""
    count = np.sum(~np.isnan(x), axis=axis, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.nansum(x, axis=axis, keepdims=True) / count
        var = np.nansum((x - mean) ** 2, axis=axis, keepdims=True) / (count - 1)
    std = np.where(count > 1, np.sqrt(np.where(count > 1, var, 0.0)), np.nan)
    return std if keepdims else np.squeeze(std, axis=axis)


def trl_normalize_then_sum(rewards: np.ndarray, num_generations: int, weights: np.ndarray) -> np.ndarray:
    """TRL's normalize_then_sum on (B, K) rewards with NaNs; groups are consecutive rows."""
    b, k = rewards.shape
    grouped = rewards.reshape(-1, num_generations, k)
    with np.errstate(invalid="ignore"), __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("ignore", RuntimeWarning)  # nanmean of an all-NaN slice
        mean_k = np.nanmean(grouped, axis=1, keepdims=True)
    std_k = _nanstd_bessel(grouped, axis=1, keepdims=True) if num_generations > 1 else np.zeros_like(mean_k)
    reward_k = ((grouped - mean_k) / (std_k + 1e-4)).reshape(-1, k)
    summed = np.nansum(reward_k * weights[None, :], axis=1)
    summed[np.isnan(rewards).all(axis=1)] = np.nan
    std = np.full(b, float(_nanstd_bessel(summed))) if b > 1 else np.zeros(b)
    with np.errstate(invalid="ignore"):
        adv = (summed - np.nanmean(summed) if np.isfinite(summed).any() else summed) / (std + 1e-4)
    return np.nan_to_num(adv, nan=0.0)


def _gdpo(rewards: np.ndarray, group_ids, weights=None, **kw) -> torch.Tensor:
    names = [f"r{i}" for i in range(rewards.shape[1])]
    w = None if weights is None else {n: float(v) for n, v in zip(names, weights)}
    return gdpo_advantages(
        {n: torch.tensor(rewards[:, i]) for i, n in enumerate(names)}, torch.as_tensor(group_ids), weights=w, **kw
    )


# ---- by hand -------------------------------------------------------------------------------------
def test_gdpo_by_hand_with_weights_and_a_nan_reward():
    # two groups of three; reward b does not apply to sample 1 and to the whole of group 1
    a = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0])
    b = torch.tensor([10.0, NAN, 30.0, NAN, NAN, NAN])
    g = torch.tensor([0, 0, 0, 1, 1, 1])
    out = gdpo_advantages({"a": a, "b": b}, g, weights={"b": 2.0})
    # a: group 0 mean 2, Bessel std 1; group 1 mean 2, Bessel std sqrt(12)
    za = [-1 / 1.0001, 0.0, 1 / 1.0001] + [-2 / (12**0.5 + 1e-4)] * 2 + [4 / (12**0.5 + 1e-4)]
    # b: group 0 has two valid values 10, 30: mean 20, Bessel std sqrt(200); group 1 none
    zb = [-10 / (200**0.5 + 1e-4), 0.0, 10 / (200**0.5 + 1e-4), 0.0, 0.0, 0.0]
    s = np.array(za) + 2.0 * np.array(zb)
    want = (s - s.mean()) / (s.std(ddof=1) + 1e-4)
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-6, atol=1e-6)
    assert out.dtype == torch.float32 and out.shape == (6,)
    # the same numbers as TRL's formula
    r = torch.stack([a, b], 1).double().numpy()
    np.testing.assert_allclose(out.numpy(), trl_normalize_then_sum(r, 3, np.array([1.0, 2.0])), atol=1e-6)


def test_one_reward_is_its_group_z_score_normalised_over_the_batch():
    r = torch.tensor([0.3, 0.9, 0.1, 4.0, 5.0, 9.0, 2.0, 2.5])
    g = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    z = group_advantages({"r": r}, g, global_std=False, eps=0.0)["r"].double()
    # group_advantages uses the population std: rescale to Bessel's (groups of n: sqrt((n-1)/n))
    n = torch.tensor([3.0, 3, 3, 3, 3, 3, 2, 2], dtype=torch.float64)
    z = z * torch.sqrt((n - 1) / n)
    want = (z - z.mean()) / z.std()
    torch.testing.assert_close(gdpo_advantages({"r": r}, g, eps=0.0).double(), want, rtol=1e-5, atol=1e-6)


def test_single_sample_groups_and_groups_of_one_valid_value_add_nothing():
    # group size 1 everywhere: every per-reward advantage is 0, so is the batch's
    out = gdpo_advantages({"a": torch.arange(5.0), "b": torch.ones(5)}, torch.arange(5))
    assert torch.equal(out, torch.zeros(5))
    # reward b has one valid value in group 0: it adds nothing there; a alone decides
    a = torch.tensor([1.0, 3.0, 5.0, 7.0])
    b = torch.tensor([100.0, NAN, 1.0, 2.0])
    g = torch.tensor([0, 0, 1, 1])
    both = gdpo_advantages({"a": a, "b": b}, g).double()
    zb = torch.tensor([0.0, 0.0, -0.5, 0.5], dtype=torch.float64) / (0.5**0.5 + 1e-4)  # 1, 2: Bessel std √½
    za = torch.tensor([-1.0, 1.0, -1.0, 1.0], dtype=torch.float64) / (2**0.5 + 1e-4)
    s = za + zb
    torch.testing.assert_close(both, (s - s.mean()) / (s.std() + 1e-4), rtol=1e-5, atol=1e-6)


def test_zero_std_groups_give_exact_zeros_and_eps_zero_is_safe():
    # 0.1 three times: the float mean differs from 0.1 in the last bit; TRL would divide that by eps
    r = torch.tensor([0.1, 0.1, 0.1, 0.3, 0.7, 0.5], dtype=torch.float64)
    g = torch.tensor([4, 4, 4, 9, 9, 9])
    for eps in (1e-4, 0.0):
        out = gdpo_advantages({"a": r}, g, eps=eps)
        assert torch.isfinite(out).all()
        assert torch.equal(out[:3], torch.full((3,), float(out[0])))  # all equal: S = 0 in the group
        assert float(out[3]) < float(out[:3].mean()) < float(out[4])
    # every reward constant in its group: S = 0 everywhere, batch std 0: exact zeros
    out = gdpo_advantages({"a": torch.full((6,), 0.3), "b": torch.arange(6.0) // 3}, torch.arange(6) // 3, eps=0.0)
    assert torch.equal(out, torch.zeros(6))


def test_samples_no_reward_applies_to_are_nan_and_left_out_of_the_batch_statistics():
    a = torch.tensor([1.0, 2.0, NAN, 3.0, 5.0, NAN])
    b = torch.tensor([NAN, NAN, NAN, 0.0, 1.0, NAN])
    g = torch.tensor([0, 0, 0, 1, 1, 1])
    out = gdpo_advantages({"a": a, "b": b}, g)
    assert torch.isnan(out[[2, 5]]).all() and torch.isfinite(out[[0, 1, 3, 4]]).all()
    kept = out[[0, 1, 3, 4]].double()
    assert abs(float(kept.mean())) < 1e-6 and float(kept.std()) == pytest.approx(1.0, abs=1e-3)
    r = torch.stack([a, b], 1).double().numpy()
    np.testing.assert_allclose(
        torch.nan_to_num(out, nan=0.0).numpy(), trl_normalize_then_sum(r, 3, np.ones(2)), atol=1e-6
    )
    # only one scorable sample: its advantage is 0 (TRL: NaN std, set to 0)
    one = gdpo_advantages({"a": torch.tensor([1.0, NAN, NAN])}, torch.tensor([0, 0, 0]))
    assert float(one[0]) == 0.0 and torch.isnan(one[1:]).all()


def test_gdpo_errors():
    g = torch.tensor([0, 0, 1])
    with pytest.raises(ValueError, match="non-empty dict"):
        gdpo_advantages({}, g)
    with pytest.raises(ValueError, match="group_ids must be a 1-D tensor"):
        gdpo_advantages({"a": torch.zeros(3)}, g[None])
    with pytest.raises(ValueError, match=r"rewards\['a'\] must have shape \(3,\), got \(4,\)"):
        gdpo_advantages({"a": torch.zeros(4)}, g)
    with pytest.raises(ValueError, match="eps must be a finite float >= 0"):
        gdpo_advantages({"a": torch.zeros(3)}, g, eps=-1.0)
    with pytest.raises(ValueError, match=r"weights names \['c'\]"):
        gdpo_advantages({"a": torch.zeros(3)}, g, weights={"c": 1.0})
    with pytest.raises(ValueError, match=r"weights\['a'\] must be a finite number, got inf"):
        gdpo_advantages({"a": torch.zeros(3)}, g, weights={"a": math.inf})


# ---- against TRL's formula, and properties -----------------------------------------------------------
def _dyadic_or_nan():
    return st.one_of(st.integers(-40, 40).map(lambda v: v / 8.0), st.just(NAN))


trl_batches = st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(1, 3)).flatmap(
    lambda gnk: st.tuples(
        st.just(gnk[0]),
        st.lists(
            st.lists(_dyadic_or_nan(), min_size=gnk[2], max_size=gnk[2]),
            min_size=gnk[0] * gnk[1],
            max_size=gnk[0] * gnk[1],
        ),
        st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0]), min_size=gnk[2], max_size=gnk[2]),
    )
)


@settings(max_examples=200, deadline=None)
@given(trl_batches)
def test_gdpo_matches_trl_normalize_then_sum(data):
    num_generations, rows, weights = data
    r = np.array(rows, dtype=np.float64)
    w = np.array(weights)
    out = _gdpo(r, np.arange(len(r)) // num_generations, w)
    unscorable = np.isnan(r).all(axis=1)
    assert torch.isnan(out[torch.from_numpy(unscorable)]).all()
    assert torch.isfinite(out[torch.from_numpy(~unscorable)]).all()
    np.testing.assert_allclose(
        torch.nan_to_num(out, nan=0.0).numpy(), trl_normalize_then_sum(r, num_generations, w), rtol=1e-5, atol=1e-5
    )


@settings(max_examples=100, deadline=None)
@given(trl_batches, st.floats(0.5, 8.0), st.floats(-10.0, 10.0), st.randoms(use_true_random=False))
def test_gdpo_properties(data, scale, shift, rnd):
    num_generations, rows, weights = data
    r = np.array(rows, dtype=np.float64)
    g = np.arange(len(r)) // num_generations
    a = _gdpo(r, g, weights, eps=0.0)
    # equivariant to a permutation of the samples; invariant to relabelling the groups
    perm = np.array(rnd.sample(range(len(r)), len(r)))
    torch.testing.assert_close(_gdpo(r[perm], g[perm], weights, eps=0.0), a[perm], rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(_gdpo(r, 50 - 3 * g, weights, eps=0.0), a, rtol=1e-5, atol=1e-5, equal_nan=True)
    # invariant to a positive affine change of each reward, and to scaling all weights
    moved = _gdpo(scale * r + shift, g, weights, eps=0.0)
    torch.testing.assert_close(moved, a, rtol=1e-4, atol=1e-4, equal_nan=True)
    scaled = _gdpo(r, g, [scale * w for w in weights], eps=0.0)
    torch.testing.assert_close(scaled, a, rtol=1e-4, atol=1e-4, equal_nan=True)
    # centred over the scorable samples
    kept = a[torch.isfinite(a)].double()
    assert abs(float(kept.sum())) < 1e-4


# ---- train.py --combine gdpo --------------------------------------------------------------------------
def test_train_combine_gdpo_runs_offline_and_logs_its_weights(tmp_path):
    """The issue's command on the digits preset (small rollouts to keep it fast), in a subprocess."""
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    weights = json.dumps({"centring": 3.0})
    small = ["--prompts-per-step", "4", "--group-size", "4", "--sample-batch-size", "16", "--train-batch-size", "16"]
    cmd = [sys.executable, str(TRAIN), "--combine", "gdpo", "--max-steps", "2", "--output-dir", str(out)]
    proc = subprocess.run(
        [*cmd, "--reward-weights", weights, *small], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["step"] for r in rows] == [1, 2]
    names = [k.split("/", 1)[1] for k in rows[0] if k.startswith("reward/")]
    assert len(names) == 5 and "centring" in names
    for row in rows:
        assert row["weight/centring"] == pytest.approx(3 / 7)
        assert all(row[f"weight/{k}"] == pytest.approx(1 / 7) for k in names if k != "centring")
        assert math.isfinite(row["loss"]) and row["grad_norm"] > 0 and not row["skipped"]
        # None: no sample of the step's 4 prompts is one that reward applies to
        cosines = [row[f"cosine/{k}"] for k in names if row[f"cosine/{k}"] is not None]
        assert cosines and all(-1 <= c <= 1 for c in cosines)
    assert json.loads((out / "config.json").read_text())["combine"] == "gdpo"


def test_trainer_gdpo_advantage_is_gdpo_advantages_of_the_batch_in_the_weighted_sum_loss_path(tmp_path):
    """In process: the combined advantage of ``--combine gdpo`` is ``gdpo_advantages`` of the step's
    rewards (the same rollout as ``weighted-sum``'s), and it takes the one-NFT-loss path."""
    example = str(TRAIN.parent)
    if example not in sys.path:
        sys.path.insert(0, example)
    import train

    small = ["--prompts-per-step", "3", "--group-size", "4", "--sample-batch-size", "12", "--train-batch-size", "12"]
    batches = {}
    for combine in ("gdpo", "weighted-sum"):
        argv = [
            *small,
            "--combine",
            combine,
            "--reward-weights",
            '{"centring": 2}',
            "--output-dir",
            str(tmp_path / combine),
        ]
        cfg = train.resolve_config(train.build_parser().parse_args(argv))
        train.validate(cfg)
        t = train.Trainer(cfg)
        batch = t.rollout()
        gathered, adv, masks = t.score(batch)
        batches[combine] = (t, batch, gathered, adv, masks)
    t, batch, gathered, adv, masks = batches["gdpo"]
    want = gdpo_advantages(gathered, batch.group_ids, weights={**{k: 1.0 for k in gathered}, "centring": 2.0})
    assert torch.equal(adv[train.COMBINED], want)
    assert torch.equal(masks[train.COMBINED], torch.isfinite(want))
    # the same rollout and rewards as weighted-sum's, a different combined advantage
    ws = batches["weighted-sum"]
    for k in gathered:
        torch.testing.assert_close(gathered[k], ws[2][k], rtol=0, atol=0, equal_nan=True)
    assert not torch.allclose(adv[train.COMBINED], ws[3][train.COMBINED])
    # the loss a gdpo step minimises is the single NFT loss of that advantage
    idx = torch.arange(4)
    _, out = t.nft_losses_at(
        batch, idx, t.sigmas[idx], torch.randn(4, *batch.x0.shape[1:]), adv, masks, [train.COMBINED]
    )
    assert torch.equal(t._baseline_loss({}, out.losses[train.COMBINED], 2), out.losses[train.COMBINED] / 2)
    assert t.baseline_weights()["centring"] == pytest.approx(2 / 6)


# ---- benchmarks/diffusion_rl.py: the gdpo row, --reference and --merge -----------------------------------
def _fake_run(method: str, seed: int, gain: float) -> dict:
    return {
        "method": method, "suite": "conflict", "seed": seed, "lr": 3e-4, "steps": 300, "seconds": 1.0,
        "step_seconds": 0.1, "reward_start": {"a": 0.0, "b": 1.0}, "reward_end": {"a": gain, "b": 1.0 - gain},
        "reward_sd_start": {"a": 1.0, "b": 1.0}, "judge_start": 1.0, "judge_end": 0.9, "curves": {"a": [gain]},
        "conflicts": {w: {"rate": 0.5, "steps": 1, "mean_cosine": {}} for w in ("independent", "solved")},
    }  # fmt: skip


def _fake_file(path: Path, runs: list[dict], command: str) -> str:
    meta = {"steps": 300, "lr": 3e-4, "lr_source": "given", "eval_every": 20, "environment": "test",
            "command": command, "wall_seconds": 1.0, "methods": {r["method"]: {} for r in runs}}  # fmt: skip
    path.write_text(json.dumps({"meta": meta, "runs": runs}))
    return str(path)


def test_benchmark_has_gdpo_and_merges_runs_with_paired_differences_to_a_reference(tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    from _scripts import load_benchmark

    bench = load_benchmark("diffusion_rl")
    assert bench.METHODS["gdpo"] == {"combine": "gdpo"}
    gains = {"weighted-sum": [0.1, 0.2, 0.3], "gdpo": [0.2, 0.2, 0.2], "marble": [0.5, 0.1, 0.4]}
    one = _fake_file(tmp_path / "one.json", [_fake_run(m, s, gains[m][s]) for m in ("weighted-sum", "gdpo") for s in range(3)], "one")  # fmt: skip
    two = _fake_file(tmp_path / "two.json", [_fake_run(m, s, gains[m][s]) for m in ("gdpo", "marble") for s in range(3)], "two")  # fmt: skip
    argv = [
        "--merge",
        one,
        two,
        "--reference",
        "gdpo",
        "--seeds",
        "0",
        "1",
        "2",
        "--name",
        "m",
        "--out-dir",
        str(tmp_path),
    ]
    assert bench.main(argv) == 0
    data = json.loads((tmp_path / "m.json").read_text())
    methods = data["summary"]["conflict"]["methods"]
    assert list(methods) == ["weighted-sum", "gdpo", "marble"] and len(data["runs"]) == 9
    paired = methods["marble"]["paired"]["gdpo"]["a"]
    assert paired["diff_mean"] == pytest.approx(np.mean([0.3, -0.1, 0.2])) and paired["wins"] == 2
    assert methods["marble"]["paired"]["gdpo"]["b"]["wins"] == 1
    assert "gdpo" not in methods["gdpo"].get("paired", {})
    assert methods["gdpo"]["paired_vs_baseline"]["a"]["wins"] == 1
    text = (tmp_path / "m.md").read_text()
    assert "Paired difference to `gdpo`" in text and "`one`" in text and "`two`" in text
    # the same run with other numbers in two files: not one machine's runs
    bad = _fake_file(tmp_path / "bad.json", [_fake_run("gdpo", 0, 0.9)], "bad")
    with pytest.raises(SystemExit, match="differs between the files"):
        bench.main(["--merge", one, bad, "--out-dir", str(tmp_path)])
