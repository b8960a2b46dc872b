"""The cost of a ``Balancer`` step against ``MarbleOptimizer.step(losses)``, both ``gram="exact"``.

``MarbleOptimizer`` with the exact source runs K backward passes (one per objective, the graph
kept between them) and writes the update ``wᵀ·rows`` from the gradients it already holds. A
``Balancer`` runs the same K passes inside ``weights()``, but the caller then backwards
``weighted_loss(losses, w)``: one more backward pass, K+1 in all, as with ``gram="exact-lean"``.

Methods, timed interleaved (order rotated each round) on ``step_overhead.py``'s 4-layer MLP
(D=512, batch 64, K=4, about 1 M parameters; ``--quick``: D=32, batch 8, K=2), AdamW, one torch thread, wall time
of whole steps (forward included), medians over ``--repeats`` rounds:

- ``K backward passes``: forward, K ``backward`` calls, AdamW step (what G alone costs);
- ``MarbleOptimizer exact``: ``opt.step(losses)``;
- ``Balancer exact``: ``w = bal.weights(losses)``, ``bal.weighted_loss(losses, w).backward()``,
  AdamW step, ``bal.step()``;
- ``MarbleOptimizer exact-lean``: ``opt.step(losses)`` with K+1 passes, for comparison.

    python benchmarks/balancer_cost.py                       # the table, and the ratio Balancer / MarbleOptimizer
    python benchmarks/balancer_cost.py --batch 2048          # a step the backward passes dominate
    python benchmarks/balancer_cost.py --quick --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Samples, environment_line, fmt_time, markdown_table, rotated, setup_torch, time_call, write_json  # noqa: E402
from step_overhead import MLP_CASES, MLP_QUICK, Mlp, k_backward, mlp_batches  # noqa: E402

from marble_opt import Balancer, MarbleOptimizer  # noqa: E402

METHODS = ("K backward passes", "MarbleOptimizer exact", "Balancer exact", "MarbleOptimizer exact-lean")


def _adamw(model: Mlp) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=1e-4)


def make_step(method: str, model: Mlp):
    if method == "K backward passes":
        return k_backward(model)
    if method.startswith("MarbleOptimizer"):
        opt = MarbleOptimizer(_adamw(model), gram=method.split()[-1])

        def step(batch):
            _, losses = model(*batch)
            opt.zero_grad()
            opt.step(losses)

        return step
    inner = _adamw(model)
    bal = Balancer(model.parameters(), gram="exact")

    def step(batch):
        _, losses = model(*batch)
        inner.zero_grad()
        w = bal.weights(losses)
        if not bal.report.skipped:
            bal.weighted_loss(losses, w).backward()
            inner.step()
            bal.step()

    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model and a few repeats (the test suite)")
    parser.add_argument("--repeats", type=int, default=None, help="rounds of interleaved steps (default 30, quick 3)")
    parser.add_argument("--batch", type=int, default=None, help="the batch size (default 64, quick 8)")
    parser.add_argument("--json", help="write the raw medians and ratios here")
    args = parser.parse_args(argv)
    setup_torch(1)
    case = (MLP_QUICK if args.quick else MLP_CASES)[1]
    if args.batch is not None:
        case = dataclasses.replace(
            case, batch=args.batch, label=case.label.replace(f"batch {case.batch}", f"batch {args.batch}")
        )
    repeats = args.repeats or (3 if args.quick else 30)
    batches = mlp_batches(case, torch.device("cpu"), seed=0)
    steps = {}
    for method in METHODS:
        torch.manual_seed(0)
        model = Mlp(case)
        steps[method] = make_step(method, model)
        for batch in batches[:2]:  # warm-up: buffers, the QP's caches
            steps[method](batch)
    samples = Samples()
    for r in range(repeats):
        for method in rotated(METHODS, r):
            seconds, _ = time_call(lambda: steps[method](batches[r % len(batches)]))  # noqa: B023
            samples.add(method, seconds)
    base = "MarbleOptimizer exact"
    rows = [
        [m, fmt_time(samples.median(m)), f"{samples.ratio(m, METHODS[0]):.2f}×", f"{samples.ratio(m, base):.2f}×"]
        for m in METHODS
    ]
    print(f"{case.label}, AdamW, medians of {repeats} interleaved steps; {environment_line()}\n")
    print(markdown_table(["method", "median step", "× K backward passes", "× MarbleOptimizer exact"], rows))
    ratio = samples.ratio("Balancer exact", base)
    print(f"\nBalancer exact / MarbleOptimizer exact = {ratio:.2f}")
    write_json(
        args.json,
        {
            "case": case.label,
            "repeats": repeats,
            "median_s": {m: samples.median(m) for m in METHODS},
            "ratio_balancer_to_optimizer": ratio,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
