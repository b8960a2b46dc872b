"""FSDP2 (``torch.distributed.fsdp.fully_shard``): detection, refusals and the sharded Gram.

Under FSDP2 every trainable parameter is a ``DTensor`` on a 1-D device mesh with placement
``Shard(0)``: rank ``r`` holds rows ``[r·⌈n/R⌉, (r+1)·⌈n/R⌉)`` of dim 0 (the last ranks may
hold fewer rows, or none). FSDP all-gathers a module's parameters before its forward and
before its backward, and after the backward it reduce-scatters the unsharded gradients into
``p.grad``, a ``DTensor`` sharded like ``p`` that holds this rank's shard of the gradient
averaged over the ranks (the gradient of the whole batch when every rank's loss is a mean
over an equal-sized local batch). ``autograd.grad`` w.r.t. the sharded parameters is not
possible: they are not on the autograd graph (FSDP gathers them outside autograd).

What this module provides (every function is independent of the optimizer):

- ``fsdp2_mesh(params)``: the mesh when all trainable parameters are FSDP2 shards on one
  1-D mesh, ``None`` when none is sharded, a clear error for every layout that is not
  supported (FSDP1 flat parameters, DeepSpeed ZeRO-3, HSDP / 2-D meshes, tensor parallelism,
  a mix of sharded and whole parameters, several meshes). ``check_gradient_sync(modules)``
  refuses FSDP modules whose gradient reduction is turned off (the exact sources read the
  reduced gradient).
- the exact Gram: ``per_objective_local_grads`` (K ordinary backward passes, each through
  FSDP's own reduce-scatter, each objective's local gradient shard read from ``p.grad``),
  ``local_rows`` (one row of local shard entries per objective), ``partial_gram`` (this
  rank's float64 ``Σ_{i in shard} g_k[i] g_l[i]``) and ``reduce_gram`` (ONE all-reduce of
  K·K + K + 1 float64 over the mesh's group: the partial Gram matrices sum to the Gram of the
  whole gradients, the loss values to R times their mean, and a non-finite flag that every
  rank then shares);
- ``write_local(p, local)``: the one way this module writes a gradient, into the sharded
  ``p.grad``;
- the detached shared form (``detached_shared_grads`` + ``shared_backward``): per-objective
  gradients w.r.t. a detached copy of a shared tensor (no FSDP collective), the Gram of those
  reduced as ``(1/R²) Σ_r G_r``, then ONE ordinary FSDP backward of ``Σ w_k L_k`` (started at
  the shared tensor). Valid only when no trainable parameter lies between the shared tensor
  and the losses: ``detached_shared_grads`` checks that and refuses otherwise.

Collectives per balancing step (K objectives; "plain" = one FSDP backward of a summed loss):
exact: K× plain's reduce-scatters and all-gathers in backward, plus one all-reduce of
8·(K²+K+1) bytes; detached shared: plain's collectives plus that one all-reduce.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "check_detached",
    "check_gradient_sync",
    "detach_shared",
    "detached_shared_grads",
    "detached_origins",
    "finite_everywhere",
    "fsdp2_mesh",
    "fsdp2_modules",
    "local_rows",
    "partial_gram",
    "per_objective_local_grads",
    "per_objective_local_rows",
    "reduce_gram",
    "shared_backward",
    "split_local",
    "write_local",
]

#: Columns of a K×n row block converted to float64 at a time in ``partial_gram``.
_GRAM_CHUNK = 1 << 18


# ---- detection ----------------------------------------------------------------------------
def _dtensor_type() -> Any:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without torch.distributed
        return None
    return DTensor


def _fsdp2_states() -> list[tuple[nn.Module, Any]]:
    """Every live FSDP2 state with the module it was registered on (deduplicated)."""
    try:
        from torch.distributed._composable_state import _module_state_mapping
        from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState
    except ImportError:
        return []
    seen: set[int] = set()
    out = []
    for module, ref in list(_module_state_mapping.items()):
        state = ref() if callable(ref) else ref
        if isinstance(state, FSDPState) and id(state) not in seen:
            seen.add(id(state))
            out.append((module, state))
    return out


def _param_groups_of(state: Any) -> list[Any]:
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:  # torch < 2.12 kept one group per state
        group = getattr(state, "_fsdp_param_group", None)
        groups = [] if group is None else [group]
    return list(groups)


def _managed() -> dict[int, tuple[nn.Module, Any]]:
    """id(sharded parameter) -> (the module ``fully_shard`` was applied to, its param group)."""
    out: dict[int, tuple[nn.Module, Any]] = {}
    for module, state in _fsdp2_states():
        for group in _param_groups_of(state):
            for fsdp_param in getattr(group, "fsdp_params", ()):
                out[id(fsdp_param.sharded_param)] = (module, group)
    return out


def _describe(i: int, p: Tensor) -> str:
    return f"parameter {i} (shape {tuple(p.shape)})"


def _refuse_foreign(i: int, p: Tensor) -> None:
    """FSDP1 flat parameters and DeepSpeed ZeRO-3 partitions: clear errors."""
    if getattr(p, "_is_flat_param", False) or getattr(p, "_fsdp_flattened", False):
        raise NotImplementedError(
            f"{_describe(i, p)} belongs to FSDP1 (FullyShardedDataParallel: a flat parameter or one "
            "flattened into it), which is not supported: shard the model with FSDP2's "
            "torch.distributed.fsdp.fully_shard instead (accelerate: FullyShardedDataParallelPlugin("
            "fsdp_version=2)), or use DistributedDataParallel when the model fits on one device"
        )
    attrs = getattr(p, "__dict__", {})
    if "ds_id" in attrs or "ds_status" in attrs:
        raise NotImplementedError(
            f"{_describe(i, p)} is partitioned by DeepSpeed ZeRO stage 3 (it has "
            f"{'ds_id' if 'ds_id' in attrs else 'ds_status'}), which is not supported: its data and "
            "gradients live in DeepSpeed's partitions, out of reach of a per-objective backward. Use "
            "DeepSpeed ZeRO stage 1 or 2 (parameters stay whole on every rank), FSDP2's fully_shard, "
            "or DistributedDataParallel"
        )


def fsdp2_modules(params: Iterable[Tensor]) -> list[nn.Module]:
    """The modules ``fully_shard`` was applied to that manage any of ``params`` (in the order
    first met), e.g. for ``check_gradient_sync``."""
    managed = _managed()
    out: list[nn.Module] = []
    seen: set[int] = set()
    for p in params:
        hit = managed.get(id(p))
        if hit is not None and id(hit[0]) not in seen:
            seen.add(id(hit[0]))
            out.append(hit[0])
    return out


def fsdp2_mesh(params: Iterable[Tensor]) -> Any:
    """The device mesh of FSDP2-sharded parameters, ``None`` when none is sharded.

    Args:
        params: the parameters an optimizer updates; only those with ``requires_grad``
            count (frozen ones are never balanced or written).

    Returns:
        ``DeviceMesh`` (1-D) when every trainable parameter is a ``DTensor`` with placement
        ``(Shard(0),)`` managed by ``fully_shard`` on that one mesh; ``None`` when no trainable
        parameter is sharded (plain tensors: one process or DDP).

    Raises:
        NotImplementedError: naming the first offending parameter's index (position among
            ``params``) and the fix, for FSDP1 flat parameters, DeepSpeed ZeRO-3 parameters,
            a 2-D mesh (HSDP), placements other than ``Shard(0)`` (tensor parallelism, or
            ``fully_shard``'s ``shard_placement_fn``) and DTensors not managed by ``fully_shard``.
        ValueError: sharded and whole trainable parameters mixed, or several meshes.
    """
    dtensor = _dtensor_type()
    managed: dict[int, tuple[nn.Module, Any]] | None = None
    mesh: Any = None
    first_sharded: int | None = None
    first_plain: int | None = None
    for i, p in enumerate(params):
        if not p.requires_grad:
            continue
        _refuse_foreign(i, p)
        if dtensor is None or not isinstance(p, dtensor):
            if first_plain is None:
                first_plain = i
            continue
        pmesh, placements = p.device_mesh, tuple(p.placements)
        if pmesh.ndim != 1:
            raise NotImplementedError(
                f"{_describe(i, p)} is a DTensor on a {pmesh.ndim}-D device mesh {tuple(pmesh.shape)} with "
                f"placements {placements} (HSDP, or FSDP combined with tensor/context parallelism), which is "
                "not supported: the Gram matrix would need a reduction over the shard dimension only; "
                "shard with fully_shard on a 1-D mesh (init_device_mesh(device, (world_size,)))"
            )
        if placements != (_shard0(),):
            raise NotImplementedError(
                f"{_describe(i, p)} is a DTensor with placements {placements}: only FSDP2's default "
                "Shard(0) is supported (tensor parallelism, replicated DTensors and fully_shard's "
                "shard_placement_fn are not); use fully_shard without shard_placement_fn on a 1-D mesh"
            )
        if managed is None:
            managed = _managed()
        if id(p) not in managed:
            raise NotImplementedError(
                f"{_describe(i, p)} is a Shard(0) DTensor that fully_shard does not manage (e.g. made by "
                "distribute_tensor or tensor parallelism): its gradient is not reduce-scattered by FSDP; "
                "shard the module that owns it with torch.distributed.fsdp.fully_shard"
            )
        if mesh is None:
            mesh, first_sharded = pmesh, i
        elif pmesh != mesh:
            raise ValueError(
                f"{_describe(i, p)} is sharded on device mesh {pmesh} but parameter {first_sharded} on "
                f"{mesh}: every trainable parameter must be sharded by fully_shard on the same 1-D mesh "
                "(pass one mesh= to every fully_shard call)"
            )
        if first_plain is not None:
            break
    if mesh is not None and first_plain is not None:
        raise ValueError(
            f"parameter {first_plain} is a whole (unsharded) trainable tensor while parameter {first_sharded} "
            "is sharded by fully_shard: FSDP would not reduce its gradient across ranks. Apply fully_shard "
            "to the root module too (after its submodules), so that it manages every trainable parameter, "
            "or freeze that parameter (requires_grad_(False))"
        )
    return mesh


def _shard0() -> Any:
    from torch.distributed.tensor import Shard

    return Shard(0)


def check_gradient_sync(modules: nn.Module | Iterable[nn.Module]) -> None:
    """Refuse FSDP2 modules whose gradient reduction is off.

    ``FSDPModule.set_requires_gradient_sync(False)`` sets ``reduce_grads = False`` on the
    module's parameter groups: FSDP then keeps the unreduced gradient on its unsharded
    parameter and leaves the sharded ``p.grad`` untouched, so the exact sources would read no
    per-objective gradient at all. ``modules`` and all their submodules are checked.

    Raises:
        ValueError: naming the module's class and the fix.
    """
    roots = [modules] if isinstance(modules, nn.Module) else list(modules)
    seen: set[int] = set()
    for root in roots:
        for module in root.modules():
            if id(module) in seen:
                continue
            seen.add(id(module))
            get_state = getattr(module, "_get_fsdp_state", None)
            if get_state is None:
                continue
            for group in _param_groups_of(get_state()):
                if not getattr(group, "reduce_grads", True):
                    raise ValueError(
                        f"gradient synchronisation is turned off on the FSDP module {type(module).__name__} "
                        "(set_requires_gradient_sync(False)): the exact sources read each objective's "
                        "reduce-scattered gradient from the sharded p.grad, which FSDP then never writes. "
                        "Keep gradient sync on (call set_requires_gradient_sync(True) before backward) or, "
                        "to accumulate without communication, use the 'shared' source"
                    )


# ---- the exact Gram on local shards --------------------------------------------------------
def _local(t: Tensor) -> Tensor:
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def per_objective_local_grads(
    losses: Sequence[Tensor], params: Sequence[Tensor], *, retain_graph: bool = True
) -> list[list[Tensor]]:
    """Each objective's local gradient shard, one ordinary backward per objective.

    ``loss.backward(retain_graph=True)`` runs FSDP's hooks (all-gathers where parameters were
    resharded, and the reduce-scatter of the gradients), so ``p.grad`` afterwards holds this
    rank's shard of ``∇L_k`` averaged over the ranks. ``p.grad`` is stashed before, set to
    ``None`` before each objective and restored after (also when a backward raises).

    Args:
        losses: K scalar losses (the local batch's means), on one FSDP forward graph.
        params: the trainable parameters (FSDP2 DTensors, or plain tensors on one process).
        retain_graph: whether the last backward keeps the graph (for a later backward).

    Returns:
        ``out[k][j]``: the local shard of ``∇_{p_j} L_k`` (shape ``p_j.to_local().shape``,
        ``p_j``'s dtype); zeros where an objective does not reach ``p_j``.
    """
    stash = [p.grad for p in params]
    out: list[list[Tensor]] = []
    try:
        for p in params:
            p.grad = None
        for k, loss in enumerate(losses):
            loss.backward(retain_graph=retain_graph or k < len(losses) - 1)
            row = []
            for p in params:
                g = p.grad
                row.append(torch.zeros_like(_local(p.detach())) if g is None else _local(g))
                p.grad = None
            out.append(row)
    finally:
        for p, g in zip(params, stash):
            p.grad = g
    return out


def per_objective_local_rows(
    losses: Sequence[Tensor], params: Sequence[Tensor], out: Tensor, *, retain_graph: bool = True
) -> Tensor:
    """``per_objective_local_grads`` written straight into rows, one gradient alive at a time.

    Args:
        losses: K scalar losses on one FSDP forward graph.
        params: the trainable parameters.
        out: ``[K, n_local]`` (``n_local = Σ_j p_j.to_local().numel()``), on any device: a
            host buffer keeps the rows in host memory (``exact-lean``); converted on copy.
        retain_graph: whether the last backward keeps the graph.

    Returns:
        ``out``, row k = objective k's local gradient entries (zeros where it reaches no
        parameter). ``p.grad`` is stashed before and restored after, as in
        ``per_objective_local_grads``.
    """
    sizes = [_local(p.detach()).numel() for p in params]
    if out.shape != (len(losses), sum(sizes)):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {(len(losses), sum(sizes))}")
    stash = [p.grad for p in params]
    try:
        for p in params:
            p.grad = None
        for k, loss in enumerate(losses):
            loss.backward(retain_graph=retain_graph or k < len(losses) - 1)
            start = 0
            for p, size in zip(params, sizes):
                g = p.grad
                if g is None:
                    out[k, start : start + size].zero_()
                else:
                    out[k, start : start + size].copy_(_local(g).reshape(-1))
                p.grad = None
                start += size
    finally:
        for p, g in zip(params, stash):
            p.grad = g
    return out


def local_rows(
    grads: Sequence[Sequence[Tensor | None]],
    params: Sequence[Tensor] | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Flatten each objective's local gradient shards into one row.

    Args:
        grads: ``grads[k][j]``: objective k's gradient for parameter j, a sharded ``DTensor``
            (its local shard is taken), a plain tensor, or ``None`` (zeros; needs ``params``).
        params: the parameters (for the shape of a ``None`` entry).
        device: where the rows live (``"cpu"`` keeps them in host memory: ``exact-lean``);
            default the first gradient's device.
        dtype: default the first gradient's dtype.

    Returns:
        ``[K, n_local]``, ``n_local = Σ_j p_j.to_local().numel()``: row k is objective k's
        local entries, parameter after parameter (the order ``split_local`` undoes).
    """
    k_count = len(grads)
    sizes: list[int] = []
    ref: Tensor | None = None
    for j in range(len(grads[0]) if k_count else 0):
        g = next((row[j] for row in grads if row[j] is not None), None)
        if g is None:
            if params is None:
                raise ValueError(f"gradient {j} is None for every objective: pass params= for its shape")
            sizes.append(_local(params[j].detach()).numel())
        else:
            sizes.append(_local(g).numel())
            ref = _local(g) if ref is None else ref
    dev = torch.device(device) if device is not None else (ref.device if ref is not None else torch.device("cpu"))
    dt = dtype if dtype is not None else (ref.dtype if ref is not None else torch.float32)
    rows = torch.zeros(k_count, sum(sizes), device=dev, dtype=dt)
    for k, row in enumerate(grads):
        start = 0
        for g, size in zip(row, sizes):
            if g is not None and size:
                rows[k, start : start + size].copy_(_local(g).reshape(-1), non_blocking=False)
            start += size
    return rows


def split_local(row: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    """Views of one ``[n_local]`` row shaped like each parameter's local shard (the inverse
    of ``local_rows``'s flattening)."""
    shapes = [_local(p.detach()).shape for p in params]
    total = sum(int(np.prod(shape)) for shape in shapes)
    if total != row.numel():
        raise ValueError(f"a row of {row.numel()} entries does not match the parameters' {total} local entries")
    out, start = [], 0
    for shape in shapes:
        size = int(np.prod(shape))
        out.append(row[start : start + size].view(shape))
        start += size
    return out


def partial_gram(rows: Tensor) -> Tensor:
    """This rank's part of the Gram matrix: ``rows @ rows.T`` accumulated in float64.

    Args:
        rows: ``[K, n_local]`` (any float dtype, any device; ``n_local`` may be 0).

    Returns:
        ``[K, K]`` float64 on ``rows``' device. Over ranks holding disjoint shards, the sum of
        the partial Gram matrices is the Gram matrix of the whole gradients.
    """
    k_count, n = rows.shape
    gram = torch.zeros(k_count, k_count, dtype=torch.float64, device=rows.device)
    for start in range(0, n, _GRAM_CHUNK):
        block = rows[:, start : start + _GRAM_CHUNK].to(torch.float64)
        gram.addmm_(block, block.T)
    return gram


def reduce_gram(
    partial: Tensor,
    values: Tensor | Sequence[float],
    group: Any,
    *,
    gram_scale: float = 1.0,
    local_ok: bool = True,
) -> tuple[np.ndarray, np.ndarray, bool]:
    """The Gram matrix, the loss values and their finiteness agreed by every rank.

    ONE all-reduce (SUM) over ``group`` of ``K·K + K + 1`` float64 on ``partial``'s device
    (CUDA under NCCL), then one device-to-host read.

    Args:
        partial: ``[K, K]`` float64, this rank's partial Gram (``partial_gram``), or its local
            Gram of a tensor split over ranks (then ``gram_scale = 1/R²``).
        values: ``[K]`` this rank's loss values (means over its local batch).
        group: the mesh's process group (``mesh.get_group()``), or ``None`` for no
            communication (one process).
        gram_scale: multiplies the summed Gram (1 for shards of averaged gradients,
            ``1/R²`` for a shared tensor split by batch over R ranks).
        local_ok: this rank's own verdict on anything else that must be finite.

    Returns:
        ``(gram [K, K] float64, values [K] float64 = mean over ranks, finite)``: ``finite`` is
        False on every rank when any rank had a non-finite partial Gram or loss value or
        ``local_ok=False``.
    """
    k_count = partial.shape[0]
    vals = torch.as_tensor(values, dtype=torch.float64).reshape(-1).to(partial.device)
    if vals.numel() != k_count:
        raise ValueError(f"values has {vals.numel()} entries, the Gram is {k_count}×{k_count}")
    ok = torch.isfinite(partial).all() & torch.isfinite(vals).all() & bool(local_ok)
    packed = torch.cat([partial.reshape(-1).to(torch.float64), vals, (~ok).to(torch.float64).reshape(1)])
    world = 1
    if group is not None:
        import torch.distributed as dist

        world = dist.get_world_size(group)
        if world > 1:
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    host = packed.cpu().numpy()
    gram = host[: k_count * k_count].reshape(k_count, k_count) * gram_scale
    mean = host[k_count * k_count : k_count * k_count + k_count] / world
    finite = bool(host[-1] == 0.0) and bool(np.isfinite(gram).all()) and bool(np.isfinite(mean).all())
    return gram, mean, finite


def finite_everywhere(tensors: Sequence[Tensor | None], group: Any) -> bool:
    """Whether every entry of every tensor (local shards of ``p.grad``; ``None`` skipped) is
    finite on every rank of ``group``: one all-reduce (MAX) of one float64 flag.

    After an FSDP backward a non-finite gradient entry of one rank reaches only the rank that
    owns that entry's shard: without this agreement the ranks would step differently.
    """
    present = [_local(t) for t in tensors if t is not None]
    ok = all(bool(torch.isfinite(t).all()) for t in present)
    if group is None:
        return ok
    import torch.distributed as dist

    if dist.get_world_size(group) == 1:
        return ok
    device = present[0].device if present else torch.device("cpu")
    flag = torch.tensor([0.0 if ok else 1.0], dtype=torch.float64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return bool(flag.item() == 0.0)


# ---- writing ------------------------------------------------------------------------------
def write_local(p: Tensor, local_grad: Tensor) -> None:
    """Add ``local_grad`` (this rank's shard of a combined gradient) into ``p.grad``.

    Args:
        p: an FSDP2 parameter (``DTensor``, ``Shard(0)``) or a plain tensor.
        local_grad: shape ``p.to_local().shape`` (any dtype/device: cast to ``p``'s).

    With ``p.grad`` unset, it becomes ``DTensor.from_local(local, p.device_mesh, p.placements,
    shape=p.shape, stride=p.stride())`` (no communication: every rank passes its own shard);
    otherwise the local shard is accumulated in place (gradient accumulation).
    """
    with torch.no_grad():
        target = _local(p.detach())
        local = local_grad.to(device=target.device, dtype=p.dtype).reshape(target.shape)
        if p.grad is not None:
            _local(p.grad).add_(local)
            return
        if local_grad.data_ptr() == local.data_ptr():  # never alias the caller's buffer
            local = local.clone()
        if hasattr(p, "device_mesh"):
            from torch.distributed.tensor import DTensor

            p.grad = DTensor.from_local(
                local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
            )
        else:
            p.grad = local


# ---- the detached shared form --------------------------------------------------------------
def _trainable_leaves(roots: Sequence[Tensor], allowed: Tensor | Sequence[Tensor]) -> list[Tensor]:
    """Leaves with ``requires_grad`` (other than ``allowed``) that ``roots`` depend on."""
    allowed_ids = {id(allowed)} if isinstance(allowed, Tensor) else {id(t) for t in allowed}
    found, seen = [], set()
    stack = [t.grad_fn for t in roots if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        leaf = getattr(node, "variable", None)
        if leaf is not None:
            if id(leaf) not in allowed_ids:
                found.append(leaf)
            continue
        stack.extend(nxt for nxt, _ in node.next_functions)
    return found


#: The attribute of a ``detach_shared`` leaf that holds the tensor it was detached from.
_ORIGIN = "_marble_shared_origin"


def detach_shared(shared: Tensor) -> Tensor:
    """A detached copy of ``shared`` for the detached shared form of ``gram="shared"``.

    Compute the losses from the returned tensor ``z`` and pass ``shared=z``: the K gradients
    w.r.t. ``z`` then stop at ``z`` (no FSDP hook fires, no collective), and the one backward
    of ``Σ_k w_k L_k`` goes on from ``shared`` with ``Σ_k w_k ∂L_k/∂z`` as its gradient (one
    ordinary FSDP backward). Valid only when no trainable parameter lies between ``shared``
    and the losses (checked at each solving step)::

        v = model(x)                           # the FSDP model's output
        z = marble_opt.detach_shared(v)
        opt.step({k: loss_k(z, y) for k in names}, shared=z)

    Args:
        shared: the tensor the losses are computed from, on the autograd graph.

    Returns:
        a leaf tensor with ``shared``'s values and ``requires_grad=True``.
    """
    if not isinstance(shared, Tensor) or not shared.requires_grad:
        raise ValueError(
            f"detach_shared needs a tensor on the autograd graph (requires_grad=True), got "
            f"{type(shared).__name__}{'' if not isinstance(shared, Tensor) else ' that does not require grad'}"
        )
    leaf = shared.detach().requires_grad_(True)
    setattr(leaf, _ORIGIN, shared)
    return leaf


def detached_origins(shared: Sequence[Tensor] | None) -> list[tuple[Tensor, Tensor]]:
    """``(leaf, origin)`` for each entry of ``shared`` made by ``detach_shared``."""
    if not shared:
        return []
    return [(z, getattr(z, _ORIGIN)) for z in shared if getattr(z, _ORIGIN, None) is not None]


def check_detached(losses: Sequence[Tensor], shared: Sequence[Tensor]) -> None:
    """Refuse losses that depend on a trainable tensor besides the ``shared`` leaves (the
    detached form's backward from the origins would miss its gradient)."""
    leaves = _trainable_leaves(losses, shared)
    if leaves:
        shapes = ", ".join(str(tuple(t.shape)) for t in leaves[:4])
        raise ValueError(
            f"the losses depend on {len(leaves)} trainable tensor(s) besides the detached shared tensor(s) "
            f"(shapes {shapes}): the detached shared form is valid only when no trainable parameter lies between "
            "the shared tensor and the losses; pass the shared tensor itself (not detach_shared's copy), or use "
            "gram='exact'"
        )


def detached_shared_grads(shared: Tensor, loss_fn: Callable[[Tensor], Sequence[Tensor]]) -> tuple[Tensor, Tensor]:
    """Per-objective gradients w.r.t. a detached copy of ``shared``, with no FSDP collective.

    Args:
        shared: the shared tensor (e.g. a model's output, or a predicted velocity), on the
            FSDP graph; it is not touched.
        loss_fn: ``z -> [L_1(z), ..., L_K(z)]``: the K scalar losses computed from a tensor
            shaped like ``shared``. It must use no trainable parameter: the form is valid only
            when nothing trainable lies between the shared tensor and the losses.

    Returns:
        ``(rows [K, shared.numel()] float32-or-shared's dtype, values [K] float64)``: row k is
        ``∂L_k/∂shared`` flattened, values the loss values.

    Raises:
        ValueError: when a loss depends on a trainable tensor other than ``shared`` (then the
            weighted backward from ``shared`` would miss that tensor's gradient): use the exact
            source, or the shared source without the detached form.
    """
    z = shared.detach().requires_grad_(True)
    losses = list(loss_fn(z))
    leaves = _trainable_leaves(losses, z)
    if leaves:
        shapes = ", ".join(str(tuple(t.shape)) for t in leaves[:4])
        raise ValueError(
            f"the losses depend on {len(leaves)} trainable tensor(s) besides the shared tensor (shapes {shapes}): "
            "the detached shared form is valid only when no trainable parameter lies between the shared tensor "
            "and the losses; use the shared source without detaching, or the exact source"
        )
    rows = torch.zeros(len(losses), z.numel(), dtype=z.dtype, device=z.device)
    for k, loss in enumerate(losses):
        (g,) = torch.autograd.grad(loss, z, retain_graph=k < len(losses) - 1, allow_unused=True)
        if g is not None:
            rows[k].copy_(g.reshape(-1))
    values = torch.stack([loss.detach().to(torch.float64) for loss in losses])
    return rows, values


def shared_backward(shared: Tensor, rows: Tensor, weights: Tensor | Sequence[float]) -> None:
    """ONE ordinary (FSDP) backward of ``Σ_k w_k L_k``, started at ``shared``.

    ``shared.backward(Σ_k w_k ∂L_k/∂shared)`` equals ``(Σ_k w_k L_k).backward()`` when the losses
    depend on the parameters only through ``shared`` (checked by ``detached_shared_grads``):
    FSDP's hooks run once, as in a plain step, and accumulate into ``p.grad``.

    Args:
        shared: the shared tensor, still on the FSDP graph.
        rows: ``[K, shared.numel()]`` from ``detached_shared_grads``.
        weights: ``[K]`` per-loss weights ``w_k``.
    """
    w = torch.as_tensor(weights, dtype=torch.float64).to(rows.device)
    direction = (w @ rows.to(torch.float64)).to(shared.dtype).reshape(shared.shape)
    shared.backward(direction)
