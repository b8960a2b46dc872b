#!/usr/bin/env python
"""Multi-reward DiffusionNFT on the digits model: methods x reward suites x seeds.

Every run is the example's own loop (``examples/sd35_marble/train.py``, preset ``digits``)
with the same rollout sizes, timesteps and number of steps; only ``--combine`` (and MARBLE's
options) differ between methods, and run ``i`` of every method uses the same seeds (RL seed
``s``, pretrained model ``s % 2``), so its first rollouts are identical.

Evaluation, per run, on fixed held-out noise (the preset's ``eval_samples*.npz``: 8 samples
of each digit, the same noise for every run):

- per reward, the mean over the samples it applies to, at step 0 (the pretrained model) and
  at the end; the change is reported as mean ± sd over seeds, with the paired difference to
  ``weighted-sum`` (mean, one-sided paired t-test that the method is better, and the number
  of seeds where it is);
- the judge's accuracy (an independent SVC, not a reward) at the end;
- conflicts of the step actually taken: every ``--eval-every`` steps, the parameter change of
  that step (after clipping and AdamW) is compared with each reward's gradient, taken in
  parameter space at the parameters before the step, on (a) an **independent** rollout batch
  (fresh prompts and noise from the benchmark's own generator, the current old policy) and
  (b) the batch the step was solved on. A step conflicts when it increases some reward's
  loss to first order (``⟨Δθ, ∇L_k⟩ > 0``); reported as the fraction of measured steps.

The learning rate is chosen once, for ``weighted-sum`` only (``--lr-sweep``, recorded in
``benchmarks/results/diffusion_rl_lr.json``), and used for every method.

Run::

    python benchmarks/diffusion_rl.py --lr-sweep 1e-5 3e-5 1e-4 --jobs 2     # once: pick the lr
    python benchmarks/diffusion_rl.py --jobs 2                                # the full grid
    python benchmarks/diffusion_rl.py --marble-variant cross='{"gram": "exact", "gram_estimator": "cross"}'
    python benchmarks/diffusion_rl.py --quick                                 # seconds (tests)

Writes ``benchmarks/results/diffusion_rl.md`` / ``.json`` and ``diffusion_rl_<suite>.png``
(reward curves and final sample grids per method).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "sd35_marble"
RESULTS = ROOT / "benchmarks" / "results"
LR_RECORD = RESULTS / "diffusion_rl_lr.json"
DEFAULT_LR = 3e-5

#: Methods as specs: ``combine`` plus extra train.py flags.
METHODS: dict[str, dict[str, Any]] = {
    "weighted-sum": {"combine": "weighted-sum"},
    "gdpo": {"combine": "gdpo"},
    "equal-alpha": {"combine": "equal-alpha"},
    "sequential": {"combine": "sequential"},
    "marble": {"combine": "marble", "gram": "shared"},
    "marble-exact": {"combine": "marble", "gram": "exact"},
}
BASELINE = "weighted-sum"
SUITES = ("mismatch", "conflict")


# ---- one run -------------------------------------------------------------------------------------
def _import_train():
    if str(EXAMPLE) not in sys.path:
        sys.path.insert(0, str(EXAMPLE))
    import train

    return train


def method_argv(spec: dict[str, Any]) -> list[str]:
    """train.py flags of a method spec."""
    argv = ["--combine", spec["combine"]]
    if "gram" in spec:
        argv += ["--gram", spec["gram"]]
    if spec.get("marble_options"):
        argv += ["--marble-options", json.dumps(spec["marble_options"])]
    if spec.get("reward_weights"):
        argv += ["--reward-weights", json.dumps(spec["reward_weights"])]
    return argv


class ConflictProbe:
    """Step callback: every ``every`` steps, compare the step taken with each reward's gradient."""

    def __init__(self, every: int, seed: int) -> None:
        import torch

        self.every = every
        self.gen = torch.Generator().manual_seed(10_000 + seed)
        self.rows: list[dict[str, Any]] = []

    def reward_grads(self, trainer, batch, adv, masks) -> dict[str, Any]:
        """Flattened parameter-space gradient of each reward's NFT loss on ``batch``."""
        import torch

        from marble_opt.testing import jacobian_rows

        cfg, names = trainer.cfg, trainer.reward_names
        b = batch.x0.shape[0]
        sig = trainer.sigmas
        grads = {k: torch.zeros(sum(p.numel() for p in trainer.params), dtype=torch.float64) for k in names}
        for _ in range(cfg.train_timesteps):
            slot = torch.randint(0, len(sig) - 1, (b,), generator=self.gen)
            eps = torch.randn(batch.x0.shape, generator=self.gen)
            _, out = trainer.nft_losses_at(batch, torch.arange(b), sig[slot], eps, adv, masks, names, kl=False)
            for k, row in zip(names, jacobian_rows([out.losses[k] for k in names], trainer.params)):
                grads[k] += row
        return grads

    def independent_batch(self, trainer):
        """A fresh rollout (prompts and noise from this probe's generator) with the old policy."""
        import random

        import torch

        state = trainer.gen.get_state(), trainer.prompt_rng.getstate()
        trainer.gen.set_state(
            torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=self.gen))).get_state()
        )
        trainer.prompt_rng = random.Random(int(torch.randint(0, 2**62, (1,), generator=self.gen)))
        try:
            batch = trainer.rollout()
            _, adv, masks = trainer.score(batch)
        finally:
            trainer.gen.set_state(state[0])
            trainer.prompt_rng.setstate(state[1])
        return batch, adv, masks

    def __call__(self, trainer, row, batch, adv, masks) -> None:
        import torch

        if trainer.step % self.every or trainer.last_update is None:
            return
        update = torch.cat([u.flatten() for u in trainer.last_update]).double()
        now = [p.detach().clone() for p in trainer.params]
        with torch.no_grad():  # the gradients are taken where the step started
            for p, u in zip(trainer.params, trainer.last_update):
                p.sub_(u)
        try:
            record: dict[str, Any] = {"step": trainer.step}
            for where, (bt, ad, ms) in (
                ("independent", self.independent_batch(trainer)),
                ("solved", (batch, adv, masks)),
            ):
                grads = self.reward_grads(trainer, bt, ad, ms)
                cos = {}
                for k, g in grads.items():
                    n = float(g.norm() * update.norm())
                    cos[k] = float(-(g @ update) / n) if n > 0 else None  # cosine with the descent direction
                record[where] = cos
        finally:
            with torch.no_grad():
                for p, v in zip(trainer.params, now):
                    p.copy_(v)
        self.rows.append(record)


