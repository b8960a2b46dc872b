"""Stable Diffusion 3.5 Medium without its weights: embedded configs, random init, a dry run.

The GPU machines this project is measured on have no network, so the gated weights of
``stabilityai/stable-diffusion-3.5-medium`` never load there. What a run needs to measure
speed and memory is the *architecture*, which is fully described by the public config files
of the diffusers repository; they are embedded here:

- ``TRANSFORMER_CONFIG`` — ``SD3Transformer2DModel``, 24 MMDiT-X blocks of width 1536
  (24 heads × 64), the first 13 with a second, image-only self-attention ("dual attention"),
  RMS q/k norms: 2,243,171,520 parameters;
- ``VAE_CONFIG`` — ``AutoencoderKL`` with 16 latent channels, 8× downsampling: 83,819,683;
- ``CLIP_L_CONFIG``, ``CLIP_G_CONFIG`` — the two ``CLIPTextModelWithProjection`` text towers
  (ViT-L/14 and OpenCLIP bigG/14): 123,650,304 and 694,659,840;
- ``T5_CONFIG`` — the ``T5EncoderModel`` of T5 v1.1 XXL: 4,762,310,656.

``build_random_pipeline`` builds a ``StableDiffusion3Pipeline`` from them with random weights
and word-level tokenizers made in memory (ids inside the real vocabularies); its images are
noise, but every matmul has the real shape. ``dry_run_summary`` builds the transformer on the
meta device (no memory, seconds), applies the MARBLE authors' LoRA and returns the counts a
run depends on, plus an activation-memory estimate per training sample
(``activation_bytes_estimate``, calibrated by ``measure_activation_bytes``).

The LoRA targets carry the ``attn.`` prefix on purpose: peft matches a target name as a suffix
of the module path, so a bare ``to_q`` also matches ``attn2.to_q`` of the 13 dual-attention
blocks (243 modules and 23,887,872 parameters per adapter instead of the authors' 191 and
18,776,064).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

__all__ = [
    "CLIP_G_CONFIG",
    "CLIP_L_CONFIG",
    "LORA_TARGETS",
    "MAX_SEQUENCE_LENGTH",
    "SCHEDULER_CONFIG",
    "T5_CONFIG",
    "TRANSFORMER_CONFIG",
    "VAE_CONFIG",
    "activation_bytes_estimate",
    "build_random_pipeline",
    "build_transformer",
    "count_lora",
    "dry_run_summary",
    "lora_config",
    "measure_activation_bytes",
    "sequence_lengths",
]

#: ``transformer/config.json`` of stabilityai/stable-diffusion-3.5-medium (diffusers 0.31+).
TRANSFORMER_CONFIG: dict[str, Any] = {
    "attention_head_dim": 64,
    "caption_projection_dim": 1536,
    "dual_attention_layers": list(range(13)),
    "in_channels": 16,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 24,
    "out_channels": 16,
    "patch_size": 2,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 384,
    "qk_norm": "rms_norm",
    "sample_size": 128,
}
#: ``vae/config.json``: 16 latent channels, four levels (8× downsampling), no quant convs.
VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
#: ``text_encoder/config.json``: CLIP ViT-L/14 text tower with projection.
CLIP_L_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
#: ``text_encoder_2/config.json``: OpenCLIP bigG/14 text tower with projection.
CLIP_G_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "projection_dim": 1280,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
}
#: ``text_encoder_3/config.json``: the encoder of T5 v1.1 XXL.
T5_CONFIG: dict[str, Any] = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
    "dropout_rate": 0.1,
    "layer_norm_epsilon": 1e-6,
    "tie_word_embeddings": False,
}
#: ``scheduler/scheduler_config.json``.
SCHEDULER_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0}
#: The MARBLE authors' LoRA: the 8 projections of each block's first (joint) attention, no FFN.
LORA_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)
#: The authors' T5 token length (DiffusionNFT's SD3 setting); CLIP always uses 77.
MAX_SEQUENCE_LENGTH = 128
CLIP_TOKENS = 77


def lora_config(targets: Sequence[str] = LORA_TARGETS, rank: int = 32, alpha: float = 64.0):
    """The authors' ``peft.LoraConfig``: rank 32, alpha 64, gaussian init on ``targets``."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets))


