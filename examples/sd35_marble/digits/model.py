"""A class-conditional rectified-flow model of scikit-learn's 8×8 digits.

Data convention
---------------
Images are ``sklearn.datasets.load_digits().images / 16``: float (8, 8) in [0, 1], 0 = background,
1 = full ink. The model works on ``x = 2·img − 1`` flattened to (B, 64), values in [-1, 1].

Flow (rectified flow / flow matching, Liu et al. 2022, https://arxiv.org/abs/2209.03003)::

    x_t = (1 − t)·x0 + t·ε,    v = dx_t/dt = ε − x0,    t ∈ [0, 1], t = 1 is pure noise.

The network predicts ``v`` from ``(x_t, t, label)``; :func:`sample` integrates the ODE from t = 1 to
t = 0 with Euler steps (deterministic, no guidance).

Architecture: a residual MLP (width 160, 3 blocks with hidden width 320) whose blocks are modulated
by FiLM (Perez et al. 2018, https://arxiv.org/abs/1709.07871) from a sinusoidal time embedding plus
a learned label embedding; ≈0.52 M parameters.
"""

from __future__ import annotations

import copy
import functools
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "DigitsFlow",
    "WEIGHTS_DIR",
    "digits_data",
    "load_pretrained",
    "pretrain",
    "sample",
    "save_weights",
    "to_images",
    "weights_path",
]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
NUM_CLASSES = 10
DIM = 64


