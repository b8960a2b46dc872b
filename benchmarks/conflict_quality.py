"""Where a weighted sum fails: trajectories on the CAGrad/Nash-MTL toy and the specialist
multi-task regression of ``marble_opt.demo``, against TorchJD's MGDA and UPGrad.

(a) The two-objective toy problem of CAGrad (Liu et al., 2021) and Nash-MTL (Navon et al.,
2022): x ∈ R², f1 and f2 built from log|·|-of-tanh terms above the x1 axis and quadratics
below it, Pareto set near the segment x1 ∈ [−7, 7], x2 ≈ −8.36. From the five initial points
of the Nash-MTL paper, Adam on: the mean of the two losses (weighted sum); TorchJD's
``MGDAWeighting`` and ``UPGradWeighting`` applied to the 2×2 Gram of the two gradients
(the update ``Σ w_k ∇f_k``, which is what their aggregators compute); ``MarbleOptimizer``
with ρ = 0.7 and ρ = 0, and with ρ = 0.7 but ``rescale=False`` (the update is the unit-gradient
combination itself instead of being scaled to the mean gradient norm). Reported per method: where each run ends and its Pareto gap (how
much both objectives could still improve together: the largest t such that a point of the
numerically computed Pareto front beats the end point by t in f1 and in f2; 0 on the
front). ``--plot`` draws the trajectories over the contours of the mean loss.

(b) ``marble_opt.demo``'s specialist regression (5 objectives on scales 100…1, one objective
labelled per sample) over several seeds, AdamW throughout (the TorchJD weightings and an
exact MGDA, i.e. the min-norm point of the *raw* gradients solved by ``min_norm_weights``,
get the Gram of the per-objective gradients over all parameters and write ``Σ w_k ∇L_k``): each objective's final held-out
loss (mean ± std over seeds), the fraction of steps where the worst cosine between the update
and an objective's gradient is negative (the MARBLE paper: 80% of mini-batches under a
weighted sum, never under MARBLE), the worst cosine seen and the across-objective variance of
the cosines (paper: 0.161 weighted sum, 0.006 MARBLE).

(c) Every weighting × Gram estimator inside ``MarbleOptimizer`` on the same regression,
at its label noise and at a noisier one: final held-out MSE relative to the plain mean
(``weighting="mean"``, batch estimator) per objective (geometric mean over seeds of the
paired ratio, and in how many seeds it is below 1), and the update's cosine with each
objective's gradient on an *independent* batch (agreement on the solved batch holds by
construction): its mean, and the fraction of steps where the worst one is negative.

Run: ``python benchmarks/conflict_quality.py [--quick] [--out FILE] [--plot PNG]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment_line, markdown_table, setup_torch, write_json, write_markdown  # noqa: E402

from marble_opt import MarbleOptimizer, min_norm_weights  # noqa: E402
from marble_opt.demo import _flat_grads, build_problem, train  # noqa: E402

# ---- (a) the toy problem -----------------------------------------------------------------
LOWER = 5e-6
INITS = ((-8.5, 7.5), (0.0, 0.0), (9.0, 9.0), (-7.5, -0.5), (9.0, -1.0))  # Nash-MTL's five
PARETO_X2 = -8.3552  # where the CAGrad paper draws the two minimisers (±7, x2)
PARETO_TOL = 0.1  # Pareto gap (in units of f) counted as "reached the front"


def toy_losses(x: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(f1, f2) at x = (x1, x2); ``scale`` multiplies f1 (Nash-MTL's imbalanced variant)."""
    x1, x2 = x[..., 0], x[..., 1]
    f1 = torch.clamp((0.5 * (-x1 - 7) - torch.tanh(-x2)).abs(), LOWER).log() + 6
    f2 = torch.clamp((0.5 * (-x1 + 3) + torch.tanh(-x2) + 2).abs(), LOWER).log() + 6
    c1 = torch.clamp(torch.tanh(x2 * 0.5), 0)
    f1_sq = ((-x1 + 7).pow(2) + 0.1 * (-x2 - 8).pow(2)) / 10 - 20
    f2_sq = ((-x1 - 7).pow(2) + 0.1 * (-x2 - 8).pow(2)) / 10 - 20
    c2 = torch.clamp(torch.tanh(-x2 * 0.5), 0)
    return scale * (f1 * c1 + f1_sq * c2), f2 * c1 + f2_sq * c2


