"""The example's end-of-run summary and the digits preset's reward checks (examples/sd35_marble)."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "sd35_marble"
if str(EXAMPLE) not in sys.path:
    sys.path.insert(0, str(EXAMPLE))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import train  # noqa: E402

torch.set_num_threads(1)

DIGITS_FAST = [
    "--max-steps", "2", "--prompts-per-step", "4", "--group-size", "2", "--sampling-steps", "4",
    "--train-timesteps", "1", "--sample-batch-size", "8", "--train-batch-size", "8", "--num-threads", "1",
]  # fmt: skip
TINY_FAST = [
    "--preset", "tiny", "--max-steps", "1", "--group-size", "2", "--prompts-per-step", "2",
    "--sampling-steps", "2", "--train-timesteps", "1", "--grid-prompts", "2", "--grid-images-per-prompt", "2",
]  # fmt: skip
LINE = re.compile(r"^  (.+): (\S+) -> (\S+) \((\S+)\)$")


def rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def summary_values(text: str) -> dict[str, tuple[float, float, float]]:
    found = {}
    for line in text.splitlines():
        m = LINE.match(line)
        if m:
            found[m.group(1)] = tuple(float(v) for v in m.groups()[1:])
    return found


def check_against_eval(values: dict, evals: list[dict], extra: tuple[str, ...]) -> None:
    first, last = evals[0], evals[-1]
    names = [k.split("/", 1)[1] for k in first if k.startswith("reward/")]
    assert set(values) == {f"reward {n}" for n in names} | {e.replace("_", " ") for e in extra}
    for label, (before, after, delta) in values.items():
        key = f"reward/{label[7:]}" if label.startswith("reward ") else label.replace(" ", "_")
        # printed with 6 significant digits: compare with the file's raw numbers at that precision
        assert before == pytest.approx(first[key], rel=1e-5, abs=1e-9), label
        assert after == pytest.approx(last[key], rel=1e-5, abs=1e-9), label
        assert delta == pytest.approx(last[key] - first[key], rel=1e-4, abs=1e-6), label


@pytest.mark.slow
def test_a_digits_run_ends_with_a_summary_that_matches_its_evaluation_files(tmp_path, capsys):
    from digits.judge import DigitsJudge
    from digits.rewards import build_digits_rewards

    out = tmp_path / "run"
    assert train.main([*DIGITS_FAST, "--output-dir", str(out)]) == 0
    text = capsys.readouterr().out
    evals = rows(out / "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 2]
    values = summary_values(text)
    check_against_eval(values, evals, ("judge_accuracy",))
    # eval.jsonl holds the rewards and the judge's accuracy of the saved evaluation samples
    rewards = build_digits_rewards("mismatch")
    for row, npz in zip(evals, ("eval_samples_step_000000.npz", "eval_samples_step_000002.npz")):
        with np.load(out / "samples" / npz) as z:
            images, labels = torch.from_numpy(z["images"]), torch.from_numpy(z["labels"])
        assert row["samples"] == len(labels)
        for r in rewards:
            v = r(images, labels)
            assert row[f"reward/{r.name}"] == pytest.approx(float(v[torch.isfinite(v)].mean()), rel=1e-6)
        assert row["judge_accuracy"] == pytest.approx(DigitsJudge().accuracy(images, labels))
    assert f"2 optimizer steps in {out}" in text
    files = next(line for line in text.splitlines() if line.startswith("Files: "))
    for name in ("config.json", "metrics.jsonl", "eval.jsonl", "digits_policy.safetensors", "checkpoints/step_000002"):
        assert name in files, name
    plot_cmd = next(line for line in text.splitlines() if line.startswith("Plot it:"))
    resume_cmd = next(line for line in text.splitlines() if line.startswith("Resume it:"))
    assert "plot.py" in plot_cmd and str(out) in plot_cmd
    assert "--resume" in resume_cmd and str(out) in resume_cmd and "--max-steps 4" in resume_cmd
    # the printed resume command does resume the run
    argv = resume_cmd.split("train.py", 1)[1].split()
    assert train.main([*argv, "--num-threads", "1"]) == 0
    assert [r["step"] for r in rows(out / "metrics.jsonl")] == [1, 2, 3, 4]
    assert "4 optimizer steps" in capsys.readouterr().out


@pytest.mark.slow
def test_a_tiny_run_summary_has_each_reward_before_and_after(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main([*TINY_FAST, "--output-dir", str(out)]) == 0
    evals = rows(out / "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 1]  # the step-0 evaluation is taken without a grid
    assert not (out / "samples" / "step_000000.png").exists()
    check_against_eval(summary_values(capsys.readouterr().out), evals, ())


# ---- the digits preset refuses what it cannot use --------------------------------------------------
def _error(argv: list[str], tmp_path: Path, capsys) -> str:
    out = tmp_path / "run"
    assert train.main([*argv, "--output-dir", str(out)]) == 2
    assert not out.exists()
    return capsys.readouterr().err


def test_digits_refuses_an_unknown_reward_naming_it_and_the_valid_names(tmp_path, capsys):
    err = _error(["--rewards", "foo"], tmp_path, capsys)
    assert "'foo'" in err and "--rewards" in err
    for name in ("class_prob_t4", "template_corr", "thinness"):
        assert name in err


def test_digits_refuses_a_misspelt_reward_weight_key(tmp_path, capsys):
    weights = json.dumps({"class_prob_t4": 2.0, "centering": 1.0})  # the reward is "centring"
    err = _error(["--combine", "weighted-sum", "--reward-weights", weights], tmp_path, capsys)
    assert "'centering'" in err and "--reward-weights" in err and "'centring'" in err
    assert "class_prob_t4" in err


def test_digits_refuses_reward_options_and_repeated_rewards(tmp_path, capsys):
    err = _error(["--reward-options", '{"centring": {"scale": 2}}'], tmp_path, capsys)
    assert "--reward-options" in err and "take no options" in err
    err = _error(["--rewards", "centring", "centring"], tmp_path, capsys)
    assert "'centring' given more than once" in err


@pytest.mark.slow
def test_digits_rewards_picks_rewards_by_name(tmp_path):
    out = tmp_path / "run"
    argv = [*DIGITS_FAST, "--max-steps", "1", "--rewards", "thinness", "centring", "--output-dir", str(out)]
    assert train.main(argv) == 0
    (row,) = rows(out / "metrics.jsonl")
    assert sorted(k for k in row if k.startswith("reward/")) == ["reward/centring", "reward/thinness"]


def test_the_readme_images_exist_and_the_comparison_asset_is_named_for_its_baseline():
    readme = (EXAMPLE / "README.md").read_text()
    referenced = set(re.findall(r"assets/([\w.-]+\.png)", readme))
    assert referenced and all((EXAMPLE / "assets" / name).is_file() for name in referenced)
    assets = {p.name for p in (EXAMPLE / "assets").iterdir()}
    assert "tiny_marble_vs_equal_alpha.png" in assets
    # the plot compares MARBLE with --combine equal-alpha, not DiffusionNFT's weighted sum
    assert not [name for name in assets if "weighted_sum" in name]
