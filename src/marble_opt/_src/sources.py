"""Gram sources: how the K×K matrix of per-objective gradient products is measured.

A source does two things for the optimizer and nothing else:

- ``gram(losses, ...)`` measures ``G_kl = ⟨g_k, g_l⟩`` (float64 numpy, K×K) for its notion
  of ``g_k``;
- ``apply(w, losses, ...)`` accumulates the combined gradient ``Σ_k w_k ∇L_k`` (plus the
  gradient of an unbalanced ``extra`` loss) into ``p.grad`` of the trainable parameters,
  returning False (and leaving ``p.grad`` as it was) if that gradient is not finite.

Sources:

- ``exact``: K backward passes over all trainable parameters, gradients kept in one
  K×N buffer; the update is combined from the buffer (no further pass). Memory K×N.
- ``exact-lean``: the same G, but each gradient is moved to host memory as soon as it is
  computed (one full gradient on the accelerator at a time), then one backward of
  ``Σ w_k L_k`` (K+1 passes). Saves accelerator memory, not host memory.
- ``shared``: gradients w.r.t. user-given shared tensors (a trunk's features, a diffusion
  model's predicted velocity); those passes stop at the tensors, then one full backward.
  A cheaper approximation of the paper's G (MGDA-UB).
- ``params``: exact gradients restricted to a named parameter subset (last layer, LoRA B
  matrices), then one full backward.

G is always accumulated in float64. Buffers whose size does not change between steps (the
K×N gradient rows, the float64 conversion block) are kept by the source and reused: a
fresh multi-MB CPU allocation per step is paid again in page faults. The amortized sources
cost, beyond a plain step, K backward passes through the ops after the shared tensors /
named parameters, the Gram (K²·n float64 multiply-adds) and one finiteness check of the
combined gradient (``all_finite``).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Sequence
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from .distributed import Collective

__all__ = [
    "GRAM_SOURCES",
    "ExactLeanSource",
    "ExactSource",
    "GramSource",
    "ParamsSource",
    "SharedSource",
    "all_finite",
    "CombinedGradient",
    "device_finite",
    "combined_backward",
    "make_source",
]

#: Bytes of one float64 block when forming G from a K×N buffer of another dtype or device:
#: on CPU a block that stays in cache. Converting a whole K×N float32 buffer at once costs
#: page faults on a fresh allocation and was 7× slower (53 ms against 7.5 ms for K=8,
#: N=0.8 M, one thread).
_GRAM_BLOCK_BYTES = {"cpu": 1 << 22}
_GRAM_BLOCK_BYTES_DEFAULT = 1 << 26
#: Up to this K the CPU Gram is formed row by row (matrix-vector products), above it as one
#: matrix product per block (measured at K=16: 11.4 ms row by row against 12.8 ms).
_GRAM_ROWWISE_MAX_K = 16


class _GramWorkspace:
    """The float64 conversion block of a source's Gram products, kept between steps.

    A fresh multi-MB CPU allocation every step is paid in page faults (measured: a 4 MB
    block allocated per step made the Gram of 8 gradients of 65 k entries 8× slower inside
    a training step than in isolation).
    """

    def __init__(self) -> None:
        self.block: Tensor | None = None

    def gram(
        self, rows: Tensor, device: torch.device | None = None, carry: Tensor | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """``rows @ rowsᵀ`` (K×K) accumulated in float64, over column blocks, and ``carry``
        read to the host in the same transfer (None if not given).

        ``device``: where to multiply (default: ``rows.device``); host rows are moved there
        one block at a time (``exact-lean`` keeps its rows in pinned host memory). float64
        rows already on ``device`` are multiplied in place, block by block, with no copy.
        ``carry``: a 1-D float64 tensor (the optimizer's loss values) to bring along.
        """
        k, n = rows.shape
        device = rows.device if device is None else torch.device(device)
        budget = _GRAM_BLOCK_BYTES.get(device.type, _GRAM_BLOCK_BYTES_DEFAULT)
        step = min(n, max(1024, budget // (8 * k)))
        in_place = rows.dtype == torch.float64 and rows.device == device
        if not in_place:
            self.block = _reuse(self.block, (k, step), torch.float64, device)
        out = torch.zeros((k, k), dtype=torch.float64, device=device)
        # On CPU the upper triangle, one row at a time (``G[i, i:] += block[i:] @ block[i]``):
        # K(K+1)/2 products instead of K², and MKL's float64 matrix-vector product beats its
        # K×B·B×K product here (measured, one thread, N = 1 M: 2.7 ms against 3.4 ms at
        # K=4, 8.5 against 13 ms at K=8). Elsewhere one ``addmm_`` per block (one launch).
        rowwise = device.type == "cpu" and k <= _GRAM_ROWWISE_MAX_K
        for start in range(0, n, step):
            stop = min(n, start + step)
            if in_place:
                block = rows[:, start:stop]
            else:
                block = self.block[:, : stop - start]
                block.copy_(rows[:, start:stop], non_blocking=True)
            if rowwise:
                for i in range(k):
                    out[i, i:].addmv_(block[i:], block[i])
            else:
                out.addmm_(block, block.T)
        if carry is None:
            g, carried = out.cpu().numpy(), None
        else:  # one device-to-host transfer for both
            c = carry.numel()
            if carry.device != out.device or carry.dtype != torch.float64:
                carry = carry.to(device=out.device, dtype=torch.float64)
            host = torch.cat([carry.reshape(-1), out.reshape(-1)])
            host = host.cpu().numpy()
            g, carried = host[c:].reshape(k, k), host[:c]
        if rowwise:  # the strict lower triangle is zero: mirror the upper one (exactly)
            return g + np.triu(g, 1).T, carried
        return 0.5 * g + 0.5 * g.T, carried  # halves first: no overflow near float64's maximum


def all_finite(tensors: Sequence[Tensor]) -> bool:
    """Whether every entry of every tensor is finite (one device sync).

    Fast path: a tensor is finite when its sum is (a NaN entry makes the sum NaN, an
    infinite one makes it infinite or NaN), and a sum reads each entry once with no
    boolean temporaries: several times cheaper than ``isfinite().all()`` per tensor, and
    cheaper than the norms (measured, 22 tensors of 0.9 M entries: 127 µs against 198 µs
    for ``torch._foreach_norm``). Half-precision tensors are summed in float32. A sum can
    also overflow on finite values, so a non-finite sum is confirmed entry by entry before
    answering False.
    """
    if not tensors:
        return True
    return bool(finite_sums(tensors)) or entrywise_finite(tensors)


def finite_sums(tensors: Sequence[Tensor]) -> Tensor:
    """A 0-dim bool tensor on the first tensor's device: whether every tensor's sum is
    finite (True proves every entry finite; False may be an overflow: ``entrywise_finite``).
    No host read: the caller reads it, possibly together with other values."""
    device = tensors[0].device
    sums = [t.sum(dtype=torch.float32) if t.dtype in (torch.float16, torch.bfloat16) else t.sum() for t in tensors]
    try:
        stacked = torch.stack(sums)
    except RuntimeError:  # mixed devices
        stacked = torch.stack([v.to(device, torch.complex128 if v.is_complex() else torch.float64) for v in sums])
    return stacked.isfinite().all()


def entrywise_finite(tensors: Sequence[Tensor]) -> bool:
    """Whether every entry is finite, checked entry by entry (after a non-finite sum)."""
    return bool(_entrywise_flag(tensors))


def _entrywise_flag(tensors: Sequence[Tensor]) -> Tensor:
    """On the first tensor's device, unread: ``isfinite().all()`` of every tensor, together."""
    device = tensors[0].device
    return torch.stack([t.isfinite().all().to(device) for t in tensors]).all()


def device_finite(tensors: Sequence[Tensor]) -> Tensor:
    """Whether every entry of every tensor is finite, as a 0-dim bool tensor on the first
    tensor's device, with no host read; exact entry by entry (a sum can overflow on finite
    values). ``GradScaler``'s fused check, one kernel per device and dtype (it multiplies by
    1.0 in place, which leaves every value as it was); ``isfinite().all()`` per tensor where
    that kernel refuses a dtype."""
    device = tensors[0].device
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        t = torch.view_as_real(t) if t.is_complex() else t
        groups.setdefault((t.device, t.dtype), []).append(t)
    found = []
    for (dev, _), group in groups.items():
        inf = torch.zeros((), dtype=torch.float32, device=dev)
        try:
            torch._amp_foreach_non_finite_check_and_unscale_(group, inf, torch.ones((), device=dev))
        except (RuntimeError, NotImplementedError):
            inf = (~_entrywise_flag(group)).to(torch.float32)
        # to the host: a blocking copy (a non-blocking one into pinned memory would be read too soon)
        found.append(inf.to(device, non_blocking=device.type != "cpu"))
    return torch.stack(found).sum() == 0


def _weighted_sum(losses: Sequence[Tensor], w: np.ndarray, extra: Tensor | None) -> Tensor | None:
    """``Σ_{k: w_k ≠ 0} w_k L_k (+ extra)``; objectives with zero weight are left out, so a
    non-finite excluded objective cannot poison the sum through 0·inf."""
    total = None
    for loss, wk in zip(losses, w):
        if wk != 0.0:
            term = loss * float(wk)
            total = term if total is None else total + term
    if extra is not None:
        total = extra if total is None else total + extra
    return total


class CombinedGradient:
    """The gradient of ``Σ w_k L_k (+ extra)``, computed but not yet checked or committed.

    Written straight into ``p.grad`` when no parameter has a gradient yet (so DDP's reducer
    sees the pass), else held apart. ``finite_flag()`` gives the on-device flag to read
    (with whatever else the caller reads in the same transfer); then ``commit()`` adds a
    held gradient to ``p.grad`` and ``undo()`` leaves every ``p.grad`` as it was before.
    """

    def __init__(self, params: Sequence[Tensor], grads: Sequence[Tensor | None], into_grad: bool) -> None:
        self.params = params
        self.grads = grads
        self.into_grad = into_grad
        self.present = [g for g in grads if g is not None]

    @classmethod
    def compute(
        cls,
        losses: Sequence[Tensor],
        w: np.ndarray,
        params: Sequence[Tensor],
        extra: Tensor | None,
        *,
        retain_graph: bool = False,
    ) -> CombinedGradient:
        """One backward of ``Σ_{w_k ≠ 0} w_k L_k (+ extra)``; ``ValueError`` (with ``p.grad``
        as it was) for a sparse gradient."""
        total = _weighted_sum(losses, w, extra)
        into_grad = all(p.grad is None for p in params)
        grads: Sequence[Tensor | None] = ()
        if total is not None:
            if into_grad:
                torch.autograd.backward(total, inputs=list(params), retain_graph=retain_graph)
                grads = [p.grad for p in params]
            else:
                grads = torch.autograd.grad(total, list(params), allow_unused=True, retain_graph=retain_graph)
        out = cls(params, grads, into_grad and total is not None)
        try:
            _require_dense(grads, "the combined loss")
        except ValueError:
            out.undo()
            raise
        return out

    def finite_flag(self) -> Tensor | None:
        """On-device ``finite_sums`` of the new gradient (None when there is none)."""
        return finite_sums(self.present) if self.present else None

    def is_finite(self, flag: bool = True) -> bool:
        """Whether every entry is finite, given the read ``flag`` (a non-finite sum may be an
        overflow of finite entries: confirmed entry by entry)."""
        return flag or entrywise_finite(self.present)

    def commit(self) -> None:
        if not self.into_grad:
            _accumulate(self.params, self.grads)

    def undo(self) -> None:
        if self.into_grad:
            for p in self.params:
                p.grad = None


def combined_backward(
    losses: Sequence[Tensor],
    w: np.ndarray,
    params: Sequence[Tensor],
    extra: Tensor | None,
    *,
    in_place: bool = False,
    retain_graph: bool = False,
) -> bool:
    """One backward of ``Σ w_k L_k (+ extra)``, accumulated into ``p.grad`` of ``params``.

    Returns False, with every ``p.grad`` as it was before, if the new gradient is not
    finite (``CombinedGradient``: into ``p.grad`` when no parameter has a gradient yet, so
    DDP's reducer sees it, and cleared again on failure; otherwise computed apart, checked,
    then added). ``in_place`` (under ``torch.distributed``): always
    ``torch.autograd.backward``, so DDP's reducer also sees the synchronised pass that
    follows ``no_sync`` micro-batches; a non-finite result then stays in ``p.grad`` (the
    caller skips the step). ``retain_graph``: keep the graph, so that a caller can find
    which loss was not finite.
    """
    if in_place and any(p.grad is not None for p in params):
        total = _weighted_sum(losses, w, extra)
        if total is None:
            return True
        torch.autograd.backward(total, inputs=list(params), retain_graph=retain_graph)
        _require_dense([p.grad for p in params], "the combined loss")
        return all_finite([p.grad for p in params if p.grad is not None])
    grad = CombinedGradient.compute(losses, w, params, extra, retain_graph=retain_graph)
    flag = grad.finite_flag()
    if grad.is_finite(True if flag is None else bool(flag)):
        grad.commit()
        return True
    grad.undo()
    return False


def _accumulate(params: Sequence[Tensor], grads: Iterable[Tensor | None]) -> None:
    for p, g in zip(params, grads):
        if g is None:
            continue
        g = g.to(p.dtype)
        if p.grad is None:
            p.grad = g
        else:
            p.grad.add_(g)


def _grads_of(loss: Tensor, inputs: Sequence[Tensor], *, retain_graph: bool) -> tuple[Tensor | None, ...]:
    return torch.autograd.grad(loss, list(inputs), retain_graph=retain_graph, allow_unused=True)


def _real_flat(g: Tensor) -> Tensor:
    """``g`` flattened, a complex tensor as its (real, imaginary) pairs: then the dot product
    of two rows is ``Re⟨g_k, g_l⟩``, the inner product of ℂⁿ seen as ℝ²ⁿ."""
    return torch.view_as_real(g).reshape(-1) if g.is_complex() else g.reshape(-1)


def _numels(tensors: Sequence[Tensor]) -> list[int]:
    """Entries of each tensor in a real row (2 per complex entry)."""
    return [t.numel() * (2 if t.is_complex() else 1) for t in tensors]


def _as_param(seg: Tensor, p: Tensor) -> Tensor:
    """A real row segment back in the shape (and complex dtype) of ``p``."""
    if p.is_complex():
        return torch.view_as_complex(seg.reshape(*p.shape, 2).contiguous())
    return seg.view_as(p)


def _flatten_into(row: Tensor, grads: Sequence[Tensor | None], numels: Sequence[int]) -> None:
    """Write the flattened ``grads`` (zeros for None; complex as real pairs) into the 1-D ``row`` (N,), converting to
    ``row``'s dtype: one ``torch.cat`` into it (measured, 58 parameters: 110 µs against 180 µs
    for a ``copy_`` per parameter)."""
    if any(g is None for g in grads):
        parts = [row.new_zeros(n) if g is None else _real_flat(g) for g, n in zip(grads, numels)]
    else:
        parts = [_real_flat(g) for g in grads]
    torch.cat(parts, out=row)


class GramSource(abc.ABC):
    """Interface between the optimizer and one way of measuring G (see module docstring)."""

    name: ClassVar[str]
    #: The ranks to average over (set by the optimizer; a single process by default).
    comm: Collective = Collective(False)

    @abc.abstractmethod
    def gram(
        self,
        losses: Sequence[Tensor],
        names: Sequence[str],
        params: Sequence[Tensor],
        shared: Sequence[Tensor] | None,
        *,
        keep_graph: bool,
    ) -> np.ndarray:
        """Raw Gram matrix (K×K float64). ``keep_graph``: the graph is needed afterwards."""

    def apply(
        self,
        w: np.ndarray,
        losses: Sequence[Tensor],
        params: Sequence[Tensor],
        extra: Tensor | None,
        *,
        defer: bool | str = False,
    ) -> bool | Tensor:
        """Accumulate ``Σ w_k ∇L_k (+ ∇extra)`` into ``p.grad``; False if not finite.

        Under ``torch.distributed`` this is an ordinary backward: DDP averages it.
        ``defer`` (``skip_on_device``): the gradient is added whatever it holds, and its
        finiteness returned as an on-device 0-dim bool tensor (``device_finite``), not read;
        ``defer="quiet"``: not even computed (the step checks every ``p.grad`` itself)."""
        if defer:
            grad = CombinedGradient.compute(losses, w, params, extra)
            flag = device_finite(grad.present) if defer != "quiet" and grad.present else None
            grad.commit()
            return True if flag is None else flag
        return combined_backward(losses, w, params, extra, in_place=self.comm.active)

    def release(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Drop any per-step buffers."""

    #: Attributes holding scratch buffers kept between steps: left out of pickles and copies.
    _SCRATCH: ClassVar[tuple[str, ...]] = ("_buffer", "_storage", "_host", "_rows_buf", "_gram_ws", "carry")

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for key in self._SCRATCH:
            if key in state:
                state[key] = None
        return state

    #: Set by the optimizer around ``gram()``: a 1-D float64 device tensor (the loss values)
    #: that ``_gram`` brings to the host with G in one transfer, as ``carried`` (numpy).
    carry: Tensor | None = None

    def _gram(self, rows: Tensor, device: torch.device | None = None) -> np.ndarray:
        """``rows @ rowsᵀ`` (K×K) in float64, with this source's conversion block kept between
        steps; ``self.carry`` (if set) comes along in the same transfer, as ``self.carried``."""
        ws = self.__dict__.get("_gram_ws")
        if ws is None:
            ws = self._gram_ws = _GramWorkspace()
        g, carried = ws.gram(rows, device, self.carry)
        if carried is not None:
            self.carried = carried
        return g

    def _rows(self, shape: tuple[int, int], like: Sequence[Tensor]) -> Tensor:
        """The K×n buffer (float32 or wider) for gradients w.r.t. ``like``, kept between
        steps. Not float64: under ``torch.distributed`` it is all-reduced as it is."""
        buf = _reuse(self.__dict__.get("_rows_buf"), shape, _grad_dtype(like), like[0].device)
        self._rows_buf = buf
        return buf

    def check_shared(self, shared: Sequence[Tensor] | None) -> None:
        """Reject a ``shared`` argument this source would ignore."""
        if shared is not None:
            raise ValueError(f"shared= is only used by gram='shared'; this optimizer uses gram={self.name!r}")


def _require_path(grads: Sequence[Tensor | None], name: str, what: str) -> None:
    if all(g is None for g in grads):
        raise ValueError(f"loss {name!r} has no path to {what}: its gradient there is undefined")
    _require_dense(grads, f"loss {name!r}")


def _require_dense(grads: Sequence[Tensor | None], what: str) -> None:
    """``ValueError`` naming the first sparse gradient (index into ``grads``, shape, layout)."""
    for i, g in enumerate(grads):
        if g is not None and g.layout != torch.strided:
            raise ValueError(
                f"{what} gives parameter #{i} (shape {tuple(g.shape)}) a sparse gradient ({g.layout}), e.g. from "
                "nn.Embedding(sparse=True): MarbleOptimizer needs dense gradients; build that module with sparse=False"
            )


def _grad_dtype(params: Sequence[Tensor]) -> torch.dtype:
    """float32, or wider if a parameter is wider (float64); real (a complex parameter's
    gradient is stored as its real and imaginary parts)."""
    dtype = torch.float32
    for p in params:
        dtype = torch.promote_types(dtype, p.real.dtype if p.is_complex() else p.dtype)
    return dtype


def _reuse(
    buffer: Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, *, pin: bool = False
) -> Tensor:
    """``buffer`` if it has this shape, dtype and device, else a new empty tensor.

    Large per-step buffers are kept between steps: a fresh CPU allocation of tens of MB is
    paid again in page faults on every step, a pinned one in ``cudaHostAlloc``.
    """
    if buffer is not None and buffer.shape == shape and buffer.dtype == dtype and buffer.device == device:
        return buffer
    return torch.empty(shape, dtype=dtype, device=device, pin_memory=pin)


class ExactSource(GramSource):
    """Full per-objective gradients over all trainable parameters, kept in a K×N buffer.

    The buffer is reused from step to step (it coexists with the retained graph during the
    K backward passes anyway, so keeping it does not raise the peak); the update is
    ``wᵀ·buffer``, one pass over it, with no further backward. Without an ``extra`` loss the
    update is proven finite from G (``_finite_combination``), so it is never read again.
    (Keeping the K per-parameter gradient sets instead of copying them into the buffer was
    slower on CPU: fresh multi-MB allocations every step are paid in page faults.)
    """

    name = "exact"

    def __init__(self) -> None:
        self._buffer: Tensor | None = None  # this step's gradients (None outside a step)
        self._storage: Tensor | None = None  # kept between steps
        self._used: list[bool] = []  # which parameters this step's losses reach
        self._norms: np.ndarray | None = None  # ‖g_k‖ (K,) from this step's G

    def gram(self, losses, names, params, shared, *, keep_graph):
        self.check_shared(shared)
        numels = _numels(params)
        shape = (len(losses), sum(numels))
        buf = self._storage = _reuse(self._storage, shape, _grad_dtype(params), params[0].device)
        last = len(losses) - 1
        used = [False] * len(params)  # a parameter no loss reaches keeps p.grad as it is (None)
        for k, loss in enumerate(losses):
            grads = _grads_of(loss, params, retain_graph=keep_graph or k < last)
            _require_path(grads, names[k], "any trainable parameter")
            _flatten_into(buf[k], grads, numels)
            used = [u or g is not None for u, g in zip(used, grads)]
            del grads
        self._used = used
        self._buffer = self.comm.mean_(buf)  # autograd.grad bypasses DDP: average across ranks here
        gram = self._gram(buf)
        self._norms = np.sqrt(np.diag(gram))  # proves apply()'s update finite without reading it
        return gram

    def apply(self, w, losses, params, extra, *, defer=False):
        buf = self._buffer
        assert buf is not None, "apply() before gram()"
        idx = np.flatnonzero(w)
        if idx.size == len(w):  # one matrix-vector product over the buffer
            direction = torch.as_tensor(w, dtype=buf.dtype).to(buf.device) @ buf
        elif idx.size:  # skip excluded rows: 0 · (non-finite row) would poison the sum
            direction = buf[idx[0]] * float(w[idx[0]])
            for k in idx[1:]:
                direction.add_(buf[k], alpha=float(w[k]))
        else:
            direction = torch.zeros_like(buf[0])
        self.release()
        numels = _numels(params)
        used = list(self._used)
        if extra is not None:
            extra_grads = _grads_of(extra, params, retain_graph=False)
            _flatten_add(direction, extra_grads, numels)
            used = [u or g is not None for u, g in zip(used, extra_grads)]
            self.comm.mean_(direction)  # extra's gradient is local; the rest is already the mean
        # Without ``extra``, G proves the update finite (no pass over it, no device sync): the
        # combined rows have a finite ‖g_k‖, so finite entries, and |d_i| ≤ Σ_k |w_k| ‖g_k‖.
        norms = self._norms
        proven = extra is None and norms is not None and _finite_combination(w[idx], norms[idx], buf.dtype)
        deferred: bool | Tensor = True
        if not proven:
            if defer:  # the step checks p.grad on the device
                deferred = True if defer == "quiet" else device_finite([direction])
            elif not all_finite([direction]):
                return False
        if self.comm.active:  # ranks may differ in which parameters they reach
            used = [True] * len(params)
        # Like loss.backward(): parameters no loss reaches get no gradient (None stays None, so
        # AdamW applies no weight decay and SGD no momentum to them).
        _accumulate(
            params, [_as_param(seg, p) if u else None for seg, p, u in zip(direction.split(numels), params, used)]
        )
        return deferred

    def release(self):
        self._buffer = None


def _finite_combination(w: np.ndarray, norms: np.ndarray, dtype: torch.dtype) -> bool:
    """Whether ``Σ_k w_k g_k`` is certainly finite in ``dtype``, knowing only ``‖g_k‖`` (float64):
    every ``‖g_k‖`` finite (so every entry of ``g_k`` is) and the bound ``Σ_k |w_k| ‖g_k‖`` on
    every entry of the sum below half the largest finite value of ``dtype`` (a margin far
    above the rounding of K multiply-adds and of ``w_k`` to ``dtype``)."""
    if not len(w):
        return True
    return bool(np.isfinite(norms).all()) and float(np.abs(w) @ norms) < 0.5 * torch.finfo(dtype).max


def _flatten_add(flat: Tensor, grads: Sequence[Tensor | None], numels: Sequence[int]) -> None:
    for seg, g in zip(flat.split(list(numels)), grads):
        if g is not None:
            seg.add_(_real_flat(g).to(seg.dtype))


class ExactLeanSource(GramSource):
    """Exact G with one full gradient on the device at a time, then one combined backward.

    Each per-objective gradient is flattened and moved to host memory (pinned on CUDA,
    float32 or wider) as soon as it is computed, so the device never holds more than one of
    them; G is then formed block by block on the device from the host rows, and the update
    comes from one backward of ``Σ w_k L_k`` (K+1 passes). This saves accelerator memory,
    not host memory: the K×N host buffer is kept between steps. On a CPU device it holds the
    same memory as ``exact`` and costs one backward pass more.
    """

    name = "exact-lean"

    def __init__(self) -> None:
        self._host: Tensor | None = None

    def gram(self, losses, names, params, shared, *, keep_graph):
        self.check_shared(shared)
        numels = _numels(params)
        device = params[0].device
        dtype = _grad_dtype(params)
        shape = (len(losses), sum(numels))
        on_host = device.type == "cpu"
        host = self._host = _reuse(self._host, shape, dtype, torch.device("cpu"), pin=device.type == "cuda")
        scratch = None if on_host else torch.empty(shape[1], dtype=dtype, device=device)
        for k, loss in enumerate(losses):
            grads = _grads_of(loss, params, retain_graph=True)
            _require_path(grads, names[k], "any trainable parameter")
            if scratch is None:
                _flatten_into(host[k], grads, numels)
                del grads
                self.comm.mean_(host[k])
            else:
                _flatten_into(scratch, grads, numels)
                del grads
                # Asynchronous into pinned memory: no host wait per objective. Stream order keeps
                # it safe: the next flatten into ``scratch`` and the Gram's copies back to the
                # device come after this copy on the same stream, and the host never reads ``host``.
                host[k].copy_(self.comm.mean_(scratch), non_blocking=True)
        del scratch
        return self._gram(host, device=device)


class SharedSource(GramSource):
    """Gradients w.r.t. shared tensors (features, predicted velocity), then one backward."""

    name = "shared"

    def check_shared(self, shared):
        if shared is None:
            raise ValueError(
                "gram='shared' needs the shared tensor: call backward(losses, shared=z) with the "
                "tensor (or list of tensors) every loss is computed from"
            )
        for i, z in enumerate(shared):
            if not isinstance(z, Tensor):
                raise TypeError(f"shared[{i}] must be a torch.Tensor, got {type(z).__name__}")
            if not z.requires_grad:
                raise ValueError(
                    f"shared[{i}] (shape {tuple(z.shape)}) does not require grad: pass the tensor the "
                    "losses were computed from, not a detached copy"
                )

    def gram(self, losses, names, params, shared, *, keep_graph):
        self.check_shared(shared)
        assert shared is not None
        numels = _numels(shared)
        buf = self._rows((len(losses), sum(numels)), shared)
        reached = [False] * len(shared)
        blind = []
        for k, loss in enumerate(losses):
            grads = _grads_of(loss, shared, retain_graph=True)
            _flatten_into(buf[k], grads, numels)
            if all(g is None for g in grads):
                blind.append(names[k])
            reached = [r or g is not None for r, g in zip(reached, grads)]
        for i, z in enumerate(shared):
            if not reached[i]:
                raise ValueError(
                    f"shared[{i}] (shape {tuple(z.shape)}) is not on the graph of any loss: it must be the very "
                    "tensor the losses were computed from (the heads' input), not a copy or a recomputation. Under "
                    "torch.compile a returned z is a graph output, not the heads' input: compile the trunk and the "
                    "heads separately, or use gram='params' or 'exact'"
                )
        if blind:
            raise ValueError(
                f"loss {blind[0]!r} has no path to the shared tensor(s): gram='shared' needs every loss computed "
                "from them (use gram='exact' or 'params' for losses that bypass them)"
            )
        return self.comm.gram_of_mean(self._gram(buf), buf.device)  # (1/R²) Σ_r G_r


class ParamsSource(GramSource):
    """Exact gradients restricted to a parameter subset, then one full backward."""

    name = "params"

    def __init__(self, gram_params: Sequence[Tensor]) -> None:
        unique: dict[int, Tensor] = {}
        for p in gram_params:  # a parameter named twice is measured once
            unique.setdefault(id(p), p)
        self.gram_params = list(unique.values())

    def gram(self, losses, names, params, shared, *, keep_graph):
        self.check_shared(shared)
        numels = _numels(self.gram_params)
        buf = self._rows((len(losses), sum(numels)), self.gram_params)
        for k, loss in enumerate(losses):
            grads = _grads_of(loss, self.gram_params, retain_graph=True)
            _require_path(grads, names[k], "any of gram_params")
            _flatten_into(buf[k], grads, numels)
        return self._gram(self.comm.mean_(buf))


GRAM_SOURCES: dict[str, Callable[..., GramSource]] = {
    "exact": lambda gram_params=None: ExactSource(),
    "exact-lean": lambda gram_params=None: ExactLeanSource(),
    "shared": lambda gram_params=None: SharedSource(),
    "params": lambda gram_params=None: ParamsSource(gram_params),
}


def make_source(gram: str, gram_params: Sequence[Tensor] | None) -> GramSource:
    """Build the source named ``gram``; ``gram_params`` only for ``"params"``."""
    if gram not in GRAM_SOURCES:
        raise ValueError(f"gram must be one of {sorted(GRAM_SOURCES)}, got {gram!r}")
    if (gram == "params") != (gram_params is not None):
        if gram == "params":
            raise ValueError("gram='params' needs gram_params=[...], the parameters to measure G on")
        raise ValueError(f"gram_params is only used with gram='params', not gram={gram!r}")
    return GRAM_SOURCES[gram](gram_params=gram_params)
