"""MarbleOptimizer and Balancer on FSDP2 (``fully_shard``): 2 gloo ranks or one process.

``tests/test_fsdp2_optimizer.py`` starts ``python tests/_fsdp2_opt_worker.py RANK WORLD PORT OUTDIR``
twice. Each rank trains every scenario of ``SCENARIOS`` (AdamW, MARBLE with EMA ρ=0.7) on its
half of each global batch with ``_fsdp2_worker.Net`` (every Linear ``fully_shard``-ed, odd
widths: uneven shards); the test runs ``train(name)`` in its own process on the whole batch
(no FSDP) as the reference.

Scenario keys: ``gram``; ``refresh_every``; ``micro`` (micro-batches per step);
``nan_loss`` / ``nan_grad`` = step at which rank 1 (the whole batch in the reference) gets a
NaN loss / a NaN gradient below the output; ``extra`` (an unbalanced loss); ``balancer``
(a ``Balancer`` and the caller's own backward of ``Σ w_k L_k``); ``detached`` (the losses
computed from ``marble_opt.detach_shared(output)``); ``late`` (the optimizer is
built on the whole model, then ``fully_shard`` is applied and the optimizer's parameters are
swapped for the shards, as accelerate's ``prepare`` does).
"""

from __future__ import annotations

from typing import Any

import torch
from _fsdp2_worker import B_LOCAL, NAN, PG_TIMEOUT_S, CountCollectives, Net, full_params, global_batch

from marble_opt import Balancer, MarbleOptimizer, detach_shared

SCENARIOS: dict[str, dict[str, Any]] = {
    "exact": dict(gram="exact"),
    "exact-refresh": dict(gram="exact", refresh_every=2),
    "exact-lean": dict(gram="exact-lean"),
    "exact-lean-refresh": dict(gram="exact-lean", refresh_every=2),
    "shared": dict(gram="shared"),
    "shared-refresh": dict(gram="shared", refresh_every=2),
    # the detached shared form: losses from marble_opt.detach_shared(output), shared=that copy
    "detached": dict(gram="shared", detached=True),
    "detached-refresh": dict(gram="shared", detached=True, refresh_every=2),
    "detached-accum-extra": dict(gram="shared", detached=True, micro=2, extra=True),
    "detached-nan-grad": dict(gram="shared", detached=True, nan_grad=1),
    "exact-accum": dict(gram="exact", micro=2),
    "shared-accum-refresh": dict(gram="shared", micro=2, refresh_every=2),
    "exact-extra": dict(gram="exact", extra=True),
    "exact-nan-loss": dict(gram="exact", nan_loss=1),
    "exact-nan-grad": dict(gram="exact", nan_grad=1),
    "shared-nan-grad": dict(gram="shared", nan_grad=1),
    "shared-refresh-nan-grad": dict(gram="shared", refresh_every=2, nan_grad=1),
    "balancer-exact": dict(gram="exact", balancer=True),
    "balancer-shared-refresh": dict(gram="shared", balancer=True, refresh_every=2),
    "late-exact": dict(gram="exact", late=True),
    "late-shared-refresh": dict(gram="shared", late=True, refresh_every=2),
}
STEPS = 4


def losses_of(out: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "a": ((out[:, 0] - y[:, 0]) ** 2).mean(),
        "b": ((out[:, 1] - y[:, 1]) ** 2 + 0.5 * (out[:, 0] + y[:, 0]) ** 2).mean(),
        "c": (0.1 * (out[:, 2] - y[:, 2]) ** 2 + 0.3 * (out[:, 0] - out[:, 1]) ** 2).mean(),
    }


def _shard(net: Net) -> None:
    from torch.distributed.fsdp import fully_shard

    for m in (net.a, net.b, net.c):
        fully_shard(m)
    fully_shard(net)


def train(name: str, rank: int = 0, world: int = 1) -> dict[str, Any]:
    """Run scenario ``name``; ``world=1``: the reference on the whole batch, no FSDP."""
    cfg = SCENARIOS[name]
    torch.manual_seed(0)
    net = Net()
    distributed = world > 1
    if distributed and not cfg.get("late"):
        _shard(net)
    options = dict(gram=cfg["gram"], ema_decay=0.7, refresh_every=cfg.get("refresh_every", 1))
    inner = torch.optim.AdamW(net.parameters(), lr=0.05)
    bal = None
    if cfg.get("balancer"):
        bal = Balancer(net.parameters(), **options)
        opt: Any = inner
    else:
        opt = MarbleOptimizer(inner, **options)
    if distributed and cfg.get("late"):
        # accelerate's order: the optimizer first, then fully_shard, then the optimizer's
        # parameters swapped for the shards (by position, as accelerate maps them)
        before = list(net.parameters())
        _shard(net)
        mapping = dict(zip(map(id, before), net.parameters()))
        for group in inner.param_groups:
            group["params"] = [mapping[id(p)] for p in group["params"]]
    inject = rank == 1 or not distributed
    out: dict[str, Any] = {"params": [full_params(net)], "skipped": [], "weights": [], "counts": []}
    for step in range(STEPS):
        counter = CountCollectives()
        skipped = []
        with counter:
            for micro in range(cfg.get("micro", 1)):
                x, y = global_batch(step, micro)
                if distributed:
                    x, y = x[rank * B_LOCAL : (rank + 1) * B_LOCAL], y[rank * B_LOCAL : (rank + 1) * B_LOCAL]
                pred = net(x, nan_grad=inject and cfg.get("nan_grad") == step)
                head = detach_shared(pred) if cfg.get("detached") else pred
                losses = losses_of(head, y)
                if inject and cfg.get("nan_loss") == step:
                    losses["b"] = losses["b"] * NAN
                extra = 0.05 * (pred**2).mean() if cfg.get("extra") else None
                shared = head if cfg["gram"] == "shared" else None
                if bal is not None:
                    w = bal.weights(losses, shared=shared)
                    if not bal.report.skipped:
                        bal.weighted_loss(losses, w).backward()
                    skipped.append(bal.report.skipped)
                else:
                    report = opt.backward(losses, shared=shared, extra=extra)
                    skipped.append(report.skipped)
            if bal is not None:
                if any(skipped):
                    bal.discard()
                else:
                    opt.step()
                    bal.step()
            else:
                opt.step()
            opt.zero_grad()
        out["skipped"].append(skipped)
        out["counts"].append(dict(counter.counts))
        out["weights"].append(dict(bal.report.loss_weights if bal is not None else opt.balancer.report.loss_weights))
        out["params"].append(full_params(net))
    return out