def run_one(task: dict[str, Any]) -> dict[str, Any]:
    """One training run of the grid; returns its evaluation (JSON-able)."""
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    train = _import_train()
    from digits.judge import DigitsJudge
    from digits.rewards import build_digits_rewards

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        argv = [
            "--preset", "digits", "--reward-suite", task["suite"], "--seed", str(task["seed"]),
            "--pretrain-seed", str(task["seed"] % 2), "--lr", repr(task["lr"]), "--max-steps", str(task["steps"]),
            "--sample-every", str(task["steps"]), "--checkpoint-every", str(task["steps"]), "--num-threads", "1",
            "--output-dir", str(out), *method_argv(task["spec"]), *task.get("extra_argv", []),
        ]  # fmt: skip
        cfg = train.resolve_config(train.build_parser().parse_args(argv))
        train.validate(cfg)
        t0 = time.perf_counter()
        trainer = train.Trainer(cfg)
        trainer.track_update = True
        probe = ConflictProbe(task["eval_every"], task["seed"])
        trainer.step_callbacks.append(probe)
        from contextlib import redirect_stderr

        with open(os.devnull, "w") as devnull, redirect_stderr(devnull):  # no progress bars from workers
            trainer.train()
        seconds = time.perf_counter() - t0
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        files = sorted(out.rglob("eval_samples*.npz"))
        evals = []
        for f in (files[0], files[-1]):
            with np.load(f) as z:
                evals.append((torch.from_numpy(z["images"]), torch.from_numpy(z["labels"])))
    rewards = build_digits_rewards(task["suite"])
    judge = DigitsJudge()
    start, end, spread = {}, {}, {}
    for r in rewards:
        for dest, (images, labels) in ((start, evals[0]), (end, evals[1])):
            v = r(images, labels)
            dest[r.name] = float(v[torch.isfinite(v)].mean())
        v = r(*evals[0])
        spread[r.name] = float(v[torch.isfinite(v)].std())
    names = [r.name for r in rewards]
    conflicts = {}
    for where in ("independent", "solved"):
        measured = [rec[where] for rec in probe.rows]
        any_conflict = [any(c is not None and c < 0 for c in m.values()) for m in measured]
        conflicts[where] = {
            "rate": float(np.mean(any_conflict)) if measured else None,
            "steps": len(measured),
            "mean_cosine": {k: _nanmean([m[k] for m in measured]) for k in names},
        }
    return {
        "method": task["method"],
        "suite": task["suite"],
        "seed": task["seed"],
        "pretrain_seed": task["seed"] % 2,
        "lr": task["lr"],
        "steps": task["steps"],
        "seconds": seconds,
        "step_seconds": float(np.median([r["step_time"] for r in rows])),
        "reward_start": start,
        "reward_end": end,
        "reward_sd_start": spread,
        "judge_start": judge.accuracy(*evals[0]),
        "judge_end": judge.accuracy(*evals[1]),
        "curves": {k: [r.get(f"reward/{k}") for r in rows] for k in names},
        "weights": {k: [r.get(f"weight/{k}") for r in rows] for k in names},
        "conflicts": conflicts,
        "samples_end": evals[1][0].numpy().tolist() if task.get("keep_samples") else None,
        "labels_end": evals[1][1].numpy().tolist() if task.get("keep_samples") else None,
    }


