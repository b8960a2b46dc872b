"""The torch.optim contract of an optimizer that wraps another one.

``WrappedOptimizer`` is a real ``torch.optim.Optimizer`` (LR schedulers, ``GradScaler`` and
accelerate accept it) whose ``param_groups``, ``state`` and ``defaults`` are the wrapped
optimizer's own objects, never copies (so they never go stale after ``load_state_dict``). It
owns what torch.optim would otherwise do around a step and a state dict, and nothing of the
algorithm:

- the hook tables (step pre/post, state-dict pre/post, load-state-dict pre/post), run as
  torch.optim runs them, the step hooks around the wrapped step only (``hooked_step``);
- ``state_dict`` / ``load_state_dict``: the wrapped optimizer's, plus the subclass's own entry
  (``_extra_state`` / ``_load_extra_state``) under ``EXTRA_KEY``;
- pickling and copying (an LR scheduler's bound ``step`` wrapper is dropped).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from contextlib import nullcontext
from itertools import chain
from typing import Any

import torch
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

__all__ = ["WrappedOptimizer"]


class WrappedOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` that delegates its objects and its step to ``optimizer``."""

    #: The key of the subclass's own entry in ``state_dict()``.
    EXTRA_KEY = "extra"

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        # torch.optim.Optimizer.__init__ would build its own param_groups/state; we share the
        # wrapped optimizer's instead and set up only the hook tables it relies on.
        self.optimizer = optimizer
        self._optimizer_step_pre_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_step_post_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_pre_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_post_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: dict[int, Callable] = OrderedDict()
        self._patch_step_function()

    # ---- the wrapped optimizer's objects, shared (never copied) -------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    # ---- pickling ----------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        # torch.optim.Optimizer pickles only defaults/state/param_groups; we keep everything.
        state = self.__dict__.copy()
        # An LR scheduler replaces self.step by a wrapper bound to *this* object (unpicklable,
        # and a deepcopy would step the original); torch.optim.Optimizer never copies it.
        state.pop("step", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._patch_step_function()

    # ---- the step ------------------------------------------------------------------------
    def hooked_step(
        self, closure: Callable[[], Any] | None, inner: Callable[[Callable | None], tuple[bool, Any]]
    ) -> Any:
        """``inner(closure)`` between this optimizer's step hooks (global ones included), as
        torch.optim runs them, with the profiler's label while a profiler records. The
        pre-hooks may replace ``(args, kwargs)``, hence the closure; they receive
        ``args=(self,)`` and ``kwargs`` holding the closure if one was given. ``inner`` returns
        ``(stepped, result)``: the post-hooks run only after a step that was taken."""
        args: tuple[Any, ...] = (self,)
        kwargs: dict[str, Any] = {} if closure is None else {"closure": closure}
        # Entering a record_function costs ~30 µs per step: only while a profiler records.
        label = f"Optimizer.step#{type(self).__name__}.step"
        with torch.autograd.profiler.record_function(label) if torch.autograd._profiler_enabled() else nullcontext():
            for hook in chain(_global_optimizer_pre_hooks.values(), self._optimizer_step_pre_hooks.values()):
                result = hook(self, args, kwargs)
                if result is not None:
                    if not (isinstance(result, tuple) and len(result) == 2):
                        raise RuntimeError(
                            f"step pre-hook {hook!r} must return None or (new_args, new_kwargs), got {result!r}"
                        )
                    args, kwargs = result
            stepped, out = inner(kwargs.get("closure"))
            if not stepped:
                return out
            for hook in chain(self._optimizer_step_post_hooks.values(), _global_optimizer_post_hooks.values()):
                hook(self, args, kwargs)
        return out

    # ---- state dicts -----------------------------------------------------------------------
    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _check_extra_state(self, extra: Any) -> Any:
        """``extra`` as ``_load_extra_state`` takes it, checked before anything is loaded."""
        return extra

    def _load_extra_state(self, extra: Any) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict plus this optimizer's own entry (``EXTRA_KEY``).

        Hooks registered with ``register_state_dict_pre_hook`` / ``_post_hook`` run as on any
        torch optimizer (the post-hook sees, and may replace, the dict with the extra entry).
        A plain torch optimizer loading this dict ignores the extra entry silently.
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        sd = self.optimizer.state_dict()
        sd[self.EXTRA_KEY] = self._extra_state()
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict()``; one without the extra entry (a plain optimizer's) gives
        ``_load_extra_state(None)``.

        ``register_load_state_dict_pre_hook`` hooks may replace the dict (e.g. torch's recipe
        for another parameter order); ``_post_hook`` hooks run once everything is loaded.
        """
        state_dict = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = dict(result)
        extra = self._check_extra_state(state_dict.pop(self.EXTRA_KEY, None))  # before anything changes
        self.optimizer.load_state_dict(state_dict)
        self._load_extra_state(extra)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)
