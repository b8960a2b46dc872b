"""Data-parallel agreement: what MarbleOptimizer exchanges between ranks, when, and how much.

Under ``torch.distributed`` each rank computes its losses from a local batch. With equal local
batch sizes and losses that are means over the local batch, the loss of the whole (global)
batch is the mean of the ranks' losses and its gradient the mean of their gradients, so a
data-parallel step can equal one process on the concatenated batch. ``Collective`` is the one
place where MarbleOptimizer and its Gram sources talk to the other ranks:

- ``agree_names``: before any other collective of a ``backward``, the ranks check that they
  pass the same loss names (one all-reduce of 4 int64: a hash of the name set, whether the
  names were agreed before, and whether this rank's input checks raised) and take them in one
  order, the group's first rank's (one ``all_gather_object`` of the names, on the first call
  and after a change). Different name sets raise ``ValueError`` on every rank, naming which
  rank lacks which key, instead of a collective that hangs until the process-group timeout;
  a different dict order is not an error (averaging loss values by position would silently
  mix objectives). A rank whose checks raised makes every rank raise.
- ``mean_losses``: the losses (and the unbalanced ``extra`` loss) averaged over ranks, one
  all-reduce of K+2 float64 per ``backward``, after a source's local passes: its last entry
  says whether some rank's passes raised (then every rank raises). A loss that is non-finite
  on any rank is non-finite on every rank afterwards, so every rank takes the same
  skip/exclude decision.
- ``mean_``: a gradient buffer averaged in place (exact sources: the K×N per-objective
  gradients, before the Gram; ``autograd.grad`` never reaches DDP's reducer).
- ``gram_of_mean``: the Gram of the averaged gradient w.r.t. a tensor split over ranks (the
  ``shared`` source), from the ranks' local K×K Gram matrices: if ``z`` is the concatenation of
  the local ``z_r`` and ``L_k = (1/R) Σ_r L_k^r``, then ``∇_z L_k`` is ``(1/R) ∇_{z_r} L_k^r`` on
  block r, hence ``G = (1/R²) Σ_r G_r``.
- ``same_everywhere``: the QP's input (Gram and loss values) broadcast from the group's first
  rank, so every rank solves a bit-identical problem and takes an identical step; and, for a
  weighting that may answer differently on each rank (a callable, e.g. TorchJD's PCGrad with
  its own random draws), its weights as well.
- ``all_true``: a flag every rank agrees on (the combined backward was finite everywhere;
  needed where a backward runs without DDP's all-reduce, e.g. under ``no_sync``).

On a single process (or with ``process_group=False``) every method returns its input and
sends nothing. ``traffic`` counts the payload bytes handed to collectives, by purpose.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from collections import Counter
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["Collective"]


def _dist() -> Any:
    import torch.distributed as dist

    return dist


#: Whether this torch build has torch.distributed (checked once, not at every call).
_DIST_AVAILABLE = bool(_dist().is_available())


class Collective:
    """The ranks a MarbleOptimizer agrees with (see module docstring).

    Args:
        process_group: ``None`` (default): the default process group whenever
            ``torch.distributed`` is initialized with more than one process, checked at each
            call (so the optimizer may be built before ``init_process_group``); a
            ``ProcessGroup``: that group; ``False``: never communicate (each rank balances its
            own batch, as on one process).
    """

    def __init__(self, process_group: Any = None) -> None:
        if process_group is not None and process_group is not False:
            dist = _dist()
            if not (dist.is_available() and isinstance(process_group, dist.ProcessGroup)):
                raise TypeError(
                    f"process_group must be None, False or a torch.distributed.ProcessGroup, got {process_group!r}"
                )
        self.process_group = process_group
        #: Payload bytes handed to collectives so far, by purpose ("names", "losses", "gradients",
        #: "gram", "broadcast", "flag"); a ring all-reduce moves about 2·(R−1)/R of it per rank.
        self.traffic: Counter[str] = Counter()
        # The names every rank agreed on last (the first rank's order), and their set.
        self._agreed: tuple[str, ...] | None = None
        self._agreed_set: frozenset[str] = frozenset()

    def __getstate__(self) -> dict[str, Any]:
        # A ProcessGroup cannot be pickled: a copy falls back to the default group.
        state = self.__dict__.copy()
        if state["process_group"] is not False:
            state["process_group"] = None
        return state

    def __repr__(self) -> str:
        return f"Collective(world_size={self.world_size})"

    # ---- who ------------------------------------------------------------------------------
    def _group(self) -> Any:
        """The group to talk to, or None when there is nobody to talk to."""
        if self.process_group is False or not _DIST_AVAILABLE:
            return None
        dist = _dist()
        if not dist.is_initialized():  # one process: nothing more is touched
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    @property
    def active(self) -> bool:
        """Whether there are other ranks to agree with."""
        return self._group() is not None

    @property
    def world_size(self) -> int:
        group = self._group()
        return 1 if group is None else _dist().get_world_size(group)

    # ---- collectives ----------------------------------------------------------------------
    def _all_reduce(self, tensor: Tensor, purpose: str, group: Any, op: Any = None) -> None:
        dist = _dist()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op is None else op, group=group)
        self.traffic[purpose] += tensor.numel() * tensor.element_size()

    @staticmethod
    def _names_digest(names: frozenset[str]) -> int:
        """A 62-bit hash of a set of names, the same in every process (unlike ``hash``)."""
        text = json.dumps(sorted(names)).encode()
        return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 2

    @staticmethod
    def _object_device(group: Any) -> torch.device:
        """Where a small tensor for ``group``'s collectives lives: CUDA for NCCL, else CPU."""
        backend = str(_dist().get_backend(group)).lower()
        if "nccl" in backend and "gloo" not in backend and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def agree_names(
        self, names: tuple[str, ...], device: torch.device | None = None, failure: BaseException | None = None
    ) -> tuple[str, ...]:
        """``names`` (this rank's loss keys) in the order every rank uses: the group's first rank's.

        Call it before any other collective of a ``backward``. Every call costs one all-reduce
        of 4 int64 (32 bytes): a hash of the name set, whether it was agreed before, and whether
        this rank's input checks raised (``failure``). The first call, and any call where a
        rank's set differs from the last agreed one, adds one ``all_gather_object`` of the names
        (pickled). ``device``: for the all-reduce (default: CUDA under NCCL, else CPU).

        Raises:
            ValueError: on every rank, when the ranks' name sets differ; it names each key that
                is not on every rank and the ranks that lack it.
            The ``failure`` of any rank, on every rank (``raise_agreed``), before the names are
                compared: one rank's bad input fails the step everywhere instead of leaving the
                other ranks waiting in the next collective.
        """
        group = self._group()
        if group is None:
            if failure is not None:
                raise failure
            return names
        dist = _dist()
        key = frozenset(names)
        digest = self._names_digest(key)
        known = self._agreed is not None and key == self._agreed_set
        dev = device if device is not None else self._object_device(group)
        # MAX of (h, −h, −known, failed): all hashes equal iff max h = min h; all known iff
        # max(−known) = 0; some rank failed iff max(failed) = 1.
        t = torch.tensor([digest, -digest, 0 if known else -1, int(failure is not None)], dtype=torch.int64, device=dev)
        self._all_reduce(t, "names", group, op=dist.ReduceOp.MAX)
        if int(t[3]):
            self.raise_agreed(failure)
        same, everywhere_known = int(t[0]) == -int(t[1]), int(t[2]) == 0
        if same and everywhere_known:
            assert self._agreed is not None
            return self._agreed
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, tuple(names), group=group)
        self.traffic["names"] += len(pickle.dumps(tuple(names)))
        sets = [frozenset(g) for g in gathered]
        if any(s != sets[0] for s in sets):
            ranks = [dist.get_global_rank(group, i) for i in range(len(gathered))]
            union = sorted(frozenset().union(*sets))
            lacking = {n: [r for r, s in zip(ranks, sets) if n not in s] for n in union}
            detail = "; ".join(f"{n!r} is missing on rank(s) {rs}" for n, rs in lacking.items() if rs)
            shown = ", ".join(f"rank {r} passed {list(g)}" for r, g in list(zip(ranks, gathered))[:8])
            raise ValueError(
                f"the loss names differ across ranks: {detail} ({shown}{', ...' if len(ranks) > 8 else ''}); "
                "every rank must pass the same keys (in any order), e.g. a NaN loss with nonfinite='exclude' "
                "for an objective a rank cannot compute"
            )
        self._agreed, self._agreed_set = tuple(gathered[0]), sets[0]
        return self._agreed

    def mean_losses(self, values: np.ndarray, device: torch.device, failure: BaseException | None = None) -> np.ndarray:
        """Mean over ranks of the loss values (float64, 1-D); non-finite anywhere stays
        non-finite everywhere (a sum with a NaN or ±inf is not finite). One all-reduce of
        ``values.size + 1`` float64: the last entry counts the ranks whose local work raised
        (``failure``), and then every rank raises (``raise_agreed``)."""
        group = self._group()
        if group is None:
            if failure is not None:
                raise failure
            return values
        flat = np.concatenate([np.asarray(values, dtype=np.float64).reshape(-1), [float(failure is not None)]])
        t = torch.as_tensor(flat, dtype=torch.float64).to(device)
        self._all_reduce(t, "losses", group)
        host = t.cpu().numpy()
        if host[-1] > 0:
            self.raise_agreed(failure)
        return host[:-1] / self.world_size

    def raise_agreed(self, failure: BaseException | None) -> None:
        """Raise on every rank, once some rank failed: that rank re-raises its own exception,
        the others an exception of the same type (for the builtin ones) whose message names
        the failing rank and quotes its message (one ``all_gather_object``)."""
        group = self._group()
        dist = _dist()
        mine = None if failure is None else (type(failure).__name__, str(failure))
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, mine, group=group)
        if failure is not None:
            raise failure
        rank, (kind, message) = next((dist.get_global_rank(group, i), g) for i, g in enumerate(gathered) if g)
        exc = {"ValueError": ValueError, "TypeError": TypeError, "FloatingPointError": FloatingPointError}.get(
            kind, RuntimeError
        )
        raise exc(f"rank {rank} raised {kind} in this step, so every rank stops: {message}")

    def mean_(self, tensor: Tensor) -> Tensor:
        """Average ``tensor`` over ranks, in place (gradients); returns it."""
        group = self._group()
        if group is not None:
            self._all_reduce(tensor, "gradients", group)
            tensor.div_(_dist().get_world_size(group))
        return tensor

    def gram_of_mean(self, gram: np.ndarray, device: torch.device) -> np.ndarray:
        """``(1/R²) Σ_r G_r``: the Gram of the rank-averaged gradient w.r.t. a tensor whose
        blocks live on different ranks, from the local Gram matrices ``G_r`` (K×K float64)."""
        group = self._group()
        if group is None:
            return gram
        t = torch.as_tensor(gram, dtype=torch.float64).to(device)
        self._all_reduce(t, "gram", group)
        r = float(self.world_size)
        return (t / (r * r)).cpu().numpy()

    def gram_of_shards(self, gram: np.ndarray, device: torch.device) -> np.ndarray:
        """``Σ_r G_r``: the Gram of gradients sharded over the ranks (FSDP2: each rank holds
        disjoint entries of the rank-averaged gradients), from the partial Gram matrices."""
        group = self._group()
        if group is None:
            return gram
        t = torch.as_tensor(gram, dtype=torch.float64).to(device)
        self._all_reduce(t, "gram", group)
        return t.cpu().numpy()

    def same_everywhere(self, *arrays: np.ndarray, device: torch.device) -> tuple[np.ndarray, ...]:
        """The arrays as the group's first rank holds them (one float64 broadcast), so that
        everything computed from them is bit-identical on every rank."""
        group = self._group()
        if group is None:
            return arrays
        flat = torch.cat([torch.as_tensor(a, dtype=torch.float64).reshape(-1) for a in arrays]).to(device)
        dist = _dist()
        dist.broadcast(flat, src=dist.get_global_rank(group, 0), group=group)
        self.traffic["broadcast"] += flat.numel() * flat.element_size()
        out, start, host = [], 0, flat.cpu().numpy()
        for a in arrays:
            size = int(np.size(a))
            out.append(host[start : start + size].reshape(np.shape(a)).copy())
            start += size
        return tuple(out)

    def all_true(self, flag: bool, device: torch.device) -> bool:
        """Whether ``flag`` holds on every rank (one all-reduce of an int32)."""
        group = self._group()
        if group is None:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
        self._all_reduce(t, "flag", group, op=_dist().ReduceOp.MIN)
        return bool(t.item())
