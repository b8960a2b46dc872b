#!/usr/bin/env python
"""GPU check: one RL step of SD3.5 Medium's real architecture (random weights), per method.

What one step is (the authors' step, scaled down): roll out ``--prompts`` × ``--group-size``
images with ``--sampling-steps`` Euler steps of the LoRA policy (no grad), decode them with the
real VAE, score them with four pixel rewards (``rewards.PIXEL_REWARDS`` minus JPEG
incompressibility), compute per-reward group advantages, then train on ``--train-timesteps``
timesteps per sample in micro-batches of ``--train-batch-size``: ``v_θ`` (grad), ``v_old`` and
``v_ref`` (no grad), DiffusionNFT losses, and

- ``weighted-sum``: DiffusionNFT's baseline, one advantage from the mean of the raw rewards,
  one loss, plain AdamW;
- ``marble``: ``MarbleOptimizer(AdamW, gram="shared")`` on the K per-reward losses;
- ``marble-exact-r10``: ``gram="exact", refresh_every=10`` (the authors' setting: an exact
  solve every 10 optimizer steps, cached weights in between); timed over whole cycles is too
  long here, so its median mixes solved and cached steps as they fall.

The prompt embeddings are random tensors of the real shapes (precomputed, as a run with the
text encoders moved off the GPU would hold them): the text encoders are not built.

The methods run round-robin on their own LoRA adapters of ONE transformer (so they share the
frozen weights) and their own optimizers; reported per method: median step time over
``--steps`` steps after one warm-up, its ratio to ``weighted-sum`` (the paper reports 0.97×
for MARBLE against DiffusionNFT), the training part's median, peak GPU memory of the step
(``torch.cuda.max_memory_allocated``), and host synchronisations per step counted with
``torch.cuda.set_sync_debug_mode("warn")`` (CUDA only).

Usage (the numbers in ``gpu_check.md`` come from ``gpu_check.sh``)::

    python examples/sd35_marble/gpu_check.py --device cuda --out gpu_check.md
    python examples/sd35_marble/gpu_check.py --device cpu --tiny --steps 2   # plumbing check
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import sd35  # noqa: E402
import torch  # noqa: E402
from rewards import build_rewards  # noqa: E402

METHODS = ("weighted-sum", "marble", "marble-exact-r10")
REWARDS = ("brightness", "colourfulness", "jpeg_compressibility", "text_contrast")
#: Reduced sizes for ``--tiny`` (CPU plumbing check; not a measurement).
TINY = {
    "transformer": {
        "num_layers": 2,
        "num_attention_heads": 2,
        "attention_head_dim": 8,
        "caption_projection_dim": 16,
        "joint_attention_dim": 32,
        "pooled_projection_dim": 16,
        "dual_attention_layers": [0],
        "pos_embed_max_size": 32,
    },
    "vae": {"block_out_channels": [8, 16], "down_block_types": ["DownEncoderBlock2D"] * 2,
            "up_block_types": ["UpDecoderBlock2D"] * 2, "layers_per_block": 1, "norm_num_groups": 4},
}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="reduced transformer/VAE (plumbing check on CPU)")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--prompts", type=int, default=4, help="prompts per step (authors: 48)")
    p.add_argument("--group-size", type=int, default=4, help="images per prompt (authors: 24)")
    p.add_argument("--sampling-steps", type=int, default=10, help="authors: 25")
    p.add_argument("--train-timesteps", type=int, default=2, help="authors: 24")
    p.add_argument("--train-batch-size", type=int, default=4)
    p.add_argument("--sample-batch-size", type=int, default=16)
    p.add_argument("--max-sequence-length", type=int, default=sd35.MAX_SEQUENCE_LENGTH)
    p.add_argument("--steps", type=int, default=5, help="timed steps per method (after one warm-up)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="markdown file for the table (and .json beside it)")
    return p.parse_args(argv)


class SyncCounter:
    """Counts CUDA host synchronisations inside ``with`` (``set_sync_debug_mode`` warnings)."""

    def __init__(self, device: torch.device) -> None:
        self.enabled = device.type == "cuda"
        self.count = 0

    def __enter__(self) -> SyncCounter:
        if self.enabled:
            self._catch = warnings.catch_warnings(record=True)
            self._log = self._catch.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            torch.cuda.set_sync_debug_mode(0)
            self.count = sum("synchroniz" in str(w.message) for w in self._log)
            self._catch.__exit__(*exc)


def build(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    from diffusers import AutoencoderKL

    overrides = TINY["transformer"] if args.tiny else {}
    transformer = sd35.build_transformer(device, dtype, **overrides)
    vae_cfg = {**sd35.VAE_CONFIG, **(TINY["vae"] if args.tiny else {})}
    with torch.device(device):
        vae = AutoencoderKL(**vae_cfg).eval().requires_grad_(False)
    for name in args.methods:
        transformer.add_adapter(sd35.lora_config(), adapter_name=name)
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    return transformer, vae


def run(args: argparse.Namespace) -> dict[str, Any]:
    from marble_opt import MarbleOptimizer
    from marble_opt.rl import group_advantages, nft_losses

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    transformer, vae = build(args, device, dtype)
    build_s = time.perf_counter() - t0
    cfg = transformer.config
    rewards = build_rewards(list(REWARDS), device=device)
    n_img = args.prompts * args.group_size
    latent = args.resolution // (2 ** (len(vae.config.block_out_channels) - 1))
    text_tokens = sd35.CLIP_TOKENS + args.max_sequence_length
    # one embedding per prompt (indexed per image at use), as a precomputing run holds them
    embeds = torch.randn(args.prompts, text_tokens, cfg.joint_attention_dim, device=device, dtype=dtype)
    pooled = torch.randn(args.prompts, cfg.pooled_projection_dim, device=device, dtype=dtype)
    prompts = [f'a sign that says "p{i}"' if i % 2 else f"prompt {i}" for i in range(args.prompts)]
    group = torch.arange(args.prompts).repeat_interleave(args.group_size)
    sigmas = torch.linspace(1.0, 0.0, args.sampling_steps + 1)
    shift = sd35.SCHEDULER_CONFIG["shift"]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)

    state: dict[str, dict[str, Any]] = {}
    for name in args.methods:
        transformer.set_adapter(name)
        params = [p for n, p in transformer.named_parameters() if f".{name}." in n]
        for p in params:
            p.data = p.data.float()
            p.requires_grad_(True)
        adamw = torch.optim.AdamW(params, lr=3e-4, weight_decay=1e-4)
        if name == "weighted-sum":
            opt = None
        elif name == "marble":
            opt = MarbleOptimizer(adamw, gram="shared", ema_decay=0.7)
        else:
            opt = MarbleOptimizer(adamw, gram="exact", refresh_every=10, ema_decay=0.7)
        state[name] = {
            "params": params,
            "adamw": adamw,
            "marble": opt,
            "times": [],
            "train": [],
            "peak": [],
            "syncs": [],
        }

    def velocity(x: torch.Tensor, sigma: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            out = transformer(
                hidden_states=x.to(dtype),
                encoder_hidden_states=embeds[group[idx].to(device)],
                pooled_projections=pooled[group[idx].to(device)],
                timestep=sigma.to(device) * 1000,
            ).sample
        return out.float()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step(name: str) -> tuple[float, float, float, int]:
        s = state[name]
        transformer.set_adapter(name)
        for p in s["params"]:
            p.requires_grad_(True)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync()
        start = time.perf_counter()
        counter = SyncCounter(device)
        with counter:
            # rollout (no grad), Euler, no CFG
            x0s = []
            with torch.no_grad():
                for lo in range(0, n_img, args.sample_batch_size):
                    idx = torch.arange(lo, min(lo + args.sample_batch_size, n_img))
                    x = torch.randn(len(idx), cfg.in_channels, latent, latent, device=device)
                    for i in range(args.sampling_steps):
                        v = velocity(x, sigmas[i].expand(len(idx)), idx)
                        x = x + (sigmas[i + 1] - sigmas[i]).item() * v
                    x0s.append(x)
                x0 = torch.cat(x0s)
                images = []
                for lo in range(0, n_img, args.sample_batch_size):
                    z = x0[lo : lo + args.sample_batch_size] / vae.config.scaling_factor + vae.config.shift_factor
                    images.append((vae.decode(z).sample.float() / 2 + 0.5).clamp(0, 1))
                images = torch.cat(images)
            per_image_prompts = [prompts[g] for g in group.tolist()]
            raw = {r.name: r(images, per_image_prompts) for r in rewards}
            if name == "weighted-sum":
                mean = torch.nanmean(torch.stack(list(raw.values())), dim=0)
                adv = group_advantages({"sum": mean}, group)
            else:
                adv = group_advantages(raw, group)
            masks = {k: torch.isfinite(v) for k, v in adv.items()}
            adv = {k: torch.nan_to_num(v).to(device) for k, v in adv.items()}
            masks = {k: m.to(device) for k, m in masks.items()}
            sync()
            t_train = time.perf_counter()
            micro = [
                (j, torch.randperm(n_img)[lo : lo + args.train_batch_size])
                for j in range(args.train_timesteps)
                for lo in range(0, n_img, args.train_batch_size)
            ]
            for _, idx in micro:
                sigma = sigmas[torch.randint(0, args.sampling_steps, (len(idx),))]
                di = idx.to(device)
                x = x0[di]
                sg = sigma.to(device).view(-1, 1, 1, 1)
                xt = (1 - sg) * x + sg * torch.randn_like(x)
                with torch.no_grad():
                    v_old = velocity(xt, sigma, idx)
                    transformer.disable_adapters()  # the base model, for the KL term
                    v_ref = velocity(xt, sigma, idx)
                    transformer.enable_adapters()
                    transformer.set_adapter(name)
                v = velocity(xt, sigma, idx)
                out = nft_losses(
                    v,
                    v_old,
                    x,
                    xt,
                    sigma.to(device),
                    {k: a[di] for k, a in adv.items()},
                    masks={k: m[di] for k, m in masks.items()},
                    v_ref=v_ref,
                    kl_weight=1e-4,
                )
                losses = {k: loss / len(micro) for k, loss in out.losses.items()}
                kl = out.kl / len(micro)
                if s["marble"] is None:
                    (sum(losses.values()) + kl).backward()
                else:
                    s["marble"].backward(losses, shared=v if name == "marble" else None, extra=kl)
            torch.nn.utils.clip_grad_norm_(s["params"], 1.0)
            (s["marble"] or s["adamw"]).step()
            s["adamw"].zero_grad(set_to_none=True)
            sync()
        end = time.perf_counter()
        peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else float("nan")
        for p in s["params"]:
            p.requires_grad_(False)
        return end - start, end - t_train, peak, counter.count

    for round_ in range(args.steps + 1):
        for name in args.methods:
            total, train, peak, syncs = step(name)
            if round_ > 0:  # round 0 warms up kernels and allocator
                s = state[name]
                s["times"].append(total)
                s["train"].append(train)
                s["peak"].append(peak)
                s["syncs"].append(syncs)
            print(
                f"round {round_} {name}: {total:.3f} s (train {train:.3f} s), peak {peak:.2f} GB, syncs {syncs}",
                flush=True,
            )

    base = statistics.median(state["weighted-sum"]["times"]) if "weighted-sum" in state else float("nan")
    rows = {}
    for name, s in state.items():
        med = statistics.median(s["times"])
        rows[name] = {
            "step_s": med,
            "ratio_to_weighted_sum": med / base,
            "train_s": statistics.median(s["train"]),
            "peak_gb": max(s["peak"]),
            "syncs_per_step": statistics.median(s["syncs"]) if device.type == "cuda" else None,
        }
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "build_s": build_s,
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "images_per_step": n_img,
        "micro_batches_per_step": args.train_timesteps * -(-n_img // args.train_batch_size),
        "methods": rows,
    }


def markdown(result: dict[str, Any]) -> str:
    c = result["config"]
    lines = [
        "# SD3.5 Medium GPU check (random weights, real architecture)",
        "",
        f"{result['device']}, torch {result['torch']}; {c['resolution']} px, {c['prompts']} prompts × "
        f"{c['group_size']} images, {c['sampling_steps']} sampling steps, {c['train_timesteps']} train "
        f"timesteps, micro-batch {c['train_batch_size']}; median of {c['steps']} steps after one warm-up, "
        "methods round-robin in one run.",
        "",
        "| method | step (s) | vs weighted-sum | training part (s) | peak GPU memory (GB) | host syncs / step |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in result["methods"].items():
        lines.append(
            f"| {name} | {r['step_s']:.3f} | {r['ratio_to_weighted_sum']:.3f}× | {r['train_s']:.3f} | "
            f"{r['peak_gb']:.1f} | {r['syncs_per_step']} |"
        )
    lines += ["", "Paper (MARBLE vs DiffusionNFT, full recipe, 8 GPUs): 0.97×."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None, run_fn: Callable[[argparse.Namespace], dict[str, Any]] = run) -> int:
    args = parse_args(argv)
    result = run_fn(args)
    text = markdown(result)
    print(text)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
        Path(args.out).with_suffix(".json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
