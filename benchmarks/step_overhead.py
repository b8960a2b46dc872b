"""Cost of one optimizer step with each Gram source, against plain AdamW and TorchJD.

A transformer-like model (a few ``nn.TransformerEncoderLayer`` blocks, the trunk, and K
linear heads, one MSE loss per head) is trained by each method on its own copy of the same
model, the methods interleaved round-robin in one run so that machine noise hits them alike.
One timed step is forward + backward + optimizer step. Reported, per K:

- ms per step (median over rounds) and the ratio to the plain AdamW step on ``Σ_k L_k``;
- ``refresh_every=4`` (exact solve every 4th step) is timed over whole cycles of 4 steps, so
  its figure is the amortized mean, not the (cheaper) median of the cached steps;
- "K backward passes": one forward and K ``backward(retain_graph=True)`` calls, the floor
  for ``gram="exact"`` (target: exact ≤ 1.1× this);
- TorchJD 0.18: ``mtl_backward(losses, features=trunk output)`` then
  ``jac_to_grad(trunk params, MGDA() | UPGrad())``;
- peak extra memory: on a fresh copy of the method (new model copy and optimizer), the
  largest amount of memory allocated during its first two steps (a whole cycle for
  ``refresh_every``) on top of what was allocated before them: activations, gradients,
  AdamW's state (the same 2×N floats for every method) and whatever the method keeps
  between steps (MARBLE's K×N gradient buffer), i.e. the steady-state peak of the second
  step. Parameters are not counted.
  CPU: reconstructed from the allocation events of ``torch.profiler`` (untimed); CUDA:
  ``torch.cuda.max_memory_allocated`` minus the allocation before the step.

Fidelity (``ema_decay=0``, one training trajectory driven by the exact update): at every
step, on the same batch and parameters, the cosine between each amortized update and the
exact MARBLE update, and the largest gap between their balancing weights α. For
``refresh_every=4`` the cached weights (solved up to 3 steps earlier) are compared with the
weights an exact solve would give on the current batch (cosine from the exact step's Gram).

Usage::

    python benchmarks/step_overhead.py --out step_overhead.md          # full run, ~3-5 min
    python benchmarks/step_overhead.py --quick                          # the test suite's run
    python benchmarks/step_overhead.py --device cuda --out gpu.md
    python benchmarks/step_overhead.py --cases mlp --out mlp.md         # the small-step MLPs only

Small steps (``--cases mlp``, also part of the default run): where the wrapper's fixed cost per
step shows most. A 6-layer GELU MLP (D=384, batch 128, K=5 linear heads): ``shared`` (trunk
output) and ``params`` (last layer) against a plain AdamW step on ``Σ_k L_k``; a 4-layer GELU
MLP (D=512, batch 64, K=4): ``exact`` and ``exact-lean`` against the K plain backward passes
they need. Beside each ratio: host syncs per step, the device-to-host round trips a step makes
(counted by ``HostSyncCounter`` on CPU: every read of a device-computed tensor's values into
Python; on CUDA: ``torch.cuda.set_sync_debug_mode`` warnings, which also count the wrapped
optimizer's own).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from marble_opt import MarbleOptimizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment_line, markdown_table, rotated, write_json, write_markdown  # noqa: E402

try:  # optional: the bench extra
    import torchjd
    from torchjd.aggregation import MGDA, UPGrad
    from torchjd.autojac import jac_to_grad, mtl_backward
except ImportError:  # pragma: no cover - reported in the table
    torchjd = None


PLAIN = "plain AdamW (Σ L_k)"
KPASS = "K backward passes"
PLAIN_FUSED = "plain AdamW, fused=True (Σ L_k)"
EXACT = "marble exact"


@dataclass(frozen=True)
class Config:
    d_model: int
    ff: int
    layers: int
    heads: int
    batch: int
    seq: int
    ks: tuple[int, ...]
    repeats: int
    warmup: int
    fidelity_steps: int
    refresh: int = 4


FULL = Config(
    d_model=128, ff=512, layers=4, heads=4, batch=16, seq=32, ks=(2, 5, 8), repeats=20, warmup=3, fidelity_steps=12
)
#: A model whose backward dominates more (8× the work of FULL per step): d=256, 64 tokens.
LARGE = Config(
    d_model=256, ff=1024, layers=4, heads=8, batch=16, seq=64, ks=(2, 5, 8), repeats=10, warmup=2, fidelity_steps=6
)
QUICK = Config(d_model=32, ff=64, layers=2, heads=2, batch=4, seq=8, ks=(2, 3), repeats=3, warmup=1, fidelity_steps=4)


class Model(nn.Module):
    """Transformer trunk and K linear heads; ``forward`` returns (trunk output, K losses)."""

    def __init__(self, cfg: Config, k: int) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(cfg.d_model, cfg.heads, cfg.ff, dropout=0.0, batch_first=True)
        self.trunk = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.heads = nn.ModuleList(nn.Linear(cfg.d_model, 1) for _ in range(k))
        with torch.no_grad():  # heads read nearly the same feature direction: the tasks conflict
            for h in self.heads[1:]:
                h.weight.mul_(0.3).add_(self.heads[0].weight)

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        z = self.trunk(x)
        losses = {f"task{k}": ((h(z).squeeze(-1) - y[k]) ** 2).mean() for k, h in enumerate(self.heads)}
        return z, losses


def make_batches(cfg: Config, k: int, n: int, device: torch.device, seed: int) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(cfg.batch, cfg.seq, cfg.d_model, generator=gen)
        # targets on different scales and partly opposed, so the objectives conflict
        base = torch.randn(cfg.batch, cfg.seq, generator=gen)
        y = torch.stack(
            [(1.0 + j) * ((-1) ** j) * base + torch.randn(cfg.batch, cfg.seq, generator=gen) for j in range(k)]
        )
        out.append((x.to(device), y.to(device)))
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- methods: each gets its own model copy and optimizer; step(batch) does one full step ----
Step = Callable[[tuple[Tensor, Tensor]], None]


def adamw(params, fused: bool = False) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4, fused=fused or None)


def plain(model: Model, fused: bool = False) -> Step:
    opt = adamw(model.parameters(), fused)

    def step(batch):
        _, losses = model(*batch)
        opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        opt.step()

    step.optimizer = opt  # type: ignore[attr-defined]
    return step


def k_backward(model: Model) -> Step:
    opt = adamw(model.parameters())

    def step(batch):
        _, losses = model(*batch)
        opt.zero_grad(set_to_none=True)
        values = list(losses.values())
        for i, loss in enumerate(values):
            loss.backward(retain_graph=i < len(values) - 1)
        opt.step()

    step.optimizer = opt  # type: ignore[attr-defined]
    return step


def gram_params(model: Model, subset: str) -> list[nn.Parameter]:
    last = model.trunk.layers[-1]
    if subset == "block":  # the whole last encoder block
        return list(last.parameters())
    if subset == "norm":  # the trainable layer nearest the heads: the last LayerNorm's affine map
        return list(last.norm2.parameters())
    # the last block's FFN output projection and the norm after it
    return [*last.linear2.parameters(), *last.norm2.parameters()]


def marble(gram: str, refresh_every: int = 1, subset: str = "block") -> Callable[[Model], Step]:
    def build(model: Model) -> Step:
        kwargs = {}
        if gram == "params":
            kwargs["gram_params"] = gram_params(model, subset)
        opt = MarbleOptimizer(adamw(model.parameters()), gram=gram, refresh_every=refresh_every, **kwargs)

        def step(batch):
            z, losses = model(*batch)
            opt.zero_grad(set_to_none=True)
            if gram == "shared":
                opt.step(losses, shared=z)
            else:
                opt.step(losses)

        return step

    return build


def torchjd_path(aggregator_cls) -> Callable[[Model], Step]:
    def build(model: Model) -> Step:
        opt = adamw(model.parameters())
        aggregator = aggregator_cls()
        shared_params = list(model.trunk.parameters())

        def step(batch):
            z, losses = model(*batch)
            opt.zero_grad(set_to_none=True)
            mtl_backward(list(losses.values()), features=z)
            jac_to_grad(shared_params, aggregator)
            opt.step()

        return step

    return build


def methods(refresh: int) -> list[tuple[str, Callable[[Model], Step], int]]:
    """(label, builder, steps per timed unit)."""
    out = [
        (PLAIN, plain, 1),
        (KPASS, k_backward, 1),
        (EXACT, marble("exact"), 1),
        ("marble exact-lean", marble("exact-lean"), 1),
        ("marble shared", marble("shared"), 1),
        ("marble params (last block)", marble("params"), 1),
        ("marble params (last linear + norm)", marble("params", subset="linear"), 1),
        ("marble params (last norm)", marble("params", subset="norm"), 1),
        (f"marble exact, refresh_every={refresh}", marble("exact", refresh), refresh),
    ]
    if torchjd is not None:
        out += [
            ("TorchJD mtl_backward + MGDA", torchjd_path(MGDA), 1),
            ("TorchJD mtl_backward + UPGrad", torchjd_path(UPGrad), 1),
        ]
    return out


# ---- memory ---------------------------------------------------------------------------
def peak_extra_bytes(step: Step, batch, device: torch.device, unit: int = 1) -> int:
    """Peak bytes allocated during ``unit`` steps beyond what was allocated at their start."""
    if device.type == "cuda":
        sync(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(unit):
            step(batch)
        sync(device)
        return int(torch.cuda.max_memory_allocated(device) - start)
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(unit):
            step(batch)
    events: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    events.sort()
    current = peak = 0
    for _, size in events:
        current += size
        peak = max(peak, current)
    return peak


# ---- timing ---------------------------------------------------------------------------
def time_methods(
    cfg: Config, k: int, device: torch.device, seed: int, only: list[str] | None = None, clock=time.perf_counter
) -> list[dict]:
    torch.manual_seed(seed)
    base = Model(cfg, k).to(device)
    specs = [m for m in methods(cfg.refresh) if m[0] == PLAIN or not only or any(o in m[0] for o in only)]
    steps = []
    for _label, build, _unit in specs:
        model = copy.deepcopy(base)
        steps.append(build(model))
    batches = make_batches(cfg, k, 8, device, seed + 1)
    times: list[list[list[float]]] = [[] for _ in specs]  # method, round, step of the unit
    counter = 0
    for r in range(cfg.warmup + cfg.repeats):
        order = list(range(len(specs)))
        if r % 2:  # alternate the order to cancel drift within a round
            order.reverse()
        for i in order:
            unit_times = []
            for _ in range(specs[i][2]):
                sync(device)
                t0 = clock()
                steps[i](batches[counter % len(batches)])
                sync(device)
                unit_times.append(clock() - t0)
                counter += 1
            if r >= cfg.warmup:
                times[i].append(unit_times)
    rows = []
    for (label, build, unit), ts in zip(specs, times):
        # a fresh instance, so that buffers a method keeps between steps are counted too
        mem = peak_extra_bytes(build(copy.deepcopy(base)), batches[0], device, max(unit, 2))
        if unit == 1:
            rows.append({"method": label, "ms": 1e3 * statistics.median(t[0] for t in ts), "mem": mem})
        else:  # a refresh cycle: the solve step, then unit-1 cached steps
            rows.append(
                {
                    "method": f"{label}: mean over the cycle",
                    "ms": 1e3 * statistics.median(sum(t) / unit for t in ts),
                    "mem": mem,
                }
            )
            rows.append(
                {
                    "method": f"{label}: cached step",
                    "ms": 1e3 * statistics.median(x for t in ts for x in t[1:]),
                    "mem": mem,
                }
            )
    return rows


# ---- fidelity -------------------------------------------------------------------------
def flat_grad(model: nn.Module) -> Tensor:
    return torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).double() for p in model.parameters()]
    )


FIDELITY_SOURCES = [
    ("shared (trunk output)", "shared", None),
    ("params (last block)", "params", "block"),
    ("params (last linear + norm)", "params", "linear"),
    ("params (last norm)", "params", "norm"),
]


def fidelity(cfg: Config, k: int, device: torch.device, seed: int) -> list[dict]:
    """Per source: cosine with the exact update (median, min over steps), max |α − α_exact|,
    and the worst cosine of the update with any objective's own gradient (min over steps)."""
    torch.manual_seed(seed)
    model = Model(cfg, k).to(device)
    params = list(model.parameters())
    exact = MarbleOptimizer(adamw(params), ema_decay=0.0, gram="exact")
    batches = make_batches(cfg, k, cfg.fidelity_steps, device, seed + 2)
    stats: dict[str, dict[str, list[float]]] = {}

    def cosine(a: Tensor, b: Tensor) -> float:
        return float(torch.dot(a, b) / (a.norm() * b.norm()))

    cached_w = cached_alpha = None
    for t, batch in enumerate(batches):
        updates: dict[str, tuple[Tensor, np.ndarray]] = {}
        for label, gram, subset in FIDELITY_SOURCES:
            kw = {"gram_params": gram_params(model, subset)} if gram == "params" else {}
            opt = MarbleOptimizer(torch.optim.SGD(params, lr=0.0), ema_decay=0.0, gram=gram, **kw)
            z, losses = model(*batch)
            opt.zero_grad()
            rep = opt.backward(losses, shared=z) if gram == "shared" else opt.backward(losses)
            updates[label] = (flat_grad(model), np.array(list(rep.raw_weights.values())))
        _, losses = model(*batch)
        jac = torch.stack(
            [  # the objectives' own gradients, K×N
                torch.cat(
                    [
                        (g if g is not None else torch.zeros_like(p)).reshape(-1).double()
                        for g, p in zip(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True), params)
                    ]
                )
                for loss in losses.values()
            ]
        )
        exact.zero_grad()
        rep = exact.backward(losses)
        d = flat_grad(model)
        alpha = np.array(list(rep.raw_weights.values()))
        w_now = np.array(list(rep.loss_weights.values()))
        norms = np.sqrt(np.diag(rep.gram))
        # the unbalanced baseline for scale: Σ_k ∇L_k, whose implied α_k ∝ ‖g_k‖ under l2 scaling
        updates["(baseline) plain sum Σ L_k"] = (jac.sum(0), norms / norms.sum())
        if t % cfg.refresh == 0:
            cached_w, cached_alpha = w_now, alpha
        else:  # the weights solved up to refresh-1 steps ago, applied to this batch's gradients
            updates[f"refresh_every={cfg.refresh}"] = (torch.as_tensor(cached_w) @ jac, cached_alpha)
        updates["exact (reference)"] = (d, alpha)
        for label, (u, a) in updates.items():
            entry = stats.setdefault(label, {"cos": [], "gap": [], "worst": []})
            entry["cos"].append(cosine(u, d))
            entry["gap"].append(float(np.abs(a - alpha).max()))
            entry["worst"].append(min(cosine(u, row) for row in jac))
        exact.step()
    return [
        {
            "source": name,
            "cos_median": statistics.median(v["cos"]),
            "cos_min": min(v["cos"]),
            "gap_max": max(v["gap"]),
            "worst": min(v["worst"]),
        }
        for name, v in stats.items()
    ]


