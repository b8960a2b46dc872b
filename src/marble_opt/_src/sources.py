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
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Sequence
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "GRAM_SOURCES",
    "ExactLeanSource",
    "ExactSource",
    "GramSource",
    "ParamsSource",
    "SharedSource",
    "all_finite",
    "combined_backward",
    "gram_float64",
    "make_source",
]

_GRAM_CHUNK = 1 << 22  # columns per float64 chunk when forming G from a K×N buffer


def gram_float64(rows: Tensor) -> np.ndarray:
    """``rows @ rowsᵀ`` (K×K) accumulated in float64, in column chunks of bounded memory."""
    k, n = rows.shape
    out = torch.zeros((k, k), dtype=torch.float64, device=rows.device)
    for start in range(0, n, _GRAM_CHUNK):
        block = rows[:, start : start + _GRAM_CHUNK].to(torch.float64)
        out.addmm_(block, block.T)
    g = out.cpu().numpy()
    return 0.5 * (g + g.T)


def _dots_float64(rows: Tensor, vec: Tensor) -> np.ndarray:
    """``rows @ vec`` (K,) accumulated in float64, in chunks of bounded memory."""
    out = torch.zeros(rows.shape[0], dtype=torch.float64, device=rows.device)
    for start in range(0, rows.shape[1], _GRAM_CHUNK):
        stop = start + _GRAM_CHUNK
        out.addmv_(rows[:, start:stop].to(torch.float64), vec[start:stop].to(torch.float64))
    return out.cpu().numpy()


def all_finite(tensors: Sequence[Tensor]) -> bool:
    """Whether every entry of every tensor is finite (one device sync)."""
    if not tensors:
        return True
    flags = [t.isfinite().all() for t in tensors]
    return bool(torch.stack([f.to(flags[0].device) for f in flags]).all())


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


def combined_backward(losses: Sequence[Tensor], w: np.ndarray, params: Sequence[Tensor], extra: Tensor | None) -> bool:
    """One backward of ``Σ w_k L_k (+ extra)``, accumulated into ``p.grad`` of ``params``.

    Returns False, with every ``p.grad`` as it was before, if the new gradient is not
    finite. When no parameter has a gradient yet it runs ``torch.autograd.backward`` (so
    DDP's reducer sees it) and clears the gradients again on failure; otherwise it
    computes the gradient apart, checks it, then adds it.
    """
    total = _weighted_sum(losses, w, extra)
    if total is None:
        return True
    if all(p.grad is None for p in params):
        torch.autograd.backward(total, inputs=list(params))
        new = [p.grad for p in params if p.grad is not None]
        if all_finite(new):
            return True
        for p in params:
            p.grad = None
        return False
    grads = torch.autograd.grad(total, list(params), allow_unused=True)
    if not all_finite([g for g in grads if g is not None]):
        return False
    _accumulate(params, grads)
    return True


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


def _flatten_into(row: Tensor, grads: Sequence[Tensor | None], numels: Sequence[int]) -> None:
    """Write the flattened ``grads`` (zeros for None) into the 1-D ``row`` (N,)."""
    for seg, g in zip(row.split(list(numels)), grads):
        if g is None:
            seg.zero_()
        else:
            seg.copy_(g.reshape(-1))


class GramSource(abc.ABC):
    """Interface between the optimizer and one way of measuring G (see module docstring)."""

    name: ClassVar[str]
    #: Whether ``apply`` runs a backward pass through the model (else it reuses stored grads).
    needs_combined_backward: ClassVar[bool] = True

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

    def apply(self, w: np.ndarray, losses: Sequence[Tensor], params: Sequence[Tensor], extra: Tensor | None) -> bool:
        """Accumulate ``Σ w_k ∇L_k (+ ∇extra)`` into ``p.grad``; False if not finite."""
        return combined_backward(losses, w, params, extra)

    def release(self) -> None:
        """Drop any per-step buffers."""

    def check_shared(self, shared: Sequence[Tensor] | None) -> None:
        """Reject a ``shared`` argument this source would ignore."""
        if shared is not None:
            raise ValueError(f"shared= is only used by gram='shared'; this optimizer uses gram={self.name!r}")


def _require_path(grads: Sequence[Tensor | None], name: str, what: str) -> None:
    if all(g is None for g in grads):
        raise ValueError(f"loss {name!r} has no path to {what}: its gradient there is undefined")


