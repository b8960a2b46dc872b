"""The digits test bed (examples/sd35_marble/digits): model, shipped weights, judge, reward suites."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sd35_marble"
if str(EXAMPLE) not in sys.path:
    sys.path.insert(0, str(EXAMPLE))

from digits import model as dm  # noqa: E402
from digits import pretrain as dp  # noqa: E402
from digits import rewards as dr  # noqa: E402
from digits.judge import DigitsJudge  # noqa: E402

torch.set_num_threads(1)

N_PER_CLASS = 25  # 250 samples per seed
LABELS = torch.arange(10).repeat(N_PER_CLASS)


def _fixed_noise(n: int, seed: int = 1234) -> torch.Tensor:
    return torch.randn(n, 64, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def samples() -> dict[int, torch.Tensor]:
    """Images (250, 8, 8) from each shipped model on fixed noise, prompts 0-9 in turn."""
    out = {}
    for seed in (0, 1):
        x = dm.sample(dm.load_pretrained(seed), _fixed_noise(len(LABELS)), LABELS, steps=10)
        out[seed] = dm.to_images(x)
    return out


@pytest.fixture(scope="module")
def judge() -> DigitsJudge:
    return DigitsJudge()


# ---- model -----------------------------------------------------------------------------------------


def test_pretraining_is_bitwise_deterministic_and_seed_dependent():
    a = dm.pretrain(3, steps=30)
    b = dm.pretrain(3, steps=30)
    c = dm.pretrain(4, steps=30)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert not a.training and not any(p.requires_grad for p in a.parameters())


def test_pretrain_restores_thread_count():
    torch.set_num_threads(2)
    try:
        dm.pretrain(0, steps=1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)


def test_pretrain_cli_writes_loadable_weights(tmp_path, capsys):
    out = tmp_path / "w.safetensors"
    dp.main(["--seed", "5", "--steps", "3", "--out", str(out), "--log-every", "0"])
    assert "seed 5: 3 steps" in capsys.readouterr().out
    from safetensors.torch import load_file

    model = dm.DigitsFlow()
    model.load_state_dict(load_file(str(out)))
    ref = dm.pretrain(5, steps=3)
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in model.state_dict().items())


def test_model_shapes_parameter_count_and_bad_input():
    model = dm.DigitsFlow()
    assert 450_000 < sum(p.numel() for p in model.parameters()) < 600_000
    v = model(torch.zeros(3, 64), torch.rand(3), torch.tensor([0, 5, 9]))
    assert v.shape == (3, 64)
    with pytest.raises(ValueError, match=r"\(B, 64\)"):
        model(torch.zeros(3, 8, 8), torch.rand(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        model(torch.zeros(3, 64), torch.rand(3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="steps"):
        dm.sample(model, torch.zeros(2, 64), torch.zeros(2, dtype=torch.long), steps=0)


def test_sampler_integrates_a_constant_velocity_exactly():
    class Constant(torch.nn.Module):
        def forward(self, x, t, labels):
            return torch.full_like(x, 0.5)

    x0 = dm.sample(Constant(), torch.ones(2, 64), torch.zeros(2, dtype=torch.long), steps=7)
    torch.testing.assert_close(x0, torch.full((2, 64), 0.5))  # x(0) = x(1) - ∫0^1 v dt


def test_to_images_maps_model_space_to_unit_images():
    x = torch.tensor([[-1.0] * 32 + [1.0] * 31 + [3.0]])
    img = dm.to_images(x)
    assert img.shape == (1, 8, 8) and img.dtype == torch.float32
    assert img.min() == 0.0 and img.max() == 1.0 and img[0, 0, 0] == 0.0 and img[0, 7, 6] == 1.0


def test_load_pretrained_unknown_seed_names_it():
    with pytest.raises(FileNotFoundError, match="seed=7"):
        dm.load_pretrained(7)


def test_shipped_weights_are_small():
    files = sorted(dm.WEIGHTS_DIR.glob("digits_flow_seed*.safetensors"))
    assert [f.name for f in files] == ["digits_flow_seed0.safetensors", "digits_flow_seed1.safetensors"]
    assert sum(f.stat().st_size for f in files) <= 5 * 2**20


# ---- judge -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_shipped_model_samples_read_as_the_prompted_digit(samples, judge, seed):
    images = samples[seed]
    assert images.shape == (250, 8, 8) and images.min() >= 0 and images.max() <= 1
    assert judge.accuracy(images, LABELS) >= 0.95


def test_judge_is_accurate_on_held_out_digits_and_rejects_wrong_labels(judge):
    assert judge.test_accuracy >= 0.97
    images, labels = dm.digits_data()
    assert judge.accuracy(images[:300], labels[:300]) >= 0.97
    assert judge.accuracy(images[:300], (labels[:300] + 1) % 10) <= 0.05
    with pytest.raises(ValueError, match=r"\(N, 8, 8\)"):
        judge.predict(np.zeros((3, 64)))


# ---- rewards ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("suite", sorted(dr.REWARD_SUITES))
def test_trivial_images_score_no_higher_than_the_model(samples, suite):
    for seed in (0, 1):
        for grey in (0.2, 0.5, 1.0):
            table = dr.trivial_image_check(suite, samples[seed], LABELS, grey=grey)
            assert list(table) == dr.REWARD_SUITES[suite]
            for name, row in table.items():
                worse = {k: row[k] for k in dr.TRIVIAL_KINDS if not row[k] <= row["model"]}
                assert not worse, f"{suite}/{name} (model seed {seed}, grey {grey}): {worse} > {row['model']}"
                assert row["passed"] == 1.0


def test_trivial_image_check_flags_a_reward_that_a_blank_image_maximises(samples, monkeypatch):
    darkness = dr.DigitReward("darkness", "1 - mean ink", lambda im, lab: 1 - im.mean((1, 2)))
    monkeypatch.setitem(dr.DIGIT_REWARDS, "darkness", darkness)
    monkeypatch.setitem(dr.REWARD_SUITES, "bad", ["darkness"])
    row = dr.trivial_image_check("bad", samples[0], LABELS)["darkness"]
    assert row["blank"] == 1.0 > row["model"] and row["passed"] == 0.0


@pytest.mark.parametrize("name", sorted(dr.DIGIT_REWARDS))
def test_reward_shapes_and_nan_masks(samples, name):
    reward = dr.DIGIT_REWARDS[name]
    assert reward.name == name and reward.description
    values = reward(samples[0], LABELS)
    assert values.shape == (len(LABELS),) and values.dtype == torch.float32
    applies = torch.isin(LABELS, torch.tensor(reward.digits))
    assert torch.isnan(values[~applies]).all()
    assert torch.isfinite(values[applies]).all()
    assert values.device.type == "cpu"


def test_suites_cover_every_digit_with_two_or_three_rewards():
    for suite in dr.REWARD_SUITES:
        rewards = dr.build_digits_rewards(suite)
        counts = [sum(d in r.digits for r in rewards) for d in range(10)]
        assert min(counts) >= 2, (suite, counts)
    mismatch = dr.build_digits_rewards("mismatch")
    assert max(sum(d in r.digits for r in mismatch) for d in range(10)) <= 3
    assert sum(len(r.digits) < 10 for r in mismatch) == 4  # four rewards apply to a subset only


def test_registry_errors_name_the_bad_value():
    with pytest.raises(ValueError, match="'nope'.*conflict.*mismatch"):
        dr.build_digits_rewards("nope")
    reward = dr.DIGIT_REWARDS["thinness"]
    with pytest.raises(ValueError, match=r"thinness.*\(B, 8, 8\)"):
        reward(torch.zeros(2, 64), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"thinness.*labels.*\(2,\)"):
        reward(torch.zeros(2, 8, 8), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="digits 0-9"):
        reward(torch.zeros(1, 8, 8), torch.tensor([10]))


def test_prompt_fidelity_rewards_prefer_the_prompted_class():
    images, labels = (torch.from_numpy(a) for a in dm.digits_data())
    images, labels = images[:200], labels[:200]
    for name in ("class_prob", "class_prob_t4", "template_corr"):
        reward = dr.DIGIT_REWARDS[name]
        right, wrong = reward(images, labels), reward(images, (labels + 3) % 10)
        assert right.nanmean() > wrong.nanmean() + 0.2, name
    assert dr.DIGIT_REWARDS["class_prob"](images, labels).mean() > 0.9  # near its ceiling


@settings(max_examples=30)
@given(arrays(np.float32, (4, 8, 8), elements=st.floats(0, 1, width=32)), st.integers(0, 9))
def test_rewards_are_bounded_and_mirror_symmetry_is_flip_invariant(images, digit):
    x = torch.from_numpy(images)
    labels = torch.full((4,), digit)
    for name, reward in dr.DIGIT_REWARDS.items():
        v = reward(x, labels)
        if digit in reward.digits:
            assert torch.isfinite(v).all(), name
    for name in ("class_prob", "class_prob_t4"):
        v = dr.DIGIT_REWARDS[name](x, labels)
        assert ((v >= 0) & (v <= 1)).all()
    for name in ("mirror_symmetry", "template_corr"):
        v = dr.DIGIT_REWARDS[name](x, labels)
        assert (v.nan_to_num(0).abs() <= 1 + 1e-5).all()
    sym = dr.DIGIT_REWARDS["mirror_symmetry"]
    torch.testing.assert_close(sym(x, labels), sym(x.flip(2), labels), equal_nan=True)
    assert (dr.DIGIT_REWARDS["thinness"](x, labels) <= 0).all()
    assert (dr.DIGIT_REWARDS["smoothness"](x, labels) < 0).all()