def _nanmean(values: Sequence[float | None]) -> float | None:
    v = [x for x in values if x is not None and math.isfinite(x)]
    return float(np.mean(v)) if v else None


def run_tasks(tasks: list[dict[str, Any]], jobs: int) -> list[dict[str, Any]]:
    """Run ``tasks`` in ``jobs`` worker processes (one torch thread each), in task order."""
    if jobs <= 1:
        return [run_one(t) for t in tasks]
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        return list(pool.map(run_one, tasks))


# ---- analysis ------------------------------------------------------------------------------------
def paired_difference(by: dict, method: str, ref: str, seeds: Sequence[int], names: Sequence[str]) -> dict[str, Any]:
    """Per reward: mean paired difference of the change (``method`` − ``ref``), one-sided paired
    t-test p that ``method`` is better, and the number of seeds where it is."""
    from scipy import stats

    paired = {}
    for k in names:
        change = [by[method, s]["reward_end"][k] - by[method, s]["reward_start"][k] for s in seeds]
        base = [by[ref, s]["reward_end"][k] - by[ref, s]["reward_start"][k] for s in seeds]
        diff = np.asarray(change) - np.asarray(base)
        p = None
        if len(seeds) > 1 and np.std(diff) > 0:
            p = float(stats.ttest_rel(change, base, alternative="greater").pvalue)
        paired[k] = {"diff_mean": float(diff.mean()), "p_greater": p, "wins": int((diff > 0).sum())}
    return paired


