"""SD3.5 Medium's architecture without weights: embedded configs, LoRA counts, dry run (meta device)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sd35_marble"
if str(EXAMPLE) not in sys.path:
    sys.path.insert(0, str(EXAMPLE))

import sd35  # noqa: E402

torch.set_num_threads(1)

UNPREFIXED = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


@pytest.fixture(scope="module")
def summary():
    return sd35.dry_run_summary()


def test_dry_run_gives_the_authors_counts(summary):
    assert summary["transformer_params"] == 2_243_171_520
    assert summary["lora_modules"] == 191
    assert summary["lora_params_per_adapter"] == 18_776_064
    assert summary["max_sequence_length"] == 128
    assert (summary["image_tokens"], summary["text_tokens"]) == (1024, 205)


def test_lora_count_agrees_with_rank_times_in_plus_out_of_the_matched_linears():
    """Independent of peft's bookkeeping: r·(in + out) summed over the Linear layers that the
    authors' targets name (first attention only, all 24 blocks; the last block has no
    ``to_add_out``, being context-pre-only)."""
    model = sd35.build_transformer("meta")
    linears = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and any(name.endswith(t) for t in sd35.LORA_TARGETS)
    }
    assert all(".attn." in n and ".attn2." not in n for n in linears)
    assert len(linears) == 24 * 8 - 1 == 191
    expected = sum(32 * (m.in_features + m.out_features) for m in linears.values())
    assert expected == 18_776_064


def test_unprefixed_targets_also_hit_the_second_attention_of_the_dual_blocks():
    out = sd35.dry_run_summary(targets=UNPREFIXED)
    assert out["lora_modules"] == 243 == 191 + 13 * 4
    assert out["lora_params_per_adapter"] == 23_887_872


def test_dry_run_rejects_targets_that_match_nothing():
    with pytest.raises(ValueError, match=r"LoRA targets \['attn.to_qq'\] do not fit"):
        sd35.dry_run_summary(targets=["attn.to_qq"])


def test_embedded_text_encoder_and_vae_configs_give_the_published_sizes():
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    def count(module):
        return sum(p.numel() for p in module.parameters())

    with torch.device("meta"):
        clip_l = count(CLIPTextModelWithProjection(CLIPTextConfig(**sd35.CLIP_L_CONFIG)))
        clip_g = count(CLIPTextModelWithProjection(CLIPTextConfig(**sd35.CLIP_G_CONFIG)))
        t5 = count(T5EncoderModel(T5Config(**sd35.T5_CONFIG)))
        vae = count(AutoencoderKL(**sd35.VAE_CONFIG))
    assert round(clip_l / 1e9, 2) == 0.12
    assert round(clip_g / 1e9, 2) == 0.69
    assert round(t5 / 1e9, 2) == 4.76
    assert round(vae / 1e6) == 84


def test_sequence_lengths_and_bad_resolution():
    assert sd35.sequence_lengths(512, 128) == (1024, 205)
    assert sd35.sequence_lengths(1024, 256) == (4096, 333)
    with pytest.raises(ValueError, match="multiple of 16 px, got 500"):
        sd35.sequence_lengths(500)


def test_unknown_transformer_override_is_named():
    with pytest.raises(ValueError, match=r"unknown transformer config key\(s\) \['num_blocks'\]"):
        sd35.build_transformer("meta", num_blocks=3)


# ---- activation memory ------------------------------------------------------------------------------
#: Measured with ``python examples/sd35_marble/sd35.py --measure L DUAL 128`` (CPU), NOT used by the fit
#: (which uses the 256 and 512 px points): the estimate must predict them.
HELD_OUT_128PX = {(2, 0): 29_002_344, (3, 0): 45_727_344, (3, 1): 47_724_144}


def test_activation_estimate_is_linear_in_tokens_and_predicts_held_out_measurements():
    for (layers, dual), measured in HELD_OUT_128PX.items():
        est = sd35.activation_bytes_estimate(128, 128, num_layers=layers, dual_layers=dual + 1 if dual else 0)
        assert est["bytes"] == pytest.approx(measured, rel=1e-3), (layers, dual)
    full = sd35.activation_bytes_estimate(512, 128)
    assert 2.0e9 < full["bytes"] < 2.4e9  # 2.21 GB per sample at the authors' settings
    assert sd35.activation_bytes_estimate(512, 256)["bytes"] > full["bytes"]  # longer T5 input costs more


# ---- train.py: --dry-run and the sd35-medium path end to end on CPU -----------------------------------
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}


def test_train_dry_run_prints_one_json_object_on_the_last_line():
    import json
    import subprocess

    proc = subprocess.run(
        [sys.executable, str(EXAMPLE / "train.py"), "--preset", "sd35-medium", "--random-init", "--dry-run"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["transformer_params"] == 2_243_171_520
    assert (out["lora_modules"], out["lora_params_per_adapter"]) == (191, 18_776_064)
    assert out["max_sequence_length"] == 128 and out["random_init"] is True
    assert out["prompt_files"] == ["builtin:general", "builtin:ocr", "builtin:geneval"]
    assert out["activation_gb_per_sample"] == pytest.approx(2.21, abs=0.01)


def test_dry_run_refuses_other_presets(capsys):
    import train

    assert train.main(["--preset", "tiny", "--dry-run"]) == 2
    assert "--dry-run summarises the sd35-medium preset, not 'tiny'" in capsys.readouterr().err
    assert train.main(["--preset", "tiny", "--random-init"]) == 2
    assert "use it with --preset sd35-medium, not 'tiny'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def sd35_run(tmp_path_factory):
    """The sd35-medium preset from a tiny pipeline saved with save_pretrained (--model DIR),
    PickScore and CLIPScore adapters loaded from local directories, 2 steps on CPU."""
    import json

    import train
    from prompts import BUILTIN_SETS
    from tiny import build_tiny_pipeline, vocabulary

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_sd35_prompts_rewards import _save_tiny_clip

    tmp = tmp_path_factory.mktemp("sd35")
    texts = [p.text for make in BUILTIN_SETS.values() for p in make()[:200]]
    build_tiny_pipeline(texts, seed=0).save_pretrained(tmp / "model")
    words = vocabulary(texts)
    _save_tiny_clip(tmp / "pick", words, seed=0)
    _save_tiny_clip(tmp / "clip", words, seed=1)
    options = {
        "pickscore": {"path": str(tmp / "pick"), "processor_path": str(tmp / "pick")},
        "clipscore": {"path": str(tmp / "clip"), "processor_path": str(tmp / "clip")},
    }
    out = tmp / "run"
    argv = [
        "--preset", "sd35-medium", "--model", str(tmp / "model"), "--output-dir", str(out),
        "--rewards", "pickscore", "clipscore", "text_contrast", "--reward-options", json.dumps(options),
        "--mixed-precision", "no", "--num-threads", "1", "--resolution", "32", "--group-size", "2",
        "--prompts-per-step", "3", "--sampling-steps", "2", "--train-timesteps", "1", "--sample-batch-size", "4",
        "--train-batch-size", "6", "--lora-rank", "4", "--lora-alpha", "8", "--max-steps", "2",
        "--sample-every", "2", "--checkpoint-every", "2", "--grid-prompts", "2", "--grid-images-per-prompt", "1",
    ]  # fmt: skip
    assert train.main(argv) == 0
    return out


def test_sd35_preset_runs_end_to_end_from_a_local_pipeline_with_local_reward_models(sd35_run):
    import json

    cfg = json.loads((sd35_run / "config.json").read_text())
    assert cfg["lora_targets"] == list(sd35.LORA_TARGETS) and cfg["max_sequence_length"] == 128
    rows = [json.loads(ln) for ln in (sd35_run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        for k in ("pickscore", "clipscore"):
            assert r[f"reward/{k}"] is not None and r[f"reward_valid/{k}"] == 1.0
    # 3 prompts a step, one from each builtin set: exactly the OCR prompt has quoted text
    assert all(r["reward_valid/text_contrast"] == pytest.approx(1 / 3) for r in rows)
    assert (sd35_run / "samples" / "step_000002.png").is_file()


def test_sd35_lora_is_saved_by_diffusers_on_the_first_attention_only(sd35_run):
    from diffusers import StableDiffusion3Pipeline
    from safetensors.torch import load_file

    weights = load_file(str(sd35_run / "pytorch_lora_weights.safetensors"))
    modules = {k.split(".lora_")[0] for k in weights}
    # tiny transformer: 2 blocks, the second context-pre-only (no to_add_out); attn2 untouched
    assert len(modules) == 2 * 8 - 1 and all(".attn." in m and ".attn2." not in m for m in modules)
    pipe = StableDiffusion3Pipeline.from_pretrained(str(sd35_run.parent / "model"))
    pipe.load_lora_weights(str(sd35_run), adapter_name="trained")
    layer = pipe.transformer.transformer_blocks[0].attn.to_q
    assert layer.scaling["trained"] == pytest.approx(2.0)
    assert torch.equal(
        layer.lora_B["trained"].weight.detach(), weights["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"]
    )
    assert not hasattr(pipe.transformer.transformer_blocks[0].attn2.to_q, "lora_B")


def test_gpu_check_plumbing_runs_every_method_and_writes_the_table(tmp_path):
    """The GPU check's CPU mode (reduced sizes): every method takes real optimizer steps on its
    own adapter and the markdown table has a row per method (timings are not asserted)."""
    import gpu_check

    args = gpu_check.parse_args(
        ["--device", "cpu", "--tiny", "--resolution", "32", "--prompts", "2", "--group-size", "2"]
        + ["--sampling-steps", "2", "--steps", "1", "--max-sequence-length", "8", "--out", str(tmp_path / "g.md")]
    )
    result = gpu_check.run(args)
    assert set(result["methods"]) == set(gpu_check.METHODS)
    assert result["methods"]["weighted-sum"]["ratio_to_weighted_sum"] == 1.0
    table = gpu_check.markdown(result)
    assert all(f"| {m} |" in table for m in gpu_check.METHODS)