def refusals(rank: int, world: int) -> dict[str, str]:
    """What MarbleOptimizer and Balancer say to FSDP2 layouts they do not support."""

    def attempt(fn: Any) -> str:
        try:
            fn()
        except (ValueError, NotImplementedError) as exc:
            return f"{type(exc).__name__}: {exc}"
        return "accepted"

    x, y = global_batch(0)
    x, y = x[rank * B_LOCAL : (rank + 1) * B_LOCAL], y[rank * B_LOCAL : (rank + 1) * B_LOCAL]

    def sharded() -> Net:
        torch.manual_seed(0)
        net = Net()
        _shard(net)
        return net

    def step_with(net: Net, **options: Any) -> None:
        opt = MarbleOptimizer(torch.optim.AdamW(net.parameters(), lr=0.05), **options)
        pred = net(x)
        losses = losses_of(pred, y)
        if options.get("gram_estimator") == "cross":
            losses = {k: ((pred[:, i] - y[:, i]) ** 2) for i, k in enumerate(losses)}
        opt.backward(losses, shared=pred if options.get("gram") == "shared" else None)

    out = {
        "cross": attempt(lambda: step_with(sharded(), gram="exact", gram_estimator="cross")),
        "params": attempt(lambda: step_with((n := sharded()), gram="params", gram_params=[n.c.weight])),
        "skip_on_device": attempt(
            lambda: MarbleOptimizer(torch.optim.AdamW(sharded().parameters(), lr=0.05, fused=True), skip_on_device=True)
        ),
    }

    def sync_off() -> None:
        net = sharded()
        net.set_requires_gradient_sync(False)
        step_with(net, gram="exact")

    out["sync-off"] = attempt(sync_off)

    def deepspeed_late() -> None:
        torch.manual_seed(0)
        net = Net()
        opt = MarbleOptimizer(torch.optim.AdamW(net.parameters(), lr=0.05), gram="shared")
        net.b.weight.ds_id = 3  # partitioned by DeepSpeed ZeRO-3 after construction
        pred = net(x)
        opt.backward(losses_of(pred, y), shared=pred)

    out["deepspeed-late"] = attempt(deepspeed_late)

    # Issue 18, item 6: layouts swapped in after construction (as accelerate's prepare does with
    # its FSDP plugin) are refused at backward(), before anything is measured or written.
    def fsdp1_late() -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel

        torch.manual_seed(0)
        net = Net()
        inner = torch.optim.AdamW(net.parameters(), lr=0.05)
        opt = MarbleOptimizer(inner, gram="exact")
        losses = losses_of(net(x), y)  # computed before the wrap: the refusal comes first
        wrapped = FullyShardedDataParallel(net, device_id=torch.device("cpu"))
        inner.param_groups[0]["params"] = list(wrapped.parameters())  # the FlatParameter
        opt.backward(losses)

    out["fsdp1-late"] = attempt(fsdp1_late)

    def tensor_parallel_late() -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        torch.manual_seed(0)
        net = Net()
        inner = torch.optim.AdamW(net.parameters(), lr=0.05)
        opt = MarbleOptimizer(inner, gram="exact")
        mesh = init_device_mesh("cpu", (world,))
        old = net.b.weight
        net.b.weight = torch.nn.Parameter(distribute_tensor(old.detach(), mesh, [Shard(1)]))
        inner.param_groups[0]["params"] = [net.b.weight if p is old else p for p in inner.param_groups[0]["params"]]
        before = [p.detach().clone() for p in net.parameters()]
        try:
            opt.backward({"a": net.a.weight.sum(), "b": net.c.weight.pow(2).sum()})
        finally:
            assert all(p.grad is None for p in net.parameters()), "a gradient was written"
            assert all(torch.equal(a, b.detach()) for a, b in zip(before, net.parameters()))

    out["tp-late"] = attempt(tensor_parallel_late)
    return out


def run(rank: int, world: int, mode: str) -> dict[str, Any]:
    results: dict[str, Any] = {name: train(name, rank, world) for name in SCENARIOS}
    results["refusals"] = refusals(rank, world)
    return results


if __name__ == "__main__":
    from _launch import worker_main

    worker_main(run, PG_TIMEOUT_S)
