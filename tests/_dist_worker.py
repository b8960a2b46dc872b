"""One small multi-objective training recipe, run on 2 gloo ranks or on one process.

``tests/test_distributed.py`` starts ``python tests/_dist_worker.py RANK WORLD PORT OUTDIR [names]`` twice
(ranks 0 and 1 on 127.0.0.1); each rank runs every scenario of ``SCENARIOS`` on its half of each
global batch (with ``names``: only ``name_checks``, ranks passing different loss keys) and saves
what it saw to ``OUTDIR/rank{RANK}.pt``. The test runs ``train(name)``
in its own process on the whole batch (the reference) and compares.

A scenario's ``nan_loss`` / ``nan_grad`` = (step, micro-batch) makes one loss non-finite /
poisons the gradient of the combined backward (below the shared tensor, so G stays finite) on
rank 1 only; in the reference the whole batch is affected, so one process skips that step too.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from contextlib import nullcontext
from datetime import timedelta
from typing import Any

import torch
from torch import nn

from marble_opt import Balancer, MarbleOptimizer

B_LOCAL = 4  # samples per rank and micro-batch
WORLD = 2
NAN = float("nan")
PG_TIMEOUT_S = 30  # process-group timeout: a hang fails fast

SCENARIOS: dict[str, dict[str, Any]] = {
    "exact": dict(gram="exact", steps=3),
    "exact-nan-loss": dict(gram="exact", steps=3, nan_loss=(1, 0)),
    "exact-nan-grad": dict(gram="exact", steps=3, nan_grad=(1, 0)),
    "exact-ddp-extra": dict(gram="exact", ddp=True, steps=4, extra=True),
    # rank 1 builds its loss dict in another order (a dict from a set): same result as one process
    "exact-reordered": dict(gram="exact", steps=3, reorder=True),
    "shared-ddp-reordered": dict(gram="shared", ddp=True, steps=3, reorder=True),
    "exact-ddp-accum": dict(gram="exact", ddp=True, steps=3, micro=2),
    # solve steps bypass DDP's reducer, cached steps (an ordinary backward) go through it
    "exact-ddp-refresh": dict(gram="exact", ddp=True, steps=4, refresh_every=2),
    "exact-lean-ddp": dict(gram="exact-lean", ddp=True, steps=3),
    "shared-ddp": dict(gram="shared", ddp=True, steps=3),
    # ĝ = g / L: the scales need the whole batch's losses (the mean over ranks)
    "shared-ddp-loss-norm": dict(gram="shared", ddp=True, steps=3, normalize="loss"),
    "shared-ddp-nan-loss": dict(gram="shared", ddp=True, steps=3, nan_loss=(1, 0)),
    "shared-ddp-nan-grad": dict(gram="shared", ddp=True, steps=3, nan_grad=(1, 0)),
    # rank 1's first micro-batch (under no_sync) has a non-finite combined gradient that no
    # all-reduce carries to rank 0: only the agreement flag makes rank 0 skip as well.
    "shared-ddp-accum-nan": dict(gram="shared", ddp=True, steps=3, micro=2, nan_grad=(0, 0)),
    "params-ddp-refresh": dict(gram="params", ddp=True, steps=4, refresh_every=2),
    # an explicit process group (a new group of all ranks) instead of the default one
    "shared-ddp-group": dict(gram="shared", ddp=True, steps=2, process_group="new"),
    # process_group=False: no communication, each rank balances its own half (no reference)
    "exact-local": dict(gram="exact", steps=2, process_group=False),
    # through accelerate.prepare: positional opt.step(losses), and accumulate() over 2 micro-batches
    "accelerate-step-losses": dict(gram="params", accelerate="step", steps=3),
    "accelerate-accum": dict(gram="shared", accelerate="accumulate", steps=3, micro=2),
    # the cross-batch Gram: halves are local (even / odd samples), each half's gradients
    # averaged over ranks, so it equals one process whose halves are the union of them
    "exact-cross-ddp": dict(gram="exact", ddp=True, steps=3, estimator="cross"),
    "params-cross-ddp-refresh": dict(gram="params", ddp=True, steps=4, refresh_every=2, estimator="cross"),
    # a Balancer loop (weights → the caller's backward of the weighted loss through DDP → SGD
    # step → bal.step()): the same contract as MarbleOptimizer's
    "balancer-exact-ddp": dict(gram="exact", ddp=True, steps=3, balancer=True),
    "balancer-exact-ddp-nan-loss": dict(gram="exact", ddp=True, steps=3, nan_loss=(1, 0), balancer=True),
    "balancer-shared-ddp-accum": dict(gram="shared", ddp=True, steps=3, micro=2, balancer=True),
    "balancer-params-ddp-refresh": dict(gram="params", ddp=True, steps=4, refresh_every=2, balancer=True),
}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, nan_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        u = self.inp(x)
        if nan_grad:
            u.register_hook(lambda g: g * NAN)
        h = torch.tanh(u)  # the shared tensor
        return h, self.out(h)


def per_sample_losses_of(out: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Three conflicting objectives of different scales, one value per sample (B,)."""
    return {
        "a": (out[:, 0] - y[:, 0]) ** 2,
        "b": (out[:, 1] - y[:, 1]) ** 2 + 0.5 * (out[:, 0] + y[:, 0]) ** 2,
        "c": 0.1 * (out[:, 2] - y[:, 2]) ** 2 + 0.3 * (out[:, 0] - out[:, 1]) ** 2,
    }