def pareto_front(scale: float = 1.0, n: int = 701) -> np.ndarray:
    """(n, 2) values (f1, f2) of the Pareto front, computed numerically: for λ ∈ [0, 1] the
    minimiser of λ·f1 + (1−λ)·f2 lies at x1 = 14λ − 7 (below the x1 axis both objectives are
    the same quadratic-times-tanh in x2, shifted in x1) and a grid search over x2 ∈ [−10, −6].
    (With ``scale`` ≠ 1 the weighting differs but the same (x1, x2) curve is swept.)"""
    x1 = np.linspace(-7.0, 7.0, n)
    x2 = np.linspace(-10.0, -6.0, 4001)
    grid = torch.tensor(np.stack(np.broadcast_arrays(x1[:, None], x2[None, :]), -1), dtype=torch.float64)
    f1, f2 = toy_losses(grid, 1.0)
    lam = ((x1 + 7.0) / 14.0)[:, None]
    best = np.argmin((lam * f1.numpy() + (1 - lam) * f2.numpy()), axis=1)
    rows = np.arange(n)
    return np.stack([scale * f1.numpy()[rows, best], f2.numpy()[rows, best]], axis=1)


def pareto_gap(x: np.ndarray, front: np.ndarray, scale: float = 1.0) -> float:
    """How much *both* objectives could still improve at x: the largest t such that a point
    of the front improves f1 and f2 by at least t each (0 on the front; the units of f)."""
    f1, f2 = toy_losses(torch.tensor(x, dtype=torch.float64), scale)
    gain = np.minimum(float(f1) - front[:, 0], float(f2) - front[:, 1])
    return max(float(gain.max()), 0.0)


TOY_METHODS = (
    "weighted sum (mean)",
    "MGDA (TorchJD)",
    "UPGrad (TorchJD)",
    "MARBLE ρ=0.7",
    "MARBLE ρ=0",
    "MARBLE ρ=0.7, rescale=False",
)


def toy_run(method: str, inits, steps: int, lr: float, scale: float) -> list[np.ndarray]:
    """Trajectories (steps+1, 2), one per initial point, of Adam(lr) under ``method``.

    The non-MARBLE methods run all initial points as the rows of one tensor (Adam is
    elementwise, so this is the same as one Adam per point); MARBLE gets one
    ``MarbleOptimizer`` per point, as a user would write it.
    """
    from torchjd.aggregation import MGDAWeighting, UPGradWeighting

    n = len(inits)
    traj = np.empty((n, steps + 1, 2))
    traj[:, 0] = np.asarray(inits, dtype=np.float64)
    if method.startswith("MARBLE"):
        rho = 0.7 if "0.7" in method else 0.0
        rescale = "rescale=False" not in method
        xs = [torch.tensor(p, dtype=torch.float64, requires_grad=True) for p in inits]
        opts = [MarbleOptimizer(torch.optim.Adam([x], lr=lr), ema_decay=rho, rescale=rescale) for x in xs]
        for t in range(steps):
            for i, (x, opt) in enumerate(zip(xs, opts)):
                f1, f2 = toy_losses(x, scale)
                opt.zero_grad()
                opt.step({"f1": f1, "f2": f2})
                traj[i, t + 1] = x.detach().numpy()
        return list(traj)
    weighting = {"MGDA (TorchJD)": MGDAWeighting(), "UPGrad (TorchJD)": UPGradWeighting()}.get(method)
    x = torch.tensor(inits, dtype=torch.float64, requires_grad=True)  # (n, 2)
    adam = torch.optim.Adam([x], lr=lr)
    for t in range(steps):
        f1, f2 = toy_losses(x, scale)
        g1 = torch.autograd.grad(f1.sum(), x, retain_graph=True)[0]  # row i: ∇f1 at point i
        g2 = torch.autograd.grad(f2.sum(), x)[0]
        jac = torch.stack([g1, g2], dim=1)  # (n, 2 objectives, 2)
        if weighting is None:
            d = jac.mean(dim=1)
        else:
            d = torch.stack([weighting(j @ j.T) @ j for j in jac])
        x.grad = d.detach()
        adam.step()
        traj[:, t + 1] = x.detach().numpy()
    return list(traj)


