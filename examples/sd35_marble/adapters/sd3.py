"""Stable Diffusion 3 / 3.5 behind the model seam: LoRA adapters via peft, text prompts.

Presets ``tiny`` (a random SD3 pipeline built from configs, ``tiny.py``) and ``sd35-medium``
(``stabilityai/stable-diffusion-3.5-medium`` or a local diffusers directory). The trained
policy is the LoRA adapter ``"default"``, the old (sampling) policy a second adapter
``"old"``, the reference of the KL the transformer with adapters disabled.
"""

from __future__ import annotations

import contextlib
import random
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .base import Cond, ConfigError, ModelAdapter

#: The 8 attention projections the MARBLE authors put LoRA on (no FFN). In SD3.5's
#: dual-attention blocks the second self-attention's to_q/to_k/to_v/to_out.0 match too.
ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
SD35_MEDIUM = "stabilityai/stable-diffusion-3.5-medium"


def load_prompt_files(paths: list[str]) -> list[list[str]]:
    """One list of prompt texts per source: a text file (one prompt per line, blank lines and
    ``#`` comments skipped), a GenEval-style ``.jsonl`` metadata file or ``builtin:NAME``
    (``prompts.BUILTIN_SETS``); errors name the file (and line)."""
    from prompts import PromptFileError, load_prompt_source

    if not paths:
        raise ConfigError("--prompt-files is empty: give at least one file of prompts")
    out = []
    for path in paths:
        if not path.startswith("builtin:") and not Path(path).is_file():
            raise ConfigError(f"prompt file {path!r} does not exist")
        try:
            out.append([p.text for p in load_prompt_source(path)])
        except PromptFileError as exc:
            raise ConfigError(str(exc)) from exc
    return out


