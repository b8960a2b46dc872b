"""Gram sources: how the per-objective gradients and their K×K Gram matrix are measured.

A source measures, and writes nothing: ``measure(losses, ...)`` returns ``G_kl = ⟨g_k, g_l⟩``
(float64 numpy, K×K) for its notion of ``g_k``, together with the loss values read to the
host in the same transfer. The update itself is written by ``apply.write_gradient`` (the only
writer of ``p.grad``), from the exact source's rows (``ExactSource.rows``) or from one
backward of ``Σ_k w_k L_k``.

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
fresh multi-MB CPU allocation per step is paid again in page faults. Under
``torch.distributed`` a source first does its local passes, then agrees with the other ranks
(``Collective.mean_losses``, which also carries a local error to every rank), then averages
its rows (or Gram) over the ranks.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from .distributed import Collective
from .fsdp import check_detached, check_gradient_sync, detached_origins, fsdp2_modules, per_objective_local_rows

__all__ = [
    "GRAM_SOURCES",
    "ExactLeanSource",
    "ExactSource",
    "GramSource",
    "ParamsSource",
    "SharedSource",
    "all_finite",
    "device_finite",
    "finite_sums",
    "make_source",
    "nonfinite_objectives",
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


def sharded(params: Sequence[Tensor]) -> bool:
    """Whether ``params`` are FSDP2 shards (``inputs.trainable_params`` accepts them only all
    together, on one 1-D mesh)."""
    return bool(params) and hasattr(params[0], "device_mesh")


def _local_numels(params: Sequence[Tensor]) -> list[int]:
    """Entries of each parameter's local shard (FSDP2: ``p.to_local()``)."""
    return [p.to_local().numel() for p in params]