def count_lora(model: torch.nn.Module, adapter: str = "default") -> tuple[int, int]:
    """(modules carrying ``adapter``, LoRA parameters of ``adapter``) in ``model``."""
    modules = 0
    params = 0
    for module in model.modules():
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, torch.nn.ModuleDict) and adapter in lora_a:
            modules += 1
            params += sum(p.numel() for p in lora_a[adapter].parameters())
            params += sum(p.numel() for p in module.lora_B[adapter].parameters())
    return modules, params


def build_transformer(device: str | torch.device = "meta", dtype: torch.dtype = torch.float32, **overrides: Any):
    """``SD3Transformer2DModel`` of SD3.5 Medium (``overrides`` replace config keys), random weights.

    On ``device="meta"`` nothing is allocated: parameter shapes and counts only.
    """
    from diffusers import SD3Transformer2DModel

    config = {**TRANSFORMER_CONFIG, **overrides}
    unknown = sorted(set(overrides) - set(TRANSFORMER_CONFIG))
    if unknown:
        raise ValueError(f"unknown transformer config key(s) {unknown}; known: {sorted(TRANSFORMER_CONFIG)}")
    with torch.device(device):
        model = SD3Transformer2DModel(**config)
    return model.to(dtype=dtype).eval().requires_grad_(False)


def sequence_lengths(resolution: int, max_sequence_length: int = MAX_SEQUENCE_LENGTH) -> tuple[int, int]:
    """(image tokens, text tokens) of one sample at ``resolution`` px.

    Image: ``(resolution / 8 / 2)²`` (VAE 8×, patch 2): 1024 at 512 px. Text: CLIP's 77
    tokens (L and bigG side by side) followed by T5's ``max_sequence_length``: 205 at 128.
    """
    if resolution <= 0 or resolution % 16:
        raise ValueError(f"resolution must be a positive multiple of 16 px, got {resolution!r}")
    side = resolution // 16
    return side * side, CLIP_TOKENS + int(max_sequence_length)


# ---- activation memory ------------------------------------------------------------------------
#: Bytes autograd saves per sample (``measure_activation_bytes``, CPU, torch 2.13, diffusers
#: 0.42, bf16 autocast, LoRA in float32, T5 length 128 → 205 text tokens) for reduced-depth
#: models of the real width: ``(layers, dual blocks, resolution) -> bytes``. Block 0 takes
#: inputs that need no grad, so the dual blocks measured are block 1.
ACTIVATION_MEASUREMENTS: dict[tuple[int, int, int], int] = {
    (2, 0, 256): 52_807_272,
    (3, 0, 256): 81_434_736,
    (3, 1, 256): 89_385_072,
    (2, 0, 512): 148_026_984,
    (3, 0, 512): 224_264_304,
    (3, 1, 512): 256_028_784,
}


def _activation_coefficients() -> dict[str, tuple[float, float]]:
    """Per piece ``(bytes per image token, bytes per text token)`` from the 256/512 px points.

    Pieces: ``base`` (the 2-block model: embedders, block 0, the context-pre-only last block,
    the output layer), ``block`` (one more joint block), ``dual`` (a block's second attention).
    Each piece is linear in the image tokens; its intercept is divided among the 205 text tokens.
    """
    m = ACTIVATION_MEASUREMENTS
    pieces = {
        "base": {r: m[(2, 0, r)] for r in (256, 512)},
        "block": {r: m[(3, 0, r)] - m[(2, 0, r)] for r in (256, 512)},
        "dual": {r: m[(3, 1, r)] - m[(3, 0, r)] for r in (256, 512)},
    }
    text = CLIP_TOKENS + MAX_SEQUENCE_LENGTH
    out = {}
    for name, v in pieces.items():
        per_image = (v[512] - v[256]) / (1024 - 256)
        out[name] = (per_image, (v[256] - 256 * per_image) / text)
    return out


