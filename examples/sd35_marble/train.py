#!/usr/bin/env python
"""Multi-reward RL fine-tuning of flow models with MARBLE (DiffusionNFT loss): digits, SD3, SD3.5.

One optimizer step:

1. draw ``--prompts-per-step`` prompts (digit labels; or text, equally from the
   ``--prompt-files``), ``--group-size`` samples each;
2. roll out with the *old* policy: deterministic flow-matching sampling
   (``marble_opt.rl.flow_sample``: Euler or DPM-Solver++(2M), no CFG), then decode;
3. score every sample with every reward (K rewards; NaN where one does not apply);
4. per-reward advantages: ``marble_opt.rl.group_advantages`` (mean per prompt group, std over
   the batch);
5. for ``--train-timesteps`` random timesteps of each sample's schedule: noise the sample,
   predict ``v_θ`` (the trained policy), ``v_old`` (the old policy, no grad) and ``v_ref`` (the
   frozen reference, no grad, for the KL), and build the K DiffusionNFT losses with
   ``marble_opt.rl.nft_losses``;
6. combine (``--combine``): ``marble``: ``MarbleOptimizer(AdamW, gram="shared").backward(losses,
   shared=v_θ, extra=kl)`` balances the K gradients (min-norm point of their convex hull);
   ``weighted-sum``: DiffusionNFT's baseline, one NFT loss from the advantage of the NaN-aware
   mean of the raw rewards; ``gdpo``: GDPO's one advantage (each reward normalised within its
   group, weighted sum, normalised over the batch: ``marble_opt.rl.gdpo_advantages``, TRL's
   ``normalize_then_sum``) in the same single NFT loss; ``equal-alpha``: the mean of the K
   losses; ``sequential``: one reward per stage;
7. clip, step, then ``θ_old ← d·θ_old + (1−d)·θ`` with ``d = min(rate·step, max)`` and the
   model EMA (``marble_opt.rl.ema_update_``).

The loop is written once against ``adapters.base.ModelAdapter`` (condition encoding,
velocity of the default/old/reference policy, decoding, latent shape, weights); the model
specifics live in ``adapters/digits.py`` and ``adapters/sd3.py``; the model-independent maths
(advantages, NFT losses, samplers, old-policy/EMA updates, update cosines) in ``marble_opt.rl``.

Presets: ``digits`` (default) fine-tunes the shipped 0.5 M-parameter digits flow on a reward
suite, on a CPU in about a minute; ``tiny`` builds a randomly initialised SD3 pipeline from
configs with pixel rewards (plumbing; seconds, no network); ``sd35-medium`` loads
``stabilityai/stable-diffusion-3.5-medium`` with the MARBLE authors' recipe.

Examples::

    python examples/sd35_marble/train.py --output-dir runs/digits --resume
    python examples/sd35_marble/train.py --combine weighted-sum --output-dir runs/digits-ws
    python examples/sd35_marble/train.py --preset tiny --max-steps 2 --output-dir /tmp/run
    accelerate launch examples/sd35_marble/train.py --preset sd35-medium --output-dir runs/sd35

Outputs in ``--output-dir``: ``metrics.jsonl`` (one JSON object per optimizer step),
``eval.jsonl`` (the rewards of the fixed evaluation batch before training and at every
``--sample-every``), the trained weights (``pytorch_lora_weights.safetensors`` in diffusers'
format for SD3, ``digits_policy.safetensors`` for digits), ``samples/`` (PNG grids; digits:
also ``eval_samples_step_XXXXXX.npz``), ``config.json`` and ``checkpoints/step_XXXXXX/`` (for
``--resume``; written so that a crash at any moment leaves a resumable run: see
``checkpoints.py``). Every run ends with a summary: each reward before → after on the
evaluation batch, the files written and the commands that plot and resume it.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from adapters import Cond, ConfigError, ModelAdapter, adapter_class, take  # noqa: E402
from adapters.sd3 import ATTENTION_TARGETS, SD35_MEDIUM, load_prompt_files  # noqa: E402
from checkpoints import (  # noqa: E402
    STATE_FILE,
    CheckpointStore,
    RunFileError,
    append_line,
    atomic_write_bytes,
    atomic_write_text,
    check_log,
    check_manifest,
    log_mark,
    manifest,
    move_files,
    read_json,
    sync_file,
    truncate_log,
)
from rewards import REWARDS, RewardLoadError, check_reward_names  # noqa: E402
from sd35 import LORA_TARGETS as SD35_LORA_TARGETS  # noqa: E402

from marble_opt.rl import (  # noqa: E402
    ema_update_,
    flow_sample,
    gdpo_advantages,
    group_advantages,
    nft_losses,
    old_policy_decay,
    reward_masks,
    update_cosines,
)

DEFAULT_PROMPTS = [str(HERE / "prompts" / f) for f in ("general.txt", "ocr.txt", "geneval.txt")]
#: Fields a resumed run must keep: changing them would not continue the same run.
FIXED_ON_RESUME = (
    "preset",
    "model",
    "random_init",
    "seed",
    "rewards",
    "combine",
    "lora_rank",
    "lora_alpha",
    "lora_targets",
    "gram",
    "reward_suite",
    "pretrain_seed",
    "marble_options",
    "reward_weights",
)

__all__ = ["ATTENTION_TARGETS", "Config", "ConfigError", "PRESETS", "Trainer", "load_prompt_files", "main"]


@dataclass
class Config:
    """Every knob of a run. Precedence: these defaults < ``PRESETS[preset]`` < ``--config``
    file < command-line flags (and, with ``--resume``, the run's saved ``config.json``
    replaces the first three)."""

    preset: str = "digits"
    model: str = ""
    output_dir: str = "outputs/sd35_marble"
    max_steps: int = 100
    combine: str = "marble"
    rewards: list[str] = field(
        default_factory=lambda: ["jpeg_compressibility", "brightness", "colourfulness", "text_contrast"]
    )
    reward_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    prompt_files: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    resolution: int = 32
    group_size: int = 8
    prompts_per_step: int = 4
    sampling_steps: int = 10
    sampler: str = "euler"
    train_timesteps: int = 2
    sample_batch_size: int = 32
    train_batch_size: int = 32
    max_sequence_length: int = 16
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=lambda: list(ATTENTION_TARGETS))
    lr: float = 3e-3
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    beta: float = 0.1
    adv_clip: float = 5.0
    kl_weight: float = 1e-4
    per_group_std: bool = False
    marble_ema: float = 0.7
    gram: str = "shared"
    refresh_every: int = 1
    old_update: str = "ema"
    old_decay_rate: float = 0.001
    old_decay_max: float = 0.95
    model_ema_decay: float = 0.9
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    num_threads: int = 1
    seed: int = 0
    sample_every: int = 50
    grid_prompts: int = 4
    grid_images_per_prompt: int = 4
    checkpoint_every: int = 50
    checkpoints_keep: int = 2
    resume: bool = False
    # digits preset
    reward_suite: str = "mismatch"
    pretrain_seed: int = 0
    # combining the rewards
    reward_weights: dict[str, float] = field(default_factory=dict)
    marble_options: dict[str, Any] = field(default_factory=dict)
    report_to: str = "none"
    random_init: bool = False
    offload_text_encoders: bool = False
    reward_dtype: str = "float32"


#: Preset values (override the dataclass defaults above, which are the tiny preset's).
PRESETS: dict[str, dict[str, Any]] = {
    # The 0.5 M-parameter digits flow (adapters/digits.py), the whole network trained; SPEC's
    # working numbers: 10 prompts x 8 samples, 2 timesteps each, lr 3e-5, 10 Euler steps.
    "digits": {
        "rewards": [],
        "group_size": 8,
        "prompts_per_step": 10,
        "sampling_steps": 10,
        "sampler": "euler",
        "train_timesteps": 2,
        "sample_batch_size": 80,
        "train_batch_size": 80,
        "lr": 3e-5,
        "max_steps": 300,
        "sample_every": 100,
        "checkpoint_every": 100,
        "grid_images_per_prompt": 8,
    },
    "tiny": {},
    # The MARBLE authors' release recipe (see SPEC): 512 px, LoRA r32/α64 on the attention
    # projections, 25-step deterministic DPM-Solver-2 rollouts without CFG, 24 images per
    # prompt, 48 prompts per step (split over processes), 24 of 25 timesteps trained,
    # β=0.1, C=5, KL 1e-4, AdamW 3e-4 / wd 1e-4, clip 1.0, old-policy decay min(0.001·step,
    # 0.95), model EMA 0.9, MARBLE ρ=0.7. bf16 autocast instead of the authors' fp16 +
    # GradScaler. Our Gram source is "shared" (on v_θ), not the authors' exact solve every
    # 10 steps: pass --gram exact --refresh-every 10 for theirs.
    "sd35-medium": {
        "model": SD35_MEDIUM,
        "rewards": ["pickscore", "hpsv2", "clipscore", "ocr"],
        "resolution": 512,
        "group_size": 24,
        "prompts_per_step": 48,
        "sampling_steps": 25,
        "sampler": "dpm2",
        "train_timesteps": 24,
        "sample_batch_size": 8,
        "train_batch_size": 4,
        "max_sequence_length": 128,
        "lora_targets": list(SD35_LORA_TARGETS),  # with the attn. prefix: 191 modules, not 243
        "prompt_files": ["builtin:general", "builtin:ocr", "builtin:geneval"],
        "offload_text_encoders": True,
        "lora_rank": 32,
        "lora_alpha": 64.0,
        "lr": 3e-4,
        "mixed_precision": "bf16",
        "num_threads": 0,
        "sample_every": 10,
        "checkpoint_every": 10,
        "max_steps": 1000,
    },
}
CHOICES = {
    "preset": tuple(PRESETS),
    "combine": ("marble", "weighted-sum", "gdpo", "equal-alpha", "sequential"),
    "report_to": ("none", "tensorboard", "wandb"),
    "sampler": ("euler", "dpm2"),
    "gram": ("shared", "exact", "exact-lean"),
    "old_update": ("ema", "copy"),
    "mixed_precision": ("no", "bf16"),
    "reward_dtype": ("float32", "bfloat16", "float16"),
}


# ---- command line ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Multi-reward RL fine-tuning of SD3.5 with MARBLE (DiffusionNFT loss, LoRA).",
        argument_default=argparse.SUPPRESS,  # only flags given on the command line override
    )
    d = Config()

    g: Any = p.add_argument_group("run")

    def add(flag: str, help: str, **kw: Any) -> None:
        name = flag.lstrip("-").replace("-", "_")
        if name in CHOICES:
            kw.setdefault("choices", CHOICES[name])
        shown = {"digits": PRESETS["digits"].get(name, getattr(d, name)), "tiny": getattr(d, name)}
        g.add_argument(flag, help=f"{help} (digits: {shown['digits']!r}; tiny: {shown['tiny']!r})", **kw)

    p.add_argument("--config", help="JSON (or YAML, with PyYAML) file of Config fields, below flags in precedence")
    p.add_argument("--list-rewards", action="store_true", help="list the available rewards and exit")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    add(
        "--preset", "digits: a real 8x8 digits flow on CPU; tiny: random SD3 plumbing; sd35-medium: the authors' recipe"
    )
    add("--model", "sd35-medium: local directory or hub id of the diffusers pipeline")
    add(
        "--random-init",
        "sd35-medium: the real architecture from embedded configs, random weights, no download",
        action=argparse.BooleanOptionalAction,
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="sd35-medium: build the transformer on the meta device with the run's LoRA, print one JSON "
        "summary (parameter and LoRA counts, token counts, activation memory per sample) and exit",
    )
    add("--output-dir", "where metrics, LoRA weights, grids and checkpoints go")
    add("--max-steps", "total optimizer steps (a resumed run continues up to it)", type=int)
    add(
        "--combine",
        "marble: MarbleOptimizer; weighted-sum: DiffusionNFT's one advantage of the mean raw reward; "
        "gdpo: GDPO's one advantage (per-reward group normalisation, weighted sum, batch normalisation); "
        "equal-alpha: mean of the per-reward normalised losses; sequential: one reward per stage",
    )
    add(
        "--resume",
        "continue the run in --output-dir from its newest complete checkpoint if there is one, else start it",
        action=argparse.BooleanOptionalAction,
    )
    add("--report-to", "tracker through accelerate (tensorboard logs under --output-dir)")
    add("--seed", "seed of prompts, noise and LoRA init", type=int)
    add("--mixed-precision", "autocast dtype; bf16 also loads the frozen weights in bf16")
    add(
        "--gradient-checkpointing",
        "recompute transformer activations in backward",
        action=argparse.BooleanOptionalAction,
    )
    add(
        "--num-threads",
        "torch CPU threads (0: torch's default; the tiny model is too small to gain from more than 1)",
        type=int,
    )
    g = p.add_argument_group("rewards and prompts")
    add("--rewards", "reward names (see --list-rewards)", nargs="+")
    add("--reward-dtype", "dtype of the reward models (each process loads them onto its own device)")
    add(
        "--reward-options",
        'JSON object {reward: {option: value}}, e.g. \'{"pickscore": {"path": "/m"}}\'',
        type=json_object,
    )
    add(
        "--prompt-files",
        "prompt sources drawn equally, without replacement per epoch: text files (a prompt per line), "
        "GenEval-style .jsonl metadata, or builtin:general|ocr|geneval",
        nargs="+",
    )
    add("--reward-suite", "digits: reward suite of digits/rewards.py (mismatch or conflict)")
    add("--pretrain-seed", "digits: which shipped pretrained model (its pretraining seed)", type=int)
    add(
        "--reward-weights",
        "weighted-sum: JSON {reward: weight} for the mean of the raw rewards; gdpo: for the sum of the "
        "group-normalised rewards (missing: 1), e.g. '{\"ocr\": 2}'",
        type=json_object,
    )
    g = p.add_argument_group("rollouts")
    add("--resolution", "image size in pixels", type=int)
    add("--group-size", "images per prompt (>= 2: advantages are centred per group)", type=int)
    add("--prompts-per-step", "prompts per optimizer step, over all processes", type=int)
    add("--sampling-steps", "flow-matching steps per rollout", type=int)
    add("--sampler", "deterministic sampler (dpm2 = DPM-Solver++(2M))")
    add("--sample-batch-size", "images per sampling forward pass (per process)", type=int)
    add("--max-sequence-length", "T5 tokens per prompt", type=int)
    add(
        "--offload-text-encoders",
        "keep the text encoders on the CPU between encodes",
        action=argparse.BooleanOptionalAction,
    )
    g = p.add_argument_group("training")
    add("--train-timesteps", "timesteps trained per sample (out of --sampling-steps)", type=int)
    add("--train-batch-size", "samples per training micro-batch (per process)", type=int)
    add("--lora-rank", "LoRA rank", type=int)
    add("--lora-alpha", "LoRA alpha (scale alpha/rank)", type=float)
    add("--lora-targets", "module names that get LoRA", nargs="+")
    add("--lr", "AdamW learning rate", type=float)
    add("--weight-decay", "AdamW weight decay", type=float)
    add("--max-grad-norm", "gradient clipping norm (0: off)", type=float)
    add("--beta", "DiffusionNFT beta", type=float)
    add("--adv-clip", "advantage clip C", type=float)
    add("--kl-weight", "weight of the KL to the LoRA-free model (0: skip the reference pass)", type=float)
    add(
        "--per-group-std",
        "scale advantages by the std within each group, not the batch",
        action=argparse.BooleanOptionalAction,
    )
    add("--marble-ema", "MARBLE's EMA rho of the balancing weights", type=float)
    add(
        "--marble-options",
        'JSON object of extra MarbleOptimizer keyword arguments, e.g. \'{"normalize": "none"}\'',
        type=json_object,
    )
    add("--gram", "MARBLE Gram source (shared: on v_theta, one backward)")
    add("--refresh-every", "solve MARBLE's QP every N steps", type=int)
    add("--old-update", "old policy: EMA of the trained LoRA, or a copy each step")
    add("--old-decay-rate", "old-policy decay d = min(rate*step, max)", type=float)
    add("--old-decay-max", "old-policy decay cap", type=float)
    add("--model-ema-decay", "EMA of the trained LoRA saved for evaluation (0: off)", type=float)
    g = p.add_argument_group("outputs")
    add("--sample-every", "save a sample grid every N steps (and at the last)", type=int)
    add("--grid-prompts", "prompts in a sample grid", type=int)
    add("--grid-images-per-prompt", "images per prompt in a sample grid", type=int)
    add("--checkpoint-every", "save a checkpoint every N steps (and at the last)", type=int)
    add("--checkpoints-keep", "how many of the newest checkpoints to keep in checkpoints/", type=int)
    return p


def json_object(text: str) -> dict[str, Any]:
    """argparse type: a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}): {text!r}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _read_config_file(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--config {path}: no such file")
    text = file.read_text()
    if file.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as exc:
            raise ConfigError(f"--config {path}: YAML needs PyYAML (pip install pyyaml); or use JSON") from exc
        data = yaml.safe_load(text)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--config {path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of Config fields, got {type(data).__name__}")
    data = {k.replace("-", "_"): v for k, v in data.items()}
    known = {f.name for f in fields(Config)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"--config {path}: unknown field(s) {unknown}; known: {sorted(known)}")
    return data


def resolve_config(args: argparse.Namespace) -> Config:
    """Defaults < preset < --config file < flags; with --resume, the saved config.json."""
    cli = {k: v for k, v in vars(args).items() if k not in ("config", "list_rewards", "print_config", "dry_run")}
    file = _read_config_file(args.config) if getattr(args, "config", None) else {}
    output_dir = cli.get("output_dir", file.get("output_dir", Config.output_dir))
    resume = cli.get("resume", file.get("resume", False))
    saved_path = Path(output_dir) / "config.json"
    newest = CheckpointStore(output_dir).newest()
    if resume and newest is None:
        resume = False  # nothing to continue: --resume starts the run
        cli = {**cli, "resume": False}
        file = {**file, "resume": False}
    if resume:
        assert newest is not None
        saved = read_json(
            saved_path,
            f"copy {newest[1] / 'config.json'} (the configuration saved with the newest checkpoint) over it, "
            "or start again in a new --output-dir",
        )
        if not isinstance(saved, dict):
            raise RunFileError(f"{saved_path} does not hold a JSON object; copy {newest[1] / 'config.json'} over it")
        for key in FIXED_ON_RESUME:
            for source, values in (("--config", file), ("the command line", cli)):
                if key in values and values[key] != saved.get(key):
                    raise ConfigError(
                        f"--resume: {key} = {values[key]!r} from {source} differs from the run's {saved.get(key)!r}; "
                        "a resumed run keeps it (start a new --output-dir to change it)"
                    )
        merged = {**saved, **file, **cli, "resume": True, "output_dir": output_dir}
        if saved.get("combine") == "sequential" and merged.get("max_steps") != saved.get("max_steps"):
            raise ConfigError(
                f"--resume: --max-steps {merged.get('max_steps')} differs from the run's {saved.get('max_steps')}; "
                "--combine sequential divides --max-steps into its stages, so a resumed run keeps it"
            )
    else:
        preset = cli.get("preset", file.get("preset", Config.preset))
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose one of {list(PRESETS)}")
        merged = {**PRESETS[preset], **file, **cli, "preset": preset}
    try:
        return Config(**merged)
    except TypeError as exc:
        raise ConfigError(f"bad configuration: {exc}") from exc


def _check_types(cfg: Config) -> None:
    """Values from a config file are not typed by argparse: check (and widen int → float)."""
    defaults = Config()
    for f in fields(Config):
        value, default = getattr(cfg, f.name), getattr(defaults, f.name)
        flag = f"--{f.name.replace('_', '-')}"
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if ok:
                setattr(cfg, f.name, float(value))
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, list):
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        else:
            ok = isinstance(value, type(default))
        if not ok:
            raise ConfigError(f"{flag} must be {type(default).__name__}, got {value!r} ({type(value).__name__})")


def validate(cfg: Config) -> None:
    """Raise ``ConfigError`` naming the first bad value (no model is touched)."""
    _check_types(cfg)
    for name, choices in CHOICES.items():
        if getattr(cfg, name) not in choices:
            raise ConfigError(f"{name} = {getattr(cfg, name)!r}; choose one of {list(choices)}")
    if cfg.group_size < 2:
        raise ConfigError(
            f"--group-size must be at least 2, got {cfg.group_size}: advantages are centred within each "
            "prompt's group, so a group of one image always has advantage 0 and nothing to learn"
        )
    positive_ints = (
        "max_steps",
        "prompts_per_step",
        "sampling_steps",
        "train_timesteps",
        "sample_batch_size",
        "train_batch_size",
        "resolution",
        "lora_rank",
        "refresh_every",
        "sample_every",
        "checkpoint_every",
        "checkpoints_keep",
        "grid_prompts",
        "grid_images_per_prompt",
        "max_sequence_length",
    )
    for name in positive_ints:
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
    if cfg.train_timesteps > cfg.sampling_steps:
        raise ConfigError(
            f"--train-timesteps ({cfg.train_timesteps}) cannot exceed --sampling-steps ({cfg.sampling_steps})"
        )
    if cfg.num_threads < 0:
        raise ConfigError(f"--num-threads must be >= 0, got {cfg.num_threads!r}")
    for name in ("lr", "beta", "adv_clip", "lora_alpha"):
        if not getattr(cfg, name) > 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {getattr(cfg, name)!r}")
    for name in ("weight_decay", "kl_weight", "max_grad_norm", "old_decay_rate"):
        if not getattr(cfg, name) >= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)!r}")
    for name in ("marble_ema", "old_decay_max", "model_ema_decay"):
        if not 0.0 <= getattr(cfg, name) < 1.0:
            raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(cfg, name)!r}")
    if cfg.preset == "sd35-medium" and not cfg.model:
        raise ConfigError("--model is empty: pass a local directory or hub id of SD3.5 Medium")
    if not isinstance(cfg.reward_options, dict):
        raise ConfigError(f"--reward-options must be a JSON object {{reward: {{...}}}}, got {cfg.reward_options!r}")
    for name, w in cfg.reward_weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w < float("inf"):
            raise ConfigError(f"--reward-weights: weight of {name!r} must be a finite number >= 0, got {w!r}")
    reserved = {"ema_decay", "gram", "refresh_every"} & set(cfg.marble_options)
    if reserved:
        raise ConfigError(
            f"--marble-options {sorted(reserved)}: set these with --marble-ema, --gram, --refresh-every instead"
        )
    if cfg.marble_options and cfg.combine != "marble":
        raise ConfigError(f"--marble-options applies to --combine marble, not {cfg.combine!r}")
    if cfg.preset == "digits":
        if cfg.pretrain_seed < 0:
            raise ConfigError(f"--pretrain-seed must be >= 0, got {cfg.pretrain_seed!r}")
        adapter_class(cfg.preset).check_rewards(cfg)
        return
    try:
        check_reward_names(cfg.rewards)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if cfg.reward_weights:
        unknown = sorted(set(cfg.reward_weights) - set(cfg.rewards))
        if unknown:
            raise ConfigError(f"--reward-weights names {unknown}, which are not among --rewards {cfg.rewards}")
    if not cfg.lora_targets:
        raise ConfigError("--lora-targets is empty")
    if cfg.random_init and cfg.preset != "sd35-medium":
        raise ConfigError(
            f"--random-init builds SD3.5 Medium's architecture: use it with --preset sd35-medium, not {cfg.preset!r}"
        )


