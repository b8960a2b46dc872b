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

import time
from contextlib import nullcontext
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
    # Issue 18: the cross estimator with unequal, odd local batches (3 and 5 samples of the 8),
    # then with groups that split each rank's batch differently (A: 2 of 3 on rank 0, 2 of 5
    # on rank 1). No one-process reference: the step is the gradient of the mean over ranks of
    # the local mean losses (checked against autograd, ``update_err``); the ranks stay bit-identical.
    "exact-cross-ddp-odd": dict(gram="exact", ddp=True, steps=3, estimator="cross", split=(3, 5), reference=False),
    "exact-cross-ddp-groups": dict(
        gram="exact",
        ddp=True,
        steps=3,
        estimator="cross",
        split=(3, 5),
        groups=([0, 0, 1], [7, 8, 8, 8, 9]),
        reference=False,
    ),  # fmt: skip
    # a stochastic weighting, seeded differently on each rank: every rank applies the first
    # rank's weights (so the run equals one process whose weighting has rank 0's seed)
    "exact-ddp-random-weighting": dict(gram="exact", ddp=True, steps=3, weighting="random"),
    # a Balancer loop (weights → the caller's backward of the weighted loss through DDP → SGD
    # step → bal.step()): the same contract as MarbleOptimizer's
    "balancer-exact-ddp": dict(gram="exact", ddp=True, steps=3, balancer=True),
    "balancer-exact-ddp-nan-loss": dict(gram="exact", ddp=True, steps=3, nan_loss=(1, 0), balancer=True),
    "balancer-shared-ddp-accum": dict(gram="shared", ddp=True, steps=3, micro=2, balancer=True),
    "balancer-params-ddp-refresh": dict(gram="params", ddp=True, steps=4, refresh_every=2, balancer=True),
}


class RandomWeights:
    """A Gramian weighting that draws its weights (like TorchJD's ``RandomWeighting``, or
    ``PCGradWeighting``'s random order, with a per-rank RNG): positive, summing to 1, from its
    own generator; ``drawn`` keeps what it returned."""

    def __init__(self, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.drawn: list[list[float]] = []

    def __call__(self, gram: torch.Tensor) -> torch.Tensor:
        w = torch.softmax(torch.randn(gram.shape[0], generator=self.gen, dtype=torch.float64), 0)
        self.drawn.append(w.tolist())
        return w


def local_rows(cfg: dict[str, Any], rank: int, distributed: bool) -> slice:
    """This rank's samples of the global batch: equal halves, or ``cfg["split"]`` sizes."""
    if not distributed:
        return slice(None)
    sizes = cfg.get("split", (B_LOCAL,) * WORLD)
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


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
    weighting_options: dict[str, Any] = dict(ema_decay=0.7, normalize=cfg.get("normalize", "l2"))
    random_weights = None
    if cfg.get("weighting") == "random":
        random_weights = RandomWeights(seed=100 + rank)  # another seed on each rank
        weighting_options = dict(weighting=random_weights)
    options = dict(
        gram=gram,
        **weighting_options,
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
        "loss_weights": [],
        "update_err": [],
    }
    for step in range(cfg["steps"]):
        before = dict(marble._comm.traffic)
        skipped, losses_seen, grams = [], [], []
        for micro in range(n_micro):
            x, y = global_batch(step, micro)
            rows = local_rows(cfg, rank, distributed)
            x, y = x[rows], y[rows]
            groups = torch.tensor(cfg["groups"][rank]) if cfg.get("groups") and distributed else None
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
                    report = marble.backward(losses, shared=shared, extra=extra, groups=groups)
                if driver == "accumulate":
                    opt.step()  # a no-op for accelerate until the last micro-batch
                    opt.zero_grad()
                    out["progress"].append((step, micro, marble.num_steps, dict(marble.weights)))
            if report is not None:
                skipped.append(report.skipped)
                losses_seen.append(dict(report.losses))
                grams.append(report.gram)
                out["loss_weights"].append(dict(report.loss_weights))
                if cfg.get("split") and distributed and not report.skipped:
                    out["update_err"].append(update_error(net, x, y, report.loss_weights))
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
    out["drawn"] = [] if random_weights is None else random_weights.drawn
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


def update_error(net: nn.Module, x: torch.Tensor, y: torch.Tensor, weights: dict[str, float]) -> float:
    """max |p.grad − d| / max |d| for d = the mean over ranks of ∇ Σ_k w_k·(local mean of L_k),
    by autograd on this rank's batch and one all-reduce (every rank calls it)."""
    import torch.distributed as dist

    params = list(net.parameters())
    per_sample = per_sample_losses_of(net(x)[1], y)
    total = sum(weights[k] * v.mean() for k, v in per_sample.items())
    want = torch.cat([g.reshape(-1) for g in torch.autograd.grad(total, params)])
    dist.all_reduce(want)
    want /= dist.get_world_size()
    got = torch.cat([p.grad.reshape(-1) for p in params])
    return ((got - want).abs().max() / want.abs().max()).item()


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
    # Issue 18, 7c: another bad input on one rank only (rank 1 passes loss "b" per sample, not
    # its mean): every rank raises at once, then a good call on both works.
    torch.manual_seed(0)
    net = Net()
    opt = MarbleOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), gram="exact")
    out["nonscalar"] = []
    for bad in (rank == 1, False):
        per_sample = per_sample_losses_of(net(x)[1], y)
        losses = {k: v if (bad and k == "b") else v.mean() for k, v in per_sample.items()}
        start = time.monotonic()
        try:
            opt.step(losses)
            out["nonscalar"].append(("ok", "", time.monotonic() - start))
        except ValueError as exc:
            out["nonscalar"].append((type(exc).__name__, str(exc), time.monotonic() - start))
        opt.zero_grad()
    out["nonscalar"].append(("names", ",".join(opt.names), 0.0))
    return out


def run(rank: int, world: int, mode: str) -> dict[str, Any]:
    """``mode`` "names": the name checks; else every scenario, with accelerate joining the group."""
    if mode == "names":
        return name_checks(rank)
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)  # joins the existing group
    assert accelerator.num_processes == world and accelerator.process_index == rank
    results: dict[str, Any] = {name: train(name, rank, world, accelerator) for name in SCENARIOS}
    results["device_skip"] = device_skip_refusal()
    return results


if __name__ == "__main__":
    from _launch import worker_main

    worker_main(run, PG_TIMEOUT_S)