def run_toy(steps: int, lr: float, scale: float, inits) -> dict:
    out = {}
    for m in TOY_METHODS:
        t0 = time.perf_counter()
        trajs = toy_run(m, inits, steps, lr, scale)
        out[m] = dict(trajs=trajs, seconds=time.perf_counter() - t0)
    return out


def toy_table(res: dict, scale: float, inits) -> str:
    front = pareto_front(scale)
    rows = []
    for m in TOY_METHODS:
        trajs = res[m]["trajs"]
        gaps = [pareto_gap(t[-1], front, scale) for t in trajs]
        ends = []
        for t, gap in zip(trajs, gaps):
            ends.append(f"({t[-1][0]:.1f}, {t[-1][1]:.1f}) gap {gap:.2f}")
        rows.append([m, f"{sum(g <= PARETO_TOL for g in gaps)}/{len(trajs)}", f"{max(gaps):.2f}"] + ends)
    heads = ["method", f"on the front (gap ≤ {PARETO_TOL:g})", "worst gap"] + [f"from ({a:g}, {b:g})" for a, b in inits]
    return markdown_table(heads, rows)


def plot_toy(res: dict, path: str, scale: float, inits) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = 300
    xs = np.linspace(-10, 10, n)
    xx, yy = np.meshgrid(xs, xs)
    grid = torch.tensor(np.stack([xx, yy], -1), dtype=torch.float64)
    f1, f2 = toy_losses(grid, scale)
    mean = (0.5 * (f1 + f2)).numpy()
    cols = 3
    rows = -(-len(TOY_METHODS) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.3 * cols, 4.4 * rows), squeeze=False)
    axes = axes.ravel()
    for ax in axes[len(TOY_METHODS) :]:
        ax.axis("off")
    colors = plt.cm.tab10(np.arange(len(inits)))
    for ax, m in zip(axes, TOY_METHODS):
        ax.contour(xx, yy, mean, levels=20, cmap="viridis", linewidths=0.8)
        ax.plot([-7, 7], [PARETO_X2, PARETO_X2], color="0.3", lw=4, alpha=0.35, label="Pareto set (approx.)")
        for c, t in zip(colors, res[m]["trajs"]):
            ax.plot(t[:, 0], t[:, 1], color=c, lw=1.6)
            ax.plot(*t[0], "o", color=c, ms=6)
            ax.plot(*t[-1], "*", color="k", ms=9)
        ax.set_title(m)
        ax.set_xlim(-10, 10)
        ax.set_ylim(-10, 10)
        ax.set_aspect("equal")
    axes[0].legend(loc="upper right", fontsize=7)
    fig.suptitle(f"CAGrad / Nash-MTL toy: Adam trajectories from {len(inits)} initial points (o start, * end)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---- (b) specialist multi-task regression -------------------------------------------------
MGDA_EXACT = "MGDA, exact QP (`min_norm_weights`, raw G)"
REG_METHODS = ("AdamW on summed loss", "MARBLE ρ=0.7", "MARBLE ρ=0", "MGDA (TorchJD)", MGDA_EXACT, "UPGrad (TorchJD)")


def _exact_mgda(gram: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(min_norm_weights(gram.numpy()))


def run_regression(seeds, steps: int) -> dict:
    from torchjd.aggregation import MGDAWeighting, UPGradWeighting

    results = {m: [] for m in REG_METHODS}
    for seed in seeds:
        problem = build_problem(seed)
        for m in REG_METHODS:
            if m.startswith("AdamW"):
                r = train(problem, "sum", steps=steps)
            elif m.startswith("MARBLE"):
                r = train(problem, "marble", steps=steps, ema_decay=0.7 if "0.7" in m else 0.0)
            else:
                w = {MGDA_EXACT: _exact_mgda, "MGDA (TorchJD)": MGDAWeighting()}.get(m) or UPGradWeighting()
                r = train(problem, "weighting", steps=steps, weighting=w)
            results[m].append(r)
    return results


def regression_tables(results: dict) -> str:
    names = results[REG_METHODS[0]][0].names
    rows = []
    for m in REG_METHODS:
        rs = results[m]
        cells = []
        for n in names:
            v = np.array([r.final[n] for r in rs])
            cells.append(f"{v.mean():.3g} ± {v.std():.2g}")
        rows.append([m] + cells)
    init_row = ["(initial)"] + [f"{np.mean([r.initial[n] for r in results[REG_METHODS[0]]]):.3g}" for n in names]
    t1 = markdown_table(["method"] + [f"{n} (scale {n[1:]})" for n in names], [init_row] + rows)
    rows = []
    for m in REG_METHODS:
        rs = results[m]
        fr = np.array([r.negative_fraction for r in rs])
        behind = np.mean([sum(r.ratio(n) > 0.9 for n in names) for r in rs])
        improved_all = sum(all(r.ratio(n) < 0.9 for n in names) for r in rs)
        rows.append(
            [
                m,
                f"{fr.mean():.0%} ({fr.min():.0%}–{fr.max():.0%})",
                f"{min(r.worst.min() for r in rs):+.3g}",
                f"{np.mean([r.cosine_variance for r in rs]):.4f}",
                f"{behind:.1f}",
                f"{improved_all}/{len(rs)}",
                f"{np.mean([r.seconds for r in rs]):.2f} s",
            ]
        )
    t2 = markdown_table(
        [
            "method",
            "steps with worst cosine < 0 (mean, min–max over seeds)",
            "worst cosine seen",
            "across-objective variance of cosines",
            "objectives left behind (final > 0.9× initial), mean",
            "seeds with every objective < 0.9× initial",
            "time per run",
        ],
        rows,
    )
    return t1 + "\n\n" + t2


# ---- (c) every weighting × estimator ------------------------------------------------------
WEIGHTING_CONFIGS = (
    ("mean", {}),
    ("marble", {}),
    ("marble", {"anchor": 0.5}),
    ("mgda", {}),
    ("upgrad", {}),
    ("cagrad", {"c": 0.4}),
    ("imtl-g", {}),
    ("aligned-mtl", {}),
)
ESTIMATORS = ("batch", "cross")


def config_label(name: str, options: dict) -> str:
    return name + "".join(f" {k}={v:g}" for k, v in options.items())


def train_weighting(problem, name: str, options: dict, estimator: str, steps: int, lr: float = 1e-2) -> dict:
    """AdamW inside ``MarbleOptimizer(weighting=name, gram_estimator=estimator)`` on ``problem``;
    per step, the cosine of the update (``p.grad``) with each objective's gradient on an
    independent batch."""
    model = problem.make_model()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = MarbleOptimizer(
        torch.optim.AdamW(params, lr=lr), weighting=name, weighting_options=options, gram_estimator=estimator
    )
    data = torch.Generator().manual_seed(30_000 + problem.seed)
    held = torch.Generator().manual_seed(40_000 + problem.seed)
    cos = np.zeros((steps, len(problem.names)))
    for step in range(steps):
        x, y = problem.batch(data)
        if estimator == "cross":
            losses = {}
            for k, n in enumerate(problem.names):
                pred = model["heads"][k](model["trunk"](x[k])).squeeze(-1)
                losses[n] = (pred - y[k]) ** 2  # per sample (B,)
        else:
            losses = problem.losses(model, (x, y))
        opt.zero_grad()
        opt.backward(losses)
        d = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]).double()
        jac = _flat_grads(list(problem.losses(model, problem.batch(held)).values()), params).double()
        denom = jac.norm(dim=1) * d.norm()
        cos[step] = torch.where(denom > 0, jac @ d / denom.clamp_min(1e-300), torch.zeros_like(denom)).numpy()
        opt.step()
    return {"final": problem.eval_losses(model), "initial": problem.eval_losses(problem.make_model()), "cos": cos}


