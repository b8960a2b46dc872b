"""The bundled example (examples/sd35_marble): the tiny preset end to end, offline, on CPU.

The main run is the command the issue asks for, in a subprocess with HF_HUB_OFFLINE=1:
``python examples/sd35_marble/train.py --preset tiny --max-steps 2 --output-dir DIR``.
Its outputs are checked by several tests (metrics keys, LoRA file, sample grid, resume).
Bad inputs, the reward interface, the policy switching and the sampler are checked in
process, on the same modules.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from marble_opt.rl import flow_sample

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may touch the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "sd35_marble"
TRAIN = EXAMPLE / "train.py"
DEFAULT_REWARDS = ("jpeg_compressibility", "brightness", "colourfulness", "text_contrast")

if str(EXAMPLE) not in sys.path:
    sys.path.insert(0, str(EXAMPLE))

import plot  # noqa: E402
import rewards as rw  # noqa: E402
import train  # noqa: E402

torch.set_num_threads(1)

ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
# A small, fast configuration for in-process runs (the subprocess runs use the preset as is).
SMALL = [
    "--group-size",
    "4",
    "--prompts-per-step",
    "2",
    "--sampling-steps",
    "4",
    "--train-timesteps",
    "1",
    "--grid-prompts",
    "2",
    "--grid-images-per-prompt",
    "2",
]


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(TRAIN), *args],
        env=ENV,
        cwd=str(ROOT),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 240) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run(*args: str) -> subprocess.CompletedProcess:
    return finish(start(*args))


def rows_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """The issue's command: 2 steps of the tiny preset, offline, in a subprocess."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    proc = run("--preset", "tiny", "--max-steps", "2", "--output-dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


# ---- the offline tiny run ----------------------------------------------------------------------
@pytest.mark.slow
def test_tiny_run_logs_one_row_per_step_with_every_reward_key(tiny_run):
    rows = rows_of(tiny_run)
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        for name in DEFAULT_REWARDS:
            for prefix in ("reward", "weight", "cosine", "mean_cosine"):
                value = row[f"{prefix}/{name}"]
                assert isinstance(value, float) and math.isfinite(value), (prefix, name, value)
            assert -1.0 <= row[f"cosine/{name}"] <= 1.0
        assert math.isfinite(row["loss"]) and row["step_time"] > 0
        assert sum(row[f"weight/{n}"] for n in DEFAULT_REWARDS) == pytest.approx(1.0, abs=1e-6)
        assert row["images_per_step"] == 32
        assert row["reward_valid/brightness"] == 1.0
        # the NaN stand-in applies only to prompts with quoted text (one file of three)
        assert 0.0 < row["reward_valid/text_contrast"] < 1.0
        assert row["skipped"] is False


@pytest.mark.slow
def test_tiny_run_saves_lora_safetensors_that_diffusers_loads(tiny_run):
    from safetensors.torch import load_file
    from tiny import build_tiny_pipeline

    weights = load_file(str(tiny_run / "pytorch_lora_weights.safetensors"))
    assert weights and all(k.startswith("transformer.") for k in weights)
    assert {k.split(".")[-2] for k in weights} == {"lora_A", "lora_B"}
    targets = {k.split(".lora_")[0].split("attn.")[-1].split("attn2.")[-1] for k in weights}
    assert targets == set(train.ATTENTION_TARGETS)
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)  # trained, not the zero init
    # diffusers reads the file and its metadata (alpha 16 / rank 8 -> scale 2)
    cfg = json.loads((tiny_run / "config.json").read_text())
    pipe = build_tiny_pipeline([p for src in train.load_prompt_files(cfg["prompt_files"]) for p in src], seed=0)
    pipe.load_lora_weights(str(tiny_run), adapter_name="trained")
    layer = pipe.transformer.transformer_blocks[0].attn.to_q
    assert layer.scaling["trained"] == pytest.approx(2.0)
    key = "transformer.transformer_blocks.0.attn.to_q.lora_B.weight"
    assert torch.equal(layer.lora_B["trained"].weight.detach(), weights[key])


@pytest.mark.slow
def test_tiny_run_writes_a_png_sample_grid(tiny_run):
    from PIL import Image

    grid = tiny_run / "samples" / "step_000002.png"
    with Image.open(grid) as img:
        assert img.format == "PNG"
        assert img.size == (4 * 32, 4 * 32)  # grid_images_per_prompt x grid_prompts images of 32 px