def summarise(results: list[dict[str, Any]], methods: Sequence[str], references: Sequence[str] = ()) -> dict[str, Any]:
    """Per suite and method: reward changes, paired differences to the baseline (and to each of
    ``references`` under ``paired[ref]``), judge, conflicts."""
    out: dict[str, Any] = {}
    for suite in dict.fromkeys(r["suite"] for r in results):
        rs = [r for r in results if r["suite"] == suite]
        names = list(rs[0]["reward_start"])
        seeds = sorted({r["seed"] for r in rs})
        by = {(r["method"], r["seed"]): r for r in rs}
        suite_out: dict[str, Any] = {"rewards": names, "seeds": seeds, "methods": {}}
        for m in methods:
            if not all((m, s) in by for s in seeds):
                continue
            change = {k: [by[m, s]["reward_end"][k] - by[m, s]["reward_start"][k] for s in seeds] for k in names}
            entry: dict[str, Any] = {
                "change_mean": {k: float(np.mean(v)) for k, v in change.items()},
                "change_sd": {k: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for k, v in change.items()},
                "judge_end_mean": float(np.mean([by[m, s]["judge_end"] for s in seeds])),
                "judge_start_mean": float(np.mean([by[m, s]["judge_start"] for s in seeds])),
                "conflict_independent": _nanmean([by[m, s]["conflicts"]["independent"]["rate"] for s in seeds]),
                "conflict_solved": _nanmean([by[m, s]["conflicts"]["solved"]["rate"] for s in seeds]),
                "seconds_mean": float(np.mean([by[m, s]["seconds"] for s in seeds])),
                "step_seconds_median": float(np.median([by[m, s]["step_seconds"] for s in seeds])),
            }
            if m != BASELINE and all((BASELINE, s) in by for s in seeds):
                entry["paired_vs_baseline"] = paired_difference(by, m, BASELINE, seeds, names)
            for ref in references:
                if ref != m and all((ref, s) in by for s in seeds):
                    entry.setdefault("paired", {})[ref] = paired_difference(by, m, ref, seeds, names)
            suite_out["methods"][m] = entry
        out[suite] = suite_out
    return out


