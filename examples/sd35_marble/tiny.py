"""A tiny, randomly initialised Stable Diffusion 3 pipeline built from configs (no download).

Every component of ``StableDiffusion3Pipeline`` is built from a small config with random
weights: an ``SD3Transformer2DModel`` (2 layers, 4 heads of dim 8, the SD3.5 layout with a
dual-attention layer and RMS q/k norms), two ``CLIPTextModelWithProjection`` and a
``T5EncoderModel``, a small ``AutoencoderKL`` and a ``FlowMatchEulerDiscreteScheduler``.
The tokenizers are word-level ``tokenizers`` models built in memory from the words of the
prompts and wrapped in ``PreTrainedTokenizerFast``. Nothing touches the network, so it works
with ``HF_HUB_OFFLINE=1``.

It exists to run the training loop end to end on a CPU in seconds; the images it makes are
random patterns, and only pixel rewards (brightness, JPEG size, colourfulness) mean anything
on them.

Pitfalls handled here (see SPEC): modules built from configs start in train mode (dropout
would change the text embeddings between calls), so everything is put in ``eval()``; CLIP
pools the hidden state at its ``eos_token_id``, which must be the tokenizer's eos id.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch

__all__ = ["SPECIAL_TOKENS", "build_tiny_pipeline", "build_word_tokenizer", "vocabulary"]

#: Special tokens of the in-memory tokenizers, in id order (ids 0..3).
SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")
_WORD = re.compile(r"\w+|[^\w\s]")


def vocabulary(prompts: Iterable[str]) -> list[str]:
    """Sorted distinct lower-case words and punctuation marks of ``prompts``."""
    words: set[str] = set()
    for prompt in prompts:
        words.update(_WORD.findall(prompt.lower()))
    return sorted(words)


def build_word_tokenizer(words: Iterable[str], *, max_length: int, add_bos: bool):
    """A word-level ``PreTrainedTokenizerFast``: ids 0..3 are ``SPECIAL_TOKENS``.

    ``add_bos``: CLIP style ``<bos> words <eos>``; otherwise T5 style ``words <eos>``.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])]
        )
    else:
        tok.post_processor = processors.TemplateProcessing(
            single="$A <eos>", special_tokens=[("<eos>", vocab["<eos>"])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=max_length,
    )


def build_tiny_pipeline(
    prompts: Iterable[str],
    *,
    seed: int = 0,
    max_length: int = 16,
    text_dim: int = 16,
    latent_channels: int = 4,
):
    """``StableDiffusion3Pipeline`` with random weights, built on CPU in float32.

    Args:
        prompts: the prompts the run will use; their words form the tokenizers' vocabulary
            (other words map to ``<unk>``).
        seed: seeds the random weights (the same seed gives the same pipeline).
        max_length: token length of the CLIP and T5 inputs (pass it as
            ``max_sequence_length`` to ``encode_prompt``).
        text_dim: hidden size of each CLIP encoder; T5 uses ``2 * text_dim`` (SD3 pads the
            concatenated CLIP states to T5's width).
        latent_channels: VAE latent channels = transformer in/out channels.

    The VAE has two levels (downsampling 2×); with patch size 2, a 32×32 image is a 16×16
    latent and 64 image tokens.
    """
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    words = vocabulary(prompts)
    vocab_size = len(SPECIAL_TOKENS) + len(words)
    pad_id, _, bos_id, eos_id = range(4)
    rng_guard = torch.random.fork_rng(devices=[])  # leave the caller's global RNG untouched
    with rng_guard:
        torch.manual_seed(seed)
        clip_cfg = dict(
            vocab_size=vocab_size,
            hidden_size=text_dim,
            intermediate_size=2 * text_dim,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=max_length,
            projection_dim=text_dim,
            hidden_act="gelu",
            pad_token_id=pad_id,
            bos_token_id=bos_id,
            eos_token_id=eos_id,  # must match the tokenizer, CLIP pools at this id
        )
        text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**clip_cfg))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**clip_cfg))
        t5_dim = 2 * text_dim
        text_encoder_3 = T5EncoderModel(
            T5Config(
                vocab_size=vocab_size,
                d_model=t5_dim,
                d_kv=8,
                d_ff=2 * t5_dim,
                num_layers=2,
                num_heads=2,
                relative_attention_num_buckets=8,
                pad_token_id=pad_id,
                eos_token_id=eos_id,
                decoder_start_token_id=pad_id,
            )
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(8, 16),
            layers_per_block=1,
            latent_channels=latent_channels,
            norm_num_groups=4,
            sample_size=32,
            scaling_factor=1.0,
            shift_factor=0.0,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        transformer = SD3Transformer2DModel(
            sample_size=16,
            patch_size=2,
            in_channels=latent_channels,
            out_channels=latent_channels,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=t5_dim,
            caption_projection_dim=32,  # = heads × head dim
            pooled_projection_dim=2 * text_dim,  # the two CLIP projections, concatenated
            pos_embed_max_size=32,
            dual_attention_layers=(0,),  # SD3.5 layout: extra self-attention in the first block
            qk_norm="rms_norm",
        )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)  # SD3's shift
    tokenizer = build_word_tokenizer(words, max_length=max_length, add_bos=True)
    tokenizer_2 = build_word_tokenizer(words, max_length=max_length, add_bos=True)
    tokenizer_3 = build_word_tokenizer(words, max_length=max_length, add_bos=False)
    for module in (text_encoder, text_encoder_2, text_encoder_3, vae, transformer):
        module.eval()
        module.requires_grad_(False)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
