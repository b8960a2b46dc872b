"""FSDP2 primitives (``marble_opt._src.fsdp``) on 2 gloo CPU processes against one process.

One module-scoped run starts ``tests/_fsdp2_worker.py`` as ranks 0 and 1; each trains every
scenario of ``SCENARIOS`` with a nested ``fully_shard`` MLP (odd widths: uneven shards) on its
half of each global batch. The reference is the same code on plain tensors in this process on
the whole batch. Contract: the Gram matrices equal the whole batch's (≤ 1e-6 of their scale),
the parameters after 4 AdamW steps equal one process's (≤ 1e-5), both ranks are bit-identical,
a non-finite value on one rank makes both skip, the collectives are counted, and every
unsupported layout is refused with its reason.
"""

from __future__ import annotations

from typing import Any

import _launch
import numpy as np
import pytest
import torch
from _fsdp2_worker import SCENARIOS, WORLD, K, train

from marble_opt._src import fsdp as F

TIMEOUT_S = 150


def run_workers(tmp_path_factory: pytest.TempPathFactory, worker: str) -> list[dict[str, Any]]:
    """``tests/<worker>`` as ranks 0 and 1; their saved results."""
    return _launch.run_workers(tmp_path_factory, worker, world=WORLD, timeout_s=TIMEOUT_S)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_workers(tmp_path_factory, "_fsdp2_worker.py")


@pytest.fixture(scope="module")
def references() -> dict[str, dict[str, Any]]:
    return {name: train(name) for name in SCENARIOS}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_sharded_gram_equals_the_whole_batch_gram(name, ranks, references):
    ref = references[name]
    compared = 0
    for res in ranks:
        assert len(res[name]["grams"]) == len(ref["grams"])
        for got, want, skipped in zip(res[name]["grams"], ref["grams"], _flat_skips(ref, name)):
            if skipped:
                continue
            scale = np.abs(want).max()
            assert scale > 1e-4
            assert np.abs(got - want).max() <= 1e-6 * scale, (name, got, want)
            compared += 1
    assert compared >= 2


def _flat_skips(ref: dict[str, Any], name: str) -> list[bool]:
    micro = SCENARIOS[name].get("micro", 1)
    return [s for s in ref["skipped"] for _ in range(micro)]


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_parameters_equal_one_process_after_adamw_steps(name, ranks, references):
    ref = references[name]
    assert len(ref["params"]) == SCENARIOS[name]["steps"] + 1
    for rank, res in enumerate(ranks):
        for step, (a, b) in enumerate(zip(res[name]["params"], ref["params"])):
            err = (a - b).abs().max().item()
            assert err <= 1e-5, f"{name}: rank {rank} after step {step} differs from one process by {err:.3g}"
        assert res[name]["skipped"] == ref["skipped"]
        # the loss values are the whole batch's (the mean over ranks)
        for got, want in zip(res[name]["values"], ref["values"]):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert (ref["params"][-1] - ref["params"][0]).abs().max() > 1e-2  # it really trains


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_both_ranks_are_bit_identical(name, ranks):
    a, b = ranks[0][name], ranks[1][name]
    for step, (pa, pb) in enumerate(zip(a["params"], b["params"])):
        assert torch.equal(pa, pb), (name, step)
    for ga, gb in zip(a["grams"], b["grams"]):
        assert np.array_equal(ga, gb, equal_nan=True)
    assert a["skipped"] == b["skipped"]


@pytest.mark.parametrize("name", [n for n, c in SCENARIOS.items() if "nan_loss" in c or "nan_grad" in c])
def test_a_nonfinite_value_on_one_rank_skips_the_step_on_both(name, ranks):
    bad = SCENARIOS[name].get("nan_loss", SCENARIOS[name].get("nan_grad"))
    for res in ranks:
        got = res[name]
        assert got["skipped"] == [step == bad for step in range(SCENARIOS[name]["steps"])], got["skipped"]
        assert torch.equal(got["params"][bad + 1], got["params"][bad])
        assert not torch.equal(got["params"][bad + 2], got["params"][bad + 1])


