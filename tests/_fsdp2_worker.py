"""FSDP2 (``fully_shard``) primitives of ``marble_opt._src.fsdp`` on 2 gloo ranks or one process.

``tests/test_fsdp2.py`` starts ``python tests/_fsdp2_worker.py RANK WORLD PORT OUTDIR`` twice
(ranks 0 and 1 on 127.0.0.1). Each rank trains every scenario of ``SCENARIOS`` on its half of
each global batch with a small MLP whose Linear layers are each wrapped by ``fully_shard``
(and the root after them); every dimension is odd, so the shards are uneven. It saves what
it saw (full parameters after each step, the Gram matrices, skip decisions, counted
collectives, refusal messages) to ``OUTDIR/rank{RANK}.pt``. The test runs ``train(name)`` in
its own process on the whole batch (no FSDP, the same code path on plain tensors) as the
reference.

A step here is the balancing step without the optimizer: Gram → per-loss weights
``w_k = 1/(K·√G_kk)`` (the mean of the normalised gradients: a weighting that depends on the
Gram) → ``Σ w_k ∇L_k`` written into ``p.grad`` → AdamW, skipped on every rank when the
reduced Gram or loss values are not finite.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from marble_opt._src import fsdp as F

B_LOCAL = 4  # samples per rank
WORLD = 2
K = 3
NAN = float("nan")
PG_TIMEOUT_S = 30

SCENARIOS: dict[str, dict[str, Any]] = {
    "exact": dict(form="exact", steps=4),
    "exact-nan-loss": dict(form="exact", steps=3, nan_loss=1),
    "exact-nan-grad": dict(form="exact", steps=3, nan_grad=1),
    "detached": dict(form="detached", steps=4),
    "detached-nan-loss": dict(form="detached", steps=3, nan_loss=1),
    # a NaN gradient below the shared tensor on rank 1: G is finite, the one FSDP backward is
    # not, and after the reduce-scatter only the rank owning a poisoned entry sees it
    "detached-nan-grad": dict(form="detached", steps=3, nan_grad=1),
    # the shared form on the graph: autograd.grad w.r.t. the model's output (FSDP's hooks fire),
    # then one ordinary FSDP backward of Σ w_k L_k
    "shared": dict(form="shared", steps=4),
    # two micro-batches per step: the exact rows and the detached form's one backward accumulate
    "exact-accum": dict(form="exact", steps=2, micro=2),
    "detached-accum": dict(form="detached", steps=2, micro=2),
}


class Net(nn.Module):
    """5 → 7 → 9 → 3, tanh; every Linear is fully_shard-ed on its own (uneven shards on 2 ranks)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 7)
        self.b = nn.Linear(7, 9)
        self.c = nn.Linear(9, 3)

    def forward(self, x: torch.Tensor, nan_grad: bool = False) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        if nan_grad:
            h.register_hook(lambda g: g * NAN)
        return self.c(torch.tanh(self.b(h)))