def _f(x: float | None, fmt: str = "+.3f") -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def _paired_table(s: dict[str, Any], ref: str, key) -> list[str]:
    names, n = s["rewards"], len(s["seeds"])
    lines = [f"Paired difference to `{ref}` (Δ, p, better on k of {n} seeds):", ""]
    lines += ["| method | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for m, e in s["methods"].items():
        pv = key(e)
        if pv is None:
            continue
        cells = [f"{_f(pv[k]['diff_mean'])} (p={_f(pv[k]['p_greater'], '.3f')}, {pv[k]['wins']}/{n})" for k in names]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def markdown(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [
        "## Multi-reward DiffusionNFT on the digits model",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"{meta['steps']} steps per run, lr {meta['lr']:g} ({meta['lr_source']}), "
        f"RL seeds {meta['seeds']} (pretrained model = seed % 2), eval every {meta['eval_every']} steps; "
        f"{meta['environment']}.",
        "",
        "Reward change from the pretrained model on fixed held-out noise (mean ± sd over seeds); "
        f"Δ vs {BASELINE}: paired mean difference, one-sided paired t-test p (method better), "
        "seeds where the method is better. Judge: accuracy of an independent classifier at the end. "
        "Conflict: fraction of measured steps whose parameter change increased some reward's loss "
        "to first order, on an independent batch and on the batch the step was solved on.",
        "",
    ]
    for suite, s in summary.items():
        names = s["rewards"]
        lines += [f"### Suite `{suite}`", ""]
        lines += ["| method | " + " | ".join(names) + " | judge | conflict (indep.) | conflict (solved) | s/run |"]
        lines += ["|---" * (len(names) + 5) + "|"]
        for m, e in s["methods"].items():
            cells = [f"{_f(e['change_mean'][k])} ± {_f(e['change_sd'][k], '.3f')}" for k in names]
            lines.append(
                f"| {m} | "
                + " | ".join(cells)
                + f" | {e['judge_end_mean']:.3f} | {_f(e['conflict_independent'], '.2f')} "
                f"| {_f(e['conflict_solved'], '.2f')} | {e['seconds_mean']:.1f} |"
            )
        first = next(iter(s["methods"].values()))
        lines += ["", f"Pretrained judge accuracy: {first['judge_start_mean']:.3f}.", ""]
        lines += _paired_table(s, BASELINE, lambda e: e.get("paired_vs_baseline"))
        for ref in meta.get("references", []):
            lines += _paired_table(s, ref, lambda e, ref=ref: e.get("paired", {}).get(ref))
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], methods: Sequence[str], path_for) -> list[Path]:
    """Per suite: mean training reward curves per method, and each method's final samples (first seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for suite in dict.fromkeys(r["suite"] for r in results):
        rs = [r for r in results if r["suite"] == suite]
        names = list(rs[0]["reward_start"])
        ms = [m for m in methods if any(r["method"] == m for r in rs)]
        fig = plt.figure(figsize=(3.2 * max(len(names), len(ms)), 6.4))
        grid = fig.add_gridspec(2, max(len(names), len(ms)))
        for i, k in enumerate(names):
            ax = fig.add_subplot(grid[0, i])
            for m in ms:
                curves = np.array(
                    [[np.nan if v is None else v for v in r["curves"][k]] for r in rs if r["method"] == m], dtype=float
                )
                mean = np.nanmean(curves, axis=0)
                w = max(1, len(mean) // 20)
                smooth = np.convolve(mean, np.ones(w) / w, mode="valid")
                ax.plot(np.arange(len(smooth)) + w, smooth, label=m)
            ax.set_title(k, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            if i == 0:
                ax.legend(fontsize=7)
        for j, m in enumerate(ms):
            ax = fig.add_subplot(grid[1, j])
            r = next(r for r in rs if r["method"] == m and r["samples_end"] is not None)
            imgs = np.asarray(r["samples_end"], dtype=np.float32)
            labels = np.asarray(r["labels_end"])
            per = 4
            rows = [np.pad(imgs[labels == d][:per], ((0, 0), (1, 1), (1, 1))) for d in range(10)]  # 1 px gaps
            canvas = np.concatenate([np.concatenate(list(row), axis=1) for row in rows], axis=0)
            ax.imshow(canvas, cmap="gray_r", vmin=0, vmax=1)
            ax.set_title(f"{m} (seed {r['seed']})", fontsize=9)
            ax.axis("off")
        fig.suptitle(f"digits, suite {suite}: training reward (mean over seeds) and final samples")
        fig.tight_layout()
        path = path_for(suite)
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)
    return paths


def choose_lr(results: list[dict[str, Any]], lrs: Sequence[float], max_judge_drop: float = 0.05):
    """``--lr-sweep``'s choice: the lr with the largest mean reward change (over suites, seeds and
    rewards, each in units of the reward's sd over the pretrained model's held-out samples) among
    the lrs whose mean judge accuracy drops by at most ``max_judge_drop`` (all lrs if none does).

    Returns ``(best lr, {lr: {"score", "judge_drop", "eligible"}})``.
    """
    scores: dict[float, dict[str, Any]] = {}
    for lr in lrs:
        rs = [r for r in results if r["lr"] == lr]
        z = [
            (r["reward_end"][k] - r["reward_start"][k]) / (r["reward_sd_start"][k] + 1e-6)
            for r in rs
            for k in r["reward_start"]
        ]
        judge_drop = float(np.mean([r["judge_start"] - r["judge_end"] for r in rs]))
        scores[lr] = {"score": float(np.mean(z)), "judge_drop": judge_drop, "eligible": judge_drop <= max_judge_drop}
    eligible = [lr for lr in lrs if scores[lr]["eligible"]] or list(lrs)
    return max(eligible, key=lambda lr: scores[lr]["score"]), scores


# ---- command line ------------------------------------------------------------------------------------
def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME=JSON`` → (name, MarbleOptimizer keyword arguments)."""
    name, sep, options = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=JSON, got {text!r}")
    try:
        return name, _import_train().json_object(options)  # the example's own JSON-object check
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{name}: {exc}") from exc


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a few steps, small batches, 2 seeds, 3 methods (tests)")
    p.add_argument("--methods", nargs="+", choices=tuple(METHODS), help=f"default: all of {list(METHODS)}")
    p.add_argument(
        "--marble-variant",
        action="append",
        type=parse_variant,
        default=[],
        metavar="NAME=JSON",
        help="an extra MARBLE method: MarbleOptimizer options as JSON ('gram' sets --gram, default shared), "
        'e.g. \'cross={"gram": "exact", "gram_estimator": "cross"}\'',
    )
    p.add_argument("--suites", nargs="+", choices=SUITES, default=list(SUITES))
    p.add_argument(
        "--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="RL seeds (pretrained model = seed %% 2)"
    )
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=20, help="steps between conflict measurements")
    p.add_argument(
        "--lr", type=float, help=f"default: the recorded --lr-sweep choice ({LR_RECORD.name}), else {DEFAULT_LR}"
    )
    p.add_argument(
        "--lr-sweep", nargs="+", type=float, metavar="LR", help="run weighted-sum at these lrs and record the best"
    )
    p.add_argument("--jobs", type=int, default=1, help="worker processes (one torch thread each)")
    p.add_argument("--out-dir", default=str(RESULTS))
    p.add_argument("--name", help="file name stem (default diffusion_rl, diffusion_rl_quick with --quick)")
    p.add_argument(
        "--reference",
        action="append",
        default=[],
        metavar="METHOD",
        help=f"also tabulate every method's paired difference to METHOD (besides {BASELINE})",
    )
    p.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        help="run nothing: summarise the runs of these result files (of earlier invocations on the same "
        "machine; a run present in two files must be identical in both) into --name's files",
    )
    args = p.parse_args(argv)
    given = list(argv) if argv is not None else sys.argv[1:]
    if args.merge:
        return merge_results(args, given)

    extra_argv: list[str] = []
    if args.quick:
        args.steps, args.eval_every = 4, 2
        args.seeds = args.seeds if "--seeds" in given else [0, 1]
        args.suites = args.suites if "--suites" in given else ["mismatch"]
        args.methods = args.methods or ["weighted-sum", "equal-alpha", "marble"]
        extra_argv = ["--prompts-per-step", "4", "--group-size", "4", "--sample-batch-size", "16", "--train-batch-size", "16", "--grid-images-per-prompt", "5"]  # fmt: skip
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.name or ("diffusion_rl_quick" if args.quick else "diffusion_rl")
    base = {"steps": args.steps, "eval_every": args.eval_every, "extra_argv": extra_argv}
    t_start = time.perf_counter()

    if args.lr_sweep:
        tasks = [
            {**base, "method": BASELINE, "spec": METHODS[BASELINE], "suite": su, "seed": s, "lr": lr}
            for lr in args.lr_sweep
            for su in args.suites
            for s in args.seeds
        ]
        results = run_tasks(tasks, args.jobs)
        best, scores = choose_lr(results, args.lr_sweep)
        record = {
            "lr": best,
            "method": BASELINE,
            "criterion": "largest mean (over suites, seeds and rewards) reward change in units of the reward's sd "
            "over the pretrained model's held-out samples, among lrs whose judge accuracy drops by <= 0.05",
            "scores": {repr(k): v for k, v in scores.items()},
            "suites": args.suites,
            "seeds": args.seeds,
            "steps": args.steps,
        }
        path = out_dir / (f"{stem}_lr.json" if args.name or args.quick else LR_RECORD.name)
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(json.dumps(record, indent=2))
        return 0

    if args.lr is not None:
        lr, lr_source = args.lr, "given"
    elif LR_RECORD.is_file() and not args.quick:
        lr, lr_source = float(json.loads(LR_RECORD.read_text())["lr"]), f"chosen for {BASELINE} by --lr-sweep"
    else:
        lr, lr_source = DEFAULT_LR, "default; no --lr-sweep record"
    specs = {m: METHODS[m] for m in (args.methods or METHODS)}
    for name, options in args.marble_variant:
        specs[name] = {"combine": "marble", "gram": options.pop("gram", "shared"), "marble_options": options}
    methods = list(specs)
    tasks = [
        {**base, "method": m, "spec": specs[m], "suite": su, "seed": s, "lr": lr, "keep_samples": s == args.seeds[0]}
        for su in args.suites
        for s in args.seeds
        for m in methods
    ]
    results = run_tasks(tasks, args.jobs)
    summary = summarise(results, methods, args.reference)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _common import environment_line

    meta = {
        "command": "python benchmarks/diffusion_rl.py " + " ".join(given),
        "steps": args.steps,
        "lr": lr,
        "lr_source": lr_source,
        "seeds": args.seeds,
        "eval_every": args.eval_every,
        "methods": specs,
        "wall_seconds": time.perf_counter() - t_start,
        "jobs": args.jobs,
        "environment": environment_line(),
        "references": args.reference,
    }
    text = markdown(summary, meta)
    text += f"\nWall time {meta['wall_seconds']:.0f} s with --jobs {args.jobs}.\n"
    (out_dir / f"{stem}.md").write_text(text)
    light = [{k: v for k, v in r.items() if k not in ("samples_end", "labels_end")} for r in results]
    (out_dir / f"{stem}.json").write_text(
        json.dumps({"meta": meta, "summary": summary, "runs": light}, indent=1) + "\n"
    )
    plot(results, methods, lambda suite: out_dir / f"{stem}_{suite}.png")
    print(text)
    return 0


