"""A two-head model trained with ``accelerate`` and ``marble_opt.Balancer`` (CPU, a few seconds).

The training loop is an ordinary accelerate loop; the Balancer only turns the dict of losses
into per-loss weights, and the loop backwards their weighted sum itself::

    w = bal.weights(losses)                                  # {name: float}
    if not bal.report.skipped:
        accelerator.backward(bal.weighted_loss(losses, w))   # Σ_k w_k L_k
        optimizer.step()
        bal.step()                                           # MARBLE's EMA advances
    optimizer.zero_grad()

The data are synthetic (a regression target and a 3-class label computed from the inputs),
so nothing is downloaded. Run::

    python examples/balancer_accelerate.py            # per-step losses and weights
    python examples/balancer_accelerate.py --check    # and the same loop with MarbleOptimizer.step(losses)

``--check`` trains a second copy of the model, from the same initial weights and on the same
batches, with ``MarbleOptimizer(torch.optim.AdamW(...)).step(losses)`` and no accelerate, and
prints how far its final parameters are from the Balancer run's (``gram="exact"``: float
rounding only, the Balancer's gradient comes from one more backward instead of from the
per-objective gradients the optimizer already holds). ``--json PATH`` writes every number.
"""

from __future__ import annotations

import argparse
import json
import math

import torch
from accelerate import Accelerator
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from marble_opt import Balancer, MarbleOptimizer

LR = 1e-2


class TwoHeads(nn.Module):
    """A shared MLP trunk with a regression head and a 3-class classification head."""

    def __init__(self, d_in: int = 8, width: int = 32, classes: int = 3) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(d_in, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh())
        self.reg = nn.Linear(width, 1)
        self.cls = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(x)
        return self.reg(h).squeeze(-1), self.cls(h)


def synthetic_data(n: int = 512, d_in: int = 8, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    a = torch.randn(d_in, generator=g)
    y_reg = torch.tanh(x @ a / math.sqrt(d_in)) + 0.1 * torch.randn(n, generator=g)
    y_cls = (x @ torch.randn(d_in, 3, generator=g)).argmax(dim=1)
    return TensorDataset(x, y_reg, y_cls)


def compute_losses(model: nn.Module, x: torch.Tensor, y_reg: torch.Tensor, y_cls: torch.Tensor) -> dict:
    pred, logits = model(x)
    return {"regression": F.mse_loss(pred, y_reg), "classification": F.cross_entropy(logits, y_cls)}


def fresh_model(seed: int) -> TwoHeads:
    torch.manual_seed(seed)
    return TwoHeads()


def train_with_balancer(args: argparse.Namespace) -> tuple[TwoHeads, list[dict]]:
    # --8<-- [start:loop]
    accelerator = Accelerator(cpu=True)
    model = fresh_model(args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    loader = DataLoader(synthetic_data(seed=args.seed), batch_size=args.batch_size, shuffle=False)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    bal = Balancer(model.parameters(), gram=args.gram, ema_decay=0.7)

    log = []
    for epoch in range(args.epochs):
        for x, y_reg, y_cls in loader:
            losses = compute_losses(model, x, y_reg, y_cls)
            w = bal.weights(losses)
            if not bal.report.skipped:
                accelerator.backward(bal.weighted_loss(losses, w))
                optimizer.step()
                bal.step()
            optimizer.zero_grad()
            # --8<-- [end:loop]
            entry = {"step": len(log), "losses": bal.report.losses, "weights": w, "skipped": bal.report.skipped}
            log.append(entry)
            losses_text = "  ".join(f"{k}={v:.4f}" for k, v in entry["losses"].items())
            weights_text = "  ".join(f"{k}={v:.3f}" for k, v in w.items())
            print(f"epoch {epoch} step {entry['step']:3d}  loss: {losses_text}  weights: {weights_text}")
    return accelerator.unwrap_model(model), log


def train_with_marble_optimizer(args: argparse.Namespace) -> TwoHeads:
    """The same loop with ``MarbleOptimizer.step(losses)``: same initial weights, same batches."""
    model = fresh_model(args.seed)
    opt = MarbleOptimizer(torch.optim.AdamW(model.parameters(), lr=LR), gram=args.gram, ema_decay=0.7)
    loader = DataLoader(synthetic_data(seed=args.seed), batch_size=args.batch_size, shuffle=False)
    for _ in range(args.epochs):
        for x, y_reg, y_cls in loader:
            opt.step(compute_losses(model, x, y_reg, y_cls))
            opt.zero_grad()
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--gram", default="exact", choices=["exact", "exact-lean"], help="the Gram source")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", action="store_true", help="compare with a MarbleOptimizer run of the same loop")
    parser.add_argument("--json", help="write the per-step losses and weights (and the check) to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    model, log = train_with_balancer(args)
    first, last = log[0]["losses"], log[-1]["losses"]
    print("final: " + ", ".join(f"{k} {first[k]:.4f} -> {last[k]:.4f}" for k in first))
    out: dict = {"log": log}
    if args.check:
        reference = train_with_marble_optimizer(args)
        pairs = [(p.detach(), q.detach()) for p, q in zip(model.parameters(), reference.parameters())]
        max_diff = max(float((p - q).abs().max()) for p, q in pairs)
        max_rel = max(float((p - q).norm() / q.norm()) for p, q in pairs)
        identical = all(torch.equal(p, q) for p, q in pairs)
        out["check"] = {"max_abs_diff": max_diff, "max_rel_diff": max_rel, "bit_identical": identical}
        out["params"] = [p.flatten().tolist() for p, _ in pairs]
        out["reference_params"] = [q.flatten().tolist() for _, q in pairs]
        print(f"check: against MarbleOptimizer.step(losses), max |Δθ| = {max_diff:.3g}, bit-identical: {identical}")
        if not math.isfinite(max_rel) or max_rel > 1e-4:
            print("check FAILED: the Balancer loop did not train as MarbleOptimizer does")
            return 1
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