@pytest.mark.slow
def test_resume_continues_the_step_count(tiny_run, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(tiny_run, resumed)
    proc = run("--output-dir", str(resumed), "--resume", "--max-steps", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = rows_of(resumed)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[:2] == rows_of(tiny_run)
    assert json.loads((resumed / "checkpoints" / "step_000003" / "trainer_state.json").read_text())["step"] == 3
    assert (resumed / "samples" / "step_000003.png").is_file()
    assert (resumed / "pytorch_lora_weights.safetensors").read_bytes() != (
        tiny_run / "pytorch_lora_weights.safetensors"
    ).read_bytes()


@pytest.mark.slow
def test_plot_draws_reward_and_weight_curves(tiny_run, tmp_path):
    out = tmp_path / "curves.png"
    assert plot.main([str(tiny_run), str(tiny_run / "metrics.jsonl"), "--labels", "a", "b", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- bad input: clear errors before any training ---------------------------------------------------
@pytest.mark.slow
def test_unknown_reward_exits_with_a_clear_error_before_training(tmp_path):
    out = tmp_path / "run"
    proc = run("--preset", "tiny", "--rewards", "brightness", "sharpness", "--output-dir", str(out))
    assert proc.returncode == 2
    assert "unknown reward 'sharpness'" in proc.stderr and "brightness" in proc.stderr
    assert not out.exists()


def _bad(argv, capsys, tmp_path) -> str:
    out = tmp_path / "run"
    assert train.main(["--preset", "tiny", *argv, "--output-dir", str(out)]) == 2
    assert not (out / "metrics.jsonl").exists()
    return capsys.readouterr().err


def test_empty_prompt_file_is_rejected(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    err = _bad(["--prompt-files", str(empty)], capsys, tmp_path)
    assert "empty.txt" in err and "is empty" in err


def test_group_size_one_is_rejected(tmp_path, capsys):
    err = _bad(["--group-size", "1"], capsys, tmp_path)
    assert "--group-size must be at least 2" in err


def test_reward_model_without_weights_is_rejected(tmp_path, capsys):
    options = json.dumps({"pickscore": {"path": str(tmp_path / "none"), "processor_path": str(tmp_path / "none")}})
    err = _bad(["--rewards", "pickscore", "--reward-options", options], capsys, tmp_path)
    assert "reward 'pickscore': could not load" in err and "--reward-options" in err


def test_reward_model_without_its_package_is_rejected(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # as if open_clip_torch were not installed
    err = _bad(["--rewards", "hpsv2"], capsys, tmp_path)
    assert "reward 'hpsv2' needs the Python package 'open_clip'" in err and "pip install open_clip_torch" in err


@pytest.mark.slow
def test_reusing_a_run_dir_with_another_config_is_rejected_and_the_same_command_is_a_no_op(tiny_run, capsys):
    assert train.main(["--preset", "tiny", "--output-dir", str(tiny_run), "--max-steps", "5"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert train.main(["--output-dir", str(tiny_run), "--resume", "--rewards", "brightness"]) == 2
    assert "a resumed run keeps it" in capsys.readouterr().err
    before = (tiny_run / "metrics.jsonl").read_bytes()
    # the fixture's own command, again: a finished run is left alone
    assert train.main(["--preset", "tiny", "--max-steps", "2", "--output-dir", str(tiny_run)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert (tiny_run / "metrics.jsonl").read_bytes() == before


# ---- rewards --------------------------------------------------------------------------------------
def test_pixel_rewards_follow_the_interface_and_conflict():
    torch.manual_seed(0)
    flat = torch.full((1, 3, 32, 32), 0.5)
    noisy = torch.rand(1, 3, 32, 32)
    images = torch.cat([flat, noisy, torch.ones(1, 3, 32, 32)])
    prompts = ["a cat", 'a sign that says "open"', "a dog"]
    built = {r.name: r for r in rw.build_rewards(list(rw.PIXEL_REWARDS))}
    scores = {name: r(images, prompts) for name, r in built.items()}
    for s in scores.values():
        assert s.shape == (3,) and s.dtype == torch.float32
    assert torch.allclose(scores["jpeg_compressibility"], -scores["jpeg_incompressibility"])
    assert scores["jpeg_compressibility"][0] > scores["jpeg_compressibility"][1]  # flat compresses better
    assert scores["brightness"].tolist() == pytest.approx([0.5, float(noisy.mean()), 1.0])
    assert scores["colourfulness"][0] == pytest.approx(0.0, abs=1e-6) and scores["colourfulness"][1] > 0.1
    tc = scores["text_contrast"]
    assert math.isnan(tc[0]) and math.isnan(tc[2]) and tc[1] > 0.1
    with pytest.raises(ValueError, match="images must be a"):
        built["brightness"](torch.rand(2, 32, 32), ["a", "b"])
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        built["brightness"](torch.rand(2, 3, 8, 8), ["a"])


# ---- the trainer's parts, in process ------------------------------------------------------------------
def _trainer(tmp_path, *argv: str) -> train.Trainer:
    argv = ("--preset", "tiny", *argv) if "--preset" not in argv else argv
    args = [*SMALL, *argv, "--output-dir", str(tmp_path / "r")]
    cfg = train.resolve_config(train.build_parser().parse_args(args))
    train.validate(cfg)
    return train.Trainer(cfg)


def test_policy_switching_runs_old_and_reference_and_keeps_only_default_trainable(tmp_path):
    t = _trainer(tmp_path)
    a = t.adapter
    x = torch.randn(2, *a.latent_shape)
    sigma = torch.tensor([0.7, 0.3])
    cond = a.encode(["a cat", "a dog"])

    def v(which="default"):
        with torch.no_grad():
            return a.velocity(x, sigma, cond, which)

    assert torch.equal(v(), v("old")) and torch.equal(v(), v("ref"))  # LoRA B starts at zero
    with torch.no_grad():
        for key, p in a.named["default"].items():
            if "lora_B" in key:
                p.add_(0.1)
    assert not torch.allclose(v(), v("old"))
    assert torch.equal(v("old"), v("ref"))  # the old adapter still has B = 0
    for which in ("old", "ref"):
        v(which)
        assert all(p.requires_grad for p in a.named["default"].values())
        assert not any(p.requires_grad for p in a.named["old"].values())
    t.step = 1  # the first update copies (d = min(0.001 * 0, 0.95) = 0)
    assert t.update_old_policy() == 0.0
    assert torch.equal(v(), v("old"))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 copy= warning inside diffusers
def test_dpm2_sampler_matches_diffusers_dpm_solver_multistep():
    from diffusers import DPMSolverMultistepScheduler

    m, a = 2.0, 0.3  # data ~ N(m, a²): the exact flow is known, x0 = m + a·ε

    def velocity(x, sig, *_):
        t = sig.reshape(-1, 1, 1, 1).double()
        x0 = m + (1 - t) * a**2 / ((1 - t) ** 2 * a**2 + t**2) * (x - (1 - t) * m)
        return (x - x0) / t

    sched = DPMSolverMultistepScheduler(
        use_flow_sigmas=True,
        flow_shift=3.0,
        prediction_type="flow_prediction",
        algorithm_type="dpmsolver++",
        solver_order=2,
        final_sigmas_type="zero",
    )
    sched.set_timesteps(25)
    eps = torch.randn(64, 1, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = eps.clone()
    for i, step in enumerate(sched.timesteps):
        x = sched.step(velocity(x, sched.sigmas[i].double().reshape(1)), step, x).prev_sample

    for sampler in ("dpm2", "euler"):
        out = flow_sample(velocity, eps, sched.sigmas.double(), sampler)
        if sampler == "dpm2":
            assert torch.allclose(out, x, atol=1e-5)
            dpm_err = float((out - (m + a * eps)).abs().max())
        else:
            assert float((out - (m + a * eps)).abs().max()) > 1.5 * dpm_err  # second order beats Euler here


def _no_grids(t: train.Trainer) -> train.Trainer:
    t.save_samples = lambda: None
    return t


@pytest.mark.slow
def test_resumed_run_matches_an_uninterrupted_one_exactly(tmp_path):
    """LoRA, optimizer (with MARBLE's smoothed weights), step and every RNG are restored."""
    for combine in ("marble", "weighted-sum"):
        straight, split = tmp_path / combine / "straight", tmp_path / combine / "split"
        args = ("--combine", combine, "--checkpoint-every", "2")
        assert _no_grids(_trainer(straight, *args, "--max-steps", "3")).train() == 0
        assert _no_grids(_trainer(split, *args, "--max-steps", "2")).train() == 0
        resumed = _no_grids(_trainer(split, *args, "--max-steps", "3", "--resume"))
        assert resumed.step == 2
        assert resumed.train() == 0
        expected, got = rows_of(straight / "r"), rows_of(split / "r")
        assert [r["step"] for r in got] == [1, 2, 3]
        for want, have in zip(expected, got):
            for key, value in want.items():
                if value is None:  # e.g. a NaN-only reward on a step without quoted-text prompts
                    assert have[key] is None, (combine, want["step"], key)
                elif not key.endswith("_time"):
                    assert have[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (combine, want["step"], key)


@pytest.mark.slow
def test_brightness_rises_when_rewarded_and_falls_when_penalised(tmp_path, monkeypatch):
    """The sign check from SPEC: a short single-reward run moves brightness the right way."""

    class Darkness(rw.Brightness):
        name = "darkness"

        def score(self, images, prompts):
            return -super().score(images, prompts)

    monkeypatch.setitem(rw.REWARDS, "darkness", Darkness)
    moved = {}
    for name in ("brightness", "darkness"):
        t = _trainer(
            tmp_path / name,
            "--rewards",
            name,
            "--group-size",
            "8",
            "--train-timesteps",
            "2",
            "--lr",
            "1e-2",
            "--max-steps",
            "12",
            "--checkpoint-every",
            "100",
        )
        t.save_checkpoint = lambda: None  # not needed here
        assert _no_grids(t).train() == 0
        values = [r[f"reward/{name}"] for r in rows_of(tmp_path / name / "r")]
        moved[name] = (sum(values[-3:]) - sum(values[:3])) / 3
    # batch means of 16 images are noisy at about ±0.001; both move by ~0.015 in 12 steps
    assert moved["brightness"] > 0.006 and moved["darkness"] > 0.006, moved


def test_equal_alpha_logs_equal_weights_and_the_same_cosine_keys(tmp_path):
    t = _no_grids(_trainer(tmp_path, "--combine", "equal-alpha", "--max-steps", "1"))
    t.save_checkpoint = lambda: None
    assert t.marble is None and isinstance(t.optimizer, torch.optim.AdamW)
    assert t.train() == 0
    (row,) = rows_of(tmp_path / "r")
    for name in DEFAULT_REWARDS:
        assert row[f"weight/{name}"] == pytest.approx(0.25)
        assert row[f"cosine/{name}"] == pytest.approx(row[f"mean_cosine/{name}"])


# ---- --combine modes, rerunning, trackers ---------------------------------------------------------------
def _one_step(tmp_path, *argv: str) -> dict:
    t = _no_grids(_trainer(tmp_path, "--max-steps", "1", *argv))
    t.save_checkpoint = lambda: None
    assert t.train() == 0
    (row,) = rows_of(tmp_path / "r")
    return row


def test_weighted_mean_reward_is_the_nan_aware_weighted_mean():
    nan = float("nan")
    rewards = {"a": torch.tensor([1.0, nan, 2.0, nan]), "b": torch.tensor([3.0, 5.0, nan, nan])}
    got = train.weighted_mean_reward(rewards, {"b": 3.0})
    want = [(1 + 3 * 3) / 4, 5.0, 2.0, nan]
    assert torch.allclose(got, torch.tensor(want), equal_nan=True)
    assert torch.allclose(train.weighted_mean_reward(rewards, {}), torch.tensor([2.0, 5.0, 2.0, nan]), equal_nan=True)


@pytest.mark.slow
def test_each_combine_mode_on_tiny_logs_its_weights_and_cosines(tmp_path):
    names = DEFAULT_REWARDS
    weights = json.dumps({"brightness": 3.0, "colourfulness": 0.0})
    rows = {
        "marble": _one_step(tmp_path / "m"),
        "weighted-sum": _one_step(tmp_path / "ws", "--combine", "weighted-sum", "--reward-weights", weights),
        "equal-alpha": _one_step(tmp_path / "ea", "--combine", "equal-alpha"),
        "sequential": _one_step(tmp_path / "sq", "--combine", "sequential", "--max-steps", "1"),
    }
    assert sum(rows["marble"][f"weight/{k}"] for k in names) == pytest.approx(1.0)
    assert all(0 <= rows["marble"][f"raw_weight/{k}"] <= 1 for k in names)
    assert [rows["weighted-sum"][f"weight/{k}"] for k in names] == pytest.approx([1 / 5, 3 / 5, 0.0, 1 / 5])
    assert [rows["equal-alpha"][f"weight/{k}"] for k in names] == pytest.approx([0.25] * 4)
    # one stage per reward over max_steps: step 0 of 1 trains the first reward only
    assert [rows["sequential"][f"weight/{k}"] for k in names] == [1.0, 0.0, 0.0, 0.0]
    assert rows["sequential"][f"cosine/{names[0]}"] == pytest.approx(1.0)
    for row in rows.values():
        assert all(-1 <= row[f"cosine/{k}"] <= 1 for k in names) and math.isfinite(row["loss"])


@pytest.mark.slow
def test_weighted_sum_and_equal_alpha_agree_on_one_reward_and_differ_on_several(tmp_path):
    """With K = 1 DiffusionNFT's combined advantage is the reward's own: the same step."""
    one = ("--rewards", "brightness")
    ws = _one_step(tmp_path / "ws1", "--combine", "weighted-sum", *one)
    ea = _one_step(tmp_path / "ea1", "--combine", "equal-alpha", *one)
    for key in ("loss", "grad_norm", "cosine/brightness"):
        assert ws[key] == pytest.approx(ea[key], rel=1e-6), key
    two = ("--rewards", "brightness", "jpeg_compressibility")
    ws = _one_step(tmp_path / "ws2", "--combine", "weighted-sum", *two)
    ea = _one_step(tmp_path / "ea2", "--combine", "equal-alpha", *two)
    assert ws["grad_norm"] != pytest.approx(ea["grad_norm"], rel=1e-3)


def test_combine_option_errors(tmp_path, capsys):
    err = _bad(["--combine", "equal-alpha", "--marble-options", '{"normalize": "none"}'], capsys, tmp_path)
    assert "--marble-options applies to --combine marble" in err
    err = _bad(["--marble-options", '{"gram": "exact"}'], capsys, tmp_path)
    assert "--gram" in err
    err = _bad(["--combine", "weighted-sum", "--reward-weights", '{"sharpness": 1}'], capsys, tmp_path)
    assert "sharpness" in err and "not among --rewards" in err
    err = _bad(["--marble-options", '{"no_such_option": 1}'], capsys, tmp_path)
    assert "no_such_option" in err


@pytest.mark.slow
def test_resume_without_a_checkpoint_starts_the_run(tmp_path, capsys):
    t = _no_grids(_trainer(tmp_path, "--max-steps", "1", "--resume", "--combine", "sequential"))
    assert t.step == 0 and t.cfg.resume is False
    assert t.train() == 0
    assert [r["step"] for r in rows_of(tmp_path / "r")] == [1]
    # a sequential run's stages are fractions of --max-steps: resuming keeps it
    assert train.main(["--output-dir", str(tmp_path / "r"), "--resume", "--max-steps", "2"]) == 2
    assert "--combine sequential divides --max-steps" in capsys.readouterr().err


@pytest.mark.slow
def test_report_to_tensorboard_writes_reward_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _one_step(tmp_path, "--report-to", "tensorboard", "--rewards", "brightness")
    events = list((tmp_path / "r").rglob("events.out.tfevents.*"))
    assert events
    tags = set()
    for e in events:
        acc = EventAccumulator(str(e))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"reward/brightness", "weight/brightness", "loss"} <= tags


# ---- the digits preset (the default) ------------------------------------------------------------------
DIGITS_SMALL = ["--prompts-per-step", "4", "--group-size", "4", "--sample-batch-size", "16", "--train-batch-size", "16"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The README's first command (no --preset): 2 steps of the digits model, offline."""
    out = tmp_path_factory.mktemp("digits") / "run"
    proc = run("--max-steps", "2", "--output-dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_default_run_trains_digits_and_logs_every_reward(digits_run):
    out, _ = digits_run
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["preset"] == "digits" and cfg["reward_suite"] == "mismatch"
    rows = rows_of(out)
    assert [r["step"] for r in rows] == [1, 2]
    names = [k.split("/", 1)[1] for k in rows[0] if k.startswith("reward/")]
    assert len(names) == 5
    for row in rows:
        assert row["images_per_step"] == 80
        for name in names:
            for prefix in ("reward", "weight", "cosine"):
                assert isinstance(row[f"{prefix}/{name}"], float) and math.isfinite(row[f"{prefix}/{name}"])
        assert 0 < row["reward_valid/template_corr"] < 1  # applies to some digits only
    assert (out / "digits_policy.safetensors").is_file()


def test_digits_eval_samples_are_npz_at_step_0_and_the_end(digits_run):
    from digits.judge import DigitsJudge
    from digits.model import digits_data

    out, _ = digits_run
    files = sorted(out.rglob("eval_samples*.npz"))
    assert [f.name for f in files] == ["eval_samples_step_000000.npz", "eval_samples_step_000002.npz"]
    judge = DigitsJudge()
    data, _ = digits_data()
    for f in files:
        with np.load(f) as z:
            images, labels = z["images"], z["labels"]
        assert images.dtype == np.float32 and images.ndim == 3 and images.shape[1:] == (8, 8)
        assert images.shape[0] >= 50 and labels.shape == (images.shape[0],)
        assert np.issubdtype(labels.dtype, np.integer) and set(labels.tolist()) == set(range(10))
        assert images.min() >= 0 and images.max() <= 1
        # oriented and scaled like load_digits().images / 16: the judge reads them, background is 0
        assert judge.accuracy(images, labels) >= 0.9
        assert abs(float(np.median(images)) - float(np.median(data))) < 0.2
    with np.load(files[0]) as z:
        assert z["images"].std() > 0.1  # digits, not blank images


def test_the_readme_command_can_be_rerun_and_resumed(digits_run, tmp_path, capsys):
    out, _ = digits_run
    before = (out / "metrics.jsonl").read_bytes()
    assert train.main(["--max-steps", "2", "--output-dir", str(out)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert (out / "metrics.jsonl").read_bytes() == before
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    assert train.main(["--max-steps", "3", "--output-dir", str(resumed), "--resume"]) == 0
    assert [r["step"] for r in rows_of(resumed)] == [1, 2, 3]
    assert rows_of(resumed)[:2] == rows_of(out)
    assert sorted(f.name for f in resumed.rglob("eval_samples*.npz"))[-1] == "eval_samples_step_000003.npz"


def test_each_combine_mode_on_digits(tmp_path):
    rows = {}
    for combine in ("marble", "weighted-sum", "equal-alpha", "sequential"):
        rows[combine] = _one_step(tmp_path / combine, "--preset", "digits", "--combine", combine, *DIGITS_SMALL)
    names = [k.split("/", 1)[1] for k in rows["marble"] if k.startswith("weight/")]
    assert len(names) == 5
    for combine, row in rows.items():
        weights = [row[f"weight/{k}"] for k in names]
        assert sum(weights) == pytest.approx(1.0), combine
        assert all(-1 <= row[f"cosine/{k}"] <= 1 for k in names if row[f"cosine/{k}"] is not None), combine
    assert [rows["sequential"][f"weight/{k}"] for k in names] == [1.0, 0, 0, 0, 0]
    assert rows["weighted-sum"]["grad_norm"] != pytest.approx(rows["equal-alpha"]["grad_norm"], rel=1e-3)


@pytest.mark.slow
def test_two_processes_with_ddp_keep_identical_weights(tmp_path):
    """accelerate launch, 2 CPU processes (gloo): the loop checks the replicas agree when it saves.
    (``--cpu --num_processes 2`` starts one process; ``--multi_gpu`` with ACCELERATE_USE_CPU=1
    starts two.)"""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(TRAIN)]
    cmd += ["--max-steps", "2", "--output-dir", str(out), *DIGITS_SMALL]
    env = {**ENV, "ACCELERATE_USE_CPU": "1"}
    proc = subprocess.run(cmd, env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = rows_of(out)
    assert [r["step"] for r in rows] == [1, 2] and rows[-1]["images_per_step"] == 16
    states = sorted(out.glob("checkpoints/*/trainer_state.json"))
    assert states and all(json.loads(s.read_text())["num_processes"] == 2 for s in states), states


@pytest.mark.parametrize("weighting", ["cagrad", "upgrad"])
def test_other_weightings_run_through_marble_options_with_the_cross_estimator(tmp_path, weighting):
    # --marble-ema is MARBLE's ρ: the loop must not hand it to another weighting (it is refused there)
    opts = json.dumps({"weighting": weighting, "gram_estimator": "cross"})
    row = _one_step(tmp_path, "--preset", "digits", "--gram", "exact", "--marble-options", opts)
    weights = [v for k, v in row.items() if k.startswith("weight/") and v is not None]
    assert weights and all(math.isfinite(w) for w in weights)
    assert row["skipped"] is False
