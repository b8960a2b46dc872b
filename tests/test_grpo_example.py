"""The GRPO test bed: rewards against trivial outputs, the example's three modes, the benchmark's quick mode."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "grpo_marble"))
import task  # noqa: E402
from _scripts import load_benchmark  # noqa: E402

PAIRS = task.splits()["judge"][:200]
PROMPTS = [task.prompt(a, b) for a, b in PAIRS]
RIGHT = [str(a + b) for a, b in PAIRS]


def _mean(name, completions):
    vals = [v for v in task.REWARDS[name](PROMPTS, completions) if v is not None]
    return sum(vals) / len(vals)


def test_splits_are_disjoint_and_fixed():
    s = task.splits()
    sets = {k: set(v) for k, v in s.items()}
    assert sum(map(len, sets.values())) == 8100
    assert not (sets["judge"] & sets["pretrain"]) and not (sets["judge"] & sets["rl"])


@pytest.mark.parametrize("trivial", ["", "1111", "+=+=", "97"])
def test_trivial_outputs_score_below_the_answer(trivial):
    import random

    rng = random.Random(0)
    fake = (
        [trivial] * len(PROMPTS)
        if trivial != "97"
        else ["".join(rng.choice("0123456789+=") for _ in range(3)) for _ in PROMPTS]
    )
    for name in ("digits", "distance", "carry", "hundreds"):
        assert _mean(name, fake) < _mean(name, RIGHT), name
    # brevity is the reward in tension: the empty completion maximises it
    assert _mean("brevity", [""] * len(PROMPTS)) == 0.0 > _mean("brevity", RIGHT)


def test_subset_rewards_return_none_where_they_do_not_apply():
    carry = task.carry(PROMPTS, RIGHT)
    hundreds = task.hundreds(PROMPTS, RIGHT)
    for (a, b), c, h in zip(PAIRS, carry, hundreds, strict=True):
        assert (c is None) == (not task.has_carry(a, b))
        assert (h is None) == (a + b < 100)
    assert all(v == 1.0 for v in carry + hundreds if v is not None)


def test_shipped_model_is_mediocre():
    acc = task.judge(task.load_model(), task.build_tokenizer(), PAIRS)
    assert 0.1 < acc < 0.8


@pytest.mark.parametrize("combine", ["marble", "gdpo", "weighted-sum"])
def test_example_two_steps(tmp_path, combine):
    train = load_benchmark("grpo_rl").train  # the example's train.py, under its own module name

    summary = train.main(
        [
            "--combine",
            combine,
            "--max-steps",
            "2",
            "--output-dir",
            str(tmp_path),
            "--prompts-per-step",
            "4",
            "--num-generations",
            "4",
            "--eval-samples",
            "1",
            "--threads",
            "1",
        ]
    )
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert all(f"reward/{n}" in row for n in task.REWARD_NAMES)
        if combine == "marble":
            alpha = [row[f"weight/{n}"] for n in task.REWARD_NAMES]
            assert math.isclose(sum(alpha), 1.0, abs_tol=1e-6)
        else:
            assert not any(k.startswith("weight/") for k in row)
    assert 0.0 <= summary["after"]["judge"] <= 1.0


def test_benchmark_quick(tmp_path):
    bench = load_benchmark("grpo_rl")
    out = bench.main(["--quick", "--out", str(tmp_path / "q"), "--workdir", str(tmp_path / "runs")])
    assert set(out["results"]) == {"weighted-sum", "gdpo", "marble"}
    assert all(len(v) == 2 for v in out["results"].values())
    assert set(out["vs_gdpo"]) == {"weighted-sum", "marble"}
    assert (tmp_path / "q.md").read_text().count("| marble |") == 1