def measure_activation_bytes(
    num_layers: int = 3,
    dual_layers: Sequence[int] = (1,),
    resolution: int = 512,
    max_sequence_length: int = MAX_SEQUENCE_LENGTH,
    device: str = "cpu",
    autocast_dtype: torch.dtype = torch.bfloat16,
) -> int:
    """Bytes autograd keeps for backward for ONE sample in a LoRA-trained forward.

    Builds the real-width transformer with ``num_layers`` blocks (those in ``dual_layers``
    with dual attention), applies the authors' LoRA (trainable, float32; frozen weights in
    ``autocast_dtype``), runs one forward under autocast on ``device`` and sums the sizes of
    the distinct tensors saved for backward (frozen weights excluded: they are not
    activations). This is the activation memory of a training micro-batch of one, which grows
    linearly with the micro-batch. Slow on CPU (tens of seconds per block at 512 px).
    """
    model = build_transformer(device, autocast_dtype, num_layers=num_layers, dual_attention_layers=list(dual_layers))
    model.add_adapter(lora_config())
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
            p.requires_grad_(True)
    params = {p.data_ptr() for p in model.parameters()}
    _, text_tokens = sequence_lengths(resolution, max_sequence_length)
    side = resolution // 8
    g = torch.Generator().manual_seed(0)

    def saved_bytes(batch: int) -> int:
        latents = torch.randn(batch, 16, side, side, generator=g).to(device)
        context = torch.randn(batch, text_tokens, TRANSFORMER_CONFIG["joint_attention_dim"], generator=g).to(device)
        pooled = torch.randn(batch, TRANSFORMER_CONFIG["pooled_projection_dim"], generator=g).to(device)
        saved: dict[int, tuple[torch.Tensor, int]] = {}  # keeps storages alive: no address reuse

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                saved[storage.data_ptr()] = (t, storage.nbytes())
            return t

        autocast = torch.autocast(torch.device(device).type, dtype=autocast_dtype)
        with autocast, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(
                hidden_states=latents,
                encoder_hidden_states=context,
                pooled_projections=pooled,
                timestep=torch.full((batch,), 500.0, device=device),
            )
        return sum(n for _, n in saved.values())

    # Two batch sizes: the difference is per sample (the float32 LoRA weights' bf16 casts,
    # saved once per forward, cancel out).
    return saved_bytes(2) - saved_bytes(1)


def activation_bytes_estimate(
    resolution: int = 512,
    max_sequence_length: int = MAX_SEQUENCE_LENGTH,
    num_layers: int | None = None,
    dual_layers: int | None = None,
) -> dict[str, Any]:
    """Activation memory per training sample of the SD3.5 Medium transformer (LoRA, bf16).

    What autograd keeps for the backward of ``v_θ`` per sample: layer-norm and modulation
    outputs, q/k/v and their RMS norms, the attention output and its log-sum-exp (flash /
    memory-efficient SDPA: no S×S matrix), the MLP's 4d hidden layer, LoRA inputs and rank-32
    intermediates. It is linear in the tokens, so with ``S_img`` image and ``S_txt`` text tokens::

        bytes = base(S) + (L − 2)·block(S) + (L₂ − 1)·dual(S_img),   piece(S) = a·S_img + b·S_txt

    with ``L = 24`` blocks, ``L₂ = 13`` dual-attention blocks (block 0's second attention sees
    inputs that need no grad and saves nothing) and ``(a, b)`` per piece fitted to
    ``ACTIVATION_MEASUREMENTS`` (about ``40·d`` bytes per token per block, ``d = 1536``, and
    ``20·d`` per image token for a second attention). At 512 px and T5 length 128: 2.2 GB.
    Not included: frozen weights, the transient no-grad ``v_old``/``v_ref`` passes, the VAE,
    the text encoders, the reward models.
    """
    image_tokens, text_tokens = sequence_lengths(resolution, max_sequence_length)
    layers = TRANSFORMER_CONFIG["num_layers"] if num_layers is None else num_layers
    dual = len(TRANSFORMER_CONFIG["dual_attention_layers"]) if dual_layers is None else dual_layers
    c = _activation_coefficients()

    def piece(name: str) -> float:
        return c[name][0] * image_tokens + c[name][1] * text_tokens

    total = piece("base") + (layers - 2) * piece("block") + max(dual - 1, 0) * c["dual"][0] * image_tokens
    return {
        "bytes": int(round(total)),
        "gb": round(total / 1e9, 2),
        "image_tokens": image_tokens,
        "text_tokens": text_tokens,
        "formula": "base(S) + (L-2)*block(S) + (L_dual-1)*dual(S_img); piece(S) = a*S_img + b*S_txt, fitted on CPU",
    }