def run_weightings(seeds, steps: int, noises) -> dict:
    out = {}
    for noise in noises:
        for seed in seeds:
            problem = build_problem(seed, noise=noise)
            for name, options in WEIGHTING_CONFIGS:
                for est in ESTIMATORS:
                    t0 = time.perf_counter()
                    r = train_weighting(problem, name, options, est, steps)
                    r["seconds"] = time.perf_counter() - t0
                    out.setdefault(noise, {}).setdefault((config_label(name, options), est), []).append(r)
    return out


def weighting_tables(results: dict) -> str:
    parts = []
    for noise, res in results.items():
        base = res[("mean", "batch")]
        names = list(base[0]["final"])
        rows = []
        for (label, est), runs in res.items():
            cells = [label, est]
            for n in names:
                ratios = np.array([r["final"][n] / b["final"][n] for r, b in zip(runs, base)])
                cells.append(f"{np.exp(np.log(ratios).mean()):.3g} ({int((ratios < 1).sum())}/{len(runs)})")
            cos = np.concatenate([r["cos"] for r in runs])
            cells.append(" ".join(f"{c:+.2f}" for c in cos.mean(axis=0)))
            cells.append(f"{(cos.min(axis=1) < 0).mean():.0%}")
            cells.append(f"{np.mean([r['seconds'] for r in runs]):.2f} s")
            rows.append(cells)
        heads = (
            ["weighting", "estimator"]
            + [f"{n}: MSE / mean's (seeds better)" for n in names]
            + ["mean cos with each objective, independent batch", "steps with a negative one", "time per run"]
        )
        parts.append(f"#### label noise {noise:g} (× the target scale)\n\n" + markdown_table(heads, rows))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps, inits and seeds (CI)")
    parser.add_argument("--out", help="write the Markdown tables to this file")
    parser.add_argument("--plot", help="write the toy trajectories to this PNG")
    parser.add_argument("--json", help="write the raw (unrounded) regression and weighting figures to this file")
    parser.add_argument("--toy-steps", type=int, help="Adam steps on the toy (default 4000, quick 300)")
    parser.add_argument("--toy-lr", type=float, default=1e-2)
    parser.add_argument(
        "--toy-scale", type=float, default=1.0, help="multiplies f1 (Nash-MTL's imbalance); 1: CAGrad's"
    )
    parser.add_argument("--seeds", type=int, help="seeds for the regression (default 5, quick 2)")
    parser.add_argument("--steps", type=int, help="AdamW steps on the regression (default 300, quick 100)")
    parser.add_argument("--weighting-seeds", type=int, help="seeds for part (c) (default 3, quick 1)")
    parser.add_argument("--weighting-steps", type=int, help="steps for part (c) (default 200, quick 40)")
    args = parser.parse_args(argv)
    setup_torch(1)
    toy_steps = args.toy_steps or (300 if args.quick else 4000)
    inits = INITS[:3] if args.quick else INITS
    seeds = range(args.seeds or (2 if args.quick else 5))
    steps = args.steps or (100 if args.quick else 300)

    t0 = time.perf_counter()
    toy = run_toy(toy_steps, args.toy_lr, args.toy_scale, inits)
    if args.plot:
        plot_toy(toy, args.plot, args.toy_scale, inits)
    reg = run_regression(seeds, steps)
    w_seeds = range(args.weighting_seeds or (1 if args.quick else 3))
    w_steps = args.weighting_steps or (40 if args.quick else 200)
    noises = (0.1,) if args.quick else (0.1, 2.0)
    wres = run_weightings(w_seeds, w_steps, noises)
    cmd = "python benchmarks/conflict_quality.py" + (" --quick" if args.quick else "")
    text = "\n".join(
        [
            "## Conflict quality: weighted sum vs MGDA, UPGrad and MARBLE",
            "",
            f"`{cmd}` — {environment_line()}; {time.perf_counter() - t0:.0f} s.",
            "",
            f"### (a) CAGrad / Nash-MTL toy: Adam (lr {args.toy_lr:g}), {toy_steps} steps, f1 scale {args.toy_scale:g}",
            "",
            "Pareto gap at the end point: the largest t such that some point of the Pareto front (computed "
            "numerically) is better by t in *both* f1 and f2 — 0 on the front. End points as (x1, x2).",
            "",
            toy_table(toy, args.toy_scale, inits),
            "",
            f"### (b) Specialist multi-task regression (`marble_opt.demo`): {len(seeds)} seeds × {steps} AdamW steps (lr 1e-2)",
            "",
            "Final held-out MSE per objective, mean ± std over seeds (objective `xS` regresses a target of scale S):",
            "",
            regression_tables(reg),
            "",
            "Cosines are between the update direction written to `.grad` and each objective's gradient on the "
            "same mini-batch. MARBLE paper (SD3.5-M, 5 rewards): weighted sum negative in 80% of mini-batches, "
            "worst −0.13, variance 0.161; MARBLE never negative, worst +0.37, variance 0.006.",
            "",
            f"### (c) Every weighting × Gram estimator in `MarbleOptimizer`: {len(w_seeds)} seeds × {w_steps} AdamW "
            "steps (lr 1e-2)",
            "",
            'Per objective: the final held-out MSE divided by that of `weighting="mean"` with the batch estimator '
            "on the same seed (geometric mean over seeds; in parentheses the seeds where it is below 1). Cosines: "
            "the update written to `.grad` against each objective's gradient on an independent batch of the "
            "same size, mean over steps and seeds (objectives in the order of the MSE columns).",
            "",
            weighting_tables(wres),
            "",
        ]
    )
    write_markdown(args.out, text)
    write_json(args.json, raw_results(reg, wres))
    return 0


def raw_results(reg: dict, wres: dict) -> dict:
    """The unrounded figures behind tables (b) and (c). (b), per method, one entry per seed:
    the fraction of steps whose worst update cosine was negative, the worst cosine seen and
    the mean across-objective variance of the cosines. (c), per noise and "label|estimator":
    the mean cosine with each objective on an independent batch and the fraction of steps
    with a negative one."""
    regression = {
        m: {
            "negative_fraction": [r.negative_fraction for r in rs],
            "worst_cosine": [float(r.worst.min()) for r in rs],
            "cosine_variance": [r.cosine_variance for r in rs],
        }
        for m, rs in reg.items()
    }
    weightings = {}
    for noise, res in wres.items():
        for (label, est), runs in res.items():
            cos = np.concatenate([r["cos"] for r in runs])
            weightings.setdefault(f"{noise:g}", {})[f"{label}|{est}"] = {
                "mean_cosine": cos.mean(axis=0),
                "negative_fraction": float((cos.min(axis=1) < 0).mean()),
            }
    return {"regression": regression, "weightings": weightings}


if __name__ == "__main__":
    raise SystemExit(main())
