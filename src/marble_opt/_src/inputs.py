"""The first stage of a balancing step: check what the caller passed, and gather it in one record.

Everything here is local to the process and raises ``TypeError``/``ValueError`` naming the
offending key and value before anything is measured or written. Under ``torch.distributed``
the caller agrees on the outcome with the other ranks (``Collective.agree_names``) before any
other collective, so one rank's error is every rank's error instead of a hang.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .estimators import split_halves
from .fsdp import fsdp2_mesh

__all__ = [
    "Inputs",
    "check_extra",
    "check_gram_params",
    "check_losses",
    "check_per_sample",
    "check_scalar",
    "check_shared",
    "trainable_params",
]


@dataclass(frozen=True, eq=False)
class Inputs:
    """One call's checked inputs, the objectives in the agreed order.

    Attributes:
        names: the K objective names.
        losses: K scalar losses (with ``gram_estimator="cross"``: the whole batch's means).
        per_sample: with ``"cross"``: K per-sample loss tensors (B,); else None.
        halves: with ``"cross"``: (B,) bool, True for the samples of half A; else None.
        shared: the shared tensors (``gram="shared"``) or None.
        extra: the unbalanced extra loss (scalar) or None.
        params: the trainable parameters, deduplicated, in ``param_groups`` order.
        values: (K,) or (K+1,) float64 on the losses' device, not read: the loss values and
            ``extra``'s (one conversion, one transfer when read).
        mesh: the FSDP2 device mesh when the parameters are ``fully_shard`` shards, else None.
    """

    names: tuple[str, ...]
    losses: list[Tensor]
    per_sample: list[Tensor] | None
    halves: np.ndarray | None
    shared: list[Tensor] | None
    extra: Tensor | None
    params: list[Tensor]
    values: Tensor
    mesh: Any = None

    @property
    def device(self) -> torch.device:
        return self.losses[0].device


def stacked_values(losses: Sequence[Tensor], extra: Tensor | None) -> Tensor:
    """The loss values (and ``extra``'s) as one float64 tensor on the device, unread
    (float32/16 → float64 is exact: the values are those of a per-loss ``.double()``)."""
    local = torch.stack([t.detach() for t in losses] + ([extra.detach()] if extra is not None else []))
    return local.to(torch.float64)


#: Attributes that FSDP1 (its flat parameter, the parameters flattened into it) and DeepSpeed
#: ZeRO-3 set on a parameter whose type stays ``nn.Parameter``.
_SHARD_MARKERS = frozenset({"_is_flat_param", "_fsdp_flattened", "ds_id", "ds_status"})


def trainable_params(param_groups: Iterable[Mapping[str, Any]]) -> list[Tensor]:
    """The parameters that require grad, deduplicated by identity (a parameter listed twice
    gets its gradient once), in group order. Parameters sharded by FSDP2 (``fully_shard`` on a
    1-D mesh) are accepted when all of them are (``sharding``); every other sharded layout is
    refused. Checked at every call, so parameters swapped in after construction (accelerate's
    ``prepare`` with its FSDP plugin) are seen too."""
    seen: set[int] = set()
    params = []
    unusual = False
    for group in param_groups:
        for p in group["params"]:
            if p.requires_grad and id(p) not in seen:
                # Plain parameters pass two identity tests and carry no sharding marker; anything
                # else is looked at closely. (An FSDP1 FlatParameter *is* an nn.Parameter: only its
                # marker tells it apart.)
                if (type(p) is not torch.nn.Parameter and type(p) is not Tensor) or not _SHARD_MARKERS.isdisjoint(
                    p.__dict__
                ):
                    unusual = True
                seen.add(id(p))
                params.append(p)
    if not params:
        raise ValueError("no parameter that requires grad (in the wrapped optimizer, or given to the Balancer)")
    if unusual:
        fsdp2_mesh(params)  # raises for every layout but FSDP2 on one 1-D mesh
    return params


def sharding(params: Sequence[Tensor]) -> Any:
    """The FSDP2 device mesh of ``params`` (from ``trainable_params``), or None."""
    p = params[0]
    if type(p) is torch.nn.Parameter or type(p) is Tensor:
        return None
    return fsdp2_mesh(params)


def check_gram_params(param_groups: Iterable[Mapping[str, Any]], gram_params: Any) -> list[Tensor]:
    """``gram_params`` as a list of trainable parameters of ``param_groups``, or an error naming
    the offending entry."""
    if isinstance(gram_params, Tensor):
        gram_params = [gram_params]
    gram_params = list(gram_params)
    if not gram_params:
        raise ValueError("gram_params is empty: name at least one parameter to measure G on")
    known = {id(p) for group in param_groups for p in group["params"]}
    for i, p in enumerate(gram_params):
        if not isinstance(p, Tensor):
            raise TypeError(f"gram_params[{i}] must be a tensor (a parameter), got {type(p).__name__}")
        if id(p) not in known:
            raise ValueError(f"gram_params[{i}] (shape {tuple(p.shape)}) is not a parameter of the wrapped optimizer")
        if not p.requires_grad:
            raise ValueError(
                f"gram_params[{i}] (shape {tuple(p.shape)}) does not require grad: gram='params' measures G "
                "on it; unfreeze it, or build the optimizer with gram_params it can differentiate"
            )
    return gram_params


def check_scalar(name: str, value: Any) -> Tensor:
    """A real scalar loss on the autograd graph, as a 0-dim tensor; else an error naming it."""
    if not isinstance(value, Tensor):
        raise TypeError(f"loss {name!r} must be a torch.Tensor, got {type(value).__name__}: {value!r}")
    if value.numel() != 1:
        raise ValueError(f"loss {name!r} must be a scalar, got a tensor of shape {tuple(value.shape)}")
    if value.is_complex():
        raise ValueError(
            f"loss {name!r} is complex ({value.dtype}): losses must be real; pass e.g. its .real or .abs()"
        )
    if not value.requires_grad:
        raise ValueError(
            f"loss {name!r} = {float(value.detach())} does not require grad: it has no path to a "
            "trainable parameter (was it computed under torch.no_grad() or from detached tensors?)"
        )
    return value if value.dim() == 0 else value.reshape(())  # no view node for a scalar


def check_extra(extra: Tensor | None) -> Tensor | None:
    return None if extra is None else check_scalar("extra", extra)


def check_keys(losses: Any, what: str = "scalar loss") -> tuple[str, ...]:
    """The keys of a non-empty ``{str: tensor}`` mapping."""
    if not isinstance(losses, Mapping):
        raise TypeError(f"losses must be a dict {{name: {what}}}, got {type(losses).__name__}")
    if not losses:
        raise ValueError("losses is empty: pass at least one {name: loss}")
    for key in losses:
        if not isinstance(key, str):
            raise TypeError(f"loss names must be strings, got {key!r} ({type(key).__name__})")
    return tuple(losses)


def check_known(keys: Sequence[str], known: tuple[str, ...] | None) -> None:
    """The same objectives as the first call (any order), else an error naming the difference."""
    if known is None:
        return
    missing = [n for n in known if n not in keys]
    new = [n for n in keys if n not in known]
    if missing or new:
        raise ValueError(
            f"the objectives changed since the first step: missing {missing}, new {new} "
            f"(expected {list(known)}); pass a NaN loss to leave one out for a step with "
            "nonfinite='exclude', or call reset_weights() (a Balancer: reset()) to start over with new objectives"
        )


def check_losses(losses: Any, known: tuple[str, ...] | None) -> dict[str, Tensor]:
    """``{name: 0-dim loss}`` in the caller's order, every entry checked."""
    keys = check_keys(losses)
    check_known(keys, known)
    return {n: check_scalar(n, losses[n]) for n in keys}


def check_per_sample(losses: Any, known: tuple[str, ...] | None) -> tuple[dict[str, Tensor], int]:
    """``gram_estimator="cross"``: ``{name: (B,) per-sample losses}`` (same B ≥ 2 for all) and B."""
    keys = check_keys(losses, "per-sample losses")
    check_known(keys, known)
    batch = None
    out = {}
    for name in keys:
        value = losses[name]
        if not isinstance(value, Tensor):
            raise TypeError(f"loss {name!r} must be a torch.Tensor, got {type(value).__name__}: {value!r}")
        if value.dim() != 1 or value.shape[0] < 2:
            raise ValueError(
                f"gram_estimator='cross' needs per-sample losses: loss {name!r} must be a (B,) tensor "
                f"with B >= 2, got shape {tuple(value.shape)}"
            )
        if not (value.is_floating_point() or value.is_complex()):
            raise TypeError(
                f"loss {name!r} has dtype {value.dtype}: per-sample losses must be floating point tensors on the "
                "autograd graph (an integer tensor has no gradient)"
            )
        if batch is None:
            batch = value.shape[0]
        elif value.shape[0] != batch:
            raise ValueError(
                f"loss {name!r} has {value.shape[0]} per-sample values, but the first loss has {batch}: "
                "every objective needs one loss per sample of the same batch"
            )
        out[name] = value
    assert batch is not None
    return out, batch


def check_halves(batch: int, groups: Any) -> np.ndarray:
    """The half-A mask of ``split_halves``, refusing a split that leaves a half empty."""
    mask = split_halves(batch, groups)
    if mask.all() or not mask.any():
        raise ValueError(f"groups put every sample in one half ({batch} samples): pass at least two groups")
    return mask


def check_shared(shared: Any) -> list[Tensor] | None:
    if shared is None:
        return None
    if isinstance(shared, Tensor):
        return [shared]
    if isinstance(shared, Sequence) and shared:
        return list(shared)
    raise TypeError(f"shared must be a tensor or a non-empty list of tensors, got {type(shared).__name__}")