# ---- report ---------------------------------------------------------------------------
def _ratio(by: dict[str, float], num: str, den: str) -> str:
    return f"{by[num] / by[den]:.3f}" if num in by and den in by else "n/a"


def markdown(
    cfg: Config,
    device: torch.device,
    timing: dict[int, list[dict]],
    fid: dict[int, list[dict]],
    command: str,
    elapsed: float,
    clock: str = "wall",
) -> str:
    n_params = sum(p.numel() for p in Model(cfg, 1).trunk.parameters())
    ks = list(timing)
    methods_order = [row["method"] for row in timing[ks[0]]]
    by_k = {k: {row["method"]: row for row in rows} for k, rows in timing.items()}
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [
        "### Step overhead",
        "",
        f"`{command}` on {where}: {environment_line()}. Trunk: {cfg.layers} encoder layers, d={cfg.d_model}, "
        f"ff={cfg.ff} ({n_params / 1e6:.2f} M parameters) and K linear heads, batch {cfg.batch}×{cfg.seq} tokens; "
        f"one step = forward + backward + AdamW step, timed by "
        + (
            "the CPU time of the torch thread (robust to other processes on a shared machine)"
            if clock == "cpu"
            else "wall-clock time"
        )
        + f"; median of {cfg.repeats} interleaved rounds; "
        f"the run took {elapsed:.0f} s.",
        "",
        "Time per step as a multiple of the plain AdamW step on the summed loss (ms per step in brackets):",
        "",
        markdown_table(
            ["method"] + [f"K={k}" for k in ks],
            [
                [m] + [f"{by_k[k][m]['ms'] / by_k[k][PLAIN]['ms']:.3f}× ({by_k[k][m]['ms']:.1f} ms)" for k in ks]
                for m in methods_order
            ],
        ),
        "",
        "Targets: `exact` ≤ 1.1× K backward passes; `shared`, `params` and the cached refresh step ≤ 1.05× "
        "the plain step; `exact` faster than TorchJD:",
        "",
        markdown_table(
            ["ratio"] + [f"K={k}" for k in ks],
            [
                [label] + [_ratio({m: r["ms"] for m, r in by_k[k].items()}, num, den) for k in ks]
                for label, num, den in [
                    ("exact ÷ K backward passes", EXACT, KPASS),
                    ("exact-lean ÷ K backward passes", "marble exact-lean", KPASS),
                    ("shared ÷ plain", "marble shared", PLAIN),
                    ("params (last block) ÷ plain", "marble params (last block)", PLAIN),
                    ("params (last linear + norm) ÷ plain", "marble params (last linear + norm)", PLAIN),
                    ("params (last norm) ÷ plain", "marble params (last norm)", PLAIN),
                    (
                        f"refresh_every={cfg.refresh}, cached step ÷ plain",
                        f"marble exact, refresh_every={cfg.refresh}: cached step",
                        PLAIN,
                    ),
                    (
                        f"refresh_every={cfg.refresh}, cycle mean ÷ plain",
                        f"marble exact, refresh_every={cfg.refresh}: mean over the cycle",
                        PLAIN,
                    ),
                    ("exact ÷ TorchJD MGDA", EXACT, "TorchJD mtl_backward + MGDA"),
                    ("exact ÷ TorchJD UPGrad", EXACT, "TorchJD mtl_backward + UPGrad"),
                ]
            ],
        ),
        "",
        "Peak memory (MB) over a fresh instance's first two steps (a whole cycle for refresh) above what was "
        "allocated before them: activations, gradients, AdamW state and the method's own buffers; parameters "
        "not counted:",
        "",
        markdown_table(
            ["method"] + [f"K={k}" for k in ks],
            [[m] + [f"{by_k[k][m]['mem'] / 2**20:.1f}" for k in ks] for m in methods_order],
        ),
    ]
    if fid:
        lines += [
            "",
            f"Fidelity to the exact MARBLE update (ema_decay=0, {cfg.fidelity_steps} steps of one trajectory driven "
            "by the exact update). Each cell: cosine with the exact update (median, min over steps); "
            "max |α − α_exact|; worst cosine of the update with any objective's own gradient (min over steps; "
            "MARBLE's guarantee is that this is ≥ 0 for the exact update):",
            "",
            markdown_table(
                ["source"] + [f"K={k}" for k in ks],
                [
                    [src]
                    + [
                        next(
                            (
                                f"{r['cos_median']:.3f}, {r['cos_min']:.3f}; {r['gap_max']:.3f}; {r['worst']:+.3f}"
                                for r in fid[k]
                                if r["source"] == src
                            ),
                            "n/a",
                        )
                        for k in ks
                    ]
                    for src in [r["source"] for r in fid[ks[0]]]
                ],
            ),
        ]
    return "\n".join(lines) + "\n"