def losses_of(out: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same objectives, each a mean over the batch."""
    return {name: value.mean() for name, value in per_sample_losses_of(out, y).items()}


def global_batch(step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + 10 * step + micro)
    return torch.randn(WORLD * B_LOCAL, 4, generator=g), torch.randn(WORLD * B_LOCAL, 3, generator=g)


def flat_params(net: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()]).clone()


def train(name: str, rank: int = 0, world: int = 1, accelerator: Any = None) -> dict[str, Any]:
    """Run scenario ``name``; ``world=1``: the reference on the whole batch, no DDP."""
    cfg = SCENARIOS[name]
    torch.manual_seed(0)
    net = Net()
    gram = cfg["gram"]
    distributed = world > 1
    group = cfg.get("process_group")
    if group == "new":
        import torch.distributed as dist

        group = dist.new_group(list(range(world))) if distributed else None
    options = dict(
        gram=gram,
        ema_decay=0.7,
        normalize=cfg.get("normalize", "l2"),
        refresh_every=cfg.get("refresh_every", 1),
        gram_params=[net.out.weight, net.out.bias] if gram == "params" else None,
        gram_estimator=cfg.get("estimator", "batch"),
        process_group=group,
    )
    if cfg.get("balancer"):
        return train_balancer(cfg, net, options, rank, world)
    marble = MarbleOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), **options)
    model: nn.Module = net
    opt: Any = marble
    driver = cfg.get("accelerate") if distributed else None
    if driver:
        model, opt = accelerator.prepare(net, marble)
        assert isinstance(model, nn.parallel.DistributedDataParallel), type(model)
        assert opt.optimizer is marble and opt is not marble, type(opt)
    elif distributed and cfg.get("ddp"):
        model = nn.parallel.DistributedDataParallel(net)
    is_ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    n_micro = cfg.get("micro", 1)
    inject = rank == 1 or not distributed
    out: dict[str, Any] = {
        "params": [flat_params(net)],
        "skipped": [],
        "losses": [],
        "grams": [],
        "traffic": [],
        "progress": [],
    }
    for step in range(cfg["steps"]):
        before = dict(marble._comm.traffic)
        skipped, losses_seen, grams = [], [], []
        for micro in range(n_micro):
            x, y = global_batch(step, micro)
            if distributed:
                x, y = x[rank * B_LOCAL : (rank + 1) * B_LOCAL], y[rank * B_LOCAL : (rank + 1) * B_LOCAL]
            if driver == "accumulate":
                ctx: Any = accelerator.accumulate(model)
            elif is_ddp and micro < n_micro - 1:
                ctx = model.no_sync()
            else:
                ctx = nullcontext()
            with ctx:
                h, pred = model(x, nan_grad=inject and cfg.get("nan_grad") == (step, micro))
                losses = per_sample_losses_of(pred, y) if cfg.get("estimator") == "cross" else losses_of(pred, y)
                if distributed and rank == 1 and cfg.get("reorder"):
                    losses = dict(reversed(losses.items()))
                if inject and cfg.get("nan_loss") == (step, micro):
                    losses["b"] = losses["b"] * NAN
                extra = 0.05 * (pred**2).mean() if cfg.get("extra") else None
                shared = h if gram == "shared" else None
                if driver == "step":
                    opt.step(losses)  # positional, through AcceleratedOptimizer.step(closure)
                    report = None
                else:
                    report = marble.backward(losses, shared=shared, extra=extra)
                if driver == "accumulate":
                    opt.step()  # a no-op for accelerate until the last micro-batch
                    opt.zero_grad()
                    out["progress"].append((step, micro, marble.num_steps, dict(marble.weights)))
            if report is not None:
                skipped.append(report.skipped)
                losses_seen.append(dict(report.losses))
                grams.append(report.gram)
        if driver != "accumulate":
            if driver != "step":
                opt.step()
            opt.zero_grad()
        out["skipped"].append(skipped)
        out["losses"].append(losses_seen)
        out["grams"].append(grams)
        out["traffic"].append(
            {k: v - before.get(k, 0) for k, v in marble._comm.traffic.items() if v != before.get(k, 0)}
        )
        out["params"].append(flat_params(net))
    out["num_steps"] = marble.num_steps
    out["weights"] = dict(marble.weights)
    out["numel"] = sum(p.numel() for p in net.parameters())
    return out


def train_balancer(cfg: dict[str, Any], net: Net, options: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    """``train`` with a ``Balancer`` and the caller's own backward and SGD step (DDP when
    ``world > 1``; ``no_sync`` for all but the last micro-batch); the same record."""
    distributed = world > 1
    sgd = torch.optim.SGD(net.parameters(), lr=0.1)
    bal = Balancer(net.parameters(), **options)
    model: nn.Module = nn.parallel.DistributedDataParallel(net) if distributed else net
    n_micro = cfg.get("micro", 1)
    inject = rank == 1 or not distributed
    out: dict[str, Any] = {"params": [flat_params(net)], "skipped": [], "losses": [], "grams": [], "traffic": []}
    for step in range(cfg["steps"]):
        before = dict(bal.comm.traffic)
        skipped, losses_seen, grams = [], [], []
        for micro in range(n_micro):
            x, y = global_batch(step, micro)
            if distributed:
                x, y = x[rank * B_LOCAL : (rank + 1) * B_LOCAL], y[rank * B_LOCAL : (rank + 1) * B_LOCAL]
            ctx: Any = model.no_sync() if distributed and micro < n_micro - 1 else nullcontext()
            with ctx:
                h, pred = model(x)
                losses = losses_of(pred, y)
                if inject and cfg.get("nan_loss") == (step, micro):
                    losses["b"] = losses["b"] * NAN
                w = bal.weights(losses, shared=h if options["gram"] == "shared" else None)
                report = bal.report
                if not report.skipped:
                    bal.weighted_loss(losses, w).backward()
            skipped.append(report.skipped)
            losses_seen.append(dict(report.losses))
            grams.append(report.gram)
        if any(skipped):
            bal.discard()
        else:
            sgd.step()
            bal.step()
        sgd.zero_grad()
        out["skipped"].append(skipped)
        out["losses"].append(losses_seen)
        out["grams"].append(grams)
        out["traffic"].append({k: v - before.get(k, 0) for k, v in bal.comm.traffic.items() if v != before.get(k, 0)})
        out["params"].append(flat_params(net))
    alpha = bal.state.alpha
    out["num_steps"] = bal.num_steps
    out["weights"] = {} if alpha is None else dict(zip(bal.names, alpha.tolist()))
    out["numel"] = sum(p.numel() for p in net.parameters())
    return out


def fsdp_refusal() -> str:
    """What MarbleOptimizer says to parameters sharded by FSDP2's ``fully_shard`` (gloo, CPU)."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    net = fully_shard(Net())
    try:
        MarbleOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), gram="shared")
    except NotImplementedError as exc:
        return str(exc)
    return "accepted"


