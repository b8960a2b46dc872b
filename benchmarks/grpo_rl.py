"""Multi-reward GRPO on the CPU language-model test bed: weighted-sum vs GDPO vs MARBLE.

    python benchmarks/grpo_rl.py --seeds 0 1 2 3 4 --max-steps 30      # the grid
    python benchmarks/grpo_rl.py --quick                                # a smoke run (tests)

Every method trains the shipped model (examples/grpo_marble) with the same rollout budget
(steps × prompts × generations) and learning rate, once per seed. Per reward: the change of the
reward's mean on sampled completions of the held-out judge prompts (after - before), mean ± sd
over seeds; the paired difference to GDPO with a one-sided paired t-test (greater is better) and
how many seeds are better; the judge's held-out greedy exact-match accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "grpo_marble"))
import task  # noqa: E402


def _load_train():
    """examples/grpo_marble/train.py under its own module name (the diffusion example's
    ``train`` may be imported in the same process)."""
    import importlib.util

    name = "grpo_marble_train"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / "grpo_marble" / "train.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


train = _load_train()

METHODS = ("weighted-sum", "gdpo", "marble")
KEYS = ("judge", *(f"reward/{n}" for n in task.REWARD_NAMES))


def run(method: str, seed: int, steps: int, lr: float, out: Path, extra: list[str]) -> dict:
    argv = [
        "--combine",
        method,
        "--seed",
        str(seed),
        "--max-steps",
        str(steps),
        "--lr",
        str(lr),
        "--output-dir",
        str(out / f"{method}_s{seed}"),
        *extra,
    ]
    s = train.main(argv)
    return {k: s["after"][k] - s["before"][k] for k in KEYS} | {"judge_after": s["after"]["judge"]}


def table(results: dict[str, list[dict]], seeds: list[int]) -> tuple[str, dict]:
    from scipy.stats import ttest_rel

    lines = ["| method | " + " | ".join(f"Δ {k}" for k in KEYS) + " | judge after |", "|---" * (len(KEYS) + 2) + "|"]
    stats: dict = {}
    for m, rows in results.items():
        cells = []
        for k in KEYS:
            v = np.array([r[k] for r in rows])
            cell = f"{v.mean():+.3f} ± {v.std(ddof=1) if len(v) > 1 else 0:.3f}"
            if m != "gdpo" and "gdpo" in results:
                g = np.array([r[k] for r in results["gdpo"]])
                d = v - g
                p = float(ttest_rel(v, g, alternative="greater").pvalue) if len(v) > 1 and d.std() > 0 else float("nan")
                cell += f" (vs GDPO {d.mean():+.3f}, p={p:.2f}, {int((d > 0).sum())}/{len(d)})"
                stats.setdefault(m, {})[k] = {"diff": float(d.mean()), "p": p, "better": int((d > 0).sum())}
            cells.append(cell)
        ja = np.array([r["judge_after"] for r in rows])
        lines.append(
            f"| {m} | " + " | ".join(cells) + f" | {ja.mean():.3f} ± {ja.std(ddof=1) if len(ja) > 1 else 0:.3f} |"
        )
    return "\n".join(lines), stats


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--max-steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "grpo_rl"))
    ap.add_argument("--workdir", default="/tmp/grpo_rl_runs")
    ap.add_argument("--quick", action="store_true", help="2 seeds, 2 steps, small batches (a smoke run)")
    args = ap.parse_args(argv)
    extra: list[str] = ["--threads", "1"]
    if args.quick:
        args.seeds, args.max_steps = [0, 1], 2
        extra += ["--prompts-per-step", "4", "--num-generations", "4", "--eval-samples", "1"]
    results = {
        m: [run(m, s, args.max_steps, args.lr, Path(args.workdir), extra) for s in args.seeds] for m in args.methods
    }
    md, stats = table(results, args.seeds)
    payload = {
        "seeds": args.seeds,
        "max_steps": args.max_steps,
        "lr": args.lr,
        "quick": args.quick,
        "results": results,
        "vs_gdpo": stats,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(payload, indent=1))
    Path(args.out + ".md").write_text(
        f"# GRPO test bed: seeds {args.seeds}, {args.max_steps} steps, lr {args.lr}\n\n{md}\n"
    )
    print(md)
    return payload


if __name__ == "__main__":
    main()