def digits_data() -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images, labels)``: float32 (1797, 8, 8) in [0, 1] and int64 (1797,) (fresh copies)."""
    images, labels = _load_digits()
    return images.copy(), labels.copy()


@functools.lru_cache(maxsize=1)
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


def _time_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of t ∈ [0, 1]: (B,) → (B, dim) (frequencies 1 … 1000, scaled by 1000·t)."""
    half = dim // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class _Block(nn.Module):
    """Pre-norm residual MLP block with FiLM: ``h + W2·SiLU(W1·(LN(h)·(1 + γ) + β))``."""

    def __init__(self, width: int, hidden: int, cond: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.film = nn.Linear(cond, 2 * width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        gamma, beta = self.film(c).chunk(2, dim=1)
        z = self.norm(h) * (1.0 + gamma) + beta
        return h + self.fc2(nn.functional.silu(self.fc1(z)))


class DigitsFlow(nn.Module):
    """Velocity model ``v(x_t, t, label)`` for 8×8 digits.

    Args:
        width: residual stream width (160).
        blocks: number of residual FiLM blocks (3).
        hidden: hidden width inside a block (320).
        cond: conditioning width (time embedding + label embedding) (160).

    ``forward(x (B, 64), t (B,), labels (B,) long) -> v (B, 64)``.
    """

    def __init__(self, width: int = 160, blocks: int = 3, hidden: int = 320, cond: int = 160) -> None:
        super().__init__()
        self.cond_dim = cond
        self.label_embed = nn.Embedding(NUM_CLASSES, cond)
        self.time_mlp = nn.Sequential(nn.Linear(cond, cond), nn.SiLU(), nn.Linear(cond, cond))
        self.inp = nn.Linear(DIM, width)
        self.blocks = nn.ModuleList(_Block(width, hidden, cond) for _ in range(blocks))
        self.out_norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, DIM)

    def forward(self, x: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        if x.ndim != 2 or x.shape[1] != DIM:
            raise ValueError(f"x must have shape (B, {DIM}), got {tuple(x.shape)}")
        if t.shape != (x.shape[0],) or labels.shape != (x.shape[0],):
            raise ValueError(
                f"t and labels must have shape ({x.shape[0]},), got t {tuple(t.shape)}, labels {tuple(labels.shape)}"
            )
        c = self.time_mlp(_time_embedding(t, self.cond_dim)) + self.label_embed(labels)
        c = nn.functional.silu(c)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, c)
        return self.out(self.out_norm(h))


@torch.no_grad()
def sample(model: nn.Module, noise: Tensor, labels: Tensor, steps: int = 10) -> Tensor:
    """Integrate ``dx/dt = v`` from t = 1 (``noise``, (B, 64)) to t = 0 with ``steps`` Euler steps.

    Deterministic; no classifier-free guidance. Returns x0 (B, 64) in model space (≈[-1, 1]).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    x = noise.float()
    ts = torch.linspace(1.0, 0.0, steps + 1)
    for i in range(steps):
        t = torch.full((x.shape[0],), float(ts[i]), device=x.device)
        v = model(x, t, labels)
        x = x + (ts[i + 1] - ts[i]).item() * v
    return x


def to_images(x: Tensor) -> Tensor:
    """Model space (B, 64) → images (B, 8, 8) float32 in [0, 1] (``(x + 1)/2``, clamped)."""
    return ((x.detach().float() + 1.0) / 2.0).clamp(0.0, 1.0).reshape(-1, 8, 8)


def pretrain(
    seed: int,
    steps: int = 2500,
    batch_size: int = 256,
    lr: float = 1e-3,
    ema_decay: float = 0.999,
    weight_decay: float = 1e-4,
    log_every: int = 0,
) -> DigitsFlow:
    """Pretrain a :class:`DigitsFlow` on all 1,797 digits and return the EMA model (eval mode).

    Flow-matching loss ``‖v_θ(x_t, t, y) − (ε − x0)‖²`` with logit-normal t (t = σ(n), n ~ N(0, 1)),
    AdamW with a one-cycle schedule peaking at ``lr``, EMA of the weights. Runs on one CPU thread
    (``torch.set_num_threads(1)`` for the duration; restored after) and is bit-for-bit deterministic
    given ``seed``: every random draw comes from one ``torch.Generator``.
    """
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        images, labels = digits_data()
        data = torch.from_numpy(images).reshape(-1, DIM) * 2.0 - 1.0
        targets = torch.from_numpy(labels)
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)  # parameter initialisation
        model = DigitsFlow()
        ema = copy.deepcopy(model).requires_grad_(False)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
        start = time.perf_counter()
        for step in range(steps):
            idx = torch.randint(0, data.shape[0], (batch_size,), generator=gen)
            x0, y = data[idx], targets[idx]
            eps = torch.randn(x0.shape, generator=gen)
            t = torch.sigmoid(torch.randn(batch_size, generator=gen))
            xt = (1.0 - t[:, None]) * x0 + t[:, None] * eps
            loss = (model(xt, t, y) - (eps - x0)).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            decay = min(ema_decay, (1.0 + step) / (10.0 + step))
            with torch.no_grad():
                for pe, p in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(p, 1.0 - decay)
            if log_every and (step + 1) % log_every == 0:
                print(f"step {step + 1}/{steps} loss {loss.item():.4f} ({time.perf_counter() - start:.1f} s)")
        return ema.eval()
    finally:
        torch.set_num_threads(prev_threads)


def weights_path(seed: int) -> Path:
    """Path of the shipped weights for a pretraining seed."""
    return WEIGHTS_DIR / f"digits_flow_seed{seed}.safetensors"


def save_weights(model: DigitsFlow, path: str | Path) -> None:
    """Save a model's state dict as safetensors."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))


def load_pretrained(seed: int = 0) -> DigitsFlow:
    """Load the shipped pretrained model for ``seed`` (0 or 1): eval mode, parameters frozen.

    The weights were made with ``python -m digits.pretrain --seed SEED --out FILE`` (run from
    ``examples/sd35_marble``), which reproduces them bit for bit on one CPU thread.
    """
    from safetensors.torch import load_file

    path = weights_path(seed)
    if not path.is_file():
        shipped = sorted(p.name for p in WEIGHTS_DIR.glob("digits_flow_seed*.safetensors"))
        raise FileNotFoundError(
            f"no shipped weights for seed={seed!r} ({path}); shipped: {shipped}. "
            f"Make them with: python -m digits.pretrain --seed {seed} --out {path}"
        )
    model = DigitsFlow()
    model.load_state_dict(load_file(str(path)))
    return model.eval().requires_grad_(False)
