"""``skip_on_device=True``: a non-finite step is skipped by the wrapped (fused) optimizer on the
device, as under ``GradScaler``, instead of being found on the host.

The wrapped step is handed ``found_inf`` = "some ``p.grad`` entry (or a cached step's loss
value) is not finite", checked entry by entry on the device (``sources.device_finite``); its
fused kernel then leaves parameters and optimizer state untouched, with no host read. Where
some parameter with a gradient has no optimizer state yet (a first step, whose state the
kernel would create even when skipping), the flag is read on the host instead.

What a user sees: ``backward`` adds the gradient to ``p.grad`` whatever it holds. Non-finite
losses and gradients that G shows are still skipped on the host, as under ``"skip"``.
Otherwise a non-finite gradient makes the kernel skip (parameters and its state untouched),
but ``p.grad`` keeps it (call ``zero_grad()``: until then every step skips), the step hooks
run, and the weighting's state advances as if the step had been taken; ``report.skipped``,
``report.reason`` (and a cached step's ``report.losses``) are read from the device when first
accessed. A closure runs before the check. Step through the ``MarbleOptimizer``, not the
wrapped optimizer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .sources import device_finite

__all__ = ["check_device_skip", "step_on_device"]


def check_device_skip(optimizer: torch.optim.Optimizer, nonfinite: str) -> None:
    """``ValueError`` unless ``nonfinite="skip"`` and every group of ``optimizer`` can skip a
    step on the device when told ``found_inf`` (fused Adam, AdamW, SGD: as under ``GradScaler``)."""
    if nonfinite != "skip":
        raise ValueError(f"skip_on_device=True works with nonfinite='skip', not nonfinite={nonfinite!r}")
    fused = [group.get("fused") for group in optimizer.param_groups]
    # The marker torch sets on fused optimizers is not pickled: the classes known to read
    # found_inf in their fused step count too.
    known = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad))
    if not (known or getattr(optimizer, "_step_supports_amp_scaling", False)) or not all(fused):
        raise ValueError(
            f"skip_on_device=True needs a wrapped optimizer that skips a step on the device when told "
            f"found_inf: torch.optim.Adam, AdamW or SGD built with fused=True; got {type(optimizer).__name__} "
            f"with fused={fused[0] if len(set(map(repr, fused))) == 1 else fused!r}"
        )


def _creates_state(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the wrapped step creates per-parameter state (all but SGD without momentum)."""
    return not (
        isinstance(optimizer, torch.optim.SGD) and all(g.get("momentum", 0) == 0 for g in optimizer.param_groups)
    )


def step_on_device(
    optimizer: torch.optim.Optimizer, closure: Callable[[], Any] | None, pending: Tensor | None
) -> tuple[bool, Any, Tensor | None]:
    """The wrapped step told ``found_inf`` from every ``p.grad`` (and ``pending``, the cached
    steps' loss flag): ``(stepped, closure's result, the finiteness flag)``. A closure runs
    first, so that the check sees the gradient it computes; ``stepped`` is False only for a
    first step found non-finite on the host (nothing done)."""
    check_device_skip(optimizer, "skip")  # a group added or changed since
    out = None
    if closure is not None:
        with torch.enable_grad():
            out = closure()
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not params:
        optimizer.step()
        return True, out, None
    flag = device_finite([p.grad for p in params])
    if pending is not None:
        flag = flag & pending.to(flag.device)
    if any(not optimizer.state.get(p) for p in params) and _creates_state(optimizer):
        if not bool(flag):
            return False, out, flag
        optimizer.step()
        return True, out, flag
    saved = {name: optimizer.__dict__[name] for name in ("found_inf", "grad_scale") if name in optimizer.__dict__}
    optimizer.found_inf = (~flag).to(torch.float32)
    optimizer.grad_scale = None
    try:
        optimizer.step()
        return True, out, flag
    finally:
        for name in ("found_inf", "grad_scale"):
            if name in saved:
                setattr(optimizer, name, saved[name])
            else:
                optimizer.__dict__.pop(name, None)
