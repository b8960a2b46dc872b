"""Any callable with TorchJD's Gramian-weighting signature: ``fn(G: Tensor (K×K)) -> Tensor (K,)``.

Some such callables keep state between calls (TorchJD's ``GradVacWeighting`` keeps an EMA of
the pairwise cosines, and marks it ``Stateful``) or draw random numbers (``PCGradWeighting``).
``CallableWeighting`` makes both safe:

- its state is made explicit: after each committed step the callable's tensors and plain
  attributes are copied into ``WeightingState.external`` (saved in ``state_dict`` and
  restored on load, so a resumed run continues bit for bit), and a step that is not taken
  puts them back as they were;
- a stateful callable always sees the full K×K Gram (the rows and columns of objectives left
  out of a step set to zero, their weights then forced to zero), so its per-objective state
  keeps its size and order;
- it says it may answer differently on each rank (``deterministic = False``): under
  ``torch.distributed`` its weights are broadcast from the first rank.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from .base import Weighting, WeightingResult, WeightingState

__all__ = ["CallableWeighting"]

#: Attributes of ``torch.nn.Module`` that are machinery, not a weighting's state.
_MODULE_MACHINERY = frozenset(vars(torch.nn.Module()))


def _plain(value: Any) -> bool:
    """A value a state dict may hold and ``torch.load(weights_only=True)`` reads back."""
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype)):
        return True
    if isinstance(value, (tuple, list)):
        return all(_plain(v) for v in value)
    return False


class CallableWeighting(Weighting):
    """Wraps ``fn`` (e.g. ``torchjd.aggregation.UPGradWeighting()``): it receives the raw Gram of
    the objectives that take part as a float64 CPU tensor (k×k, PSD; a stateful ``fn`` gets the
    full K×K with the others' rows zeroed) and returns per-loss weights (k,)."""

    name = "callable"
    deterministic = False

    def __init__(self, fn: Callable[[torch.Tensor], Any]) -> None:
        if not callable(fn):
            raise TypeError(f"weighting must be a name or a callable on a Gram matrix, got {type(fn).__name__}")
        self.fn = fn
        #: Whether ``fn`` keeps state between calls: a ``reset()`` method (TorchJD's ``Stateful``)
        #: or tensors of its own (buffers, tensor attributes).
        self.stateful = callable(getattr(fn, "reset", None)) or bool(self._snapshot(fn)["tensors"])

    def options(self) -> dict[str, Any]:
        return {"fn": self.fn}

    def __repr__(self) -> str:
        return f"CallableWeighting({self.fn!r})"

    # ---- the callable's state, explicit ------------------------------------------------------
    @staticmethod
    def _snapshot(fn: Any) -> dict[str, Any]:
        """Copies of ``fn``'s tensors (buffers, tensor attributes) and plain attributes."""
        tensors: dict[str, torch.Tensor | None] = {}
        attrs: dict[str, Any] = {}
        items = dict(vars(fn)) if hasattr(fn, "__dict__") else {}
        buffers = items.pop("_buffers", None) if isinstance(fn, torch.nn.Module) else None
        for key, value in (buffers or {}).items():
            tensors[f"_buffers.{key}"] = None if value is None else value.detach().clone()
        for key, value in items.items():
            if isinstance(fn, torch.nn.Module) and key in _MODULE_MACHINERY:
                continue
            if isinstance(value, torch.Tensor):
                tensors[key] = value.detach().clone()
            elif _plain(value):
                attrs[key] = value
        return {
            "tensors": {k: v for k, v in tensors.items() if v is not None},
            "none": sorted(k for k, v in tensors.items() if v is None),
            "attrs": attrs,
        }

    def _restore(self, snap: dict[str, Any]) -> None:
        fn = self.fn
        for key in snap.get("none", ()):
            self._set(fn, key, None)
        for key, value in snap["tensors"].items():
            self._set(fn, key, value.clone())
        for key, value in snap["attrs"].items():
            setattr(fn, key, value)

    @staticmethod
    def _set(fn: Any, key: str, value: Any) -> None:
        if key.startswith("_buffers."):
            fn._buffers[key[len("_buffers.") :]] = value
        else:
            setattr(fn, key, value)

    def state_of(self) -> dict[str, Any] | None:
        """The callable's state now (for ``WeightingState.external``), or None if stateless."""
        return self._snapshot(self.fn) if self.stateful else None

    def load(self, state: WeightingState) -> None:
        """Put the callable back in the state a commit saved (fresh when there is none)."""
        if not self.stateful:
            return
        if state.external is None:
            reset = getattr(self.fn, "reset", None)
            if callable(reset):
                reset()
            return
        self._restore(state.external)

    # ---- weighing ------------------------------------------------------------------------
    def weigh(
        self,
        gram: np.ndarray,
        losses: np.ndarray | None,
        valid: np.ndarray,
        state: WeightingState,
        names: Sequence[str] | None = None,
    ) -> WeightingResult:
        if not self.stateful or valid.all():
            return super().weigh(gram, losses, valid, state, names)
        full = np.where(np.outer(valid, valid), gram, 0.0)  # the same K, the same order, every step
        w, status = self._weights(full, losses, np.arange(valid.size), valid.size)
        w = np.where(valid, w, 0.0)
        total = float(w.sum())
        alpha = w / total if total > 0 else w.copy()
        return WeightingResult(raw=alpha.copy(), alpha=alpha, w=w, valid=valid.copy(), status=status)

    def commit(self, state: WeightingState, results: Sequence[WeightingResult]) -> WeightingState:
        new = super().commit(state, results)
        new.external = self.state_of()
        return new

    def _weights(self, gram, losses, index, k):
        out = self.fn(torch.from_numpy(np.ascontiguousarray(gram)))
        if out is None:
            raise TypeError(
                f"weighting {self.fn!r} returned None for a {gram.shape[0]}×{gram.shape[0]} Gram matrix: it must "
                "return K weights (a tensor or an array)"
            )
        if isinstance(out, torch.Tensor):
            out = out.detach().to("cpu", torch.float64).numpy()
        try:
            w = np.asarray(out, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise TypeError(f"weighting {self.fn!r} returned {out!r}: it must return K weights") from None
        if w.shape != (gram.shape[0],):
            raise ValueError(
                f"weighting {self.fn!r} returned {w.size} weights for a {gram.shape[0]}×{gram.shape[0]} Gram matrix"
            )
        if not np.isfinite(w).all():
            raise ValueError(f"weighting {self.fn!r} returned non-finite weights {w.tolist()}")
        return w, type(self.fn).__name__
