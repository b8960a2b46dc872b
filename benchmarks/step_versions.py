"""The cost of a step with this checkout's ``MarbleOptimizer`` against earlier versions of it.

Each ``--refs`` commit's ``src/marble_opt`` is taken with ``git archive`` into a temporary
directory and imported under another name, next to this checkout's package, in the same
process; every version gets its own copy of the same model, and the baseline and all versions
are stepped interleaved (order rotated and reversed every round), so the machine's drift hits
them alike. Timed by the CPU time of the (single) torch thread; medians over the rounds. The
last column says whether this checkout's parameters after the run equal, bit for bit, those
of the first ref (same batches, same number of steps).

Cases (``--cases``, ``MODEL:SOURCE``): ``mlp6`` and ``mlp4`` are ``step_overhead.py``'s small
MLPs (6 layers D=384 batch 128 K=5; 4 layers D=512 batch 64 K=4), ``tf`` its transformer
(d=128, 32 tokens) at K=5; the source is any ``gram=``. ``exact``/``exact-lean`` are timed
against K plain backward passes, the other sources against plain AdamW on the summed loss;
``params`` measures G on the trunk's last linear layer (MLPs) or last norm layer (transformer).

    python benchmarks/step_versions.py --refs 34b8e68 24b6383           # the default cases
    python benchmarks/step_versions.py --refs HEAD~1 --cases mlp4:exact --rounds 60
"""

from __future__ import annotations

import argparse
import copy
import importlib
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from types import ModuleType

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_overhead import (  # noqa: E402
    FULL,
    MLP_CASES,
    MLP_QUICK,
    QUICK,
    Mlp,
    Model,
    adamw,
    k_backward,
    make_batches,
    mlp_batches,
    plain,
)

import marble_opt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CASES = ("mlp6:shared", "mlp6:params", "mlp4:exact", "mlp4:exact-lean", "tf:shared", "tf:exact", "tf:params")
#: The MLP models by name: (step_overhead.py's case, its --quick twin).
MLPS = {"mlp6": (MLP_CASES[0], MLP_QUICK[0]), "mlp4": (MLP_CASES[1], MLP_QUICK[1])}


def load_version(ref: str, into: Path) -> ModuleType:
    """``src/marble_opt`` at git ``ref``, imported as ``marble_opt_<sha>`` (internal imports are relative)."""
    sha = subprocess.run(["git", "rev-parse", "--short", ref], cwd=ROOT, check=True, capture_output=True, text=True)
    name = f"marble_opt_{sha.stdout.strip()}"
    if name not in sys.modules:
        tar = subprocess.run(["git", "archive", ref, "src/marble_opt"], cwd=ROOT, check=True, capture_output=True)
        with tarfile.open(fileobj=BytesIO(tar.stdout)) as archive:
            if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4
                archive.extractall(into / "extract", filter="data")
            else:  # pragma: no cover - an archive git just wrote
                archive.extractall(into / "extract")
        (into / "extract" / "src" / "marble_opt").rename(into / name)
        if str(into) not in sys.path:
            sys.path.insert(0, str(into))
    return importlib.import_module(name)


def build_case(model_name: str, quick: bool):
    """(model, 4 batches, params_for_gram(model)) of a case."""
    torch.manual_seed(0)
    if model_name == "tf":
        cfg = QUICK if quick else FULL
        k = 3 if quick else 5
        return (
            Model(cfg, k),
            make_batches(cfg, k, 4, torch.device("cpu"), 1),
            lambda m: list(m.trunk.layers[-1].norm2.parameters()),
        )
    if model_name not in ("mlp6", "mlp4"):
        raise ValueError(f"unknown model {model_name!r} in --cases: use mlp6, mlp4 or tf")
    case = MLPS[model_name][quick]
    return Mlp(case), mlp_batches(case, torch.device("cpu"), 1), lambda m: list(m.trunk[-2].parameters())


def marble_step(package: ModuleType, model: torch.nn.Module, gram: str, gram_params) -> Callable:
    kwargs = {"gram_params": gram_params(model)} if gram == "params" else {}
    opt = package.MarbleOptimizer(adamw(model.parameters()), gram=gram, **kwargs)

    def step(batch):
        z, losses = model(*batch)
        opt.zero_grad(set_to_none=True)
        opt.step(losses, shared=z if gram == "shared" else None)

    return step


def time_case(spec: str, versions: dict[str, ModuleType], rounds: int, quick: bool) -> dict:
    model_name, _, gram = spec.partition(":")
    base, batches, gram_params = build_case(model_name, quick)
    baseline = k_backward if gram.startswith("exact") else plain
    models = {name: copy.deepcopy(base) for name in ("baseline", *versions)}
    steps = {"baseline": baseline(models["baseline"])}
    steps |= {name: marble_step(pkg, models[name], gram, gram_params) for name, pkg in versions.items()}
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    done = dict.fromkeys(names, 0)
    warmup = 1 if quick else 3
    for r in range(warmup + rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        if r % 2:
            order.reverse()
        for n in order:
            t0 = time.thread_time()
            steps[n](batches[done[n] % len(batches)])
            elapsed = time.thread_time() - t0
            done[n] += 1
            if r >= warmup:
                times[n].append(elapsed)
    base_ms = statistics.median(times["baseline"])
    first_ref = names[1]
    identical = all(
        torch.equal(a, b) for a, b in zip(models[first_ref].parameters(), models["this checkout"].parameters())
    )
    return {
        "case": spec,
        "baseline": "K backward passes" if gram.startswith("exact") else "plain AdamW (Σ L_k)",
        "baseline_ms": 1e3 * base_ms,
        "ratios": {n: statistics.median(times[n]) / base_ms for n in names[1:]},
        "identical": identical,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--refs", nargs="+", required=True, help="git commits to compare this checkout with")
    parser.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), help="MODEL:SOURCE, MODEL in mlp6, mlp4, tf")
    parser.add_argument("--rounds", type=int, help="timed rounds per case (default 40; quick: 2)")
    parser.add_argument("--quick", action="store_true", help="tiny models, 2 rounds (the test suite's run)")
    parser.add_argument("--out", type=Path, help="also write the Markdown table to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rounds = args.rounds or (2 if args.quick else 40)
    with tempfile.TemporaryDirectory() as tmp:
        versions = {ref: load_version(ref, Path(tmp)) for ref in args.refs}
        versions["this checkout"] = marble_opt
        rows = [time_case(spec, versions, rounds, args.quick) for spec in args.cases]
    header = ["case", "baseline (ms)", *versions, f"parameters identical to {args.refs[0]}"]
    lines = [
        "### Step cost by version",
        "",
        f"`python benchmarks/step_versions.py --refs {' '.join(args.refs)}"
        + (f" --cases {' '.join(args.cases)}" if args.cases != list(DEFAULT_CASES) else "")
        + (" --quick" if args.quick else "")
        + (f" --rounds {args.rounds}" if args.rounds else "")
        + f"`: ratio to the baseline step, median of {rounds} interleaved rounds, CPU time of one torch thread.",
        "",
        "| " + " | ".join(header) + " |",
        "| :--- | ---: | " + " | ".join("---:" for _ in versions) + " | :---: |",
    ]
    for row in rows:
        cells = [f"{row['ratios'][n]:.3f}×" for n in versions]
        lines.append(
            f"| {row['case']} | {row['baseline']}, {row['baseline_ms']:.1f} | "
            + " | ".join(cells)
            + f" | {'yes' if row['identical'] else 'no'} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
