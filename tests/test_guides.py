"""The recipes in the docs' guides hold: torch.compile, bf16 autocast, GradScaler with
unscale_ and clipping, and the logging helper of docs/guides/logging.md."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from marble_opt import BalanceReport, MarbleOptimizer

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("exact", "exact-lean", "shared", "params")


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=gen)
    scales = torch.tensor([30.0, 1.0, 0.05])
    y = torch.stack([x[:, 0].sin(), x[:, 1].cos(), x[:, 2] ** 2], dim=1) * scales
    return x, y


def _train(model: nn.Module, gram: str, *, steps: int = 5, amp: bool = False) -> tuple[MarbleOptimizer, BalanceReport]:
    x, y = _data()
    kw = {"gram_params": list(model[-3].parameters())} if gram == "params" else {}
    opt = MarbleOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), gram=gram, **kw)
    report = None
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            z = model(x)
            # Each loss reads two output columns, so that the gradients w.r.t. z overlap and
            # gram="shared" has a non-diagonal G (one column each would make Ĝ the identity).
            losses = {f"t{i}": nn.functional.mse_loss(z[:, i] + 0.5 * z[:, (i + 1) % 3], y[:, i]) for i in range(3)}
        opt.zero_grad()
        report = opt.step(losses, shared=z) if gram == "shared" else opt.step(losses)
    assert report is not None
    return opt, report


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("gram", ["exact", "shared"])
def test_a_compiled_model_trains_like_the_eager_one(gram: str) -> None:
    """docs/guides/compile.md: compile the model, keep opt.step eager."""
    torch._dynamo.reset()
    eager = _model()
    compiled_module = _model()
    _, ref = _train(eager, gram)
    _, report = _train(torch.compile(compiled_module, backend="aot_eager"), gram)
    torch.testing.assert_close(_flat(compiled_module), _flat(eager), rtol=1e-5, atol=1e-6)
    assert report.weights == pytest.approx(ref.weights, abs=1e-6)
    assert not report.skipped
    assert max(report.weights.values()) - min(report.weights.values()) > 0.01  # a non-trivial balance


@pytest.mark.parametrize("gram", SOURCES)
def test_bf16_autocast_gives_the_fp32_weights(gram: str) -> None:
    """docs/guides/mixed-precision.md: losses under bf16 autocast, step outside it."""
    opt32, rep32 = _train(_model(), gram)
    model = _model()
    opt16, rep16 = _train(model, gram, amp=True)
    assert not rep16.skipped and rep16.solved
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    assert opt16.weights == pytest.approx(opt32.weights, abs=1e-2)
    assert rep16.worst_update_cosine > 0


def test_grad_scaler_with_unscale_and_clipping_matches_the_unscaled_run() -> None:
    """docs/guides/mixed-precision.md: scale each loss, unscale_, clip, scaler.step."""
    x, y = _data()
    results = []
    for scaled in (False, True):
        model = _model()
        opt = MarbleOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), nonfinite="propagate")
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
        for _ in range(4):
            z = model(x)
            losses = {f"t{i}": nn.functional.mse_loss(z[:, i], y[:, i]) for i in range(3)}
            opt.zero_grad()
            if scaled:
                opt.backward({k: scaler.scale(v) for k, v in losses.items()})
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
                scaler.step(opt)
                scaler.update()
            else:
                opt.backward(losses)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
                opt.step()
        assert opt.num_steps == 4
        results.append((_flat(model), opt.weights))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-6)
    assert results[1][1] == pytest.approx(results[0][1], abs=1e-9)


def _guide_function(name: str):
    """The function ``name`` defined in a python block of docs/guides/logging.md."""
    text = (ROOT / "docs" / "guides" / "logging.md").read_text(encoding="utf-8")
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if f"def {name}(" in b]
    assert len(blocks) == 1, f"expected one block defining {name} in logging.md, found {len(blocks)}"
    namespace: dict = {}
    exec(compile(blocks[0], "logging.md", "exec"), namespace)  # noqa: S102 - our own docs
    return namespace[name]


def test_the_logging_guide_flattens_a_report_into_json_ready_scalars() -> None:
    report_scalars = _guide_function("report_scalars")
    _, report = _train(_model(), "exact", steps=2)
    scalars = report_scalars(report)
    assert json.loads(json.dumps(scalars)) == scalars
    assert all(type(v) is float and math.isfinite(v) for v in scalars.values())
    for name in report.names:
        assert scalars[f"marble/weight/{name}"] == report.weights[name]
        assert scalars[f"marble/update_cosine/{name}"] == report.update_cosine[name]
        assert scalars[f"marble/loss_weight/{name}"] == report.loss_weights[name]
    assert scalars["marble/worst_update_cosine"] == report.worst_update_cosine
    assert scalars["marble/skipped"] == 0.0
    # the loss weights w_k do not sum to one (the guide says so): they carry 1/‖g_k‖
    assert sum(report.loss_weights.values()) != pytest.approx(1.0, abs=1e-3)
    assert sum(report.weights.values()) == pytest.approx(1.0, abs=1e-12)


def _guide_block(page: str, marker: str) -> str:
    """The ```python block of a docs page that contains ``marker``."""
    text = (ROOT / "docs" / page).read_text(encoding="utf-8")
    blocks = [b for b in re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M) if marker in b]
    assert len(blocks) == 1, (page, marker, len(blocks))
    return blocks[0]


def test_the_grad_scaler_recipe_for_nonfinite_skip_runs_and_backs_off() -> None:
    """docs/guides/mixed-precision.md's `nonfinite="skip"` recipe, run as written on CPU (its
    "cuda" read as "cpu"): on an overflowing batch nothing moves, the scale is lowered, and the
    next good batch trains."""
    code = _guide_block("guides/mixed-precision.md", 'nonfinite="skip"')
    code = code.replace("torch.amp.GradScaler()", 'torch.amp.GradScaler("cpu", init_scale=1024.0)')
    code = code.replace('torch.autocast("cuda"', 'torch.autocast("cpu"')
    model = _model()
    x, y = _data()
    loader = [0, 1, 2]  # batch 1 overflows

    def compute_losses(model: nn.Module, batch: int) -> dict[str, torch.Tensor]:
        z = model(x).float()
        losses = {f"t{i}": nn.functional.mse_loss(z[:, i], y[:, i]) for i in range(3)}
        if batch == 1:
            losses["t1"] = losses["t1"] * float("inf")
        return losses

    namespace = {"torch": torch, "MarbleOptimizer": MarbleOptimizer, "model": model, "loader": []}
    namespace["compute_losses"] = compute_losses
    exec(compile(code, "mixed-precision.md", "exec"), namespace)  # builds opt and scaler (empty loader)
    opt, scaler = namespace["opt"], namespace["scaler"]
    loop = code[code.index("for batch in loader:") :]
    for batch in loader:
        before = [p.detach().clone() for p in model.parameters()]
        scale = scaler.get_scale()
        exec(
            compile(loop, "mixed-precision.md", "exec"), {**namespace, "loader": [batch], "opt": opt, "scaler": scaler}
        )
        after = list(model.parameters())
        moved = any(not torch.equal(a, b) for a, b in zip(after, before))
        if batch == 1:
            assert not moved, "a skipped backward moved the parameters"
            assert scaler.get_scale() < scale, "the scale was not lowered after the overflow"
        else:
            assert moved, f"batch {batch} did not train"