class SD3Adapter(ModelAdapter):
    """SD3 transformer + VAE + three text encoders; LoRA ``"default"`` trained, ``"old"`` samples."""

    presets = ("tiny", "sd35-medium")

    @classmethod
    def build_rewards(cls, cfg: Any, device: torch.device) -> list[Any]:
        from rewards import build_rewards

        # each process loads its reward models onto its own device, in --reward-dtype
        return build_rewards(cfg.rewards, cfg.reward_options, device=device, dtype=cfg.reward_dtype)

    def __init__(self, cfg: Any, accelerator: Any) -> None:
        self.cfg = cfg
        self.accelerator = accelerator
        self.device = accelerator.device
        self.weight_dtype = torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float32
        from prompts import PromptSampler

        self.sources = load_prompt_files(cfg.prompt_files)
        # without replacement within each source's epoch, equal shares, same on every process
        self.sampler = PromptSampler(self.sources, cfg.prompts_per_step, seed=cfg.seed)
        self.pipe = self._load_pipeline()
        factor = self.pipe.vae_scale_factor * self.pipe.transformer.config.patch_size
        if cfg.resolution % factor:
            raise ConfigError(f"--resolution {cfg.resolution} must be a multiple of {factor} for this model")
        self.transformer = self.pipe.transformer
        self.module = self.transformer
        self.train_module: torch.nn.Module = self.transformer  # the DDP wrapper once the loop prepares it
        self.vae = self.pipe.vae
        self.latent_shape = (
            self.transformer.config.in_channels,
            cfg.resolution // self.pipe.vae_scale_factor,
            cfg.resolution // self.pipe.vae_scale_factor,
        )
        self._setup_lora()
        self.pipe.scheduler.set_timesteps(cfg.sampling_steps, device="cpu")
        self.sigmas = self.pipe.scheduler.sigmas.to(torch.float32).clone()  # (n+1,), last is 0

    # ---- model ----------------------------------------------------------------------------------
    def _load_pipeline(self):
        cfg = self.cfg
        if cfg.preset == "tiny":
            from tiny import build_tiny_pipeline

            pipe = build_tiny_pipeline(
                [p for src in self.sources for p in src], seed=cfg.seed, max_length=cfg.max_sequence_length
            )
        elif cfg.random_init:
            from sd35 import build_random_pipeline

            # SD3.5 Medium's real architecture, random weights, built on the device (no download)
            pipe = build_random_pipeline(
                [p for src in self.sources for p in src],
                seed=cfg.seed,
                dtype=self.weight_dtype,
                device=self.device,
                max_sequence_length=cfg.max_sequence_length,
            )
        else:
            from diffusers import StableDiffusion3Pipeline

            try:
                with warnings.catch_warnings():  # newer diffusers prefer dtype=, older only know torch_dtype=
                    warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
                    pipe = StableDiffusion3Pipeline.from_pretrained(
                        cfg.model, torch_dtype={"default": self.weight_dtype, "vae": torch.float32}
                    )
            except Exception as exc:  # noqa: BLE001
                raise ConfigError(
                    f"could not load the SD3 pipeline {cfg.model!r} ({type(exc).__name__}: {exc}). "
                    "SD3.5 Medium is gated on the hub: accept its licence and log in (hf auth login), "
                    "or pass --model /local/dir with the diffusers files"
                ) from exc
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae"):
            module = getattr(pipe, name)
            if module is None:
                continue
            dtype = torch.float32 if name == "vae" else self.weight_dtype  # the VAE decodes in float32
            if module.dtype != dtype:
                module.to(dtype=dtype)
            # text encoders stay on the CPU between encodes (--offload-text-encoders)
            offload = name.startswith("text_encoder") and cfg.offload_text_encoders
            module.to("cpu" if offload else self.device).eval().requires_grad_(False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _setup_lora(self) -> None:
        from peft import LoraConfig

        cfg = self.cfg

        def lora_config() -> LoraConfig:
            return LoraConfig(
                r=cfg.lora_rank,
                lora_alpha=cfg.lora_alpha,
                init_lora_weights="gaussian",
                target_modules=list(cfg.lora_targets),
            )

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            try:
                self.transformer.add_adapter(lora_config(), adapter_name="default")
            except ValueError as exc:
                raise ConfigError(f"--lora-targets {cfg.lora_targets}: {exc}") from exc
            with warnings.catch_warnings():  # peft warns that a second adapter is being added: intended
                warnings.simplefilter("ignore", UserWarning)
                self.transformer.add_adapter(lora_config(), adapter_name="old")
        self.transformer.set_adapter("default")
        self.lora_config = lora_config()
        if cfg.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        self.named = {a: self._adapter_params(a) for a in ("default", "old")}
        for adapter in self.named.values():  # trainable LoRA weights in float32, base may be bf16
            for p in adapter.values():
                p.data = p.data.float()
        params = list(self.named["default"].values())
        if not params or not all(p.requires_grad for p in params):
            raise RuntimeError("LoRA setup failed: the default adapter has no trainable parameter")
        with torch.no_grad():  # the old policy starts as the policy
            for key, p in self.named["default"].items():
                self.named["old"][key].copy_(p)

    def _adapter_params(self, adapter: str) -> dict[str, torch.nn.Parameter]:
        """``{peft state-dict key: parameter}`` of one adapter (key without the adapter name)."""
        tag = f".{adapter}."
        return {n.replace(tag, "."): p for n, p in self.transformer.named_parameters() if tag in n}

    def weights(self, which: str) -> dict[str, Tensor]:
        return self.named[which]

    @contextlib.contextmanager
    def policy(self, which: str) -> Iterator[None]:
        """Run the transformer as ``"default"``, the ``"old"`` policy or the LoRA-free ``"ref"`` model.

        peft's ``set_adapter`` / ``enable_adapters`` also toggle ``requires_grad``; switching
        back to ``"default"`` afterwards makes exactly its weights trainable again.
        """
        if which == "default":
            yield
            return
        try:
            if which == "old":
                self.transformer.set_adapter("old")
            elif which == "ref":
                self.transformer.disable_adapters()
            else:
                raise ValueError(f"policy must be 'default', 'old' or 'ref', got {which!r}")
            yield
        finally:
            if which == "ref":
                self.transformer.enable_adapters()
            self.transformer.set_adapter("default")

    def velocity(self, x: Tensor, t: Tensor, cond: Cond, policy: str = "default") -> Tensor:
        """The transformer's flow-matching velocity ``v = ε − x0`` at time ``t`` (B,), float32."""
        embeds, pooled = cond
        model = self.train_module if policy == "default" else self.transformer
        with self.policy(policy), self.accelerator.autocast():
            out = model(
                hidden_states=x.to(self.weight_dtype),
                timestep=(t * 1000.0).to(x.device),
                encoder_hidden_states=embeds,
                pooled_projections=pooled,
                return_dict=False,
            )[0]
        return out.float()

    @contextlib.contextmanager
    def _text_encoders_on_device(self) -> Iterator[None]:
        """With ``--offload-text-encoders``: the three encoders (11 GB in bf16 for SD3.5) visit
        the device for one ``encode`` and go back to the CPU, freeing their memory for rollouts."""
        if not self.cfg.offload_text_encoders or self.device.type == "cpu":
            yield
            return
        encoders = [getattr(self.pipe, n) for n in ("text_encoder", "text_encoder_2", "text_encoder_3")]
        try:
            for m in encoders:
                m.to(self.device)
            yield
        finally:
            for m in encoders:
                m.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Cond:
        """One (embeds, pooled) row per prompt (the loop indexes rows per image, no copies)."""
        with self._text_encoders_on_device():
            return self._encode(prompts)

    def _encode(self, prompts: list[str]) -> Cond:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            max_sequence_length=self.cfg.max_sequence_length,
        )
        return embeds.to(self.weight_dtype), pooled.to(self.weight_dtype)

    @torch.no_grad()
    def decode(self, x: Tensor) -> Tensor:
        """Latents → images in [0, 1] (B, 3, H, W), float32 on the CPU."""
        out = []
        sf, shift = self.vae.config.scaling_factor, self.vae.config.shift_factor or 0.0
        for chunk in x.split(self.cfg.sample_batch_size):
            img = self.vae.decode(chunk.float() / sf + shift, return_dict=False)[0]
            out.append((img.float() / 2 + 0.5).clamp(0, 1).cpu())
        return torch.cat(out)

    # ---- prompts --------------------------------------------------------------------------------
    def draw_prompts(self, rng: random.Random, n: int) -> list[str]:
        """``n`` distinct prompts, equally from each source, without replacement within each
        source's epoch (``prompts.PromptSampler``, seeded by ``--seed``; same on every process)."""
        del rng  # the sampler keeps its own seeded state (saved in checkpoints)
        if n != self.sampler.per_step:
            raise ValueError(f"draw_prompts: n = {n}, but the sampler draws {self.sampler.per_step} per step")
        return list(self.sampler.draw())  # the sources hold prompt texts

    def extra_state(self) -> dict[str, Any]:
        return {"prompt_sampler": self.sampler.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if "prompt_sampler" in state:
            self.sampler.load_state_dict(state["prompt_sampler"])

    def eval_prompts(self) -> list[str]:
        s = self.sources
        return [s[i % len(s)][(i // len(s)) % len(s[i % len(s)])] for i in range(self.cfg.grid_prompts)]

    # ---- outputs --------------------------------------------------------------------------------
    def export(self, out_dir: Path, tensors: dict[str, dict[str, Tensor]]) -> None:
        """LoRA in diffusers' format through ``StableDiffusion3Pipeline.save_lora_weights``
        (``pipe.load_lora_weights(out_dir)`` reads it; the EMA copy with ``weight_name=``)."""
        from diffusers import StableDiffusion3Pipeline

        cfg = self.lora_config.to_dict()
        metadata = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}
        names = {"default": "pytorch_lora_weights.safetensors", "ema": "pytorch_lora_weights_ema.safetensors"}
        for which, sd in tensors.items():
            StableDiffusion3Pipeline.save_lora_weights(
                out_dir,
                transformer_lora_layers=sd,
                weight_name=names[which],
                transformer_lora_adapter_metadata=metadata,
            )

    def write_samples(self, out_dir: Path, step: int, images: Tensor, prompts: list[str], per_prompt: int) -> None:
        """One PNG grid ``samples/step_XXXXXX.png``: a row per prompt."""
        from PIL import Image

        grid = images.reshape(len(prompts), per_prompt, *images.shape[1:])  # (P, n, 3, H, W)
        p, n, _, h, w = grid.shape
        canvas = grid.permute(0, 3, 1, 4, 2).reshape(p * h, n * w, 3)
        path = out_dir / "samples" / f"step_{step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((canvas * 255).round().to(torch.uint8).numpy()).save(path)
        (out_dir / "samples" / "prompts.txt").write_text("\n".join(prompts) + "\n")
