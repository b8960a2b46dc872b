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