def merge_results(args: argparse.Namespace, given: Sequence[str]) -> int:
    """``--merge``: one summary of the runs of several result files (no plot: they keep no samples)."""
    runs: dict[tuple[str, str, int], dict[str, Any]] = {}
    metas = []
    deterministic = ("reward_start", "reward_end", "judge_end", "curves", "lr", "steps")
    for path in args.merge:
        data = json.loads(Path(path).read_text())
        metas.append(data["meta"])
        for r in data["runs"]:
            key = (r["method"], r["suite"], r["seed"])
            if key in runs and any(runs[key][f] != r[f] for f in deterministic):
                raise SystemExit(f"--merge: run {key} differs between the files; they are not one machine's runs")
            runs.setdefault(key, r)
    for field in ("steps", "lr", "eval_every"):
        values = {json.dumps(m[field]) for m in metas}
        if len(values) > 1:
            raise SystemExit(f"--merge: the files' {field} differ ({sorted(values)}); merge runs of one grid only")
    results = [
        r for r in runs.values() if r["suite"] in args.suites and r["seed"] in args.seeds and
        (not args.methods or r["method"] in args.methods)
    ]  # fmt: skip
    methods = list(dict.fromkeys(args.methods or [r["method"] for r in results]))
    summary = summarise(results, methods, args.reference)
    meta = {
        **{k: metas[0][k] for k in ("steps", "lr", "lr_source", "eval_every", "environment")},
        "command": "python benchmarks/diffusion_rl.py " + " ".join(given),
        "seeds": sorted({r["seed"] for r in results}),
        "methods": {m: spec for meta in metas for m, spec in meta["methods"].items() if m in methods},
        "sources": [
            {"file": Path(f).name, "command": m["command"], "wall_seconds": m["wall_seconds"]}
            for f, m in zip(args.merge, metas)
        ],  # fmt: skip
        "references": args.reference,
    }
    text = markdown(summary, meta)
    text += (
        "\nRuns from: " + "; ".join(f"`{s['command']}` ({s['wall_seconds']:.0f} s)" for s in meta["sources"]) + ".\n"
    )
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.name or "diffusion_rl_merged"
    (out_dir / f"{stem}.md").write_text(text)
    (out_dir / f"{stem}.json").write_text(
        json.dumps({"meta": meta, "summary": summary, "runs": results}, indent=1) + "\n"
    )
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