# ---- random-init pipeline ---------------------------------------------------------------------
def build_random_pipeline(
    prompts: Iterable[str],
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    max_sequence_length: int = MAX_SEQUENCE_LENGTH,
):
    """``StableDiffusion3Pipeline`` with SD3.5 Medium's real architecture and random weights.

    The transformer, VAE and the three text encoders follow the embedded configs; the
    tokenizers are word-level ones built in memory from the words of ``prompts`` (their ids
    stay inside the real vocabularies, so every embedding table keeps its real size). No
    download. Everything is built directly on ``device`` in ``dtype`` (the VAE in float32);
    about 7.7 B parameters: 15.4 GB in bf16.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from tiny import SPECIAL_TOKENS, build_word_tokenizer, vocabulary
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    words = vocabulary(prompts)
    pad_id, _, bos_id, eos_id = range(len(SPECIAL_TOKENS))
    ids = {"pad_token_id": pad_id, "bos_token_id": bos_id, "eos_token_id": eos_id}
    if len(SPECIAL_TOKENS) + len(words) > T5_CONFIG["vocab_size"]:
        raise ValueError(f"{len(words)} distinct words exceed T5's vocabulary of {T5_CONFIG['vocab_size']}")
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L_CONFIG, **ids)).to(dtype)
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G_CONFIG, **ids)).to(dtype)
        text_encoder_3 = T5EncoderModel(T5Config(**T5_CONFIG, **ids, decoder_start_token_id=pad_id)).to(dtype)
        vae = AutoencoderKL(**VAE_CONFIG)
        transformer = build_transformer(device, dtype)
    for module in (text_encoder, text_encoder_2, text_encoder_3, vae, transformer):
        module.eval().requires_grad_(False)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_word_tokenizer(words, max_length=CLIP_TOKENS, add_bos=True),
        text_encoder_2=text_encoder_2,
        tokenizer_2=build_word_tokenizer(words, max_length=CLIP_TOKENS, add_bos=True),
        text_encoder_3=text_encoder_3,
        tokenizer_3=build_word_tokenizer(words, max_length=max_sequence_length, add_bos=False),
    )


# ---- dry run ----------------------------------------------------------------------------------
def dry_run_summary(
    *,
    targets: Sequence[str] = LORA_TARGETS,
    rank: int = 32,
    alpha: float = 64.0,
    resolution: int = 512,
    max_sequence_length: int = MAX_SEQUENCE_LENGTH,
    micro_batch: int = 1,
) -> dict[str, Any]:
    """The numbers a run depends on, from the meta device (no memory, no weights, seconds).

    Returns ``transformer_params`` (2,243,171,520 for SD3.5 Medium), ``lora_modules``
    (modules carrying the ``"default"`` adapter: 191 with the authors' targets),
    ``lora_params_per_adapter`` (18,776,064), ``max_sequence_length``, the token counts and
    ``activation_gb_per_sample`` (see ``activation_bytes_estimate``).
    """
    from peft import inject_adapter_in_model

    model = build_transformer("meta")
    transformer_params = sum(p.numel() for p in model.parameters())
    try:
        inject_adapter_in_model(lora_config(targets, rank, alpha), model, adapter_name="default")
    except ValueError as exc:
        raise ValueError(f"LoRA targets {list(targets)} do not fit the SD3.5 Medium transformer: {exc}") from exc
    modules, params = count_lora(model)
    act = activation_bytes_estimate(resolution, max_sequence_length)
    return {
        "model": "stabilityai/stable-diffusion-3.5-medium (architecture only)",
        "transformer_params": transformer_params,
        "lora_targets": list(targets),
        "lora_rank": rank,
        "lora_alpha": alpha,
        "lora_modules": modules,
        "lora_params_per_adapter": params,
        "max_sequence_length": int(max_sequence_length),
        "resolution": resolution,
        "image_tokens": act["image_tokens"],
        "text_tokens": act["text_tokens"],
        "activation_gb_per_sample": act["gb"],
        "activation_gb_per_micro_batch": round(act["gb"] * micro_batch, 2),
        "activation_formula": act["formula"],
        "frozen_weights_gb_bf16": round(2 * transformer_params / 1e9, 2),
    }


def _main(argv: Sequence[str] | None = None) -> int:
    """``python sd35.py`` prints the dry-run JSON; ``--measure L DUAL RES`` one measurement."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--measure", nargs=3, type=int, metavar=("LAYERS", "DUAL", "RES"), help="DUAL: block 1..DUAL dual"
    )
    parser.add_argument("--max-sequence-length", type=int, default=MAX_SEQUENCE_LENGTH)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.measure:
        layers, dual, res = args.measure
        n = measure_activation_bytes(layers, range(1, 1 + dual), res, args.max_sequence_length, args.device)
        print(
            json.dumps({"layers": layers, "dual": dual, "resolution": res, "msl": args.max_sequence_length, "bytes": n})
        )
        return 0
    print(json.dumps(dry_run_summary(max_sequence_length=args.max_sequence_length)))
    return 0


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
    raise SystemExit(_main())