def losses_of(out: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Three conflicting objectives of different scales, each a mean over the batch."""
    return [
        ((out[:, 0] - y[:, 0]) ** 2).mean(),
        ((out[:, 1] - y[:, 1]) ** 2 + 0.5 * (out[:, 0] + y[:, 0]) ** 2).mean(),
        (0.1 * (out[:, 2] - y[:, 2]) ** 2 + 0.3 * (out[:, 0] - out[:, 1]) ** 2).mean(),
    ]


def global_batch(step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2000 + 10 * step + micro)
    return torch.randn(WORLD * B_LOCAL, 5, generator=g), torch.randn(WORLD * B_LOCAL, 3, generator=g)


def weigh(gram: np.ndarray) -> np.ndarray:
    return 1.0 / (K * np.sqrt(np.diag(gram)))


def full_params(net: nn.Module) -> torch.Tensor:
    parts = []
    for p in net.parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        parts.append(t.detach().reshape(-1))
    return torch.cat(parts).clone()


def build(world: int) -> nn.Module:
    torch.manual_seed(0)
    net = Net()
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for m in (net.a, net.b, net.c):
            fully_shard(m)
        fully_shard(net)
    return net


class CountCollectives(TorchDispatchMode):
    """Counts the c10d collectives dispatched (FSDP's all-gathers and reduce-scatters, our all-reduce)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = str(func)
        if name.startswith("c10d."):
            self.counts[name.split(".")[1].strip("_")] += 1
        return func(*args, **(kwargs or {}))


def _local_batch(step: int, micro: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = global_batch(step, micro)
    if world > 1:
        x, y = x[rank * B_LOCAL : (rank + 1) * B_LOCAL], y[rank * B_LOCAL : (rank + 1) * B_LOCAL]
    return x, y


def train(name: str, rank: int = 0, world: int = 1) -> dict[str, Any]:
    """Run scenario ``name``; ``world=1``: the reference on the whole batch, no FSDP."""
    cfg = SCENARIOS[name]
    net = build(world)
    params = list(net.parameters())
    mesh = F.fsdp2_mesh(params)
    assert (mesh is None) == (world == 1), mesh
    group = mesh.get_group() if mesh is not None else None
    if mesh is not None:
        F.check_gradient_sync(net)
    opt = torch.optim.AdamW(params, lr=0.05)
    inject = rank == 1 or world == 1
    out: dict[str, Any] = {"params": [full_params(net)], "grams": [], "values": [], "skipped": [], "counts": []}
    for step in range(cfg["steps"]):
        counter = CountCollectives()
        skipped = False
        with counter:
            for micro in range(cfg.get("micro", 1)):
                x, y = _local_batch(step, micro, rank, world)
                pred = net(x, nan_grad=inject and cfg.get("nan_grad") == step)
                if cfg["form"] == "exact":
                    losses = losses_of(pred, y)
                    if inject and cfg.get("nan_loss") == step:
                        losses[1] = losses[1] * NAN
                    grads = F.per_objective_local_grads(losses, params, retain_graph=False)
                    rows = F.local_rows(grads, params)
                    values = torch.stack([loss.detach().double() for loss in losses])
                    gram, vals, finite = F.reduce_gram(F.partial_gram(rows), values, group)
                elif cfg["form"] == "shared":
                    losses = losses_of(pred, y)
                    rows = torch.stack(
                        [torch.autograd.grad(loss, pred, retain_graph=True)[0].reshape(-1) for loss in losses]
                    )
                    values = torch.stack([loss.detach().double() for loss in losses])
                    gram, vals, finite = F.reduce_gram(F.partial_gram(rows), values, group, gram_scale=1.0 / world**2)
                else:
                    nan_now = inject and cfg.get("nan_loss") == step

                    def loss_fn(z: torch.Tensor, y: torch.Tensor = y, nan_now: bool = nan_now) -> list[torch.Tensor]:
                        losses = losses_of(z, y)
                        if nan_now:
                            losses[1] = losses[1] * NAN
                        return losses

                    rows, values = F.detached_shared_grads(pred, loss_fn)
                    gram, vals, finite = F.reduce_gram(F.partial_gram(rows), values, group, gram_scale=1.0 / world**2)
                out["grams"].append(gram)
                out["values"].append(vals)
                if not finite:
                    skipped = True
                    continue
                w = weigh(gram)
                if cfg["form"] == "exact":
                    combined = torch.as_tensor(w, dtype=torch.float64) @ rows.double()
                    for p, local in zip(params, F.split_local(combined, params)):
                        F.write_local(p, local)
                else:
                    if cfg["form"] == "shared":
                        sum(float(wk) * loss for wk, loss in zip(w, losses)).backward()
                    else:
                        F.shared_backward(pred, rows, w)
                    # the one backward's gradient: finite on every rank? (one all-reduce of a flag)
                    if not F.finite_everywhere([p.grad for p in params], group):
                        skipped = True
            if skipped:
                opt.zero_grad()
            else:
                opt.step()
                opt.zero_grad()
        out["skipped"].append(skipped)
        out["counts"].append(dict(counter.counts))
        out["params"].append(full_params(net))
    return out


def plain_counts(rank: int, world: int) -> dict[str, int]:
    """Collectives of one plain FSDP step (forward, backward of the summed losses, AdamW)."""
    net = build(world)
    opt = torch.optim.AdamW(net.parameters(), lr=0.05)
    x, y = _local_batch(0, 0, rank, world)
    counter = CountCollectives()
    with counter:
        sum(losses_of(net(x), y)).backward()
        opt.step()
        opt.zero_grad()
    return dict(counter.counts)


def _message(fn: Any) -> str:
    try:
        result = fn()
    except (ValueError, NotImplementedError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return f"accepted: {result!r}"


def refusals(rank: int, world: int) -> dict[str, str]:
    """What ``fsdp2_mesh`` / ``check_gradient_sync`` say to each layout (both ranks)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    out: dict[str, str] = {}
    out["plain"] = _message(lambda: F.fsdp2_mesh(Net().parameters()))

    def fsdp1() -> Any:
        torch.manual_seed(0)
        wrapped = FullyShardedDataParallel(Net(), device_id=torch.device("cpu"))
        return F.fsdp2_mesh(wrapped.parameters())

    out["fsdp1"] = _message(fsdp1)

    def deepspeed() -> Any:
        net = Net()
        net.b.weight.ds_id = 3  # what DeepSpeed ZeRO-3 sets on a partitioned parameter
        net.b.weight.ds_status = "NOT_AVAILABLE"
        return F.fsdp2_mesh(net.parameters())

    out["deepspeed"] = _message(deepspeed)

    def hsdp(shape: tuple[int, int]) -> Any:
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard"))
        net = Net()
        fully_shard(net, mesh=mesh)
        return F.fsdp2_mesh(net.parameters())

    out["hsdp-1x2"] = _message(lambda: hsdp((1, 2)))
    out["hsdp-2x1"] = _message(lambda: hsdp((2, 1)))

    def tensor_parallel(placement: Any) -> Any:
        mesh = init_device_mesh("cpu", (world,))
        net = Net()
        net.b.weight = nn.Parameter(distribute_tensor(net.b.weight.detach(), mesh, [placement]))
        fully_shard(net.a)
        fully_shard(net.c)
        return F.fsdp2_mesh(net.parameters())

    out["tp-replicate"] = _message(lambda: tensor_parallel(Replicate()))
    out["tp-shard1"] = _message(lambda: tensor_parallel(Shard(1)))
    out["tp-shard0"] = _message(lambda: tensor_parallel(Shard(0)))

    def mixed() -> Any:
        net = Net()
        fully_shard(net.a)
        fully_shard(net.b)  # net.c stays whole and trainable
        return F.fsdp2_mesh(net.parameters())

    out["mixed"] = _message(mixed)

    def mixed_frozen() -> Any:
        net = Net()
        fully_shard(net.a)
        fully_shard(net.b)
        net.c.requires_grad_(False)  # frozen whole parameters are fine
        return F.fsdp2_mesh(net.parameters()).shape

    out["mixed-frozen"] = _message(mixed_frozen)

    def two_meshes() -> Any:
        net = Net()
        fully_shard(net.a, mesh=init_device_mesh("cpu", (world,), mesh_dim_names=("dp",)))
        fully_shard(net.b, mesh=init_device_mesh("cpu", (world,), mesh_dim_names=("other",)))
        fully_shard(net, mesh=init_device_mesh("cpu", (world,), mesh_dim_names=("dp",)))
        return F.fsdp2_mesh(net.parameters())

    out["two-meshes"] = _message(two_meshes)

    def sync(flag: bool) -> Any:
        net = build(world)
        net.set_requires_gradient_sync(flag)
        F.check_gradient_sync(F.fsdp2_modules(net.parameters()))
        F.check_gradient_sync(net)
        return "checked"

    out["sync-off"] = _message(lambda: sync(False))
    out["sync-on"] = _message(lambda: sync(True))
    out["modules"] = ",".join(type(m).__name__ for m in F.fsdp2_modules(build(world).parameters()))
    dist.barrier()
    return out


def write_checks(rank: int, world: int) -> dict[str, Any]:
    """``write_local`` on sharded parameters: fresh and accumulating writes, read back."""
    net = build(world)
    p = net.b.weight  # 9×7: rows 0–4 on rank 0, 5–8 on rank 1
    local = torch.arange(p.to_local().numel(), dtype=torch.float64).reshape(p.to_local().shape) + 100 * rank
    F.write_local(p, local)
    first = p.grad.full_tensor().clone()
    F.write_local(p, local)
    second = p.grad.full_tensor().clone()
    return {
        "first": first,
        "second": second,
        "placements": str(p.grad.placements),
        "shape": tuple(p.grad.shape),
        "local_shape": tuple(p.to_local().shape),
        "same_storage_as_input": p.grad.to_local().data_ptr() == local.data_ptr(),
    }


def run(rank: int, world: int, mode: str) -> dict[str, Any]:
    results: dict[str, Any] = {name: train(name, rank, world) for name in SCENARIOS}
    results["plain_counts"] = plain_counts(rank, world)
    results["write"] = write_checks(rank, world)
    results["refusals"] = refusals(rank, world)
    return results


if __name__ == "__main__":
    from _launch import worker_main

    worker_main(run, PG_TIMEOUT_S)