def test_collective_counts_are_pinned(ranks):
    """Per step, K=3 objectives, 3 fully_shard-ed Linear layers (the root holds no parameter).

    Plain FSDP: 3 all-gathers in forward, 3 again in backward (non-root modules reshard after
    forward) and 3 reduce-scatters. Exact: the forward's 3 all-gathers, then K× the backward's
    (3 all-gathers + 3 reduce-scatters), plus ONE all-reduce (the K×K Gram, the K loss values and
    the finiteness flag). The detached shared form: plain FSDP's collectives plus that all-reduce
    and one of a finiteness flag after its one backward (a non-finite entry reaches only the rank
    owning its shard). The shared form on the graph: as detached, plus 4 all-gathers (FSDP's
    pre-backward hooks fire in the K per-objective passes w.r.t. the model's output).
    """
    for res in ranks:
        plain = res["plain_counts"]
        assert plain == {"allgather_base": 6, "reduce_scatter_base": 3}, plain
        exact = {"allgather_base": 3 + K * 3, "reduce_scatter_base": K * 3, "allreduce": 1}
        for name in ("exact", "exact-nan-loss", "exact-nan-grad"):
            for counts in res[name]["counts"]:
                assert counts == exact, counts
        for counts in res["exact-accum"]["counts"]:  # two micro-batches
            assert counts == {k: 2 * v for k, v in exact.items()}, counts
        detached = dict(plain, allreduce=2)
        for name in ("detached", "detached-nan-grad"):
            for counts in res[name]["counts"]:
                assert counts == detached, counts
        for counts in res["detached-accum"]["counts"]:
            assert counts == {k: 2 * v for k, v in detached.items()}, counts
        for counts in res["shared"]["counts"]:
            assert counts == dict(detached, allgather_base=plain["allgather_base"] + 4), counts
        skipped = res["detached-nan-loss"]["skipped"]
        for step, counts in enumerate(res["detached-nan-loss"]["counts"]):
            want = dict(detached)
            if skipped[step]:  # the skipped step runs no backward: only the forward and the all-reduce
                want = {"allgather_base": 3, "allreduce": 1}
            elif step and skipped[step - 1]:
                # FSDP's own behaviour after a forward whose backward never ran (plain FSDP
                # too): its next backward all-gathers one module once more
                want["allgather_base"] += 1
            assert counts == want, (step, counts)


def test_write_local_makes_and_accumulates_the_sharded_gradient(ranks):
    first = torch.cat([torch.arange(35.0).reshape(5, 7), torch.arange(28.0).reshape(4, 7) + 100])
    for res in ranks:
        w = res["write"]
        assert w["placements"] == "(Shard(dim=0),)" and w["shape"] == (9, 7)
        assert torch.equal(w["first"], first)
        assert torch.equal(w["second"], 2 * first)
        assert not w["same_storage_as_input"]
    assert [r["write"]["local_shape"] for r in ranks] == [(5, 7), (4, 7)]  # uneven shards


EXPECTED_REFUSALS = {
    "plain": ["accepted: None"],
    "fsdp1": ["NotImplementedError", "parameter 0", "FSDP1", "fully_shard"],
    "deepspeed": ["NotImplementedError", "parameter 2", "DeepSpeed ZeRO stage 3", "ZeRO stage 1 or 2"],
    "hsdp-1x2": ["NotImplementedError", "parameter 0", "2-D device mesh (1, 2)", "HSDP", "1-D mesh"],
    "hsdp-2x1": ["NotImplementedError", "parameter 0", "2-D device mesh (2, 1)", "HSDP"],
    "tp-replicate": ["NotImplementedError", "parameter 2", "placements (Replicate(),)", "tensor parallelism"],
    "tp-shard1": ["NotImplementedError", "parameter 2", "Shard(dim=1)"],
    "tp-shard0": ["NotImplementedError", "parameter 2", "fully_shard does not manage"],
    "mixed": ["ValueError", "parameter 4 is a whole (unsharded) trainable tensor", "parameter 0", "root module"],
    "mixed-frozen": ["accepted: (2,)"],
    "two-meshes": ["ValueError", "parameter 2", "parameter 0", "same 1-D mesh"],
    "sync-off": ["ValueError", "set_requires_gradient_sync(False)", "set_requires_gradient_sync(True)"],
    "sync-on": ["accepted: 'checked'"],
}


@pytest.mark.parametrize("case", list(EXPECTED_REFUSALS))
def test_unsupported_layouts_are_refused_with_the_reason(case, ranks):
    for res in ranks:
        message = res["refusals"][case]
        for part in EXPECTED_REFUSALS[case]:
            assert part in message, (case, message)
        assert "no path" not in message


def test_fully_shard_modules_are_found_from_the_parameters(ranks):
    for res in ranks:
        assert res["refusals"]["modules"] == "FSDPLinear,FSDPLinear,FSDPLinear"


# ---- one process: the primitives on plain tensors -------------------------------------------
def test_rows_split_and_partial_gram_on_plain_tensors():
    torch.manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    grads = [[torch.randn(3, 2), None], [torch.randn(3, 2), torch.randn(4)]]
    rows = F.local_rows(grads, params, device="cpu", dtype=torch.float32)
    assert rows.shape == (2, 10)
    assert torch.equal(rows[0, 6:], torch.zeros(4))
    back = F.split_local(rows[1], params)
    assert torch.equal(back[0], grads[1][0]) and torch.equal(back[1], grads[1][1])
    gram = F.partial_gram(rows)
    assert gram.dtype == torch.float64
    torch.testing.assert_close(gram, rows.double() @ rows.double().T)
    assert F.partial_gram(rows[:, :0]).abs().max() == 0  # an empty shard contributes nothing
    with pytest.raises(ValueError, match="does not match"):
        F.split_local(rows[0, :9], params)