class GramSource(abc.ABC):
    """One way of measuring G (see the module docstring). Subclasses implement ``_local`` (the
    per-objective passes on this process) and ``_reduce`` (averaging over ranks, the Gram)."""

    name: ClassVar[str]

    def measure(
        self,
        losses: Sequence[Tensor],
        names: Sequence[str],
        params: Sequence[Tensor],
        shared: Sequence[Tensor] | None,
        *,
        keep_graph: bool,
        values: Tensor,
        comm: Collective,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(G, host values)``: the raw Gram matrix (K×K float64) of the per-objective gradients
        and ``values`` (the loss values, float64 on the device) on the host.

        On one process ``values`` comes to the host in the same transfer as G. Under
        ``torch.distributed`` the local passes run first, then one all-reduce averages the
        values over ranks and tells every rank whether some rank's passes raised (then every
        rank raises, instead of waiting in the next collective), then the rows (or G) are
        averaged. ``keep_graph``: the graph is needed afterwards (a combined backward, or the
        caller's own)."""
        self.check_shared(shared)
        if not comm.active:
            local = self._local(losses, names, params, shared, keep_graph, comm)
            return self._reduce(local, params, comm, values)
        failure: BaseException | None = None
        local = None
        try:
            local = self._local(losses, names, params, shared, keep_graph, comm)
        except Exception as err:  # carried to every rank by the next all-reduce
            failure = err
        host = comm.mean_losses(values.cpu().numpy(), values.device, failure=failure)
        gram, _ = self._reduce(local, params, comm, None)
        return gram, host

    @abc.abstractmethod
    def _local(self, losses, names, params, shared, keep_graph: bool, comm: Collective) -> Tensor:
        """The per-objective gradients of this process (rows, K×n)."""

    def _reduce(
        self, rows: Tensor, params: Sequence[Tensor], comm: Collective, carry: Tensor | None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """G of the rows averaged over ranks, and ``carry`` read in the same transfer."""
        return self._gram(comm.mean_(rows), carry=carry)

    def release(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Drop any per-step buffers."""

    #: Attributes holding scratch buffers kept between steps: left out of pickles and copies.
    _SCRATCH: ClassVar[tuple[str, ...]] = ("_buffer", "_storage", "_host", "_rows_buf", "_gram_ws")

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for key in self._SCRATCH:
            if key in state:
                state[key] = None
        return state

    def _gram(
        self, rows: Tensor, device: torch.device | None = None, carry: Tensor | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """``rows @ rowsᵀ`` (K×K) in float64, with this source's conversion block kept between
        steps; ``carry`` (if given) comes along in the same transfer."""
        ws = self.__dict__.get("_gram_ws")
        if ws is None:
            ws = self._gram_ws = _GramWorkspace()
        return ws.gram(rows, device, carry)

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
    K backward passes anyway, so keeping it does not raise the peak). After ``measure`` it is
    ``rows`` (averaged over ranks), from which ``apply.write_gradient`` combines the update
    ``wᵀ·rows`` with no further backward; ``used_by(w)`` says which parameters a loss with a
    non-zero weight reached (as a backward of ``Σ_{w_k ≠ 0} w_k L_k`` would) and ``norms``
    (``‖g_k‖`` from G) proves the update finite without reading it.
    (Keeping the K per-parameter gradient sets instead of copying them into the buffer was
    slower on CPU: fresh multi-MB allocations every step are paid in page faults.)
    """

    name = "exact"

    def __init__(self) -> None:
        self._buffer: Tensor | None = None  # this step's gradients (None outside a step)
        self._storage: Tensor | None = None  # kept between steps
        self.reached: list[list[bool]] = []  # per loss: which parameters it reaches
        self._everywhere = False  # under torch.distributed: every parameter counts as reached
        self.norms: np.ndarray | None = None  # ‖g_k‖ (K,) from this step's G

    @property
    def rows(self) -> Tensor | None:
        """This step's per-objective gradients (K×N, averaged over ranks), until ``release``."""
        return self._buffer

    def _local(self, losses, names, params, shared, keep_graph, comm):
        if sharded(params):  # FSDP2: K ordinary backward passes through FSDP's reduce-scatter
            check_gradient_sync(fsdp2_modules(params))
            shape = (len(losses), sum(_local_numels(params)))
            device = params[0].to_local().device
            buf = self._storage = _reuse(self._storage, shape, _grad_dtype(params), device)
            per_objective_local_rows(losses, params, buf, retain_graph=keep_graph)
            self.reached, self._everywhere = [[True] * len(params)], True  # FSDP writes every shard
            return buf
        numels = _numels(params)
        shape = (len(losses), sum(numels))
        buf = self._storage = _reuse(self._storage, shape, _grad_dtype(params), params[0].device)
        last = len(losses) - 1
        reached = []  # a parameter no weighted loss reaches keeps p.grad as it is (None)
        for k, loss in enumerate(losses):
            grads = _grads_of(loss, params, retain_graph=keep_graph or k < last)
            _require_path(grads, names[k], "any trainable parameter")
            _flatten_into(buf[k], grads, numels)
            reached.append([g is not None for g in grads])
            del grads
        self.reached = reached
        # Under torch.distributed ranks may differ in which parameters they reach.
        self._everywhere = comm.active
        return buf

    def used_by(self, coefficients: np.ndarray) -> list[bool]:
        """Per parameter: whether a loss with a non-zero coefficient reached it, so that the
        rows' update leaves ``p.grad`` as the backward of ``Σ_{c_m ≠ 0} c_m L_m`` (the other
        sources' update, and ``Balancer.weighted_loss``'s) would: a parameter only a
        zero-weighted loss reaches keeps ``None`` (AdamW then applies no decay or momentum)."""
        n = len(self.reached[0]) if self.reached else 0
        if self._everywhere:
            return [True] * n
        used = [False] * n
        for k in np.flatnonzero(coefficients):
            used = [u or r for u, r in zip(used, self.reached[k])]
        return used

    def _reduce(self, rows, params, comm, carry):
        if sharded(params):  # FSDP averaged each row; the partial Gram matrices add up
            self._buffer = rows
            gram, carried = self._gram(rows, carry=carry)
            gram = comm.gram_of_shards(gram, rows.device)
            self.norms = np.sqrt(np.diag(gram))
            return gram, carried
        self._buffer = comm.mean_(rows)  # autograd.grad bypasses DDP: average across ranks here
        gram, carried = self._gram(rows, carry=carry)
        self.norms = np.sqrt(np.diag(gram))  # proves the update finite without reading it
        return gram, carried

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

    def _local(self, losses, names, params, shared, keep_graph, comm):
        if sharded(params):  # FSDP2: each objective's local shard straight to host memory
            check_gradient_sync(fsdp2_modules(params))
            device = params[0].to_local().device
            shape = (len(losses), sum(_local_numels(params)))
            host = self._host = _reuse(
                self._host, shape, _grad_dtype(params), torch.device("cpu"), pin=device.type == "cuda"
            )
            return per_objective_local_rows(losses, params, host, retain_graph=True)
        numels = _numels(params)
        device = params[0].device
        dtype = _grad_dtype(params)
        shape = (len(losses), sum(numels))
        on_host = device.type == "cpu"
        host = self._host = _reuse(self._host, shape, dtype, torch.device("cpu"), pin=device.type == "cuda")
        scratch = None if on_host else torch.empty(shape[1], dtype=dtype, device=device)
        failure: BaseException | None = None
        for k, loss in enumerate(losses):
            row = host[k] if scratch is None else scratch
            if failure is None:
                try:
                    grads = _grads_of(loss, params, retain_graph=True)
                    _require_path(grads, names[k], "any trainable parameter")
                    _flatten_into(row, grads, numels)
                    del grads
                except Exception as err:
                    if not comm.active:
                        raise
                    failure = err  # keep taking part in the rows' all-reduces, then raise
            if failure is not None:
                row.fill_(float("nan"))
            comm.mean_(row)  # each row as it comes: one full gradient on the device at a time
            if scratch is not None:
                # Asynchronous into pinned memory: no host wait per objective. Stream order keeps
                # it safe: the next flatten into ``scratch`` and the Gram's copies back to the
                # device come after this copy on the same stream, and the host never reads ``host``.
                host[k].copy_(scratch, non_blocking=True)
        del scratch
        if failure is not None:
            raise failure
        return host

    def _reduce(self, rows, params, comm, carry):
        if sharded(params):
            device = params[0].to_local().device
            gram, carried = self._gram(rows, device=device, carry=carry)
            return comm.gram_of_shards(gram, device), carried
        return self._gram(rows, device=params[0].device, carry=carry)  # rows already averaged, one at a time


class SharedSource(GramSource):
    """Gradients w.r.t. shared tensors (features, predicted velocity), then one backward."""

    name = "shared"

    def check_shared(self, shared):
        if shared is None:
            raise ValueError(
                "gram='shared' needs the shared tensor: call backward(losses, shared=z) (a Balancer: "
                "weights(losses, shared=z)) with the tensor (or list of tensors) every loss is computed from"
            )
        for i, z in enumerate(shared):
            if not isinstance(z, Tensor):
                raise TypeError(f"shared[{i}] must be a torch.Tensor, got {type(z).__name__}")
            if not z.requires_grad:
                raise ValueError(
                    f"shared[{i}] (shape {tuple(z.shape)}) does not require grad: pass the tensor the "
                    "losses were computed from, not a detached copy"
                )

    def _local(self, losses, names, params, shared, keep_graph, comm):
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
        if detached_origins(shared):
            check_detached(losses, shared)
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
        return buf

    def _reduce(self, rows, params, comm, carry):
        gram, carried = self._gram(rows, carry=carry)
        return comm.gram_of_mean(gram, rows.device), carried  # (1/R²) Σ_r G_r


class ParamsSource(GramSource):
    """Exact gradients restricted to a parameter subset, then one full backward."""

    name = "params"

    def __init__(self, gram_params: Sequence[Tensor]) -> None:
        unique: dict[int, Tensor] = {}
        for p in gram_params:  # a parameter named twice is measured once
            unique.setdefault(id(p), p)
        self.gram_params = list(unique.values())

    def _local(self, losses, names, params, shared, keep_graph, comm):
        if sharded(params):
            raise NotImplementedError(
                "gram='params' is not supported under FSDP2 (fully_shard): gram_params are shards off the autograd "
                "graph; use gram='shared' (the gradients w.r.t. a shared tensor), 'exact' or 'exact-lean'"
            )
        numels = _numels(self.gram_params)
        buf = self._rows((len(losses), sum(numels)), self.gram_params)
        for k, loss in enumerate(losses):
            grads = _grads_of(loss, self.gram_params, retain_graph=True)
            _require_path(grads, names[k], "any of gram_params")
            _flatten_into(buf[k], grads, numels)
        return buf


def nonfinite_objectives(losses: Sequence[Tensor], params: Sequence[Tensor], among: np.ndarray) -> np.ndarray:
    """Which objectives (among ``among``, (K,) bool) have a non-finite gradient: one backward
    each, on the retained graph (only after a combined backward failed under
    ``nonfinite="exclude"``)."""
    bad = np.zeros(len(losses), dtype=bool)
    for k in np.flatnonzero(among):
        grads = torch.autograd.grad(losses[k], list(params), retain_graph=True, allow_unused=True)
        bad[k] = not all_finite([g for g in grads if g is not None])
    return bad


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