# ---- small steps: MLPs whose step is a few ms, where the fixed cost per step shows ---------
@dataclass(frozen=True)
class MlpCase:
    """A GELU MLP trunk (``layers`` × Linear(d, d) + GELU) with K linear heads, MSE per head."""

    label: str
    d: int
    layers: int
    batch: int
    k: int
    baseline: str  # "plain" (AdamW on Σ L_k) or "kpass" (K backward passes + AdamW)
    sources: tuple[str, ...]


MLP_CASES = (
    MlpCase("6-layer MLP, D=384, batch 128, K=5", 384, 6, 128, 5, "plain", ("shared", "params")),
    MlpCase("4-layer MLP, D=512, batch 64, K=4", 512, 4, 64, 4, "kpass", ("exact", "exact-lean")),
    MlpCase(
        "6-layer MLP, D=384, batch 128, K=5, fused AdamW",
        384,
        6,
        128,
        5,
        "plain-fused",
        ("shared/fused", "shared/fused/skip_on_device"),
    ),
)
MLP_QUICK = (
    MlpCase("6-layer MLP, D=32, batch 8, K=3", 32, 6, 8, 3, "plain", ("shared", "params")),
    MlpCase("4-layer MLP, D=32, batch 8, K=2", 32, 4, 8, 2, "kpass", ("exact", "exact-lean")),
    MlpCase(
        "6-layer MLP, D=32, batch 8, K=3, fused AdamW",
        32,
        6,
        8,
        3,
        "plain-fused",
        ("shared/fused", "shared/fused/skip_on_device"),
    ),
)


