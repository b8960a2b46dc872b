"""What the micro-batches since the last optimizer step did, until the step commits it.

``Accumulation`` holds, between ``zero_grad()``/``step()`` calls:

- ``skip``: a micro-batch skipped (non-finite input): the step is not taken;
- ``device_flag`` (``skip_on_device``): the cached micro-batches' loss-value finiteness, on the
  device, unread, AND-ed into the step's ``found_inf``;
- ``stale``: the gradients as the last micro-batch left them while it holds a skip or a flag.
  A skip whose ``step()`` never came (``GradScaler`` does not call it on an overflow) is
  forgotten once someone clears or replaces those gradients (``zero_grad()`` of the model,
  ``p.grad = None``): it never swallows the step of a later accumulation;
- ``written``: whether some ``backward(losses)`` of this accumulation wrote ``p.grad`` and
  ``foreign``: whether non-zero gradients were already there when the accumulation's first
  ``backward(losses)`` came (a leftover ``loss.backward()``, or a missing ``zero_grad()``);
  ``zeroed``: the zeros ``zero_grad(set_to_none=False)`` left, which are nobody's gradients.

The balancing's own pending state (the weighting's answers, the cross estimates) lives in the
``Balancer`` and is committed by its ``step()``.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["FOREIGN_GRADIENTS", "Accumulation", "GradMark", "grad_mark", "same_grads"]

#: The warning (once per optimizer) when ``step()`` finds gradients nobody balanced.
FOREIGN_GRADIENTS = (
    "MarbleOptimizer.step() found gradients that no backward(losses) of this accumulation wrote (a "
    "loss.backward() before opt.step(), or a missing zero_grad()): they are stepped on unbalanced. "
    "Pass the losses instead: opt.step({'name': loss, ...}) or opt.backward(losses) then opt.step(), "
    "and call opt.zero_grad() before each accumulation (warned once per optimizer)"
)

#: What a skipped backward saw of ``p.grad``: per parameter, None or (weak reference, version).
GradMark = tuple[tuple[weakref.ref, int] | None, ...]


def grad_mark(params: Sequence[Tensor]) -> GradMark:
    return tuple(None if p.grad is None else (weakref.ref(p.grad), p.grad._version) for p in params)


def same_grads(params: Sequence[Tensor], mark: GradMark) -> bool:
    """Whether every ``p.grad`` is the very tensor ``mark`` saw, not written to since."""
    if len(params) != len(mark):
        return False
    for p, m in zip(params, mark):
        if m is None or p.grad is None:
            if (m is None) != (p.grad is None):
                return False
        elif m[0]() is not p.grad or p.grad._version != m[1]:
            return False
    return True


class Accumulation:
    """The micro-batches since the last step (see the module docstring)."""

    def __init__(self) -> None:
        self.skip = False
        self.device_flag: Tensor | None = None
        self.stale: GradMark | None = None
        self.written = False
        self.foreign = False
        self.zeroed: GradMark | None = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["stale"] = state["zeroed"] = None  # weak references: a restored skip or flag is kept
        return state

    def forget_stale(self, params: Sequence[Tensor]) -> bool:
        """Drop a pending loss flag whose gradients someone cleared or replaced; say whether a
        skip is stale in that way (the caller then starts a new accumulation)."""
        if (self.skip or self.device_flag is not None) and self.stale is not None:
            if not same_grads(params, self.stale):
                if self.skip:
                    return True
                self.device_flag = None
                self.stale = None
        return False

    def mark_stale(self, params: Sequence[Tensor]) -> None:
        """After a micro-batch: remember the gradients a skip or a pending flag is about."""
        if self.skip or self.device_flag is not None:
            self.stale = grad_mark(params)

    def begin(self, params: Sequence[Tensor], warned: bool) -> None:
        """Before a micro-batch writes: the first one of an accumulation notes whether non-zero
        gradients were already there, written by something else (one host read, and only
        until the optimizer has warned once)."""
        if warned or self.written or self.skip or self.device_flag is not None:
            return
        if self.zeroed is not None and same_grads(params, self.zeroed):
            return
        present = [p.grad for p in params if p.grad is not None]
        self.foreign = bool(present) and bool(torch.stack([g.ne(0).any() for g in present]).any())

    def add_flag(self, flag: Tensor) -> None:
        self.device_flag = flag if self.device_flag is None else self.device_flag & flag

    def found_foreign(self, params: Sequence[Tensor], plain: bool) -> bool:
        """Whether the step would apply gradients that no ``backward(losses)`` of this
        accumulation wrote: noted by ``begin``, or, for a plain ``step()`` after no
        ``backward(losses)`` at all (``loss.backward(); opt.step()``), any non-zero ``p.grad``."""
        if plain and not self.written:
            present = [p.grad for p in params if p.grad is not None]
            self.foreign = bool(present) and any(bool(g.any()) for g in present)
        return self.foreign