class ExactSource(GramSource):
    """Full per-objective gradients over all trainable parameters, kept in a K×N buffer."""

    name = "exact"
    needs_combined_backward = False

    def __init__(self) -> None:
        self._buffer: Tensor | None = None

    def gram(self, losses, names, params, shared, *, keep_graph):
        self.check_shared(shared)
        numels = [p.numel() for p in params]
        dtype = torch.promote_types(torch.float32, params[0].dtype)
        for p in params[1:]:
            dtype = torch.promote_types(dtype, p.dtype)
        buf = torch.empty((len(losses), sum(numels)), dtype=dtype, device=params[0].device)
        last = len(losses) - 1
        for k, loss in enumerate(losses):
            grads = _grads_of(loss, params, retain_graph=keep_graph or k < last)
            _require_path(grads, names[k], "any trainable parameter")
            _flatten_into(buf[k], grads, numels)
            del grads
        self._buffer = buf
        return gram_float64(buf)

    def apply(self, w, losses, params, extra):
        buf = self._buffer
        assert buf is not None, "apply() before gram()"
        idx = np.flatnonzero(w)
        coeffs = torch.as_tensor(w[idx], dtype=buf.dtype).to(buf.device)
        direction = coeffs @ buf[torch.as_tensor(idx, device=buf.device)] if idx.size else torch.zeros_like(buf[0])
        self.release()
        numels = [p.numel() for p in params]
        if extra is not None:
            _flatten_add(direction, _grads_of(extra, params, retain_graph=False), numels)
        if not all_finite([direction]):
            return False
        _accumulate(params, [seg.view_as(p) for seg, p in zip(direction.split(numels), params)])
        return True

    def release(self):
        self._buffer = None


def _flatten_add(flat: Tensor, grads: Sequence[Tensor | None], numels: Sequence[int]) -> None:
    for seg, g in zip(flat.split(list(numels)), grads):
        if g is not None:
            seg.add_(g.reshape(-1).to(seg.dtype))


class ExactLeanSource(GramSource):
    """Exact G with one full gradient on the device at a time, then one combined backward.

    Each per-objective gradient is flattened, moved to host memory (float32 or wider) and
    multiplied against the ones before it as soon as it is computed; the device never holds
    more than one of them. The update then comes from one backward of ``Σ w_k L_k``.
    """

    name = "exact-lean"

    def gram(self, losses, names, params, shared, *, keep_graph):
        self.check_shared(shared)
        numels = [p.numel() for p in params]
        device = params[0].device
        n = sum(numels)
        k_total = len(losses)
        pin = device.type == "cuda"
        host = torch.empty((k_total, n), dtype=torch.float32, pin_memory=pin)
        scratch = torch.empty(n, dtype=torch.float32, device=device)
        g = np.zeros((k_total, k_total))
        for k, loss in enumerate(losses):
            grads = _grads_of(loss, params, retain_graph=True)
            _require_path(grads, names[k], "any trainable parameter")
            _flatten_into(scratch, grads, numels)
            del grads
            host[k].copy_(scratch)
            g[k, : k + 1] = _dots_float64(host[: k + 1], host[k])
        return np.tril(g) + np.tril(g, -1).T


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
        numels = [z.numel() for z in shared]
        buf = torch.empty((len(losses), sum(numels)), dtype=torch.float32, device=shared[0].device)
        for k, loss in enumerate(losses):
            grads = _grads_of(loss, shared, retain_graph=True)
            _require_path(grads, names[k], "the shared tensor (is it on this loss's graph?)")
            _flatten_into(buf[k], grads, numels)
        return gram_float64(buf)


class ParamsSource(GramSource):
    """Exact gradients restricted to a parameter subset, then one full backward."""

    name = "params"

    def __init__(self, gram_params: Sequence[Tensor]) -> None:
        self.gram_params = list(gram_params)

    def gram(self, losses, names, params, shared, *, keep_graph):
        self.check_shared(shared)
        numels = [p.numel() for p in self.gram_params]
        dtype = torch.promote_types(torch.float32, self.gram_params[0].dtype)
        buf = torch.empty((len(losses), sum(numels)), dtype=dtype, device=self.gram_params[0].device)
        for k, loss in enumerate(losses):
            grads = _grads_of(loss, self.gram_params, retain_graph=True)
            _require_path(grads, names[k], "any of gram_params")
            _flatten_into(buf[k], grads, numels)
        return gram_float64(buf)


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