def device_skip_refusal() -> str:
    """What ``step(losses)`` with ``skip_on_device=True`` says under torch.distributed; the
    parameters must be as they were."""
    torch.manual_seed(0)
    net = Net()
    before = flat_params(net)
    opt = MarbleOptimizer(torch.optim.AdamW(net.parameters(), lr=0.1, fused=True), skip_on_device=True)
    x, y = global_batch(0, 1)
    try:
        opt.step(losses_of(net(x)[1], y))
    except ValueError as exc:
        return str(exc) if torch.equal(before, flat_params(net)) else "parameters changed"
    return "accepted"


#: Loss keys per rank and call for ``name_checks``: (rank 0's keys, rank 1's keys) per call.
NAME_CASES: dict[str, list[tuple[str, str]]] = {
    "renamed": [("abc", "abd")],  # same count, one name differs: used to be averaged by position
    "fewer": [("abc", "ab")],  # one key fewer: used to hang in the loss all-reduce
    "later": [("abc", "abc"), ("abc", "abcd")],  # a new key after the first step: used to hang rank 0
    "after": [("abc", "cba"), ("abc", "bca")],  # then the group still works (and any order is fine)
}


def name_checks(rank: int) -> dict[str, list[tuple[str, str, float]]]:
    """Each case of ``NAME_CASES`` with a fresh optimizer: per call ("ok" | exception type,
    message, seconds); last, ("names", the optimizer's names joined by commas, 0)."""
    x, y = global_batch(0, 0)
    x, y = x[rank * B_LOCAL : (rank + 1) * B_LOCAL], y[rank * B_LOCAL : (rank + 1) * B_LOCAL]
    out: dict[str, list[tuple[str, str, float]]] = {}
    for case, calls in NAME_CASES.items():
        torch.manual_seed(0)
        net = Net()
        opt = MarbleOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), gram="exact")
        out[case] = []
        for keys in calls:
            _, pred = net(x)
            full = losses_of(pred, y)
            full["d"] = (pred**2).mean()
            losses = {k: full[k] for k in keys[rank]}
            start = time.monotonic()
            try:
                opt.step(losses)
                out[case].append(("ok", "", time.monotonic() - start))
            except ValueError as exc:
                out[case].append((type(exc).__name__, str(exc), time.monotonic() - start))
            opt.zero_grad()
        out[case].append(("names", ",".join(opt.names), 0.0))
    return out


def main(rank: int, world: int, port: int, outdir: str, mode: str = "scenarios") -> None:
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
    )  # fmt: skip
    import torch.distributed as dist
    from accelerate import Accelerator

    # A short timeout: a collective that hangs fails the run in seconds, not 30 minutes.
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=PG_TIMEOUT_S))
    if mode == "names":
        torch.save(name_checks(rank), os.path.join(outdir, f"rank{rank}.pt"))
        dist.barrier()
        dist.destroy_process_group()
        return
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)  # joins the existing group
    assert accelerator.num_processes == world and accelerator.process_index == rank
    results: dict[str, Any] = {name: train(name, rank, world, accelerator) for name in SCENARIOS}
    results["fsdp"] = fsdp_refusal()
    results["device_skip"] = device_skip_refusal()
    torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], *sys.argv[5:6])
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)  # do not wait for the other rank's collectives
