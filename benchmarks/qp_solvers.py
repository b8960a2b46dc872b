"""Min-norm QP solvers side by side: time per call and objective gap to an exact reference.

The problem: ``α* = argmin ½ αᵀGα  s.t.  α ≥ 0, Σα = 1`` for a K×K Gram matrix G.

For every K and every kind of hard Gram matrix (``marble_opt.testing.GRAM_KINDS``) the script
builds a *slowly drifting sequence* of Gram matrices, the situation inside training: the
gradients' directions move a little from one step to the next (``J_t = J_{t-1}(I + εN_t)``
on unit directions, norms kept, so duplicates stay duplicates, opposite rows stay opposite,
zero rows stay zero and the rank is kept). Every method solves every matrix of the sequence;
the methods are called round-robin (the order rotates every step) so that machine noise hits
them alike. Reported: the median time per call and the worst objective gap
``(½αᵀGα − ½α*ᵀGα*) / trace(G)`` over all matrices, where α is first put on the simplex
(clipped at 0 and divided by its sum: OSQP's default answers are off the simplex, and a
shrunk α would otherwise look better than the optimum); the simplex violation is reported
on its own.

The reference α*: support enumeration (``marble_opt.testing.reference_min_norm_weights``)
for K ≤ 10. Beyond, the lowest objective among DAQP's and quadprog's answers, each also
refined by one equality-constrained KKT solve on its support (written here, independent of
the package), and certified by its Frank–Wolfe duality gap ``αᵀGα − min_k (Gα)_k``, an
upper bound on its own suboptimality (the largest certificate is printed with the tables).

Run: ``python benchmarks/qp_solvers.py [--quick] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    Samples,
    environment_line,
    fmt_float,
    fmt_time,
    markdown_table,
    rotated,
    setup_torch,
    time_call,
    write_json,
    write_markdown,
)

from marble_opt import MinNormSolver, min_norm_weights  # noqa: E402
from marble_opt._src.qp import KKT_TOL, frank_wolfe_min_norm  # noqa: E402
from marble_opt.testing import GRAM_KINDS, hard_gram, reference_min_norm_weights  # noqa: E402

FULL_KS = (2, 3, 5, 8, 16, 32, 64)
QUICK_KS = (2, 3, 5, 8, 16)
TARGET_K = 5

# Method names (row labels), in table order.
WARM = "marble_opt, as the optimizer calls it (warm)"
COLD = "marble_opt, first call (new solver, no warm start)"
PUBLIC = "`min_norm_weights` (public, no warm start)"
OSQP_DEFAULT = "qpsolvers + OSQP, default settings"
QUADPROG = "qpsolvers + quadprog (ridge 1e-12·tr/K)"
DAQP = "qpsolvers + DAQP"
TJD_MGDA = "TorchJD `MGDAWeighting`"
TJD_UPGRAD = "TorchJD `UPGradWeighting` (not min-norm)"
FW_AWAY = "away-step Frank–Wolfe (marble_opt fallback)"
FW_CLASSIC = "classic Frank–Wolfe (Sener & Koltun Alg. 2, numpy)"
METHODS = (WARM, COLD, PUBLIC, OSQP_DEFAULT, QUADPROG, DAQP, TJD_MGDA, TJD_UPGRAD, FW_AWAY, FW_CLASSIC)


# ---- Gram sequences ---------------------------------------------------------------------
def drifting_grams(kind: str, k: int, steps: int, rng: np.random.Generator, drift: float = 0.05) -> list[np.ndarray]:
    """``steps`` Gram matrices: ``hard_gram(kind, k)`` whose gradient directions drift slowly.

    G = S U Uᵀ S with S = diag(‖g_k‖) fixed and U's rows unit directions; each step
    ``U ← rownormalise(U (I + drift·N/√K))``. Right-multiplication keeps the structure of the
    kind (duplicate, opposite and zero rows, rank); the norms keep the scales exactly.
    """
    g0 = hard_gram(kind, k, rng)
    norms = np.sqrt(np.maximum(np.diag(g0), 0.0))
    nz = norms > 0.0
    corr = np.zeros_like(g0)
    corr[np.ix_(nz, nz)] = g0[np.ix_(nz, nz)] / np.outer(norms[nz], norms[nz])
    w, v = np.linalg.eigh(0.5 * (corr + corr.T))
    u = v * np.sqrt(np.maximum(w, 0.0))
    out = []
    for t in range(steps):
        if t > 0:
            u = u @ (np.eye(k) + drift * rng.normal(size=(k, k)) / np.sqrt(k))
        rn = np.linalg.norm(u, axis=1)
        u[nz] /= rn[nz, None]
        u[~nz] = 0.0
        j = u * norms[:, None]
        g = j @ j.T
        out.append(0.5 * (g + g.T))
    return out


# ---- reference -------------------------------------------------------------------------
def objective(g: np.ndarray, a: np.ndarray) -> float:
    return 0.5 * float(a @ g @ a)


def fw_certificate(g: np.ndarray, a: np.ndarray) -> float:
    """Frank–Wolfe duality gap ``αᵀGα − min_k (Gα)_k`` ≥ ½αᵀGα − min (α on the simplex)."""
    ga = g @ a
    return float(a @ ga - ga.min())


def to_simplex(a: np.ndarray) -> np.ndarray:
    a = np.maximum(np.asarray(a, dtype=np.float64), 0.0)
    s = a.sum()
    return a / s if s > 0 else np.full(a.size, 1.0 / a.size)


def kkt_refine(g: np.ndarray, a: np.ndarray) -> np.ndarray:
    """One equality-constrained KKT solve on the support of ``a`` (least squares); ``a`` if
    the result leaves the simplex."""
    support = np.flatnonzero(a > 1e-9 * a.max())
    n = support.size
    kkt = np.zeros((n + 1, n + 1))
    kkt[:n, :n] = g[np.ix_(support, support)]
    kkt[n, :n] = kkt[:n, n] = 1.0
    rhs = np.zeros(n + 1)
    rhs[n] = 1.0
    sol = np.linalg.lstsq(kkt, rhs, rcond=None)[0][:n]
    if sol.min() < 0.0 or not np.isfinite(sol).all():
        return a
    out = np.zeros_like(a)
    out[support] = sol
    return to_simplex(out)


def _qpsolvers(g: np.ndarray, solver: str, ridge: float = 0.0, **settings) -> np.ndarray | None:
    import qpsolvers

    k = g.shape[0]
    p = g + ridge * np.eye(k) if ridge else g
    try:
        x = qpsolvers.solve_qp(
            p, np.zeros(k), A=np.ones((1, k)), b=np.ones(1), lb=np.zeros(k), solver=solver, **settings
        )
    except Exception:  # counted as a failure
        return None
    if x is None or not np.isfinite(x).all():
        return None
    return np.asarray(x, dtype=np.float64)


def reference(g: np.ndarray) -> tuple[float, float, str]:
    """(½α*ᵀGα*, certificate bound on its suboptimality, how it was obtained)."""
    k = g.shape[0]
    if k <= 10:
        a = reference_min_norm_weights(g)
        return objective(g, a), 0.0, "support enumeration"
    scale = float(np.trace(g)) / k
    gs = g / scale if scale > 0 else g
    cands = []
    for name, ridge in (("daqp", 0.0), ("quadprog", 1e-12)):
        x = _qpsolvers(gs, name, ridge)
        if x is not None:
            x = to_simplex(x)
            cands += [x, kkt_refine(gs, x)]
    best = min(cands, key=lambda a: objective(gs, a))
    return objective(g, best), fw_certificate(g, best) * 1.0, "DAQP/quadprog + KKT refine, FW-certified"


# ---- methods ---------------------------------------------------------------------------
def classic_frank_wolfe(g: np.ndarray, eps: float = 1e-3, max_iters: int = 100) -> np.ndarray:
    """Sener & Koltun (2018), Algorithm 2: Frank–Wolfe with exact line search toward the best
    vertex, stopping when the step γ < eps (TorchJD's MGDAWeighting, in numpy)."""
    k = g.shape[0]
    a = np.full(k, 1.0 / k)
    for _ in range(max_iters):
        ga = g @ a
        t = int(np.argmin(ga))
        va, vb, vc = ga[t], float(a @ ga), g[t, t]
        if vc <= va:
            gamma = 1.0
        elif vb <= va:
            gamma = 0.0
        else:
            gamma = (vb - va) / (vb + vc - 2 * va)
        a = (1 - gamma) * a
        a[t] += gamma
        if gamma < eps:
            break
    return a


def make_methods(persistent: MinNormSolver, state: dict) -> dict[str, Callable[[np.ndarray], np.ndarray | None]]:
    from torchjd.aggregation import MGDAWeighting, UPGradWeighting

    mgda, upgrad = MGDAWeighting(), UPGradWeighting()

    def warm(g):
        alpha, _ = persistent.solve(g, warm_start=state["last"], validated=True)
        state["last"] = alpha
        return alpha

    def cold(g):
        return MinNormSolver().solve(g, validated=True)[0]

    def away_fw(g):
        scale = float(np.trace(g)) / g.shape[0]
        return frank_wolfe_min_norm(g / scale if scale > 0 else g)

    return {
        WARM: warm,
        COLD: cold,
        PUBLIC: min_norm_weights,
        OSQP_DEFAULT: lambda g: _qpsolvers(g, "osqp"),
        QUADPROG: lambda g: _qpsolvers(g, "quadprog", 1e-12 * float(np.trace(g)) / g.shape[0]),
        DAQP: lambda g: _qpsolvers(g, "daqp"),
        TJD_MGDA: lambda g: mgda(torch.from_numpy(g)).numpy(),
        TJD_UPGRAD: lambda g: upgrad(torch.from_numpy(g)).numpy(),
        FW_AWAY: away_fw,
        FW_CLASSIC: classic_frank_wolfe,
    }


# ---- the run ---------------------------------------------------------------------------
TRAINING = "training"  # pseudo-kind: Gram matrices recorded from marble_opt.demo at K=5


def training_grams(steps: int, seed: int = 0) -> list[np.ndarray]:
    """The l2-normalised Gram matrices ``MarbleOptimizer`` hands its solver on ``steps`` steps of
    ``marble_opt.demo``'s specialist regression (K=5, ρ=0.7): the in-training sequence."""
    from marble_opt import MarbleOptimizer
    from marble_opt.demo import build_problem

    problem = build_problem(seed)
    model = problem.make_model()
    opt = MarbleOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    data = torch.Generator().manual_seed(30_000 + seed)
    out = []
    for _ in range(steps + 1):
        opt.zero_grad()
        report = opt.step(problem.losses(model, problem.batch(data)))
        g = report.gram
        n = np.sqrt(np.diag(g))
        out.append(g / np.outer(n, n))
    return out


def run(sequences: dict, block: int = 10) -> dict:
    """Every method on every matrix of every sequence ``{(K, kind): [G_0, G_1, ...]}``
    (G_0 only primes the persistent solver); round-robin over blocks of ``block``
    consecutive matrices, the order of the methods rotating every block. ``block=1``
    interleaves single calls, so every call starts with caches the other methods have just
    evicted (as a QP solve between backward passes does); larger blocks measure each method
    with its code and data in cache."""
    times = Samples()  # keys: (method, K) over synthetic kinds, and (method, K, kind)
    gaps: dict = defaultdict(lambda: -np.inf)  # same keys -> worst relative gap
    viol: dict = defaultdict(float)  # (method, K) -> worst simplex violation
    fails: dict = defaultdict(int)
    certs = []
    for si, ((k, kind), seq) in enumerate(sequences.items()):
        persistent = MinNormSolver()
        state = {"last": persistent.solve(seq[0], validated=True)[0]}  # prime: step 0 untimed
        methods = make_methods(persistent, state)
        names = list(methods)
        seq = seq[1:]
        refs = []
        for g in seq:
            f_ref, cert, _ = reference(g)
            certs.append(cert / float(np.trace(g)))
            refs.append(f_ref)
        keys_of = [(k, kind)] if kind == TRAINING else [(k,), (k, kind)]
        for b0 in range(0, len(seq), block):
            for name in rotated(names, b0 // block + si):
                fn = methods[name]
                for t in range(b0, min(b0 + block, len(seq))):
                    g = seq[t]
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        dt, a = time_call(lambda: fn(g))  # noqa: B023
                    for key in keys_of:
                        times.add((name, *key), dt)
                    if a is None:
                        fails[(name, k)] += 1
                        continue
                    a = np.asarray(a, dtype=np.float64)
                    v = max(abs(float(a.sum()) - 1.0), float(-a.min()), 0.0)
                    if name == TJD_UPGRAD:  # UPGrad's weights are not meant to sum to 1
                        v = max(float(-a.min()), 0.0)
                    viol[(name, k)] = max(viol[(name, k)], v)
                    tr = float(np.trace(g))
                    gap = (objective(g, to_simplex(a)) - refs[t]) / tr if tr > 0 else 0.0
                    for key in keys_of:
                        gaps[(name, *key)] = max(gaps[(name, *key)], gap)
    return dict(times=times, gaps=gaps, viol=viol, fails=fails, certs=certs, block=block)


def steps_for(k: int, steps: int) -> int:
    """Matrices per (K, kind): a third beyond K=16, where the slow baselines (Frank–Wolfe,
    UPGrad) take tens of milliseconds per call."""
    return steps if k <= 16 else max(steps // 3, 5)


def build_sequences(ks, steps: int, seed: int, drift: float, train_steps: int) -> dict:
    seqs = {}
    for k in ks:
        n = steps_for(k, steps)
        for j, kind in enumerate(GRAM_KINDS):
            seqs[(k, kind)] = drifting_grams(kind, k, n + 1, np.random.default_rng([seed, k, j]), drift)
    if TARGET_K in ks and train_steps:
        seqs[(TARGET_K, TRAINING)] = training_grams(train_steps, seed)
    return seqs


def fmt_gap(x: float) -> str:
    if x == -np.inf:
        return "n/a"
    return "≤ 0" if x <= 0 else fmt_float(x)


def _ratio_rows(times: Samples, k: int, kinds) -> list[list[str]]:
    rows = []
    for m in METHODS:
        if m == WARM:
            continue
        per_kind = [times.median((m, k, kind)) / times.median((WARM, k, kind)) for kind in GRAM_KINDS]
        row = [m, f"{times.ratio((m, k), (WARM, k)):.1f}×", f"{min(per_kind):.1f}× – {max(per_kind):.1f}×"]
        if TRAINING in kinds:
            row.append(f"{times.ratio((m, k, TRAINING), (WARM, k, TRAINING)):.1f}×")
        rows.append(row)
    return rows


def report(res: dict, cold: dict | None, meta: dict) -> str:
    times, gaps, ks = res["times"], res["gaps"], meta["ks"]
    k = TARGET_K
    kinds = list(GRAM_KINDS) + ([TRAINING] if meta["train_steps"] and k in ks else [])
    lines = [
        "## Min-norm QP solvers",
        "",
        f"`{meta['command']}` — {environment_line()}; {meta['seconds']:.0f} s.",
        "",
        f"{len(GRAM_KINDS)} Gram kinds ({', '.join(GRAM_KINDS)}; `marble_opt.testing.hard_gram`) × "
        f"{meta['steps']} matrices (K ≤ 16; {steps_for(32, meta['steps'])} beyond) of a slowly drifting sequence "
        f"(directions drift {meta['drift']} per step, norms and structure kept) per K. Every method solves every matrix; methods take turns in blocks of "
        f"{res['block']} consecutive matrices (round-robin, order rotating). marble_opt's warm call is a "
        "persistent `MinNormSolver` called as `MarbleOptimizer` calls it: "
        "`solve(G, warm_start=<previous α>, validated=True)`. Times: median per call. Gap: worst "
        "`(½αᵀGα − ½α*ᵀGα*) / trace(G)` after putting α on the simplex (clip at 0, divide by the sum); "
        "`≤ 0` means never above the reference. Reference α*: support enumeration for K ≤ 10; for K > 10 "
        "the best of DAQP's and quadprog's answers, each also refined by a KKT solve on its support, "
        "certified by its Frank–Wolfe duality gap `αᵀGα − min_k (Gα)_k` (largest certificate seen: "
        f"{fmt_float(max(res['certs']) if res['certs'] else 0.0)} of trace). quadprog needs a positive "
        "definite matrix: it gets G + 1e-12·trace(G)/K·I. TorchJD's weightings get G as a float64 tensor; "
        "UPGrad's weights are not the min-norm point (a different aggregator): its gap says how far its "
        "direction's norm is from the min-norm one, not an error.",
        "",
        "### Median time per call",
        "",
        markdown_table(
            ["method"] + [f"K={kk}" for kk in ks],
            [[m] + [fmt_time(times.median((m, kk))) for kk in ks] for m in METHODS],
        ),
        "",
        "### Worst objective gap (relative to trace G)",
        "",
        markdown_table(
            ["method"] + [f"K={kk}" for kk in ks], [[m] + [fmt_gap(gaps[(m, kk)]) for kk in ks] for m in METHODS]
        ),
        "",
        "### Simplex violation and failures (all K)",
        "",
        markdown_table(
            ["method", "worst max(|Σα−1|, −min α)", "failed calls"],
            [
                [m, fmt_float(max(res["viol"][(m, kk)] for kk in ks)), str(sum(res["fails"][(m, kk)] for kk in ks))]
                for m in METHODS
            ],
        ),
        "",
    ]
    if k not in ks:
        return "\n".join(lines)
    lines += [
        f"### K={k} by Gram kind: median time / worst gap",
        "",
        (
            f"`{TRAINING}`: the {meta['train_steps']} l2-normalised Gram matrices `MarbleOptimizer` solved while "
            "training `marble_opt.demo`'s specialist regression (5 objectives, ρ=0.7): the in-training sequence."
            if TRAINING in kinds
            else ""
        ),
        "",
        markdown_table(
            ["method"] + kinds,
            [
                [m] + [f"{fmt_time(times.median((m, k, kd)))} / {fmt_gap(gaps[(m, k, kd)])}" for kd in kinds]
                for m in METHODS
            ],
        ),
        "",
        f"### K={k}: time per call relative to marble_opt's warm call",
        "",
        "Pooled: median over all six synthetic kinds; per kind: the smallest and largest per-kind ratio.",
        "",
        markdown_table(
            ["method", "pooled", "per kind"] + ([f"`{TRAINING}`"] if TRAINING in kinds else []),
            _ratio_rows(times, k, kinds),
        ),
        "",
    ]
    if cold is not None:
        ct = cold["times"]
        lines += [
            f"### K={k} with cold caches: single calls interleaved",
            "",
            "Same matrices, but the methods take turns on every single matrix (block 1), so each call starts "
            "with caches the previous method evicted, as a QP solve does between backward passes.",
            "",
            markdown_table(
                ["method", "median (synthetic kinds)", "vs warm call"]
                + ([f"`{TRAINING}`", "vs warm call"] if TRAINING in kinds else []),
                [
                    [m, fmt_time(ct.median((m, k))), f"{ct.ratio((m, k), (WARM, k)):.1f}×"]
                    + (
                        [
                            fmt_time(ct.median((m, k, TRAINING))),
                            f"{ct.ratio((m, k, TRAINING), (WARM, k, TRAINING)):.1f}×",
                        ]
                        if TRAINING in kinds
                        else []
                    )
                    for m in METHODS
                ],
            ),
            "",
        ]
    warm_t = times.median((WARM, k))
    line = (
        f"**Targets at K={k}**: warm call vs TorchJD's `MGDAWeighting`: "
        f"{times.ratio((TJD_MGDA, k), (WARM, k)):.1f}× faster pooled (per kind "
        f"{min(times.median((TJD_MGDA, k, kd)) / times.median((WARM, k, kd)) for kd in GRAM_KINDS):.1f}×–"
        f"{max(times.median((TJD_MGDA, k, kd)) / times.median((WARM, k, kd)) for kd in GRAM_KINDS):.0f}×"
    )
    if TRAINING in kinds:
        line += f", {times.ratio((TJD_MGDA, k, TRAINING), (WARM, k, TRAINING)):.1f}× on the training Grams"
    if cold is not None:
        line += f", {cold['times'].ratio((TJD_MGDA, k), (WARM, k)):.1f}× with cold caches"
    line += (
        f") — target ≥ 10×; vs qpsolvers+OSQP defaults {times.ratio((OSQP_DEFAULT, k), (WARM, k)):.0f}×; "
        f"worst gap {fmt_gap(gaps[(WARM, k)])} vs quadprog's {fmt_gap(gaps[(QUADPROG, k)])} (within the "
        f"solver's certified bound KKT_TOL/K = {fmt_float(KKT_TOL / k)}: "
        f"{'yes' if gaps[(WARM, k)] <= KKT_TOL / k else 'no'}); median warm call "
        f"{fmt_time(warm_t)} (target: ≤ 50 µs"
    )
    if cold is not None:
        line += f"; {fmt_time(cold['times'].median((WARM, k)))} with cold caches"
    lines += [line + ").", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"K in {QUICK_KS}, 6 matrices per kind (a few seconds)")
    parser.add_argument("--out", help="write the Markdown tables to this file")
    parser.add_argument("--json", help="write the raw (unrounded) gaps, violations and failures to this file")
    parser.add_argument("--steps", type=int, help="matrices per (K, kind) (default 60, quick 6)")
    parser.add_argument(
        "--train-steps", type=int, help="training Gram matrices at K=5 (default 300, quick 30; 0: none)"
    )
    parser.add_argument("--block", type=int, default=10, help="consecutive matrices per turn (default 10)")
    parser.add_argument("--no-cold", action="store_true", help="skip the K=5 cold-cache pass (block 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--drift", type=float, default=0.05)
    args = parser.parse_args(argv)
    setup_torch(1)
    t0 = time.perf_counter()
    ks = QUICK_KS if args.quick else FULL_KS
    steps = args.steps or (6 if args.quick else 60)
    train_steps = args.train_steps if args.train_steps is not None else (30 if args.quick else 300)
    seqs = build_sequences(ks, steps, args.seed, args.drift, train_steps)
    res = run(seqs, block=args.block)
    cold = None
    if not args.no_cold and TARGET_K in ks:
        cold = run({key: v for key, v in seqs.items() if key[0] == TARGET_K}, block=1)
    cmd = "python benchmarks/qp_solvers.py" + " ".join(
        [""]
        + [
            a
            for a in (argv if argv is not None else sys.argv[1:])
            if not a.startswith("--out") and not a.endswith(".md")
        ]
    )
    meta = dict(
        ks=ks,
        steps=steps,
        drift=args.drift,
        train_steps=train_steps,
        command=cmd.strip(),
        seconds=time.perf_counter() - t0,
    )
    write_markdown(args.out, report(res, cold, meta))
    write_json(args.json, raw_results(res, meta))
    return 0


def raw_results(res: dict, meta: dict) -> dict:
    """The unrounded figures behind the tables: per method and K, the worst objective gap
    (relative to trace G; None where the method never answered), the worst simplex
    violation and the failures; and the largest reference certificate."""
    out: dict = {"ks": list(meta["ks"]), "kkt_tol": KKT_TOL, "max_certificate": max(res["certs"], default=0.0)}
    for field, table in (("gap", res["gaps"]), ("violation", res["viol"]), ("failures", res["fails"])):
        out[field] = {m: {str(k): table[(m, k)] for k in meta["ks"]} for m in METHODS}
    return out


if __name__ == "__main__":
    raise SystemExit(main())