def test_reduce_gram_on_one_process_flags_nonfinite_values():
    gram, values, finite = F.reduce_gram(torch.eye(2, dtype=torch.float64), [1.0, 2.0], None)
    assert finite and np.array_equal(gram, np.eye(2)) and np.array_equal(values, [1.0, 2.0])
    assert not F.reduce_gram(torch.eye(2, dtype=torch.float64), [1.0, float("nan")], None)[2]
    assert not F.reduce_gram(torch.eye(2, dtype=torch.float64), [1.0, 2.0], None, local_ok=False)[2]
    with pytest.raises(ValueError, match="values has 3 entries"):
        F.reduce_gram(torch.eye(2, dtype=torch.float64), [1.0, 2.0, 3.0], None)


def test_per_objective_local_grads_restores_the_stashed_gradients():
    torch.manual_seed(2)
    lin = torch.nn.Linear(3, 2)
    frozen_path = torch.nn.Parameter(torch.ones(1))
    params = [lin.weight, lin.bias, frozen_path]
    lin.weight.grad = torch.full_like(lin.weight, 7.0)
    x = torch.randn(4, 3)
    out = lin(x)
    losses = [out[:, 0].mean(), (out**2).mean()]
    grads = F.per_objective_local_grads(losses, params)
    want = [torch.autograd.grad(loss, [lin.weight, lin.bias], retain_graph=True) for loss in losses]
    for got, exp in zip(grads, want):
        torch.testing.assert_close(got[0], exp[0])
        torch.testing.assert_close(got[1], exp[1])
        assert torch.equal(got[2], torch.zeros(1))  # an objective that does not reach a parameter
    assert torch.equal(lin.weight.grad, torch.full_like(lin.weight, 7.0)) and lin.bias.grad is None


def test_detached_shared_form_refuses_a_trainable_tensor_after_the_shared_tensor():
    torch.manual_seed(3)
    trunk = torch.nn.Linear(3, 4)
    head = torch.nn.Linear(4, 2)
    x = torch.randn(5, 3)
    shared = trunk(x)
    with pytest.raises(ValueError, match="no trainable parameter lies between the shared tensor and the losses"):
        F.detached_shared_grads(shared, lambda z: [head(z)[:, 0].mean(), head(z)[:, 1].mean()])
    rows, values = F.detached_shared_grads(shared, lambda z: [z[:, 0].pow(2).mean(), z.sum()])
    assert rows.shape == (2, 20) and values.dtype == torch.float64
    # the one backward from the shared tensor equals the backward of Σ w_k L_k
    F.shared_backward(shared, rows, [0.5, 2.0])
    got = trunk.weight.grad.clone()
    trunk.zero_grad()
    z = trunk(x)
    (0.5 * z[:, 0].pow(2).mean() + 2.0 * z.sum()).backward()
    torch.testing.assert_close(got, trunk.weight.grad)


def test_finite_everywhere_on_one_process():
    assert F.finite_everywhere([torch.ones(2), None], None)
    assert not F.finite_everywhere([torch.ones(2), torch.tensor([1.0, float("inf")])], None)
    assert F.finite_everywhere([], None)


def test_per_objective_local_rows_fills_a_host_buffer_like_local_rows():
    torch.manual_seed(4)
    lin = torch.nn.Linear(3, 2)
    params = list(lin.parameters())
    out = lin(torch.randn(5, 3))
    losses = [out[:, 0].mean(), (out**2).mean()]
    want = F.local_rows(F.per_objective_local_grads(losses, params), params)
    rows = torch.full((2, 8), 7.0, dtype=torch.float64)
    got = F.per_objective_local_rows(losses, params, rows)
    assert got is rows
    torch.testing.assert_close(rows, want.double())
    assert all(p.grad is None for p in params)
    with pytest.raises(ValueError, match="expected"):
        F.per_objective_local_rows(losses, params, torch.zeros(2, 7))


def test_detach_shared_keeps_its_origin_and_refuses_a_detached_input():
    torch.manual_seed(5)
    lin = torch.nn.Linear(3, 2)
    v = lin(torch.randn(4, 3))
    z = F.detach_shared(v)
    assert z.is_leaf and z.requires_grad and torch.equal(z, v)
    assert F.detached_origins([z, v]) == [(z, v)]
    assert F.detached_origins(None) == []
    F.check_detached([z.sum(), (z**2).mean()], [z])
    with pytest.raises(ValueError, match="besides the detached shared tensor"):
        F.check_detached([lin(torch.randn(1, 3)).sum() + z.sum()], [z])
    with pytest.raises(ValueError, match="requires_grad=True"):
        F.detach_shared(v.detach())