class Mlp(nn.Module):
    def __init__(self, case: MlpCase) -> None:
        super().__init__()
        self.trunk = nn.Sequential(*(m for _ in range(case.layers) for m in (nn.Linear(case.d, case.d), nn.GELU())))
        self.heads = nn.ModuleList(nn.Linear(case.d, 1) for _ in range(case.k))

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        z = self.trunk(x)
        return z, {f"task{k}": ((h(z).squeeze(-1) - y[k]) ** 2).mean() for k, h in enumerate(self.heads)}


def mlp_batches(case: MlpCase, device: torch.device, seed: int, n: int = 4) -> list[tuple[Tensor, Tensor]]:
    """``n`` batches (x (B, D), targets (K, B) on scales 1…K, alternately opposed: the objectives conflict)."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        x = torch.randn(case.batch, case.d, generator=gen)
        yb = torch.randn(case.batch, generator=gen)
        y = torch.stack([(1.0 + j) * ((-1) ** j) * yb + torch.randn(case.batch, generator=gen) for j in range(case.k)])
        batches.append((x.to(device), y.to(device)))
    return batches


def mlp_step(case: MlpCase, method: str, model: Mlp) -> Step:
    """One full step of ``method`` on ``model``: "plain", "plain-fused" (AdamW with
    ``fused=True``), "kpass", or a Gram source, optionally with "/fused" (a fused AdamW) and
    "/skip_on_device" (``MarbleOptimizer(skip_on_device=True)``)."""
    if method in ("plain", "plain-fused", "kpass"):
        if method == "kpass":
            return k_backward(model)  # type: ignore[arg-type]
        return plain(model, fused=method == "plain-fused")  # type: ignore[arg-type]
    method, *flags = method.split("/")
    kwargs = {"gram_params": list(model.trunk[-2].parameters())} if method == "params" else {}
    base = adamw(model.parameters(), fused="fused" in flags)
    opt = MarbleOptimizer(base, gram=method, skip_on_device="skip_on_device" in flags, **kwargs)

    def step(batch):
        z, losses = model(*batch)
        opt.zero_grad(set_to_none=True)
        opt.step(losses, shared=z if method == "shared" else None)

    step.optimizer = opt  # type: ignore[attr-defined]
    return step


class HostSyncCounter(torch.overrides.TorchFunctionMode):
    """Counts device-to-host round trips: reads of a device-computed tensor's values into Python.

    A read is ``item``, ``tolist``, ``numpy``, ``bool``/``float``/``int``, ``np.asarray`` or a
    copy to the host (``cpu()``, ``to("cpu")``) of a tensor that is not already host data.
    Host data are tensors made from numpy or Python values (``torch.from_numpy``,
    ``torch.as_tensor``, ``torch.tensor``), the results of a counted copy to the host, and
    whatever is computed from host data alone; everything else (the model's outputs,
    parameters, gradients) counts as device data, so the count on CPU is the count a CUDA run
    would make. A copy to the host returns a new tensor even on CPU (``cpu()`` of a CPU tensor
    is itself), so that reading the copy is not counted twice.

    Tensors that live on the host by design although made before the count starts (the
    smoothed weights, a torch optimizer's ``step`` counters, which stay on the CPU unless
    ``capturable``/``fused``) are passed as ``host`` (see ``host_state``).

    ``t.to(d)`` with a ``torch.device`` equal to ``t``'s own is a no-op on every device and
    not counted (a fused optimizer moves ``found_inf`` so); ``.cpu()`` and ``.to("cpu")``
    are counted.

    Use: ``with HostSyncCounter(host_state(opt)) as c: step(batch)``, then ``c.count`` (and
    ``c.where``, the functions that read).
    """

    _READS = frozenset({"item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "__array__"})

    def __init__(self, host: Iterable[Tensor] = ()) -> None:
        super().__init__()
        self.count = 0
        self.where: list[str] = []
        self._host: dict[int, object] = {}  # id -> weakref of host tensors
        for t in host:
            self._mark(t)

    def _is_host(self, t: Tensor) -> bool:
        ref = self._host.get(id(t))
        return ref is not None and ref() is t  # type: ignore[operator]

    def _mark(self, out: object) -> None:
        import weakref

        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, Tensor):
                self._host[id(t)] = weakref.ref(t)

    def __enter__(self):
        self._from_numpy = torch.from_numpy

        def from_numpy(array):
            out = self._from_numpy(array)
            self._mark(out)
            return out

        torch.from_numpy = from_numpy
        return super().__enter__()

    def __exit__(self, *exc):
        torch.from_numpy = self._from_numpy
        return super().__exit__(*exc)

    @staticmethod
    def _to_host(func_name: str, args: tuple, kwargs: dict) -> bool:
        if func_name == "cpu":
            return True
        if func_name != "to":
            return False
        for a in (*args[1:], kwargs.get("device")):
            if isinstance(a, (str, torch.device)) and torch.device(a).type == "cpu":
                return True
        return False

    @staticmethod
    def _onto_itself(args: tuple, kwargs: dict, out: object) -> bool:
        """``t.to(d)`` with ``d`` a ``torch.device`` equal to ``t``'s own, returning ``t``: a
        no-op on any device (the fused optimizers move ``found_inf`` to each parameter's
        device so), not a read; ``.cpu()`` and ``.to("cpu")`` with a string still count."""
        dest = next((a for a in (*args[1:], kwargs.get("device")) if isinstance(a, torch.device)), None)
        return dest is not None and isinstance(args[0], Tensor) and out is args[0] and dest == args[0].device

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
        for a in (*args, *kwargs.values()):  # torch.stack([...]) and friends
            if isinstance(a, (list, tuple)):
                tensors += [t for t in a if isinstance(t, Tensor)]
        out = func(*args, **kwargs)
        device_input = any(not self._is_host(t) for t in tensors)
        if name in self._READS and tensors and device_input:
            self.count += 1
            self.where.append(name)
        elif self._to_host(name, args, kwargs) and device_input and not self._onto_itself(args, kwargs, out):
            self.count += 1
            self.where.append(name)
            if out is args[0]:  # cpu() of a CPU tensor: a distinct host copy, as on a GPU
                out = out.clone()
            self._mark(out)
        elif name in ("as_tensor", "tensor") and not (tensors and device_input):
            self._mark(out)
        elif tensors and not device_input:
            self._mark(out)
        return out


def host_state(opt: torch.optim.Optimizer) -> list[Tensor]:
    """Tensors an optimizer keeps on the host by design: a torch optimizer's ``step`` counters
    (unless ``capturable``/``fused``) and, for a ``MarbleOptimizer``, the bookkeeping tensors
    among its attributes and theirs (the smoothed weights; not the Gram source's buffers), besides those of the optimizer it wraps."""
    out: list[Tensor] = []
    inner = getattr(opt, "optimizer", None)
    if isinstance(inner, torch.optim.Optimizer):
        out += host_state(inner)
        params = {id(p) for g in opt.param_groups for p in g["params"]}
        for value in vars(opt).values():
            if value is getattr(opt, "source", None):  # its buffers hold device data
                continue
            for v in (value, *getattr(value, "__dict__", {}).values()):
                if isinstance(v, Tensor) and id(v) not in params:
                    out.append(v)
        return out
    for group in opt.param_groups:
        if group.get("capturable") or group.get("fused"):
            continue
        for p in group["params"]:
            step = opt.state.get(p, {}).get("step")
            if isinstance(step, Tensor):
                out.append(step)
    return out


def count_host_syncs(step: Step, batch, device: torch.device) -> int:
    """Host round trips of one call of ``step(batch)`` (see ``HostSyncCounter``; on CUDA the
    synchronising calls ``torch.cuda.set_sync_debug_mode`` warns about)."""
    if device.type == "cuda":
        sync(device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step(batch)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)
    with HostSyncCounter(host_state(step.optimizer)) as counter:  # type: ignore[attr-defined]
        step(batch)
    return counter.count


def time_mlp_case(
    case: MlpCase, device: torch.device, repeats: int, warmup: int, seed: int, clock=time.perf_counter
) -> list[dict]:
    """Interleaved timing of the case's baseline and sources; rows with ms, ratio and syncs."""
    torch.manual_seed(seed)
    base = Mlp(case).to(device)
    labels = [case.baseline, *case.sources]
    steps = [mlp_step(case, m, copy.deepcopy(base)) for m in labels]
    batches = mlp_batches(case, device, seed + 1)
    times: list[list[float]] = [[] for _ in labels]
    counter = 0
    for r in range(warmup + repeats):
        order = rotated(list(range(len(labels))), r)
        if r % 2:
            order.reverse()
        for i in order:
            sync(device)
            t0 = clock()
            steps[i](batches[counter % len(batches)])
            sync(device)
            if r >= warmup:
                times[i].append(clock() - t0)
            counter += 1
    med = [statistics.median(t) for t in times]
    syncs = [count_host_syncs(s, batches[0], device) for s in steps]
    names = {"plain": PLAIN, "plain-fused": PLAIN_FUSED, "kpass": KPASS}
    return [
        {"method": names.get(m, "marble " + m.replace("/", ", ")), "ms": 1e3 * t, "ratio": t / med[0], "syncs": n}
        for m, t, n in zip(labels, med, syncs)
    ]


def mlp_markdown(rows: dict[str, list[dict]], repeats: int, clock: str) -> str:
    lines = [
        "### Small steps (MLPs)",
        "",
        f"One step = forward + backward + AdamW step; median of {repeats} interleaved rounds, timed by "
        + ("the CPU time of the torch thread" if clock == "cpu" else "wall-clock time")
        + ". Ratio to the case's baseline (first row); host syncs: device-to-host round trips per step.",
        "",
    ]
    for label, case_rows in rows.items():
        lines += [
            f"{label}:",
            "",
            markdown_table(
                ["method", "ms per step", "ratio", "host syncs per step"],
                [[r["method"], f"{r['ms']:.2f}", f"{r['ratio']:.3f}×", str(r["syncs"])] for r in case_rows],
            ),
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, K=2,3, few repeats (the test suite's run)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--size", default="small", choices=["small", "large"], help="small: d=128, 32 tokens; large: d=256, 64 tokens"
    )
    parser.add_argument("--ks", type=int, nargs="+", help="numbers of objectives (default 2 5 8; quick: 2 3)")
    parser.add_argument("--repeats", type=int, help="timed rounds per K")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the Markdown table to this file")
    parser.add_argument("--json", help="write the raw (unrounded) timings, memory, fidelity and host syncs here")
    parser.add_argument("--methods", nargs="+", help="time only the methods whose label contains one of these")
    parser.add_argument("--no-fidelity", action="store_true", help="skip the fidelity table")
    parser.add_argument(
        "--cases",
        nargs="+",
        default=["transformer", "mlp"],
        choices=["transformer", "mlp"],
        help="transformer: the K sweep on the transformer; mlp: the small-step MLP cases (default both)",
    )
    parser.add_argument("--mlp-repeats", type=int, help="timed rounds of the MLP cases (default 30; quick: 3)")
    parser.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        help="cpu: CPU time of the (single) torch thread, robust to other processes on a shared machine "
        "(default on --device cpu); wall: elapsed time (default, and the only choice, on cuda)",
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    # torchjd differentiates through vmap, which falls back to a loop for CPU attention
    warnings.filterwarnings("ignore", message="There is a performance drop")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    device = torch.device(args.device)
    cfg = QUICK if args.quick else (LARGE if args.size == "large" else FULL)
    if args.ks:
        cfg = Config(**{**cfg.__dict__, "ks": tuple(args.ks)})
    if args.repeats:
        cfg = Config(**{**cfg.__dict__, "repeats": args.repeats})
    command = "python benchmarks/step_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:])
    start = time.perf_counter()
    clock_name = args.clock or ("cpu" if device.type == "cpu" else "wall")
    if clock_name == "cpu" and (device.type != "cpu" or args.threads != 1):
        parser.error("--clock cpu measures one thread's CPU time: use it with --device cpu --threads 1")
    clock = time.thread_time if clock_name == "cpu" else time.perf_counter
    text = ""
    raw: dict = {}
    if "transformer" in args.cases:
        timing = {k: time_methods(cfg, k, device, args.seed + k, args.methods, clock) for k in cfg.ks}
        fid = {} if args.no_fidelity else {k: fidelity(cfg, k, device, args.seed + 100 + k) for k in cfg.ks}
        text = markdown(cfg, device, timing, fid, command.strip(), time.perf_counter() - start, clock_name)
        raw.update(timing=timing, fidelity=fid)
    if "mlp" in args.cases:
        repeats = args.mlp_repeats or (3 if args.quick else 30)
        cases = MLP_QUICK if args.quick else MLP_CASES
        rows = {c.label: time_mlp_case(c, device, repeats, 1 if args.quick else 3, args.seed, clock) for c in cases}
        text += ("\n" if text else "") + mlp_markdown(rows, repeats, clock_name)
        raw["mlp"] = rows
    write_markdown(args.out, text)
    write_json(args.json, raw)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