# ---- small helpers -------------------------------------------------------------------------------
def finite_or_none(value: Any) -> Any:
    """JSON has no NaN: non-finite floats are logged as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


METRICS_LOG = "metrics.jsonl"
EVAL_LOG = "eval.jsonl"


def _torch_bytes(obj: Any) -> bytes:
    """``torch.save`` into memory (written to disk by ``atomic_write_bytes``)."""
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


#: Key of the baselines' single combined advantage (``--combine weighted-sum`` and ``gdpo``).
COMBINED = "__weighted_sum__"


def weighted_mean_reward(rewards: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """DiffusionNFT's combined reward: the NaN-aware weighted mean of the raw rewards.

    ``c(i) = Σ_k w_k R_k(i) / Σ_k w_k`` over the rewards that apply to sample i (finite);
    NaN where none applies. ``weights`` maps a reward name to ``w_k`` (missing: 1).
    """
    names = list(rewards)
    r = torch.stack([rewards[k].double() for k in names])  # (K, B)
    w = torch.tensor([float(weights.get(k, 1.0)) for k in names], dtype=torch.float64)[:, None].expand_as(r)
    valid = torch.isfinite(r) & (w > 0)
    num = torch.where(valid, r * w, torch.zeros_like(r)).sum(0)
    den = torch.where(valid, w, torch.zeros_like(w)).sum(0)
    return torch.where(den > 0, num / den.clamp(min=1e-300), torch.full_like(num, float("nan"))).float()


def nan_mean(x: torch.Tensor) -> float | None:
    finite = x[torch.isfinite(x)]
    return float(finite.mean()) if finite.numel() else None


# ---- the trainer: the RL loop, written once against ModelAdapter -------------------------------------
@dataclass
class Rollout:
    prompts: list[Any]  # (B,) one prompt per sample
    group_ids: torch.Tensor  # (B,) global group index
    prompt_index: torch.Tensor  # (B,) row of ``cond`` of each sample
    x0: torch.Tensor  # (B, *latent_shape) final samples, float32
    cond: Cond  # one row per (local) prompt
    images: torch.Tensor  # decoded samples for the rewards, float32, CPU
    rewards: dict[str, torch.Tensor] | None = None  # (B,) local rewards, scored during the rollout


class Trainer:
    """DiffusionNFT multi-reward RL with MARBLE (or a baseline) for any ``ModelAdapter``."""

    def __init__(self, cfg: Config, rewards: list[Any] | None = None) -> None:
        from accelerate import Accelerator

        self.cfg = cfg
        if cfg.num_threads > 0:
            torch.set_num_threads(cfg.num_threads)
        self.accelerator = Accelerator(
            mixed_precision=cfg.mixed_precision,
            log_with=None if cfg.report_to == "none" else cfg.report_to,
            project_dir=cfg.output_dir,
        )
        acc = self.accelerator
        if cfg.prompts_per_step % acc.num_processes:
            raise ConfigError(
                f"--prompts-per-step {cfg.prompts_per_step} must be a multiple of the number of processes "
                f"({acc.num_processes})"
            )
        self.device = acc.device
        self.out = Path(cfg.output_dir)
        self.store = CheckpointStore(self.out)
        #: the checkpoint this run resumed from, with its trainer_state.json
        self.resumed_from: tuple[Path, dict[str, Any]] | None = None
        self.local_prompts = cfg.prompts_per_step // acc.num_processes
        adapter_cls = adapter_class(cfg.preset)
        # rewards after the Accelerator (each rank's models on its device), before the model
        self.rewards = rewards if rewards is not None else adapter_cls.build_rewards(cfg, self.device)
        self.reward_names = [r.name for r in self.rewards]
        self.adapter: ModelAdapter = adapter_cls(cfg, acc)
        # DDP around the trainable module (as diffusers' examples do); the policy's velocity goes
        # through the wrapper, so an ordinary backward (and MARBLE's one backward) is averaged by it.
        self.adapter.train_module = acc.prepare(self.adapter.module)
        self.params = list(self.adapter.weights("default").values())
        self.ema = (
            {k: p.detach().clone() for k, p in self.adapter.weights("default").items()}
            if cfg.model_ema_decay > 0
            else None
        )

        from marble_opt import MarbleOptimizer

        base = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        if cfg.combine == "marble":
            # --marble-ema is MARBLE's ρ: other weightings (--marble-options '{"weighting": ...}') have none
            weighting = cfg.marble_options.get("weighting", "marble")
            ema = {"ema_decay": cfg.marble_ema} if weighting == "marble" else {}
            try:
                self.marble: MarbleOptimizer | None = MarbleOptimizer(
                    base, gram=cfg.gram, refresh_every=cfg.refresh_every, **ema, **cfg.marble_options
                )
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"--marble-options {cfg.marble_options}: {exc}") from exc
            self.optimizer: torch.optim.Optimizer = self.marble
        else:
            self.marble = None
            self.optimizer = base

        self.sigmas = self.adapter.sigmas
        self.prompt_rng = random.Random(cfg.seed)
        self.gen = torch.Generator().manual_seed(cfg.seed * 1000 + acc.process_index + 1)
        self.step = 0
        #: set True (e.g. by a benchmark) to keep the step actually taken in ``last_update``
        self.track_update = False
        self.last_update: list[torch.Tensor] | None = None
        #: called after every optimizer step as ``callback(trainer, row, batch, adv, masks)``
        self.step_callbacks: list[Any] = []
        if cfg.resume:
            self._load_checkpoint()

    # ---- sampling -------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, noise: torch.Tensor, cond: Cond, policy: str = "old") -> torch.Tensor:
        """Deterministic sampling with ``cfg.sampler`` (``marble_opt.rl.flow_sample``), one row of
        ``cond`` per sample."""
        a = self.adapter
        return flow_sample(lambda x, t: a.velocity(x, t, cond, policy), noise, self.sigmas, self.cfg.sampler)

    @torch.no_grad()
    def rollout(self) -> Rollout:
        cfg, acc = self.cfg, self.accelerator
        start = acc.process_index * self.local_prompts
        mine = self.adapter.draw_prompts(self.prompt_rng, cfg.prompts_per_step)[start : start + self.local_prompts]
        cond = self.adapter.encode(mine)
        g = cfg.group_size
        prompt_index = torch.arange(len(mine)).repeat_interleave(g)
        prompts = [p for p in mine for _ in range(g)]
        group_ids = torch.arange(start, start + len(mine)).repeat_interleave(g)
        reward_prompts = self.adapter.reward_prompts(prompts)
        latents, images, scored = [], [], []
        # chunk i is decoded, then scored on a worker thread while chunk i+1 is sampled
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="rewards") as pool:
            for lo in range(0, len(prompts), cfg.sample_batch_size):
                hi = min(lo + cfg.sample_batch_size, len(prompts))
                noise = torch.randn((hi - lo, *self.adapter.latent_shape), generator=self.gen).to(self.device)
                latents.append(self.sample(noise, take(cond, prompt_index[lo:hi])))
                images.append(self.adapter.decode(latents[-1]))
                scored.append(pool.submit(self._score_chunk, images[-1], reward_prompts[lo:hi]))
            chunks = [f.result() for f in scored]
        rewards = {r.name: torch.cat([c[r.name] for c in chunks]) for r in self.rewards}
        return Rollout(prompts, group_ids, prompt_index, torch.cat(latents), cond, torch.cat(images), rewards)

    def _score_chunk(self, images: torch.Tensor, prompts: list[Any]) -> dict[str, torch.Tensor]:
        """Every reward on one chunk of images: (b,) float32 each (runs on the reward thread)."""
        return {r.name: r(images, prompts).float() for r in self.rewards}

    def score(self, batch: Rollout) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Local rewards, then advantages over the whole (all-process) batch; returns
        ``(gathered rewards, local advantages, local masks)``."""
        acc = self.accelerator
        if batch.rewards is not None:  # scored during the rollout
            local = batch.rewards
        else:
            local = self._score_chunk(batch.images, self.adapter.reward_prompts(batch.prompts))
        gathered = {k: acc.gather(v.to(self.device)).cpu() for k, v in local.items()}
        gids = acc.gather(batch.group_ids.to(self.device)).cpu()
        adv = group_advantages(gathered, gids, global_std=not self.cfg.per_group_std)
        n = batch.x0.shape[0]
        lo = acc.process_index * n
        adv_local = {k: a[lo : lo + n].to(self.device) for k, a in adv.items()}
        masks = {k: m.to(self.device) for k, m in reward_masks(local).items()}
        if self.cfg.combine == "weighted-sum":  # DiffusionNFT: one advantage of the mean raw reward
            combined = {COMBINED: weighted_mean_reward(gathered, self.cfg.reward_weights)}
            adv_local[COMBINED] = group_advantages(combined, gids, global_std=not self.cfg.per_group_std)[COMBINED][
                lo : lo + n
            ].to(self.device)
            masks[COMBINED] = torch.isfinite(combined[COMBINED][lo : lo + n]).to(self.device)
        elif self.cfg.combine == "gdpo":  # GDPO: one advantage of the group-normalised rewards' weighted sum
            weights = {k: float(self.cfg.reward_weights.get(k, 1.0)) for k in gathered}
            gdpo = gdpo_advantages(gathered, gids, weights=weights)[lo : lo + n]  # NaN: no reward applies
            adv_local[COMBINED] = gdpo.to(self.device)
            masks[COMBINED] = torch.isfinite(gdpo).to(self.device)
        return gathered, adv_local, masks

    # ---- one optimizer step --------------------------------------------------------------------------
    def nft_losses_at(
        self,
        batch: Rollout,
        idx: torch.Tensor,
        sigma: torch.Tensor,
        eps: torch.Tensor,
        adv: dict[str, torch.Tensor],
        masks: dict[str, torch.Tensor],
        keys: Sequence[str],
        *,
        kl: bool = True,
        reduction: str = "mean",
    ) -> tuple[torch.Tensor, Any]:
        """The DiffusionNFT losses of samples ``idx`` (n,) of ``batch`` noised to times ``sigma``
        (n,) with noise ``eps``: ``(v_θ, NFTLosses)``, the reward keys ``keys``; the KL term
        (to the adapter's reference) when ``kl`` and ``--kl-weight`` > 0."""
        cfg, a = self.cfg, self.adapter
        dev_idx = idx.to(self.device)
        sigma = sigma.to(self.device)
        x0 = batch.x0[dev_idx]
        eps = eps.to(self.device)
        s = sigma.view(-1, *([1] * (x0.ndim - 1)))
        xt = (1 - s) * x0 + s * eps
        cond = take(batch.cond, batch.prompt_index[idx])
        with torch.no_grad():
            v_old = a.velocity(xt, sigma, cond, "old")
            v_ref = a.velocity(xt, sigma, cond, "ref") if kl and cfg.kl_weight > 0 else None
        v = a.velocity(xt, sigma, cond, "default")
        out = nft_losses(
            v,
            v_old,
            x0,
            xt,
            sigma,
            {k: adv[k][dev_idx] for k in keys},
            beta=cfg.beta,
            adv_clip=cfg.adv_clip,
            masks={k: masks[k][dev_idx] for k in keys},
            v_ref=v_ref,
            kl_weight=cfg.kl_weight,
            reduction=reduction,
        )
        return v, out

    def train_step(
        self, batch: Rollout, adv: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]
    ) -> dict[str, Any]:
        cfg = self.cfg
        b = batch.x0.shape[0]
        n_sched = len(self.sigmas) - 1
        # each sample is trained on train_timesteps distinct timesteps of its schedule
        slots = torch.argsort(torch.rand(b, n_sched, generator=self.gen), dim=1)[:, : cfg.train_timesteps]
        order = torch.randperm(b, generator=self.gen)
        micro = [
            (j, order[lo : lo + cfg.train_batch_size])
            for j in range(cfg.train_timesteps)
            for lo in range(0, b, cfg.train_batch_size)
        ]
        n_micro = len(micro)
        names = self.reward_names
        sums = {"loss": 0.0, "kl": 0.0, **{f"loss/{k}": 0.0 for k in names}}
        cos_sum = {k: 0.0 for k in names}
        mean_cos_sum = {k: 0.0 for k in names}
        cos_count = {k: 0.0 for k in names}
        raw_sum = {k: 0.0 for k in names}
        raw_count = 0
        skipped = False
        for j, idx in micro:
            eps = torch.randn((len(idx), *batch.x0.shape[1:]), generator=self.gen)
            cross = self.marble is not None and cfg.marble_options.get("gram_estimator") == "cross"
            keys = [*names, COMBINED] if COMBINED in adv else names
            v, out = self.nft_losses_at(
                batch, idx, self.sigmas[slots[idx, j]], eps, adv, masks, keys, reduction="none" if cross else "mean"
            )
            mean_losses = {k: out.losses[k].mean() if cross else out.losses[k] for k in keys}
            losses = {k: mean_losses[k] / n_micro for k in names}
            kl = out.kl / n_micro if out.kl is not None else None
            for k in names:
                sums[f"loss/{k}"] += float(mean_losses[k].detach()) / n_micro
            sums["loss"] += float(sum(mean_losses[k].detach() for k in names)) / len(names) / n_micro
            sums["kl"] += float(out.kl.detach()) / n_micro if out.kl is not None else 0.0
            if self.marble is not None:
                if cross:  # per-sample losses and prompt groups for the cross-batch Gram estimate
                    per_sample = {k: out.losses[k] / n_micro for k in names}
                    report = self.marble.backward(per_sample, groups=batch.group_ids[idx].to(self.device), extra=kl)
                else:
                    shared = v if cfg.gram == "shared" else None
                    report = self.marble.backward(losses, shared=shared, extra=kl)
                skipped |= report.skipped
                if report.update_cosine:
                    for k in names:
                        if report.grad_norms.get(k, 0.0) > 1e-12:
                            cos_sum[k] += report.update_cosine[k]
                            mean_cos_sum[k] += report.mean_cosine[k]
                            cos_count[k] += 1
                if report.raw_weights:
                    raw_count += 1
                    for k in names:
                        raw_sum[k] += float(report.raw_weights.get(k, 0.0))
            else:
                total = self._baseline_loss(losses, out.losses.get(COMBINED), n_micro)
                cos, valid = update_cosines(losses, v, update=None if cfg.combine == "equal-alpha" else total)
                mean_cos, _ = update_cosines(losses, v) if cfg.combine != "equal-alpha" else (cos, valid)
                for k in names:
                    if valid[k]:
                        cos_sum[k] += cos[k]
                        mean_cos_sum[k] += mean_cos[k]
                        cos_count[k] += 1
                (total + kl if kl is not None else total).backward()
        grad_norm = float("nan")
        if not skipped:
            max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
            # MarbleOptimizer skips non-finite steps itself; the baselines need this guard
            skipped = not math.isfinite(grad_norm)
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)  # AdamW skips parameters without a grad
        before = [p.detach().clone() for p in self.params] if self.track_update else None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if before is not None:
            self.last_update = [p.detach() - b for p, b in zip(self.params, before)]
        stats: dict[str, Any] = {**sums, "grad_norm": grad_norm, "skipped": skipped}
        for k in names:
            c = cos_count[k]
            stats[f"cosine/{k}"] = cos_sum[k] / c if c else None
            stats[f"mean_cosine/{k}"] = mean_cos_sum[k] / c if c else None
        if self.marble is not None:
            weights = self.marble.weights
            for k in names:
                stats[f"weight/{k}"] = weights.get(k)
                # alpha* before smoothing, averaged over the step's micro-batches (None on cached steps)
                stats[f"raw_weight/{k}"] = raw_sum[k] / raw_count if raw_count else None
        else:
            for k, w in self.baseline_weights().items():
                stats[f"weight/{k}"] = w
        cosines = [stats[f"cosine/{k}"] for k in names if stats[f"cosine/{k}"] is not None]
        mean_cosines = [stats[f"mean_cosine/{k}"] for k in names if stats[f"mean_cosine/{k}"] is not None]
        stats["worst_cosine"] = min(cosines) if cosines else None
        stats["worst_mean_cosine"] = min(mean_cosines) if mean_cosines else None
        return stats

    def stage(self) -> int:
        """``--combine sequential``: the index of the reward trained at the current step
        (stages of equal length over ``max_steps``, in the order of the rewards)."""
        k = len(self.reward_names)
        return min(k - 1, self.step * k // max(self.cfg.max_steps, 1))

    def baseline_weights(self) -> dict[str, float]:
        """The fixed weights of a baseline, as logged under ``weight/<name>``."""
        names, cfg = self.reward_names, self.cfg
        if cfg.combine == "sequential":
            active = self.stage()
            return {k: float(i == active) for i, k in enumerate(names)}
        if cfg.combine in ("weighted-sum", "gdpo"):
            raw = {k: float(cfg.reward_weights.get(k, 1.0)) for k in names}
            total = sum(raw.values()) or 1.0
            return {k: w / total for k, w in raw.items()}
        return {k: 1.0 / len(names) for k in names}

    def _baseline_loss(
        self, losses: dict[str, torch.Tensor], combined: torch.Tensor | None, n_micro: int
    ) -> torch.Tensor:
        """The loss a baseline minimises (without the KL)."""
        cfg = self.cfg
        if cfg.combine in ("weighted-sum", "gdpo"):  # the one NFT loss of the combined advantage
            assert combined is not None
            return combined / n_micro
        if cfg.combine == "sequential":
            return losses[self.reward_names[self.stage()]]
        return sum(losses.values()) / len(losses)

    @torch.no_grad()
    def update_old_policy(self) -> float:
        """``θ_old ← d·θ_old + (1−d)·θ`` (``--old-update copy``: d = 0) and the model EMA; returns d."""
        cfg = self.cfg
        d = 0.0 if cfg.old_update == "copy" else old_policy_decay(self.step - 1, cfg.old_decay_rate, cfg.old_decay_max)
        policy = self.adapter.weights("default")
        ema_update_(self.adapter.weights("old"), policy, d)
        if self.ema is not None:
            ema_update_(self.ema, policy, cfg.model_ema_decay)
        return d

    # ---- outputs ----------------------------------------------------------------------------------------
    def weight_tensors(self, which: str) -> dict[str, torch.Tensor]:
        """CPU float32 copies of the ``"default"``, ``"old"`` or ``"ema"`` weights."""
        if which == "ema":
            assert self.ema is not None
            src = self.ema
        else:
            src = self.adapter.weights(which)
        return {k: v.detach().float().cpu().contiguous() for k, v in src.items()}

    def save_samples(self) -> None:
        """Evaluate (``evaluate``) and write the evaluation images through the adapter."""
        self.evaluate(write=True)

    @torch.no_grad()
    def evaluate(self, write: bool = False) -> None:
        """The adapter's fixed evaluation prompts from fixed noise with the current policy: their
        rewards (and the adapter's ``eval_metrics``) appended to ``eval.jsonl``, the images
        written by the adapter when ``write``."""
        cfg, a = self.cfg, self.adapter
        prompts = a.eval_prompts()
        n = cfg.grid_images_per_prompt
        gen = torch.Generator().manual_seed(a.eval_seed(cfg.seed))
        cond = a.encode(prompts)
        images = []
        for i in range(len(prompts)):
            noise = torch.randn((n, *a.latent_shape), generator=gen).to(self.device)
            x = self.sample(noise, take(cond, torch.full((n,), i)), policy="default")
            images.append(a.decode(x))
        batch = torch.cat(images)
        per_sample = [p for p in prompts for _ in range(n)]
        scores = self._score_chunk(batch, a.reward_prompts(per_sample))
        row: dict[str, Any] = {"step": self.step, "samples": int(batch.shape[0])}
        row.update({f"reward/{k}": nan_mean(v) for k, v in scores.items()})
        row.update(a.eval_metrics(batch, per_sample))
        if write:  # into a staging folder, then each file into place by one rename
            staging = self._staging()
            a.write_samples(staging, self.step, batch, prompts, n)
            move_files(staging, self.out)
            shutil.rmtree(staging, ignore_errors=True)
        append_line(self.out / EVAL_LOG, json.dumps({k: finite_or_none(v) for k, v in row.items()}, allow_nan=False))

    def _staging(self) -> Path:
        staging = self.out / ".staging"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        return staging

    def save_checkpoint(self) -> None:
        """``checkpoints/step_XXXXXX``: written into a hidden folder (each file through a temporary
        name), exported weights moved into place, then made visible by one rename; the newest
        ``--checkpoints-keep`` are kept."""
        from safetensors.torch import save as safetensors_bytes

        cfg, acc = self.cfg, self.accelerator
        if acc.num_processes > 1:  # DDP keeps the replicas identical: check it before saving one of them
            local = torch.stack([p.detach().double().sum() for p in self.params]).to(self.device)
            every = acc.gather(local[None]).cpu()
            if not torch.equal(every, every[:1].expand_as(every)):
                raise RuntimeError(f"step {self.step}: the trained weights differ between processes")
        acc.wait_for_everyone()
        if acc.is_main_process:
            tmp = self.store.begin(self.step)
        acc.wait_for_everyone()
        tmp = self.store.root / f".tmp-step_{self.step:06d}"
        rng = {"gen": self.gen.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        atomic_write_bytes(tmp / f"rng_{acc.process_index}.pt", _torch_bytes(rng))
        whiches = ("default", "old") + (("ema",) if self.ema is not None else ())
        if acc.is_main_process:
            for which in whiches:
                data = safetensors_bytes(self.weight_tensors(which))
                atomic_write_bytes(tmp / f"weights_{which}.safetensors", data)
            atomic_write_bytes(tmp / "optimizer.pt", _torch_bytes(self.optimizer.state_dict()))
            extra = {"prompt_rng": self.prompt_rng.getstate(), "adapter": self.adapter.extra_state()}
            atomic_write_bytes(tmp / "prompt_rng.pt", _torch_bytes(extra))
            atomic_write_text(tmp / "config.json", json.dumps(asdict(cfg), indent=2) + "\n")
        acc.wait_for_everyone()
        if acc.is_main_process:
            logs = {}
            for key, name in (("metrics", METRICS_LOG), ("eval", EVAL_LOG)):
                sync_file(self.out / name)
                logs[key] = log_mark(self.out / name)
            state = {"step": self.step, "num_processes": acc.num_processes, **logs, "files": manifest(tmp)}
            atomic_write_text(tmp / STATE_FILE, json.dumps(state, indent=2) + "\n")
            # the exported weights go into place before the checkpoint is visible: a run whose
            # newest checkpoint is its last step has its final weights
            staging = self._staging()
            self.adapter.export(staging, {w: self.weight_tensors(w) for w in whiches if w != "old"})
            move_files(staging, self.out)
            shutil.rmtree(staging, ignore_errors=True)
            self.store.commit(tmp, self.step, cfg.checkpoints_keep)
        acc.wait_for_everyone()

    def _load_checkpoint(self) -> None:
        """Restore the newest complete checkpoint; a file that cannot be read stops the run with
        an error naming it and the way out."""
        from safetensors.torch import load_file

        acc = self.accelerator
        newest = self.store.newest()
        if newest is None:
            raise ConfigError(f"--resume: {self.store.root} holds no complete checkpoint")
        _, ckpt = newest
        fix = self.store.before(ckpt)
        state = read_json(ckpt / STATE_FILE, fix)
        needed = {"step", "num_processes", "metrics", "eval", "files"}
        if not isinstance(state, dict) or not needed <= set(state) or not isinstance(state["step"], int):
            raise RunFileError(f"{ckpt / STATE_FILE} does not hold a checkpoint's state {sorted(needed)}; {fix}")
        check_manifest(ckpt, state, fix)
        if state["num_processes"] != acc.num_processes:
            raise ConfigError(
                f"--resume: the run used {state['num_processes']} processes, this one has "
                f"{acc.num_processes}; resume with the same number"
            )
        for key, name in (("metrics", METRICS_LOG), ("eval", EVAL_LOG)):
            check_log(self.out / name, state[key], ckpt, fix)

        def read(name: str, loader: Any) -> Any:
            try:
                return loader(ckpt / name)
            except Exception as exc:  # noqa: BLE001 - any failure to read is reported with the file
                raise RunFileError(f"{ckpt / name} cannot be read ({type(exc).__name__}: {exc}); {fix}") from exc

        def restore(name: str, apply: Any, value: Any) -> None:
            try:
                apply(value)
            except Exception as exc:  # noqa: BLE001
                raise RunFileError(f"{ckpt / name} does not fit this run ({type(exc).__name__}: {exc}); {fix}") from exc

        for which in ("default", "old") + (("ema",) if self.ema is not None else ()):
            name = f"weights_{which}.safetensors"
            sd = read(name, lambda f: load_file(str(f)))
            target = self.ema if which == "ema" else self.adapter.weights(which)

            def copy_into(sd: dict[str, torch.Tensor], target: dict[str, torch.Tensor] = target) -> None:
                with torch.no_grad():
                    for key, p in target.items():
                        p.copy_(sd[key])

            restore(name, copy_into, sd)
        optim = read("optimizer.pt", lambda f: torch.load(f, map_location="cpu"))  # moved by torch
        restore("optimizer.pt", self.optimizer.load_state_dict, optim)
        extra = read("prompt_rng.pt", torch.load)
        restore("prompt_rng.pt", lambda e: self.prompt_rng.setstate(e["prompt_rng"]), extra)
        restore("prompt_rng.pt", lambda e: self.adapter.load_extra_state(e.get("adapter", {})), extra)
        rng = read(f"rng_{acc.process_index}.pt", torch.load)

        def set_rng(rng: dict[str, Any]) -> None:
            self.gen.set_state(rng["gen"])
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])

        restore(f"rng_{acc.process_index}.pt", set_rng, rng)
        self.step = int(state["step"])
        self.resumed_from = (ckpt, state)

    # ---- the loop -----------------------------------------------------------------------------------------
    def train(self) -> int:
        from tqdm.auto import tqdm

        cfg, acc = self.cfg, self.accelerator
        metrics = self.out / METRICS_LOG
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            self.store.clean_partial()  # leftovers of an interrupted save
            self.store.prune(cfg.checkpoints_keep)  # a save interrupted before it deleted the oldest
            shutil.rmtree(self.out / ".staging", ignore_errors=True)
            if self.resumed_from is not None:  # drop rows logged after the checkpoint
                ckpt, state = self.resumed_from
                for key, name in (("metrics", METRICS_LOG), ("eval", EVAL_LOG)):
                    check_log(self.out / name, state[key], ckpt, self.store.before(ckpt))
                    truncate_log(self.out / name, state[key])
            else:
                for name in (METRICS_LOG, EVAL_LOG):
                    atomic_write_text(self.out / name, "")
            atomic_write_text(self.out / "config.json", json.dumps(asdict(self.cfg), indent=2) + "\n")
        if cfg.report_to != "none":
            acc.init_trackers(
                "sd35_marble",
                config={
                    k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v)) for k, v in asdict(cfg).items()
                },
            )
        if self.step >= cfg.max_steps:
            acc.print(f"nothing to do: the run in {self.out} is at step {self.step} >= --max-steps {cfg.max_steps}")
            return 0
        if self.step == 0 and acc.is_main_process:  # the "before" of the evaluation
            self.save_samples() if self.adapter.sample_at_start else self.evaluate()
        bar = tqdm(
            total=cfg.max_steps,
            initial=self.step,
            desc=f"{cfg.combine}",
            unit="step",
            disable=not acc.is_local_main_process,
            dynamic_ncols=True,
        )
        while self.step < cfg.max_steps:
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            batch = self.rollout()
            t1 = time.perf_counter()
            rewards, adv, masks = self.score(batch)
            t2 = time.perf_counter()
            stats = self.train_step(batch, adv, masks)
            self.step += 1
            decay = self.update_old_policy()
            t3 = time.perf_counter()
            row: dict[str, Any] = {"step": self.step}
            for k, v in rewards.items():
                row[f"reward/{k}"] = nan_mean(v)
                row[f"reward_valid/{k}"] = float(torch.isfinite(v).float().mean())
            row.update(stats)
            row.update(
                {
                    "old_decay": decay,
                    "lr": self.optimizer.param_groups[0]["lr"],
                    "images_per_step": int(batch.x0.shape[0] * acc.num_processes),
                    "rollout_time": t1 - t0,
                    "reward_time": t2 - t1,
                    "train_time": t3 - t2,
                    "step_time": t3 - t0,
                }
            )
            if torch.cuda.is_available():
                row["max_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
            if acc.is_main_process:
                append_line(metrics, json.dumps({k: finite_or_none(v) for k, v in row.items()}, allow_nan=False))
            if cfg.report_to != "none":
                acc.log(
                    {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}, step=self.step
                )
            for callback in self.step_callbacks:
                callback(self, row, batch, adv, masks)
            if acc.is_main_process and (self.step % cfg.sample_every == 0 or self.step == cfg.max_steps):
                self.save_samples()
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.max_steps:
                self.save_checkpoint()
            bar.update(1)
            bar.set_postfix(
                {k.split("/")[1][:8]: f"{row[k]:.3g}" for k in row if k.startswith("reward/") and row[k] is not None}
            )
        bar.close()
        acc.wait_for_everyone()
        acc.end_training()
        return 0


def finished_same_run(cfg: Config) -> bool:
    """True when ``cfg.output_dir`` holds a run with this exact configuration at ``max_steps``."""
    out = Path(cfg.output_dir)
    newest = CheckpointStore(out).newest()
    try:
        saved = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return False
    if newest is None or not isinstance(saved, dict):
        return False
    step = newest[0]
    mine = asdict(cfg)
    same = all(saved.get(k) == v for k, v in mine.items() if k not in ("resume", "output_dir"))
    return same and step >= cfg.max_steps


def _command(script: str) -> str:
    """How to call one of the example's scripts from the current directory."""
    path = HERE / script
    try:
        path = path.relative_to(Path.cwd())
    except ValueError:
        pass
    return f"python {shlex.quote(str(path))}"


def _read_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                break  # a row torn by a crash (the next resume truncates it)
    return rows


def run_summary(cfg: Config) -> str:
    """What a run did: each reward on the evaluation batch before → after (and the adapter's
    extra metrics, e.g. the digits judge's accuracy), the files written, the next commands."""
    out = Path(cfg.output_dir)
    steps = _read_rows(out / METRICS_LOG)
    evals = _read_rows(out / EVAL_LOG)
    lines = [f"Summary: {cfg.preset} preset, --combine {cfg.combine}, {len(steps)} optimizer steps in {out}"]
    if len(evals) >= 1:
        first, last = evals[0], evals[-1]
        lines.append(
            f"Held-out evaluation ({first.get('samples')} samples from fixed noise), "
            f"step {first['step']} -> step {last['step']}:"
        )
        keys = [k for k in first if k not in ("step", "samples")]
        for key in keys:
            a, b = first.get(key), last.get(key)
            label = f"reward {key.split('/', 1)[1]}" if key.startswith("reward/") else key.replace("_", " ")
            if a is None or b is None:
                lines.append(f"  {label}: {a} -> {b}")
            else:
                lines.append(f"  {label}: {a:.6g} -> {b:.6g} ({b - a:+.6g})")
    else:
        lines.append("Held-out evaluation: none written")
    files = (
        [p.name for p in sorted(out.iterdir()) if p.is_file() and not p.name.startswith(".")] if out.is_dir() else []
    )
    parts = files[:]
    samples = out / "samples"
    if samples.is_dir():
        parts.append(f"samples/ ({sum(1 for p in samples.iterdir() if p.is_file())} files)")
    done = CheckpointStore(out).complete()
    if done:
        parts.append(f"checkpoints/{done[-1][1].name} (newest of {len(done)})")
    lines.append("Files: " + ", ".join(parts))
    q = shlex.quote(str(out))
    lines.append(f"Plot it:   {_command('plot.py')} {q} --out {shlex.quote(str(out / 'curves.png'))}")
    more = "" if cfg.combine == "sequential" else f" --max-steps {2 * cfg.max_steps}"  # sequential keeps its steps
    lines.append(f"Resume it: {_command('train.py')} --output-dir {q} --resume{more}")
    return "\n".join(lines)


def dry_run(cfg: Config) -> dict[str, Any]:
    """The run's summary without weights: the transformer on the meta device with the run's LoRA."""
    if cfg.preset != "sd35-medium":
        raise ConfigError(f"--dry-run summarises the sd35-medium preset, not {cfg.preset!r}")
    from sd35 import dry_run_summary

    out = dry_run_summary(
        targets=cfg.lora_targets,
        rank=cfg.lora_rank,
        alpha=cfg.lora_alpha,
        resolution=cfg.resolution,
        max_sequence_length=cfg.max_sequence_length,
        micro_batch=cfg.train_batch_size,
    )
    out.update(
        {
            "preset": cfg.preset,
            "random_init": cfg.random_init,
            "combine": cfg.combine,
            "gram": cfg.gram,
            "rewards": list(cfg.rewards),
            "prompt_files": list(cfg.prompt_files),
            "images_per_step": cfg.prompts_per_step * cfg.group_size,
        }
    )
    return out


def list_rewards() -> str:
    return "\n".join(f"{name:24s} {cls.description}" for name, cls in REWARDS.items())


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "list_rewards", False):
        print(list_rewards())
        return 0
    try:
        cfg = resolve_config(args)
        validate(cfg)
        if getattr(args, "dry_run", False):
            print(json.dumps(dry_run(cfg)))
            return 0
        if getattr(args, "print_config", False):
            print(json.dumps(asdict(cfg), indent=2))
            return 0
        if not cfg.resume and CheckpointStore(cfg.output_dir).newest() is not None:
            if finished_same_run(cfg):  # the same command again: nothing left to do
                print(f"nothing to do: the run in {cfg.output_dir} already reached --max-steps {cfg.max_steps}")
                print(run_summary(cfg))
                return 0
            raise ConfigError(
                f"{cfg.output_dir!r} already holds a run (checkpoints/): pass --resume to continue "
                "it, or choose another --output-dir"
            )
        if cfg.preset in ("tiny", "sd35-medium"):
            load_prompt_files(cfg.prompt_files)  # fail on bad prompt files before any model loads
        trainer = Trainer(cfg)  # rewards are built after the Accelerator, before the model
    except (ConfigError, RewardLoadError, ValueError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    try:
        status = trainer.train()
    except RunFileError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    if trainer.accelerator.is_main_process:
        print(run_summary(cfg), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
