"""The apply stage: the one function that writes ``p.grad`` (``write_gradient``).

Every step that writes a gradient, solved or cached, deferred or not, with or without
``torch.distributed``, goes through ``write_gradient(update, params, ...)``. The update is
``Σ_m c_m ∇L_m (+ ∇extra)``, from one of two places:

- the exact source's rows (``Update.rows``, the K×N per-objective gradients averaged over
  ranks): combined as ``cᵀ·rows`` with no further backward pass;
- one backward of ``Σ_{c_m ≠ 0} c_m L_m (+ extra)`` (every other source, and cached steps).

It is added to ``p.grad`` like ``loss.backward()`` would add it (parameters no loss reaches
keep ``None``), after its finiteness is checked as the caller asks (``check``):

- ``"host"``: read to the host (with ``carry``, the loss values, in the same transfer); a
  non-finite gradient or carried value leaves every ``p.grad`` as it was;
- ``"device"``: added whatever it holds; its finiteness returned as an on-device flag, unread
  (``skip_on_device``);
- ``"step"``: added whatever it holds, not checked (the step checks every ``p.grad``).

The exact source's update is proven finite from G alone when there is no ``extra`` (every
row has a finite norm and ``Σ|c_m|‖g_m‖`` is far below the dtype's maximum): then nothing is
read. Under ``torch.distributed`` with gradients already present (``in_place``) the backward
goes straight into ``p.grad`` (so DDP's reducer sees it, also after ``no_sync``
micro-batches), and a non-finite result stays there: the caller skips the step on every rank.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .distributed import Collective
from .fsdp import split_local, write_local
from .sources import (
    _as_param,
    _finite_combination,
    _flatten_add,
    _grads_of,
    _numels,
    _require_dense,
    all_finite,
    device_finite,
    entrywise_finite,
    finite_sums,
    sharded,
)

__all__ = ["Update", "Written", "write_gradient"]


@dataclass(frozen=True, eq=False)
class Update:
    """What to add to ``p.grad``: ``Σ_m coefficients_m ∇losses_m (+ ∇extra)``.

    Attributes:
        coefficients: (M,) float64; entries equal to 0 are left out (so a non-finite excluded
            loss cannot poison the sum through 0·inf). None with ``nan=True``.
        losses: the M losses (scalars on the graph).
        extra: an unbalanced scalar loss, added after balancing, or None.
        rows: the exact source's per-objective gradients (M×N, averaged over ranks): the
            update is combined from them instead of a backward.
        used: with ``rows``: per parameter, whether a loss with a non-zero coefficient reached it.
        norms: with ``rows``: ``‖rows_m‖`` (M,) from G, which proves the update finite.
        nan: fill every ``p.grad`` with NaN instead (``nonfinite="propagate"``).
        origins: ``(leaf, origin)`` pairs of the detached shared form (``detach_shared``): the
            backward of the balanced losses stops at each leaf and goes on from its origin.
    """

    coefficients: np.ndarray | None
    losses: Sequence[Tensor] = ()
    extra: Tensor | None = None
    rows: Tensor | None = None
    used: Sequence[bool] | None = None
    norms: np.ndarray | None = None
    nan: bool = False
    origins: Sequence[tuple[Tensor, Tensor]] = ()


@dataclass(frozen=True)
class Written:
    """What ``write_gradient`` did.

    Attributes:
        finite: ``True``/``False`` (``check="host"``, or ``in_place``: read on the host), an
            on-device 0-dim bool (``"device"``), or None (not checked: proven finite, or
            ``"step"``).
        carried: the ``carry`` values read with the check (``"host"`` only), else None.
    """

    finite: bool | Tensor | None
    carried: np.ndarray | None = None


def write_gradient(
    update: Update,
    params: Sequence[Tensor],
    *,
    check: str = "host",
    carry: Tensor | None = None,
    in_place: bool = False,
    retain_graph: bool = False,
    comm: Collective | None = None,
) -> Written:
    """Add ``update`` to ``p.grad`` of ``params`` (see the module docstring); the only function
    that writes ``p.grad``.

    Args:
        update: the update.
        params: the trainable parameters (deduplicated).
        check: ``"host"``, ``"device"`` or ``"step"`` (module docstring).
        carry: with ``"host"``: a 1-D float64 device tensor read in the same transfer as the
            check (a cached step's loss values); a non-finite entry also leaves ``p.grad`` as it
            was.
        in_place: under ``torch.distributed``: backward straight into ``p.grad`` when some
            gradient is already there (DDP's reducer must see the pass).
        retain_graph: keep the graph (``nonfinite="exclude"`` looks for the culprit after).
        comm: the ranks (rows' ``extra`` gradient is averaged over them).

    Raises:
        ValueError: a sparse gradient (naming the parameter), with ``p.grad`` as it was.
    """
    if update.nan:
        for p in params:
            if p.grad is None:
                p.grad = torch.full_like(p, float("nan"))
            else:
                p.grad.fill_(float("nan"))
        return Written(finite=False)
    assert update.coefficients is not None
    if sharded(params):
        return _write_sharded(update, params, check, retain_graph, carry)
    if update.rows is not None:
        return _write_rows(update, params, check, comm)
    if in_place and any(p.grad is not None for p in params):
        combined = _combined(update, retain_graph)
        if combined is None:
            return Written(finite=True)
        torch.autograd.backward(combined[0], combined[1], inputs=list(params), retain_graph=retain_graph)
        _require_dense([p.grad for p in params], "the combined loss")
        return Written(finite=all_finite([p.grad for p in params if p.grad is not None]))

    # One backward: into p.grad when no parameter has a gradient yet (DDP's reducer sees the
    # pass; cleared again if it is refused), else apart, then added.
    combined = _combined(update, retain_graph)
    into_grad = combined is not None and all(p.grad is None for p in params)
    grads: Sequence[Tensor | None] = ()
    if combined is not None:
        roots, seeds = combined
        if into_grad:
            torch.autograd.backward(roots, seeds, inputs=list(params), retain_graph=retain_graph)
            grads = [p.grad for p in params]
        else:
            grads = torch.autograd.grad(roots, list(params), seeds, allow_unused=True, retain_graph=retain_graph)
    present = [g for g in grads if g is not None]
    try:
        _require_dense(grads, "the combined loss")
    except ValueError:
        _clear(params, into_grad)
        raise
    finite: bool | Tensor | None = None
    carried = None
    if check == "host":
        flag = finite_sums(present) if present else None
        if carry is not None:
            carried, finite = _read_with(carry, flag)
        else:
            finite = True if flag is None else bool(flag)
        ok = carried is None or bool(np.isfinite(carried).all())
        if ok and not finite:
            finite = entrywise_finite(present)  # a non-finite sum may be an overflow of finite entries
        if not (ok and finite):
            _clear(params, into_grad)
            return Written(finite=bool(finite) and ok, carried=carried)
    elif check == "device" and present:
        finite = device_finite(present)
    if not into_grad:
        _accumulate(params, grads)
    return Written(finite=finite, carried=carried)


def _write_rows(update: Update, params: Sequence[Tensor], check: str, comm: Collective | None) -> Written:
    """The exact source's update ``cᵀ·rows`` (+ extra's gradient), added to ``p.grad``."""
    rows, c = update.rows, update.coefficients
    assert rows is not None and c is not None
    idx = np.flatnonzero(c)
    if idx.size == len(c):  # one matrix-vector product over the rows
        direction = torch.as_tensor(c, dtype=rows.dtype).to(rows.device) @ rows
    elif idx.size:  # skip excluded rows: 0 · (non-finite row) would poison the sum
        direction = rows[idx[0]] * float(c[idx[0]])
        for k in idx[1:]:
            direction.add_(rows[k], alpha=float(c[k]))
    else:
        direction = torch.zeros_like(rows[0])
    numels = _numels(params)
    used = list(update.used) if update.used is not None else [True] * len(params)
    if update.extra is not None:
        extra_grads = _grads_of(update.extra, params, retain_graph=False)
        _flatten_add(direction, extra_grads, numels)
        used = [u or g is not None for u, g in zip(used, extra_grads)]
        if comm is not None:
            comm.mean_(direction)  # extra's gradient is local; the rest is already the mean
    # Without ``extra``, G proves the update finite (no pass over it, no device sync): the
    # combined rows have a finite ‖g_k‖, so finite entries, and |d_i| ≤ Σ_k |c_k| ‖g_k‖.
    norms = update.norms
    proven = update.extra is None and norms is not None and _finite_combination(c[idx], norms[idx], rows.dtype)
    finite: bool | Tensor | None = None
    if not proven:
        if check == "device":
            finite = device_finite([direction])
        elif check == "host":
            finite = all_finite([direction])
            if not finite:
                return Written(finite=False)
    # Like loss.backward(): parameters no loss reaches get no gradient (None stays None, so
    # AdamW applies no weight decay and SGD no momentum to them).
    _accumulate(params, [_as_param(seg, p) if u else None for seg, p, u in zip(direction.split(numels), params, used)])
    return Written(finite=True if finite is None and check == "host" else finite)


def _write_sharded(
    update: Update, params: Sequence[Tensor], check: str, retain_graph: bool, carry: Tensor | None
) -> Written:
    """FSDP2: the update added to the sharded ``p.grad``.

    The exact source's rows are this rank's shard entries of the rank-averaged gradients, so
    ``cᵀ·rows`` is this rank's shard of the update, written with ``fsdp.write_local`` (no
    communication). Everything else (the combined loss, ``extra``) is one ordinary backward,
    without ``inputs=``: FSDP's hooks must run (all-gather, reduce-scatter into ``p.grad``).
    Finiteness is checked on the local shards only; the caller agrees with the other ranks
    (``Collective.all_true``): a non-finite entry reaches only the rank owning its shard.
    """
    had_grads = any(p.grad is not None for p in params)
    c = update.coefficients
    assert c is not None
    if update.rows is not None:
        combined = None if update.extra is None else ([update.extra], [None])
    else:
        combined = _combined(update, retain_graph)
    if combined is not None:  # no inputs=: FSDP's hooks must run
        torch.autograd.backward(combined[0], combined[1], retain_graph=retain_graph)
    if update.rows is not None:
        rows = update.rows
        idx = np.flatnonzero(c)
        weights = torch.as_tensor(np.where(c != 0.0, c, 0.0), dtype=torch.float64)
        if idx.size:
            direction = torch.zeros(rows.shape[1], dtype=torch.float64, device=rows.device)
            for k in idx:  # skip excluded rows: 0 · (non-finite row) would poison the sum
                direction.add_(rows[k].to(torch.float64), alpha=float(weights[k]))
            for p, local in zip(params, split_local(direction, params)):
                write_local(p, local)
    present = [p.grad.to_local() for p in params if p.grad is not None]
    proven = update.rows is not None and update.extra is None
    finite: bool | Tensor | None = None
    carried = None
    if check == "host":
        finite = proven or all_finite(present)
        if carry is not None:
            carried = carry.cpu().numpy()
            finite = finite and bool(np.isfinite(carried).all())
        if not finite and not had_grads:
            _clear(params, True)
    elif check == "device" and present:
        finite = device_finite(present)
    return Written(finite=finite, carried=carried)


def _read_with(carry: Tensor, flag: Tensor | None) -> tuple[np.ndarray, bool]:
    """``carry`` and the finiteness ``flag`` in one device-to-host transfer."""
    if flag is None:
        return carry.cpu().numpy(), True
    flag = flag.reshape(1).double()
    if flag.device != carry.device:
        flag = flag.to(carry.device)
    host = torch.cat([carry, flag]).cpu().numpy()  # the one read of this step
    return host[:-1], bool(host[-1])


def _combined(update: Update, retain_graph: bool) -> tuple[list[Tensor], list[Tensor | None]] | None:
    """The roots and seed gradients of the combined backward: ``Σ c_m L_m (+ extra)``, or
    with detached shared leaves (``update.origins``) the origins seeded with the balanced
    losses' gradient w.r.t. the leaves (one short pass through the loss heads), plus
    ``extra``. None when there is nothing to backward."""
    assert update.coefficients is not None
    if not update.origins:
        total = _weighted_sum(update.losses, update.coefficients, update.extra)
        return None if total is None else ([total], [None])
    balanced = _weighted_sum(update.losses, update.coefficients, None)
    roots: list[Tensor] = []
    seeds: list[Tensor | None] = []
    if balanced is not None:
        leaves = [leaf for leaf, _ in update.origins]
        grads = torch.autograd.grad(balanced, leaves, allow_unused=True, retain_graph=retain_graph)
        for (_, origin), g in zip(update.origins, grads):
            if g is not None:
                roots.append(origin)
                seeds.append(g)
    if update.extra is not None:
        roots.append(update.extra)
        seeds.append(None)
    return (roots, seeds) if roots else None


def _weighted_sum(losses: Sequence[Tensor], c: np.ndarray, extra: Tensor | None) -> Tensor | None:
    """``Σ_{m: c_m ≠ 0} c_m L_m (+ extra)``."""
    total = None
    for loss, cm in zip(losses, c):
        if cm != 0.0:
            term = loss * float(cm)
            total = term if total is None else total + term
    if extra is not None:
        total = extra if total is None else total + extra
    return total


def _clear(params: Sequence[Tensor], into_grad: bool) -> None:
    """Undo a backward that went straight into ``p.grad`` (every one was None before)."""
    if into_grad:
        for p in params:
            p.grad = None


def _accumulate(params: Sequence[Tensor], grads: Iterable[Tensor | None]) -> None:
    for p, g in zip(params, grads):
        if g is None:
            continue
        g = g.to(p.dtype)
        if p.grad is None:
            p.grad = g
        else:
            p.grad.add_(g)
